//! Per-thread single-producer rings in their own mappings, drained by whoever holds the output
//! lock (the writer thread, a hook whose ring is full, the exit and signal paths).
//!
//! A ring is never unmapped: when its thread exits it is marked orphaned, drained, and handed to
//! the next new thread, so memory is bounded by the largest number of threads alive at once.
//! The ring also carries that thread's unwind scratch (rule cache, previous stack).
//!
//! A ring starts small ([`SMALL_SLOTS`], 8 KiB): most threads of a program with many allocate
//! now and then, and each costs only that. A thread that fills its ring fast (two half-full
//! wake-ups of the writer within [`HOT_NS`]) gets a large one ([`RING_SLOTS`]), so that the
//! writer drains it in large batches instead of waking every few hundred events; at most
//! [`big_max`] rings are large at once (a program with more busy threads than that shares the
//! cores among them anyway, and the small rings' extra wake-ups are spread over them).
//!
//! Under `leakhunt run` (`LEAKHUNT_RING_DIR`), the slots live in a shared file with a small header
//! mirroring the ring's indices ([`leakhunt_format::ringfile`]): if the process is killed, the
//! CLI reads what reached the ring but not the socket. The file mapping is not inherited by fork
//! children (MADV_DONTFORK); a child maps its own (or anonymous memory) at the same address.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use leakhunt_format::ringfile;
use leakhunt_format::slot::{Slot, SLOT_LEN};

use crate::unwind::Scratch;
use crate::{config, sys, tracer};

/// Slots of a large ring (256 KiB of events): the most any ring holds.
pub const RING_SLOTS: u64 = 8192;
/// Slots of a new ring (8 KiB of events).
pub const SMALL_SLOTS: u64 = 256;
// The most slots one hook publishes at once (a realloc with orphans on: its stack, the old
// block's content, the free and the allocation) fit a small ring.
const _: () = assert!(
    leakhunt_format::slot::stack_slots(crate::unwind::MAX_FRAMES_CAP)
        + leakhunt_format::slot::content_slots(leakhunt_format::slot::MAX_CONTENT_PAIRS)
        + 2
        <= SMALL_SLOTS as usize
);
/// Two half-full wake-ups closer than this (128 events in 2 ms: 64 K events a second) make a
/// small ring large.
const HOT_NS: u64 = 2_000_000;
/// Rings made large so far (never fewer: a large ring passes to the next thread as it is).
static BIG_RINGS: AtomicU32 = AtomicU32::new(0);
static BIG_MAX: AtomicU32 = AtomicU32::new(0);

/// How many rings may be large: twice the CPUs this process may run on, at least 8, at most 64.
pub fn big_max() -> u32 {
    let m = BIG_MAX.load(Ordering::Relaxed);
    if m != 0 {
        return m;
    }
    let mut set = [0u64; 16];
    // SAFETY: the kernel writes at most `size_of_val(&set)` bytes of the affinity mask into it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            0,
            core::mem::size_of_val(&set),
            set.as_mut_ptr(),
        )
    };
    let cpus: u32 = if r > 0 {
        set.iter().map(|w| w.count_ones()).sum()
    } else {
        2
    };
    let m = (2 * cpus).clamp(8, 64);
    BIG_MAX.store(m, Ordering::Relaxed);
    m
}

pub const OWNED: u32 = 1;
/// Its thread is gone; drain it, then it becomes `FREE`.
pub const ORPHAN: u32 = 2;
pub const FREE: u32 = 3;

/// [`Ring::park`]: the ring is the owner's to use as it is.
const PARK_NONE: u32 = 0;
/// The writer is about to give the ring's pages back, unless the owner is using them: an owner
/// that sees this waits for one of the other two values.
const PARK_ASKED: u32 = 1;
/// The ring's slots and its scratch past the first page were given back (they read as zeros):
/// the owner forgets what its scratch kept there before it goes on.
const PARK_GIVEN: u32 = 2;
/// A ring whose head has not moved for this long while drained gives its pages back: the
/// threads of a pool that wait for work (or a thread that has exited) keep ~1 page of the
/// tracer's instead of 9 to 70. A thread that wakes touches them again (a fault a page, a few
/// microseconds in all), at most once every this long.
const IDLE_NS: u64 = 20_000_000;
/// [`Ring::idle_head`] before the writer watches the ring (or after it gave its pages back).
const NOT_WATCHED: u64 = u64::MAX;

