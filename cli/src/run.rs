//! `leakhunt run`: start the program with the preload library, stream every traced process's
//! events over a Unix socket in a private directory, and report when the program has exited.
//! The program's stdin, stdout and stderr are its own; the report goes to stderr; the exit status
//! is the program's (a death by signal is re-raised), or `--error-exitcode` when leaks are found.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use leakhunt_format::{DecodeError, ExitKind};
use leakhunt_symbolizer::Symbolizer;

use crate::process::Process;
use crate::recover;
use crate::report::{self, Report};
use crate::serve;
use crate::RunArgs;

const LIB: &str = "libleakhunt.so";

/// Where the preload library is looked for beside this executable, in order: next to it (as
/// built: `target/release`), then `../lib/leakhunt/` from its directory (as `scripts/install`
/// lays it out: `PREFIX/bin/leakhunt`, `PREFIX/lib/leakhunt/libleakhunt.so`).
pub fn preload_candidates(exe: &Path) -> Vec<PathBuf> {
    let dir = exe.parent().unwrap_or(Path::new("/"));
    vec![dir.join(LIB), dir.join("../lib/leakhunt").join(LIB)]
}

/// The preload library: `--preload`, `$LEAKHUNT_PRELOAD`, or beside this executable
/// ([`preload_candidates`]).
fn find_preload(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--preload {}: no such file", p.display());
        }
        return Ok(std::fs::canonicalize(p)?);
    }
    if let Some(p) = std::env::var_os("LEAKHUNT_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("LEAKHUNT_PRELOAD={}: no such file", p.display());
        }
        return Ok(std::fs::canonicalize(p)?);
    }
    let exe = std::env::current_exe().context("cannot locate the leakhunt executable")?;
    let candidates = preload_candidates(&exe);
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(std::fs::canonicalize(p)?),
        None => bail!(
            "cannot find {LIB} beside {}: looked for {} (build it with `cargo build --release`, install both with `scripts/install`, or pass --preload PATH)",
            exe.display(),
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    }
}

fn private_dir(base: PathBuf) -> Result<PathBuf> {
    for i in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let d = base.join(format!("leakhunt-{}-{nanos:x}-{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", d.display())),
        }
    }
    bail!("cannot create a private directory in {}", base.display())
}

/// Removes leakhunt's private directories however `run` returns.
struct RemoveOnDrop(Vec<Option<PathBuf>>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in self.0.iter().flatten() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct Stream {
    process: Process,
    error: Option<DecodeError>,
    /// Where the stream was kept, packed (`--output`), until renamed.
    tee: Option<PathBuf>,
    /// Bytes a resumed connection said were sent but never arrived.
    missing: u64,
}

/// Redraws the live view on stderr after epochs, at most twice a second: in place on a
/// terminal; elsewhere (a file, a pipe) as plain text, once a second, without the terminal's
/// control codes.
fn live_view_hook() -> leakhunt::process::EpochHook {
    let mut sym = leakhunt_symbolizer::Symbolizer::new();
    let mut last: Option<Instant> = None;
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_millis(if tty { 500 } else { 1000 });
    Box::new(move |p: &Process| {
        if last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        last = Some(Instant::now());
        let view = leakhunt::growth::live_view(p, &mut sym);
        if tty {
            // Home and clear, then the view: a terminal shows it in place.
            eprint!("\x1b[H\x1b[2J{view}");
        } else {
            eprintln!("{view}");
        }
    })
}

/// Creates the file that keeps a stream, packed (`--output`): a new name next to TRACE, made
/// with O_EXCL (so never through a link someone planted) and mode 0600.
fn create_partial(dest: &Path, n: usize) -> Option<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    for k in 0..100 {
        let p = serve::partial_name(dest, n * 100 + k);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => return Some((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                eprintln!("leakhunt: warning: cannot create {}: {e}", p.display());
                return None;
            }
        }
    }
    eprintln!(
        "leakhunt: warning: cannot create a file next to {}: every name tried exists",
        dest.display()
    );
    None
}

/// What a signal to leakhunt does: before the program ends, SIGTERM and SIGHUP are passed on to
/// it (Ctrl-C and Ctrl-\ reach it through the terminal's process group); after, while the report
/// is made, the first SIGINT, SIGTERM or SIGHUP stops the analysis and prints what is ready, the
/// second ends leakhunt at once (the kept trace is in place by then).
static REPORTING: AtomicBool = AtomicBool::new(false);
/// The signal that interrupted the analysis (0: none).
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst) != 0
}

