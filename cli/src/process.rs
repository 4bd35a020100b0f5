//! One traced process, rebuilt from its trace stream: events merged across threads in sequence
//! order, the live set, the stack and module tables, and how the stream and the process ended.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::io::Read;

use crate::liveset::LiveSet;
use crate::pending::Pending;
use crate::series::Series;
use leakhunt_format::compact;
use leakhunt_format::encode::{Header, Module};
use leakhunt_format::slot::{self, SlotIter, SlotRecord};
use leakhunt_format::{stat, AllocFn, DecodeError, ExitKind, FreeFn, Record, StopReason};

/// Stack ids of blocks a fork child inherited: the parent's id with this bit set.
pub const INHERITED_STACK: u32 = 1 << 31;

/// No allocation is larger than a process's address space (x86_64: 47 bits of user space);
/// a larger size is corruption, not a figure to add up.
const MAX_ALLOC_SIZE: u64 = 1 << 47;

/// Module ids are dense from 0; no real process has more modules than this.
const MAX_MODULE_ID: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
pub struct Live {
    pub size: u64,
    pub stack: u32,
    /// The trace's index of the last epoch boundary before the block was allocated (0: none).
    pub born: u32,
}

/// Stack ids up to this keep their allocation function (ids are dense from 0).
const MAX_FN_STACKS: usize = 1 << 24;
const NO_FN: u8 = u8::MAX;

#[derive(Clone, Debug)]
pub struct Stack {
    pub gen: u32,
    pub reason: StopReason,
    pub frames: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Ev {
    Alloc {
        addr: u64,
        size: u64,
        stack: u32,
        func: u8,
    },
    Free {
        addr: u64,
    },
    Nop,
    Fork {
        child: u32,
    },
    /// `count` allocations from `stack`, `bytes` in all, each freed again (elided pairs).
    Pairs {
        stack: u32,
        count: u64,
        bytes: u64,
    },
}

/// `NOP`s that came before their turn (what elided pairs leave, and with threads whose numbers
/// interleave nearly every one arrives early): a bit per sequence number in a window above
/// the next one expected, instead of a queue entry and a heap step each. A `NOP` changes
/// nothing; its number only has to be known taken when the count reaches it.
#[derive(Default)]
struct EarlyNops {
    /// Bit `seq % NOP_WINDOW` for `seq` in `[next_seq, next_seq + NOP_WINDOW)` (allocated at the
    /// first early `NOP`).
    bits: Vec<u64>,
    len: usize,
}

const NOP_WINDOW: u64 = 1 << 20;

impl EarlyNops {
    #[inline]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Notes `seq` (above `next`); false when it lies beyond the window (it waits as any event)
    /// or is noted already (the caller reports it twice).
    #[inline]
    fn put(&mut self, seq: u64, next: u64) -> Option<bool> {
        if seq - next >= NOP_WINDOW {
            return None;
        }
        if self.bits.is_empty() {
            self.bits = vec![0; (NOP_WINDOW / 64) as usize];
        }
        let (w, b) = ((seq % NOP_WINDOW / 64) as usize, seq % 64);
        let had = self.bits[w] >> b & 1 != 0;
        self.bits[w] |= 1 << b;
        self.len += usize::from(!had);
        Some(!had)
    }

    /// Whether `seq` is noted, `next` the next number expected (a number beyond the window
    /// never is: its bit is another number's).
    #[inline]
    fn has(&self, seq: u64, next: u64) -> bool {
        self.len > 0
            && seq.wrapping_sub(next) < NOP_WINDOW
            && self.bits[(seq % NOP_WINDOW / 64) as usize] >> (seq % 64) & 1 != 0
    }

    /// Takes `seq` (the next expected) if noted.
    #[inline]
    fn take(&mut self, seq: u64) -> bool {
        if !self.has(seq, seq) {
            return false;
        }
        self.bits[(seq % NOP_WINDOW / 64) as usize] &= !(1 << (seq % 64));
        self.len -= 1;
        true
    }

    /// The lowest noted number at or above `next` (end of stream).
    fn first_from(&self, next: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        // Word by word from `next`'s, its bits below `next` masked off, round the window once.
        let words = self.bits.len() as u64;
        let start = next % NOP_WINDOW / 64;
        for k in 0..=words {
            let w = (start + k) % words;
            let mut bits = self.bits[w as usize];
            if k == 0 {
                bits &= !0u64 << (next % 64);
            } else if k == words {
                bits &= !(!0u64 << (next % 64));
            }
            if bits != 0 {
                let at = w * 64 + bits.trailing_zeros() as u64;
                // From `next`'s position in the window, forward.
                return Some(next + (at + NOP_WINDOW - next % NOP_WINDOW) % NOP_WINDOW);
            }
        }
        None
    }
}

/// In-order allocations and frees held back a few at a time, so that the live set's leaves they
/// touch are loaded together ([`LiveSet::touch`]: their cache misses overlap instead of taking
/// ~100 ns each in turn on a live set of hundreds of MB). Only events that nothing can observe
/// in between are held: in sequence order with nothing pending, no epoch boundary closing
/// before the last of them, no orphan tracking (which reads the live set at each free), a live
/// set too large for the cache (a small one gains nothing), and a block outside the leaf used
/// last (a growing heap's next block is in the cache already); anything else applies what is
/// held first, and so does the end of each record.
struct Ahead {
    ops: [Op; AHEAD],
    n: usize,
}

const AHEAD: usize = 16;

#[derive(Clone, Copy)]
enum Op {
    Alloc {
        addr: u64,
        size: u64,
        stack: u32,
        func: u8,
    },
    Free {
        addr: u64,
    },
}

impl Op {
    #[inline]
    fn addr(&self) -> u64 {
        match *self {
            Op::Alloc { addr, .. } | Op::Free { addr } => addr,
        }
    }
}

impl Ahead {
    fn new() -> Ahead {
        Ahead {
            ops: [Op::Free { addr: 0 }; AHEAD],
            n: 0,
        }
    }

    /// Applies in-order event `op` (the next sequence number): held, or at once when it might
    /// be observed before the next ones.
    #[inline]
    fn push(&mut self, p: &mut Process, op: Op) {
        let next = p.next_seq.wrapping_add(1);
        // An observer (the packer of a kept trace) sees each event with its own number: held
        // events would be applied after the count moved on.
        if next >= p.growth.next_seq
            || p.orphans.is_some()
            || p.observer.is_some()
            || p.live.is_small()
            || (self.n == 0 && p.live.is_near(op.addr()))
        {
            self.flush(p);
            p.apply_op(op);
            p.bump();
            return;
        }
        // No boundary closes at `next`: nothing to do but count it.
        p.next_seq = next;
        self.ops[self.n] = op;
        self.n += 1;
        if self.n == AHEAD {
            self.flush(p);
        }
    }

    /// Applies what is held, in order.
    #[inline]
    fn flush(&mut self, p: &mut Process) {
        if self.n == 0 {
            return;
        }
        let ops = &self.ops[..self.n];
        std::hint::black_box(p.live.touch(ops.iter().map(Op::addr)));
        for &op in ops {
            p.apply_op(op);
        }
        self.n = 0;
    }
}

#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    /// Frees of blocks the trace never saw allocated (allocated before tracing began).
    pub unknown_frees: u64,
    /// Allocations returning an address that was still live: only possible if a free was lost.
    pub reused_live: u64,
}

/// A loaded module and the generation range in which it was loaded.
#[derive(Clone, Debug)]
pub struct ModuleEntry {
    pub module: Module,
    pub unload_gen: Option<u32>,
}

/// Called with the process after epoch boundaries close.
pub type EpochHook = Box<dyn FnMut(&Process) + Send>;

/// Called with each module record as it is read.
pub type ModuleHook = Box<dyn FnMut(&Module) + Send>;

/// Sees what the reader applies, in the order it applies it: every event in sequence order
/// (with its number), each stack when first defined, what freed blocks held, and the other
/// records as framed in the stream, each before it is applied. `leakhunt run -o` and
/// `leakhunt pack` re-encode a trace from it ([`crate::pack`]).
pub trait Observer: Send {
    /// A record of this tag was read (`raw`: its frame and body as the stream held them),
    /// before it is applied.
    fn record(&mut self, tag: u16, raw: &[u8]);
    fn alloc(&mut self, seq: u64, addr: u64, size: u64, stack: u32, func: u8);
    fn free(&mut self, seq: u64, addr: u64);
    /// `count` `NOP`s numbered from `seq`.
    fn nops(&mut self, seq: u64, count: u64);
    fn fork(&mut self, seq: u64, child: u32);
    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64);
    fn stack(&mut self, id: u32, stack: &Stack);
    /// A `CONTENT` record of thread `tid` was staged ([`Process::content`]).
    fn content(&mut self, tid: u32, addr: u64, free_stack: u32, pairs: &[(u64, u64)]);
    /// Thread `tid`'s `FREE` of `addr`, number `seq`, was decoded ([`Process::attach_content`]).
    fn attach(&mut self, tid: u32, seq: u64, addr: u64);
    /// The stream ended (after [`Process::finish`]): cut short (`truncated`, the reader's
    /// message) or at a decode error (`error`), else cleanly.
    fn end(&mut self, truncated: Option<&str>, error: Option<&str>) -> std::io::Result<()>;
}

/// The thread id the events of a packed trace's `ORDERED` records are applied as.
const PACKED_TID: u32 = u32::MAX;

/// Called with the process when its stream asks for a heap scan (`leakhunt run` answers it:
/// see `scan.rs`).
pub type ReachHook = Box<dyn FnMut(&Process, &leakhunt_format::reach::Request) + Send>;

/// How one block came out of the heap scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// 0 still reachable, 1 possibly lost, 2 indirectly lost, 3 definitely lost.
    pub kind: u8,
    /// The heuristic that last accepted an interior pointer to it (`reach::NO_HEURISTIC`: none).
    pub heuristic: u8,
    /// Definitely lost: the bytes of the blocks it alone reaches.
    pub indirect: u64,
}

