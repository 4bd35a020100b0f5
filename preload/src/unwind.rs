//! Stack capture with DWARF CFI (`.eh_frame_hdr` / `.eh_frame`), which works where frame pointers
//! do not (Debian's libc, libstdc++ and most binaries have none).
//!
//! Each return address's rule (how to find the caller's CFA, return address and saved rbp) is
//! computed once with gimli and kept in a per-thread direct-mapped cache; the cache is cleared when
//! the module generation changes. A walk only reads memory inside `[sp, stack_hi)` of the calling
//! thread, so garbage on the stack can end a walk early but never crash it.
//!
//! Frames are return addresses, innermost first, starting at the program's call into the
//! allocator: the library's own frames are dropped.

extern crate alloc;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Pointer, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use leakhunt_format::StopReason;

use crate::modules::{self, ModuleInfo};

pub const MAX_FRAMES_CAP: usize = 256;
/// A thread's own rule cache (4 KiB), in front of the process's [`SHARED_RULES`].
const CACHE_SIZE: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Empty cache entry.
    Empty = 0,
    Ok = 1,
    /// Return address undefined: the outermost frame.
    End = 2,
    Unknown = 4,
    Unsupported = 5,
    /// The return address is the signal return trampoline (`__restore_rt`): the frame above is
    /// the kernel's signal frame, and the interrupted context is in its `ucontext`.
    Signal = 6,
}

/// How to step from a frame to its caller's, 8 bytes (a cache entry is 16: the cache stays
/// in half the cache lines it took with a field per flag).
#[derive(Clone, Copy)]
#[repr(C)]
struct Rule {
    cfa_off: i32,
    /// Where the caller's rbp was saved, relative to the CFA; 0 = not saved (unchanged).
    rbp_off: i16,
    /// Where the return address is, relative to the CFA, in 8-byte words.
    ra_words: i8,
    /// The [`Kind`] (low 3 bits) and the flags below.
    bits: u8,
}

/// CFA is rbp + off (else rsp + off).
const CFA_RBP: u8 = 1 << 3;
/// The address lies in this library.
const OWN: u8 = 1 << 4;
/// No CFI covers the address (code a JIT made, or a module's code without unwind tables): the
/// frame is walked by frame pointer, and what that gives is checked (see [`capture`]).
const FP: u8 = 1 << 5;
/// For `FP`: the address lies in a module (without CFI for it), not in a JIT's memory.
const FP_MODULE: u8 = 1 << 6;
/// No CFI stood behind this rule (a frame pointer, or a JIT stub's epilogue read from its
/// code): the return address it gives must lie in executable memory.
const VERIFY_RA: u8 = 1 << 7;
const KIND_MASK: u8 = 7;

const _: () = assert!(core::mem::size_of::<Rule>() == 8);

impl Rule {
    const fn none(kind: Kind) -> Rule {
        Rule {
            cfa_off: 0,
            rbp_off: 0,
            ra_words: 0,
            bits: kind as u8,
        }
    }

    #[inline]
    fn kind(&self) -> Kind {
        match self.bits & KIND_MASK {
            0 => Kind::Empty,
            1 => Kind::Ok,
            2 => Kind::End,
            4 => Kind::Unknown,
            6 => Kind::Signal,
            _ => Kind::Unsupported,
        }
    }

    #[inline]
    fn set_kind(&mut self, k: Kind) {
        self.bits = (self.bits & !KIND_MASK) | k as u8;
    }

    #[inline]
    fn has(&self, flag: u8) -> bool {
        self.bits & flag != 0
    }

