//! The exit report: blocks still live at exit grouped by allocation stack, symbolized, with the
//! heap summary, unwind quality and lost events; rendered as text (valgrind-like) or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use leakhunt_format::{ExitKind, StopReason};
use leakhunt_symbolizer::Symbolizer;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::callsite::Callsites;
use crate::process::Process;

/// A suppression that matched, and what it took out of the report (memcheck's `-s` line).
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UsedSuppression {
    pub name: String,
    /// Its file and the line of its name.
    pub origin: String,
    pub records: u64,
    pub bytes: u64,
    pub blocks: u64,
    /// The last record it suppressed (their order in memcheck's list).
    #[serde(skip)]
    pub last: usize,
}

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub function: Option<String>,
    /// The linkage (mangled) name, when it differs from `function`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mangled: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// Offset in the module's ELF address space of the return address.
    pub offset: u64,
    /// Runtime return address.
    pub address: u64,
    pub inlined: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct Leak {
    /// `definitely_lost`, `indirectly_lost`, `possibly_lost`, `still_reachable` (memcheck's
    /// kinds, from the heap scan at exit), `not_scanned` (allocated after the scan), or
    /// `unfreed` (no scan: the trace has none, or it could not be made).
    pub kind: &'static str,
    pub bytes: u64,
    /// Definitely lost: the bytes of the blocks only these blocks reach (memcheck's "indirect").
    #[serde(skip_serializing_if = "is_zero")]
    pub indirect_bytes: u64,
    pub blocks: u64,
    pub stack: Vec<Frame>,
    /// The allocation function the blocks came from (the first frame of memcheck's stacks).
    #[serde(skip)]
    pub alloc_fn: Option<leakhunt_format::AllocFn>,
    /// The suppression (its name) that matched this record: it is not shown and fails nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<String>,
    /// Why this stack's unwind stopped, when it did not reach the outermost frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind: Option<&'static str>,
    /// What holds these blocks (a root and the heap hops to them) or, lost, where their last
    /// holder died; and what they keep alive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::paths::Retention>,
    /// The callsite (for finding its stacks again).
    #[serde(skip)]
    pub site: u32,
    /// The callsite's id in this trace (its first stack's): `leakhunt paths TRACE --callsite ID`.
    pub callsite: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A block's kind in the exit report (memcheck's four, then leakhunt's two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Reachable,
    Possible,
    Indirect,
    Definite,
    /// Allocated after the heap scan.
    NotScanned,
    /// No heap scan.
    Unfreed,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Reachable,
        Kind::Possible,
        Kind::Indirect,
        Kind::Definite,
        Kind::NotScanned,
        Kind::Unfreed,
    ];

    fn from_code(c: u8) -> Kind {
        match c {
            0 => Kind::Reachable,
            1 => Kind::Possible,
            2 => Kind::Indirect,
            _ => Kind::Definite,
        }
    }

    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Reachable => "still_reachable",
            Kind::Possible => "possibly_lost",
            Kind::Indirect => "indirectly_lost",
            Kind::Definite => "definitely_lost",
            Kind::NotScanned => "not_scanned",
            Kind::Unfreed => "unfreed",
        }
    }

    pub fn from_name(n: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == n)
    }

    /// memcheck's words ("definitely lost").
    pub fn words(self) -> &'static str {
        match self {
            Kind::Reachable => "still reachable",
            Kind::Possible => "possibly lost",
            Kind::Indirect => "indirectly lost",
            Kind::Definite => "definitely lost",
            Kind::NotScanned => "not scanned (allocated after the heap scan)",
            Kind::Unfreed => "unfreed at exit",
        }
    }
}

/// A set of kinds, as memcheck's `--show-leak-kinds` and `--errors-for-leak-kinds` name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub const fn of(kinds: &[Kind]) -> Kinds {
        let mut v = 0;
        let mut i = 0;
        while i < kinds.len() {
            v |= 1 << kinds[i] as u8;
            i += 1;
        }
        Kinds(v)
    }

    /// memcheck's default for both options: definite and possible (and what has no kind, which
    /// may be either).
    pub const ALL: Kinds = Kinds::of(&Kind::ALL);

    pub const DEFAULT: Kinds = Kinds::of(&[
        Kind::Definite,
        Kind::Possible,
        Kind::NotScanned,
        Kind::Unfreed,
    ]);

    pub fn contains(self, k: Kind) -> bool {
        self.0 & 1 << k as u8 != 0
    }

    /// Parses memcheck's `definite,indirect,possible,reachable`, `all` or `none`.
    pub fn parse(s: &str) -> Result<Kinds, String> {
        let mut v = Kinds::of(&[Kind::NotScanned, Kind::Unfreed]);
        for w in s.split(',') {
            v = match w.trim() {
                "all" => Kinds::ALL,
                "none" => Kinds(0),
                "definite" => Kinds(v.0 | 1 << Kind::Definite as u8),
                "indirect" => Kinds(v.0 | 1 << Kind::Indirect as u8),
                "possible" => Kinds(v.0 | 1 << Kind::Possible as u8),
                "reachable" => Kinds(v.0 | 1 << Kind::Reachable as u8),
                w => {
                    return Err(format!(
                        "unknown leak kind {w:?}: use definite, indirect, possible, reachable, all or none"
                    ))
                }
            };
        }
        Ok(v)
    }
}

impl Default for Kinds {
    fn default() -> Kinds {
        Kinds::DEFAULT
    }
}

/// A heap scan at a snapshot of the running process: the kinds of the blocks live then.
#[derive(Serialize, Clone, Debug)]
pub struct SnapshotScanSummary {
    pub snapshot: Option<String>,
    pub scanned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    pub blocks: u64,
    pub threads_held: u32,
    /// How long the program's threads were stopped.
    pub held_ms: f64,
    pub definitely_lost: (u64, u64),
    pub indirectly_lost: (u64, u64),
    pub possibly_lost: (u64, u64),
    pub still_reachable: (u64, u64),
}