/// The heap scan's outcome, as the trace gives it: every block live at the scan is still
/// reachable unless `entries` says otherwise (10 M blocks need no 10 M-entry table); a block
/// allocated since is `unscanned`; a block freed since leaves both.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// The classes that are not plain "still reachable", of blocks live at the scan.
    entries: FxHashMap<u64, Class>,
    /// Live blocks the scan did not see (allocated after it began, or inherited unseen).
    unscanned: rustc_hash::FxHashSet<u64>,
    /// Why there is no classification (the scan could not be made).
    pub unavailable: Option<String>,
    pub note: String,
    pub blocks: u64,
    pub words: u64,
    pub threads: u32,
    pub held_us: u64,
    /// The last chunk arrived.
    pub complete: bool,
    /// Entries for blocks this reader did not know when they came: a fork child's inherited
    /// blocks, which a kept trace learns only when `leakhunt report` links it to its parent.
    unknown: FxHashMap<u64, Class>,
    /// Blocks this reader knew live when the outcome began (the scan may have known more).
    known_at_scan: u64,
    /// What holds the blocks (retention paths, retained sizes), in the order the scan gave.
    pub items: Vec<leakhunt_format::reach::Item>,
}

const REACHABLE: Class = Class {
    kind: 0,
    heuristic: leakhunt_format::reach::NO_HEURISTIC,
    indirect: 0,
};

impl Reach {
    /// The class of live block `addr`: `None` when the scan did not see it or was not made.
    pub fn class(&self, addr: u64) -> Option<Class> {
        if self.unavailable.is_some() || self.unscanned.contains(&addr) {
            return None;
        }
        Some(self.entries.get(&addr).copied().unwrap_or(REACHABLE))
    }
}

/// A heap scan at a snapshot: the kinds of the blocks live then.
#[derive(Clone, Debug, Default)]
pub struct SnapshotScan {
    /// The snapshot it was made at (the latest named point before it).
    pub snapshot: Option<String>,
    /// That snapshot's boundary (index in the trace).
    pub epoch: u32,
    /// Why it could not be made.
    pub unavailable: Option<String>,
    pub blocks: u64,
    pub threads_held: u32,
    pub held_us: u64,
    /// Bytes and blocks still reachable, possibly, indirectly and definitely lost (memcheck's
    /// numbering).
    pub kinds: [(u64, u64); 4],
    /// What held the blocks then (retention paths, retained sizes).
    pub items: Vec<leakhunt_format::reach::Item>,
}

/// The parents' live blocks (and their stacks) at each fork point, by child pid, shared by the
/// stream readers of one `leakhunt run`: a child's heap scan must see what it inherited before
/// the run has read its parent's whole stream.
///
/// Each entry is a copy of the parent's live set (the stacks are shared while the parent makes
/// no new ones): one is dropped when its child takes it, or when the child is gone without a
/// stream of its own (it exec'd or exited before it allocated) once a connection it made would
/// have been read, so a shell that forks thousands of commands holds only those still running.
#[derive(Default)]
pub struct ForkBook {
    at_fork: std::sync::Mutex<BookState>,
    posted: std::sync::Condvar,
}

#[derive(Default)]
struct BookState {
    points: HashMap<u32, (ForkPoint, std::time::Instant)>,
    /// Children whose stream has begun (their fork point waits for them, gone or not).
    streaming: rustc_hash::FxHashSet<u32>,
}

/// How long a gone child's fork point is kept for a connection not read yet (the acceptor takes
/// one within milliseconds; a child it misses says so in its report).
const FORK_POINT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

type ForkPoint = (
    std::sync::Arc<LiveSet>,
    std::sync::Arc<FxHashMap<u32, Stack>>,
);