    #[inline]
    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.bits |= flag;
        } else {
            self.bits &= !flag;
        }
    }

    #[inline]
    fn ra_off(&self) -> i32 {
        self.ra_words as i32 * 8
    }

    /// The frame-pointer chain's rule: `push rbp; mov rbp, rsp` on entry, so the caller's rbp is
    /// at rbp, the return address at rbp + 8, and the CFA at rbp + 16. `in_module`: the address
    /// lies in a module (without CFI for it), else in a JIT's executable memory.
    const fn frame_pointer(in_module: bool) -> Rule {
        Rule {
            cfa_off: 16,
            rbp_off: -16,
            ra_words: -1,
            bits: Kind::Ok as u8 | CFA_RBP | FP | VERIFY_RA | if in_module { FP_MODULE } else { 0 },
        }
    }

    /// A frame of JIT code without a frame of its own, read from the code it returns to: `ret`
    /// (nothing on the stack but the return address) or `add rsp, N; ret` (a stub that only
    /// aligned the stack, as CPython 3.12's perf trampolines do). rbp is its caller's.
    fn jit_epilogue(ra: u64) -> Option<Rule> {
        let readable = |a: u64| crate::jit::contains(a);
        if !readable(ra) {
            return None;
        }
        // SAFETY: `ra` lies in a readable, executable mapping (checked just above).
        let first = unsafe { *(ra as *const u8) };
        let cfa_off = if first == 0xc3 {
            8
        } else if first == 0x48 && readable(ra + 4) {
            // SAFETY: `ra .. ra + 5` lies in one readable mapping (both ends checked; the
            // table merges touching mappings).
            let code = unsafe { core::slice::from_raw_parts(ra as *const u8, 5) };
            let n = code[3] as i8;
            if code[..3] != [0x48, 0x83, 0xc4] || code[4] != 0xc3 || n <= 0 || n % 8 != 0 {
                return None;
            }
            n as i32 + 8
        } else {
            return None;
        };
        Some(Rule {
            cfa_off,
            rbp_off: 0,
            ra_words: -1,
            bits: Kind::Ok as u8 | VERIFY_RA,
        })
    }

    /// Why a walk stops where this frame-pointer rule's step cannot be trusted: as it stopped
    /// before frame pointers were followed.
    fn fp_failure(&self) -> StopReason {
        if self.has(FP_MODULE) {
            StopReason::NoUnwindInfo
        } else {
            StopReason::UnknownAddress
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    addr: u64,
    rule: Rule,
}

/// Per-thread unwind state, living in the thread's ring mapping (all-zero is valid).
///
/// Laid out so that a thread touches pages in proportion to what it uses: the scalars first,
/// then the per-walk arrays (a walk of n frames touches their first n entries) and the rule
/// cache, placed page by page (see the comment at `prev`), then the memos, each used from its
/// start or only once needed (shapes only once stacks vary from one stack pointer).
#[repr(C)]
pub struct Scratch {
    /// Ticks whenever the rules in force may have changed (0: never filled); walks and checks
    /// recorded under another value are void.
    cache_gen: u32,
    /// (`modules::GEN + 1`, `jit::GEN`) when the cache was last filled.
    cache_src: (u32, u32),
    /// The previous stack of this thread and its id, for the one-entry dedup cache.
    pub prev_len: u32,
    pub prev_id: u32,
    pub prev_meta: u64,
    walk_len: u32,
    /// First step of `walk` whose frame was recorded (the library's own leading frames come
    /// before it); `walk_len` if none.
    walk_rec0: u32,
    walk_reason: u8,
    /// `cache_gen` when `walk` was recorded; another value voids it.
    walk_gen: u32,
    /// Stack words the previous walk read after its last step (before it stopped): (address,
    /// value). Part of what the whole-walk check compares.
    walk_tail: [(u64, u64); 2],
    walk_ntail: u32,
    /// The last tail read was for a step whose CFA came from rbp.
    walk_tail_rbp: bool,
    check_pool_len: u32,
    /// Ticks once per capture that records or repeats a check (for `Check::used`).
    check_clock: u32,
    /// The check the current walk will record itself in.
    walk_slot: usize,
    /// The current capture's interpreter frames' hash (see [`capture`]).
    cur_py: u64,
    /// A walk replaced a usable check of its own stack pointer: stacks vary there, and shape
    /// memos are kept from now on.
    shapes_on: bool,
    shape_next: u32,
    /// The shape the last walk was learnt into (index + 1; 0: none) and its varying values:
    /// entered with the walk's stack id by [`Scratch::set_check_id`].
    shape_pending: u32,
    shape_pending_vals: [u64; VARY],
    /// The last capture repeated a shape entry: its stack id and meta.
    shape_hit: (u32, u64),
    /// The check the last capture repeated or recorded (`CHECKS`: none).
    pub last_check: usize,
    /// The last capture repeated a check (its stack id is the check's).
    pub hit: bool,
    /// Captures that reused the previous walk's suffix / that walked every frame / that matched
    /// the previous walk as a whole (statistics for tests and benchmarks).
    pub reused: u64,
    pub walked: u64,
    pub repeated: u64,
    /// Where each set of checks lies in `checks` (its place + 1; 0: none yet), given in the
    /// order the sets are first used (see [`Scratch::check_set_of`]), and how many are given.
    set_map: [u8; CHECK_SETS],
    sets_used: u8,
    // Page by page (the mapping's pages, the ring's header first: see `PAGE_LAYOUT` below), so
    // that a thread touches few, 4 for usual walks: page 0 the header, the scalars and the first
    // frames of `frames` and `prev`; page 1 their rest and `py` (touched only for deep stacks
    // and Python); page 2 `cache` (written whole when the rules change); page 3 the first steps
    // of both walks; one page the end of the pool (handed out from its end) and the first sets
    // of `checks` (placed in the order of their first use): four walks' words and four sets.
    /// Where the current capture writes its frames.
    pub frames: [u64; MAX_FRAMES_CAP],
    pub prev: [u64; MAX_FRAMES_CAP],
    /// This thread's Python frames at the current capture, and the stack with them spliced in
    /// (see `python::splice`).
    pub py: [crate::python::PyFrame; crate::python::MAX_PY],
    _pad: [u8; PAD],
    cache: [Entry; CACHE_SIZE],
    /// Every step of the previous walk (see [`capture`]: what suffix reuse validates against)
    /// beside that of the current walk before it joins the previous one.
    steps: [StepPair; WALK_CAP],
    _pad2: [u8; PAD2],
    /// The checks' word lists, and how much of it is handed out (from its end down).
    check_pool: [(u64, u64); CHECK_POOL],
    /// Whole-walk checks (see [`repeats`]) of recent walks.
    checks: [Check; CHECKS],
    /// Shape memos (see [`shape_repeat`]): walks from one stack pointer through frames of the
    /// same shape, and the stacks seen through them.
    shapes: [Shape; SHAPES],
    shape_entries: [ShapeEntry; SHAPE_ENTRIES],
    pub spliced: [u64; MAX_FRAMES_CAP],
    /// The heap pointers a block being freed holds, (offset, word), for its `CONTENT` record
    /// (`LEAKHUNT_ORPHANS=1`; the tracer's, not the unwinder's: it lives here because this is
    /// the thread's own mapped scratch, touched only with orphans on).
    pub content: [(u64, u64); leakhunt_format::slot::MAX_CONTENT_PAIRS],
}

/// Bytes between `py` and `cache`, so that `cache` fills one page of the ring's mapping (the
/// scratch follows the ring's header there). Changing the scalars above changes it: the assertion
/// below fails until it is corrected.
const PAD: usize = 2096;
/// Bytes between `steps` and `check_pool`, so that the pool ends (and `checks` begins) at
/// [`POOL_END`] into a page.
const PAD2: usize = 1280;
const POOL_END: usize = 2560;
/// The scratch's pages as laid out (see [`Scratch`]).
const PAGE_LAYOUT: () = {
    use core::mem::{offset_of, size_of};
    let ring = size_of::<crate::ring::Ring>();
    assert!(
        ring + offset_of!(Scratch, prev) + 64 * 8 <= 4096,
        "the first 64 frames of `frames` and `prev` must lie in the mapping's first page"
    );
    assert!(
        ring + offset_of!(Scratch, cache) == 2 * 4096,
        "Scratch::cache must begin the mapping's third page: correct PAD"
    );
    assert!(size_of::<[Entry; CACHE_SIZE]>() == 4096);
    assert!(
        (ring + offset_of!(Scratch, checks)) % 4096 == POOL_END,
        "Scratch::checks must begin POOL_END into a page: correct PAD2"
    );
};
#[allow(clippy::let_unit_value)]
const _: () = PAGE_LAYOUT;

/// Whole-walk checks kept per thread: the call sites of a request handler (a parse, a cache
/// fill, a response) each allocate from their own stack pointer, or from the same one (two calls
/// of `malloc` in one function); sqlite3 runs ~20-30 allocation sites per statement in a cycle,
/// which least-recently-used replacement in fewer checks misses every time. Set-associative: the
/// stack pointer picks a set, a capture tries every check of the set, a walk replaces the set's
/// least recently used one.
const CHECK_WAYS: usize = 4;
const CHECK_SETS: usize = 32;
const CHECKS: usize = CHECK_SETS * CHECK_WAYS;

/// Room for the checks' word lists (address, value), shared by the thread's checks and handed out
/// in order from its end down; when it runs out every check is dropped and it starts over. Pages
/// are touched as they are handed out (64 KiB a thread once checks have churned through all of
/// it).
const CHECK_POOL: usize = 4096;

/// What a later capture must find unchanged to repeat a walk whole: every stack word the walk
/// read, with the value read, the registers it started from, its result, and (filled in by the
/// tracer once interned) its stack id.
#[repr(C)]
struct Check {
    /// The check's words: `Scratch::check_pool[start..start + len]`, which it may use up to
    /// `start + room`.
    start: u32,
    len: u32,
    room: u32,
    /// Usable (else a capture walks).
    ok: bool,
    /// The walk's result depends on the rbp it started with.
    bp_needed: bool,
    sp: u64,
    bp: u64,
    hi: u64,
    gen: u32,
    n: u32,
    reason: u8,
    /// The stack's id and meta (0: not known, the check cannot stand for the stack).
    id: u32,
    meta: u64,
    /// The hash of the interpreter frames spliced into that stack (0: none).
    py: u64,
    /// `Scratch::check_clock` when the check was last recorded or repeated (least recently used
    /// goes first).
    used: u32,
}

/// The set of a stack pointer: the bits above 512 bytes are added in, so that a recursion whose
/// frames are a multiple of 512 bytes still spreads over the sets.
#[inline]
fn check_set(sp: u64) -> usize {
    ((sp >> 4).wrapping_add(sp >> 9)) as usize % CHECK_SETS
}

impl Scratch {
    /// The first check of the set for captures starting at stack pointer `sp`, if a walk from
    /// its set was ever recorded. Sets take their place in `checks` in the order of their first
    /// use ([`Scratch::set_map`]), so that a thread touches one page of them for its first
    /// dozen sets, wherever its stack pointers fall.
    #[inline]
    fn check_set_of(&self, sp: u64) -> Option<usize> {
        let at = self.set_map[check_set(sp)] as usize;
        (at != 0).then(|| (at - 1) * CHECK_WAYS)
    }

    /// As [`Scratch::check_set_of`], giving the set its place if it has none.
    #[inline]
    fn check_set_for(&mut self, sp: u64) -> usize {
        let logical = check_set(sp);
        if self.set_map[logical] == 0 {
            // Places are never taken back (a set keeps its place for the scratch's life, its
            // checks voided by generation), so there is always one for a new set.
            self.sets_used += 1;
            self.set_map[logical] = self.sets_used;
        }
        (self.set_map[logical] as usize - 1) * CHECK_WAYS
    }
}
const _: () = assert!(CHECK_SETS < u8::MAX as usize);

/// The check a walk from stack pointer `sp` records itself in: one of its set not in use, else
/// the set's least recently used.
#[inline]
fn check_victim(s: &mut Scratch, sp: u64) -> usize {
    let set = s.check_set_for(sp);
    let mut best = set;
    for i in set..set + CHECK_WAYS {
        let c = &s.checks[i];
        if !c.ok {
            return i;
        }
        if c.used.wrapping_sub(s.checks[best].used) as i32 <= 0 {
            best = i;
        }
    }
    best
}

// The words of the longest walk's check (two a step and the tail's) fit in the pool.
const _: () = assert!(2 * WALK_CAP < CHECK_POOL);

/// Steps a walk keeps: the recorded frames plus the library's own leading frames.
const WALK_CAP: usize = MAX_FRAMES_CAP + 16;

/// Step `i` of the previous walk and of the current one, side by side: a walk of 20 steps
/// touches 1.6 KiB of them, in one page, instead of a page in each of two arrays.
#[derive(Clone, Copy)]
#[repr(C)]
struct StepPair {
    walk: Step,
    head: Step,
}

/// One unwinding step: the caller frame it found and the two stack words it read to find it.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
struct Step {
    cfa: u64,
    ra: u64,
    /// rbp after the step (restored from the stack, or carried over).
    bp: u64,
    /// Where `ra` was read, relative to `cfa`.
    ra_off: i32,
    /// Where rbp was restored from, relative to `cfa`; 0 = not restored.
    rbp_off: i16,
    /// `ra` went into the captured frames (false for the library's own leading frames).
    recorded: bool,
    /// Still inside the library's own leading frames after this step.
    leading: bool,
    /// The rest of the walk depends on `bp` (a later rule computes its CFA from rbp before rbp
    /// is restored from the stack). Filled in when the walk ends.
    needs_bp: bool,
    /// This step's rule computed the CFA from rbp.
    cfa_rbp: bool,
}

impl Step {
    /// The previous walk's step `self` is where the current walk stands at `now`: from here on,
    /// both walks would do the same as long as the stack words read match.
    #[inline]
    fn joins(&self, now: &Step) -> bool {
        self.cfa == now.cfa
            && self.ra == now.ra
            && self.ra_off == now.ra_off
            && self.rbp_off == now.rbp_off
            && self.recorded == now.recorded
            && self.leading == now.leading
            && (!self.needs_bp || self.bp == now.bp)
    }
}

/// Marks which steps of a walk the rest of it needs rbp for; `need` says whether what follows
/// the last of `steps` does.
fn mark_bp_needs<'a>(steps: impl DoubleEndedIterator<Item = &'a mut Step>, mut need: bool) {
    for st in steps.rev() {
        st.needs_bp = need;
        need = st.cfa_rbp || (st.rbp_off == 0 && need);
    }
}