/// Invariants: `head` is written only by the owning thread, `tail` only under the output lock;
/// slots in `[tail, head)` are published and immutable until `tail` passes them. `cap`, `slots`,
/// `mirror` and `file_no` change only when the owning thread makes its ring large, under the
/// output lock with the ring empty: the owner reads them freely, others under the lock.
#[repr(C, align(64))]
pub struct Ring {
    head: AtomicU64,
    /// The owner is inside a hook that uses the ring or its scratch (see [`Ring::hold`]).
    busy: AtomicU32,
    _p1: [u8; 52],
    tail: AtomicU64,
    /// Where the writer's current pass cut this ring's batch (under the output lock; see
    /// [`Ring::cut`]).
    cut: AtomicU64,
    /// [`PARK_NONE`], [`PARK_ASKED`] or [`PARK_GIVEN`] (see [`Ring::ask_give_back`]); in
    /// the line the owner reads `tail` from at every event.
    park: AtomicU32,
    /// `head` when the writer last saw it move, and when (monotonic ns); under the output lock.
    idle_head: AtomicU64,
    idle_since: AtomicU64,
    _p2: [u8; 20],
    pub tid: AtomicU32,
    pub state: AtomicU32,
    next: AtomicPtr<Ring>,
    /// Slots (a power of two): [`SMALL_SLOTS`] or [`RING_SLOTS`].
    cap: AtomicU64,
    slots: AtomicPtr<Slot>,
    pub scratch: *mut Scratch,
    /// The shared file's header page (null: the slots are anonymous memory).
    mirror: AtomicPtr<u8>,
    /// The ring file's number in its name (when `mirror` is not null).
    file_no: AtomicU32,
    /// When the owner last woke the writer at half full (monotonic ns; owner only).
    last_half: AtomicU64,
}

/// All rings ever created (push-only list).
static RINGS: AtomicPtr<Ring> = AtomicPtr::new(core::ptr::null_mut());
pub static RING_COUNT: AtomicU32 = AtomicU32::new(0);
/// The writer thread sleeps on this word; producers wake it when a ring passes half full.
pub static WAKE: AtomicU32 = AtomicU32::new(0);

fn rings() -> impl Iterator<Item = &'static Ring> {
    let mut p = RINGS.load(Ordering::Acquire);
    core::iter::from_fn(move || {
        if p.is_null() {
            return None;
        }
        // SAFETY: rings are never unmapped; `p` came from the registry.
        let r = unsafe { &*p };
        p = r.next.load(Ordering::Acquire);
        Some(r)
    })
}

/// Maps `cap` slots for a ring: a shared ring file when `leakhunt run` asked for them (falling
/// back to anonymous memory if the file cannot be made), else anonymous memory. Returns (file
/// header page or null, the file's number, slots).
fn map_slots(tid: u32, cap: u64, head: u64) -> Option<(*mut u8, u32, *mut Slot)> {
    let slots_len = cap as usize * SLOT_LEN;
    let no = RING_FILES.fetch_add(1, Ordering::Relaxed);
    if let Some(m) = map_ring_file(core::ptr::null_mut(), tid, head, no, cap) {
        // SAFETY: the file mapping is HEADER_LEN + slots_len bytes.
        return Some((m, no, unsafe { m.add(ringfile::HEADER_LEN) } as *mut Slot));
    }
    let p = sys::mmap_anon(slots_len);
    (!p.is_null()).then_some((core::ptr::null_mut(), 0, p as *mut Slot))
}

static RING_FILES: AtomicU32 = AtomicU32::new(0);