/// The heap scan at exit, as the report tells it.
#[derive(Serialize, Clone, Debug, Default)]
pub struct ReachSummary {
    /// Whether blocks were classified (false: `unavailable` says why).
    pub scanned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    pub blocks: u64,
    pub words: u64,
    pub threads_held: u32,
    pub held_ms: f64,
    /// Bytes and blocks of each kind (memcheck's LEAK SUMMARY; indirect bytes once).
    pub definitely_lost: (u64, u64),
    pub indirectly_lost: (u64, u64),
    pub possibly_lost: (u64, u64),
    pub still_reachable: (u64, u64),
    pub not_scanned: (u64, u64),
    /// Records a suppression matched (not counted in their kind's line, as memcheck).
    pub suppressed: (u64, u64),
    /// Blocks a heuristic accepted an interior pointer to, by heuristic name.
    pub heuristics: BTreeMap<&'static str, (u64, u64)>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Summary {
    pub in_use_at_exit_bytes: u64,
    pub in_use_at_exit_blocks: u64,
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub events_lost: u64,
    /// Why the recording is incomplete (it stopped before the process ended, the trace was cut,
    /// events were lost), when it is: the figures then cover only what was recorded, and
    /// `--error-exitcode` fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_incomplete: Option<String>,
    /// Frees of addresses the trace never saw allocated (blocks from before tracing began, such
    /// as a fork child's inherited heap); counted in `frees`.
    pub unmatched_frees: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Unwind {
    /// Allocations whose stack is known.
    pub allocations: u64,
    pub complete: u64,
    pub truncated: u64,
    /// Allocations whose unwind stopped early, by reason.
    pub stopped_early: BTreeMap<String, u64>,
    /// Allocations whose stack record never arrived.
    pub missing: u64,
}

/// How the tracer captured stacks (its own statistics): a full walk, a walk that joined the
/// thread's previous stack and re-validated the rest, or the previous stack found unchanged word
/// for word. Every method gives the same frames; the split says how much work was spared.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Captures {
    pub walked: u64,
    pub joined: u64,
    pub repeated: u64,
    /// Events the writer sent as elided pairs (allocations freed again within an epoch,
    /// counted per stack instead of sent one by one).
    pub elided_events: u64,
    /// Times the program took the trace's descriptor (closed it, reused its number) and the
    /// tracer re-opened its file or re-connected, losing nothing.
    pub output_retaken: u64,
    /// Times a thread of the program found its ring full and drained the rings itself (or
    /// waited for the writer): back-pressure, the writer falling behind the program.
    pub ring_waits: u64,
    /// The tracer's own memory resident in the process at its end (rings, unwind state, tables,
    /// buffers; 0: not recorded), and the threads that recorded.
    pub tracer_resident_bytes: u64,
    pub threads: u64,
    /// Times the pages of a thread's ring and unwind state went back to the system while the
    /// thread recorded nothing (waiting for work, or exited).
    pub rings_given_back: u64,
}

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The image was replaced by exec: blocks live at that point are what the report lists.
    Exec(bool),
}