pub fn run(a: &RunArgs) -> Result<ExitCode> {
    let lib = find_preload(a.preload.as_deref())?;
    // A bad suppression file is said before the program runs, not after.
    for f in &a.out.suppressions {
        leakhunt::supp::read(f)?;
    }
    let dir = private_dir(std::env::temp_dir())?;
    // The rings go in memory-backed files where there is /dev/shm (no disk writeback); if that
    // fails the preload uses anonymous memory and only SIGKILL recovery is lost.
    let shm = PathBuf::from("/dev/shm");
    let ring_dir = if shm.is_dir() {
        private_dir(shm).ok()
    } else {
        None
    }
    .or_else(|| {
        let d = dir.join("rings");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .ok()
            .map(|_| d)
    });
    let _cleanup = RemoveOnDrop(vec![Some(dir.clone()), ring_dir.clone()]);
    let sock = dir.join("trace.sock");
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    let token = serve::new_token().context("cannot read /dev/urandom for the run's token")?;

    let mut preload = lib.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let program = &a.command[0];
    let mut cmd = Command::new(program);
    cmd.args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env("LEAKHUNT_SOCKET", &sock)
        .env("LEAKHUNT_TOKEN", serve::hex(&token))
        .env("LEAKHUNT_MAX_FRAMES", a.max_frames.to_string())
        .env("LEAKHUNT_EPOCH_MS", a.epoch.as_millis().to_string())
        .env(
            "LEAKHUNT_SNAPSHOT_MS",
            a.snapshot_every.map_or(0, |d| d.as_millis()).to_string(),
        )
        .env(
            "LEAKHUNT_TRACE_CHILDREN",
            if a.trace_children { "1" } else { "0" },
        )
        .env(
            "LEAKHUNT_FOLLOW_FORKS",
            if a.no_follow_forks { "0" } else { "1" },
        )
        .env("LEAKHUNT_FREERES", if a.no_freeres { "0" } else { "1" })
        .env("LEAKHUNT_REACH", if a.no_reachability { "0" } else { "1" })
        .env("LEAKHUNT_ORPHANS", if a.orphans { "1" } else { "0" })
        .env(
            "LEAKHUNT_PRE_EXIT_SCAN",
            if a.no_retention || a.no_reachability {
                "0"
            } else {
                "1"
            },
        )
        .env_remove("LEAKHUNT_OUT");
    match &ring_dir {
        Some(d) => cmd.env("LEAKHUNT_RING_DIR", d),
        None => cmd.env_remove("LEAKHUNT_RING_DIR"),
    };

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;

    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!(
                "leakhunt: cannot run {}: {e}",
                leakhunt::report::escape_control(&program.to_string_lossy())
            );
            return Ok(ExitCode::from(
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
            ));
        }
    };
    let child_pid = child.id();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let stop = sig != signal_hook::consts::SIGQUIT;
            if REPORTING.load(Ordering::SeqCst) {
                if !stop {
                    continue;
                }
                if INTERRUPTED.swap(sig, Ordering::SeqCst) != 0 {
                    eprintln!("leakhunt: stopped");
                    std::process::exit(128 + sig);
                }
                eprintln!("leakhunt: interrupted: printing what is ready (again to stop at once)");
            } else if sig == signal_hook::consts::SIGTERM || sig == signal_hook::consts::SIGHUP {
                if let Some(pid) = rustix::process::Pid::from_raw(child_pid as i32) {
                    let sig = if sig == signal_hook::consts::SIGTERM {
                        rustix::process::Signal::TERM
                    } else {
                        rustix::process::Signal::HUP
                    };
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
        }
    });

    let shared = Arc::new(serve::Shared::default());
    let gate = Arc::new(serve::Gate {
        token,
        program: child_pid,
        children: a.trace_children || !a.no_follow_forks,
        exec_children: a.trace_children,
    });
    let (tx, rx) = crossbeam_channel::unbounded::<Stream>();
    let fork_book = Arc::new(leakhunt::process::ForkBook::default());
    let prefetch = Prefetch::start(lib.clone());
    let on_stream: Arc<dyn Fn(serve::Accepted) + Send + Sync> = {
        let (output, live) = (a.output.clone(), a.live);
        let (lib, ring_dir, reach) = (lib.clone(), ring_dir.clone(), !a.no_reachability);
        let heuristics = a.leak_check_heuristics;
        let retention = !a.no_retention;
        let first = AtomicBool::new(true);
        let count = AtomicUsize::new(0);
        let modules = prefetch.sender();
        Arc::new(move |acc: serve::Accepted| {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let mut p = Process::new();
            p.on_module = Some(modules.hook(false));
            p.on_outer_module = Some(modules.hook(true));
            // The kept trace is packed as the events are applied (`leakhunt pack`'s writer).
            let mut tee = None;
            if let Some((path, f)) = output.as_deref().and_then(|o| create_partial(o, n)) {
                match leakhunt::pack::PackWriter::new(std::io::BufWriter::with_capacity(1 << 16, f))
                {
                    Ok(w) => {
                        p.observer = Some(Box::new(w));
                        tee = Some(path);
                    }
                    Err(e) => {
                        eprintln!(
                            "leakhunt: warning: cannot write the --output trace: {e}; the report is unaffected"
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            p.ended = Some(acc.ended.clone());
            p.fork_book = Some(fork_book.clone());
            // The live view follows the program (its first image), not its children.
            if live && acc.hello.pid == child_pid && first.swap(false, Ordering::SeqCst) {
                p.on_epoch = Some(live_view_hook());
            }
            if reach {
                let own = [Some(lib.clone()), ring_dir.clone()]
                    .into_iter()
                    .flatten()
                    .collect();
                let scanner = leakhunt::scan::Scanner::new(
                    acc.hello.pid,
                    acc.source.replies.clone(),
                    own,
                    heuristics,
                    retention,
                );
                p.on_reach = Some(scanner.into_hook());
            }
            let missing = acc.source.missing.clone();
            let conn = acc.source.replies.clone();
            let (process, error) = Process::read_stream_with(p, acc.source);
            if error.is_some() {
                // Nothing reads this stream any more: its process must not block writing into
                // it (the heap scan's reply handle keeps the connection open). Shut, its writes
                // fail and the tracer says what it could not record; the program runs on.
                if let Some(c) = conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            }
            let _ = tx.send(Stream {
                process,
                error,
                tee,
                missing: missing.load(Ordering::Relaxed),
            });
        })
    };
    let acceptor = {
        let (gate, shared) = (gate.clone(), shared.clone());
        std::thread::spawn(move || serve::accept_loop(listener, gate, shared, on_stream))
    };
    let status = wait_for_program(child_pid).context("waiting for the program")?;
    drop(child);
    // From here on, Ctrl-C and SIGTERM are leakhunt's: they cut short the wait for traced
    // children that live on, and the analysis.
    REPORTING.store(true, Ordering::SeqCst);
    let unfinished = serve::finish(&shared, &sock, &gate, acceptor, &interrupted);
    if unfinished > 0 {
        eprintln!(
            "leakhunt: not waiting for {unfinished} traced process{} still running",
            if unfinished == 1 { "" } else { "es" }
        );
    }
    // That signal ended the wait; the next one stops the analysis.
    INTERRUPTED.store(0, Ordering::SeqCst);
    let _ = std::fs::remove_dir_all(&dir);

    // Each stream ends when its process's end of the socket closes.
    let mut streams: Vec<Stream> = rx
        .try_iter()
        .filter(|s| {
            s.process.complete_len > 0 || s.error.is_some() || s.process.truncated.is_some()
        })
        .collect();
    let main_exit = match (status.code(), status.signal()) {
        (Some(c), _) => Some(ExitKind::Code(c)),
        (None, Some(s)) => Some(ExitKind::Signal(s)),
        _ => None,
    };
    for s in &mut streams {
        // A process that ended without saying how (SIGKILL): take what reached its rings.
        if let (Some(d), None) = (&ring_dir, s.process.exit) {
            if recover::is_dead(s.process.pid()) {
                let got = recover::from_ring_files(&mut s.process, d);
                if got.events > 0 {
                    s.process.warnings.push(format!(
                        "the trace ended without the process's end: {} events were recovered from its rings",
                        got.events
                    ));
                    // The record the kill cut short is superseded by what the rings held.
                    s.process.truncated = None;
                }
                // The program killed outright (no handler of ours ran), everything it recorded
                // now read back: its end is the one waitpid gave, and a kept trace says so too.
                let killed = matches!(main_exit, Some(ExitKind::Signal(_)));
                let end = (killed && s.process.pid() == child_pid && got.failed == 0)
                    .then_some(main_exit)
                    .flatten();
                // The recovered events reached the kept trace as they were applied; the end too.
                if let (Some(k), Some(o)) = (end, &mut s.process.observer) {
                    let mut rec = Vec::new();
                    leakhunt_format::encode::exit(k, &mut rec);
                    o.record(leakhunt_format::tag::EXIT, &rec);
                }
                if end.is_some() {
                    s.process.exit = end;
                    s.process.truncated = None;
                }
            }
        }
        s.process.finish();
        if let Some(mut o) = s.process.observer.take() {
            let error = s.error.as_ref().map(|e| e.to_string());
            if let Err(e) = o.end(s.process.truncated.as_deref(), error.as_deref()) {
                eprintln!(
                    "leakhunt: warning: cannot write the --output trace of pid {}: {e}; the report is unaffected",
                    s.process.pid()
                );
            }
        }
    }
    if let Some(d) = &ring_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    Process::link_forks(
        &mut streams
            .iter_mut()
            .map(|s| &mut s.process)
            .collect::<Vec<_>>(),
    );
    // A followed fork child that replaced its image by exec, the new one untraced: its heap went
    // with the image, and memcheck reports nothing for it; neither does leakhunt.
    if !a.trace_children {
        streams.retain(|s| {
            !(s.process.forked_from.is_some()
                && s.process.exit == Some(leakhunt_format::ExitKind::Exec))
        });
    }
    // The program first, then its children by pid; images of one pid (exec) in the order they ran.
    streams.sort_by_key(|s| {
        let start = s
            .process
            .header
            .as_ref()
            .map_or(0, |h| h.start_monotonic_ns);
        (s.process.pid() != child_pid, s.process.pid(), start)
    });
    let mut images: std::collections::HashMap<u32, u32> = Default::default();
    for s in &mut streams {
        s.process.on_module = None;
        s.process.on_outer_module = None;
    }
    let mut sym = prefetch.finish();
    let mut procs = Vec::new();
    // Keep the traces first: whatever happens to the analysis, they are in place.
    for s in &mut streams {
        let image = images.entry(s.process.pid()).or_insert(0);
        *image += 1;
        if let (Some(out), Some(tee)) = (&a.output, &s.tee) {
            // TRACE for the program, TRACE.<pid> for a child, .<n> added for the n-th image after exec.
            let mut o = out.as_os_str().to_owned();
            if s.process.pid() != child_pid {
                o.push(format!(".{}", s.process.pid()));
            }
            if *image > 1 {
                o.push(format!(".{image}"));
            }
            let dest = PathBuf::from(o);
            // rename() replaces a name, never writes through a link planted at it.
            if let Err(e) = std::fs::rename(tee, &dest) {
                eprintln!(
                    "leakhunt: warning: cannot save the trace as {}: {e}; it is kept as {}",
                    dest.display(),
                    tee.display()
                );
            }
        }
        if let Some(e) = &s.error {
            eprintln!(
                "leakhunt: warning: trace of pid {}: {e}; the report covers what came before",
                s.process.pid()
            );
        }
        if s.missing > 0 {
            s.process.incomplete = Some(format!(
                "{} bytes of the trace were lost when the process's connection was re-made",
                s.missing
            ));
        }
    }
    let refused = std::mem::take(&mut *shared.refused.lock().unwrap_or_else(|e| e.into_inner()));
    for r in &refused {
        eprintln!("leakhunt: warning: {r}");
    }
    let test_delay = std::env::var("LEAKHUNT_TEST_REPORT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let mut skipped = 0;
    for s in &mut streams {
        if s.process.header.is_none() {
            continue;
        }
        if let Some(ms) = test_delay {
            // For the test of an interrupted report: an analysis step that takes this long.
            std::thread::sleep(Duration::from_millis(ms));
        }
        if interrupted() {
            skipped += 1;
            continue;
        }
        let exit = (s.process.pid() == child_pid)
            .then_some(main_exit)
            .flatten();
        if s.process.exit.is_none() && matches!(exit, Some(ExitKind::Code(_))) {
            // It exited normally, yet its trace stopped before: recording failed (the program
            // took leakhunt's descriptor and it could not be re-made, say).
            s.process.incomplete.get_or_insert_with(|| {
                "recording stopped before the process exited: the figures cover only what was recorded until then".to_string()
            });
        }
        if s.process.pid() == child_pid {
            s.process.warnings.extend(refused.iter().cloned());
        }
        let mut r = report::build_with(&s.process, exit, a.out.warmup_s(), &mut sym);
        a.out.add_profiles(&s.process, &mut r, &mut sym);
        procs.push(r);
    }
    if skipped > 0 {
        eprintln!(
            "leakhunt: the report was interrupted: {skipped} process{} not reported{}",
            if skipped == 1 { "" } else { "es" },
            match &a.output {
                Some(o) => format!("; `leakhunt report {}` makes the whole report", o.display()),
                None => " (run with -o TRACE to keep the trace for `leakhunt report`)".into(),
            }
        );
    }
    if !procs.iter().any(|p| p.pid == child_pid) && skipped == 0 {
        eprintln!(
            "leakhunt: warning: the program (pid {child_pid}) sent no trace: {}",
            leakhunt::program::why_no_trace(program)
        );
    }
    for w in sym.warnings() {
        eprintln!("leakhunt: warning: {w}");
    }
    let report = a.out.apply(Report::new(procs))?;
    let leaking = report.processes.iter().any(|p| {
        p.growth
            .iter()
            .any(|g| g.verdict == crate::verdict::Verdict::Leak)
    });
    let failed = crate::emit(&report, &a.out, true)?;
    if let (true, Some(n)) = (failed, a.out.error_exitcode) {
        return Ok(ExitCode::from(n));
    }
    if skipped > 0 {
        // Die of the signal that stopped us, as a shell expects of an interrupted command.
        let _ = std::io::stderr().flush();
        let sig = INTERRUPTED.load(Ordering::SeqCst);
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        return Ok(ExitCode::from(128 + sig as u8));
    }
    if a.fail_on_growth && leaking {
        eprintln!("leakhunt: memory grows steadily under this load (a leak verdict above): failing as --fail-on-growth asks");
        return Ok(ExitCode::from(a.out.error_exitcode.unwrap_or(3)));
    }
    if let Some(sig) = status.signal() {
        let _ = std::io::stderr().flush();
        // Die the same way, so that a shell or a CI sees the program's own death.
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        return Ok(ExitCode::from(128 + sig as u8));
    }
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}

/// Waits for the program to end, as `Child::wait` would, but only as this thread's own child
/// (`__WNOTHREAD`): a heap scan at a snapshot holds the program's threads with ptrace from
/// another thread of ours, and a plain wait here would take their ptrace stops for its own (the
/// scanning thread then waits for ever, and the run believes the program gone).
fn wait_for_program(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use std::os::unix::process::ExitStatusExt;
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WNOTHREAD)) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(std::process::ExitStatus::from_raw((code & 0xff) << 8))
            }
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                return Ok(std::process::ExitStatus::from_raw(
                    sig as i32 | if core { 0x80 } else { 0 },
                ))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Loads each traced program's executable's symbols and debug information on a thread of its
/// own while the program runs, so that the report after it exits finds them loaded (nearly
/// every reported stack has frames there; a large program's debug information takes seconds
/// to load). Besides the executable (its process's first module), only a library where a stack
/// ends (`Process::on_outer_module`: a thread's start in libc): other libraries' are loaded
/// when a reported frame needs them, as before (libc's compressed debug file inflates to 15 MB
/// that a single-threaded program's report never reads; a threaded one's names its threads'
/// first frames from it, which took 20 ms after the program ended). (At nice 10 it left that
/// work to the end, on one core, where the program no longer used the other: no faster.)
struct Prefetch {
    tx: crossbeam_channel::Sender<(String, Vec<u8>)>,
    lib: PathBuf,
    /// Dropped to stop the thread (it blocks on both channels; nothing polls).
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Symbolizer>>,
}

#[derive(Clone)]
struct PrefetchSender {
    tx: crossbeam_channel::Sender<(String, Vec<u8>)>,
    lib: PathBuf,
}

impl PrefetchSender {
    /// For `on_module` (`any`: false: the executable only) or `on_outer_module` (true).
    fn hook(&self, any: bool) -> leakhunt::process::ModuleHook {
        let me = self.clone();
        Box::new(move |m: &leakhunt_format::encode::Module| {
            if (m.id != 0 && !any) || m.path.is_empty() || Path::new(&m.path) == me.lib {
                return;
            }
            let _ = me.tx.send((m.path.clone(), m.build_id.clone()));
        })
    }
}

impl Prefetch {
    fn start(lib: PathBuf) -> Prefetch {
        let (tx, rx) = crossbeam_channel::unbounded::<(String, Vec<u8>)>();
        let (stop, halt) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("leakhunt-prefetch".into())
            .spawn(move || {
                let mut sym = Symbolizer::new();
                loop {
                    crossbeam_channel::select! {
                        recv(rx) -> m => match m {
                            Ok((path, id)) => sym.prefetch(&path, &id),
                            Err(_) => break,
                        },
                        recv(halt) -> _ => break,
                    }
                }
                sym
            })
            .ok();
        Prefetch {
            tx,
            lib,
            stop: Some(stop),
            thread,
        }
    }

    fn sender(&self) -> PrefetchSender {
        PrefetchSender {
            tx: self.tx.clone(),
            lib: self.lib.clone(),
        }
    }

    /// The symbolizer with what was loaded so far (what is still queued is loaded when the
    /// report looks it up).
    fn finish(mut self) -> Symbolizer {
        drop(self.stop.take());
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}
