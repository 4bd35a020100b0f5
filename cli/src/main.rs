//! `leakhunt`: run a program under the preload library and report what it never freed, or
//! report on a trace written earlier by the library alone.
#![forbid(unsafe_code)]

mod run;
mod serve;

use leakhunt::{compare, input, parse_duration, process, recover, report, verdict};

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use leakhunt_symbolizer::Symbolizer;

use crate::process::Process;
use crate::report::Report;

#[derive(Parser)]
#[command(
    name = "leakhunt",
    version,
    about = "Find memory leaks in native programs (C, C++, Rust)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM with leakhunt's preload library and report the blocks it never freed.
    Run(RunArgs),
    /// Report on trace files written by the preload library alone (LD_PRELOAD=libleakhunt.so).
    Report(ReportArgs),
    /// What grew between two points of a run (epoch numbers, times like 30s, `warmup`, `end`),
    /// or between the ends of two runs (two traces).
    Diff(DiffArgs),
    /// Did the fix work? Every callsite that grew in BEFORE must have stopped growing in AFTER
    /// (same load, at least as long): exit 0, else 1 with what still grows.
    Verify(VerifyArgs),
    /// Mark a named point in a process traced by leakhunt (live run or preload alone), for
    /// `leakhunt diff --from NAME --to NAME`.
    Snapshot(SnapshotArgs),
    /// memcheck's loss records against leakhunt's, both as memcheck's XML (`valgrind
    /// --leak-check=full --xml=yes --xml-file=A`, `leakhunt run --xml-file B`): what agrees,
    /// what differs; exit 0 when every record has its twin.
    CompareValgrind {
        /// memcheck's XML.
        memcheck: PathBuf,
        /// leakhunt's XML.
        leakhunt: PathBuf,
    },
    /// Every distinct path that holds one callsite's blocks (from each heap scan in the trace),
    /// with how many blocks each holds and what the callsite's blocks keep alive.
    Paths(PathsArgs),
    /// Pack a trace the preload wrote (or any trace) into a packed trace: the same report, a
    /// fraction of the bytes (events in sequence order, predicted, then zstd). Every command
    /// that reads traces reads packed ones; `leakhunt run -o` keeps its traces packed.
    Pack {
        /// The trace to pack.
        input: PathBuf,
        /// The packed trace to write (created 0600; "-" for stdout).
        output: PathBuf,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) on stdout,
    /// e.g. `leakhunt completions bash > /etc/bash_completion.d/leakhunt`, or
    /// `source <(leakhunt completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (roff): leakhunt.1 and one leakhunt-COMMAND.1 per command into DIR;
    /// without DIR, print leakhunt.1 on stdout (`leakhunt man | man -l -`).
    Man {
        /// The directory to write the pages into (created if missing).
        dir: Option<PathBuf>,
    },
    /// Print a trace's records (for debugging leakhunt itself).
    #[command(hide = true)]
    Dump { trace: PathBuf },
    /// The heap scan at exit of a process traced by the preload alone, which starts it.
    #[command(hide = true)]
    ReachHelper {
        #[arg(long)]
        trace: PathBuf,
        #[arg(long)]
        pid: u32,
        /// Heap scans the trace asked for before this one (answered already: left alone).
        #[arg(long, default_value_t = 0)]
        answered: u32,
        #[arg(long)]
        lib: Option<PathBuf>,
        /// A fork child's parent's trace (where the inherited blocks are).
        #[arg(long)]
        parent_trace: Option<PathBuf>,
        /// Started while the program runs: read the trace as it grows, answer every scan until
        /// the one at exit, and stop past this many bytes of trace.
        #[arg(long)]
        early_limit: Option<u64>,
    },
}

#[derive(Args)]
pub struct PathsArgs {
    /// A trace kept by `leakhunt run -o` or written by the preload alone.
    trace: PathBuf,
    /// The callsite: the `callsite` number of a record or growth entry in the report.
    #[arg(
        long,
        value_name = "ID",
        required_unless_present = "at",
        conflicts_with = "at"
    )]
    callsite: Option<u32>,
    /// Or the callsites whose stacks pass through FILE:LINE (FILE: the source's name, or the end
    /// of its path).
    #[arg(long, value_name = "FILE:LINE")]
    at: Option<String>,
    /// Write the paths as JSON to FILE ("-" for stdout) instead of text.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// The traced process.
    pid: u32,
    /// The snapshot's name (default: snapshot-<seconds since the Unix epoch>).
    #[arg(long)]
    name: Option<String>,
    /// Also sort the blocks live at that point into memcheck's kinds (a heap scan: the program's
    /// threads are held while its memory is read; the report says for how long).
    #[arg(long)]
    reachability: bool,
}