impl Scratch {
    /// Forgets the previous thread's walks. Writes only scalars (the mapping's first page; see
    /// [`Scratch::after_give_back`]).
    pub fn reset_for_new_thread(&mut self) {
        self.walk_len = 0;
        // Checks, shapes and the walk were the old thread's (their stack addresses in its
        // stack): a new generation voids them without touching their pages.
        self.next_gen();
        self.shapes_on = false;
        self.shape_pending = 0;
        self.shape_hit = (0, 0);
        self.last_check = CHECKS;
        self.prev_len = 0;
        self.prev_id = 0;
        self.prev_meta = 0;
    }

    /// The scratch's pages after the mapping's first were given back (`ring::Ring::
    /// give_back`) and read as zeros: forget what the scalars (in the first page) say of them.
    /// Zeroed checks, shapes and shape entries are unused ones; the rule cache is filled again
    /// at the next capture, under a later generation.
    pub fn after_give_back(&mut self) {
        self.reset_for_new_thread();
        // (0, 0) is no source (its modules' part is 0 only after 2^32 changes of the module
        // table): the next capture refills.
        self.cache_src = (0, 0);
        self.check_pool_len = 0;
        self.shape_next = 0;
        self.walk_slot = 0;
    }

    fn sources() -> (u32, u32) {
        use core::sync::atomic::Ordering::Acquire;
        (
            modules::GEN.load(Acquire).wrapping_add(1),
            crate::jit::GEN.load(Acquire),
        )
    }

    /// A new rule generation (never 0, the "never filled" value).
    fn next_gen(&mut self) {
        self.cache_gen = self.cache_gen.wrapping_add(1).max(1);
    }

    fn ensure_fresh(&mut self) {
        let src = Self::sources();
        if self.cache_src != src || self.cache_gen == 0 {
            for e in self.cache.iter_mut() {
                e.rule.set_kind(Kind::Empty);
            }
            self.cache_src = src;
            self.next_gen();
            self.prev_len = 0;
            self.prev_id = 0;
        }
    }

    #[inline]
    fn rule(&mut self, addr: u64) -> Rule {
        let slot = ((addr ^ (addr >> 12)) as usize) & (CACHE_SIZE - 1);
        let e = self.cache[slot];
        if e.addr == addr && e.rule.kind() != Kind::Empty {
            return e.rule;
        }
        let r = match shared_rule(addr, self.cache_src) {
            Some(r) => r,
            None => {
                let r = self.compute(addr);
                // An address in no known memory is asked again next time (the maps are re-read
                // at most every few milliseconds): code a JIT makes later may land there.
                if r.kind() == Kind::Unknown {
                    return r;
                }
                share_rule(addr, self.cache_src, r);
                r
            }
        };
        self.cache[slot] = Entry { addr, rule: r };
        r
    }

    #[cold]
    fn compute(&mut self, addr: u64) -> Rule {
        let none = Rule::none;
        let mut table = modules::current();
        let mut m = table.and_then(|t| t.find(addr));
        if m.is_none() && !crate::jit::contains(addr) && crate::jit::claim_refresh() {
            // Unknown memory: a library libc loaded by itself, or code a JIT made since the
            // executable mappings were last read.
            let rescanned = modules::rescan();
            let jit_changed = crate::jit::refresh_now();
            if rescanned {
                table = modules::current();
                m = table.and_then(|t| t.find(addr));
            }
            if rescanned || jit_changed {
                // Rules cached so far stay right; walks and checks recorded under them may
                // have stopped at an address that is now known.
                self.cache_src = Self::sources();
                self.next_gen();
            }
        }
        let Some(m) = m else {
            return if crate::jit::contains(addr) {
                Rule::jit_epilogue(addr + 1).unwrap_or(Rule::frame_pointer(false))
            } else {
                none(Kind::Unknown)
            };
        };
        if table.is_some_and(|t| is_sigreturn(t, addr + 1)) {
            return none(Kind::Signal);
        }
        let mut r = match with_context(|ctx| cfi_rule(m, addr, ctx)) {
            Some(r) => r,
            None if in_loader_entry(addr) => none(Kind::End),
            // Code without unwind tables (a JIT's builtins linked into the executable, hand-
            // written assembly): by frame pointer, checked.
            None => Rule::frame_pointer(true),
        };
        r.set(OWN, m.own);
        r
    }
}

