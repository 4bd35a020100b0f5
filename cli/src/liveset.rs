//! The live set: every block a process holds, by address, in 16 bytes a block.
//!
//! Up to 65,536 blocks it is a plain hash map (a few MB, in cache, where a general map's
//! inserts and removes are cheapest); past that, the table below.
//!
//! A general hash map of `u64 -> Live` takes 25 bytes a slot and doubles (with a transient copy
//! of the whole table) as it grows: ~62 B a live block at 5 M blocks, and every insert a cache
//! miss on a table of hundreds of MB. This table packs a block into two words and splits the
//! slots into up to 256 partitions of one capacity by the address's hash. It grows all of them
//! at once, by 7/5, in place: the slot array is extended (a large allocation grows by remapping
//! its pages, not copying them) and the partitions are rebuilt from the last to the first, each
//! through a scratch copy of itself, into its new place, which overlaps only itself and the ones
//! already rebuilt. So a resize needs the new table plus 1/256 of the old (the peak stays near the
//! live set), and only the growth itself is fresh memory (fresh pages are costly to fault in).
//! [`LiveSet::touch`] loads the slots of a batch of addresses ahead of their inserts and
//! removes, so that their cache misses overlap.
//!
//! A slot, two words:
//! - `[0]`: the address (48 bits; 0 is an empty slot) and `born`'s low 16 bits;
//! - `[1]`: the size (32 bits), the stack (24 bits: the id's 23 low bits and the inherited-stack
//!   flag) and `born`'s high 8 bits.
//!
//! Blocks that do not fit (an address of 0 or beyond 48 bits, 4 GiB or more, a stack id or an
//! epoch index too large: rare, or a corrupt trace's) live in a side map. An address is in one of
//! the two places, never both.
//!
//! Partitions are open-addressed with linear probing (wrapping inside the partition) and
//! backward-shift removal (no tombstones), at most 4/5 full. A slot's home is `fastrange` of the
//! hash's bits below the partition bits, so capacities need not be powers of two. Addresses
//! hash evenly across partitions (a folded multiply); a trace whose addresses all fell into one
//! partition would grow the table as if all were as full as that one (memory, never an error).

use rustc_hash::FxHashMap;

use crate::process::{Live, INHERITED_STACK};

type Slot = [u64; 2];

const EMPTY: Slot = [0, 0];
const ADDR_BITS: u32 = 48;
const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;
/// Stack ids below this (and the same with the inherited flag) fit a slot.
const STACK_IDS: u32 = 1 << 23;
/// Epoch indexes below this fit a slot.
const BORN_LIMIT: u32 = 1 << 24;
/// The most partitions (the hash's top bits pick one).
const MAX_PART_BITS: u32 = 8;
/// Below this many blocks the set is a plain hash map (in cache, it is faster than the slots);
/// at this many it moves into `1 << MAX_PART_BITS` partitions of slots.
const SPLIT_AT: usize = 1 << 16;
/// The least capacity of a partition.
const MIN_SLOTS: usize = 8;

/// The capacity partitions of `cap` slots grow to: by 7/5, so that they are 4/7 full just after
/// (28 B a block at worst, 20 B at best), and each block is moved 3.5 times on average as the
/// table grows (by 4/3: 4 times, 27 B at worst; by 3/2: 3 times, 30 B at worst).
fn grown(cap: usize) -> usize {
    (cap + cap * 2 / 5).max(MIN_SLOTS)
}

#[inline]
fn hash(addr: u64) -> u64 {
    // A folded multiply: the product's top bits depend on every address bit (Fibonacci hashing
    // spreads the arithmetic progressions allocators hand out).
    let m = u128::from(addr).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (m as u64) ^ ((m >> 64) as u64)
}

/// The home of hash bits `low` in a partition of `cap` slots.
#[inline]
fn home(low: u64, cap: usize) -> usize {
    ((u128::from(low) * cap as u128) >> 64) as usize
}

#[inline]
fn next(i: usize, cap: usize) -> usize {
    if i + 1 == cap {
        0
    } else {
        i + 1
    }
}

