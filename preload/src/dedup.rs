//! Global stack table: each distinct stack gets one id, and its frames are sent once. Open
//! addressing over an insert-only array in an anonymous mapping; no locks: a slot is claimed with
//! one CAS on its hash, and readers that meet a claimed slot wait for its `id` to be published,
//! then compare the frames exactly.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::sys;

const BITS: u32 = 20;
const SLOTS: usize = 1 << BITS;
/// Frame words in the arena (1 GiB of address space, touched only as used).
const ARENA_WORDS: u64 = 1 << 27;

#[repr(C)]
struct Entry {
    hash: AtomicU64,
    /// Non-zero once `meta` and `off` are written.
    id: AtomicU32,
    _pad: u32,
    /// Frame count | stop reason << 16 | unload generation << 32.
    meta: AtomicU64,
    off: AtomicU64,
}

struct Table {
    entries: *mut Entry,
    arena: *mut u64,
    arena_next: AtomicU64,
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
/// Stacks that found no slot (table or arena full); their events carry stack id 0.
pub static OVERFLOW: AtomicU64 = AtomicU64::new(0);

static mut TABLE_STORAGE: Table = Table {
    entries: core::ptr::null_mut(),
    arena: core::ptr::null_mut(),
    arena_next: AtomicU64::new(0),
};

/// Maps a fresh, empty table (at start, and in a traced fork child). False if out of memory.
pub fn reset() -> bool {
    let entries = sys::mmap_anon(SLOTS * core::mem::size_of::<Entry>()) as *mut Entry;
    let arena = sys::mmap_anon(ARENA_WORDS as usize * 8) as *mut u64;
    if entries.is_null() || arena.is_null() {
        return false;
    }
    // SAFETY: called before any hook records (init) or in a fork child with one thread, so no
    // other reference to TABLE_STORAGE is live.
    unsafe {
        let t = &mut *core::ptr::addr_of_mut!(TABLE_STORAGE);
        t.entries = entries;
        t.arena = arena;
        t.arena_next = AtomicU64::new(0);
        TABLE.store(t, Ordering::Release);
    }
    NEXT_ID.store(1, Ordering::Relaxed);
    true
}

#[inline]
pub fn hash(frames: &[u64], meta: u64) -> u64 {
    // Position-keyed independent multiplies: no serial dependency between frames.
    let mut h = meta.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, &f) in frames.iter().enumerate() {
        let k = (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
        h = h.wrapping_add(
            (f ^ k)
                .wrapping_mul(0xFF51_AFD7_ED55_8CCD)
                .rotate_left((i as u32 * 7) & 63),
        );
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 29;
    h | 1
}

/// Returns the stack's id and whether this call created it (the caller must then send it).
pub fn intern(frames: &[u64], meta: u64) -> (u32, bool) {
    let t = TABLE.load(Ordering::Acquire);
    if t.is_null() {
        return (0, false);
    }
    // SAFETY: published tables stay mapped for the life of the process.
    let t = unsafe { &*t };
    let h = hash(frames, meta);
    let mut i = (h >> (64 - BITS)) as usize;
    for _ in 0..SLOTS {
        // SAFETY: `i < SLOTS`, inside the entries mapping.
        let e = unsafe { &*t.entries.add(i) };
        let cur = e.hash.load(Ordering::Acquire);
        if cur == 0
            && e.hash
                .compare_exchange(0, h, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let off = t
                .arena_next
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            if off + frames.len() as u64 > ARENA_WORDS {
                e.meta.store(u64::MAX, Ordering::Relaxed);
                e.id.store(u32::MAX, Ordering::Release);
                OVERFLOW.fetch_add(1, Ordering::Relaxed);
                return (0, false);
            }
            // SAFETY: `[off, off + len)` was reserved for this entry alone and is in the arena.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    frames.as_ptr(),
                    t.arena.add(off as usize),
                    frames.len(),
                )
            };
            e.meta.store(meta, Ordering::Relaxed);
            e.off.store(off, Ordering::Relaxed);
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            e.id.store(id, Ordering::Release);
            return (id, true);
        }
        // Empty slot taken by another thread meanwhile, or occupied: examine it.
        if e.hash.load(Ordering::Acquire) == h {
            let mut id = e.id.load(Ordering::Acquire);
            while id == 0 {
                core::hint::spin_loop();
                id = e.id.load(Ordering::Acquire);
            }
            if id != u32::MAX && e.meta.load(Ordering::Relaxed) == meta {
                let off = e.off.load(Ordering::Relaxed) as usize;
                // SAFETY: the entry's frames were written before its id was published (Release /
                // Acquire on `id`) and are never modified.
                let stored = unsafe { core::slice::from_raw_parts(t.arena.add(off), frames.len()) };
                if stored == frames {
                    return (id, false);
                }
            }
        }
        i = (i + 1) & (SLOTS - 1);
    }
    OVERFLOW.fetch_add(1, Ordering::Relaxed);
    (0, false)
}