/// The exports read by other tools, of `run`, `report` and `diff`.
#[derive(Args, Clone)]
pub struct Exports {
    /// Also write a pprof profile (profile.proto, gzipped: `go tool pprof -top FILE`, `-http`,
    /// `-diff_base`) to FILE. run and report: per callsite, its blocks unfreed at exit
    /// (inuse_space, inuse_objects; the default) and every allocation of the run (alloc_space,
    /// alloc_objects); diff: the change between the two points (negative where a callsite
    /// shrank). Each return address is a location whose lines are its inlined functions, each
    /// module a mapping with its build-id. One file per process: `%p` in FILE is the pid;
    /// without it, the first process writes FILE and every other FILE.<pid>.
    #[arg(long, value_name = "FILE")]
    pprof: Option<PathBuf>,
    /// Also write folded stacks (`main;f;g BYTES`, outermost frame first, inlined functions as
    /// frames of their own; what every flame graph tool reads) to FILE: run and report, the bytes
    /// unfreed at exit; diff, the bytes each callsite grew by (those that shrank are left out).
    /// Files per process as for --pprof.
    #[arg(long, value_name = "FILE")]
    collapsed: Option<PathBuf>,
    /// Also draw those stacks as a flame graph (an interactive SVG) into FILE.svg. Files per
    /// process as for --pprof.
    #[arg(long, value_name = "FILE.svg")]
    flamegraph: Option<PathBuf>,
}

impl Exports {
    pub fn targets(&self) -> leakhunt::exports::Targets {
        leakhunt::exports::Targets {
            pprof: self.pprof.clone(),
            collapsed: self.collapsed.clone(),
            flamegraph: self.flamegraph.clone(),
        }
    }
}

#[derive(Args)]
pub struct DiffArgs {
    /// One trace (diff two points of it) or two (diff the ends of two runs).
    #[arg(required = true, num_args = 1..=2, value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// From this point: epoch number, time from the start (e.g. 2s), `warmup` or `end`.
    #[arg(long, default_value = "warmup")]
    from: String,
    /// To this point.
    #[arg(long, default_value = "end")]
    to: String,
    /// Warm-up to leave out (default: detected, where the allocation rate settles).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    warmup: Option<std::time::Duration>,
    #[command(flatten)]
    exports: Exports,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The run that showed the growth.
    before: PathBuf,
    /// The same load after the fix.
    after: PathBuf,
    /// Warm-up to leave out of both (default: detected in each run).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    warmup: Option<std::time::Duration>,
}

#[derive(Args, Clone)]
pub struct Output {
    /// Also write the report as JSON to FILE ("-" for stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Exit with N instead of the program's status when leaks are found, or when the recording
    /// is incomplete (leaks may be missing).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    error_exitcode: Option<u8>,
    /// Print only processes with leaks or warnings.
    #[arg(long, short)]
    quiet: bool,
    /// The text shows at most N loss records per process (those with the most bytes, in
    /// memcheck's order and numbering) and N growing callsites, then what it left out, by
    /// module; 0: all. JSON, XML and HTML keep every record.
    #[arg(long, value_name = "N", default_value_t = 40)]
    top: usize,
    /// Leave the first DURATION of the run out of the growth verdicts (default: detected, where
    /// the allocation rate settles).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    warmup: Option<std::time::Duration>,
    /// Also write the report as one self-contained HTML file (offline: nothing fetched): the live
    /// heap over time stacked by the callsites that grew most (values on hover), a callsite
    /// table that sorts on a click on a header and shows a callsite's stack on a click on its
    /// row, and flame graphs of the bytes live at the end and of the growth after warm-up.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Also write memcheck's XML (protocol 4) to FILE: `%p` is the pid; without it, the first
    /// process writes FILE and every other FILE.<pid>.
    #[arg(long, value_name = "FILE")]
    xml_file: Option<PathBuf>,
    /// A memcheck suppression file (repeatable): matching leak records are counted as
    /// suppressed, not shown, and fail nothing.
    #[arg(long, value_name = "FILE")]
    pub suppressions: Vec<PathBuf>,
    /// `all`: print a ready suppression after each shown record (as memcheck's
    /// `--gen-suppressions=all`); `no` (default).
    #[arg(long, value_name = "WHEN", default_value = "no", value_parser = ["no", "all"])]
    gen_suppressions: String,
    /// List the suppressions used, each with the records, bytes and blocks it suppressed (as
    /// memcheck's `-s` prints its `used_suppression` lines).
    #[arg(short = 's', long)]
    show_used_suppressions: bool,
    /// Which kinds of unfreed blocks the text lists, as memcheck names them: definite, indirect,
    /// possible, reachable, all or none, comma-separated (default: definite,possible).
    #[arg(long, value_name = "KINDS", value_parser = report::Kinds::parse, default_value = "definite,possible")]
    show_leak_kinds: report::Kinds,
    /// Which kinds fail `--error-exitcode` (the same words; default: definite,possible).
    #[arg(long, value_name = "KINDS", value_parser = report::Kinds::parse, default_value = "definite,possible")]
    errors_for_leak_kinds: report::Kinds,
    #[command(flatten)]
    pub exports: Exports,
}