/// `mov $15, %rax; syscall` (rt_sigreturn): the trampoline a signal handler returns to.
const SIGRETURN_CODE: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

fn is_sigreturn(t: &modules::Table, pc: u64) -> bool {
    let len = SIGRETURN_CODE.len() as u64;
    match (t.find(pc), t.find(pc + len - 1)) {
        (Some(a), Some(b)) if core::ptr::eq(a, b) => {
            // SAFETY: both ends lie in one executable (readable) segment of a loaded module.
            let code = unsafe { core::slice::from_raw_parts(pc as *const u8, len as usize) };
            code == SIGRETURN_CODE
        }
        _ => false,
    }
}

/// Offsets in the kernel's x86_64 signal frame, from the stack pointer at the trampoline (which
/// points at the `ucontext_t`): `uc_mcontext` is at 40, and its gregs rbp, rsp, rip at 10, 15, 16.
const UC_RBP: u64 = 40 + 10 * 8;
const UC_RSP: u64 = 40 + 15 * 8;
const UC_RIP: u64 = 40 + 16 * 8;

/// The dynamic loader's entry code (`_start` / `_dl_start_user`) has no CFI: it is the outermost
/// frame of constructors and of allocations made before `main`'s own `_start` runs, so a walk that
/// reaches it is complete. Bytes past the entry point that count as that stub.
const LOADER_ENTRY_STUB: u64 = 256;

fn in_loader_entry(addr: u64) -> bool {
    // SAFETY: getauxval only reads the auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_BASE) };
    if base == 0 {
        return false;
    }
    // SAFETY: AT_BASE is where the loader's ELF header is mapped; e_entry is the u64 at offset 24
    // of an Elf64_Ehdr, inside its first page.
    let entry = base + unsafe { ((base + 24) as *const u64).read_unaligned() };
    addr >= entry && addr < entry + LOADER_ENTRY_STUB
}

/// Rules known to the process: what one thread computed, every other finds (a thread's first
/// allocations then walk without parsing CFI, on a shallow stack), once a second thread records
/// (see [`share_rule`]). 128 KiB, direct-mapped, read and written without a lock: an entry is
/// the rule and its address mixed with the rule and the rules' sources (module and JIT
/// generations), so a read that meets two writes half each, or an entry of other sources, fails
/// the check (a false pass needs a 64-bit hash collision).
const SHARED_RULES: usize = 8192;

struct SharedRule {
    key: AtomicU64,
    rule: AtomicU64,
}

static SHARED: [SharedRule; SHARED_RULES] = [const {
    SharedRule {
        key: AtomicU64::new(0),
        rule: AtomicU64::new(0),
    }
}; SHARED_RULES];

impl Rule {
    fn to_bits(self) -> u64 {
        self.cfa_off as u32 as u64
            | (self.rbp_off as u16 as u64) << 32
            | (self.ra_words as u8 as u64) << 48
            | (self.bits as u64) << 56
    }

    fn from_bits(b: u64) -> Rule {
        Rule {
            cfa_off: b as u32 as i32,
            rbp_off: (b >> 32) as u16 as i16,
            ra_words: (b >> 48) as u8 as i8,
            bits: (b >> 56) as u8,
        }
    }
}

fn shared_key(addr: u64, src: (u32, u32), bits: u64) -> u64 {
    // splitmix64's finalizer over the rule and its sources.
    let mut z = bits ^ ((src.0 as u64) << 32 | src.1 as u64).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    addr ^ z ^ (z >> 31)
}

fn shared_slot(addr: u64) -> &'static SharedRule {
    &SHARED[((addr ^ (addr >> 13)) as usize) & (SHARED_RULES - 1)]
}

#[inline]
fn shared_rule(addr: u64, src: (u32, u32)) -> Option<Rule> {
    let e = shared_slot(addr);
    let bits = e.rule.load(Ordering::Relaxed);
    let key = e.key.load(Ordering::Relaxed);
    let r = Rule::from_bits(bits);
    (key == shared_key(addr, src, bits) && r.kind() != Kind::Empty).then_some(r)
}

fn share_rule(addr: u64, src: (u32, u32), r: Rule) {
    // While one thread records there is no other to find it: the table's pages stay untouched
    // (its entries lie all over its 32 pages), 128 KiB a program of one thread does not keep.
    // The second thread to record computes the first one's rules again (a CFI parse each).
    if crate::ring::RING_COUNT.load(Ordering::Relaxed) < 2 {
        return;
    }
    let e = shared_slot(addr);
    let bits = r.to_bits();
    e.rule.store(bits, Ordering::Relaxed);
    e.key.store(shared_key(addr, src, bits), Ordering::Relaxed);
}

/// gimli's unwind contexts (about 30 KiB each on the heap: rows of 192 register rules): a few
/// shared by every thread, taken for a rule computation (a rule cache miss, rare once a thread's
/// code is known) and given back, rather than one kept by each thread.
struct ContextSlot {
    busy: AtomicBool,
    ctx: core::cell::UnsafeCell<Option<Box<UnwindContext<usize>>>>,
}

// SAFETY: `ctx` is touched only by the thread that set `busy` (Acquire) until it clears it
// (Release).
unsafe impl Sync for ContextSlot {}

const CONTEXTS: usize = 4;
#[allow(clippy::declare_interior_mutable_const)] // an array initializer: each slot its own
const FREE_CONTEXT: ContextSlot = ContextSlot {
    busy: AtomicBool::new(false),
    ctx: core::cell::UnsafeCell::new(None),
};
static CONTEXT_POOL: [ContextSlot; CONTEXTS] = [FREE_CONTEXT; CONTEXTS];

/// Runs `f` with an unwind context: a free one of the pool, waiting a little for one when many
/// threads compute rules at once (each made and freed in its own malloc arena would stay
/// resident there), else one made for this call.
fn with_context<R>(f: impl FnOnce(&mut UnwindContext<usize>) -> R) -> R {
    for round in 0..64 {
        for slot in &CONTEXT_POOL {
            if !slot.busy.swap(true, Ordering::Acquire) {
                // SAFETY: `busy` was clear and this thread set it: the slot is this thread's
                // until it clears it below (a signal handler on this thread cannot get here:
                // hooks on a thread inside the tracer forward without recording).
                let ctx = unsafe { &mut *slot.ctx.get() };
                let r = f(ctx.get_or_insert_with(|| Box::new(UnwindContext::new())));
                slot.busy.store(false, Ordering::Release);
                return r;
            }
        }
        if round < 63 {
            crate::sys::yield_now();
        }
    }
    f(&mut UnwindContext::new())
}

/// In a fork child: a slot some other thread of the parent held stays theirs no more.
pub fn after_fork_child() {
    for slot in &CONTEXT_POOL {
        slot.busy.store(false, Ordering::Relaxed);
    }
}