#[derive(Serialize, Clone, Debug)]
pub struct ProcReport {
    pub pid: u32,
    pub ppid: u32,
    pub argv: Vec<String>,
    /// The command line the process gave itself later (`setproctitle`, a forked worker), when it
    /// differs from `argv`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<Vec<String>>,
    pub exe: String,
    pub exit: Option<Exit>,
    pub summary: Summary,
    /// The heap scan at exit, when the trace has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachability: Option<ReachSummary>,
    /// Heap scans at snapshots (`leakhunt snapshot PID --reachability`), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshot_scans: Vec<SnapshotScanSummary>,
    /// Which kinds the text shows and which fail `--error-exitcode` (memcheck's
    /// `--show-leak-kinds`, `--errors-for-leak-kinds`).
    #[serde(skip)]
    pub show_kinds: Kinds,
    #[serde(skip)]
    pub error_kinds: Kinds,
    /// Print a suppression for each shown record (`--gen-suppressions=all`).
    #[serde(skip)]
    pub gen_suppressions: bool,
    /// Print the suppressions used, with what each suppressed (memcheck's `-s`).
    #[serde(skip)]
    pub show_used_suppressions: bool,
    /// The text shows at most this many records and growing callsites (0: all).
    #[serde(skip)]
    pub top: usize,
    /// The suppressions that matched a record, in the order first used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub used_suppressions: Vec<UsedSuppression>,
    pub unwind: Unwind,
    pub captures: Captures,
    pub leaks: Vec<Leak>,
    /// Memory over time (when the trace has epoch boundaries): the process...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<crate::growth::Timeline>,
    /// ...and each callsite that did not stay stable, worst first.
    pub growth: Vec<crate::growth::GrowthEntry>,
    /// Those callsites grouped by their innermost functions, most bytes first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub growth_groups: Vec<crate::growth::GrowthGroup>,
    pub warnings: Vec<String>,
    /// The process as the profile exports show it (`--pprof`, `--collapsed`, `--flamegraph`),
    /// made only when one is asked for.
    #[serde(skip)]
    pub profile: Option<crate::profile::Profile>,
    /// What each callsite gained after warm-up, as a profile (the HTML report's second flame
    /// graph), made only for `--html` on a trace with epochs.
    #[serde(skip)]
    pub growth_profile: Option<crate::profile::Profile>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Report {
    pub format: &'static str,
    pub version: u32,
    pub processes: Vec<ProcReport>,
    /// The leakhunt CLI's own peak resident memory (bytes), apart from the traced program's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cli_peak_rss_bytes: Option<u64>,
}

/// This process's peak resident set (VmHWM), bytes.
pub fn own_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Report {
    pub fn new(processes: Vec<ProcReport>) -> Report {
        Report {
            format: "leakhunt-report",
            // 2: `kind` is memcheck's (from the heap scan at exit), `reachability` added.
            version: 2,
            processes,
            cli_peak_rss_bytes: own_peak_rss(),
        }
    }

    pub fn has_leaks(&self) -> bool {
        self.processes.iter().any(|p| {
            p.leaks.iter().any(|l| {
                l.suppressed.is_none()
                    && Kind::from_name(l.kind).is_some_and(|k| p.error_kinds.contains(k))
            })
        })
    }

    /// Marks the records a suppression matches (the first that does, in the order given), and
    /// moves their blocks from their kind's line of the LEAK SUMMARY to `suppressed`; each
    /// suppression used is counted (records, bytes, blocks) in `used_suppressions`.
    pub fn suppress(&mut self, supps: &[crate::supp::Suppression]) {
        for p in &mut self.processes {
            for (i, l) in p.leaks.iter_mut().enumerate() {
                let kind = Kind::from_name(l.kind).unwrap_or(Kind::Unfreed);
                // memcheck tries suppressions only on the records it shows or counts as errors:
                // a still-reachable record not shown stays in its kind's line.
                if !p.show_kinds.contains(kind) && !p.error_kinds.contains(kind) {
                    continue;
                }
                let Some(s) = supps.iter().find(|s| s.suppresses(kind, &l.stack)) else {
                    continue;
                };
                l.suppressed = Some(s.name.clone());
                let used = match p
                    .used_suppressions
                    .iter()
                    .position(|u| u.name == s.name && u.origin == s.origin)
                {
                    Some(i) => &mut p.used_suppressions[i],
                    None => {
                        p.used_suppressions.push(UsedSuppression {
                            name: s.name.clone(),
                            origin: s.origin.clone(),
                            ..Default::default()
                        });
                        p.used_suppressions.last_mut().expect("just pushed")
                    }
                };
                used.records += 1;
                used.last = i;
                used.bytes += l.bytes + l.indirect_bytes;
                used.blocks += l.blocks;
                if let Some(x) = p.reachability.as_mut() {
                    let from = match kind {
                        Kind::Definite => &mut x.definitely_lost,
                        Kind::Indirect => &mut x.indirectly_lost,
                        Kind::Possible => &mut x.possibly_lost,
                        Kind::Reachable => &mut x.still_reachable,
                        Kind::NotScanned => &mut x.not_scanned,
                        Kind::Unfreed => continue,
                    };
                    from.0 -= l.bytes;
                    from.1 -= l.blocks;
                    x.suppressed.0 += l.bytes;
                    x.suppressed.1 += l.blocks;
                }
            }
            // memcheck moves each suppression it uses to the front of its list, and lists them
            // in that order: the one used last first.
            p.used_suppressions
                .sort_by_key(|u| std::cmp::Reverse(u.last));
        }
    }

    /// Sets the kinds shown and counted as errors, for every process.
    pub fn set_kinds(&mut self, show: Kinds, errors: Kinds) {
        for p in &mut self.processes {
            p.show_kinds = show;
            p.error_kinds = errors;
        }
    }

    /// Leaks were found, or a recording is incomplete (so leaks may have been missed): what
    /// `--error-exitcode` fails on.
    pub fn failed(&self) -> bool {
        self.has_leaks()
            || self
                .processes
                .iter()
                .any(|p| p.summary.recording_incomplete.is_some())
    }
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// Bytes, blocks and indirectly lost bytes.
type Tally = (u64, u64, u64);

/// Live blocks tallied by (kind, stack id). Neighbours in the live set often share a stack: a
/// run of them is summed apart and added to the map once.
#[derive(Default)]
struct Runs {
    by_stack: FxHashMap<(Kind, u32), Tally>,
    run: Option<((Kind, u32), Tally)>,
}

impl Runs {
    #[inline]
    fn add(&mut self, key: (Kind, u32), size: u64, indirect: u64) {
        match &mut self.run {
            Some((k, t)) if *k == key => {
                (t.0, t.1, t.2) = (t.0 + size, t.1 + 1, t.2 + indirect);
            }
            _ => {
                if let Some(done) = self.run.replace((key, (size, 1, indirect))) {
                    self.merge(done);
                }
            }
        }
    }

    fn merge(&mut self, (key, t): ((Kind, u32), Tally)) {
        let e = self.by_stack.entry(key).or_default();
        (e.0, e.1, e.2) = (e.0 + t.0, e.1 + t.1, e.2 + t.2);
    }

    fn done(mut self) -> FxHashMap<(Kind, u32), Tally> {
        if let Some(done) = self.run.take() {
            self.merge(done);
        }
        self.by_stack
    }
}

/// Builds the report of one process. `exit` (from waitpid, when we ran it) wins over the trace's.
pub fn build(p: &Process, exit: Option<ExitKind>, sym: &mut Symbolizer) -> ProcReport {
    build_with(p, exit, None, sym)
}

/// As [`build`], with the warm-up to leave out of the growth verdicts (seconds; default: the
/// first tenth of the run).
pub fn build_with(
    p: &Process,
    exit: Option<ExitKind>,
    warmup_s: Option<f64>,
    sym: &mut Symbolizer,
) -> ProcReport {
    let mut sites = Callsites::new(p);
    let (timeline, growth) = match crate::growth::build_in(p, &mut sites, warmup_s, sym) {
        Some((t, g)) => (Some(t), g),
        None => (None, Vec::new()),
    };
    let h = p.header.as_ref();
    // The heap scan's kinds, when the trace has one.
    let scan = p.reach.as_ref().filter(|r| r.unavailable.is_none());
    let kind_of = |addr: u64| -> (Kind, u64, u8) {
        match scan {
            None => (Kind::Unfreed, 0, leakhunt_format::reach::NO_HEURISTIC),
            Some(r) => match r.class(addr) {
                Some(c) => (Kind::from_code(c.kind), c.indirect, c.heuristic),
                None => (Kind::NotScanned, 0, leakhunt_format::reach::NO_HEURISTIC),
            },
        }
    };
    let mut reach_summary = p.reach.as_ref().map(|r| ReachSummary {
        scanned: r.unavailable.is_none(),
        unavailable: r.unavailable.clone(),
        blocks: r.blocks,
        words: r.words,
        threads_held: r.threads,
        held_ms: r.held_us as f64 / 1000.0,
        ..ReachSummary::default()
    });
    // Group live blocks by (kind, stack id), then stacks by callsite (ids differ across module
    // reloads); a callsite's frames are shown with the addresses of its first stack.
    let mut by_stack = Runs::default();
    if scan.is_none() {
        // Every block unfreed, none classified: their stacks and sizes are all it takes.
        p.live
            .for_each_stack_size(|stack, size| by_stack.add((Kind::Unfreed, stack), size, 0));
    } else {
        for (addr, l) in p.live.iter() {
            let (kind, indirect, heur) = kind_of(addr);
            by_stack.add((kind, l.stack), l.size, indirect);
            if let Some(r) = reach_summary.as_mut() {
                let slot = match kind {
                    Kind::Definite => Some(&mut r.definitely_lost),
                    Kind::Indirect => Some(&mut r.indirectly_lost),
                    Kind::Possible => Some(&mut r.possibly_lost),
                    Kind::Reachable => Some(&mut r.still_reachable),
                    Kind::NotScanned => Some(&mut r.not_scanned),
                    Kind::Unfreed => None,
                };
                if let Some(slot) = slot {
                    slot.0 += l.size;
                    slot.1 += 1;
                }
                if let Some(h) = leakhunt_reach::Heuristic::ALL.get(heur as usize) {
                    let e = r.heuristics.entry(h.name()).or_default();
                    e.0 += l.size;
                    e.1 += 1;
                }
            }
        }
    }
    let by_stack = by_stack.done();
    let mut by_stack: Vec<_> = by_stack.into_iter().collect();
    by_stack.sort_unstable_by_key(|&((k, id), _)| (id, k));
    let mut slot: FxHashMap<(Kind, u32), usize> = FxHashMap::default();
    // (kind, callsite, its first stack, bytes, blocks, indirect bytes)
    let mut groups: Vec<(Kind, u32, u32, u64, u64, u64)> = Vec::new();
    for ((kind, id), (bytes, blocks, indirect)) in by_stack {
        let site = sites.site(id);
        let i = *slot.entry((kind, site)).or_insert_with(|| {
            groups.push((kind, site, id, 0, 0, 0));
            groups.len() - 1
        });
        groups[i].3 += bytes;
        groups[i].4 += blocks;
        groups[i].5 += indirect;
    }
    let mut leaks: Vec<(Kind, Leak)> = groups
        .into_iter()
        .map(|(kind, site, id, bytes, blocks, indirect_bytes)| {
            let stack = p.stacks.get(&id);
            let unwind =
                stack.and_then(|s| (s.reason != StopReason::End).then(|| s.reason.describe()));
            let leak = Leak {
                kind: kind.name(),
                bytes,
                indirect_bytes,
                blocks,
                stack: sites.frames(site, id, sym),
                alloc_fn: p.alloc_fn(id),
                suppressed: None,
                unwind,
                retention: None,
                site,
                callsite: id,
            };
            (kind, leak)
        })
        .collect();
    // Without a scan: largest first. With one, memcheck's order: smallest first by bytes
    // (direct and indirect), then kind, then blocks. Ties in a fixed order (the symbolized stack,
    // then module offsets), so the same trace always gives the same report.
    let scanned = scan.is_some();
    let order = |(k, l): &(Kind, Leak)| {
        let syms: Vec<_> = l
            .stack
            .iter()
            .map(|f| (f.function.clone(), f.file.clone(), f.line))
            .collect();
        let offs: Vec<_> = l
            .stack
            .iter()
            .map(|f| (f.module.clone(), f.offset))
            .collect();
        let total = l.bytes + l.indirect_bytes;
        let (size, blocks) = if scanned {
            (total as i128, l.blocks as i128)
        } else {
            (-(total as i128), -(l.blocks as i128))
        };
        (size, *k, blocks, syms, offs)
    };
    leaks.sort_by_cached_key(order);
    let mut leaks: Vec<Leak> = leaks.into_iter().map(|(_, l)| l).collect();
    let mut growth = growth;
    attach_retention(p, &mut sites, sym, &mut leaks, &mut growth);
    // Worst first: by verdict, then by what the growth keeps alive (retained growth), then by
    // the growth itself (the order it had, stable).
    growth.sort_by(|a, b| {
        a.verdict.cmp(&b.verdict).then(
            b.delta_retained_bytes
                .unwrap_or(0)
                .cmp(&a.delta_retained_bytes.unwrap_or(0)),
        )
    });

    let mut unwind = Unwind {
        allocations: 0,
        complete: 0,
        truncated: 0,
        stopped_early: BTreeMap::new(),
        missing: 0,
    };
    for (id, n) in p.growth.allocs_by_stack() {
        match p.stacks.get(&id) {
            None => unwind.missing += n,
            Some(s) => {
                unwind.allocations += n;
                match s.reason {
                    StopReason::End => unwind.complete += n,
                    StopReason::MaxDepth => unwind.truncated += n,
                    r => {
                        *unwind
                            .stopped_early
                            .entry(r.describe().to_string())
                            .or_default() += n
                    }
                }
            }
        }
    }

    let mut warnings = p.warnings.clone();
    if let Some(t) = &p.truncated {
        warnings.push(format!(
            "{t}; the report covers the events before that point"
        ));
    }
    if p.totals.reused_live > 0 {
        warnings.push(format!(
            "{} allocations returned an address that was still live: frees were lost, figures are uncertain",
            p.totals.reused_live
        ));
    }
    if p.totals.unknown_frees > 0 {
        warnings.push(format!(
            "{} frees of blocks never seen allocated: made before tracing began (in a fork child: by its parent) or inside an allocator's own call (a C++ exception thrown by operator new)",
            p.totals.unknown_frees
        ));
    }
    let lost = p.events_lost();
    if lost > 0 {
        warnings.push(format!(
            "{lost} events were lost: the figures below are uncertain"
        ));
    }
    let incomplete = p
        .incomplete
        .clone()
        .or_else(|| {
            p.truncated
                .as_ref()
                .map(|t| format!("the trace was cut short ({t})"))
        })
        .or_else(|| {
            // The trace stops without the process's end while nothing else says how it ended
            // (a report of a kept trace: the process was killed, or recording stopped).
            (p.exit.is_none() && exit.is_none()).then(|| {
                "the trace ends without the process's end (killed, or recording stopped)"
                    .to_string()
            })
        })
        .or_else(|| (lost > 0).then(|| format!("{lost} events were lost")));
    if let Some(&u) = p.stats.get(&leakhunt_format::stat::UNTRACKED_ALLOCS) {
        if u > 0 {
            warnings.push(format!(
                "{u} allocator calls made from inside leakhunt's own hook (a signal handler) were not recorded"
            ));
        }
    }
    let exit = p
        .exit
        .filter(|e| *e == ExitKind::Exec)
        .or(exit)
        .or(p.exit)
        .map(|e| match e {
            ExitKind::Code(c) => Exit::Code(c),
            ExitKind::Signal(s) => Exit::Signal(s),
            ExitKind::Exec => Exit::Exec(true),
        });
    ProcReport {
        pid: p.pid(),
        ppid: h.map_or(0, |h| h.ppid),
        argv: h.map_or_else(Vec::new, |h| h.argv.clone()),
        title: p.title.clone(),
        exe: h.map_or_else(String::new, |h| h.exe.clone()),
        exit,
        reachability: reach_summary,
        snapshot_scans: p
            .snapshot_scans
            .iter()
            .map(|s| SnapshotScanSummary {
                snapshot: s.snapshot.clone(),
                scanned: s.unavailable.is_none(),
                unavailable: s.unavailable.clone(),
                blocks: s.blocks,
                threads_held: s.threads_held,
                held_ms: s.held_us as f64 / 1000.0,
                definitely_lost: s.kinds[3],
                indirectly_lost: s.kinds[2],
                possibly_lost: s.kinds[1],
                still_reachable: s.kinds[0],
            })
            .collect(),
        show_kinds: Kinds::DEFAULT,
        error_kinds: Kinds::DEFAULT,
        gen_suppressions: false,
        show_used_suppressions: false,
        top: 0,
        used_suppressions: Vec::new(),
        summary: Summary {
            in_use_at_exit_bytes: p.live.values().map(|l| l.size).sum(),
            in_use_at_exit_blocks: p.live.len() as u64,
            allocs: p.totals.allocs,
            frees: p.totals.frees,
            bytes_allocated: p.totals.bytes_allocated,
            events_lost: lost,
            recording_incomplete: incomplete,
            unmatched_frees: p.totals.unknown_frees,
        },
        unwind,
        captures: {
            let stat = |k| p.stats.get(&k).copied().unwrap_or(0);
            use leakhunt_format::stat;
            Captures {
                walked: stat(stat::UNWIND_WALKED),
                joined: stat(stat::UNWIND_REUSED),
                repeated: stat(stat::UNWIND_REPEATED),
                elided_events: stat(stat::ELIDED),
                output_retaken: stat(stat::OUTPUT_RETAKEN),
                ring_waits: stat(stat::RING_WAITS),
                tracer_resident_bytes: stat(stat::TRACER_RESIDENT),
                threads: stat(stat::THREADS),
                rings_given_back: stat(stat::RINGS_GIVEN_BACK),
            }
        },
        leaks,
        timeline,
        growth_groups: crate::growth::groups(&growth),
        growth,
        warnings,
        profile: None,
        growth_profile: None,
    }
}

/// Retention for each record (from the scan at exit) and each growth entry (from the latest
/// scan that saw its callsite's blocks).
fn attach_retention<'p>(
    p: &'p Process,
    sites: &mut Callsites<'p>,
    sym: &mut Symbolizer,
    leaks: &mut [Leak],
    growth: &mut [crate::growth::GrowthEntry],
) {
    use crate::paths::{Index, Namer, Want};
    let mut scans: Vec<Index> = Vec::new();
    for s in &p.snapshot_scans {
        let name = s.snapshot.clone().unwrap_or_else(|| "(unnamed)".into());
        scans.extend(Index::new(&s.items, &name));
    }
    let exit = p
        .reach
        .as_ref()
        .filter(|r| r.unavailable.is_none())
        .and_then(|r| Index::new(&r.items, "exit"));
    // What `--orphans` learned (nothing, when no block was freed).
    let no_frees = crate::orphans::Orphans::default();
    let orphans = p.orphans.as_deref().or_else(|| {
        (p.stats.get(&leakhunt_format::stat::ORPHANS) == Some(&1)).then_some(&no_frees)
    });
    if exit.is_none() && scans.is_empty() && orphans.is_none() {
        return;
    }
    // Each scan's stack ids by callsite.
    let by_site = |ix: &Index, sites: &mut Callsites| -> FxHashMap<u32, Vec<u32>> {
        let mut m: FxHashMap<u32, Vec<u32>> = FxHashMap::default();
        for id in ix.stacks() {
            m.entry(sites.site(id)).or_default().push(id);
        }
        for v in m.values_mut() {
            v.sort_unstable();
        }
        m
    };
    let exit_sites = exit.as_ref().map(|ix| by_site(ix, sites));
    let scan_sites: Vec<FxHashMap<u32, Vec<u32>>> =
        scans.iter().map(|ix| by_site(ix, sites)).collect();
    // Lost blocks by callsite (definitely lost: where their holder died; `--orphans`).
    let mut lost: FxHashMap<u32, Vec<u64>> = FxHashMap::default();
    if let (Some(_), Some(r)) = (orphans, &p.reach) {
        for (addr, l) in p.live.iter() {
            if r.class(addr).is_some_and(|c| c.kind == 3) {
                lost.entry(sites.site(l.stack)).or_default().push(addr);
            }
        }
    }
    let mut namer = Namer {
        p,
        sites,
        sym,
        hop_stacks: Default::default(),
    };
    if let (Some(ix), Some(ss)) = (&exit, &exit_sites) {
        for l in leaks.iter_mut() {
            let want = match Kind::from_name(l.kind) {
                Some(Kind::Definite) => Want::Heads,
                Some(Kind::Indirect) => Want::Indirect,
                Some(Kind::Reachable) | Some(Kind::Possible) => Want::Held,
                _ => continue,
            };
            if let Some(ids) = ss.get(&l.site) {
                l.retention = namer.retention(ix, ids, want);
            }
        }
    }
    if let Some(o) = orphans {
        for l in leaks.iter_mut() {
            if l.kind != Kind::Definite.name() {
                continue;
            }
            let Some(addrs) = lost.get(&l.site) else {
                continue;
            };
            if let Some(orph) = crate::orphans::orphaned(&mut namer, o, addrs, l.alloc_fn) {
                l.retention
                    .get_or_insert_with(|| crate::paths::Retention {
                        root: crate::paths::RootName {
                            kind: "none",
                            ..Default::default()
                        },
                        share: 1.0,
                        blocks: l.blocks,
                        bytes: l.bytes,
                        scan: "exit".into(),
                        ..Default::default()
                    })
                    .orphaned_at = Some(orph);
            }
        }
        // The others: no freed block held them.
        for l in leaks.iter_mut() {
            if l.kind != Kind::Definite.name() {
                continue;
            }
            let Some(r) = l.retention.as_mut().filter(|r| r.orphaned_at.is_none()) else {
                continue;
            };
            r.lost_how =
                Some("the last pointer to each was overwritten, or went out of scope".into());
            // The frame a scan at a snapshot last saw holding them.
            for (ix, ss) in scans.iter().zip(scan_sites.iter()).rev() {
                if let Some(ids) = ss.get(&l.site) {
                    if let Some(h) = namer.retention(ix, ids, Want::Held) {
                        if h.root.kind == "stack" {
                            r.last_seen_in = Some(h.root);
                            break;
                        }
                    }
                }
            }
        }
    }
    for e in growth.iter_mut() {
        // The scan made as the program began to exit (its structures still whole), else the
        // one at exit, else the latest at a snapshot that saw the callsite.
        let pre_exit = scans
            .iter()
            .zip(scan_sites.iter())
            .rev()
            .filter(|(ix, _)| ix.scan == "pre-exit");
        let found = pre_exit
            .chain(exit.as_ref().zip(exit_sites.as_ref()))
            .chain(scans.iter().zip(scan_sites.iter()).rev())
            .find_map(|(ix, ss)| ss.get(&e.site).map(|ids| (ix, ids)));
        if let Some((ix, ids)) = found {
            e.retention = namer.retention(ix, ids, Want::All);
            let (b, n) = ix.retained(ids, e.since);
            e.delta_retained_bytes = Some(b);
            e.delta_retained_blocks = Some(n);
        }
        if let (Some(o), Some(r), Some(addrs)) = (orphans, e.retention.as_mut(), lost.get(&e.site))
        {
            if r.root.kind == "none" {
                r.orphaned_at =
                    crate::orphans::orphaned(&mut namer, o, addrs, p.alloc_fn(e.callsite));
            }
        }
    }
}

/// The indexes to show when `count` items are more than `top` (0: no cap): `pick` gives them
/// all, the ones to show first. `None`: show everything.
pub fn capped(
    top: usize,
    count: usize,
    pick: impl FnOnce() -> Vec<usize>,
) -> Option<rustc_hash::FxHashSet<usize>> {
    (top > 0 && count > top).then(|| pick().into_iter().take(top).collect())
}

/// What a capped list left out: how many, their bytes and blocks, and the modules that made
/// most of them (the module of each one's innermost frame).
pub fn left_out_lines(left: &[&Leak], what: &str, top: usize) -> Vec<String> {
    let bytes = left.iter().fold(0u64, |a, l| a.saturating_add(l.bytes));
    let blocks = left.iter().fold(0u64, |a, l| a.saturating_add(l.blocks));
    let mut out = vec![format!(
        "... and {} more {what}s ({} bytes in {}) not shown: the {top} with the most bytes are. `--top 0` shows every one; --json, --xml-file and --html keep them all.",
        thousands(left.len() as u64),
        thousands(bytes),
        plural(blocks, "block")
    )];
    out.extend(by_module(
        left.iter().map(|l| (&l.stack[..], l.bytes)),
        what,
    ));
    out
}

/// Per module of the innermost frame, the count and bytes of these items (`what`s), the five
/// largest.
pub fn by_module<'a>(items: impl Iterator<Item = (&'a [Frame], u64)>, what: &str) -> Vec<String> {
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (stack, bytes) in items {
        let module = stack
            .iter()
            .find_map(|f| f.module.as_deref())
            .map_or_else(|| "(no module)".to_string(), |p| basename(p).to_string());
        let e = m.entry(module).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(bytes);
    }
    let mut v: Vec<(String, (u64, u64))> = m.into_iter().collect();
    v.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(5)
        .map(|(m, (n, b))| format!("   from {m}: {}, {} bytes", plural(n, what), thousands(b)))
        .collect()
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A stack as report lines, innermost first: `at FRAME`, then `by FRAME`, at most `max` of them.
pub fn stack_lines(frames: &[Frame], max: usize) -> impl Iterator<Item = String> + '_ {
    frames
        .iter()
        .take(max)
        .enumerate()
        .map(|(j, f)| format!("{} {}", if j == 0 { "at" } else { "by" }, render_frame(f)))
}

