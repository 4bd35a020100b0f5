//! Per-thread single-producer rings in their own mappings, drained by whoever holds the output
//! lock (the writer thread, a hook whose ring is full, the exit and signal paths).
//!
//! A ring is never unmapped: when its thread exits it is marked orphaned, drained, and handed to
//! the next new thread, so memory is bounded by the largest number of threads alive at once.
//! The ring also carries that thread's unwind scratch (rule cache, previous stack).

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use leakhunt_format::slot::{Slot, SLOT_LEN};

use crate::sys;
use crate::unwind::Scratch;

/// Slots per ring (256 KiB of events).
pub const RING_SLOTS: u64 = 8192;

pub const OWNED: u32 = 1;
/// Its thread is gone; drain it, then it becomes `FREE`.
pub const ORPHAN: u32 = 2;
pub const FREE: u32 = 3;

/// Invariants: `head` is written only by the owning thread, `tail` only under the output lock;
/// slots in `[tail, head)` are published and immutable until `tail` passes them.
#[repr(C, align(64))]
pub struct Ring {
    head: AtomicU64,
    _p1: [u8; 56],
    tail: AtomicU64,
    _p2: [u8; 56],
    pub tid: AtomicU32,
    pub state: AtomicU32,
    next: AtomicPtr<Ring>,
    slots: *mut Slot,
    pub scratch: *mut Scratch,
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

/// Takes a free ring or maps a new one for thread `tid`. Null if memory is exhausted.
pub fn acquire(tid: u32) -> *mut Ring {
    for r in rings() {
        if r.state
            .compare_exchange(FREE, OWNED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            r.tid.store(tid, Ordering::Relaxed);
            // SAFETY: the scratch belongs to this ring, which this thread now owns alone.
            unsafe { (*r.scratch).reset_for_new_thread() };
            return r as *const Ring as *mut Ring;
        }
    }
    let slots_len = RING_SLOTS as usize * SLOT_LEN;
    let total = 4096 + slots_len + core::mem::size_of::<Scratch>();
    let base = sys::mmap_anon(total);
    if base.is_null() {
        return core::ptr::null_mut();
    }
    let ring = base as *mut Ring;
    // SAFETY: `base` is a fresh zeroed mapping of `total` bytes: the header fits in its first
    // page, the slots follow it, and the scratch follows them (all-zero is its initial state).
    unsafe {
        ring.write(Ring {
            head: AtomicU64::new(0),
            _p1: [0; 56],
            tail: AtomicU64::new(0),
            _p2: [0; 56],
            tid: AtomicU32::new(tid),
            state: AtomicU32::new(OWNED),
            next: AtomicPtr::new(core::ptr::null_mut()),
            slots: base.add(4096) as *mut Slot,
            scratch: base.add(4096 + slots_len) as *mut Scratch,
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
    /// Free slots right now.
    #[inline]
    pub fn space(&self) -> u64 {
        RING_SLOTS - (self.head.load(Ordering::Relaxed) - self.tail.load(Ordering::Acquire))
    }

    /// Publishes `n` slots produced by `fill(index, slot)`; the caller has checked `space() >= n`.
    /// Only the owning thread calls this.
    #[inline]
    pub fn publish(&self, n: usize, mut fill: impl FnMut(usize, &mut Slot)) {
        let head = self.head.load(Ordering::Relaxed);
        for i in 0..n {
            let idx = ((head + i as u64) % RING_SLOTS) as usize;
            // SAFETY: `idx < RING_SLOTS`; the slot is outside `[tail, head)` (space was checked),
            // so the consumer does not read it concurrently.
            fill(i, unsafe { &mut *self.slots.add(idx) });
        }
        self.head.store(head + n as u64, Ordering::Release);
        let used = head + n as u64 - self.tail.load(Ordering::Relaxed);
        if used >= RING_SLOTS / 2 && used - (n as u64) < RING_SLOTS / 2 {
            WAKE.store(1, Ordering::Release);
            sys::futex_wake(&WAKE);
        }
    }

    /// Hands the published slots to `sink` as at most two contiguous runs, then frees them.
    /// Caller holds the output lock.
    pub fn drain(&self, mut sink: impl FnMut(&[u8], &[u8])) -> u64 {
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Relaxed);
        if head == tail {
            return 0;
        }
        let a = (tail % RING_SLOTS) as usize;
        let n = (head - tail) as usize;
        let first = n.min(RING_SLOTS as usize - a);
        // SAFETY: slots `[tail, head)` are published (Acquire above) and stay untouched by the
        // producer until `tail` moves; the two runs lie inside the slot array.
        let (s1, s2) = unsafe {
            let base = self.slots as *const u8;
            (
                core::slice::from_raw_parts(base.add(a * SLOT_LEN), first * SLOT_LEN),
                core::slice::from_raw_parts(base, (n - first) * SLOT_LEN),
            )
        };
        sink(s1, s2);
        self.tail.store(head, Ordering::Release);
        n as u64
    }

    /// Discards everything (fork child: the parent's unflushed events are the parent's).
    pub fn clear(&self) {
        let head = self.head.load(Ordering::Relaxed);
        self.tail.store(head, Ordering::Release);
    }
}

/// Visits every ring (under the output lock).
pub fn for_each(mut f: impl FnMut(&Ring)) {
    for r in rings() {
        f(r);
    }
}