fn cfi_rule(m: &ModuleInfo, addr: u64, ctx: &mut UnwindContext<usize>) -> Option<Rule> {
    if m.eh_frame_hdr == 0 {
        return None;
    }
    // The module is in the current table (a concurrent dlclose of code on this thread's stack
    // would already be a bug in the program).
    // SAFETY: `[eh_frame_hdr, eh_segment_end)` lies inside one loaded PT_LOAD segment.
    let hdr = unsafe {
        core::slice::from_raw_parts(
            m.eh_frame_hdr as *const u8,
            m.eh_segment_end - m.eh_frame_hdr,
        )
    };
    let bases = BaseAddresses::default().set_eh_frame_hdr(m.eh_frame_hdr as u64);
    let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
    let Pointer::Direct(eh_frame) = parsed.eh_frame_ptr() else {
        return None;
    };
    let eh_frame = eh_frame as usize;
    if eh_frame < m.eh_segment_start || eh_frame >= m.eh_segment_end {
        return None;
    }
    // SAFETY: checked to lie inside the same mapped segment just above.
    let ehf =
        unsafe { core::slice::from_raw_parts(eh_frame as *const u8, m.eh_segment_end - eh_frame) };
    let ehf = EhFrame::new(ehf, LittleEndian);
    let bases = bases.set_eh_frame(eh_frame as u64);
    let table = parsed.table()?;
    let row = table
        .unwind_info_for_address(&ehf, &bases, ctx, addr, EhFrame::cie_from_offset)
        .ok()?;
    let mut r = Rule::none(Kind::Ok);
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset }
            if register == X86_64::RSP || register == X86_64::RBP =>
        {
            r.set(CFA_RBP, register == X86_64::RBP);
            r.cfa_off = i32::try_from(offset).ok()?;
        }
        _ => r.set_kind(Kind::Unsupported),
    }
    // No rule is the default rule: for the return address "undefined" (the outermost frame), for
    // rbp "same value".
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(o)) if o % 8 == 0 => r.ra_words = i8::try_from(o / 8).ok()?,
        None | Some(RegisterRule::Undefined) => r.set_kind(Kind::End),
        _ => r.set_kind(Kind::Unsupported),
    }
    match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(o)) if o != 0 => r.rbp_off = i16::try_from(o).ok()?,
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::SameValue) => {}
        _ => r.set_kind(Kind::Unsupported),
    }
    Some(r)
}

