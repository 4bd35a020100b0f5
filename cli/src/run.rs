//! `leakhunt run`: start the program with the preload library, stream every traced process's
//! events over a Unix socket in a private directory, and report when the program has exited.
//! The program's stdin, stdout and stderr are its own; the report goes to stderr; the exit status
//! is the program's (a death by signal is re-raised), or `--error-exitcode` when leaks are found.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use leakhunt_format::{DecodeError, ExitKind};
use leakhunt_symbolizer::Symbolizer;

use crate::process::Process;
use crate::recover;
use crate::report::{self, Report};
use crate::RunArgs;

const LIB: &str = "libleakhunt.so";

/// The preload library: `--preload`, `$LEAKHUNT_PRELOAD`, or next to this executable.
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
    let p = exe.with_file_name(LIB);
    if !p.is_file() {
        bail!(
            "cannot find {LIB} next to {} (build it with `cargo build --release`, or pass --preload PATH)",
            exe.display()
        );
    }
    Ok(p)
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

/// Appends recovered batches to a kept trace, so that `leakhunt report` on it says what this
/// run said.
fn append_batches(trace: &std::path::Path, complete_len: u64, batches: &[(u32, Vec<u8>)]) {
    let mut out = Vec::new();
    for (tid, slots) in batches {
        leakhunt_format::encode::batch(*tid, slots, &mut out);
    }
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(trace)
        .and_then(|mut f| {
            // Drop a record the kill cut short, then add the recovered batches.
            f.set_len(complete_len)?;
            f.seek(std::io::SeekFrom::End(0))?;
            f.write_all(&out)
        });
    if let Err(e) = r {
        eprintln!("leakhunt: warning: cannot add the recovered events to the --output trace: {e}");
    }
}

/// Copies what it reads to a file (`--output`).
struct Tee<R> {
    inner: R,
    file: Option<File>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(f) = &mut self.file {
            if f.write_all(&buf[..n]).is_err() {
                eprintln!(
                    "leakhunt: warning: cannot write the --output trace; the report is unaffected"
                );
                self.file = None;
            }
        }
        Ok(n)
    }
}

struct Stream {
    process: Process,
    error: Option<DecodeError>,
    tee: Option<PathBuf>,
}

/// Redraws the live view on stderr after epochs, at most twice a second.
fn live_view_hook() -> leakhunt::process::EpochHook {
    let mut sym = leakhunt_symbolizer::Symbolizer::new();
    let mut last: Option<Instant> = None;
    Box::new(move |p: &Process| {
        if last.is_some_and(|l| l.elapsed() < Duration::from_millis(500)) {
            return;
        }
        last = Some(Instant::now());
        let view = leakhunt::growth::live_view(p, &mut sym);
        // Home and clear, then the view: a terminal shows it in place.
        eprint!("\x1b[H\x1b[2J{view}");
    })
}

/// Accepts trace connections, one reader thread each, until the program has exited (`stop`) and,
/// with children traced, no connection came for `grace`. Returns how many streams it started
/// (each sends its result on `tx`).
///
/// Without children traced it blocks in accept (no polling delay at start or end): after the
/// program exits, the caller connects once itself to wake it, and the first connection accepted
/// after that ends it (the program's own, if it ended before it was accepted: the wake-up
/// connection comes after it and is dropped; an empty stream is no process). With children
/// traced it polls every millisecond, as a late child may connect after the program ended.
fn serve(
    listener: UnixListener,
    live: bool,
    output: Option<PathBuf>,
    grace: Duration,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    tx: crossbeam_channel::Sender<Stream>,
) -> u32 {
    let mut n = 0u32;
    let mut quiet_since = Instant::now();
    let _ = listener.set_nonblocking(!grace.is_zero());
    loop {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let last = grace.is_zero() && stop.load(Ordering::SeqCst);
                let _ = conn.set_nonblocking(false);
                // After the program ended: the wake-up connection (closed at once, so it reads
                // as empty), or the program's own if it was not accepted before it ended. An
                // empty stream is no process: no reader for it (a reader costs ~1 MiB).
                let mut first = Vec::new();
                if last {
                    let mut b = [0u8; 1];
                    match conn.read(&mut b) {
                        Ok(1) => first.push(b[0]),
                        _ => return n,
                    }
                }
                n += 1;
                quiet_since = Instant::now();
                active.fetch_add(1, Ordering::SeqCst);
                let tee = output.as_ref().map(|o| {
                    let mut s = o.as_os_str().to_owned();
                    s.push(format!(".partial-{n}"));
                    PathBuf::from(s)
                });
                let file = tee.as_ref().and_then(|p| match File::create(p) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        eprintln!("leakhunt: warning: cannot create {}: {e}", p.display());
                        None
                    }
                });
                let (tx, active) = (tx.clone(), active.clone());
                // The live view follows the program (the first stream), not its children.
                let view = live && n == 1;
                std::thread::spawn(move || {
                    let mut p = Process::new();
                    if view {
                        p.on_epoch = Some(live_view_hook());
                    }
                    let inner = std::io::Cursor::new(first).chain(conn);
                    let (process, error) = Process::read_stream_with(p, Tee { inner, file });
                    let _ = tx.send(Stream {
                        process,
                        error,
                        tee,
                    });
                    active.fetch_sub(1, Ordering::SeqCst);
                });
                if last {
                    return n;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // After the program exits, wait for open streams, then (children traced) a short
                // grace period for children that connect late.
                if stop.load(Ordering::SeqCst) && active.load(Ordering::SeqCst) == 0 {
                    if quiet_since.elapsed() >= grace {
                        return n;
                    }
                } else if active.load(Ordering::SeqCst) > 0 {
                    quiet_since = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                eprintln!("leakhunt: error: accepting trace connections: {e}");
                return n;
            }
        }
    }
}

