//! Global stack table: each distinct stack gets one id, and its frames are sent once. Open
//! addressing over insert-only arrays in an anonymous mapping; no locks: a slot is claimed with
//! one CAS on its hash, and readers that meet a claimed slot wait for its `id` to be published,
//! then compare the frames exactly.
//!
//! Levels: a hash spreads entries over a whole array, so every stack touches a page of its own
//! until all are touched (one array of a million 32-byte entries held 2 MiB of sqlite3's memory
//! for its ~500 stacks, and would hold 32 MiB of a large program's). So the table is a series of
//! arrays, 4,096 entries and four times as many each after; one takes insertions until it is
//! half full, then the next; a lookup searches the current array and the ones before it. (Two
//! threads inserting the same new stack just as the current array changes may give it two ids;
//! reports group stacks by their frames, so nothing is counted twice.)

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::sys;

/// log2 of each level's entries.
const LEVEL_BITS: [u32; 5] = [12, 14, 16, 18, 20];
/// Entries of all levels.
const SLOTS: usize = (1 << 12) + (1 << 14) + (1 << 16) + (1 << 18) + (1 << 20);

/// First entry of level `l`.
const fn level_start(l: usize) -> usize {
    let mut i = 0;
    let mut start = 0;
    while i < l {
        start += 1 << LEVEL_BITS[i];
        i += 1;
    }
    start
}

/// The level taking insertions, and the entries claimed in each.
static LEVEL: AtomicU32 = AtomicU32::new(0);
static LEVEL_FILL: [AtomicU32; 5] = [const { AtomicU32::new(0) }; 5];
/// Frame words in the arena (1 GiB of address space, touched only as used).
const ARENA_WORDS: u64 = 1 << 27;

/// 16 bytes: what a lookup compares first stays in the table; the stack itself (its meta word,
/// then its frames) is in the arena, written before `id` is published.
#[repr(C)]
struct Entry {
    hash: AtomicU64,
    /// Non-zero once the arena words at `off` are written.
    id: AtomicU32,
    /// Arena word offset of the meta word (frame count | stop reason << 16 | unload generation
    /// << 32), the frames follow it.
    off: AtomicU32,
}

const _: () = assert!(ARENA_WORDS <= u32::MAX as u64);

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
    LEVEL.store(0, Ordering::Relaxed);
    for f in &LEVEL_FILL {
        f.store(0, Ordering::Relaxed);
    }
    NEXT_ID.store(1, Ordering::Relaxed);
    true
}