impl Output {
    /// The report with the kinds shown and failing as asked, and the suppressions applied.
    pub fn apply(&self, mut r: Report) -> Result<Report> {
        r.set_kinds(self.show_leak_kinds, self.errors_for_leak_kinds);
        // memcheck tries the last file read first.
        let mut supps = Vec::new();
        for f in self.suppressions.iter().rev() {
            supps.extend(leakhunt::supp::read(f)?);
        }
        r.suppress(&supps);
        for p in &mut r.processes {
            p.gen_suppressions = self.gen_suppressions == "all";
            p.show_used_suppressions = self.show_used_suppressions;
            p.top = self.top;
        }
        Ok(r)
    }

    pub fn warmup_s(&self) -> Option<f64> {
        self.warmup.map(|d| d.as_secs_f64())
    }

    /// Adds to `r` (the report of `p`) the profiles its outputs draw: the one at exit for the
    /// exports and the HTML page's flame graph, the growth after warm-up for the page's second.
    pub fn add_profiles(&self, p: &Process, r: &mut report::ProcReport, sym: &mut Symbolizer) {
        if self.exports.targets().any() || self.html.is_some() {
            r.profile = Some(leakhunt::profile::at_exit(p, sym));
        }
        if self.html.is_some() {
            if let Some(t) = &r.timeline {
                r.growth_profile = Some(leakhunt::profile::after_warmup(p, t, sym));
            }
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// Keep the trace in TRACE (children's traces go to TRACE.<pid>).
    #[arg(long, short = 'o', value_name = "TRACE")]
    output: Option<PathBuf>,
    /// Frames kept per allocation stack (1-256).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    max_frames: u32,
    /// Also trace programs started with exec (forked children are followed anyway, as memcheck
    /// follows them).
    #[arg(long)]
    trace_children: bool,
    /// Do not trace forked children (each is otherwise a process of its own in the report).
    #[arg(long, conflicts_with = "trace_children")]
    no_follow_forks: bool,
    /// Show the top growing callsites and the process curve on stderr while the program runs
    /// (redrawn at most twice a second).
    #[arg(long)]
    live: bool,
    /// Take a snapshot (auto-1, auto-2, ...) every DURATION.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    snapshot_every: Option<std::time::Duration>,
    /// Exit with 3 (or --error-exitcode) when a callsite's memory grows steadily under the load
    /// (a `leak` verdict): a CI gate on sustained growth.
    #[arg(long)]
    fail_on_growth: bool,
    /// Length of an epoch: live memory per callsite and RSS are recorded at each boundary
    /// (e.g. 100ms, 1s, 2m; 10ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_epoch)]
    epoch: std::time::Duration,
    /// Do not ask libc and libstdc++ to free their internal buffers at exit (as valgrind does).
    #[arg(long)]
    no_freeres: bool,
    /// The interior pointers the heap scan at exit takes for start pointers, as memcheck names
    /// its heuristics: stdstring, length64, newarray, multipleinheritance, all or none
    /// (default: all, as memcheck).
    #[arg(long, value_name = "SET", default_value = "all", value_parser = parse_heuristics)]
    leak_check_heuristics: leakhunt_reach::Heuristics,
    /// No heap scan at exit: unfreed blocks are not sorted into memcheck's kinds.
    #[arg(long)]
    no_reachability: bool,
    /// Note, at each free, which blocks the freed block still pointed to (orphan sites of lost
    /// blocks; costs an unwind per free).
    #[arg(long)]
    orphans: bool,
    /// Heap scans sort blocks into memcheck's kinds only: no retention paths or retained sizes
    /// (they keep the heap graph: about 60 bytes more a live block in the CLI, and time after
    /// the scan), and no extra scan as the program starts to exit.
    #[arg(long)]
    no_retention: bool,
    /// The preload library (default: $LEAKHUNT_PRELOAD, else libleakhunt.so next to this
    /// executable, else in ../lib/leakhunt/ from its directory, where `scripts/install` puts it).
    #[arg(long, value_name = "PATH")]
    preload: Option<PathBuf>,
    #[command(flatten)]
    out: Output,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "PROGRAM")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Trace files.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// Show reading progress on stderr: auto (a progress bar for traces over 64 MiB, only when
    /// stderr is a terminal), always (a bar on a terminal, plain lines elsewhere), never.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "always", "never"])]
    progress: String,
    #[command(flatten)]
    out: Output,
}

fn parse_epoch(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("an epoch of {s} is outside 10ms to 1h"));
    }
    Ok(d)
}