/// Captures the caller's stack into `s.frames`; returns the frame count and why it stopped.
///
/// `stack_hi` bounds every read: the walk reads only `[sp, stack_hi)`, the stack mapping it runs
/// on, and past a signal frame the thread's own stack `thread_stack`. `fresh_walk` walks every
/// frame and keeps nothing for reuse (on an alternate signal stack, or with reuse turned off).
///
/// **Validated suffix reuse.** Consecutive allocations on a thread mostly share their outer
/// frames. Every step of a walk is a pure function of the return address it starts from (its
/// cached rule), the CFA and rbp, and two stack words it reads (the return address, the saved
/// rbp). So when a step of this walk lands on the same (CFA, return address, rbp) as a step of the
/// previous walk, with the same rules in force, the rest of the walk would repeat the previous
/// one exactly as long as every stack word the previous walk read still holds what it read. Those
/// words are re-read and compared (one load per frame instead of a rule lookup), and on a match
/// the previous frames are taken; on any difference the walk goes on the slow way from where it
/// joined. The result is always what a full walk gives.
///
/// Returns the frame count, why the walk stopped, and whether the frames are exactly the previous
/// capture's (then `s.frames` is not rewritten: the previous stack's id stands).
///
/// `py_hash`: the hash of the interpreter frames the caller splices into the stack (0: none). A
/// whole-walk check stands only for captures with the same: its stack id includes them.
#[inline(never)]
pub fn capture(
    s: &mut Scratch,
    max: usize,
    stack_hi: usize,
    fresh_walk: bool,
    py_hash: u64,
    thread_stack: (usize, usize),
) -> (usize, StopReason, bool) {
    let (mut pc, mut sp, mut bp): (u64, u64, u64);
    // SAFETY: reads the instruction pointer, stack pointer and rbp; writes nothing.
    unsafe {
        core::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nostack, nomem, preserves_flags),
        );
    }
    s.ensure_fresh();
    let max = max.min(MAX_FRAMES_CAP);
    s.check_clock = s.check_clock.wrapping_add(1);
    s.cur_py = py_hash;
    if !fresh_walk {
        // Where stacks vary from one stack pointer, its shape memo holds many more of them than
        // the checks of its set: try it first.
        let memo = if s.shapes_on {
            shape_repeat(s, sp, stack_hi as u64, py_hash)
        } else {
            None
        };
        if let Some((n, reason, id)) = memo {
            s.repeated += 1;
            s.last_check = CHECKS;
            s.hit = true;
            s.shape_hit = (id, 0);
            return (n, reason, false);
        }
        let set = s.check_set_of(sp).unwrap_or(CHECKS);
        for slot in set..(set + CHECK_WAYS).min(CHECKS) {
            if repeats(s, slot, sp, bp, stack_hi as u64, py_hash) {
                s.repeated += 1;
                s.last_check = slot;
                s.hit = true;
                s.shape_hit = (0, 0);
                let c = &mut s.checks[slot];
                c.used = s.check_clock;
                return (
                    c.n as usize,
                    StopReason::from_u8(c.reason).unwrap_or(StopReason::BadFrame),
                    false,
                );
            }
        }
    }
    let (sp0, bp0) = (sp, bp);
    s.shape_pending = 0;
    s.walk_slot = check_victim(s, sp);
    let victim = &s.checks[s.walk_slot];
    if victim.ok && victim.sp == sp && victim.gen == s.cache_gen {
        // Another walk from this stack pointer is still usable and has to go: stacks vary here.
        s.shapes_on = true;
    }
    s.checks[s.walk_slot].ok = false;
    s.last_check = CHECKS;
    s.hit = false;
    let mut tail = [(0u64, 0u64); 2];
    let mut ntail = 0usize;
    let mut lo = sp;
    let mut hi = stack_hi as u64;
    let read = |lo: u64, hi: u64, addr: u64| -> Option<u64> {
        if addr < lo || addr.checked_add(8)? > hi || !addr.is_multiple_of(8) {
            return None;
        }
        // SAFETY: `[lo, hi)` is mapped stack (lo is our own sp or, past a signal frame, the
        // interrupted sp; hi the top of the mapping it is in), and the aligned word lies inside.
        Some(unsafe { (addr as *const u64).read() })
    };
    let mut n = 0usize;
    let mut leading = true;
    let mut lookup = pc;
    let mut k = 0usize; // steps taken
    let mut j = 0usize; // first step of the previous walk not below the current CFA
    if fresh_walk {
        s.walk_len = 0;
    }
    let mut may_reuse = s.walk_gen == s.cache_gen && s.walk_len > 0 && !fresh_walk;
    // The first step of the previous walk that a join may still use (see `reuse_suffix`).
    let mut min_j = 0usize;
    let mut crossed_signal = false;
    let mut rule = s.rule(lookup);
    let reason = loop {
        match rule.kind() {
            Kind::Ok => {}
            Kind::End => break StopReason::End,
            Kind::Unknown => break StopReason::UnknownAddress,
            Kind::Unsupported | Kind::Empty => break StopReason::UnsupportedRule,
            Kind::Signal => {
                // Returning from a signal handler: go on from the interrupted context. It may be
                // on the thread's own stack while the handler ran on an alternate one.
                let (Some(ip), Some(usp), Some(ubp)) = (
                    read(lo, hi, sp.wrapping_add(UC_RIP)),
                    read(lo, hi, sp.wrapping_add(UC_RSP)),
                    read(lo, hi, sp.wrapping_add(UC_RBP)),
                ) else {
                    break StopReason::BadFrame;
                };
                if usp < lo || usp >= hi {
                    let (tlo, thi) = (thread_stack.0 as u64, thread_stack.1 as u64);
                    if usp < tlo || usp >= thi {
                        break StopReason::BadFrame;
                    }
                    hi = thi;
                }
                lo = usp;
                sp = usp;
                bp = ubp;
                pc = ip;
                // The interrupted instruction has not run: its own address is the one to look up.
                lookup = ip;
                may_reuse = false;
                crossed_signal = true;
                leading = false;
                if n == max {
                    break StopReason::MaxDepth;
                }
                s.frames[n] = pc;
                n += 1;
                rule = s.rule(lookup);
                continue;
            }
        }
        if !rule.has(OWN) {
            leading = false;
        }
        if rule.has(FP) {
            // A frame without CFI, by frame pointer: rbp = 0 ends the chain (as the ABI marks
            // the outermost frame); otherwise rbp must point into this frame, above its sp.
            if bp == 0 {
                break StopReason::End;
            }
            if bp < sp || !bp.is_multiple_of(8) {
                break rule.fp_failure();
            }
        }
        let base = if rule.has(CFA_RBP) { bp } else { sp };
        let cfa = base.wrapping_add(rule.cfa_off as i64 as u64);
        if cfa <= sp || cfa > hi {
            break if rule.has(FP) {
                rule.fp_failure()
            } else {
                StopReason::BadFrame
            };
        }
        let Some(ra) = read(lo, hi, cfa.wrapping_add(rule.ra_off() as i64 as u64)) else {
            break StopReason::BadFrame;
        };
        // What this step read, in case the walk stops before keeping the step.
        tail[0] = (cfa.wrapping_add(rule.ra_off() as i64 as u64), ra);
        ntail = 1;
        if rule.rbp_off != 0 {
            let at = cfa.wrapping_add(rule.rbp_off as i64 as u64);
            let Some(v) = read(lo, hi, at) else {
                break StopReason::BadFrame;
            };
            bp = v;
            tail[1] = (at, v);
            ntail = 2;
        }
        let tail_rbp = rule.has(CFA_RBP);
        if ra == 0 {
            s.walk_tail_rbp = tail_rbp;
            break StopReason::End;
        }
        sp = cfa;
        pc = ra;
        lookup = ra - 1;
        let step_rule = rule;
        rule = s.rule(lookup);
        if step_rule.has(VERIFY_RA) && rule.kind() == Kind::Unknown {
            // A frame pointer led to an address in no executable memory: not a return
            // address; the frame is not kept.
            s.walk_tail_rbp = tail_rbp;
            break step_rule.fp_failure();
        }
        // The caller frame: record it unless it is still inside this library.
        let record = !(leading && rule.has(OWN));
        if record {
            leading = false;
            if n == max {
                s.walk_tail_rbp = tail_rbp;
                break StopReason::MaxDepth;
            }
            s.frames[n] = pc;
            n += 1;
        }
        if k == WALK_CAP {
            may_reuse = false;
        } else {
            s.steps[k].head = Step {
                cfa,
                ra,
                bp,
                ra_off: step_rule.ra_off(),
                rbp_off: step_rule.rbp_off,
                recorded: record,
                leading,
                needs_bp: false,
                cfa_rbp: step_rule.has(CFA_RBP),
            };
            k += 1;
        }
        ntail = 0;
        if may_reuse {
            let len = s.walk_len as usize;
            while j < len && s.steps[j].walk.cfa < cfa {
                j += 1;
            }
            if j < len && j >= min_j && s.steps[j].walk.joins(&s.steps[k - 1].head) {
                match reuse_suffix(s, j, n, max) {
                    Ok((total, why, same)) => {
                        s.reused += 1;
                        join(s, k, j);
                        keep_check(s, sp0, bp0, hi, total, why);
                        return (total, why, same);
                    }
                    // The walks differ at a frame further out (a different caller of a shared
                    // function): walk on, and join past that frame if the walks meet again.
                    Err(next) => min_j = next,
                }
            }
        }
    };
    s.walked += 1;
    if k < WALK_CAP && k > 0 && !crossed_signal && !fresh_walk {
        // A walk that ended on a bad frame, or that stopped after reading the words of a step it
        // did not keep, may have computed that last step's CFA from rbp.
        let last_rbp = ntail > 0 && s.walk_tail_rbp;
        let heads = s.steps[..k].iter_mut().map(|p| &mut p.head);
        mark_bp_needs(heads, reason == StopReason::BadFrame || last_rbp);
        for p in &mut s.steps[..k] {
            p.walk = p.head;
        }
        s.walk_len = k as u32;
        s.walk_rec0 = s.steps[..k]
            .iter()
            .position(|p| p.head.recorded)
            .unwrap_or(k) as u32;
        s.walk_reason = reason as u8;
        s.walk_gen = s.cache_gen;
        s.walk_tail = tail;
        s.walk_ntail = ntail as u32;
        keep_check(s, sp0, bp0, hi, n, reason);
    } else {
        s.walk_len = 0;
    }
    (n, reason, false)
}

/// **Whole-walk check.** A walk is a pure function of the registers it starts from (pc is fixed:
/// it starts in [`capture`]), the rules in force and the stack words it reads. When a capture
/// starts from the stack pointer an earlier walk of this thread started from (an allocation site
/// that runs again), with the same rbp if the walk depends on it, re-reading every word that walk
/// read and finding each unchanged proves that the walk would repeat exactly: its frames, and so
/// its stack id, are that walk's. The comparison is branch-free over a flat list, a fraction of a
/// walk's cost. Checks are kept per stack pointer (a few), each with the id of its stack.
#[inline]
fn repeats(s: &Scratch, slot: usize, sp: u64, bp: u64, hi: u64, py: u64) -> bool {
    let c = &s.checks[slot];
    if !c.ok
        || c.id == 0
        || c.py != py
        || c.sp != sp
        || c.hi != hi
        || c.gen != s.cache_gen
        || (c.bp_needed && c.bp != bp)
    {
        return false;
    }
    let list = s
        .check_pool
        .get(c.start as usize..(c.start + c.len) as usize)
        .unwrap_or(&[]);
    // Eight words at a time without branches, then a look: a check of another path from this
    // stack pointer (stacks that vary) fails at its first differing frame, not after every word.
    for chunk in list.chunks(8) {
        let mut diff = 0u64;
        for &(at, v) in chunk {
            // An earlier walk of this thread read this aligned word inside `[sp, hi)` of the
            // same stack mapping, and the stack pointer is the same: the word is in the live
            // part of the stack, mapped while the thread lives (the scratch is reset when its
            // ring passes to another thread). Volatile, because the word may have changed.
            // SAFETY: an aligned read of a mapped word of this thread's live stack, as above.
            diff |= unsafe { (at as *const u64).read_volatile() } ^ v;
        }
        if diff != 0 {
            return false;
        }
    }
    true
}