pub fn render_frame(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("???");
    let loc = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" ({}:{line})", basename(file)),
        _ => match &f.module {
            Some(m) => format!(" (in {m}+{:#x})", f.offset),
            None => String::new(),
        },
    };
    let inl = if f.inlined { " [inlined]" } else { "" };
    format!("{:#x}: {func}{loc}{inl}", f.address)
}

/// The escape of one control character: `\n`, `\t`, `\r`, `\xHH` for the other C0 ones and
/// DEL, `\uHHHH` for C1 (the forms bash's `$'...'` reads back).
fn control_escape(c: char, out: &mut String) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
    }
}

/// `s` with its control characters written as escapes (`\n`, `\t`, `\x1b`, `\u0085`), for text
/// that reaches a terminal: a name from the trace (an argument, a module path, a warning) can
/// then neither forge a line of the report nor send the terminal an escape sequence.
pub fn escape_control(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            control_escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// As [`escape_control`] for text of several lines: its line breaks are kept.
pub fn escape_control_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, l) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape_control(l));
    }
    out
}

/// A command line as one line that a POSIX shell (bash for `$'...'`) reads back into the same
/// words, so that empty arguments, spaces and control characters show: a word of only
/// `A-Za-z0-9_@%+=:,./-` as it is, a word with control characters as `$'...'` with escapes,
/// any other (an empty one included) in single quotes (`printf '[%s]' a '' b`).
pub fn shell_words(argv: &[String]) -> String {
    let mut out = String::new();
    for (i, w) in argv.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
        if !w.is_empty() && w.chars().all(plain) {
            out.push_str(w);
        } else if w.chars().any(char::is_control) {
            out.push_str("$'");
            for c in w.chars() {
                match c {
                    '\\' | '\'' => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if c.is_control() => control_escape(c, &mut out),
                    c => out.push(c),
                }
            }
            out.push('\'');
        } else {
            out.push('\'');
            out.push_str(&w.replace('\'', "'\\''"));
            out.push('\'');
        }
    }
    out
}