impl ForkBook {
    fn put(&self, child: u32, at: ForkPoint) {
        let mut book = self.at_fork.lock().unwrap_or_else(|e| e.into_inner());
        let BookState { points, streaming } = &mut *book;
        points.retain(|pid, (_, since)| {
            streaming.contains(pid)
                || since.elapsed() < FORK_POINT_GRACE
                || std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
        streaming.remove(&child);
        points.insert(child, (at, std::time::Instant::now()));
        drop(book);
        self.posted.notify_all();
    }

    /// `child`'s stream has begun: its fork point stays until taken.
    fn streaming(&self, child: u32) {
        self.at_fork
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .streaming
            .insert(child);
    }

    /// The fork point of `child` if it is still in the book (taken).
    fn take(&self, child: u32) -> Option<ForkPoint> {
        self.at_fork
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .points
            .remove(&child)
            .map(|(p, _)| p)
    }

    /// The fork point of `child`, taken from the book, waiting at most `patience` for it.
    fn wait(&self, child: u32, patience: std::time::Duration) -> Option<ForkPoint> {
        let deadline = std::time::Instant::now() + patience;
        let mut book = self.at_fork.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((p, _)) = book.points.remove(&child) {
                return Some(p);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            book = self
                .posted
                .wait_timeout(book, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[derive(Default)]
pub struct Process {
    /// The allocation function each stack id's blocks came from (`NO_FN`: none seen), for the
    /// allocator frame memcheck's stacks and suppressions begin with.
    alloc_fns: Vec<u8>,
    pub header: Option<Header>,
    pub modules: Vec<ModuleEntry>,
    /// What each pseudo frame address stands for (an interpreter's frame): function, file,
    /// line (0: unknown).
    pub frame_names: FxHashMap<u64, (String, String, u32)>,
    pub stacks: FxHashMap<u32, Stack>,
    pub live: LiveSet,
    pub totals: Totals,
    pub exit: Option<ExitKind>,
    pub stats: HashMap<u32, u64>,
    /// Bytes of the stream up to the end of its last complete record.
    pub complete_len: u64,
    pub warnings: Vec<String>,
    /// Set when the stream ended inside a record (the process was killed, or the file cut).
    pub truncated: Option<String>,
    /// Sequence numbers never received: events lost in transit.
    pub gaps: u64,
    next_seq: u64,
    pending: Pending,
    early_nops: EarlyNops,
    /// Live blocks at each fork point, by child pid (forks followed).
    /// (Shared with the run's fork book: one copy of the live set per fork.)
    pub forks: FxHashMap<u32, std::sync::Arc<LiveSet>>,
    /// The process is a fork child of this pid (its `FORKED` record).
    pub forked_from: Option<u32>,
    /// Its parent's blocks at the fork were made its own (at its heap scan, or by `link_forks`).
    inherited: bool,
    /// Where the streams of one `leakhunt run` leave their fork points for their children.
    pub fork_book: Option<std::sync::Arc<ForkBook>>,
    /// The stacks as the last fork point copied them (and how many there were).
    fork_stacks: Option<(usize, std::sync::Arc<FxHashMap<u32, Stack>>)>,
    /// Reading kept traces: the fork children among them; fork points of other children are
    /// not kept (a shell's thousands of forks would each copy its live set).
    pub fork_children: Option<rustc_hash::FxHashSet<u32>>,
    /// Addresses freed without a matching allocation (blocks from before tracing began).
    pub unmatched: rustc_hash::FxHashSet<u64>,
    /// Live bytes and blocks per callsite and for the process at each epoch boundary.
    pub growth: Series,
    /// Boundary indexes (a, b) in the trace: when boundary b closes, count per stack the live
    /// blocks allocated after boundary a into `probe_born` (for `leakhunt diff`), and the
    /// allocations made between the two (count, bytes) into `probe_allocs`.
    pub probe: Option<(u32, u32)>,
    pub probe_born: FxHashMap<u32, u64>,
    /// Per stack, allocations made between the probe's boundaries: (count, bytes). Until
    /// boundary b closes, the totals at boundary a.
    pub probe_allocs: FxHashMap<u32, (u64, u64)>,
    /// Named boundaries (snapshots): (name, the trace index of their epoch boundary).
    pub snapshots: Vec<(String, u32)>,
    /// Heap scans made at snapshots (`leakhunt snapshot --reachability`), in order.
    pub snapshot_scans: Vec<SnapshotScan>,
    /// The scan whose outcome is coming is a snapshot's: its chunks so far.
    snapshot_scan: Option<Vec<leakhunt_format::reach::Outcome>>,
    /// ...made as the program began to exit (`pre-exit`), not at a snapshot.
    pre_exit_scan: bool,
    /// Called after epoch boundaries close (the live view of `leakhunt run --live`).
    pub on_epoch: Option<EpochHook>,
    /// Called with each module the process loads, as its record is read (`leakhunt run` loads
    /// their debug information while the program runs).
    pub on_module: Option<ModuleHook>,
    /// Called once per library that holds the outermost frame of a stack (a thread's start,
    /// `start_thread`/`clone3` in libc, or a stack cut at the frame limit): frames the report
    /// names from its debug information, which `leakhunt run` then loads while the program runs.
    /// (A main thread's stack ends in the executable, and the frames below `main` are not looked
    /// up.)
    pub on_outer_module: Option<ModuleHook>,
    outer_modules: rustc_hash::FxHashSet<u32>,
    /// Answers the stream's requests for a heap scan (`leakhunt run`).
    pub on_reach: Option<ReachHook>,
    /// The heap scan's outcome, once its records were read.
    pub reach: Option<Reach>,
    /// Set while the stream's last record says how the process ended (read by `leakhunt run`'s
    /// socket reader: such a stream needs no waiting for more at its end).
    pub ended: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The process's latest command line, when it renamed itself after the header was written.
    pub title: Option<Vec<String>>,
    /// Why the recording is known to be incomplete, beyond what the trace itself shows (set by
    /// `leakhunt run`, which saw the process end).
    pub incomplete: Option<String>,
    /// What the frees said of the blocks they held (`--orphans`).
    pub orphans: Option<Box<crate::orphans::Orphans>>,
    records: u64,
    /// Sees every applied event and record (`leakhunt run -o`, `leakhunt pack`).
    pub observer: Option<Box<dyn Observer>>,
    /// The model of a packed trace's `ORDERED` records, replayed across them.
    unpacker: Option<Box<leakhunt_format::pack::Unpacker>>,
    /// A packed trace's last record was read.
    packed_whole: bool,
}

impl Process {
    pub fn new() -> Process {
        Process {
            growth: Series::new(),
            ..Process::default()
        }
    }

    pub fn pid(&self) -> u32 {
        self.header.as_ref().map_or(0, |h| h.pid)
    }

    /// Reads a whole stream. A truncated tail is kept as a warning; any other decode error is
    /// returned (after everything before it was applied).
    pub fn read_stream(src: impl Read) -> (Process, Option<DecodeError>) {
        let (mut p, err) = Process::read_stream_open(src);
        p.finish();
        (p, err)
    }

    /// As [`Process::read_stream`], counting per stack the blocks live at the boundary of index
    /// `b` that were allocated after the boundary of index `a` (into `probe_born`), and the
    /// allocations made between the two (into `probe_allocs`).
    pub fn read_stream_probe(src: impl Read, a: u32, b: u32) -> (Process, Option<DecodeError>) {
        let mut p = Process::new();
        p.probe = Some((a, b));
        let (mut p, err) = Process::read_stream_into(p, src, &mut |_| {});
        p.finish();
        (p, err)
    }

    /// As [`Process::read_stream`], but leaves events whose predecessors never came buffered, so
    /// that events recovered from elsewhere (ring files) can still fill the gaps; call
    /// [`Process::finish`] after.
    pub fn read_stream_open(src: impl Read) -> (Process, Option<DecodeError>) {
        Process::read_stream_into(Process::new(), src, &mut |_| {})
    }

    /// As [`Process::read_stream_progress`], into `p` (prepared by the caller, e.g. with
    /// `fork_children`).
    pub fn read_stream_prepared(
        p: Process,
        src: impl Read,
        progress: &mut dyn FnMut(u64),
    ) -> (Process, Option<DecodeError>) {
        let (mut p, err) = Process::read_stream_into(p, src, progress);
        p.finish();
        (p, err)
    }

    /// The pids of the fork children among `traces` (their `FORKED` record, right after the
    /// header): what [`Process::fork_children`] keeps fork points for.
    pub fn forked_children<R: Read>(traces: impl Iterator<Item = R>) -> rustc_hash::FxHashSet<u32> {
        let mut out = rustc_hash::FxHashSet::default();
        for t in traces {
            let Ok(mut r) = crate::pack::reader(t) else {
                continue;
            };
            let mut pid = None;
            for _ in 0..16 {
                match r.next_record() {
                    Ok(Some(Record::Header(h))) => pid = Some(h.pid),
                    Ok(Some(Record::Forked { .. })) => {
                        out.extend(pid);
                        break;
                    }
                    Ok(Some(
                        Record::Batch { .. } | Record::Events { .. } | Record::Ordered { .. },
                    ))
                    | Ok(None)
                    | Err(_) => break,
                    Ok(Some(_)) => {}
                }
            }
        }
        out
    }

    /// As [`Process::read_stream`], calling `progress` with the byte offset reached after each
    /// record.
    pub fn read_stream_progress(
        src: impl Read,
        progress: &mut dyn FnMut(u64),
    ) -> (Process, Option<DecodeError>) {
        let (mut p, err) = Process::read_stream_into(Process::new(), src, progress);
        p.finish();
        (p, err)
    }

    /// Reads a stream into `p` (prepared by the caller, e.g. with an `on_epoch` hook), leaving
    /// events whose predecessors never came buffered as [`Process::read_stream_open`] does.
    pub fn read_stream_with(p: Process, src: impl Read) -> (Process, Option<DecodeError>) {
        Process::read_stream_into(p, src, &mut |_| {})
    }

    fn read_stream_into(
        mut p: Process,
        src: impl Read,
        progress: &mut dyn FnMut(u64),
    ) -> (Process, Option<DecodeError>) {
        let mut r = match crate::pack::reader(src) {
            Ok(r) => r,
            Err(e) => return (p, Some(e)),
        };
        r.keep_raw(p.observer.is_some());
        let err = loop {
            let at = r.offset();
            match r.next_record() {
                Ok(Some(rec)) => {
                    if let Some(o) = &mut p.observer {
                        o.record(r.raw_tag(), r.raw());
                    }
                    if let Err(e) = p.apply(rec, at) {
                        break Some(e);
                    }
                    p.complete_len = r.offset();
                    progress(p.complete_len);
                }
                Ok(None) if r.is_packed() && !p.packed_whole => {
                    break Some(DecodeError::Corrupt {
                        offset: r.offset(),
                        what: "the packed trace ends before its last record: it was cut short"
                            .into(),
                    })
                }
                Ok(None) => break None,
                Err(e) if e.is_truncation() => {
                    p.truncated = Some(e.to_string());
                    break None;
                }
                Err(e) => break Some(e),
            }
        };
        (p, err)
    }

    /// Applies the slots of a batch recovered from a ring file after the process died: events
    /// the stream already delivered are skipped (the ring still held them), the others are
    /// applied in sequence order like any. Returns how many events were new.
    pub fn recover(&mut self, tid: u32, slots: &[u8]) -> Result<u64, String> {
        let mut n = 0;
        // A `CONTENT` record goes with the `FREE` after it: both new, or both skipped.
        let mut content = None;
        // The numbers waiting now, and those this batch adds (a ring may repeat a number).
        let mut waiting = self.pending.seqs();
        for (i, s) in SlotIter::new(slots).enumerate() {
            let s = s.map_err(|e| format!("slot {i}: {}", e.what))?;
            let seq = match &s {
                SlotRecord::Alloc { seq, .. }
                | SlotRecord::Free { seq, .. }
                | SlotRecord::Nop { seq }
                | SlotRecord::Fork { seq, .. }
                | SlotRecord::Pairs { seq, .. } => Some(*seq),
                SlotRecord::Stack { .. } => None,
                SlotRecord::Content { .. } => {
                    content = Some(s);
                    continue;
                }
            };
            if seq.is_some_and(|q| {
                q < self.next_seq || waiting.contains(&q) || self.early_nops.has(q, self.next_seq)
            }) {
                content = None;
                continue;
            }
            if let Some(c) = content.take() {
                self.slot(tid, c, 0).map_err(|e| e.to_string())?;
            }
            self.slot(tid, s, 0).map_err(|e| e.to_string())?;
            if let Some(q) = seq {
                waiting.insert(q);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies one slot record of a batch starting at byte `offset`. A stack already known keeps
    /// its first definition (a recovered ring may repeat it).
    fn slot(&mut self, tid: u32, s: SlotRecord, offset: u64) -> Result<(), DecodeError> {
        match s {
            SlotRecord::Stack {
                id,
                gen,
                reason,
                frames,
            } => {
                if let std::collections::hash_map::Entry::Vacant(v) = self.stacks.entry(id) {
                    let s = v.insert(Stack {
                        gen,
                        reason,
                        frames,
                    });
                    if let Some(o) = &mut self.observer {
                        o.stack(id, s);
                    }
                    self.note_outer_module(id);
                }
                Ok(())
            }
            SlotRecord::Alloc {
                func,
                stack,
                seq,
                addr,
                size,
            } => {
                if size > MAX_ALLOC_SIZE {
                    return Err(DecodeError::Corrupt {
                        offset,
                        what: format!("an allocation of {size} bytes is beyond any address space"),
                    });
                }
                let func = func as u8;
                self.event(
                    tid,
                    seq,
                    Ev::Alloc {
                        addr,
                        size,
                        stack,
                        func,
                    },
                    offset,
                )
            }
            SlotRecord::Content {
                addr,
                free_stack,
                pairs,
            } => {
                self.content(tid, addr, free_stack, &pairs);
                Ok(())
            }
            SlotRecord::Free { seq, addr, .. } => {
                self.attach_content(tid, seq, addr);
                self.event(tid, seq, Ev::Free { addr }, offset)
            }
            SlotRecord::Nop { seq } => self.event(tid, seq, Ev::Nop, offset),
            SlotRecord::Fork { seq, child } => self.event(tid, seq, Ev::Fork { child }, offset),
            SlotRecord::Pairs { count, bytes, .. }
                if bytes > count.saturating_mul(MAX_ALLOC_SIZE) =>
            {
                Err(DecodeError::Corrupt {
                    offset,
                    what: format!(
                        "{count} allocations of {bytes} bytes in all are beyond any address space"
                    ),
                })
            }
            SlotRecord::Pairs {
                seq,
                stack,
                count,
                bytes,
            } => self.event(
                tid,
                seq,
                Ev::Pairs {
                    stack,
                    count,
                    bytes,
                },
                offset,
            ),
        }
    }

    /// A fork child starts with its parent's heap: the blocks live at the fork point that the
    /// child did not free become the child's, with their parent stacks. Returns (blocks, bytes).
    fn inherit(&mut self, at_fork: &LiveSet, parent_stacks: &FxHashMap<u32, Stack>) -> (u64, u64) {
        let (mut blocks, mut bytes) = (0, 0);
        let mut freed = 0;
        for (addr, live) in at_fork.iter() {
            if self.unmatched.contains(&addr) {
                freed += 1;
                continue;
            }
            if self.live.contains_key(addr) {
                continue;
            }
            // Parent stack ids are imported above the child's own.
            let id = INHERITED_STACK | live.stack;
            if let Some(st) = parent_stacks.get(&live.stack) {
                self.stacks.entry(id).or_insert_with(|| st.clone());
            }
            self.live.insert(
                addr,
                Live {
                    size: live.size,
                    stack: id,
                    born: 0,
                },
            );
            // Read after the scan's outcome (a kept trace): the scan knew this block if it
            // counted more blocks than this reader had; its class is its entry, or reachable.
            if let Some(r) = &mut self.reach {
                if let Some(c) = r.unknown.remove(&addr) {
                    r.entries.insert(addr, c);
                } else if r.blocks <= r.known_at_scan {
                    r.unscanned.insert(addr);
                }
            }
            blocks += 1;
            bytes += live.size;
        }
        // Frees of inherited blocks matched after all.
        self.totals.unknown_frees = self.totals.unknown_frees.saturating_sub(freed);
        (blocks, bytes)
    }

    /// A fork child's heap scan is near: takes its parent's blocks at the fork from the run's
    /// book, waiting a little for the parent's stream to reach its fork point.
    fn inherit_from_book(&mut self) {
        let (Some(parent), Some(book), Some(pid)) = (
            self.forked_from,
            self.fork_book.clone(),
            self.header.as_ref().map(|h| h.pid),
        ) else {
            return;
        };
        if self.inherited {
            return;
        }
        let Some((live, stacks)) = book.wait(pid, std::time::Duration::from_secs(2)) else {
            return;
        };
        self.inherited = true;
        let (blocks, bytes) = self.inherit(&live, &stacks);
        self.note_inherited(parent, blocks, bytes);
    }

    fn note_inherited(&mut self, parent: u32, blocks: u64, bytes: u64) {
        if blocks > 0 {
            self.warnings.push(format!(
                "{bytes} bytes in {blocks} block{} were inherited from the parent (pid {parent}) at fork and are counted here",
                if blocks == 1 { "" } else { "s" }
            ));
        }
    }

    /// Gives every fork child among `procs` the heap it inherited from its parent among them
    /// (from the run's fork book, for one that did not take it before its scan).
    pub fn link_forks(procs: &mut [&mut Process]) {
        for i in 0..procs.len() {
            let (pid, ppid) = match (&procs[i].header, procs[i].forked_from) {
                (Some(h), Some(parent)) if h.ppid == parent && !procs[i].inherited => {
                    (h.pid, h.ppid)
                }
                _ => continue,
            };
            if let Some((live, stacks)) = procs[i].fork_book.clone().and_then(|b| b.take(pid)) {
                procs[i].inherited = true;
                let (blocks, bytes) = procs[i].inherit(&live, &stacks);
                procs[i].note_inherited(ppid, blocks, bytes);
                continue;
            }
            let Some(j) = (0..procs.len())
                .find(|&j| j != i && procs[j].pid() == ppid && procs[j].forks.contains_key(&pid))
            else {
                procs[i].warnings.push(format!(
                    "forked from pid {ppid}, whose fork point is not here (its trace was not given, or the run did not keep it): the blocks it inherited are not counted, and frees of them are unmatched"
                ));
                continue;
            };
            let at_fork = procs[j].forks[&pid].clone();
            let stacks = procs[j].stacks.clone();
            procs[i].inherited = true;
            let (blocks, bytes) = procs[i].inherit(&at_fork, &stacks);
            procs[i].note_inherited(ppid, blocks, bytes);
        }
    }

    fn set_ended(&self, v: bool) {
        if let Some(f) = &self.ended {
            f.store(v, std::sync::atomic::Ordering::Release);
        }
    }

    /// Applies one record, which starts at byte `at` of the stream.
    pub fn apply(&mut self, rec: Record, at: u64) -> Result<(), DecodeError> {
        self.records += 1;
        if self.exit == Some(ExitKind::Exec)
            && !matches!(
                rec,
                Record::Stats(_) | Record::Title(_) | Record::EndNote { .. }
            )
        {
            // Recording went on after an exec announcement: that exec failed.
            self.exit = None;
            self.set_ended(false);
        }
        match rec {
            Record::Header(h) => {
                if self.header.is_some() {
                    self.warnings
                        .push("a second header record was ignored".into());
                } else {
                    self.header = Some(h);
                }
            }
            Record::Module(m) => {
                let id = m.id as usize;
                if id > MAX_MODULE_ID {
                    return Err(DecodeError::Corrupt {
                        offset: at,
                        what: format!(
                            "module id {id} is beyond any real process's {MAX_MODULE_ID}"
                        ),
                    });
                }
                if self.modules.len() <= id {
                    self.modules.resize_with(id + 1, || ModuleEntry {
                        module: Module {
                            id: u32::MAX,
                            gen: 0,
                            bias: 0,
                            path: String::new(),
                            build_id: vec![],
                            ranges: vec![],
                        },
                        unload_gen: None,
                    });
                }
                if let Some(hook) = &mut self.on_module {
                    hook(&m);
                }
                self.modules[id] = ModuleEntry {
                    module: m,
                    unload_gen: None,
                };
            }
            Record::ModuleUnload { id, gen } => {
                if let Some(m) = self.modules.get_mut(id as usize) {
                    m.unload_gen = Some(gen);
                }
            }
            Record::Batch { tid, offset, slots } => self.batch(tid, &slots, offset)?,
            Record::Events {
                tid,
                offset,
                count,
                body,
            } => {
                let mut sink = Apply {
                    p: self,
                    tid,
                    offset,
                    error: None,
                    ahead: Ahead::new(),
                };
                let r = compact::decode(&body, count as usize, &mut sink);
                sink.ahead.flush(sink.p);
                if let Err(e) = r {
                    return Err(sink.error.take().unwrap_or(DecodeError::Corrupt {
                        offset: offset + e.at as u64,
                        what: format!("events record: {}", e.what),
                    }));
                }
            }
            Record::Exit(k) => {
                self.exit = Some(k);
                self.set_ended(true);
            }
            Record::FrameName {
                addr,
                line,
                function,
                file,
            } => {
                self.frame_names.insert(addr, (function, file, line));
            }
            Record::Forked { parent, .. } => {
                self.forked_from = Some(parent);
                if let (Some(book), Some(h)) = (&self.fork_book, &self.header) {
                    book.streaming(h.pid);
                }
            }
            Record::Title(mut t) => {
                // A process that writes its title over its argv pads it with NULs.
                let same = self.header.as_ref().is_some_and(|h| h.argv == t);
                while t.last().is_some_and(|a| a.is_empty()) {
                    t.pop();
                }
                self.title = (!same && !t.is_empty()).then_some(t);
            }
            Record::Epoch(e) => {
                self.growth.push(e);
                self.reach(self.next_seq);
            }
            Record::Snapshot { epoch, name } => {
                self.growth.pin(epoch);
                self.snapshots.push((name, epoch));
            }
            Record::Stats(v) => self.stats.extend(v),
            Record::Reach(r) => {
                // The scan reads the child's heap, which holds what it inherited: those blocks
                // must be in the live set by then (the parent's stream may lag behind).
                if r.phase == leakhunt_format::reach::READY {
                    self.inherit_from_book();
                }
                if r.snapshot && r.phase == leakhunt_format::reach::ASK {
                    self.snapshot_scan = Some(Vec::new());
                    self.pre_exit_scan = r.pre_exit;
                }
                if let Some(mut hook) = self.on_reach.take() {
                    hook(self, &r);
                    self.on_reach = Some(hook);
                }
            }
            Record::ReachResult(o) if self.snapshot_scan.is_some() => self.snapshot_result(o),
            Record::ReachResult(o) => self.reach_result(o),
            Record::Warning(w) => self.warnings.push(w),
            Record::Ordered { offset, body } => {
                let mut un = self.unpacker.take().unwrap_or_default();
                let mut sink = Apply {
                    p: self,
                    tid: PACKED_TID,
                    offset,
                    error: None,
                    ahead: Ahead::new(),
                };
                let r = un.decode(&body, &mut sink);
                sink.ahead.flush(sink.p);
                let error = sink.error.take();
                self.unpacker = Some(un);
                if let Err(e) = r {
                    return Err(error.unwrap_or(DecodeError::Corrupt {
                        offset: offset + e.at as u64,
                        what: format!("ordered events record: {}", e.what),
                    }));
                }
            }
            Record::EndNote {
                kind: leakhunt_format::pack::END_CORRUPT,
                message,
            } => {
                return Err(DecodeError::Corrupt {
                    offset: at,
                    what: format!(
                        "the trace was packed from a stream that stopped at an error: {message}"
                    ),
                })
            }
            Record::EndNote {
                kind: leakhunt_format::pack::END_WHOLE,
                ..
            } => self.packed_whole = true,
            Record::EndNote { message, .. } => self.truncated = Some(message),
            Record::Unknown { .. } => {}
        }
        Ok(())
    }

    /// Applies a batch's slots. Allocations and frees that come in sequence order (nearly all of
    /// them) are applied straight from their bytes; anything else goes through the full decoder.
    fn batch(&mut self, tid: u32, data: &[u8], offset: u64) -> Result<(), DecodeError> {
        let mut ahead = Ahead::new();
        let r = self.batch_ahead(tid, data, offset, &mut ahead);
        ahead.flush(self);
        r
    }

    fn batch_ahead(
        &mut self,
        tid: u32,
        data: &[u8],
        offset: u64,
        ahead: &mut Ahead,
    ) -> Result<(), DecodeError> {
        let mut pos = 0;
        while let Some(s) = data.get(pos..pos + slot::SLOT_LEN) {
            let word = |at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or([0; 8]));
            if self.nothing_waits() && word(8) == self.next_seq {
                match s[0] {
                    slot::KIND_ALLOC
                        if AllocFn::from_u8(s[1]).is_some() && word(24) <= MAX_ALLOC_SIZE =>
                    {
                        let stack = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
                        let op = Op::Alloc {
                            addr: word(16),
                            size: word(24),
                            stack,
                            func: s[1],
                        };
                        ahead.push(self, op);
                        pos += slot::SLOT_LEN;
                        continue;
                    }
                    slot::KIND_FREE if FreeFn::from_u8(s[1]).is_some() => {
                        self.attach_content(tid, word(8), word(16));
                        ahead.push(self, Op::Free { addr: word(16) });
                        pos += slot::SLOT_LEN;
                        continue;
                    }
                    _ => {}
                }
            }
            ahead.flush(self);
            // One record (a stack record spans several slots) through the full decoder.
            let mut it = SlotIter::new(&data[pos..]);
            let Some(rec) = it.next() else { break };
            let rec = rec.map_err(|e| DecodeError::Corrupt {
                offset: offset + (pos + e.at) as u64,
                what: format!("batch slot {}: {}", (pos + e.at) / slot::SLOT_LEN, e.what),
            })?;
            pos += it.consumed();
            self.slot(tid, rec, offset)?;
        }
        if pos < data.len() {
            let at = pos;
            return Err(DecodeError::Corrupt {
                offset: offset + at as u64,
                what: format!(
                    "batch slot {}: partial slot of {} bytes",
                    at / slot::SLOT_LEN,
                    data.len() - at
                ),
            });
        }
        Ok(())
    }

    /// Buffers an event until every lower sequence number has been applied.
    fn event(&mut self, tid: u32, seq: u64, ev: Ev, offset: u64) -> Result<(), DecodeError> {
        let twice = |seq| DecodeError::Corrupt {
            offset,
            what: format!("event sequence number {seq} appears twice"),
        };
        if seq < self.next_seq || self.early_nops.has(seq, self.next_seq) {
            return Err(twice(seq));
        }
        if seq != self.next_seq {
            if matches!(ev, Ev::Nop) {
                match self.early_nops.put(seq, self.next_seq) {
                    Some(true) => return Ok(()),
                    Some(false) => return Err(twice(seq)),
                    None => {}
                }
            }
            self.pending.push(tid, seq, ev);
            return Ok(());
        }
        // In order: apply it and what waited for it.
        self.apply_event(ev);
        self.bump();
        loop {
            if self.early_nops.take(self.next_seq) {
                self.apply_event(Ev::Nop);
                self.bump();
                continue;
            }
            let Some(first) = self.pending.first() else {
                break;
            };
            if first != self.next_seq {
                if first < self.next_seq {
                    return Err(twice(first));
                }
                break;
            }
            if let Some((_, ev)) = self.pending.pop() {
                self.apply_event(ev);
                self.bump();
            }
        }
        Ok(())
    }

    /// No event waits for a lower number: the next one in order may be applied at once.
    #[inline]
    fn nothing_waits(&self) -> bool {
        self.pending.is_empty() && self.early_nops.is_empty()
    }

    #[inline]
    fn apply_op(&mut self, op: Op) {
        match op {
            Op::Alloc {
                addr,
                size,
                stack,
                func,
            } => self.alloc(addr, size, stack, func),
            Op::Free { addr } => self.free(addr),
        }
    }

    #[inline]
    fn alloc(&mut self, addr: u64, size: u64, stack: u32, func: u8) {
        if let Some(o) = &mut self.observer {
            o.alloc(self.next_seq, addr, size, stack, func);
        }
        let i = stack as usize;
        if let Some(f) = self.alloc_fns.get_mut(i) {
            *f = func;
        } else if i < MAX_FN_STACKS {
            self.alloc_fns.resize((i + 1).next_power_of_two(), NO_FN);
            self.alloc_fns[i] = func;
        }
        self.totals.allocs += 1;
        self.totals.bytes_allocated += size;
        let born = self.growth.last_index;
        self.growth.add(stack, size as i64, 1);
        if let Some(r) = &mut self.reach {
            r.entries.remove(&addr);
            r.unscanned.insert(addr);
        }
        if let Some(o) = &mut self.orphans {
            o.alloc(addr);
        }
        if let Some(old) = self.live.insert(addr, Live { size, stack, born }) {
            self.totals.reused_live += 1;
            self.growth.add(old.stack, -(old.size as i64), -1);
        }
    }

    /// A chunk of a snapshot's heap scan: at the last, the kinds of the blocks live then (the
    /// process was held from the scan to here: the live set is the one scanned).
    fn snapshot_result(&mut self, o: leakhunt_format::reach::Outcome) {
        let Some(chunks) = self.snapshot_scan.as_mut() else {
            return;
        };
        let last = o.last;
        chunks.push(o);
        if !last {
            return;
        }
        let chunks = self.snapshot_scan.take().unwrap_or_default();
        let Some(first) = chunks.first() else { return };
        let (snapshot, epoch) = if std::mem::take(&mut self.pre_exit_scan) {
            // As the program began to exit: after every boundary so far.
            (Some("pre-exit".to_string()), self.growth.last_index)
        } else {
            (
                self.snapshots.last().map(|s| s.0.clone()),
                self.snapshots.last().map_or(0, |s| s.1),
            )
        };
        let mut scan = SnapshotScan {
            snapshot,
            epoch,
            unavailable: first.unavailable.then(|| first.note.clone()),
            blocks: first.blocks,
            threads_held: first.threads,
            held_us: first.held_us,
            ..SnapshotScan::default()
        };
        scan.items = chunks
            .iter()
            .flat_map(|c| c.items.iter().copied())
            .collect();
        if scan.unavailable.is_none() {
            let entries: FxHashMap<u64, u8> = chunks
                .iter()
                .flat_map(|c| c.entries.iter().map(|e| (e.addr, e.kind)))
                .collect();
            for (addr, l) in self.live.iter() {
                let k = entries.get(&addr).copied().unwrap_or(0).min(3) as usize;
                scan.kinds[k].0 += l.size;
                scan.kinds[k].1 += 1;
            }
        }
        self.snapshot_scans.push(scan);
    }

    #[inline]
    /// A chunk of the heap scan's outcome: the first classifies every live block as still
    /// reachable, the entries say which are not.
    fn reach_result(&mut self, o: leakhunt_format::reach::Outcome) {
        let live = &self.live;
        let r = match &mut self.reach {
            Some(r) if !r.complete => r,
            _ => self.reach.insert(Reach {
                known_at_scan: live.len() as u64,
                ..Reach::default()
            }),
        };
        if o.unavailable {
            r.unavailable = Some(o.note.clone());
            r.entries.clear();
        }
        r.note = o.note;
        (r.blocks, r.words, r.threads, r.held_us) = (o.blocks, o.words, o.threads, o.held_us);
        r.items.extend(o.items);
        for e in o.entries {
            let c = Class {
                kind: e.kind,
                heuristic: e.heuristic,
                indirect: e.indirect,
            };
            if live.contains_key(e.addr) && !r.unscanned.contains(&e.addr) {
                r.entries.insert(e.addr, c);
            } else {
                r.unknown.insert(e.addr, c);
            }
        }
        r.complete |= o.last;
    }

    fn free(&mut self, addr: u64) {
        if let Some(o) = &mut self.observer {
            o.free(self.next_seq, addr);
        }
        self.totals.frees += 1;
        if let Some(o) = &mut self.orphans {
            let parent = self.live.get(addr).map(|l| (l.size, l.stack));
            o.free(addr, self.next_seq, parent, &self.live);
        }
        if let Some(r) = &mut self.reach {
            r.entries.remove(&addr);
            r.unscanned.remove(&addr);
        }
        match self.live.remove(addr) {
            Some(l) => self.growth.add(l.stack, -(l.size as i64), -1),
            None => {
                self.totals.unknown_frees += 1;
                self.unmatched.insert(addr);
            }
        }
    }

    /// One more sequence number applied: close the epochs it completes.
    #[inline]
    fn bump(&mut self) {
        // Wrapping: a corrupt trace's u64::MAX is counted as lost events later, not a panic.
        self.advance_to(self.next_seq.wrapping_add(1));
    }

    /// Every number below `next` applied: close the epochs that completes.
    #[inline]
    fn advance_to(&mut self, next: u64) {
        self.next_seq = next;
        if next >= self.growth.next_seq {
            self.reach(next);
        }
    }

    /// Closes the boundaries at or below `seq`, taking the diff probe's count at its boundary.
    fn reach(&mut self, seq: u64) {
        let before = self.growth.last_index;
        self.growth.reach(seq);
        let after = self.growth.last_index;
        if after != before {
            if let Some(mut hook) = self.on_epoch.take() {
                hook(self);
                self.on_epoch = Some(hook);
            }
        }
        if let Some((a, b)) = self.probe {
            if before < a && a <= after {
                self.probe_allocs = self
                    .growth
                    .alloc_totals()
                    .map(|(id, n, bytes)| (id, (n, bytes)))
                    .collect();
            }
            if before < b && b <= after {
                // Boundaries closed together saw no event in between: the live set is the
                // same at b.
                for l in self.live.values() {
                    if l.born >= a {
                        *self.probe_born.entry(l.stack).or_default() += 1;
                    }
                }
                let at_a = std::mem::take(&mut self.probe_allocs);
                self.probe_allocs = self
                    .growth
                    .alloc_totals()
                    .filter_map(|(id, n, bytes)| {
                        let (n0, b0) = at_a.get(&id).copied().unwrap_or_default();
                        (n > n0).then(|| (id, (n - n0, bytes.saturating_sub(b0))))
                    })
                    .collect();
            }
        }
    }

    fn apply_event(&mut self, ev: Ev) {
        match ev {
            Ev::Alloc {
                addr,
                size,
                stack,
                func,
            } => self.alloc(addr, size, stack, func),
            Ev::Free { addr } => self.free(addr),
            Ev::Nop => {
                if let Some(o) = &mut self.observer {
                    o.nops(self.next_seq, 1);
                }
            }
            Ev::Fork { child } => {
                if let Some(o) = &mut self.observer {
                    o.fork(self.next_seq, child);
                }
                let live = std::sync::Arc::new(self.live.clone());
                // Under `leakhunt run` the book alone keeps it (and lets it go); a kept trace's
                // reader keeps it for `link_forks`.
                match &self.fork_book {
                    Some(book) => {
                        // The stacks only grow: the last copy serves while no new one came.
                        let stacks = match &self.fork_stacks {
                            Some((n, s)) if *n == self.stacks.len() => s.clone(),
                            _ => {
                                let s = std::sync::Arc::new(self.stacks.clone());
                                self.fork_stacks = Some((self.stacks.len(), s.clone()));
                                s
                            }
                        };
                        book.put(child, (live, stacks))
                    }
                    None if self
                        .fork_children
                        .as_ref()
                        .is_none_or(|c| c.contains(&child)) =>
                    {
                        self.forks.insert(child, live);
                    }
                    None => {}
                }
            }
            Ev::Pairs {
                stack,
                count,
                bytes,
            } => {
                if let Some(o) = &mut self.observer {
                    o.pairs(self.next_seq, stack, count, bytes);
                }
                self.totals.allocs = self.totals.allocs.saturating_add(count);
                self.totals.frees = self.totals.frees.saturating_add(count);
                self.totals.bytes_allocated = self.totals.bytes_allocated.saturating_add(bytes);
                self.growth.add_allocs(stack, count, bytes);
            }
        }
    }

    /// End of stream: apply what is still waiting, counting the sequence numbers that never came.
    pub fn finish(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        let mut early = std::mem::take(&mut self.early_nops);
        loop {
            // The lowest of what waits: an early `NOP` or a queued event.
            let (seq, ev) = match early.first_from(self.next_seq) {
                Some(n) if pending.first().is_none_or(|f| n < f) => {
                    early.take(n);
                    (n, Ev::Nop)
                }
                _ => match pending.pop() {
                    Some(e) => e,
                    None => break,
                },
            };
            if seq < self.next_seq {
                // Two threads' records claimed one sequence number (caught here only when the
                // stream ended before the number came up).
                self.warnings.push(format!(
                    "event sequence number {seq} appears twice; the second was ignored"
                ));
                continue;
            }
            self.gaps += seq - self.next_seq;
            self.reach(seq);
            // The event applied is numbered `seq` (what the orphans and the observer read).
            self.next_seq = seq;
            self.apply_event(ev);
            self.next_seq = seq.wrapping_add(1);
        }
        // Boundaries past the last event (the stream ended, or events were lost).
        self.reach(u64::MAX);
    }

    pub fn events_lost(&self) -> u64 {
        self.gaps
            .max(self.stats.get(&stat::EVENTS_LOST).copied().unwrap_or(0))
    }

    /// Calls `on_outer_module` with the library of stack `id`'s outermost frame, the first time
    /// a stack ends there.
    fn note_outer_module(&mut self, id: u32) {
        if self.on_outer_module.is_none() {
            return;
        }
        let Some(s) = self.stacks.get(&id) else {
            return;
        };
        let Some(m) = s.frames.last().and_then(|&pc| self.module_at(pc, s.gen)) else {
            return;
        };
        if m.id == 0 || self.outer_modules.contains(&m.id) {
            return;
        }
        let m = m.clone();
        self.outer_modules.insert(m.id);
        if let Some(hook) = &mut self.on_outer_module {
            hook(&m);
        }
    }

    /// The module loaded at generation `gen` that contains `addr`.
    pub fn module_at(&self, addr: u64, gen: u32) -> Option<&Module> {
        self.modules
            .iter()
            .filter(|m| m.module.id != u32::MAX)
            .filter(|m| m.module.gen <= gen && m.unload_gen.is_none_or(|u| u > gen))
            .map(|m| &m.module)
            .find(|m| m.ranges.iter().any(|&(s, e)| addr >= s && addr < e))
    }
}

/// Applies the events of a compact `EVENTS` record as they are decoded: in-order allocations
/// and frees straight to the live set, anything else through the same path as slots.
struct Apply<'a> {
    p: &'a mut Process,
    /// The thread whose ring the record drained.
    tid: u32,
    offset: u64,
    /// A decode error from the process (a repeated sequence number), kept as it is.
    error: Option<DecodeError>,
    /// In-order allocations and frees not applied yet (applied before anything else is).
    ahead: Ahead,
}

impl Apply<'_> {
    fn event(&mut self, seq: u64, ev: Ev) -> Result<(), String> {
        self.ahead.flush(self.p);
        self.p.event(self.tid, seq, ev, self.offset).map_err(|e| {
            let s = e.to_string();
            self.error = Some(e);
            s
        })
    }
}

impl Process {
    /// The allocation function of stack `id`'s blocks, when seen.
    pub fn alloc_fn(&self, id: u32) -> Option<AllocFn> {
        AllocFn::from_u8(*self.alloc_fns.get(id as usize)?)
    }
}

impl Process {
    /// Block `addr` is about to be freed at stack `free_stack` (`leakhunt run --orphans`,
    /// `LEAKHUNT_ORPHANS=1`) still holding these heap-looking words, (offset in the block, word):
    /// a `CONTENT` record of thread `tid`'s stream, decoded before the `FREE` that follows it
    /// there ([`Process::attach_content`] ties them by that `FREE`'s sequence number, and the
    /// words are applied with it, in sequence order).
    pub fn content(&mut self, tid: u32, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) {
        if let Some(o) = &mut self.observer {
            o.content(tid, addr, free_stack, pairs);
        }
        self.orphans
            .get_or_insert_with(Default::default)
            .stage(tid, addr, free_stack, pairs);
    }

    /// Thread `tid`'s `FREE` of `addr`, sequence number `seq`, was decoded.
    fn attach_content(&mut self, tid: u32, seq: u64, addr: u64) {
        if let Some(o) = &mut self.observer {
            o.attach(tid, seq, addr);
        }
        if let Some(o) = &mut self.orphans {
            o.attach(tid, seq, addr);
        }
    }
}

impl compact::Sink for Apply<'_> {
    #[inline]
    fn alloc(
        &mut self,
        func: u8,
        stack: u32,
        seq: u64,
        addr: u64,
        size: u64,
    ) -> Result<(), String> {
        if AllocFn::from_u8(func).is_none() {
            return Err(format!("unknown allocation function {func}"));
        }
        if size > MAX_ALLOC_SIZE {
            return Err(format!(
                "an allocation of {size} bytes is beyond any address space"
            ));
        }
        if self.p.nothing_waits() && seq == self.p.next_seq {
            let op = Op::Alloc {
                addr,
                size,
                stack,
                func,
            };
            self.ahead.push(self.p, op);
            return Ok(());
        }
        self.event(
            seq,
            Ev::Alloc {
                addr,
                size,
                stack,
                func,
            },
        )
    }

    #[inline]
    fn free(&mut self, func: u8, seq: u64, addr: u64) -> Result<(), String> {
        if FreeFn::from_u8(func).is_none() {
            return Err(format!("unknown free function {func}"));
        }
        self.p.attach_content(self.tid, seq, addr);
        if self.p.nothing_waits() && seq == self.p.next_seq {
            self.ahead.push(self.p, Op::Free { addr });
            return Ok(());
        }
        self.event(seq, Ev::Free { addr })
    }

    fn nop(&mut self, seq: u64) -> Result<(), String> {
        self.event(seq, Ev::Nop)
    }

    fn fork(&mut self, seq: u64, child: u32) -> Result<(), String> {
        self.event(seq, Ev::Fork { child })
    }

    fn content(&mut self, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) -> Result<(), String> {
        self.ahead.flush(self.p);
        self.p.content(self.tid, addr, free_stack, pairs);
        Ok(())
    }

    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) -> Result<(), String> {
        if bytes > count.saturating_mul(MAX_ALLOC_SIZE) {
            return Err(format!(
                "{count} allocations of {bytes} bytes in all are beyond any address space"
            ));
        }
        self.event(
            seq,
            Ev::Pairs {
                stack,
                count,
                bytes,
            },
        )
    }

    #[inline]
    fn skip(&mut self, seq: u64, count: u64) -> Result<(), String> {
        let Some(end) = seq.checked_add(count) else {
            return Err(format!("sequence numbers {seq} + {count} overflow"));
        };
        self.ahead.flush(self.p);
        if self.p.nothing_waits() && seq == self.p.next_seq {
            // In order: nothing to apply, only boundaries to close on the way.
            if let Some(o) = &mut self.p.observer {
                o.nops(seq, count);
            }
            self.p.advance_to(end);
            return Ok(());
        }
        for i in 0..count {
            self.event(seq + i, Ev::Nop)?;
        }
        Ok(())
    }

    fn stack(&mut self, id: u32, gen: u32, reason: u8, frames: &[u64]) -> Result<(), String> {
        let reason =
            StopReason::from_u8(reason).ok_or(format!("unknown unwind stop reason {reason}"))?;
        self.ahead.flush(self.p);
        if let std::collections::hash_map::Entry::Vacant(v) = self.p.stacks.entry(id) {
            let s = v.insert(Stack {
                gen,
                reason,
                frames: frames.to_vec(),
            });
            if let Some(o) = &mut self.p.observer {
                o.stack(id, s);
            }
            self.p.note_outer_module(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakhunt_format::encode;

    fn stream(batches: &[(u32, Vec<slot::Slot>)]) -> Vec<u8> {
        let mut out = encode::preamble().to_vec();
        for (tid, slots) in batches {
            let bytes: Vec<u8> = slots.iter().flatten().copied().collect();
            encode::batch(*tid, &bytes, &mut out);
        }
        out
    }

    #[test]
    fn free_and_reuse_across_threads_is_ordered_by_sequence() {
        // Thread 2 frees 0x10 (seq 1) and thread 3 gets 0x10 back (seq 2), but thread 3's batch
        // arrives first: the block must stay live.
        let data = stream(&[
            (1, vec![slot::alloc(AllocFn::Malloc, 0, 0, 0x10, 8)]),
            (3, vec![slot::alloc(AllocFn::Malloc, 0, 2, 0x10, 16)]),
            (2, vec![slot::free(leakhunt_format::FreeFn::Free, 1, 0x10)]),
        ]);
        let (p, err) = Process::read_stream(&data[..]);
        assert!(err.is_none());
        assert_eq!(p.live.len(), 1);
        assert_eq!(p.live.get(0x10).map(|l| l.size).unwrap_or(0), 16);
        assert_eq!((p.totals.allocs, p.totals.frees, p.gaps), (2, 1, 0));
    }

    /// `on_outer_module` hears of a library once, the first time a stack ends in it (a thread's
    /// start), never of the executable (where a main thread's stack ends), in both encodings.
    #[test]
    fn a_library_where_stacks_end_is_announced_once() {
        use leakhunt_format::StopReason;
        let module = |id: u32, path: &str, at: u64| encode::Module {
            id,
            gen: 0,
            bias: 0,
            path: path.into(),
            build_id: vec![id as u8],
            ranges: vec![(at, at + 0x1000)],
        };
        for compact in [false, true] {
            let mut data = encode::preamble().to_vec();
            encode::module(&module(0, "/bin/prog", 0x1000), &mut data);
            encode::module(&module(1, "/lib/libc.so.6", 0x8000), &mut data);
            // Stacks 1 and 2 end in libc, stack 3 in the executable.
            let mut slots = vec![];
            for (id, frames) in [
                (1u32, vec![0x1010u64, 0x8010]),
                (2, vec![0x1020, 0x8020]),
                (3, vec![0x8030, 0x1030]),
            ] {
                slots.extend_from_slice(&slot::stack_header(
                    id,
                    0,
                    StopReason::End,
                    frames.len() as u16,
                ));
                slots.extend_from_slice(&slot::frames(&frames));
            }
            if compact {
                encode::events(1, &slots, &mut data);
            } else {
                encode::batch(1, &slots, &mut data);
            }
            let heard = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
            let mut p = Process::new();
            let h = heard.clone();
            p.on_outer_module = Some(Box::new(move |m: &encode::Module| {
                h.lock().unwrap().push(m.path.clone())
            }));
            let (p, err) = Process::read_stream_with(p, &data[..]);
            assert!(err.is_none(), "{err:?}");
            assert_eq!(p.stacks.len(), 3);
            assert_eq!(
                *heard.lock().unwrap(),
                ["/lib/libc.so.6"],
                "compact: {compact}"
            );
        }
    }

    #[test]
    fn compact_events_records_read_like_batches() {
        // The same streams as above and below, in events records.
        let batches = [
            (1, vec![slot::alloc(AllocFn::Malloc, 0, 0, 0x10, 8)]),
            (3, vec![slot::alloc(AllocFn::Malloc, 0, 2, 0x10, 16)]),
            (2, vec![slot::free(leakhunt_format::FreeFn::Free, 1, 0x10)]),
        ];
        let mut data = encode::preamble().to_vec();
        for (tid, slots) in &batches {
            let bytes: Vec<u8> = slots.iter().flatten().copied().collect();
            encode::events(*tid, &bytes, &mut data);
        }
        assert!(
            data.len() < stream(&batches).len(),
            "compact records are smaller"
        );
        let (p, err) = Process::read_stream(&data[..]);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(p.live.get(0x10).map(|l| l.size).unwrap_or(0), 16);
        assert_eq!((p.totals.allocs, p.totals.frees, p.gaps), (2, 1, 0));

        let mut data = encode::preamble().to_vec();
        let twice: Vec<u8> = [slot::nop(0), slot::nop(0)].concat();
        encode::events(1, &twice, &mut data);
        let (_, err) = Process::read_stream(&data[..]);
        assert!(err.unwrap().to_string().contains("appears twice"));
    }

    #[test]
    fn missing_sequence_numbers_are_counted_as_lost() {
        let data = stream(&[(
            1,
            vec![slot::alloc(AllocFn::Malloc, 0, 0, 0x10, 8), slot::nop(3)],
        )]);
        let (p, _) = Process::read_stream(&data[..]);
        assert_eq!(p.gaps, 2);
        assert_eq!(p.events_lost(), 2);
    }

    #[test]
    fn sizes_beyond_any_address_space_are_corruption() {
        for f in [encode::batch, encode::events] {
            let mut data = encode::preamble().to_vec();
            let s = slot::alloc(AllocFn::Malloc, 0, 0, 0x10, 1 << 63);
            f(1, &s, &mut data);
            let (p, err) = Process::read_stream(&data[..]);
            assert!(
                err.unwrap()
                    .to_string()
                    .contains("beyond any address space"),
                "no wrapped totals"
            );
            assert_eq!(p.totals.bytes_allocated, 0);
        }
    }

    #[test]
    fn duplicate_sequence_is_corruption() {
        let data = stream(&[(1, vec![slot::nop(0), slot::nop(0)])]);
        let (_, err) = Process::read_stream(&data[..]);
        assert!(err.unwrap().to_string().contains("appears twice"));
    }

    #[test]
    fn interleaved_threads_merge_in_sequence_order() {
        // Two threads whose events alternate, each thread's batch arriving whole: thread 1's
        // allocations wait for thread 2's frees of the same addresses, and an address freed by
        // one thread is reused by the other only after.
        let mut a = vec![];
        let mut b = vec![];
        for i in 0..100u64 {
            a.push(slot::alloc(
                AllocFn::Malloc,
                0,
                2 * i,
                0x1000 + 16 * (i % 4),
                8,
            ));
            b.push(slot::free(
                leakhunt_format::FreeFn::Free,
                2 * i + 1,
                0x1000 + 16 * (i % 4),
            ));
        }
        let data = stream(&[(1, a), (2, b)]);
        let (p, err) = Process::read_stream(&data[..]);
        assert!(err.is_none(), "{err:?}");
        assert!(
            p.live.is_empty(),
            "every block was freed after its allocation"
        );
        assert_eq!((p.totals.allocs, p.totals.frees, p.gaps), (100, 100, 0));
        assert_eq!(p.totals.unknown_frees, 0);
    }

    #[test]
    fn a_sequence_number_claimed_by_two_threads_is_corruption() {
        let data = stream(&[
            (1, vec![slot::nop(1)]),
            (2, vec![slot::nop(1)]),
            (3, vec![slot::nop(0), slot::nop(2)]),
        ]);
        let (_, err) = Process::read_stream(&data[..]);
        assert!(err.unwrap().to_string().contains("number 1 appears twice"));
    }

    #[test]
    fn a_thread_id_reused_out_of_order_still_merges() {
        // Records of one thread id whose sequence numbers go back (a later thread with a reused
        // id): still applied in sequence order.
        let data = stream(&[
            (1, vec![slot::free(leakhunt_format::FreeFn::Free, 3, 0x10)]),
            (
                1,
                vec![slot::alloc(AllocFn::Malloc, 0, 1, 0x10, 8), slot::nop(2)],
            ),
            (2, vec![slot::nop(0)]),
        ]);
        let (p, err) = Process::read_stream(&data[..]);
        assert!(err.is_none(), "{err:?}");
        assert!(p.live.is_empty());
        assert_eq!((p.totals.allocs, p.totals.frees, p.gaps), (1, 1, 0));
    }

    /// A trace of random allocations and frees by `threads` threads (1 or 2; with 2, some frees
    /// cross threads), some of blocks never seen, with epoch boundaries, written once event by
    /// event and once with the pairs the writer elides from every batch. Like any allocator's,
    /// it never hands out a live address.
    fn random_traces(seed: u64, threads: u64) -> (Vec<u8>, Vec<u8>, usize) {
        use leakhunt_format::compact::{self, Group, PairScratch};
        use leakhunt_format::{Epoch, StopReason};
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut slots: [Vec<u8>; 2] = [vec![], vec![]];
        // Stacks 1-3 for thread 1, 4-6 for thread 2.
        for (t, s) in slots.iter_mut().enumerate() {
            for k in 1..=3u32 {
                let id = t as u32 * 3 + k;
                s.extend_from_slice(&slot::stack_header(id, 0, StopReason::End, 1));
                s.extend_from_slice(&slot::frames(&[0x1000 * id as u64]));
            }
        }
        let mut live: Vec<(u64, usize)> = vec![];
        let mut bounds = vec![];
        let mut records: Vec<(usize, usize, usize)> = vec![]; // (thread, from, to) byte ranges
        let mut from = [0usize; 2];
        let mut t = 0usize;
        for seq in 0..4000u64 {
            // Threads take turns in bursts, as busy threads on few cores do.
            if next(20) == 0 {
                t = next(threads) as usize;
            }
            let r = next(100);
            let addr = 0x10_0000 + 16 * next(300);
            let s = if (r < 45 || live.is_empty()) && !live.iter().any(|l| l.0 == addr) {
                let stack = t as u32 * 3 + 1 + next(3) as u32;
                let f = [AllocFn::Malloc, AllocFn::Calloc, AllocFn::New][next(3) as usize];
                live.push((addr, t));
                slot::alloc(f, stack, seq, addr, 1 + next(500))
            } else if r < 97 && !live.is_empty() {
                // Mostly the newest blocks: short lives, as in a busy program.
                let i = live.len() - 1 - next(live.len().min(20) as u64) as usize;
                let (addr, _) = live.remove(i);
                let f = [FreeFn::Free, FreeFn::Delete, FreeFn::Realloc][next(3) as usize];
                slot::free(f, seq, addr)
            } else {
                slot::free(FreeFn::Free, seq, 0x90_0000 + next(50))
            };
            slots[t].extend_from_slice(&s);
            if next(300) == 0 {
                bounds.push(seq + 1);
            }
            if next(150) == 0 {
                let end = slots[t].len();
                records.push((t, from[t], end));
                from[t] = end;
            }
        }
        for t in 0..threads as usize {
            records.push((t, from[t], slots[t].len()));
        }
        let (mut table, mut marks, mut groups) = (
            vec![0u32; 1 << 14],
            vec![0u16; 8192],
            vec![Group::default(); 1024],
        );
        let mut whole = encode::preamble().to_vec();
        let mut elided = whole.clone();
        let mut n_elided = 0;
        let mut epochs_out = 0;
        for (t, a, b) in records {
            let part = &slots[t][a..b];
            // A boundary goes out before any record with a number past it, as the writer sends
            // it before it drains the rings.
            let last = SlotIter::new(part)
                .filter_map(|r| match r {
                    Ok(SlotRecord::Alloc { seq, .. } | SlotRecord::Free { seq, .. }) => Some(seq),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            while epochs_out < bounds.len() && bounds[epochs_out] <= last {
                let e = Epoch {
                    index: epochs_out as u32 + 1,
                    time_ns: epochs_out as u64,
                    seq: bounds[epochs_out],
                    rss: 0,
                };
                encode::epoch(&e, &mut whole);
                encode::epoch(&e, &mut elided);
                epochs_out += 1;
            }
            encode::batch(t as u32 + 1, part, &mut whole);
            let mut sc = PairScratch {
                table: &mut table,
                marks: &mut marks,
                groups: &mut groups,
            };
            let (pairs, n) = compact::find_pairs(&[part], &bounds, 0, &mut sc, None).unwrap();
            n_elided += n;
            let count = part.len() / slot::SLOT_LEN;
            let mut packed = vec![0u8; count * compact::MAX_SLOT_BYTES];
            let len = compact::encode_elided(&[part], &mut packed, &pairs).unwrap();
            let mut head = [0u8; 8];
            head[..4].copy_from_slice(&(t as u32 + 1).to_le_bytes());
            head[4..].copy_from_slice(&(count as u32).to_le_bytes());
            encode::sealed(
                leakhunt_format::tag::EVENTS,
                &[&head, &packed[..len]],
                &mut elided,
            );
        }
        (whole, elided, n_elided)
    }

    /// The items in order (figures compared whatever order the maps kept them in).
    fn sorted<T: Ord>(it: impl Iterator<Item = T>) -> Vec<T> {
        let mut v: Vec<T> = it.collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn early_nops_are_found_in_order_across_the_windows_wrap() {
        let mut e = EarlyNops::default();
        let next = 3 * NOP_WINDOW - 10;
        assert_eq!(e.first_from(next), None);
        for seq in [next + 5, next + 20, next + 9, next + NOP_WINDOW - 1] {
            assert_eq!(e.put(seq, next), Some(true));
        }
        assert_eq!(e.put(next + 9, next), Some(false), "noted twice");
        assert_eq!(e.put(next + NOP_WINDOW, next), None, "beyond the window");
        assert!(e.has(next + 20, next) && !e.has(next + 21, next));
        // A number a window above a noted one is not noted.
        assert!(!e.has(next + 20 + NOP_WINDOW, next));
        let mut got = vec![];
        let mut at = next;
        while let Some(s) = e.first_from(at) {
            assert!(e.take(s));
            got.push(s - next);
            at = s + 1;
        }
        assert_eq!(got, [5, 9, 20, NOP_WINDOW - 1]);
        assert!(e.is_empty());
    }

    #[test]
    fn events_held_ahead_give_the_figures_of_events_applied_one_by_one() {
        // The reader holds in-order allocations and frees back to load their slots together;
        // applied one at a time instead (through `recover`, which holds nothing back), the same
        // trace must give the same live set, totals, series and diff probe, epoch boundaries
        // falling inside records included.
        for (seed, threads) in [(0x9E37_79B9_7F4A_7C15u64, 1), (4242, 2), (5, 2)] {
            let (whole, elided, _) = random_traces(seed, threads);
            let mut one = Process::new();
            one.probe = Some((2, 5));
            let mut r = leakhunt_format::Reader::new(&whole[..]);
            while let Some(rec) = r.next_record().unwrap() {
                match rec {
                    Record::Batch { tid, slots, .. } => {
                        one.recover(tid, &slots).unwrap();
                    }
                    rec => one.apply(rec, 0).unwrap(),
                }
            }
            one.finish();
            assert!(one.growth.boundaries.len() > 3);
            for data in [&whole, &elided] {
                let mut p = Process::new();
                p.probe = Some((2, 5));
                let mut r = leakhunt_format::Reader::new(&data[..]);
                while let Some(rec) = r.next_record().unwrap() {
                    p.apply(rec, 0).unwrap();
                }
                p.finish();
                let t = |p: &Process| {
                    let t = &p.totals;
                    (t.allocs, t.frees, t.bytes_allocated, t.unknown_frees)
                };
                assert_eq!(t(&p), t(&one));
                let live = |p: &Process| {
                    let mut v: Vec<_> = p
                        .live
                        .iter()
                        .map(|(a, l)| (a, l.size, l.stack, l.born))
                        .collect();
                    v.sort_unstable();
                    v
                };
                assert_eq!(live(&p), live(&one));
                assert!(
                    live(&one).iter().any(|l| l.3 > 0),
                    "blocks born after a boundary"
                );
                assert_eq!(p.growth.boundaries, one.growth.boundaries);
                for stack in 1..=6 {
                    assert_eq!(p.growth.of(stack), one.growth.of(stack), "stack {stack}");
                }
                assert_eq!(sorted(p.probe_born.iter()), sorted(one.probe_born.iter()));
                // Allocations between the probe's boundaries, per stack: the same whichever way
                // the events came (elided pairs too), and adding up to the process's count
                // between those boundaries.
                assert_eq!(
                    sorted(p.probe_allocs.iter()),
                    sorted(one.probe_allocs.iter())
                );
                let at = |i: u32| {
                    let b = p.growth.boundaries.iter().find(|b| b.index == i).unwrap();
                    b.allocs
                };
                let made: u64 = p.probe_allocs.values().map(|v| v.0).sum();
                assert!(made > 0);
                assert_eq!(made, at(5) - at(2));
                let a = sorted(p.growth.alloc_totals());
                assert_eq!(a, sorted(one.growth.alloc_totals()));
                assert_eq!(a.iter().map(|x| x.2).sum::<u64>(), p.totals.bytes_allocated);
            }
        }
    }

    #[test]
    fn elided_pairs_give_the_same_figures_as_every_event() {
        // One thread, and two whose events interleave: a block one thread frees and gets back
        // between another's allocation and free of the same address must not make a pair.
        for (seed, threads) in [
            (0x9E37_79B9_7F4A_7C15u64, 1),
            (77, 1),
            (4242, 2),
            (0xDEAD_BEEF, 2),
            (5, 2),
        ] {
            let (whole, elided, n) = random_traces(seed, threads);
            assert!(n > 500, "{n} events elided");
            assert!(elided.len() * 2 < whole.len());
            let (mut a, ea) = Process::read_stream(&whole[..]);
            let (mut b, eb) = Process::read_stream(&elided[..]);
            assert!(ea.is_none() && eb.is_none(), "{ea:?} {eb:?}");
            a.finish();
            b.finish();
            let t = |p: &Process| {
                let t = &p.totals;
                (
                    t.allocs,
                    t.frees,
                    t.bytes_allocated,
                    t.unknown_frees,
                    t.reused_live,
                )
            };
            assert_eq!(t(&a), t(&b));
            assert!(a.totals.unknown_frees > 0);
            assert_eq!((a.gaps, b.gaps), (0, 0));
            assert_eq!(
                sorted(a.live.iter().map(|(k, v)| (k, v.size, v.stack))),
                sorted(b.live.iter().map(|(k, v)| (k, v.size, v.stack)))
            );
            assert!(a.growth.boundaries.len() > 3);
            assert_eq!(a.growth.boundaries, b.growth.boundaries);
            for stack in 1..=6 {
                assert_eq!(a.growth.of(stack), b.growth.of(stack), "stack {stack}");
            }
            assert_eq!(
                sorted(a.growth.allocs_by_stack()),
                sorted(b.growth.allocs_by_stack())
            );
        }
    }

    const CODE_NOP_BYTE: u8 = 2;
    const CODE_SKIP_BYTE: u8 = 5;

    #[test]
    fn random_events_records_never_panic() {
        // Checksums valid, bodies random: the reader rejects or applies them, never panics
        // (debug builds check arithmetic overflow).
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // A run of NOPs past the last sequence number: an error, not an overflow.
        let mut data = encode::preamble().to_vec();
        let mut head = [0u8; 8];
        head[4..].copy_from_slice(&2u32.to_le_bytes());
        // NOP at u64::MAX - 1 (seq delta -2, zigzagged: 3), then SKIP of one.
        let body = [CODE_NOP_BYTE, 0x01, 0x03, CODE_SKIP_BYTE];
        encode::sealed(leakhunt_format::tag::EVENTS, &[&head, &body], &mut data);
        let (_, err) = Process::read_stream(&data[..]);
        assert!(err.unwrap().to_string().contains("overflow"));
        // A lone NOP numbered u64::MAX waits for the numbers below it; at the end they are lost.
        let mut data = encode::preamble().to_vec();
        head[4..].copy_from_slice(&1u32.to_le_bytes());
        encode::sealed(
            leakhunt_format::tag::EVENTS,
            &[&head, &[CODE_NOP_BYTE, 0x01, 0x01]],
            &mut data,
        );
        let (mut p, err) = Process::read_stream(&data[..]);
        assert!(err.is_none(), "{err:?}");
        p.finish();
        assert_eq!(p.gaps, u64::MAX);

        for _ in 0..2_000 {
            let mut data = encode::preamble().to_vec();
            for _ in 0..1 + next() % 3 {
                let len = (next() % 48) as usize;
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = next() as u8;
                        // Mostly plausible kind bytes and small lengths, some anything.
                        if next() % 4 == 0 {
                            b
                        } else {
                            b & 0x3e
                        }
                    })
                    .collect();
                let mut head = [0u8; 8];
                head[..4].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
                head[4..].copy_from_slice(&((next() % 40) as u32).to_le_bytes());
                encode::sealed(leakhunt_format::tag::EVENTS, &[&head, &body], &mut data);
            }
            let (mut p, _) = Process::read_stream(&data[..]);
            p.finish();
        }
    }
}
