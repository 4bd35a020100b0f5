//! Per-thread single-producer rings in their own mappings, drained by whoever holds the output
//! lock (the writer thread, a hook whose ring is full, the exit and signal paths).
//!
//! A ring is never unmapped: when its thread exits it is marked orphaned, drained, and handed to
//! the next new thread, so memory is bounded by the largest number of threads alive at once.
//! The ring also carries that thread's unwind scratch (rule cache, previous stack).
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
    /// The shared file's header page (null: the slots are anonymous memory).
    mirror: *mut u8,
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

/// Maps a ring's slots: a shared ring file when `leakhunt run` asked for them (falling back to
/// anonymous memory if the file cannot be made), else anonymous memory. Returns (file header
/// page or null, slots).
fn map_slots(tid: u32) -> Option<(*mut u8, *mut Slot)> {
    let slots_len = RING_SLOTS as usize * SLOT_LEN;
    if let Some(m) = map_ring_file(core::ptr::null_mut(), tid, 0) {
        // SAFETY: the file mapping is HEADER_LEN + slots_len bytes.
        return Some((m, unsafe { m.add(ringfile::HEADER_LEN) } as *mut Slot));
    }
    let p = sys::mmap_anon(slots_len);
    (!p.is_null()).then_some((core::ptr::null_mut(), p as *mut Slot))
}

static RING_FILES: AtomicU32 = AtomicU32::new(0);

/// Creates this process image's next ring file and maps it shared (at `at` if not null, replacing
/// what is there), not inherited by fork children, its header filled in with `head` as both
/// indices. No allocation: the path is built on the stack.
fn map_ring_file(at: *mut u8, tid: u32, head: u64) -> Option<*mut u8> {
    let dir = config::get().ring_dir()?.to_bytes();
    let mut path = [0u8; 400];
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
    put(sys::fmt_u64(
        &mut digits,
        RING_FILES.fetch_add(1, Ordering::Relaxed) as u64,
    ));
    put(b".ring");
    let len = ringfile::HEADER_LEN + RING_SLOTS as usize * SLOT_LEN;
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
        (p.add(ringfile::SLOTS) as *mut u64).write(RING_SLOTS);
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
        if r.mirror.is_null() {
            continue;
        }
        let head = r.head.load(Ordering::Relaxed);
        let tid = r.tid.load(Ordering::Relaxed);
        let mapped = trace && map_ring_file(r.mirror, tid, head).is_some();
        if !mapped {
            let len = ringfile::HEADER_LEN + RING_SLOTS as usize * SLOT_LEN;
            // SAFETY: replaces (or fills, since the parent's mapping was not inherited) exactly
            // the range this ring's slots occupied, which nothing else uses.
            unsafe {
                libc::mmap(
                    r.mirror.cast(),
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

/// Takes a free ring or maps a new one for thread `tid`. Null if memory is exhausted.
pub fn acquire(tid: u32) -> *mut Ring {
    for r in rings() {
        if r.state
            .compare_exchange(FREE, OWNED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            r.tid.store(tid, Ordering::Relaxed);
            r.mirror_u32(ringfile::TID, tid);
            // SAFETY: the scratch belongs to this ring, which this thread now owns alone.
            unsafe { (*r.scratch).reset_for_new_thread() };
            return r as *const Ring as *mut Ring;
        }
    }
    let head_len = 4096 + core::mem::size_of::<Scratch>();
    let base = sys::mmap_anon(head_len);
    if base.is_null() {
        return core::ptr::null_mut();
    }
    let Some((mirror, slots)) = map_slots(tid) else {
        // SAFETY: unmaps the mapping made just above, which nothing else refers to.
        unsafe { libc::munmap(base.cast(), head_len) };
        return core::ptr::null_mut();
    };
    let ring = base as *mut Ring;
    // SAFETY: `base` is a fresh zeroed mapping: the header fits in its first page and the
    // scratch follows it (all-zero is its initial state).
    unsafe {
        ring.write(Ring {
            head: AtomicU64::new(0),
            _p1: [0; 56],
            tail: AtomicU64::new(0),
            _p2: [0; 56],
            tid: AtomicU32::new(tid),
            state: AtomicU32::new(OWNED),
            next: AtomicPtr::new(core::ptr::null_mut()),
            slots,
            scratch: base.add(4096) as *mut Scratch,
            mirror,
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
    #[inline]
    fn mirror_u64(&self, at: usize, v: u64) {
        if !self.mirror.is_null() {
            // Atomic: the CLI reads it from another process. Rings are never unmapped and a fork
            // child remaps the page in place.
            // SAFETY: `at` is an aligned field of the mapped ring file's header page.
            unsafe { (*(self.mirror.add(at) as *const AtomicU64)).store(v, Ordering::Release) };
        }
    }

    fn mirror_u32(&self, at: usize, v: u32) {
        if !self.mirror.is_null() {
            // SAFETY: as in `mirror_u64`.
            unsafe { (*(self.mirror.add(at) as *const AtomicU32)).store(v, Ordering::Release) };
        }
    }

    /// Everything drained so far reached the CLI: let the ring file say so.
    pub fn delivered(&self) {
        self.mirror_u64(ringfile::TAIL, self.tail.load(Ordering::Relaxed));
    }

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
        self.mirror_u64(ringfile::HEAD, head + n as u64);
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