pub fn run(a: &RunArgs) -> Result<ExitCode> {
    let lib = find_preload(a.preload.as_deref())?;
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
        .env("LEAKHUNT_FREERES", if a.no_freeres { "0" } else { "1" })
        .env_remove("LEAKHUNT_OUT");
    match &ring_dir {
        Some(d) => cmd.env("LEAKHUNT_RING_DIR", d),
        None => cmd.env_remove("LEAKHUNT_RING_DIR"),
    };

    // Ctrl-C and Ctrl-\ reach the program through the terminal's process group: leakhunt only
    // survives them to report. SIGTERM and SIGHUP sent to leakhunt are passed on.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("leakhunt: cannot run {}: {e}", program.to_string_lossy());
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
    let sig_handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGTERM || sig == signal_hook::consts::SIGHUP {
                let _ = Command::new("kill")
                    .arg(format!("-{sig}"))
                    .arg(child_pid.to_string())
                    .status();
            }
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = crossbeam_channel::unbounded();
    let server = {
        let (stop, active, output) = (stop.clone(), active.clone(), a.output.clone());
        let grace = Duration::from_millis(if a.trace_children { 200 } else { 0 });
        let live = a.live;
        std::thread::spawn(move || serve(listener, live, output, grace, stop, active, tx))
    };
    let status = child.wait().context("waiting for the program")?;
    stop.store(true, Ordering::SeqCst);
    if !a.trace_children {
        // Wakes the accept loop; the connection itself ends it.
        let _ = std::os::unix::net::UnixStream::connect(&sock);
    }
    let started = server.join().unwrap_or(0);
    sig_handle.close();
    let _ = std::fs::remove_dir_all(&dir);

    // Each stream ends when its process's end of the socket closes.
    let mut streams: Vec<Stream> = (0..started)
        .filter_map(|_| rx.recv().ok())
        .filter(|s| {
            s.process.complete_len > 0 || s.error.is_some() || s.process.truncated.is_some()
        })
        .collect();
    for s in &mut streams {
        // A process that ended without saying how (SIGKILL): take what reached its rings.
        if let (Some(d), None) = (&ring_dir, s.process.exit) {
            if recover::is_dead(s.process.pid()) {
                let (n, batches) = recover::from_ring_files(&mut s.process, d);
                if n > 0 {
                    s.process.warnings.push(format!(
                        "the trace ended without the process's end: {n} events were recovered from its rings"
                    ));
                    if let Some(tee) = &s.tee {
                        append_batches(tee, s.process.complete_len, &batches);
                    }
                    // The record the kill cut short is superseded by what the rings held.
                    s.process.truncated = None;
                }
            }
        }
        s.process.finish();
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
    let mut sym = Symbolizer::new();
    let mut procs = Vec::new();
    let main_exit = match (status.code(), status.signal()) {
        (Some(c), _) => Some(ExitKind::Code(c)),
        (None, Some(s)) => Some(ExitKind::Signal(s)),
        _ => None,
    };
    for s in &mut streams {
        if let Some(e) = &s.error {
            eprintln!(
                "leakhunt: warning: trace of pid {}: {e}; the report covers what came before",
                s.process.pid()
            );
        }
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
            if let Err(e) = std::fs::rename(tee, &dest) {
                eprintln!(
                    "leakhunt: warning: cannot save the trace as {}: {e}",
                    dest.display()
                );
            }
        }
        if s.process.header.is_none() {
            continue;
        }
        let exit = (s.process.pid() == child_pid)
            .then_some(main_exit)
            .flatten();
        if s.process.exit.is_none() && matches!(exit, Some(ExitKind::Code(_))) {
            // It exited normally, yet its trace stopped before: recording failed (the program
            // closed leakhunt's descriptor, say); the preload said why on stderr.
            s.process.warnings.push("recording stopped before the process exited (see leakhunt's message above): the figures cover only what was recorded until then".to_string());
        }
        procs.push(report::build_with(
            &s.process,
            exit,
            a.out.warmup_s(),
            &mut sym,
        ));
    }
    if !procs.iter().any(|p| p.pid == child_pid) {
        eprintln!("leakhunt: warning: the program (pid {child_pid}) sent no trace: it may not be dynamically linked, or it exited before its first allocation");
    }
    for w in sym.warnings() {
        eprintln!("leakhunt: warning: {w}");
    }
    let report = Report::new(procs);
    let leaking = report.processes.iter().any(|p| {
        p.growth
            .iter()
            .any(|g| g.verdict == crate::verdict::Verdict::Leak)
    });
    let leaks = crate::emit(&report, &a.out, true)?;
    if let (true, Some(n)) = (leaks, a.out.error_exitcode) {
        return Ok(ExitCode::from(n));
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