/// The stack arena: its start and the end of what entries have taken so far (the rest of its
/// 1 GiB reservation is untouched).
pub fn arena_used() -> Option<(u64, u64)> {
    let t = TABLE.load(Ordering::Acquire);
    if t.is_null() {
        return None;
    }
    // SAFETY: a published table is TABLE_STORAGE, whose fields change only in `reset` (at start
    // or in a fork child's one thread).
    let t = unsafe { &*t };
    let start = t.arena as u64;
    let words = t.arena_next.load(Ordering::Relaxed).min(ARENA_WORDS);
    Some((start, start + words * 8))
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

/// What a probe of one level found.
enum Probe {
    Found(u32),
    Created(u32),
    /// An empty slot ends the probe (lookup only), or the level is full.
    Absent,
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
    let cur = (LEVEL.load(Ordering::Acquire) as usize).min(LEVEL_BITS.len() - 1);
    for l in 0..cur {
        if let Probe::Found(id) = probe(t, l, h, frames, meta, false) {
            return (id, false);
        }
    }
    match probe(t, cur, h, frames, meta, true) {
        Probe::Found(id) => (id, false),
        Probe::Created(id) => {
            let half = 1u32 << (LEVEL_BITS[cur] - 1);
            if LEVEL_FILL[cur].fetch_add(1, Ordering::Relaxed) + 1 >= half
                && cur + 1 < LEVEL_BITS.len()
            {
                let _ = LEVEL.compare_exchange(
                    cur as u32,
                    cur as u32 + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
            (id, true)
        }
        Probe::Absent => {
            OVERFLOW.fetch_add(1, Ordering::Relaxed);
            (0, false)
        }
    }
}

/// Looks for the stack in level `l`, and with `insert` claims the first empty slot of its probe
/// sequence for it if it is not there.
fn probe(t: &Table, l: usize, h: u64, frames: &[u64], meta: u64, insert: bool) -> Probe {
    let bits = LEVEL_BITS[l];
    let (base, mask) = (level_start(l), (1usize << bits) - 1);
    let mut i = (h >> (64 - bits)) as usize;
    for _ in 0..=mask {
        // SAFETY: `base + i < SLOTS` (`i <= mask`), inside the entries mapping.
        let e = unsafe { &*t.entries.add(base + i) };
        let cur = e.hash.load(Ordering::Acquire);
        if cur == 0 {
            if !insert {
                return Probe::Absent;
            }
            if e.hash
                .compare_exchange(0, h, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return claim(t, e, frames, meta);
            }
        }
        // Empty slot taken by another thread meanwhile, or occupied: examine it.
        if e.hash.load(Ordering::Acquire) == h {
            let mut id = e.id.load(Ordering::Acquire);
            while id == 0 {
                core::hint::spin_loop();
                id = e.id.load(Ordering::Acquire);
            }
            if id != u32::MAX {
                let off = e.off.load(Ordering::Relaxed) as usize;
                // SAFETY: the entry's meta word and frames were written at `off` before its id
                // was published (Release / Acquire on `id`) and are never modified; the meta word
                // gives their count, checked equal before the frames are read.
                let same = unsafe {
                    *t.arena.add(off) == meta
                        && core::slice::from_raw_parts(t.arena.add(off + 1), frames.len()) == frames
                };
                if same {
                    return Probe::Found(id);
                }
            }
        }
        i = (i + 1) & mask;
    }
    Probe::Absent
}

/// Fills in the entry this thread just claimed.
fn claim(t: &Table, e: &Entry, frames: &[u64], meta: u64) -> Probe {
    let words = frames.len() as u64 + 1;
    let off = t.arena_next.fetch_add(words, Ordering::Relaxed);
    if off + words > ARENA_WORDS {
        e.id.store(u32::MAX, Ordering::Release);
        return Probe::Absent;
    }
    // SAFETY: `[off, off + words)` was reserved for this entry alone and is in the arena.
    unsafe {
        *t.arena.add(off as usize) = meta;
        core::ptr::copy_nonoverlapping(frames.as_ptr(), t.arena.add(off as usize + 1), frames.len())
    };
    e.off.store(off as u32, Ordering::Relaxed);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    e.id.store(id, Ordering::Release);
    Probe::Created(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_keep_their_ids_across_levels_and_touch_little_memory() {
        assert!(reset());
        let stacks = |i: u64| [0x5555_0000_0000 + i * 0x40, 0x5555_0000_1000, i % 7];
        let n = 30_000u64; // past the halves of levels 0 and 1 (2,048 + 8,192)
        let mut ids = Vec::new();
        for i in 0..n {
            let (id, new) = intern(&stacks(i), 3);
            assert!(new && id != 0, "stack {i}");
            ids.push(id);
        }
        assert_eq!(LEVEL.load(Ordering::Relaxed), 2);
        for i in 0..n {
            assert_eq!(intern(&stacks(i), 3), (ids[i as usize], false), "stack {i}");
        }
        // Same frames, other meta: another stack.
        let (other, new) = intern(&stacks(5), 4);
        assert!(new && other != ids[5]);
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n as usize);
        assert_eq!(OVERFLOW.load(Ordering::Relaxed), 0);
        // The first 2,048 stacks sit in level 0's 128 KiB.
        assert_eq!(LEVEL_FILL[0].load(Ordering::Relaxed), 2048);
    }
}