/// After a walk that `s.walk` (and `s.walk_tail`) now describe completely: record what a later
/// capture from the same stack pointer must find unchanged to repeat it (see [`repeats`]). Its
/// stack id comes later, from the tracer ([`Scratch::set_check_id`]).
fn keep_check(s: &mut Scratch, sp: u64, bp: u64, hi: u64, n: usize, reason: StopReason) {
    let len = s.walk_len as usize;
    if len == 0 {
        return;
    }
    let slot = s.walk_slot;
    let gen = s.cache_gen;
    // At most two words a step and the tail's.
    let need = 2 * len + 1;
    // The slot's own words, if they have room (a thread with few walks touches few pages of the
    // pool); else the pool's next, starting it over when it is full.
    let old = &s.checks[slot];
    let start = if old.room as usize >= need {
        old.start as usize
    } else {
        if s.check_pool_len as usize + need > CHECK_POOL {
            for c in s.checks.iter_mut() {
                c.ok = false;
                c.room = 0;
            }
            s.check_pool_len = 0;
        }
        s.check_pool_len += need as u32;
        s.checks[slot].room = need as u32;
        CHECK_POOL - s.check_pool_len as usize
    };
    let (walk, tail, ntail) = (&s.steps[..len], s.walk_tail[0], s.walk_ntail);
    let list = &mut s.check_pool[start..start + need];
    let mut m = 0;
    // Saved rbp words count only where the rest of the walk uses them (`needs_bp`, which also
    // covers the step the walk stopped at).
    for st in walk.iter().map(|p| &p.walk) {
        list[m] = (st.cfa.wrapping_add(st.ra_off as i64 as u64), st.ra);
        m += 1;
        if st.rbp_off != 0 && st.needs_bp {
            list[m] = (st.cfa.wrapping_add(st.rbp_off as i64 as u64), st.bp);
            m += 1;
        }
    }
    // The return address read by the step the walk stopped at (0 ends a walk): the rbp it
    // restored there is used by nothing.
    if ntail > 0 {
        list[m] = tail;
        m += 1;
    }
    let c = &mut s.checks[slot];
    c.start = start as u32;
    c.len = m as u32;
    // The walk uses the rbp it started with if its first step computes the CFA from it, or
    // carries it on to a step that needs it.
    let w0 = walk[0].walk;
    c.bp_needed = w0.cfa_rbp || (w0.rbp_off == 0 && w0.needs_bp);
    c.sp = sp;
    c.bp = bp;
    c.hi = hi;
    c.gen = gen;
    c.n = n as u32;
    c.reason = reason as u8;
    c.id = 0;
    c.ok = true;
    c.used = s.check_clock;
    s.last_check = slot;
    if !c.bp_needed && s.shapes_on {
        shape_learn(s, sp, hi, start, m);
    }
}

// ---- shape memos --------------------------------------------------------------------------

/// Stacks that vary from one stack pointer (a server's request paths, a parser's branches):
/// the whole-walk checks of a stack pointer's set hold 4 walks, and 16 or 256 stacks that start
/// from it through frames of the same sizes thrash them. Their walks read the same stack
/// addresses and differ in a few values (the return addresses into the branches taken). A shape
/// keeps those addresses once, the values common to its walks, and which positions vary; each
/// stack seen through it is an entry of its values at those positions. A capture reads the
/// shape's words: when every common one holds its value and the varying ones match an entry's,
/// every word the entry's walk read is unchanged, so the walk would repeat exactly: its stack
/// id stands (as with a whole-walk check, and as exact).
const SHAPES: usize = 8;
/// Words of the longest walk a shape keeps (positions fit a `u64` mask).
const SHAPE_WORDS: usize = 64;
/// Positions that may vary in one shape.
const VARY: usize = 6;
/// Entries of all shapes (72 bytes each): a stack pointer reached through 256 branch paths by
/// three allocation functions is 768 stacks.
const SHAPE_ENTRIES: usize = 2048;
const SHAPE_WAYS: usize = 4;

/// The first entry of a key's set.
fn shape_set(key: u64) -> usize {
    (key as usize >> 1) % (SHAPE_ENTRIES / SHAPE_WAYS) * SHAPE_WAYS
}

#[repr(C)]
struct Shape {
    ok: bool,
    len: u16,
    gen: u32,
    /// Bumped when the shape's varying positions change: its older entries are void.
    stamp: u32,
    sp: u64,
    hi: u64,
    /// The varying positions.
    vary: u64,
    addrs: [u64; SHAPE_WORDS],
    common: [u64; SHAPE_WORDS],
}

#[repr(C)]
struct ShapeEntry {
    vals: [u64; VARY],
    py: u64,
    /// Its stack id (0: empty).
    id: u32,
    stamp: u32,
    n: u16,
    reason: u8,
    shape: u8,
}

fn shape_key(shape: usize, stamp: u32, vals: &[u64], py: u64) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64 ^ (shape as u64) << 32 ^ stamp as u64;
    for &v in vals.iter().chain([py].iter()) {
        h = (h ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(29);
    }
    h | 1
}

/// The walk just recorded (its check words `check_pool[start..start + m]`, from `sp`), learnt
/// into the shape of its addresses; its values wait in `shape_pending` for its stack id.
fn shape_learn(s: &mut Scratch, sp: u64, hi: u64, start: usize, m: usize) {
    s.shape_pending = 0;
    if m == 0 || m > SHAPE_WORDS {
        return;
    }
    let gen = s.cache_gen;
    let list = &s.check_pool[start..start + m];
    let found = s.shapes.iter().position(|sh| {
        sh.ok
            && sh.sp == sp
            && sh.hi == hi
            && sh.gen == gen
            && sh.len as usize == m
            && sh.addrs[..m].iter().zip(list).all(|(a, w)| *a == w.0)
    });
    let i = match found {
        Some(i) => {
            let sh = &mut s.shapes[i];
            let mut vary = sh.vary;
            for (p, w) in list.iter().enumerate() {
                if vary & 1 << p == 0 && sh.common[p] != w.1 {
                    vary |= 1 << p;
                }
            }
            if vary != sh.vary {
                sh.stamp = sh.stamp.wrapping_add(1);
                if vary.count_ones() as usize > VARY {
                    // Too many places differ: start over from this walk.
                    vary = 0;
                    for (p, w) in list.iter().enumerate() {
                        sh.common[p] = w.1;
                    }
                }
                sh.vary = vary;
            }
            i
        }
        None => {
            let i = s.shape_next as usize % SHAPES;
            s.shape_next = s.shape_next.wrapping_add(1);
            let sh = &mut s.shapes[i];
            sh.ok = true;
            sh.len = m as u16;
            sh.gen = gen;
            sh.stamp = sh.stamp.wrapping_add(1);
            sh.sp = sp;
            sh.hi = hi;
            sh.vary = 0;
            for (p, w) in list.iter().enumerate() {
                sh.addrs[p] = w.0;
                sh.common[p] = w.1;
            }
            i
        }
    };
    let sh = &s.shapes[i];
    let mut k = 0;
    for (p, w) in list.iter().enumerate() {
        if sh.vary & 1 << p != 0 {
            s.shape_pending_vals[k] = w.1;
            k += 1;
        }
    }
    s.shape_pending = i as u32 + 1;
}