fn parse_heuristics(s: &str) -> Result<leakhunt_reach::Heuristics, String> {
    leakhunt_reach::Heuristics::parse(s).map_err(|w| {
        format!("unknown heuristic {w:?}: use stdstring, length64, newarray, multipleinheritance, all or none")
    })
}

/// Prints the reports (text to `text_to`, JSON where asked) and says whether `--error-exitcode`
/// fails: leaks were found, or a recording is incomplete (leaks may be missing).
pub fn emit(report: &Report, out: &Output, text_to_stderr: bool) -> Result<bool> {
    let mut text = String::new();
    for p in &report.processes {
        if out.quiet && p.leaks.is_empty() && p.warnings.is_empty() {
            continue;
        }
        report::render_text(p, &mut text);
    }
    // `--json -` takes stdout: the text goes to stderr, so that stdout is JSON alone.
    let json_on_stdout = out.json.as_ref().is_some_and(|p| p.as_os_str() == "-");
    let res = if text_to_stderr || json_on_stdout {
        std::io::stderr().write_all(text.as_bytes())
    } else {
        std::io::stdout().write_all(text.as_bytes())
    };
    if let Err(e) = res {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing the report");
        }
    }
    if let Some(path) = &out.html {
        leakhunt::outfile::write(path, leakhunt::html::render(report).as_bytes(), 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &out.xml_file {
        let argv: Vec<String> = std::env::args().collect();
        for (i, p) in report.processes.iter().enumerate() {
            let dest = leakhunt::xml::path_for(path, p.pid, i == 0);
            leakhunt::outfile::write(&dest, leakhunt::xml::render(p, &argv).as_bytes(), 0o644)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
    }
    let targets = out.exports.targets();
    if targets.any() {
        let profiles: Vec<_> = report
            .processes
            .iter()
            .filter_map(|p| p.profile.as_ref())
            .collect();
        leakhunt::exports::write(&targets, &profiles, "Bytes unfreed at exit")?;
    }
    if let Some(path) = &out.json {
        // Streamed: a compiler's run has tens of thousands of records (hundreds of MB).
        let write = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
            let mut w = std::io::BufWriter::with_capacity(1 << 16, w);
            serde_json::to_writer_pretty(&mut w, report)?;
            w.write_all(b"\n")?;
            w.flush()
        };
        if path.as_os_str() == "-" {
            write(&mut std::io::stdout().lock())?;
        } else {
            let mut f = leakhunt::outfile::create(path, 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            write(&mut f).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(report.failed())
}

fn report_cmd(a: &ReportArgs) -> Result<ExitCode> {
    let mut sym = Symbolizer::new();
    let mut read = Vec::new();
    // Fork points are kept only for the fork children given (a quick look at each trace's start;
    // not possible through a pipe, whose bytes can be read only once: then all are kept).
    let files = a
        .traces
        .iter()
        .all(|t| std::fs::metadata(t).is_ok_and(|m| m.is_file()));
    let children = files.then(|| {
        Process::forked_children(a.traces.iter().filter_map(|t| input::open_trace(t).ok()))
    });
    for t in &a.traces {
        let f = input::open_trace(t)?;
        let size = f.size.unwrap_or(0);
        let mut p = Process::new();
        p.fork_children = children.clone();
        let r = match Progress::new(&a.progress, t, size) {
            Some(mut bar) => {
                let r = Process::read_stream_prepared(p, f, &mut |at| bar.show(at));
                bar.done();
                r
            }
            None => Process::read_stream_prepared(p, f, &mut |_| {}),
        };
        read.push(compare::checked(t, r)?);
    }
    // Traces of a process and of its fork children, given together, carry the inherited heap.
    Process::link_forks(&mut read.iter_mut().collect::<Vec<_>>());
    let procs: Vec<_> = read
        .iter()
        .map(|p| {
            let mut r = report::build_with(p, None, a.out.warmup_s(), &mut sym);
            a.out.add_profiles(p, &mut r, &mut sym);
            r
        })
        .collect();
    for w in sym.warnings() {
        eprintln!("leakhunt: warning: {}", report::escape_control(w));
    }
    let failed = emit(&a.out.apply(Report::new(procs))?, &a.out, false)?;
    Ok(match (failed, a.out.error_exitcode) {
        (true, Some(n)) => ExitCode::from(n),
        _ => ExitCode::SUCCESS,
    })
}

fn paths_cmd(a: &PathsArgs) -> Result<ExitCode> {
    use leakhunt::paths::{Index, Namer, Want};
    let f = input::open_trace(&a.trace)?;
    let p = compare::checked(
        &a.trace,
        Process::read_stream_prepared(Process::new(), f, &mut |_| {}),
    )?;
    let mut sym = Symbolizer::new();
    let mut sites = leakhunt::callsite::Callsites::new(&p);
    // The callsites asked for: (a stack id of each, its callsite).
    let wanted: Vec<(u32, u32)> = match (a.callsite, &a.at) {
        (Some(id), _) => {
            if !p.stacks.contains_key(&id) {
                anyhow::bail!(
                    "{} has no callsite {id} (the `callsite` numbers of its report's records and growth entries are)",
                    a.trace.display()
                );
            }
            vec![(id, sites.site(id))]
        }
        (None, Some(at)) => {
            let (file, line) = at
                .rsplit_once(':')
                .and_then(|(f, l)| Some((f, l.parse::<u32>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--at wants FILE:LINE, not {at:?}"))?;
            let mut ids: Vec<u32> = p.stacks.keys().copied().collect();
            ids.sort_unstable();
            let mut found: Vec<(u32, u32)> = Vec::new();
            for id in ids {
                let site = sites.site(id);
                if found.iter().any(|f| f.1 == site) {
                    continue;
                }
                let frames = sites.frames(site, id, &mut sym);
                if frames.iter().any(|f| {
                    f.line == Some(line)
                        && f.file.as_deref().is_some_and(|x| {
                            x == file || x.ends_with(&format!("/{}", file.trim_start_matches('/')))
                        })
                }) {
                    found.push((id, site));
                }
            }
            if found.is_empty() {
                anyhow::bail!(
                    "no callsite of {} passes through {file}:{line}",
                    a.trace.display()
                );
            }
            found
        }
        (None, None) => anyhow::bail!("say which callsite: --callsite ID or --at FILE:LINE"),
    };
    let mut scans: Vec<Index> = p
        .snapshot_scans
        .iter()
        .filter_map(|s| Index::new(&s.items, s.snapshot.as_deref().unwrap_or("(unnamed)")))
        .collect();
    scans.extend(
        p.reach
            .as_ref()
            .filter(|r| r.unavailable.is_none())
            .and_then(|r| Index::new(&r.items, "exit")),
    );
    let mut json = Vec::new();
    let mut text = String::new();
    for (id, site) in wanted {
        let mut found = Vec::new();
        for ix in &scans {
            let ids: Vec<u32> = ix.stacks().filter(|&s| sites.site(s) == site).collect();
            if ids.is_empty() {
                continue;
            }
            let mut namer = Namer {
                p: &p,
                sites: &mut sites,
                sym: &mut sym,
                hop_stacks: Default::default(),
            };
            if let Some(r) = namer.retention(ix, &ids, Want::All) {
                found.push(r);
            }
        }
        let frames = sites.frames(site, id, &mut sym);
        paths_text(id, &frames, &found, &mut text);
        json.push(serde_json::json!({ "callsite": id, "stack": frames, "scans": found }));
    }
    if let Some(path) = &a.json {
        let v = serde_json::Value::Array(json);
        let out = serde_json::to_string_pretty(&v)?;
        if path.as_os_str() == "-" {
            println!("{out}");
        } else {
            leakhunt::outfile::write(path, out.as_bytes(), 0o644)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// `leakhunt paths`'s text for one callsite.
fn paths_text(
    id: u32,
    frames: &[report::Frame],
    found: &[leakhunt::paths::Retention],
    out: &mut String,
) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "Callsite {id}:");
    for l in report::stack_lines(frames, usize::MAX) {
        let _ = writeln!(out, "   {l}");
    }
    if found.is_empty() {
        let _ = writeln!(
            out,
            "No heap scan in this trace saw its blocks live (the scan at exit, or `leakhunt snapshot PID --reachability` while it runs)."
        );
    }
    for r in found {
        let all: Vec<leakhunt::paths::PathName> = std::iter::once(leakhunt::paths::PathName {
            root: r.root.clone(),
            path: r.path.clone(),
            share: r.share,
            blocks: r.blocks,
            bytes: r.bytes,
        })
        .chain(r.other_paths.iter().cloned())
        .collect();
        let blocks = all.iter().fold(0u64, |a, p| a.saturating_add(p.blocks));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}: {} blocks on {} distinct path{}; they keep alive {} bytes in {} blocks",
            {
                let w = leakhunt::paths::scan_words(&r.scan);
                let mut c = w.chars();
                c.next()
                    .map_or(w.clone(), |f| f.to_uppercase().chain(c).collect())
            },
            report::thousands(blocks),
            all.len(),
            if all.len() == 1 { "" } else { "s" },
            report::thousands(r.retained_bytes),
            report::thousands(r.retained_blocks)
        );
        for (i, p) in all.iter().enumerate() {
            let lines = if p.root.kind == "none" && p.path.is_empty() {
                vec![format!(
                    "{} blocks ({:.0}%): nothing points at them (lost)",
                    report::thousands(p.blocks),
                    p.share * 100.0
                )]
            } else {
                leakhunt::paths::path_lines(&p.root, &p.path, p.blocks, p.share)
            };
            for (k, l) in lines.iter().enumerate() {
                if k == 0 {
                    let _ = writeln!(out, "  {}. {l}", i + 1);
                } else {
                    let _ = writeln!(out, "     {l}");
                }
            }
        }
    }
}

/// Reading progress on stderr: on a terminal, indicatif's bar (redrawn in place, at most 5 times
/// a second); `--progress always` elsewhere (a log), a plain line at most every 200 ms. Never
/// shown by default where stderr is not a terminal.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines(Lines),
}

impl Progress {
    /// The display for reading `path` (`size` bytes; 0: unknown), or `None` where `when`
    /// (`auto`, `always`, `never`) and the terminal say none.
    fn new(when: &str, path: &std::path::Path, size: u64) -> Option<Progress> {
        let term = std::io::stderr().is_terminal();
        // Traces over 64 MiB (the tests lower the bar to see it on a small one).
        let big = std::env::var("LEAKHUNT_TEST_PROGRESS_MIN_BYTES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(64 << 20);
        match (when, term) {
            ("never", _) | ("auto", false) => None,
            ("auto", true) if size <= big => None,
            (_, true) => {
                use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
                // A pipe's size is unknown: then bytes read so far, no bar.
                let (len, template) = if size == 0 {
                    (
                        None,
                        "leakhunt: reading {msg}: {binary_bytes}, {binary_bytes_per_sec}",
                    )
                } else {
                    (
                        Some(size),
                        "leakhunt: reading {msg}: {percent:>3}% [{wide_bar}] {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}, {eta} left",
                    )
                };
                let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr_with_hz(5));
                let style = ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                bar.set_style(style);
                bar.set_message(report::escape_control(&path.display().to_string()).into_owned());
                Some(Progress::Bar(bar))
            }
            (_, false) => Some(Progress::Lines(Lines::new(path, size))),
        }
    }

    fn show(&mut self, at: u64) {
        match self {
            Progress::Bar(b) => b.set_position(at),
            Progress::Lines(l) => l.show(at),
        }
    }

    fn done(&mut self) {
        match self {
            Progress::Bar(b) => b.finish(),
            Progress::Lines(l) => l.done(),
        }
    }
}

/// Progress as plain lines, one at most every 200 ms, for a log.
struct Lines {
    name: String,
    size: u64,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl Lines {
    fn new(path: &std::path::Path, size: u64) -> Lines {
        Lines {
            name: report::escape_control(&path.display().to_string()).into_owned(),
            size,
            start: std::time::Instant::now(),
            last: None,
        }
    }

    fn line(&self, at: u64) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let secs = self.start.elapsed().as_secs_f64();
        format!(
            "leakhunt: reading {}: {:.0}% ({:.0} of {:.0} MiB, {:.0} MiB/s)",
            self.name,
            if self.size == 0 {
                100.0
            } else {
                at as f64 * 100.0 / self.size as f64
            },
            mib(at),
            mib(self.size),
            if secs > 0.0 { mib(at) / secs } else { 0.0 }
        )
    }

    fn show(&mut self, at: u64) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l).as_millis() < 200)
        {
            return;
        }
        self.last = Some(now);
        eprintln!("{}", self.line(at));
    }

    fn done(&mut self) {
        eprintln!("{}", self.line(self.size));
    }
}

fn diff_cmd(a: &DiffArgs) -> Result<ExitCode> {
    let mut sym = Symbolizer::new();
    let targets = a.exports.targets();
    let d = match a.traces.as_slice() {
        [one] => compare::diff_one(
            one,
            &a.from,
            &a.to,
            a.warmup.map(|d| d.as_secs_f64()),
            targets.any(),
            &mut sym,
        )?,
        [x, y] => compare::diff_two(x, y, targets.any(), &mut sym)?,
        _ => bail!("give one or two traces"),
    };
    print!("{}", report::escape_control_lines(&d.text));
    if let Some(p) = &d.profile {
        leakhunt::exports::write(&targets, &[p], &format!("Growth: {}", p.what))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `leakhunt completions SHELL`: the completion script clap_complete makes of the same
/// definitions the parser uses.
fn completions_cmd(shell: clap_complete::Shell) -> Result<ExitCode> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "leakhunt", &mut out);
    write_stdout(&out)
}

/// `leakhunt man [DIR]`: the manual pages clap_mangen makes of the same definitions.
fn man_cmd(dir: Option<&std::path::Path>) -> Result<ExitCode> {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return write_stdout(&out);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The program's page, then one per command shown in --help (their names: leakhunt-run...).
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    for c in pages {
        // A command's page carries the program's version, as the program's does.
        let man = clap_mangen::Man::new(c.version(env!("CARGO_PKG_VERSION")));
        let mut out = Vec::new();
        man.render(&mut out)?;
        let path = dir.join(man.get_filename());
        leakhunt::outfile::write(&path, &out, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `out` to stdout; a reader that went away (`| head`) is no error.
fn write_stdout(out: &[u8]) -> Result<ExitCode> {
    let mut o = std::io::stdout().lock();
    match o.write_all(out).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn verify_cmd(a: &VerifyArgs) -> Result<ExitCode> {
    let mut sym = Symbolizer::new();
    let (text, ok) = compare::verify(
        &a.before,
        &a.after,
        a.warmup.map(|d| d.as_secs_f64()),
        &mut sym,
    )?;
    print!("{}", report::escape_control_lines(&text));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn snapshot_cmd(a: &SnapshotArgs) -> Result<ExitCode> {
    use leakhunt_format::control;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let uid = rustix::process::geteuid().as_raw();
    let dir = PathBuf::from(format!("/tmp/leakhunt-{uid}"));
    let mailbox = dir.join(format!("{}.ctl", a.pid));
    let Ok(proc_meta) = std::fs::metadata(format!("/proc/{}", a.pid)) else {
        bail!("no process {}", a.pid);
    };
    if proc_meta.uid() != uid && uid != 0 {
        bail!(
            "process {} belongs to uid {}, not to you",
            a.pid,
            proc_meta.uid()
        );
    }
    let name = a.name.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("snapshot-{secs}")
    });
    if name.is_empty() || name.len() > 255 || name.contains(['\n', '\0']) {
        bail!("a snapshot name is 1 to 255 bytes, on one line");
    }
    // The directory and the mailbox must be this user's own: in /tmp, anyone can create a
    // directory of that name and a file in it to receive the request.
    let not_traced = || {
        anyhow::anyhow!(
            "process {} is not traced by leakhunt, or cannot take snapshots (no {})",
            a.pid,
            mailbox.display()
        )
    };
    // A process that has just started makes its mailbox in a moment (a thread of leakhunt's
    // does, soon after the library loaded): one that has the library mapped gets 2 s for it.
    let has_library = std::fs::read_to_string(format!("/proc/{}/maps", a.pid))
        .is_ok_and(|m| m.contains("libleakhunt"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while has_library
        && std::fs::symlink_metadata(&mailbox).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    match std::fs::symlink_metadata(&dir) {
        Err(_) => return Err(not_traced()),
        Ok(m) if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 => bail!(
            "refusing {}: it is not a directory of yours that only you can enter (owner uid {}, mode {:o}); someone else made it",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        ),
        Ok(_) => {}
    }
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&mailbox)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_traced()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", mailbox.display())),
    };
    let m = f.metadata()?;
    let read_u32 = |at: usize| -> Result<u32> {
        let mut b = [0u8; 4];
        rustix::io::pread(&f, &mut b, at as u64)?;
        Ok(u32::from_le_bytes(b))
    };
    if !m.is_file()
        || m.uid() != uid
        || m.mode() & 0o077 != 0
        || m.len() < control::LEN as u64
        || read_u32(0)? != control::MAGIC
    {
        bail!(
            "refusing {}: not a control mailbox of yours",
            mailbox.display()
        );
    }
    // One asker at a time; the name first, then the request number the process watches.
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
    let req = read_u32(control::REQUEST)?.wrapping_add(1).max(1);
    let mut body = (name.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    rustix::io::pwrite(&f, &body, control::NAME_LEN as u64)?;
    let flags = if a.reachability { control::SCAN } else { 0 };
    rustix::io::pwrite(&f, &flags.to_le_bytes(), control::FLAGS as u64)?;
    rustix::io::pwrite(&f, &req.to_le_bytes(), control::REQUEST as u64)?;
    // A heap scan reads the whole heap: as long as the one at exit may take.
    let patience = std::time::Duration::from_secs(if a.reachability { 120 } else { 3 });
    let deadline = std::time::Instant::now() + patience;
    while read_u32(control::ACK)? != req {
        if std::time::Instant::now() > deadline {
            bail!(
                "process {} did not take the snapshot within {} s (it may be stopped, or its recording may have ended)",
                a.pid,
                patience.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    eprintln!(
        "leakhunt: snapshot {name} taken in process {}{}",
        a.pid,
        if a.reachability {
            ", with a heap scan (its kinds are in the report)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `leakhunt pack IN OUT`: reads IN as a report would, writing what it applies as a packed
/// trace; a trace cut short is packed with its truncation, one that is corrupt is refused.
fn pack_cmd(input: &std::path::Path, output: &std::path::Path) -> Result<ExitCode> {
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if a == b {
            bail!(
                "{}: packing a trace onto itself would destroy it: name another output",
                input.display()
            );
        }
    }
    let f = input::open_trace(input)?;
    let out: Box<dyn std::io::Write + Send> = if output.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::BufWriter::new(
            leakhunt::outfile::create(output, 0o600)
                .with_context(|| format!("writing {}", output.display()))?,
        ))
    };
    let mut p = Process::new();
    p.observer = Some(Box::new(leakhunt::pack::PackWriter::new(out)?));
    let (mut p, err) = Process::read_stream_prepared(p, f, &mut |_| {});
    if let Some(e) = err {
        bail!("{}: {e}: not packed", input.display());
    }
    if let Some(mut o) = p.observer.take() {
        o.end(p.truncated.as_deref(), None)
            .with_context(|| format!("writing {}", output.display()))?;
    }
    if let Some(t) = &p.truncated {
        eprintln!(
            "leakhunt: warning: {}: {t}; packed what came before",
            input.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn dump(path: &std::path::Path) -> Result<ExitCode> {
    let mut r = leakhunt::pack::reader(input::open_trace(path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    loop {
        match r.next_record() {
            Ok(Some(leakhunt_format::Record::Batch { tid, offset, slots })) => {
                println!("batch tid={tid} at {offset}: {} slots", slots.len() / 32);
                for s in leakhunt_format::slot::SlotIter::new(&slots) {
                    println!("  {s:?}");
                }
            }
            Ok(Some(leakhunt_format::Record::Events {
                tid,
                offset,
                count,
                body,
            })) => {
                println!(
                    "events tid={tid} at {offset}: {count} slots in {} bytes",
                    body.len()
                );
                let mut slots = Vec::new();
                if let Err(e) = leakhunt_format::compact::expand(&body, count as usize, &mut slots)
                {
                    bail!(
                        "{}: at byte {}: {}",
                        path.display(),
                        offset + e.at as u64,
                        e.what
                    );
                }
                for s in leakhunt_format::slot::SlotIter::new(&slots) {
                    println!("  {s:?}");
                }
            }
            Ok(Some(rec)) => println!("{rec:?}"),
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(e) => bail!("{}: {e}", path.display()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Report(a) => report_cmd(a),
        Cmd::Paths(a) => paths_cmd(a),
        Cmd::Pack { input, output } => pack_cmd(input, output),
        Cmd::Diff(a) => diff_cmd(a),
        Cmd::Verify(a) => verify_cmd(a),
        Cmd::Snapshot(a) => snapshot_cmd(a),
        Cmd::Completions { shell } => completions_cmd(*shell),
        Cmd::Man { dir } => man_cmd(dir.as_deref()),
        Cmd::Dump { trace } => dump(trace),
        Cmd::ReachHelper {
            trace,
            pid,
            answered,
            lib,
            parent_trace,
            early_limit,
        } => leakhunt::reach_helper::run(
            trace.clone(),
            *pid,
            *answered,
            lib.clone(),
            parent_trace.clone(),
            *early_limit,
        )
        .map(|()| ExitCode::SUCCESS),
        Cmd::CompareValgrind { memcheck, leakhunt } => (|| {
            let vg = leakhunt::vgcompare::read(memcheck)?;
            let lh = leakhunt::vgcompare::read(leakhunt)?;
            let (text, agree) = leakhunt::vgcompare::compare(&vg, &lh);
            print!("{}", report::escape_control_lines(&text));
            Ok(if agree {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        })(),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "leakhunt: error: {}",
                report::escape_control(&format!("{e:#}"))
            );
            ExitCode::from(2)
        }
    }
}