/// In partition `part` (its slots), the slot holding `addr`, or the empty slot where it would
/// go. The partition has an empty slot.
#[inline]
fn probe(part: &[Slot], addr: u64, low: u64) -> (usize, bool) {
    let cap = part.len();
    let mut i = home(low, cap);
    loop {
        let k = part[i][0] & ADDR_MASK;
        if k == addr {
            return (i, true);
        }
        if k == 0 {
            return (i, false);
        }
        i = next(i, cap);
    }
}

/// Puts slot `s` (of a block not in the partition) into its first free slot from home; blocks
/// hash with `shift` partition bits.
#[inline]
fn place(part: &mut [Slot], s: Slot, shift: u32) {
    let k = s[0] & ADDR_MASK;
    let (i, _) = probe(part, k, hash(k) << shift);
    part[i] = s;
}

/// Empties slot `i` of `part`, moving later slots of the same run back so that every block stays
/// reachable from its home without gaps.
fn vacate(part: &mut [Slot], mut i: usize, shift: u32) {
    let cap = part.len();
    let mut j = next(i, cap);
    loop {
        let k = part[j][0] & ADDR_MASK;
        if k == 0 {
            break;
        }
        let h = home(hash(k) << shift, cap);
        // The block at j may move to i unless its home lies in (i, j] (cyclically).
        let stays = if i <= j {
            i < h && h <= j
        } else {
            i < h || h <= j
        };
        if !stays {
            part[i] = part[j];
            i = j;
        }
        j = next(j, cap);
    }
    part[i] = EMPTY;
}

/// The slot of a block, if it fits one.
#[inline]
fn pack(addr: u64, l: Live) -> Option<Slot> {
    let id = l.stack & !INHERITED_STACK;
    if addr == 0 || addr > ADDR_MASK || l.size > u64::from(u32::MAX) || l.born >= BORN_LIMIT {
        return None;
    }
    if id >= STACK_IDS {
        return None;
    }
    let stack = u64::from(id | ((l.stack >> 31) << 23));
    let born = u64::from(l.born);
    Some([
        addr | (born & 0xffff) << 48,
        l.size | stack << 32 | (born >> 16) << 56,
    ])
}

#[inline]
fn unpack(s: Slot) -> (u64, Live) {
    let [a, b] = s;
    let stack = ((b >> 32) & 0xff_ffff) as u32;
    let stack = (stack & (STACK_IDS - 1)) | ((stack >> 23) << 31);
    let born = ((a >> 48) | (b >> 56) << 16) as u32;
    (
        a & ADDR_MASK,
        Live {
            size: b & 0xffff_ffff,
            stack,
            born,
        },
    )
}

/// The live blocks of a process by address (see the module's docs). `get`, `contains_key`,
/// `iter` and `touch` never allocate; `insert` allocates only when the table grows.
#[derive(Clone, Default)]
pub struct LiveSet {
    /// `1 << bits` partitions of `cap` slots each, one after the other.
    slots: Vec<Slot>,
    cap: usize,
    /// Blocks in each partition.
    lens: Vec<usize>,
    bits: u32,
    len: usize,
    /// Blocks that do not fit a slot.
    odd: FxHashMap<u64, Live>,
}

impl std::fmt::Debug for LiveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSet").field("len", &self.len).finish()
    }
}