/// The path of this process image's ring file number `no`, NUL-terminated in `path`; false
/// without a ring directory.
fn ring_path(path: &mut [u8; 400], no: u32) -> bool {
    let Some(dir) = config::get().ring_dir() else {
        return false;
    };
    let dir = dir.to_bytes();
    *path = [0; 400];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(path.len() - 1 - n);
        path[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    let mut digits = [0u8; 20];
    put(dir);
    put(b"/");
    put(sys::fmt_u64(
        &mut digits,
        tracer::PID.load(Ordering::Relaxed) as u64,
    ));
    put(b"-");
    put(sys::fmt_u64(
        &mut digits,
        tracer::START_NS.load(Ordering::Relaxed),
    ));
    put(b"-");
    put(sys::fmt_u64(&mut digits, no as u64));
    put(b".ring");
    true
}

/// Creates this process image's ring file number `no` of `cap` slots and maps it shared (at `at`
/// if not null, replacing what is there), not inherited by fork children, its header filled in
/// with `head` as both indices. No allocation: the path is built on the stack.
fn map_ring_file(at: *mut u8, tid: u32, head: u64, no: u32, cap: u64) -> Option<*mut u8> {
    let mut path = [0u8; 400];
    if !ring_path(&mut path, no) {
        return None;
    }
    let len = ringfile::HEADER_LEN + cap as usize * SLOT_LEN;
    // SAFETY: `path` is NUL-terminated (zeroed beyond `n`); the descriptor is closed once mapped.
    let p = unsafe {
        let fd = libc::open(
            path.as_ptr().cast(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            return None;
        }
        if libc::ftruncate(fd, len as libc::off_t) != 0 {
            libc::close(fd);
            return None;
        }
        let flags = libc::MAP_SHARED | if at.is_null() { 0 } else { libc::MAP_FIXED };
        let p = libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        );
        libc::close(fd);
        if p == libc::MAP_FAILED {
            return None;
        }
        libc::madvise(p, len, libc::MADV_DONTFORK);
        if at.is_null() {
            sys::note_own(p.cast(), len);
        }
        p as *mut u8
    };
    // SAFETY: the header page is ours, mapped just above.
    unsafe {
        core::ptr::copy_nonoverlapping(ringfile::MAGIC.as_ptr(), p, 8);
        (p.add(ringfile::PID) as *mut u32).write(tracer::PID.load(Ordering::Relaxed));
        (p.add(ringfile::TID) as *mut u32).write(tid);
        (p.add(ringfile::SLOTS) as *mut u64).write(cap);
        (p.add(ringfile::HEAD) as *mut u64).write(head);
        (p.add(ringfile::TAIL) as *mut u64).write(head);
    }
    Some(p)
}

/// In a fork child: the parent's ring files are not mapped here (MADV_DONTFORK). Put the child's
/// own ring files (when children are traced) or anonymous memory at the same addresses, before
/// anything touches the slots. The rings were emptied by the output's fork handler.
pub fn after_fork_child(trace: bool) {
    for r in rings() {
        // The parent's writer may have been giving this ring's pages back when it forked (it
        // does so without the output lock): in this copy some of the scratch's may be, some
        // not. Given back here whole, so that what its owner forgets reads as zeros (the slots
        // hold nothing: the ring was drained).
        if r.park.load(Ordering::Relaxed) == PARK_ASKED {
            // SAFETY: the child has one thread, this one, which is not inside a hook.
            unsafe { r.discard_scratch() };
            r.park.store(PARK_GIVEN, Ordering::Relaxed);
        }
        let mirror = r.mirror.load(Ordering::Relaxed);
        if mirror.is_null() {
            continue;
        }
        let head = r.head.load(Ordering::Relaxed);
        let tid = r.tid.load(Ordering::Relaxed);
        let cap = r.cap();
        let no = RING_FILES.fetch_add(1, Ordering::Relaxed);
        let mapped = trace && map_ring_file(mirror, tid, head, no, cap).is_some();
        r.file_no.store(no, Ordering::Relaxed);
        if !mapped {
            let len = ringfile::HEADER_LEN + cap as usize * SLOT_LEN;
            // SAFETY: replaces (or fills, since the parent's mapping was not inherited) exactly
            // the range this ring's slots occupied, which nothing else uses.
            unsafe {
                libc::mmap(
                    mirror.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
            }
        }
    }
}

/// The scratch right after the ring's header, in the same page (the one page of the mapping
/// never given back: see [`Ring::ask_give_back`]).
const SCRATCH_AT: usize = core::mem::size_of::<Ring>();
const _: () = assert!(SCRATCH_AT.is_multiple_of(core::mem::align_of::<Scratch>()));
/// The header's mapping: the ring's header and its thread's scratch.
const HEAD_LEN: usize = SCRATCH_AT + core::mem::size_of::<Scratch>();
const PAGE: usize = 4096;
const _: () = assert!((SMALL_SLOTS as usize * SLOT_LEN).is_multiple_of(PAGE));
const _: () = assert!((RING_SLOTS as usize * SLOT_LEN).is_multiple_of(PAGE));

/// Takes a free ring or maps a new one for thread `tid`. Null if memory is exhausted.
pub fn acquire(tid: u32) -> *mut Ring {
    for r in rings() {
        if r.state
            .compare_exchange(FREE, OWNED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            r.tid.store(tid, Ordering::Relaxed);
            r.last_half.store(0, Ordering::Relaxed);
            r.mirror_u32(ringfile::TID, tid);
            // SAFETY: the scratch belongs to this ring, which this thread now owns alone.
            unsafe { (*r.scratch).reset_for_new_thread() };
            return r as *const Ring as *mut Ring;
        }
    }
    let base = sys::mmap_anon(HEAD_LEN);
    if base.is_null() {
        return core::ptr::null_mut();
    }
    let Some((mirror, file_no, slots)) = map_slots(tid, SMALL_SLOTS, 0) else {
        // SAFETY: unmaps the mapping made just above, which nothing else refers to.
        unsafe { libc::munmap(base.cast(), HEAD_LEN) };
        return core::ptr::null_mut();
    };
    let ring = base as *mut Ring;
    // SAFETY: `base` is a fresh zeroed mapping of the header followed by the scratch (all-zero
    // is its initial state), each aligned.
    unsafe {
        ring.write(Ring {
            head: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            _p1: [0; 52],
            tail: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            park: AtomicU32::new(PARK_NONE),
            idle_head: AtomicU64::new(NOT_WATCHED),
            idle_since: AtomicU64::new(0),
            _p2: [0; 20],
            tid: AtomicU32::new(tid),
            state: AtomicU32::new(OWNED),
            next: AtomicPtr::new(core::ptr::null_mut()),
            cap: AtomicU64::new(SMALL_SLOTS),
            slots: AtomicPtr::new(slots),
            scratch: base.add(SCRATCH_AT) as *mut Scratch,
            mirror: AtomicPtr::new(mirror),
            file_no: AtomicU32::new(file_no),
            last_half: AtomicU64::new(0),
        });
        (*(*ring).scratch).reset_for_new_thread();
    }
    let mut head = RINGS.load(Ordering::Acquire);
    loop {
        // SAFETY: `ring` is ours until published by the CAS below.
        unsafe { (*ring).next.store(head, Ordering::Relaxed) };
        match RINGS.compare_exchange_weak(head, ring, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    RING_COUNT.fetch_add(1, Ordering::Relaxed);
    ring
}

impl Ring {
    /// Its slots now (a power of two).
    #[inline]
    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    #[inline]
    fn mirror_u64(&self, at: usize, v: u64) {
        let m = self.mirror.load(Ordering::Relaxed);
        if !m.is_null() {
            // Atomic: the CLI reads it from another process. A ring file's header stays mapped
            // (a fork child remaps the page in place), and a replaced one is not unmapped.
            // SAFETY: `at` is an aligned field of the mapped ring file's header page.
            unsafe { (*(m.add(at) as *const AtomicU64)).store(v, Ordering::Release) };
        }
    }

    fn mirror_u32(&self, at: usize, v: u32) {
        let m = self.mirror.load(Ordering::Relaxed);
        if !m.is_null() {
            // SAFETY: as in `mirror_u64`.
            unsafe { (*(m.add(at) as *const AtomicU32)).store(v, Ordering::Release) };
        }
    }

    /// Called by the owner when its small ring passed half full: true when that happened twice
    /// within [`HOT_NS`] and a large ring may still be made.
    fn wants_large(&self) -> bool {
        if self.cap() != SMALL_SLOTS || BIG_RINGS.load(Ordering::Relaxed) >= big_max() {
            return false;
        }
        let now = sys::monotonic_ns();
        let last = self.last_half.swap(now, Ordering::Relaxed);
        last != 0 && now - last < HOT_NS
    }

    /// Makes this (empty) small ring large. The owner calls it holding the output lock, right
    /// after a flush drained every ring; false if the ring is not empty, the quota of large rings
    /// is spent or memory is short (the ring stays as it was).
    pub fn grow_locked(&self) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        if self.cap() != SMALL_SLOTS || self.tail.load(Ordering::Relaxed) != head {
            return false;
        }
        if BIG_RINGS.fetch_add(1, Ordering::Relaxed) >= big_max() {
            BIG_RINGS.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let tid = self.tid.load(Ordering::Relaxed);
        let Some((mirror, no, slots)) = map_slots(tid, RING_SLOTS, head) else {
            BIG_RINGS.fetch_sub(1, Ordering::Relaxed);
            return false;
        };
        let (old_mirror, old_no) = (
            self.mirror.load(Ordering::Relaxed),
            self.file_no.load(Ordering::Relaxed),
        );
        let old_slots = self.slots.load(Ordering::Relaxed);
        self.slots.store(slots, Ordering::Relaxed);
        self.mirror.store(mirror, Ordering::Relaxed);
        self.file_no.store(no, Ordering::Relaxed);
        self.cap.store(RING_SLOTS, Ordering::Relaxed);
        // The small slots stay mapped (the tracer's own memory: a heap scan reads it as zeros,
        // which a later mapping of someone else's at that address must not be), their pages
        // given back. The old ring file, empty, goes.
        let (start, len) = if old_mirror.is_null() {
            (old_slots as *mut u8, SMALL_SLOTS as usize * SLOT_LEN)
        } else {
            (
                old_mirror,
                ringfile::HEADER_LEN + SMALL_SLOTS as usize * SLOT_LEN,
            )
        };
        // SAFETY: the old slots (and file header page) are this ring's own mapping, which nothing
        // reads any more: the ring is empty and now points at its new slots.
        unsafe { discard(start, len, !old_mirror.is_null()) };
        let mut path = [0u8; 400];
        if !old_mirror.is_null() && ring_path(&mut path, old_no) {
            // SAFETY: `path` is NUL-terminated.
            unsafe { libc::unlink(path.as_ptr().cast()) };
        }
        true
    }

    /// The owner enters a hook that uses the ring or its scratch. Next it executes a locked
    /// instruction (the hook's sequence number, or a `SeqCst` fence) and [`Ring::check_park`],
    /// before it touches the slots or the scratch past its first page; it leaves with
    /// [`Ring::unhold`]. With the writer's side in [`Ring::ask_give_back`] this is Dekker's
    /// handshake: on x86-64 a locked instruction drains the store buffer, so either the writer
    /// sees `busy` set and leaves the pages alone, or the owner sees `park` set and waits. (A
    /// guarantee of the hardware's, not of the language's memory model, which would want
    /// sequentially consistent fences on both sides: the library builds for x86-64 only.)
    #[inline]
    pub fn hold(&self) {
        self.busy.store(1, Ordering::Relaxed);
    }

    /// See [`Ring::hold`]: after the locked instruction.
    #[inline]
    pub fn check_park(&self) {
        if self.park.load(Ordering::Relaxed) != PARK_NONE {
            self.unpark();
        }
    }

    /// The owner is done with the ring and its scratch for this hook.
    #[inline]
    pub fn unhold(&self) {
        self.busy.store(0, Ordering::Release);
    }

    /// The writer is giving this ring's pages back, or has: wait until it is done, and forget
    /// what the scratch kept in them. The wait sleeps on the park word (the writer wakes it),
    /// so that a thread of a higher real-time priority does not spin while the writer, on its
    /// CPU, cannot run.
    #[cold]
    #[inline(never)]
    fn unpark(&self) {
        let mut spins = 0u32;
        loop {
            match self.park.load(Ordering::Acquire) {
                PARK_NONE => return,
                PARK_GIVEN => {
                    // SAFETY: the scratch is this ring's, which this thread owns and holds; the
                    // writer is done with its pages (`PARK_GIVEN`, read with Acquire).
                    unsafe { (*self.scratch).after_give_back() };
                    self.park.store(PARK_NONE, Ordering::Release);
                    return;
                }
                _ => {
                    // Asked: the writer decides within a few instructions, or a madvise.
                    spins += 1;
                    if spins < 64 {
                        core::hint::spin_loop();
                    } else {
                        sys::futex_wait(&self.park, PARK_ASKED, 10);
                    }
                }
            }
        }
    }

    /// The first half of giving the pages of a ring nobody uses back to the system (its slots,
    /// and its thread's scratch past the first page: the header and the scratch's scalars
    /// stay): true when the ring has been drained, its head has not moved for [`IDLE_NS`] (its
    /// thread waits for work, or has exited) and it is not in use; from then on nobody touches
    /// those pages until [`Ring::give_back`]. Caller holds the output lock (nothing drains or
    /// grows the ring meanwhile) and calls it at every pass of the writer. A new thread may
    /// take a free ring without the lock ([`acquire`]): that writes only the first page, and
    /// the thread's first hook waits on `park` like the owner's.
    pub fn ask_give_back(&self, now: u64) -> bool {
        if self.state.load(Ordering::Acquire) == ORPHAN
            || self.park.load(Ordering::Relaxed) != PARK_NONE
        {
            return false;
        }
        let head = self.head.load(Ordering::Acquire);
        if head != self.idle_head.load(Ordering::Relaxed) {
            self.idle_head.store(head, Ordering::Relaxed);
            self.idle_since.store(now, Ordering::Relaxed);
            return false;
        }
        if self.tail.load(Ordering::Relaxed) != head
            || now.saturating_sub(self.idle_since.load(Ordering::Relaxed)) < IDLE_NS
        {
            return false;
        }
        // The writer's half of the handshake (see `hold`): `swap` is a locked instruction.
        self.park.swap(PARK_ASKED, Ordering::SeqCst);
        if self.busy.load(Ordering::SeqCst) != 0 || self.head.load(Ordering::Acquire) != head {
            // In use (or it published and left since the head was read): another time.
            self.park.store(PARK_NONE, Ordering::Release);
            sys::futex_wake(&self.park);
            return false;
        }
        // From here until `PARK_GIVEN` the owner, if any, and any thread that takes the ring
        // wait in `unpark` before they touch the pages given back; what the ring held was
        // drained (`tail == head`, and the head cannot move), so a drain reads none of them.
        self.idle_head.store(NOT_WATCHED, Ordering::Relaxed);
        true
    }

    /// The second half, after [`Ring::ask_give_back`] said yes, without the output lock (a hook
    /// that needs it to drain its own full ring does not wait for these system calls).
    pub fn give_back(&self) {
        debug_assert_eq!(self.park.load(Ordering::Relaxed), PARK_ASKED);
        let slots = self.slots.load(Ordering::Relaxed) as *mut u8;
        let file = !self.mirror.load(Ordering::Relaxed).is_null();
        // SAFETY: the scratch and the slots (a whole number of pages, after a ring file's header
        // page) are this ring's own mappings, which nobody uses until `PARK_GIVEN` (see
        // `ask_give_back`).
        unsafe {
            self.discard_scratch();
            discard(slots, self.cap() as usize * SLOT_LEN, file);
        }
        GIVEN_BACK.fetch_add(1, Ordering::Relaxed);
        self.park.store(PARK_GIVEN, Ordering::Release);
        sys::futex_wake(&self.park);
    }

    /// The scratch's pages after the mapping's first (see [`Ring::give_back`]).
    ///
    /// # Safety
    /// Nobody uses the scratch meanwhile.
    unsafe fn discard_scratch(&self) {
        let base = self as *const Ring as *mut u8;
        // SAFETY: the pages after the first of the header's mapping (`HEAD_LEN` bytes from the
        // ring's address) hold only the scratch, which nobody uses (the contract).
        unsafe {
            discard(
                base.add(PAGE),
                HEAD_LEN.next_multiple_of(PAGE) - PAGE,
                false,
            )
        };
    }

    /// Everything drained so far reached the CLI: let the ring file say so.
    pub fn delivered(&self) {
        self.mirror_u64(ringfile::TAIL, self.tail.load(Ordering::Relaxed));
    }

    /// Free slots right now.
    #[inline]
    pub fn space(&self) -> u64 {
        self.cap() - (self.head.load(Ordering::Relaxed) - self.tail.load(Ordering::Acquire))
    }

    /// Publishes `n` slots produced by `fill(index, slot)`; the caller has checked `space() >= n`.
    /// Only the owning thread calls this.
    #[inline]
    pub fn publish(&self, n: usize, mut fill: impl FnMut(usize, &mut Slot)) {
        let head = self.head.load(Ordering::Relaxed);
        let cap = self.cap();
        let slots = self.slots.load(Ordering::Relaxed);
        for i in 0..n {
            let idx = ((head + i as u64) & (cap - 1)) as usize;
            // SAFETY: `idx < cap`, the slots mapped; the slot is outside `[tail, head)` (space was
            // checked), so the consumer does not read it concurrently.
            fill(i, unsafe { &mut *slots.add(idx) });
        }
        self.head.store(head + n as u64, Ordering::Release);
        self.mirror_u64(ringfile::HEAD, head + n as u64);
        let used = head + n as u64 - self.tail.load(Ordering::Relaxed);
        if used >= cap / 2 && used - (n as u64) < cap / 2 {
            if cap == SMALL_SLOTS
                && ((self.wants_large() && crate::out::grow_ring(self))
                    || crate::out::drain_own(self))
            {
                return;
            }
            wake_writer();
        }
    }

    /// Notes how far this ring is published now, for [`Ring::drain_cut`]; returns the slots
    /// waiting. Caller holds the output lock.
    pub fn cut(&self) -> u64 {
        let head = self.head.load(Ordering::Acquire);
        self.cut.store(head, Ordering::Relaxed);
        head - self.tail.load(Ordering::Relaxed)
    }

    /// Hands the slots published now and not yet drained to `sink` (as [`Ring::drain`]),
    /// leaving them in the ring. Caller holds the output lock.
    pub fn peek(&self, sink: impl FnOnce(&[u8], &[u8])) {
        let head = self.head.load(Ordering::Acquire);
        self.runs(self.tail.load(Ordering::Relaxed), head, sink);
    }

    /// As [`Ring::drain`], up to where the last [`Ring::cut`] saw the ring published (nothing
    /// if it was drained past that since: a cut is never ahead of the head it was read from).
    pub fn drain_cut(&self, sink: impl FnMut(&[u8], &[u8])) -> u64 {
        self.drain_to(self.cut.load(Ordering::Relaxed), sink)
    }

    /// Hands the published slots to `sink` as at most two contiguous runs, then frees them.
    /// Caller holds the output lock.
    pub fn drain(&self, sink: impl FnMut(&[u8], &[u8])) -> u64 {
        self.drain_to(self.head.load(Ordering::Acquire), sink)
    }

    /// The slots `[tail, head)` (published: `head` read with Acquire) as two runs.
    fn runs(&self, tail: u64, head: u64, sink: impl FnOnce(&[u8], &[u8])) {
        let cap = self.cap();
        let a = (tail & (cap - 1)) as usize;
        let n = (head - tail) as usize;
        let first = n.min(cap as usize - a);
        // SAFETY: slots `[tail, head)` are published (the caller read `head` with Acquire) and
        // stay untouched by the producer until `tail` moves (only under the output lock, which
        // the caller holds); the two runs lie inside the slot array.
        let (s1, s2) = unsafe {
            let base = self.slots.load(Ordering::Relaxed) as *const u8;
            (
                core::slice::from_raw_parts(base.add(a * SLOT_LEN), first * SLOT_LEN),
                core::slice::from_raw_parts(base, (n - first) * SLOT_LEN),
            )
        };
        sink(s1, s2);
    }

    fn drain_to(&self, head: u64, sink: impl FnMut(&[u8], &[u8])) -> u64 {
        let tail = self.tail.load(Ordering::Relaxed);
        if head <= tail {
            return 0;
        }
        self.runs(tail, head, sink);
        self.tail.store(head, Ordering::Release);
        head - tail
    }

    /// Discards everything (fork child: the parent's unflushed events are the parent's).
    pub fn clear(&self) {
        let head = self.head.load(Ordering::Relaxed);
        self.tail.store(head, Ordering::Release);
    }
}

/// Times a ring gave its pages back (statistics for tests and benchmarks).
pub static GIVEN_BACK: AtomicU64 = AtomicU64::new(0);

/// Gives the pages of `[start, start + len)` back: a ring file's (`file`) are punched out of
/// the file, anonymous memory's dropped; either reads as zeros after. (Where a file system
/// cannot punch holes, a ring file's pages stay in the file and read as before: only its
/// slots are ever given back that way, and they hold nothing by then.)
///
/// # Safety
/// The range is page-aligned, part of one of the tracer's own mappings, and nobody reads or
/// writes it meanwhile.
unsafe fn discard(start: *mut u8, len: usize, file: bool) {
    // SAFETY: madvise on the range the caller names (page-aligned, one of the tracer's own
    // mappings, used by nobody meanwhile: the contract); it drops or punches out those pages
    // and touches no other memory.
    unsafe {
        if !file || libc::madvise(start.cast(), len, libc::MADV_REMOVE) != 0 {
            libc::madvise(start.cast(), len, libc::MADV_DONTNEED);
        }
    }
}

/// Wakes the writer thread, unless a wake-up is already pending (it clears `WAKE` when it wakes,
/// before it drains).
pub fn wake_writer() {
    // With `POLLING` set the writer wakes on its own within `POLL_NS`: no system call here. The
    // swap and the load are sequentially consistent, as are the writer's store clearing
    // `POLLING` and (a system call later) its futex wait's read of `WAKE` (see
    // `tracer::writer_main`): either that wait finds `WAKE` set and returns at once, or this
    // load finds `POLLING` clear and wakes it.
    if WAKE.swap(1, Ordering::SeqCst) == 0 && POLLING.load(Ordering::SeqCst) == 0 {
        sys::futex_wake(&WAKE);
    }
}

/// Set by the writer while the program records fast enough that it drains on a timer
/// ([`POLL_NS`]) instead of waiting to be woken: a hook whose ring passes half full then makes
/// no system call (a futex wake, and on a virtual machine an interrupt between its CPUs).
pub static POLLING: AtomicU32 = AtomicU32::new(0);

/// The writer's interval while [`POLLING`] (its thread's timer slack set to 1 ns, else a wait
/// of 100 µs takes ~180 on a virtual machine). A large ring at half full has room for 4,096 more
/// slots: ~130 µs of a loop that does nothing but malloc and free, whose ring then fills now and
/// then (its own thread drains it: `out::make_room`); a program doing anything between its
/// allocations takes longer.
pub const POLL_NS: u64 = 100_000;

/// A pass that moved at least this many slots keeps the writer polling (while few threads
/// record: see `tracer::writer_main`).
pub const POLL_BUSY_SLOTS: u64 = 512;

/// Visits every ring (under the output lock).
pub fn for_each(mut f: impl FnMut(&'static Ring)) {
    for r in rings() {
        f(r);
    }
}