/// Enters the pending walk's stack under its shape.
fn shape_enter(s: &mut Scratch, id: u32, n: u32, reason: u8) {
    let i = s.shape_pending as usize - 1;
    s.shape_pending = 0;
    let sh = &s.shapes[i];
    let nv = sh.vary.count_ones() as usize;
    let vals = s.shape_pending_vals;
    let key = shape_key(i, sh.stamp, &vals[..nv], s.cur_py);
    let set = shape_set(key);
    // Four ways: one not in use, else one chosen by the key's high bits.
    let live = |e: &ShapeEntry| e.id != 0 && e.stamp == s.shapes[e.shape as usize].stamp;
    let e = (set..set + SHAPE_WAYS)
        .find(|&e| !live(&s.shape_entries[e]))
        .unwrap_or(set + (key >> 40) as usize % SHAPE_WAYS);
    s.shape_entries[e] = ShapeEntry {
        vals,
        py: s.cur_py,
        id,
        stamp: sh.stamp,
        n: n as u16,
        reason,
        shape: i as u8,
    };
}

/// A capture from `sp` that repeats a stack of a shape memo: (frames, reason, id).
#[inline]
fn shape_repeat(s: &Scratch, sp: u64, hi: u64, py: u64) -> Option<(usize, StopReason, u32)> {
    for (i, sh) in s.shapes.iter().enumerate() {
        if !sh.ok || sh.sp != sp || sh.hi != hi || sh.gen != s.cache_gen {
            continue;
        }
        let len = sh.len as usize;
        let mut vals = [0u64; VARY];
        let mut k = 0;
        let mut diff = 0u64;
        for p in 0..len {
            // An earlier walk of this thread from the same stack pointer read this aligned word
            // inside `[sp, hi)` of the same stack mapping (as in `repeats`).
            // SAFETY: an aligned read of a mapped word of this thread's live stack, as above.
            let v = unsafe { (sh.addrs[p] as *const u64).read_volatile() };
            if sh.vary & 1 << p != 0 {
                vals[k] = v;
                k += 1;
            } else {
                diff |= v ^ sh.common[p];
            }
        }
        if diff != 0 {
            continue;
        }
        let key = shape_key(i, sh.stamp, &vals[..k], py);
        let set = shape_set(key);
        for e in set..set + SHAPE_WAYS {
            let en = &s.shape_entries[e];
            if en.id != 0
                && en.shape as usize == i
                && en.stamp == sh.stamp
                && en.py == py
                && en.vals[..k] == vals[..k]
            {
                return Some((
                    en.n as usize,
                    StopReason::from_u8(en.reason).unwrap_or(StopReason::BadFrame),
                    en.id,
                ));
            }
        }
    }
    None
}

impl Scratch {
    /// The stack id (and meta) of the last capture: a check it recorded can now stand for it.
    #[inline]
    pub fn set_check_id(&mut self, id: u32, meta: u64) {
        if self.hit {
            return;
        }
        if let Some(c) = self.checks.get_mut(self.last_check) {
            c.id = id;
            c.meta = meta;
            c.py = self.cur_py;
            let (n, reason) = (c.n, c.reason);
            if self.shape_pending != 0 {
                shape_enter(self, id, n, reason);
            }
        }
    }

    /// The stack id and meta of the check the last capture repeated, if it did. The previous
    /// walk and the one-entry cache (`prev`) are left as they were: they still describe each
    /// other, which is what joins and `same` rely on.
    #[inline]
    pub fn repeated_id(&self) -> Option<(u32, u64)> {
        if !self.hit {
            return None;
        }
        if self.shape_hit.0 != 0 {
            return Some(self.shape_hit);
        }
        let c = self.checks.get(self.last_check)?;
        (c.id != 0).then_some((c.id, c.meta))
    }
}

/// The previous walk from its step `j` on, re-validated against the stack as it is now: the
/// frames it recorded are appended to `s.frames` after the first `n` (unless they would
/// reproduce the previous capture exactly: then the third value is true and nothing is written).
/// `Err(i)` if a word it read has changed: its step `i - 1` differs now, so no join before step
/// `i` can succeed, and the caller walks on.
#[inline]
fn reuse_suffix(
    s: &mut Scratch,
    j: usize,
    n: usize,
    max: usize,
) -> Result<(usize, StopReason, bool), usize> {
    let len = s.walk_len as usize;
    for (i, st) in s.steps[..len]
        .iter()
        .map(|p| &p.walk)
        .enumerate()
        .skip(j + 1)
    {
        let ra_at = st.cfa.wrapping_add(st.ra_off as i64 as u64) as *const u64;
        let bp_at = st.cfa.wrapping_add(st.rbp_off as i64 as u64) as *const u64;
        // The saved rbp matters only where the rest of the walk uses it (`needs_bp`): a program
        // that keeps a loop variable in rbp changes that word on every call.
        // The previous walk of this same thread read these aligned words (the rbp one only where
        // `rbp_off != 0`) inside the thread's stack mapping, which stays mapped while the thread
        // lives; the scratch is reset when its ring passes to another thread.
        // SAFETY: reading words the previous walk of this thread read, as explained above.
        let same = unsafe { ra_at.read() == st.ra && (!st.needs_bp || bp_at.read() == st.bp) };
        if !same {
            return Err(i + 1);
        }
    }
    // Recorded steps are a contiguous tail: the library's own leading frames come first.
    let first = (j + 1).max(s.walk_rec0 as usize).min(len);
    let count = len - first;
    let why = StopReason::from_u8(s.walk_reason).unwrap_or(StopReason::BadFrame);
    if n + count > max {
        for m in 0..max - n {
            s.frames[n + m] = s.steps[first + m].walk.ra;
        }
        return Ok((max, StopReason::MaxDepth, false));
    }
    if why == StopReason::MaxDepth && n + count < max {
        // The previous walk was cut at its limit, sooner than this one would be: what lies
        // beyond was never seen.
        return Err(len);
    }
    if n == 0 && first == s.walk_rec0 as usize {
        return Ok((count, why, true));
    }
    for m in 0..count {
        s.frames[n + m] = s.steps[first + m].walk.ra;
    }
    Ok((n + count, why, false))
}

/// Makes the current walk (its first `k` steps, then the previous walk's steps after `j`) the
/// previous walk for the next capture.
#[inline]
fn join(s: &mut Scratch, k: usize, j: usize) {
    if k == 1 && j == 0 {
        // Joined at the first step: that step equals the previous walk's in every field a later
        // join compares (rbp only where it is needed), so the previous walk stands as it is.
        return;
    }
    let len = s.walk_len as usize;
    let tail = len - (j + 1);
    if k + tail > WALK_CAP {
        s.walk_len = 0;
        return;
    }
    let need = s.steps[j].walk.needs_bp;
    s.steps[k - 1].head.needs_bp = need;
    let last = s.steps[k - 1].head;
    mark_bp_needs(
        s.steps[..k - 1].iter_mut().map(|p| &mut p.head),
        last.cfa_rbp || (last.rbp_off == 0 && need),
    );
    // The previous walk's steps after `j` move to `k` on (as `copy_within` would).
    if k < j + 1 {
        for i in 0..tail {
            s.steps[k + i].walk = s.steps[j + 1 + i].walk;
        }
    } else if k > j + 1 {
        for i in (0..tail).rev() {
            s.steps[k + i].walk = s.steps[j + 1 + i].walk;
        }
    }
    for p in &mut s.steps[..k] {
        p.walk = p.head;
    }
    s.walk_len = (k + tail) as u32;
    s.walk_rec0 = match s.steps[..k].iter().position(|p| p.head.recorded) {
        Some(i) => i,
        None => k + (s.walk_rec0 as usize).saturating_sub(j + 1),
    } as u32;
}