impl LiveSet {
    pub fn new() -> LiveSet {
        LiveSet::default()
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The partition of hash `h` and the hash's bits below the partition bits.
    #[inline]
    fn part_of(&self, h: u64) -> (usize, u64) {
        (
            ((h >> (64 - MAX_PART_BITS)) >> (MAX_PART_BITS - self.bits)) as usize,
            h << self.bits,
        )
    }

    #[inline]
    fn part(&self, p: usize) -> &[Slot] {
        &self.slots[p * self.cap..(p + 1) * self.cap]
    }

    #[inline]
    fn part_mut(&mut self, p: usize) -> &mut [Slot] {
        let cap = self.cap;
        &mut self.slots[p * cap..(p + 1) * cap]
    }

    /// (partition, slot) of `addr` in the slots.
    #[inline]
    fn find(&self, addr: u64) -> Option<(usize, usize)> {
        if self.cap == 0 || addr.wrapping_sub(1) >= ADDR_MASK {
            // 0 and addresses beyond 48 bits are never in a slot (0 marks an empty one).
            return None;
        }
        let (p, low) = self.part_of(hash(addr));
        match probe(self.part(p), addr, low) {
            (i, true) => Some((p, i)),
            _ => None,
        }
    }

    pub fn get(&self, addr: u64) -> Option<Live> {
        if let Some((p, i)) = self.find(addr) {
            return Some(unpack(self.part(p)[i]).1);
        }
        if self.odd.is_empty() {
            None
        } else {
            self.odd.get(&addr).copied()
        }
    }

    pub fn contains_key(&self, addr: u64) -> bool {
        self.find(addr).is_some() || (!self.odd.is_empty() && self.odd.contains_key(&addr))
    }

    /// Makes `addr` live with `l`; returns what was live there before.
    pub fn insert(&mut self, addr: u64, l: Live) -> Option<Live> {
        if self.cap == 0 {
            // Small: every block in the map (faster in cache), until the slots pay.
            let old = self.odd.insert(addr, l);
            if old.is_none() {
                self.len += 1;
                if self.len >= SPLIT_AT {
                    self.build();
                }
            }
            return old;
        }
        let Some(s) = pack(addr, l) else {
            // Out of the slots (if there), into the side map.
            let old = self.remove_slot(addr);
            let odd = self.odd.insert(addr, l);
            if odd.is_none() {
                self.len += 1;
            }
            return old.or(odd);
        };
        if !self.odd.is_empty() {
            if let Some(old) = self.odd.remove(&addr) {
                self.len -= 1;
                self.put(addr, s);
                return Some(old);
            }
        }
        self.put(addr, s)
    }

    /// Puts slot `s` for `addr` into the slots (built: not in the side map).
    #[inline]
    fn put(&mut self, addr: u64, s: Slot) -> Option<Live> {
        let h = hash(addr);
        let (p, low) = self.part_of(h);
        let full = (self.lens[p] + 1) * 5 > self.cap * 4;
        let part = self.part_mut(p);
        let (i, found) = probe(part, addr, low);
        if found {
            let old = unpack(part[i]).1;
            part[i] = s;
            return Some(old);
        }
        if full {
            self.grow(grown(self.cap));
            let shift = self.bits;
            place(self.part_mut(p), s, shift);
        } else {
            part[i] = s;
        }
        self.lens[p] += 1;
        self.len += 1;
        None
    }

    /// Every partition to `cap` slots, in place (see the module's docs).
    #[inline(never)]
    fn grow(&mut self, cap: usize) {
        let n = 1usize << self.bits;
        let old = self.cap;
        if self.lens.is_empty() {
            self.lens = vec![0; n];
        }
        // Exactly the new size: a large allocation grows by remapping its pages, and the
        // partitions below are rebuilt over the old ones.
        self.slots.reserve_exact(n * cap - self.slots.len());
        self.slots.resize(n * cap, EMPTY);
        let mut scratch: Vec<Slot> = vec![EMPTY; old];
        for p in (0..n).rev() {
            // Partition p's new place begins at or past its old one and overlaps only the old
            // p and the partitions after it, already moved.
            scratch.copy_from_slice(&self.slots[p * old..(p + 1) * old]);
            let part = &mut self.slots[p * cap..(p + 1) * cap];
            part.fill(EMPTY);
            for &s in &scratch {
                if s[0] & ADDR_MASK != 0 {
                    place(part, s, self.bits);
                }
            }
        }
        self.cap = cap;
    }

    /// From the map to `1 << MAX_PART_BITS` partitions of slots (the blocks that fit one),
    /// sized so that the fullest is at most 4/5 full and the rest 3/5 on average.
    fn build(&mut self) {
        let bits = MAX_PART_BITS;
        let n = 1usize << bits;
        let part = |s: &Slot| (hash(s[0] & ADDR_MASK) >> (64 - bits)) as usize;
        let mut lens = vec![0usize; n];
        for (&a, &l) in &self.odd {
            if let Some(s) = pack(a, l) {
                lens[part(&s)] += 1;
            }
        }
        let fullest = lens.iter().copied().max().unwrap_or(0);
        let cap = (self.len * 5 / 3 / n)
            .max((fullest + 1) * 5 / 4 + 1)
            .max(MIN_SLOTS);
        let mut slots = vec![EMPTY; n * cap];
        for (&a, &l) in &self.odd {
            if let Some(s) = pack(a, l) {
                let p = part(&s);
                place(&mut slots[p * cap..(p + 1) * cap], s, bits);
            }
        }
        self.odd.retain(|&a, l| pack(a, *l).is_none());
        self.odd.shrink_to_fit();
        self.slots = slots;
        self.lens = lens;
        self.cap = cap;
        self.bits = bits;
    }

    /// Removes `addr` from the slots (not the side map).
    fn remove_slot(&mut self, addr: u64) -> Option<Live> {
        let (p, i) = self.find(addr)?;
        let shift = self.bits;
        let part = self.part_mut(p);
        let old = unpack(part[i]).1;
        vacate(part, i, shift);
        self.lens[p] -= 1;
        self.len -= 1;
        Some(old)
    }

    /// `addr` is no longer live: returns what was.
    pub fn remove(&mut self, addr: u64) -> Option<Live> {
        if let Some(l) = self.remove_slot(addr) {
            return Some(l);
        }
        if self.odd.is_empty() {
            return None;
        }
        let l = self.odd.remove(&addr)?;
        self.len -= 1;
        Some(l)
    }

    /// Whether the set is small enough to be a plain map, in cache (loading slots ahead gains
    /// nothing).
    #[inline]
    pub fn is_small(&self) -> bool {
        self.cap == 0
    }

    /// Loads the home slots of `addrs` (inserts or removes to come), so that their cache misses
    /// are taken together rather than one after another; returns a value of the loads only to
    /// keep them (pass it to `std::hint::black_box`).
    #[inline]
    pub fn touch(&self, addrs: impl Iterator<Item = u64>) -> u64 {
        let mut sum = 0;
        if self.cap == 0 {
            return sum;
        }
        for addr in addrs {
            let (p, low) = self.part_of(hash(addr));
            sum ^= self.slots[p * self.cap + home(low, self.cap)][0];
        }
        sum
    }

    /// Every live block, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Live)> + '_ {
        self.slots
            .iter()
            .filter(|s| s[0] & ADDR_MASK != 0)
            .map(|&s| unpack(s))
            .chain(self.odd.iter().map(|(&k, &v)| (k, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = Live> + '_ {
        self.iter().map(|(_, l)| l)
    }

    /// Bytes the table holds (slots and side map entries).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.odd.capacity() * (std::mem::size_of::<(u64, Live)>() + 1)
    }
}

impl FromIterator<(u64, Live)> for LiveSet {
    fn from_iter<I: IntoIterator<Item = (u64, Live)>>(it: I) -> LiveSet {
        let mut s = LiveSet::new();
        for (k, v) in it {
            s.insert(k, v);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(size: u64, stack: u32, born: u32) -> Live {
        Live { size, stack, born }
    }

    fn key(l: Option<Live>) -> Option<(u64, u32, u32)> {
        l.map(|l| (l.size, l.stack, l.born))
    }

    #[test]
    fn blocks_that_do_not_fit_a_slot_keep_every_field() {
        // Past the map: 65,536 blocks (one that does not fit among them) move into the slots.
        let mut s = LiveSet::new();
        let base = 0x1000_0000u64;
        for i in 0..SPLIT_AT as u64 - 1 {
            assert!(s.insert(base + 16 * i, live(16, 1, 0)).is_none());
        }
        assert!(s.is_small());
        assert!(s.insert(0x8, live(1 << 40, 1, 0)).is_none());
        assert!(!s.is_small());
        assert_eq!((s.len(), s.odd.len()), (SPLIT_AT, 1));
        assert_eq!(s.remove(0x8).map(|l| l.size), Some(1 << 40));
        let n = SPLIT_AT - 1;
        let odd = [
            (0, live(1, 1, 1)),
            (1 << 48, live(2, 2, 2)),
            (0x10, live(1 << 32, 3, 3)),
            (0x20, live(4, 1 << 23, 4)),
            (0x30, live(5, INHERITED_STACK | (1 << 23), 5)),
            (0x40, live(6, 6, 1 << 24)),
            (u64::MAX, live(1 << 47, u32::MAX, u32::MAX)),
        ];
        let fit = [
            (
                0x50,
                live(
                    u64::from(u32::MAX),
                    INHERITED_STACK | (STACK_IDS - 1),
                    BORN_LIMIT - 1,
                ),
            ),
            (ADDR_MASK, live(0, 0, 0)),
            (0x60, live(7, INHERITED_STACK, 0x12_3456)),
        ];
        for (a, l) in odd.iter().chain(&fit) {
            assert_eq!(s.insert(*a, *l).map(|l| l.size), None);
        }
        assert_eq!((s.len(), s.odd.len()), (n + 10, 7));
        for (a, l) in odd.iter().chain(&fit) {
            assert_eq!(key(s.get(*a)), key(Some(*l)), "{a:#x}");
        }
        // Moving between slot and side map as the block changes.
        assert_eq!(key(s.insert(0x10, live(8, 8, 8))), Some((1 << 32, 3, 3)));
        assert_eq!(
            key(s.insert(0x50, live(9, 1 << 23, 9))).map(|k| k.0),
            Some(u64::from(u32::MAX))
        );
        assert_eq!((s.len(), s.odd.len()), (n + 10, 7));
        assert_eq!(key(s.get(0x10)), Some((8, 8, 8)));
        assert_eq!(key(s.get(0x50)), Some((9, 1 << 23, 9)));
        let mut all: Vec<_> = s.iter().map(|(a, l)| (a, l.size)).collect();
        all.sort_unstable();
        assert_eq!(all.len(), n + 10);
        assert_eq!(all[..2], [(0, 1), (0x10, 8)]);
        for (a, _) in odd.iter().chain(&fit) {
            assert!(s.remove(*a).is_some());
            assert!(!s.contains_key(*a));
        }
        assert_eq!((s.len(), s.iter().count(), s.odd.len()), (n, n, 0));
        assert_eq!(key(s.get(base + 16)), Some((16, 1, 0)));
    }

    /// Random inserts, reinserts and removes against a std map, across growth and the split
    /// into partitions; the addresses crowd a few ranges (as an allocator's do).
    #[test]
    fn agrees_with_a_hash_map_through_growth_and_split() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut s = LiveSet::new();
        let mut m: std::collections::HashMap<u64, (u64, u32, u32)> = Default::default();
        let (mut reused, mut missing) = (0, 0);
        for round in 0..400_000u64 {
            // Mostly growing (60% inserts) to pass the split at 65,536 blocks.
            let base = [0x5555_0000_0000u64, 0x7f00_0000_0000, 0x1000][next(3) as usize];
            let addr = base + 16 * next(150_000);
            if next(10) < 6 {
                // One in 1,000 too large for a slot.
                let size = if next(1000) == 0 { 1 << 33 } else { next(5000) };
                let l = live(size, next(1 << 20) as u32, (round / 1000) as u32);
                let old = s.insert(addr, l);
                assert_eq!(key(old), m.insert(addr, (l.size, l.stack, l.born)));
                reused += u64::from(old.is_some());
            } else {
                let old = s.remove(addr);
                assert_eq!(key(old), m.remove(&addr));
                missing += u64::from(old.is_none());
            }
            assert_eq!(s.len(), m.len());
        }
        assert_eq!(s.bits, MAX_PART_BITS);
        assert_eq!((reused, missing, m.len()), (48_079, 128_063, 158_988));
        for (a, v) in &m {
            assert_eq!(key(s.get(*a)), Some(*v));
        }
        let mut a: Vec<_> = s
            .iter()
            .map(|(a, l)| (a, l.size, l.stack, l.born))
            .collect();
        let mut b: Vec<_> = m.iter().map(|(a, v)| (*a, v.0, v.1, v.2)).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        // Every partition at most 4/5 full; 16 B a slot (and the side map's entries).
        assert!(s.lens.iter().all(|&l| l * 5 <= s.cap * 4));
        assert_eq!(s.lens.iter().sum::<usize>() + s.odd.len(), s.len());
        assert_eq!((s.bytes(), s.odd.len()), (4_785_507, 162));
        let c = s.clone();
        for (a, ..) in b {
            assert!(s.remove(a).is_some());
        }
        assert!(s.is_empty());
        assert_eq!(c.len(), m.len());
    }
}
