//! The tracer core behind the hooks: initialisation, per-thread set-up, recording one event, the
//! writer thread, fork and exit.
//!
//! Hot-path contract (`on_alloc`, `on_free` and what they call): no allocation through the hooked
//! allocator (only the real one, on a rule-cache miss), no stdio, no lock that another hook holds
//! while waiting: the rings are single-producer, the stack table is lock-free, and the only lock a
//! hook may wait for is the output lock, whose holders never wait for a hook.

extern crate alloc;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};

use leakhunt_format::slot::{self, Slot, FRAMES_PER_SLOT};
use leakhunt_format::{encode, AllocFn, ExitKind, FreeFn, StopReason};

use crate::tls::{Guard, ThreadState, LIFE_ACTIVE, LIFE_EXITING, LIFE_NEW};
use crate::{config, dedup, modules, out, real, ring, sys, unwind};

const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;
const DISABLED: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// Dense, process-wide event sequence (see the format's slot docs).
static SEQ: Seq = Seq(AtomicU64::new(0));

/// The sequence counter alone in its cache lines: every event of every thread writes it, and it
/// shared its line with words every hook reads (`jit::GEN`, `PID`), so each number taken on one
/// core cost the other cores a miss on those.
#[repr(C, align(128))]
struct Seq(AtomicU64);
static mut THREAD_KEY: libc::pthread_key_t = 0;

pub fn untracked() -> u64 {
    crate::tls::UNTRACKED.load(Ordering::Relaxed)
}

pub fn disable() {
    STATE.store(DISABLED, Ordering::Release);
}

/// A word that reads 1 in the process that set it and 0 in any child: it lives in a page the
/// kernel zeroes in every process made from this one (MADV_WIPEONFORK), by `fork` or by a raw
/// `clone` that runs no fork handlers. One load on the hot path tells a new process from its
/// parent before it can write into the parent's rings or trace. Where the kernel cannot wipe
/// pages, it points to a word that always reads 1, and only the life-cycle paths (which compare
/// pids) tell.
static PROC_WORD: AtomicPtr<AtomicU32> =
    AtomicPtr::new(core::ptr::addr_of!(ALWAYS_ONE) as *mut AtomicU32);
static ALWAYS_ONE: AtomicU32 = AtomicU32::new(1);

#[inline(always)]
fn same_process() -> bool {
    // SAFETY: PROC_WORD points to ALWAYS_ONE or to a page mapped once and never unmapped.
    unsafe { (*PROC_WORD.load(Ordering::Relaxed)).load(Ordering::Relaxed) != 0 }
}