/// Text report of one process, valgrind-style (`==PID==` prefix on every line). Names from the
/// trace are shown with their control characters escaped ([`escape_control`]), the command
/// line as the shell would take it ([`shell_words`]).
pub fn render_text(r: &ProcReport, out: &mut String) {
    let pfx = format!("=={}==", r.pid);
    // Lines with the prefix, and (generated suppressions) without.
    let text = std::cell::RefCell::new(std::mem::take(out));
    let line = |s: &str| {
        let _ = writeln!(text.borrow_mut(), "{pfx} {}", escape_control(s));
    };
    let raw = |s: &str| text.borrow_mut().push_str(&escape_control_lines(s));
    match &r.title {
        Some(t) => line(&format!(
            "leakhunt: {} (renamed itself: {})",
            shell_words(&r.argv),
            escape_control(&t.join(" "))
        )),
        None => line(&format!("leakhunt: {}", shell_words(&r.argv))),
    }
    line("");
    let total = r.leaks.len();
    let scanned = r.reachability.as_ref().filter(|x| x.scanned);
    let listed = |l: &Leak| {
        r.show_kinds
            .contains(Kind::from_name(l.kind).unwrap_or(Kind::Unfreed))
            && l.suppressed.is_none()
    };
    // What a library keeps for itself (still reachable, allocated with no frame of the program's
    // executable on the stack: a TLS library's root certificates, a runtime's tables) is one line
    // per library when the text is capped.
    let own = |l: &Leak| {
        r.top > 0
            && l.kind == Kind::Reachable.name()
            && l.stack.iter().any(|f| f.module.is_some())
            && !l
                .stack
                .iter()
                .any(|f| f.module.as_deref() == Some(r.exe.as_str()))
    };
    let shown = |l: &Leak| listed(l) && !own(l);
    // At most `top` records: those with the most bytes, in memcheck's order and numbering.
    let keep = capped(r.top, r.leaks.iter().filter(|l| shown(l)).count(), || {
        let mut by_size: Vec<(u64, usize)> = r
            .leaks
            .iter()
            .enumerate()
            .filter(|(_, l)| shown(l))
            .map(|(i, l)| (l.bytes.saturating_add(l.indirect_bytes), i))
            .collect();
        by_size.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        by_size.into_iter().map(|x| x.1).collect()
    });
    for (i, l) in r.leaks.iter().enumerate() {
        let kind = Kind::from_name(l.kind).unwrap_or(Kind::Unfreed);
        if !shown(l) || keep.as_ref().is_some_and(|k| !k.contains(&i)) {
            continue;
        }
        if scanned.is_some() {
            // memcheck's words (and its "1 blocks").
            line(&crate::xml::record_text(l, kind, i + 1, total));
        } else {
            line(&format!(
                "{} bytes in {} are unfreed at exit (record {} of {total})",
                thousands(l.bytes),
                plural(l.blocks, "block"),
                i + 1
            ));
        }
        for s in stack_lines(&l.stack, usize::MAX) {
            line(&format!("   {s}"));
        }
        if l.stack.is_empty() {
            line("   (no stack: the allocation came straight from outside any known module)");
        }
        if let Some(u) = l.unwind {
            line(&format!("   (stack {u})"));
        }
        if let Some(ret) = &l.retention {
            for s in crate::paths::lines(ret) {
                line(&format!("   {s}"));
            }
            if let Some(o) = &ret.orphaned_at {
                for s in crate::orphans::lines(o) {
                    line(&format!("   {s}"));
                }
            }
            if !ret.other_paths.is_empty() {
                line(&format!(
                    "   (callsite {}: `leakhunt paths TRACE --callsite {}` shows every path)",
                    l.callsite, l.callsite
                ));
            }
        }
        line("");
        if r.gen_suppressions {
            raw(&crate::supp::generate(kind, l.alloc_fn, &l.stack));
        }
    }
    let kept_by_libraries: Vec<&Leak> = r.leaks.iter().filter(|l| listed(l) && own(l)).collect();
    if !kept_by_libraries.is_empty() {
        let bytes = kept_by_libraries
            .iter()
            .fold(0u64, |a, l| a.saturating_add(l.bytes));
        line(&format!(
            "{} still reachable in {} that libraries allocated for themselves (no frame of the program on their stacks), by library (`--top 0` lists them):",
            plural(bytes, "byte"),
            plural(kept_by_libraries.len() as u64, "record")
        ));
        for s in by_module(
            kept_by_libraries.iter().map(|l| (&l.stack[..], l.bytes)),
            "loss record",
        ) {
            line(&s);
        }
        line("");
    }
    if let Some(k) = &keep {
        let left: Vec<&Leak> = r
            .leaks
            .iter()
            .enumerate()
            .filter(|(i, l)| shown(l) && !k.contains(i))
            .map(|(_, l)| l)
            .collect();
        for s in left_out_lines(&left, "loss record", r.top) {
            line(&s);
        }
        line("");
    }
    if let Some(t) = &r.timeline {
        for l in crate::growth::render(t, &r.growth, r.top) {
            line(&l);
        }
        line("");
    }
    let s = &r.summary;
    line("HEAP SUMMARY:");
    line(&format!(
        "    in use at exit: {} bytes in {}",
        thousands(s.in_use_at_exit_bytes),
        plural(s.in_use_at_exit_blocks, "block")
    ));
    line(&format!(
        "  total heap usage: {} allocs, {} frees, {} bytes allocated",
        thousands(s.allocs),
        thousands(s.frees),
        thousands(s.bytes_allocated)
    ));
    line("");
    if total == 0 && s.recording_incomplete.is_some() {
        line("No unfreed blocks in what was recorded, but the recording is incomplete: leaks may be missing");
    } else if total == 0 {
        line("All heap blocks were freed -- no leaks are possible");
    } else if let Some(x) = scanned {
        // memcheck's LEAK SUMMARY, its labels aligned on the colon.
        line("LEAK SUMMARY:");
        let kind_line = |label: &str, (b, n): (u64, u64)| {
            format!(
                "{label:>18}: {} bytes in {} blocks",
                thousands(b),
                thousands(n)
            )
        };
        line(&kind_line("definitely lost", x.definitely_lost));
        line(&kind_line("indirectly lost", x.indirectly_lost));
        line(&kind_line("possibly lost", x.possibly_lost));
        line(&kind_line("still reachable", x.still_reachable));
        if !x.heuristics.is_empty() {
            line("                      of which reachable via heuristic:");
            for h in leakhunt_reach::Heuristic::ALL {
                if let Some(&(b, n)) = x.heuristics.get(h.name()) {
                    line(&format!(
                        "                        {:<19}: {} bytes in {} blocks",
                        h.name(),
                        thousands(b),
                        thousands(n)
                    ));
                }
            }
        }
        line(&kind_line("suppressed", x.suppressed));
        if x.not_scanned.1 > 0 {
            line(&kind_line("not scanned", x.not_scanned));
        }
        if x.still_reachable.1 > 0 && !r.show_kinds.contains(Kind::Reachable) {
            line("Reachable blocks (those to which a pointer was found) are not shown.");
            line("To see them, rerun with: --leak-check=full --show-leak-kinds=all");
        }
    } else {
        line(&format!(
            "LEAK SUMMARY: {} bytes in {} unfreed, in {} records",
            thousands(s.in_use_at_exit_bytes),
            plural(s.in_use_at_exit_blocks, "block"),
            total
        ));
    }
    for s in &r.snapshot_scans {
        let name = s.snapshot.as_deref().unwrap_or("(unnamed)");
        let at = if name == "pre-exit" {
            "as the program began to exit".to_string()
        } else {
            format!("at snapshot {name}")
        };
        match &s.unavailable {
            Some(why) => line(&format!("HEAP SCAN {at}: not made ({why})")),
            None => line(&format!(
                "HEAP SCAN {at}: definitely lost {} bytes in {} blocks, indirectly lost {} in {}, possibly lost {} in {}, still reachable {} in {} (threads held {:.1} ms)",
                thousands(s.definitely_lost.0),
                thousands(s.definitely_lost.1),
                thousands(s.indirectly_lost.0),
                thousands(s.indirectly_lost.1),
                thousands(s.possibly_lost.0),
                thousands(s.possibly_lost.1),
                thousands(s.still_reachable.0),
                thousands(s.still_reachable.1),
                s.held_ms
            )),
        }
    }
    if r.show_used_suppressions {
        for u in &r.used_suppressions {
            line(&format!(
                "used_suppression: {:>6} {} {} suppressed: {} bytes in {} blocks",
                u.records,
                u.name,
                u.origin,
                thousands(u.bytes),
                thousands(u.blocks)
            ));
        }
    }
    if let Some(why) = r.reachability.as_ref().and_then(|x| x.unavailable.as_ref()) {
        line(&format!(
            "HEAP SCAN: not made ({why}): unfreed blocks are not sorted into kinds"
        ));
    }
    let u = &r.unwind;
    let stopped: u64 = u.stopped_early.values().sum();
    line(&format!(
        "UNWIND QUALITY: {} allocations: {} complete stacks, {} truncated at the frame limit, {} stopped early{}",
        thousands(u.allocations),
        thousands(u.complete),
        thousands(u.truncated),
        thousands(stopped),
        if u.missing > 0 { format!(", {} without a stack record", u.missing) } else { String::new() }
    ));
    for (why, n) in &u.stopped_early {
        line(&format!("    {}: {why}", thousands(*n)));
    }
    let c = &r.captures;
    if c.tracer_resident_bytes > 0 {
        line(&format!(
            "TRACER MEMORY: {:.1} MiB resident in the process at its end (rings, unwind state, tables), {} thread{}: {} KiB a thread{}",
            c.tracer_resident_bytes as f64 / (1 << 20) as f64,
            thousands(c.threads),
            if c.threads == 1 { "" } else { "s" },
            c.tracer_resident_bytes / 1024 / c.threads.max(1),
            if c.rings_given_back > 0 {
                format!(
                    "; idle threads' rings given back {} time{}",
                    thousands(c.rings_given_back),
                    if c.rings_given_back == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            }
        ));
    }
    match &s.recording_incomplete {
        Some(why) if s.events_lost == 0 => line(&format!("EVENTS LOST: unknown: {why}")),
        Some(why) => line(&format!("EVENTS LOST: {} ({why})", s.events_lost)),
        None => line(&format!("EVENTS LOST: {}", s.events_lost)),
    }
    match &r.exit {
        Some(Exit::Code(c)) => line(&format!("process exited with code {c}")),
        Some(Exit::Signal(sig)) => line(&format!(
            "process was killed by {} ({sig})",
            signal_name(*sig)
        )),
        Some(Exit::Exec(_)) => {
            line("process replaced its image by exec (figures are at that point)")
        }
        None => line("process end not recorded (the trace stops without an exit record)"),
    }
    for w in &r.warnings {
        line(&format!("warning: {w}"));
    }
    *out = text.into_inner();
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakhunt_format::encode::{self, Header};

    #[test]
    fn control_characters_are_escaped_and_the_rest_is_kept() {
        assert_eq!(escape_control("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            escape_control("a\nb\tc\rd\x1b[2J\x7f\u{85}e"),
            r"a\nb\tc\rd\x1b[2J\x7f\u0085e"
        );
        assert_eq!(escape_control_lines("a\x1b\nb\n"), "a\\x1b\nb\n");
    }

    #[test]
    fn argv_is_shown_as_the_shell_would_take_it() {
        let w = |v: &[&str]| shell_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["printf", "[%s]", "a", "", "b"]), "printf '[%s]' a '' b");
        assert_eq!(
            w(&["ls", "-l", "/tmp/x_y@z%1+2=3:4,5.6"]),
            "ls -l /tmp/x_y@z%1+2=3:4,5.6"
        );
        assert_eq!(
            w(&["echo", "two words", "it's"]),
            r"echo 'two words' 'it'\''s'"
        );
        assert_eq!(
            w(&["a\nb", "tab\there", "\x1b[31m", "it's\\\n"]),
            r"$'a\nb' $'tab\there' $'\x1b[31m' $'it\'s\\\n'"
        );
        assert_eq!(w(&[]), "");
    }

    #[test]
    fn the_text_report_escapes_names_from_the_trace_and_json_keeps_them() {
        let argv = ["prog", "", "two words", "\x1b[2Jx\ny"];
        let mut t = encode::preamble().to_vec();
        encode::header(
            &Header {
                arch: "x86_64".into(),
                pointer_size: 8,
                little_endian: true,
                pid: 7,
                ppid: 1,
                start_realtime_ns: 0,
                start_monotonic_ns: 0,
                exe: "/bin/prog".into(),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                max_frames: 64,
            },
            &mut t,
        );
        encode::warning("from the trace:\x1b]0;title\x07\nforged line", &mut t);
        encode::exit(leakhunt_format::ExitKind::Code(0), &mut t);
        let (p, err) = Process::read_stream(&t[..]);
        assert_eq!(err, None);
        let r = build(&p, None, &mut Symbolizer::new());
        let mut text = String::new();
        render_text(&r, &mut text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r"==7== leakhunt: prog '' 'two words' $'\x1b[2Jx\ny'"
        );
        assert_eq!(
            lines.last().copied(),
            Some(r"==7== warning: from the trace:\x1b]0;title\x07\nforged line")
        );
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        // JSON keeps the strings as they are (escaped as JSON escapes them).
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(json["argv"], serde_json::json!(argv));
        // HTML: the same shell words, markup and control characters escaped.
        let html = crate::html::render(&Report::new(vec![r]));
        assert!(
            html.contains(
                r"<code>prog &#39;&#39; &#39;two words&#39; $&#39;\x1b[2Jx\ny&#39;</code>"
            ),
            "{html}"
        );
        assert!(!html.contains('\x1b'));
    }
}