/// Maps the wipe-on-fork page and marks this process in it.
fn init_proc_word() {
    let p = sys::mmap_anon(4096);
    if p.is_null() {
        return;
    }
    // SAFETY: advice on the page just mapped, which nothing else uses.
    if unsafe { libc::madvise(p.cast(), 4096, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: unmapping that page.
        unsafe { libc::munmap(p.cast(), 4096) };
        return;
    }
    let w = p as *mut AtomicU32;
    // SAFETY: a zeroed, aligned page: a valid AtomicU32 at its start.
    unsafe { (*w).store(1, Ordering::Relaxed) };
    PROC_WORD.store(w, Ordering::Release);
}

/// This process is the one whose trace the tracer's state describes: not a child made without
/// fork handlers (adopted here: traced as a child, or not at all) and not a `vfork` child or
/// other process sharing our memory (which must leave the parent's state alone).
fn this_process() -> bool {
    if STATE.load(Ordering::Acquire) != READY {
        return false;
    }
    if !same_process() {
        let Some(g) = Guard::enter() else {
            return false;
        };
        g.forwarding(become_adopted_child);
        return STATE.load(Ordering::Acquire) == READY;
    }
    sys::getpid() == PID.load(Ordering::Relaxed)
}

/// Enters the tracer for one hook call, or `None` when the event must not be recorded (tracer
/// off, not yet initialised, or this thread is already inside it).
#[inline(always)]
pub fn enter() -> Option<Guard> {
    if STATE.load(Ordering::Acquire) != READY || !same_process() {
        return enter_slow();
    }
    Guard::enter()
}

#[cold]
fn enter_slow() -> Option<Guard> {
    match STATE.load(Ordering::Acquire) {
        READY if same_process() => Guard::enter(),
        READY => {
            // The first call in a process made without fork handlers (a raw `clone`, `_Fork`):
            // its memory is a copy of its parent's, the tracer's state included. Inside a fork's
            // own handlers this thread is guarded, and the child handler does the same.
            let g = Guard::enter()?;
            g.forwarding(become_adopted_child);
            (STATE.load(Ordering::Acquire) == READY).then_some(g)
        }
        UNINIT => {
            if !real::ensure() {
                return None;
            }
            let g = Guard::enter()?;
            if STATE
                .compare_exchange(UNINIT, INITIALISING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                init_core();
                STATE.store(READY, Ordering::Release);
                Some(g)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Everything recording needs, done once by the first hook (or the constructor): the real
/// allocator, settings, the stack table, the module table and the trace header. Caller holds a
/// guard, so allocations here go untraced.
fn init_core() {
    config::load();
    crate::fds::note_stderr();
    init_proc_word();
    if !dedup::reset() {
        sys::diag("cannot map the stack table; the program runs untraced");
        STATE.store(DISABLED, Ordering::Release);
        return;
    }
    modules::rescan();
    crate::python::probe();
    // SAFETY: creating a key with a destructor that only touches the exiting thread's own state.
    unsafe { libc::pthread_key_create(core::ptr::addr_of_mut!(THREAD_KEY), Some(thread_exit)) };
    build_header();
}

fn read_file(path: &core::ffi::CStr) -> Vec<u8> {
    let mut v = Vec::new();
    // SAFETY: open/read/close on a buffer we own.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return v;
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            v.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(fd);
    }
    v
}

fn build_header() {
    let cmdline = read_file(c"/proc/self/cmdline");
    out::note_title(&cmdline);
    let argv = leakhunt_format::split_cmdline(&cmdline);
    let exe = modules::current()
        .and_then(|t| t.modules.first())
        .map(|m| m.path.clone())
        .unwrap_or_default();
    let h = encode::Header {
        arch: String::from("x86_64"),
        pointer_size: 8,
        little_endian: true,
        // SAFETY: getpid/getppid cannot fail.
        pid: {
            let pid = sys::getpid();
            PID.store(pid, Ordering::Relaxed);
            pid
        },
        // SAFETY: as above.
        ppid: unsafe { libc::getppid() } as u32,
        start_realtime_ns: sys::realtime_ns(),
        start_monotonic_ns: {
            let t = sys::monotonic_ns();
            START_NS.store(t, Ordering::Relaxed);
            t
        },
        exe,
        argv,
        max_frames: config::get().max_frames as u32,
    };
    let mut v = Vec::new();
    encode::header(&h, &mut v);
    // SAFETY: HEADER is written here, before any flush can read it (flushes need READY or the
    // constructor, both after this), and after fork in a child with one thread.
    unsafe { *core::ptr::addr_of_mut!(out::HEADER) = v };
}

/// The thread's ring, set up on its first event.
#[inline]
fn thread_ring(ts: &mut ThreadState) -> Option<&'static ring::Ring> {
    if ts.ring.is_null() {
        // What follows may call the allocator (pthread internals): pass those calls through.
        ts.depth = 2;
        if ts.life == LIFE_NEW {
            ts.tid = sys::gettid();
            let local = 0u8;
            (ts.stack_lo, ts.stack_hi) = sys::mapping_bounds(core::ptr::addr_of!(local) as usize);
            ts.life = LIFE_ACTIVE;
        }
        ts.ring = ring::acquire(ts.tid);
        if !ts.ring.is_null() && ts.life == LIFE_ACTIVE {
            // SAFETY: associates a non-null value with our key so its destructor runs at thread
            // exit; may allocate (second-level key storage), which depth 2 passes through.
            unsafe { libc::pthread_setspecific(THREAD_KEY, core::ptr::dangling::<c_void>()) };
        }
        ts.depth = 1;
        if ts.ring.is_null() {
            return None;
        }
    }
    // SAFETY: rings are never unmapped.
    Some(unsafe { &*ts.ring })
}

/// pthread key destructor: the thread is exiting. Its ring is handed back (drained later);
/// events after this point still get recorded, each through a ring taken and released at once.
unsafe extern "C" fn thread_exit(_v: *mut c_void) {
    let Some(g) = Guard::enter() else { return };
    let ts = g.ts();
    ts.life = LIFE_EXITING;
    release_ring(ts);
}

fn release_ring(ts: &mut ThreadState) {
    if !ts.ring.is_null() {
        // SAFETY: our own ring; the owner gives it up.
        unsafe { (*ts.ring).state.store(ring::ORPHAN, Ordering::Release) };
        ts.ring = core::ptr::null_mut();
    }
}

/// Waits until the ring has `n` free slots.
#[inline]
fn reserve(r: &ring::Ring, n: usize) {
    while r.space() < n as u64 {
        out::make_room(r);
    }
}

/// After a hook published: its hold ends first (an exiting thread's ring may pass to another
/// thread at once, whose hold this one must not end).
#[inline]
fn after_publish(ts: &mut ThreadState, held: Held) {
    drop(held);
    if ts.life == LIFE_EXITING {
        release_ring(ts);
    }
    if out::FINAL.load(Ordering::Relaxed) {
        out::flush();
    }
}

/// A hook's use of its thread's ring and scratch (see [`ring::Ring::hold`]), ended when dropped:
/// meanwhile the writer gives none of their pages back.
pub struct Held(&'static ring::Ring);

impl Drop for Held {
    #[inline]
    fn drop(&mut self) {
        self.0.unhold();
    }
}

/// Holds the ring and takes the event's sequence number: its locked add is the handshake's
/// fence (see [`ring::Ring::hold`]).
#[inline]
fn hold_numbered(r: &'static ring::Ring) -> (Held, u64) {
    r.hold();
    let seq = SEQ.0.fetch_add(1, Ordering::SeqCst);
    r.check_park();
    (Held(r), seq)
}

/// Holds the ring where the hook's number was taken before.
#[inline]
fn hold(r: &'static ring::Ring) -> Held {
    r.hold();
    // The handshake's locked instruction (`mfence` on x86-64), where no number is taken.
    core::sync::atomic::fence(Ordering::SeqCst);
    r.check_park();
    Held(r)
}

/// Captures the stack and interns it; returns (id, stack slots to send first: 0 if known).
#[inline]
fn stack_for(ts: &mut ThreadState, r: &ring::Ring) -> (u32, usize, usize, StopReason) {
    // SAFETY: the scratch belongs to the ring this thread owns.
    let s = unsafe { &mut *r.scratch };
    // The stack mapping this walk may read: the thread's own, unless a signal handler runs on an
    // alternate stack (then that one, and the walk stays on it).
    let local = 0u8;
    let sp = core::ptr::addr_of!(local) as usize;
    let mut hi = ts.stack_hi;
    let mut other_stack = false;
    if ts.stack_hi != 0 && (sp < ts.stack_lo || sp >= ts.stack_hi) {
        let (lo, end) = sys::mapping_bounds(sp);
        if end == ts.stack_hi {
            ts.stack_lo = lo; // the main thread's stack grew
        } else {
            hi = end;
            other_stack = true;
        }
    }
    // CPython's frames of this thread, if it runs Python code: spliced in below.
    let npy = crate::python::frames(&mut s.py);
    let py_hash = crate::python::hash(&s.py[..npy]);
    let max = config::get().max_frames;
    let (n, reason, same) = unwind::capture(
        s,
        max,
        hi,
        other_stack || !config::get().unwind_reuse,
        py_hash,
        (ts.stack_lo, ts.stack_hi),
    );
    if let Some((id, _)) = s.repeated_id() {
        // A walk this thread made before, repeated whole, under the same interpreter frames:
        // its stack was interned then.
        return (id, 0, n, reason);
    }
    let ugen = modules::GEN.load(Ordering::Relaxed);
    if npy > 0 {
        if same {
            s.frames[..n].copy_from_slice(&s.prev[..n]);
        }
        // `prev` holds the last walk's own frames (what `same` refers to); no native-only id
        // stands for them.
        s.prev[..n].copy_from_slice(&s.frames[..n]);
        s.prev_id = 0;
        let cap = max.min(unwind::MAX_FRAMES_CAP);
        let m = crate::python::splice(&s.frames[..n], &s.py[..npy], &mut s.spliced[..cap]);
        s.frames[..m].copy_from_slice(&s.spliced[..m]);
        let reason = if m == cap && m > n && reason == StopReason::End {
            StopReason::MaxDepth
        } else {
            reason
        };
        let meta = m as u64 | (reason as u64) << 16 | (ugen as u64) << 32;
        // (`stack_slot` takes the unload generation from here.)
        s.prev_meta = meta;
        let (id, new) = dedup::intern(&s.frames[..m], meta);
        s.set_check_id(id, meta);
        return (id, if new { slot::stack_slots(m) } else { 0 }, m, reason);
    }
    let meta = n as u64 | (reason as u64) << 16 | (ugen as u64) << 32;
    if s.prev_id != 0 && s.prev_meta == meta && (same || s.prev[..n] == s.frames[..n]) {
        s.set_check_id(s.prev_id, meta);
        return (s.prev_id, 0, n, reason);
    }
    if same {
        // The frames are the previous capture's, which was not interned (the table was full).
        s.frames[..n].copy_from_slice(&s.prev[..n]);
    }
    let (id, new) = dedup::intern(&s.frames[..n], meta);
    s.prev[..n].copy_from_slice(&s.frames[..n]);
    s.prev_meta = meta;
    s.prev_id = id;
    s.set_check_id(id, meta);
    (id, if new { slot::stack_slots(n) } else { 0 }, n, reason)
}

/// Fills stack record slots `i` (0 = header) for the frames in the scratch.
#[inline]
fn stack_slot(r: &ring::Ring, id: u32, n: usize, reason: StopReason, i: usize, out: &mut Slot) {
    // SAFETY: the scratch belongs to the ring this thread owns.
    let s = unsafe { &*r.scratch };
    if i == 0 {
        let gen = (s.prev_meta >> 32) as u32;
        *out = slot::stack_header(id, gen, reason, n as u16);
    } else {
        let from = (i - 1) * FRAMES_PER_SLOT;
        *out = slot::frames(&s.frames[from..n.min(from + FRAMES_PER_SLOT)]);
    }
}

/// Records an allocation that the real allocator just returned.
#[inline]
pub fn on_alloc(g: &Guard, f: AllocFn, p: *mut c_void, size: usize) {
    if config::get().orphans {
        note_heap(p, size);
    }
    let ts = g.ts();
    let Some(r) = thread_ring(ts) else { return };
    // Numbered before the capture (which uses the scratch), after the real allocation returned.
    let (held, seq) = hold_numbered(r);
    let (id, stack_slots, n, reason) = stack_for(ts, r);
    let total = stack_slots + 1;
    reserve(r, total);
    r.publish(total, |i, s| {
        if i < stack_slots {
            stack_slot(r, id, n, reason, i, s);
        } else {
            *s = slot::alloc(f, id, seq, p as u64, size as u64);
        }
    });
    after_publish(ts, held);
}

/// Records a free; called before the real free, so its sequence number precedes any reuse.
#[inline]
pub fn on_free(g: &Guard, f: FreeFn, p: *mut c_void, mallocs: bool) {
    if config::get().orphans {
        on_free_with_content(g, f, p, mallocs);
        return;
    }
    let ts = g.ts();
    let Some(r) = thread_ring(ts) else { return };
    let (held, seq) = hold_numbered(r);
    reserve(r, 1);
    r.publish(1, |_, s| *s = slot::free(f, seq, p as u64));
    after_publish(ts, held);
}

/// A free with orphans on: its stack, and a `CONTENT` record of the heap pointers the block still
/// holds, before the `FREE` (all read before the real free runs).
#[inline(never)]
fn on_free_with_content(g: &Guard, f: FreeFn, p: *mut c_void, mallocs: bool) {
    let ts = g.ts();
    let Some(r) = thread_ring(ts) else { return };
    let (held, seq) = hold_numbered(r);
    let (id, stack_slots, n, reason) = stack_for(ts, r);
    // A block of a C++ runtime's own pool is not measured (its words are not read).
    let words = if mallocs { read_content(r, p, 0).0 } else { 0 };
    let cslots = slot::content_slots(words);
    let total = stack_slots + cslots + 1;
    reserve(r, total);
    r.publish(total, |i, s| {
        if i < stack_slots {
            stack_slot(r, id, n, reason, i, s);
        } else if i < stack_slots + cslots {
            content_slot(r, id, p, words, i - stack_slots, s);
        } else {
            *s = slot::free(f, seq, p as u64);
        }
    });
    after_publish(ts, held);
}

// ---- orphan sites (`LEAKHUNT_ORPHANS=1`) ---------------------------------------------------

/// The lowest block start and the highest block end the traced allocator has returned (orphans
/// only; relaxed: a word is taken for a heap pointer when it lies between them).
static HEAP_LO: AtomicU64 = AtomicU64::new(u64::MAX);
static HEAP_HI: AtomicU64 = AtomicU64::new(0);

/// Widens the heap range to cover the block `[p, p + size)`. Read-mostly: a store only when
/// the range grows.
#[inline]
fn note_heap(p: *mut c_void, size: usize) {
    let lo = p as u64;
    let hi = lo.saturating_add(size.max(1) as u64);
    if lo < HEAP_LO.load(Ordering::Relaxed) {
        HEAP_LO.fetch_min(lo, Ordering::Relaxed);
    }
    if hi > HEAP_HI.load(Ordering::Relaxed) {
        HEAP_HI.fetch_max(hi, Ordering::Relaxed);
    }
}

/// The first word offset that a `realloc` to `size` bytes loses: the first whose 8 bytes do not
/// all fit below `size`.
#[inline]
fn lost_from(size: usize) -> usize {
    size.saturating_sub(7).next_multiple_of(8)
}

/// Collects into `out` the (offset, word) pairs of the 8-byte words at offsets `from..end` of the
/// block at `p` (offsets multiples of 8, `from` rounded up) whose value is 8-byte aligned and in
/// `[lo, hi)`, at most `out.len()` of them, in ascending order. Returns how many.
///
/// # Safety
/// `p` is 8-byte aligned and `[p, p + end)` is readable.
unsafe fn heap_words(
    p: *const u64,
    from: usize,
    end: usize,
    (lo, hi): (u64, u64),
    out: &mut [(u64, u64)],
) -> usize {
    let mut n = 0;
    let mut off = from.next_multiple_of(8);
    while off + 8 <= end && n < out.len() {
        // SAFETY: `off + 8 <= end`, inside the readable range; `p` and `off` are 8-aligned.
        let w = unsafe { p.byte_add(off).read() };
        if w >= lo && w < hi && w.is_multiple_of(8) {
            out[n] = (off as u64, w);
            n += 1;
        }
        off += 8;
    }
    n
}

/// Reads the heap pointers of the live block `p` from offset `from` into the ring's scratch
/// (at most `CONTENT_BYTES` into the block, and never past what the real allocator says is
/// usable). Returns (how many, the block's usable size).
fn read_content(r: &ring::Ring, p: *mut c_void, from: usize) -> (usize, usize) {
    // SAFETY: `p` is a live block of the real allocator: the caller is about to free or realloc
    // it (what a double free does here, the real free would do next).
    let usable = unsafe { real::usable_size(p) };
    if !(p as usize).is_multiple_of(8) {
        return (0, usable);
    }
    let end = usable.min(slot::CONTENT_BYTES as usize);
    let range = (
        HEAP_LO.load(Ordering::Relaxed),
        HEAP_HI.load(Ordering::Relaxed),
    );
    // SAFETY: the scratch belongs to the ring this thread owns.
    let s = unsafe { &mut *r.scratch };
    // SAFETY: `p` is 8-aligned (checked) and its first `usable` bytes are the block's, readable;
    // `end <= usable`.
    let n = unsafe { heap_words(p as *const u64, from, end, range, &mut s.content) };
    (n, usable)
}

/// Fills slot `i` (0 = header) of the `CONTENT` record of block `p`, freed at stack `id`, whose
/// `words` pairs are in the scratch.
#[inline]
fn content_slot(r: &ring::Ring, id: u32, p: *mut c_void, words: usize, i: usize, out: &mut Slot) {
    // SAFETY: the scratch belongs to the ring this thread owns.
    let s = unsafe { &*r.scratch };
    if i == 0 {
        *out = slot::content_header(id, p as u64, words as u16);
    } else {
        let from = (i - 1) * slot::PAIRS_PER_SLOT;
        *out = slot::content_pairs(&s.content[from..words.min(from + slot::PAIRS_PER_SLOT)]);
    }
}

/// What a `realloc` is about to drop, read before the real call (orphans on): the heap pointers
/// of the old block past the new size, and the old block's usable size.
#[derive(Clone, Copy)]
pub struct Dropped {
    words: usize,
    usable: usize,
}

/// Before `realloc(p, size)` of a live block, with orphans on: reads the words it may drop into
/// the thread's scratch (held since [`take_realloc_seq`]), where `on_realloc` finds them.
pub fn before_realloc(held: &Option<Held>, p: *mut c_void, size: usize) -> Option<Dropped> {
    if !config::get().orphans {
        return None;
    }
    let r = held.as_ref()?.0;
    let (words, usable) = read_content(r, p, lost_from(size));
    Some(Dropped { words, usable })
}

/// The next sequence number to be taken: every event already published holds a lower one.
pub fn seq_next() -> u64 {
    SEQ.0.load(Ordering::Acquire)
}

/// A sequence number taken before a `realloc` of a live block, holding the thread's ring (if it
/// has one) until `on_realloc`, which uses both afterwards.
#[inline]
pub fn take_realloc_seq(g: &Guard) -> (Option<Held>, u64) {
    match thread_ring(g.ts()) {
        Some(r) => {
            let (h, seq) = hold_numbered(r);
            (Some(h), seq)
        }
        None => (None, SEQ.0.fetch_add(1, Ordering::Relaxed)),
    }
}

/// Records the outcome of `realloc(old, size) = new` whose free sequence number was taken before
/// the call: success is a free of `old` and an allocation of `new`; `realloc(p, 0)` freeing `p`
/// is a free; a failure leaves `old` alone and spends the number on a no-op.
///
/// With orphans on (`dropped`), a realloc that moved or shrank the block, or freed it, sends the
/// words it dropped (those past the new size) as a `CONTENT` record with the realloc's stack
/// before its `FREE`; one that grew in place sends none.
#[allow(clippy::too_many_arguments)]
pub fn on_realloc(
    g: &Guard,
    held: Option<Held>,
    free_seq: u64,
    old: *mut c_void,
    new: *mut c_void,
    size: usize,
    f: AllocFn,
    dropped: Option<Dropped>,
) {
    let ts = g.ts();
    let Some(r) = thread_ring(ts) else {
        abandon_seq(free_seq);
        return;
    };
    // The ring taken before the call, or (none then) taken now.
    let held = match held {
        Some(h) if core::ptr::eq(h.0, r) => h,
        other => {
            // (Not today's case: the ring cannot change during the call.)
            drop(other);
            hold(r)
        }
    };
    let freed = !new.is_null() || size == 0;
    let dropped = dropped.filter(|d| freed && (new != old || size < d.usable));
    if let Some(d) = dropped {
        if new.is_null() {
            let (id, stack_slots, n, reason) = stack_for(ts, r);
            let cslots = slot::content_slots(d.words);
            let total = stack_slots + cslots + 1;
            reserve(r, total);
            r.publish(total, |i, s| {
                if i < stack_slots {
                    stack_slot(r, id, n, reason, i, s);
                } else if i < stack_slots + cslots {
                    content_slot(r, id, old, d.words, i - stack_slots, s);
                } else {
                    *s = slot::free(FreeFn::Realloc, free_seq, old as u64);
                }
            });
            after_publish(ts, held);
            return;
        }
    }
    if new.is_null() {
        reserve(r, 1);
        r.publish(1, |_, s| {
            *s = if freed {
                slot::free(FreeFn::Realloc, free_seq, old as u64)
            } else {
                slot::nop(free_seq)
            }
        });
        after_publish(ts, held);
        return;
    }
    if config::get().orphans {
        note_heap(new, size);
    }
    let (id, stack_slots, n, reason) = stack_for(ts, r);
    if let Some(d) = dropped {
        // The stack first, then what the old block dropped right before its `FREE`.
        let cslots = slot::content_slots(d.words);
        let total = stack_slots + cslots + 2;
        reserve(r, total);
        let seq = SEQ.0.fetch_add(1, Ordering::Relaxed);
        r.publish(total, |i, s| {
            if i < stack_slots {
                stack_slot(r, id, n, reason, i, s);
            } else if i < stack_slots + cslots {
                content_slot(r, id, old, d.words, i - stack_slots, s);
            } else if i == stack_slots + cslots {
                *s = slot::free(FreeFn::Realloc, free_seq, old as u64);
            } else {
                *s = slot::alloc(f, id, seq, new as u64, size as u64);
            }
        });
        after_publish(ts, held);
        return;
    }
    let total = stack_slots + 2;
    reserve(r, total);
    let seq = SEQ.0.fetch_add(1, Ordering::Relaxed);
    r.publish(total, |i, s| {
        if i == 0 {
            *s = slot::free(FreeFn::Realloc, free_seq, old as u64);
        } else if i <= stack_slots {
            stack_slot(r, id, n, reason, i - 1, s);
        } else {
            *s = slot::alloc(f, id, seq, new as u64, size as u64);
        }
    });
    after_publish(ts, held);
}

/// Before `fork()` with forks followed: the sequence number that marks the fork point (the
/// child's heap is the parent's live blocks as of the events before it; no pair is elided
/// across it).
pub fn before_fork() -> Option<u64> {
    if !config::get().follow_forks || !this_process() || STATE.load(Ordering::Acquire) != READY {
        return None;
    }
    let g = Guard::enter()?;
    Some(g.forwarding(|| out::fork_point(|| SEQ.0.fetch_add(1, Ordering::Relaxed))))
}

/// After `fork()` in a child that is traced: say so first, with the parent's fork point, so that
/// the reader starts its heap as the parent's there (an exec'd image says nothing of the kind).
pub fn after_fork_in_child(seq: u64) {
    if STATE.load(Ordering::Acquire) != READY {
        return;
    }
    let Some(g) = Guard::enter() else { return };
    let parent = sys::getppid();
    g.forwarding(|| out::forked(parent, seq));
}

/// After `fork()` in the parent: publish the fork point (`child` <= 0: fork failed, a no-op).
pub fn after_fork_in_parent(seq: u64, child: i32) {
    let Some(g) = Guard::enter() else {
        abandon_seq(seq);
        return;
    };
    let ts = g.ts();
    let Some(r) = thread_ring(ts) else {
        abandon_seq(seq);
        return;
    };
    let held = hold(r);
    reserve(r, 1);
    r.publish(1, |_, s| {
        *s = if child > 0 {
            slot::fork(seq, child as u32)
        } else {
            slot::nop(seq)
        }
    });
    after_publish(ts, held);
}

/// A realloc whose free number was taken but whose event cannot be published (no ring): the
/// reader sees the gap, and the statistics say why.
fn abandon_seq(_seq: u64) {
    out::EVENTS_LOST.fetch_add(1, Ordering::Relaxed);
}

// ---- writer thread -------------------------------------------------------------------------

/// The writer thread's id (0 before it runs): its stack and registers are no roots of a heap scan.
pub static WRITER_TID: AtomicU32 = AtomicU32::new(0);

extern "C" fn writer_main(_: *mut c_void) -> *mut c_void {
    Guard::mark_internal();
    WRITER_TID.store(sys::gettid(), Ordering::Relaxed);
    // SAFETY: blocking every signal in this thread only; the program's signals go to its threads.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, core::ptr::null_mut());
    }
    // This thread's timers fire when asked (the default 50 µs of slack nearly doubles a poll's
    // 100 µs on a virtual machine); the program's threads keep theirs.
    // SAFETY: prctl with an integer argument; it changes only the calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let every = config::get().epoch_ns;
    let snap_every = config::get().snapshot_ns;
    let start = sys::monotonic_ns();
    let mut next_epoch = start.saturating_add(every);
    let mut next_snap = start.saturating_add(snap_every);
    let mut snaps = 0u64;
    loop {
        let polling = ring::POLLING.load(Ordering::Relaxed) != 0;
        if polling {
            sys::futex_wait_ns(&ring::WAKE, 0, ring::POLL_NS);
        } else {
            let wait_ms = if every == 0 {
                20
            } else {
                (next_epoch.saturating_sub(sys::monotonic_ns()) / 1_000_000).clamp(1, 20)
            };
            sys::futex_wait(&ring::WAKE, 0, wait_ms);
        }
        ring::WAKE.store(0, Ordering::Release);
        if out::is_off() {
            // Nothing to write to any more; keep draining so producers never wait forever.
            ring::POLLING.store(0, Ordering::SeqCst);
            out::flush();
            sys::futex_wait(&ring::WAKE, 0, 200);
            continue;
        }
        let now = sys::monotonic_ns();
        let mut name_buf = [0u8; 255];
        if let Some((n, req, flags)) = crate::control::poll(&mut name_buf) {
            // `leakhunt snapshot PID --name NAME [--reachability]`.
            snapshot(&name_buf[..n]);
            if flags & leakhunt_format::control::SCAN != 0 && config::get().reach {
                // The program's threads are held while the heap is read; this one waits.
                out::reach_scan(0, true, false);
            }
            crate::control::done(req);
        } else if snap_every != 0 && now >= next_snap {
            snaps += 1;
            let mut buf = [0u8; 32];
            let mut digits = [0u8; 20];
            let d = sys::fmt_u64(&mut digits, snaps);
            buf[..5].copy_from_slice(b"auto-");
            buf[5..5 + d.len()].copy_from_slice(d);
            snapshot(&buf[..5 + d.len()]);
            next_snap = (next_snap + snap_every).max(now + snap_every / 2);
        } else if every != 0 && now >= next_epoch {
            // Events numbered below this point were taken before the boundary.
            out::epoch(|| SEQ.0.load(Ordering::Acquire), None);
            // A boundary late by more than an interval (the machine stalled) is not doubled.
            next_epoch = (next_epoch + every).max(now + every / 2);
        } else {
            out::flush_and_give_back(now);
        }
        // Poll while the program keeps rings busy, unless more rings were ever made than may be
        // large (many threads share the cores: a timer every POLL_NS would take from them; a
        // process that once had that many threads, and its forks, keep waiting); else wait to
        // be woken. The store clearing it comes before the next futex wait reads `WAKE` (see
        // `ring::wake_writer`).
        let busy = out::LAST_PASS_SLOTS.load(Ordering::Relaxed) >= ring::POLL_BUSY_SLOTS
            && ring::RING_COUNT.load(Ordering::Relaxed) <= ring::big_max();
        if busy != polling {
            ring::POLLING.store(busy as u32, Ordering::SeqCst);
        }
    }
}

fn start_writer() {
    crate::side::start();
    // Its first act is to mark itself internal, so its own allocations (pthread's, glibc's) are
    // never traced.
    if !sys::spawn_detached(writer_main, 256 * 1024) {
        sys::diag("cannot start the writer thread; events are flushed by the program's threads");
    }
}

// ---- process life cycle --------------------------------------------------------------------

extern "C" fn fork_prepare() {
    if let Some(g) = Guard::enter() {
        // Held across fork (depth 2: pass-through), released by the parent and child handlers.
        // SAFETY: this thread's own TLS.
        unsafe { (*crate::tls::state()).depth = 2 };
        core::mem::forget(g);
    }
    out::LOCK.acquire_raw();
    modules::LOCK.acquire_raw();
    crate::python::LOCK.acquire_raw();
}

extern "C" fn fork_parent() {
    crate::python::LOCK.reset();
    modules::LOCK.reset();
    out::LOCK.reset();
    // SAFETY: this thread's own TLS; undoes the guard taken in prepare.
    unsafe { (*crate::tls::state()).depth = 0 };
}

extern "C" fn fork_child() {
    become_child(false);
    // SAFETY: this thread's own TLS; undoes the guard taken in prepare.
    unsafe { (*crate::tls::state()).depth = 0 };
}

/// A process made without fork handlers, found at its first call: a child like a fork's, whose
/// trace says that its inherited blocks are unknown (no fork point was marked for it).
fn become_adopted_child() {
    become_child(true);
}

/// In a new process (a fork child, or one made without fork handlers), with one thread, guarded:
/// forget the parent's output, control socket and unsent events; with children traced, start
/// this process's own trace, else stop recording for good. Whatever the parent's other threads
/// held (locks) is gone with them.
fn become_child(adopted: bool) {
    // SAFETY: the proc word's page, zeroed in this process: mark it as this process's.
    unsafe { (*PROC_WORD.load(Ordering::Relaxed)).store(1, Ordering::Relaxed) };
    modules::LOCK.reset();
    crate::python::LOCK.reset();
    crate::jit::after_fork_child();
    crate::unwind::after_fork_child();
    // The parent's writer was polling or woken; this process's (if it gets one) starts waiting.
    ring::POLLING.store(0, Ordering::SeqCst);
    ring::WAKE.store(0, Ordering::Relaxed);
    // The parent's control socket is the parent's (a traced child opens its own).
    crate::control::close(false);
    crate::side::after_fork_child();
    let trace = config::get().follow_forks && STATE.load(Ordering::Acquire) == READY;
    // Whether it was made without fork handlers is known before its writer can write a header.
    out::after_fork_child(trace, adopted);
    let ts = crate::tls::state();
    // SAFETY: the child has one thread; its TLS is ours to reset.
    unsafe {
        (*ts).ring = core::ptr::null_mut();
        (*ts).tid = sys::gettid();
    }
    if trace {
        SEQ.0.store(0, Ordering::Relaxed);
        if !dedup::reset() {
            disable();
        }
        build_header();
        ring::after_fork_child(true);
        start_writer();
    } else {
        ring::after_fork_child(false);
        disable();
    }
}

/// The library constructor: initialise (if no hook did yet), open the output, start the writer,
/// hook fork and the fatal signals, and keep children untraced unless asked.
pub extern "C" fn constructor() {
    start();
    // What the start-up's frames left on this stack (a block's address the tracer's own
    // allocations once had among them) would lie under the program's uninitialised locals.
    sys::scrub_stack();
}

fn start() {
    if STATE.load(Ordering::Acquire) == UNINIT {
        drop(enter_slow());
    }
    if STATE.load(Ordering::Acquire) != READY {
        return;
    }
    let Some(g) = Guard::enter() else { return };
    g.forwarding(|| {
        // SAFETY: registering plain C callbacks.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
        if config::get().strip_env {
            // SAFETY: before main, only this thread runs; `environ` is libc's array.
            unsafe { crate::env::strip_from(crate::env::environ()) };
        }
        out::flush();
        if out::is_off() {
            return;
        }
        crate::signals::install();
        start_writer();
    });
}

/// This process's pid, as recorded in the trace header.
pub static PID: AtomicU32 = AtomicU32::new(0);
/// The header's monotonic start time: with the pid, it names this process image's ring files.
pub static START_NS: AtomicU64 = AtomicU64::new(0);

static EXIT_CODE: AtomicU64 = AtomicU64::new(u64::MAX);

/// `exit(code)` seen: remember the code for the exit record (not a vfork child's: it shares
/// our memory, and its exit is not ours).
pub fn note_exit_code(code: i32) {
    // A child made without fork handlers that calls exit() before anything else is adopted
    // here, so that its own exit record has its code.
    if this_process() {
        EXIT_CODE.store(code as u32 as u64, Ordering::Relaxed);
    }
}

/// Where the program's part of the exiting thread's stack ends, seen when it called `exit` (or
/// returned from `main`), and that thread: the heap scan at exit starts there, as memcheck's
/// does from the stack pointer of that moment. What lies below (the frames of exit handlers,
/// of libc's clean-up, of the tracer's own hooks, long gone) holds stale words that memcheck,
/// which knows which stack words were written since, does not read either.
static EXIT_SP: AtomicU64 = AtomicU64::new(0);
static EXIT_TID: AtomicU32 = AtomicU32::new(0);

/// The program's thread calls `exit` (or `main` returned) with its stack pointer at `sp`.
pub fn note_exit_sp(sp: u64) {
    if this_process()
        && EXIT_SP
            .compare_exchange(0, sp, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        EXIT_TID.store(sys::gettid(), Ordering::Release);
    }
}

/// The pre-exit scan was made (or not wanted): once per process.
static PRE_EXIT_DONE: AtomicBool = AtomicBool::new(false);

/// The program starts to exit (main returned, or it called `exit`) on this thread, its stack
/// pointer at `sp`: before its exit handlers and destructors free what they free (a global
/// object's containers), a heap scan (`pre-exit`: no epoch boundary of its own), so that what
/// held the blocks that grew is seen whole. Under `leakhunt run`, once the trace has a growth report's
/// three epoch boundaries (`LEAKHUNT_PRE_EXIT_SCAN`).
pub fn pre_exit_scan(sp: u64) {
    // (A vfork child's exit must not use up its parent's scan: it is not this process.)
    if !config::get().pre_exit_scan
        || !this_process()
        || out::epochs() < 3
        || PRE_EXIT_DONE.swap(true, Ordering::AcqRel)
    {
        return;
    }
    out::reach_scan(sp, false, true);
}

/// The stack pointer the heap scan starts this thread's stack at: where the program called
/// `exit`, when this thread did, else `here`.
fn scan_sp(here: u64) -> u64 {
    let sp = EXIT_SP.load(Ordering::Acquire);
    if sp > here && EXIT_TID.load(Ordering::Acquire) == sys::gettid() {
        sp
    } else {
        here
    }
}

/// `__libc_start_main` is about to call `main` with `envp`: when children are not traced, take
/// leakhunt out of that array too, should it differ from `environ` (another library's
/// constructor replaced `environ` before ours ran).
///
/// # Safety
/// `envp` is main's environment array (null-terminated, writable); only this thread runs.
pub unsafe fn before_main(envp: *mut *mut core::ffi::c_char) {
    if STATE.load(Ordering::Acquire) == UNINIT || !config::get().strip_env {
        return;
    }
    if envp != crate::env::environ() {
        let Some(g) = Guard::enter() else { return };
        // SAFETY: the caller's contract.
        g.forwarding(|| unsafe { crate::env::strip_from(envp) });
    }
}

/// The library destructor (late in exit): flush, write statistics and the exit code if known,
/// and from now on flush every event at once.
pub extern "C" fn destructor() {
    // The program's part of this thread's stack ends here: what lies below is ours.
    let sp = sys::stack_pointer();
    if !this_process() {
        return;
    }
    if config::get().freeres {
        run_freeres();
    }
    let code = EXIT_CODE.load(Ordering::Relaxed);
    let exit = (code != u64::MAX).then_some(ExitKind::Code(code as u32 as i32));
    if config::get().reach {
        out::reach_scan(scan_sp(sp), false, false);
    }
    crate::control::close(true);
    out::finish(exit, false);
    out::FINAL.store(true, Ordering::Release);
}

/// Asks libstdc++ and libc to free their internal buffers (the emergency exception pool, stdio
/// buffers, locale data), as valgrind does at exit, so that they do not read as leaks. Their frees
/// are recorded like any other.
fn run_freeres() {
    type Freeres = unsafe extern "C" fn();
    let mut fns: [Option<Freeres>; 2] = [None, None];
    if let Some(g) = Guard::enter() {
        g.forwarding(|| {
            for (slot, name) in fns
                .iter_mut()
                .zip([c"_ZN9__gnu_cxx9__freeresEv", c"__libc_freeres"])
            {
                // SAFETY: dlsym with a NUL-terminated name in the global scope.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                // SAFETY: both symbols are `void f(void)`.
                *slot = (!p.is_null())
                    .then(|| unsafe { core::mem::transmute::<*mut c_void, Freeres>(p) });
            }
        });
    }
    for f in fns.into_iter().flatten() {
        // SAFETY: the libraries' own clean-up entry points, called once at exit as valgrind does.
        unsafe { f() };
    }
}

/// `_exit(code)`: nothing else runs after it.
pub fn on_underscore_exit(code: i32) {
    let sp = sys::stack_pointer();
    // A vfork child whose exec failed calls `_exit(127)` here: its end is not ours.
    if !this_process() {
        return;
    }
    if config::get().reach {
        out::reach_scan(sp, false, false);
    }
    crate::control::close(true);
    out::finish(Some(ExitKind::Code(code)), false);
}

/// The process is about to replace its image (execve and friends): everything recorded so far goes
/// out, closed by an exit record saying so. If the exec fails, recording simply goes on and the
/// reader treats the record as void. A vfork child shares our memory but is another process: it
/// must not touch the parent's rings or stream.
///
/// `envp`: the environment the new image gets (null: `environ`). Where it is inherited as the
/// user set it, whether the new image is traced depends on it (this library in `LD_PRELOAD`).
pub fn before_exec(envp: *const *const core::ffi::c_char) {
    if !this_process() {
        return;
    }
    // The new image, if traced, opens its own control socket.
    crate::control::close(true);
    let cfg = config::get();
    let traced = cfg.trace_children
        || (!cfg.strip_env && {
            let envp = if envp.is_null() {
                crate::env::environ() as *const *const core::ffi::c_char
            } else {
                envp
            };
            crate::env::preloads_us(envp)
        });
    if !traced && out::end_fork_image_quietly() {
        // Events it recorded (its rings) go nowhere: the heap they describe ends with it.
        return;
    }
    out::finish(Some(ExitKind::Exec), false);
}

/// The environment to exec with: the caller's, plus what traces the new image when children are
/// traced and the caller's environment lacks it (see `env::child_env`).
pub fn exec_env(envp: *const *const core::ffi::c_char) -> Option<crate::env::ChildEnv> {
    if STATE.load(Ordering::Acquire) != READY || !config::get().trace_children {
        return None;
    }
    // A child made without fork handlers about to exec: adopt it first (the new image is traced
    // as its own process either way).
    this_process();
    let g = Guard::enter()?;
    g.forwarding(|| crate::env::child_env(envp))
}

/// Marks a named point (a snapshot): an epoch boundary with a name. Events numbered below the
/// sequence number read here happened before it.
pub fn snapshot(name: &[u8]) {
    if !this_process() {
        return;
    }
    out::epoch(|| SEQ.0.load(Ordering::Acquire), Some(name));
}

/// A fatal signal is about to kill the process.
pub fn on_fatal_signal(sig: i32) {
    if !this_process() {
        return;
    }
    crate::control::close(true);
    out::finish(Some(ExitKind::Signal(sig)), true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_words_keeps_aligned_words_in_the_range_at_word_offsets() {
        // A block of 8 words: pointers at 0x18 and 0x20, an unaligned one, one below and one at
        // the end of the range, small integers.
        let block: [u64; 8] = [5, 0x1000, 0x2fff, 0x1010, 0x1ff8, 0x2000, 0x0ff8, 0];
        let mut out = [(0u64, 0u64); 4];
        let range = (0x1000, 0x2000);
        // SAFETY: the block is a local array of 64 bytes, 8-aligned.
        let n = unsafe { heap_words(block.as_ptr(), 0, 64, range, &mut out) };
        assert_eq!(&out[..n], [(8, 0x1000), (0x18, 0x1010), (0x20, 0x1ff8)]);
        // From an offset (rounded up to a word), up to an end inside a word, at most `out.len()`.
        // SAFETY: as above.
        let n = unsafe { heap_words(block.as_ptr(), 9, 39, range, &mut out) };
        assert_eq!(&out[..n], [(0x18, 0x1010)]);
        let mut one = [(0u64, 0u64); 1];
        // SAFETY: as above.
        let n = unsafe { heap_words(block.as_ptr(), 0, 64, range, &mut one) };
        assert_eq!(&one[..n], [(8, 0x1000)]);
        // An empty range (nothing allocated yet) keeps nothing.
        // SAFETY: as above.
        let n = unsafe { heap_words(block.as_ptr(), 0, 64, (u64::MAX, 0), &mut out) };
        assert_eq!(n, 0);
    }

    #[test]
    fn a_realloc_loses_the_words_that_do_not_fit_whole() {
        assert_eq!(lost_from(0), 0);
        assert_eq!(lost_from(1), 0);
        assert_eq!(lost_from(8), 8);
        assert_eq!(lost_from(22), 16);
        assert_eq!(lost_from(24), 24);
        assert_eq!(lost_from(25), 24);
    }
}
