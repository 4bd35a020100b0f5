//! The live set: every block a process holds, by address, in 16 bytes a block.
//!
//! A general hash map of `u64 -> Live` takes 25 bytes a slot and doubles (with a transient
//! copy of the whole table) as it grows: ~62 B a live block at 5 M blocks, and every insert a
//! cache miss on a table of hundreds of MB. This table packs a block into two words, splits the
//! table into up to 256 partitions by the address's hash (each grows on its own, by 7/5, so a
//! resize copies 1/256 of the table and the peak stays near the live set), and takes its
//! partitions' memory from the kernel once they are large (freed memory goes back, instead of
//! staying in the allocator's free lists). [`LiveSet::touch`] loads the slots of a batch of
//! addresses ahead of their inserts and removes, so that their cache misses overlap.
//!
//! A slot, two words (little-endian bytes in the partition's buffer):
//! - `a`: the address (48 bits; 0 is an empty slot) and `born`'s low 16 bits;
//! - `b`: the size (32 bits), the stack (24 bits: the id's 23 low bits and the inherited-stack
//!   flag) and `born`'s high 8 bits.
//!
//! Blocks that do not fit (an address of 0 or beyond 48 bits, 4 GiB or more, a stack id or an
//! epoch index too large: rare, or a corrupt trace's) live in a side map. An address is in one of
//! the two places, never both.
//!
//! Partitions are open-addressed with linear probing and backward-shift removal (no tombstones),
//! at most 4/5 full. A slot's home is `fastrange` of the hash's bits below the partition bits, so
//! capacities need not be powers of two.

use rustc_hash::FxHashMap;

use crate::process::{Live, INHERITED_STACK};

const SLOT: usize = 16;
const ADDR_BITS: u32 = 48;
const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;
/// Stack ids below this (and the same with the inherited flag) fit a slot.
const STACK_IDS: u32 = 1 << 23;
/// Epoch indexes below this fit a slot.
const BORN_LIMIT: u32 = 1 << 24;
/// The most partitions (the hash's top bits pick one).
const MAX_PART_BITS: u32 = 5;
/// Past this many blocks the table splits into `1 << MAX_PART_BITS` partitions.
const SPLIT_AT: usize = 1 << 16;

/// The least capacity of a partition that holds anything.
const MIN_SLOTS: usize = 8;
const HUGE_PAGE: usize = 2 << 20;
/// Partitions of this many bytes or more are mapped from the kernel (and given back whole).
const MAP_BYTES: usize = 16 << 10;

/// The bytes of one partition.
enum Buf {
    Heap(Vec<u8>),
    Map(memmap2::MmapMut),
}

impl Buf {
    /// `slots` zeroed slots.
    fn zeroed(slots: usize) -> Buf {
        let len = slots * SLOT;
        if len >= MAP_BYTES {
            // The kernel's zero pages, given back at drop; the heap if mapping fails.
            if let Ok(m) = memmap2::MmapMut::map_anon(len) {
                // Huge pages where whole ones fit (the kernel aligns such maps): a TLB entry
                // for 2 MiB of slots, and one fault for them. Then every page at once: one
                // call costs less than a fault a page. Either may be refused; the slots are
                // zero all the same.
                if len >= HUGE_PAGE {
                    let _ = m.advise(memmap2::Advice::HugePage);
                }
                let _ = m.advise(memmap2::Advice::PopulateWrite);
                return Buf::Map(m);
            }
        }
        Buf::Heap(vec![0; len])
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Map(m) => m,
        }
    }

    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Map(m) => m,
        }
    }
}

impl Clone for Buf {
    fn clone(&self) -> Buf {
        let mut b = Buf::zeroed(self.bytes().len() / SLOT);
        b.bytes_mut().copy_from_slice(self.bytes());
        b
    }
}

#[derive(Clone)]
struct Part {
    buf: Buf,
    /// Capacity in slots (`buf` holds exactly this many).
    cap: usize,
    len: usize,
}

impl Default for Part {
    fn default() -> Part {
        Part {
            buf: Buf::Heap(Vec::new()),
            cap: 0,
            len: 0,
        }
    }
}

#[inline]
fn hash(addr: u64) -> u64 {
    // A folded multiply: the product's top bits depend on every address bit (Fibonacci hashing
    // spreads the arithmetic progressions allocators hand out).
    let m = u128::from(addr).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Part {
    #[inline]
    fn a(&self, i: usize) -> u64 {
        word(self.buf.bytes(), i * SLOT)
    }

    #[inline]
    fn b(&self, i: usize) -> u64 {
        word(self.buf.bytes(), i * SLOT + 8)
    }

    #[inline]
    fn set(&mut self, i: usize, a: u64, b: u64) {
        let bytes = self.buf.bytes_mut();
        bytes[i * SLOT..i * SLOT + 8].copy_from_slice(&a.to_le_bytes());
        bytes[i * SLOT + 8..i * SLOT + 16].copy_from_slice(&b.to_le_bytes());
    }

    /// The home slot of hash `h` (its bits below the partition bits, `low`).
    #[inline]
    fn home(&self, low: u64) -> usize {
        ((u128::from(low) * self.cap as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.cap {
            0
        } else {
            i + 1
        }
    }

    /// The slot holding `addr`, or the empty slot where it would go.
    #[inline]
    fn probe(&self, addr: u64, low: u64) -> (usize, bool) {
        let mut i = self.home(low);
        loop {
            let k = self.a(i) & ADDR_MASK;
            if k == addr {
                return (i, true);
            }
            if k == 0 {
                return (i, false);
            }
            i = self.next(i);
        }
    }

    fn with_cap(cap: usize) -> Part {
        Part {
            buf: Buf::zeroed(cap),
            cap,
            len: 0,
        }
    }

    /// Puts slot words `a`, `b` of a block not in the partition into its first free slot from
    /// home (blocks hash with `shift` partition bits). The caller keeps it under 4/5 full.
    #[inline]
    fn place(&mut self, a: u64, b: u64, shift: u32) {
        let k = a & ADDR_MASK;
        let (i, _) = self.probe(k, hash(k) << shift);
        self.set(i, a, b);
        self.len += 1;
    }

    /// A partition of `cap` slots holding this one's blocks.
    fn moved(&self, cap: usize, shift: u32) -> Part {
        let mut new = Part::with_cap(cap);
        for i in 0..self.cap {
            let a = self.a(i);
            if a & ADDR_MASK != 0 {
                new.place(a, self.b(i), shift);
            }
        }
        new
    }

    /// Empties slot `i`, moving later slots of the same run back so that every block stays
    /// reachable from its home without gaps.
    fn vacate(&mut self, mut i: usize, shift: u32) {
        let mut j = self.next(i);
        loop {
            let a = self.a(j);
            let k = a & ADDR_MASK;
            if k == 0 {
                break;
            }
            let home = self.home(hash(k) << shift);
            // The block at j may move to i unless its home lies in (i, j] (cyclically).
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                let b = self.b(j);
                self.set(i, a, b);
                i = j;
            }
            j = self.next(j);
        }
        self.set(i, 0, 0);
    }
}

/// The capacity a partition of `cap` slots grows to: by 7/5, so that it is 4/7 full just after
/// (28 B a block at worst, 20 B at best), and each block is moved 3.5 times on average as the
/// table grows (by 4/3: 4 times, 27 B at worst; by 3/2: 3 times, 30 B at worst).
fn grown(cap: usize) -> usize {
    (cap + cap * 2 / 5).max(MIN_SLOTS)
}

#[inline]
fn word(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// The slot words of a block, if it fits one.
#[inline]
fn pack(addr: u64, l: Live) -> Option<(u64, u64)> {
    let id = l.stack & !INHERITED_STACK;
    if addr == 0 || addr > ADDR_MASK || l.size > u64::from(u32::MAX) || l.born >= BORN_LIMIT {
        return None;
    }
    if id >= STACK_IDS {
        return None;
    }
    let stack = u64::from(id | ((l.stack >> 31) << 23));
    let born = u64::from(l.born);
    Some((
        addr | (born & 0xffff) << 48,
        l.size | stack << 32 | (born >> 16) << 56,
    ))
}

#[inline]
fn unpack(a: u64, b: u64) -> (u64, Live) {
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
/// `iter` and `touch` never allocate; `insert` allocates only when a partition grows.
#[derive(Clone)]
pub struct LiveSet {
    /// `1 << bits` partitions.
    parts: Vec<Part>,
    bits: u32,
    len: usize,
    /// Blocks that do not fit a slot.
    odd: FxHashMap<u64, Live>,
}

impl Default for LiveSet {
    fn default() -> LiveSet {
        LiveSet::new()
    }
}

impl std::fmt::Debug for LiveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSet").field("len", &self.len).finish()
    }
}

impl LiveSet {
    pub fn new() -> LiveSet {
        LiveSet {
            parts: vec![Part::default()],
            bits: 0,
            len: 0,
            odd: FxHashMap::default(),
        }
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
    fn find(&self, addr: u64) -> Option<(usize, usize)> {
        if addr.wrapping_sub(1) >= ADDR_MASK {
            // 0 and addresses beyond 48 bits are never in a slot (0 marks an empty one).
            return None;
        }
        let (p, low) = self.part_of(hash(addr));
        let part = &self.parts[p];
        if part.len == 0 {
            return None;
        }
        match part.probe(addr, low) {
            (i, true) => Some((p, i)),
            _ => None,
        }
    }

    pub fn get(&self, addr: u64) -> Option<Live> {
        if let Some((p, i)) = self.find(addr) {
            let part = &self.parts[p];
            return Some(unpack(part.a(i), part.b(i)).1);
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
        let Some((a, b)) = pack(addr, l) else {
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
                self.put(addr, a, b);
                return Some(old);
            }
        }
        self.put(addr, a, b)
    }

    /// Puts slot words for `addr` into the table (not in the side map).
    #[inline]
    fn put(&mut self, addr: u64, a: u64, b: u64) -> Option<Live> {
        let h = hash(addr);
        let (mut p, mut low) = self.part_of(h);
        if self.parts[p].cap > 0 {
            let part = &mut self.parts[p];
            let (i, found) = part.probe(addr, low);
            if found {
                let old = unpack(part.a(i), part.b(i)).1;
                part.set(i, a, b);
                return Some(old);
            }
            // At most 4/5 full after this insert.
            if (part.len + 1) * 5 <= part.cap * 4 {
                part.set(i, a, b);
                part.len += 1;
                self.len += 1;
                return None;
            }
        }
        if self.bits < MAX_PART_BITS && self.len >= SPLIT_AT {
            self.split();
        } else {
            self.grow(p);
        }
        (p, low) = self.part_of(h);
        let part = &mut self.parts[p];
        let (i, _) = part.probe(addr, low);
        part.set(i, a, b);
        part.len += 1;
        self.len += 1;
        None
    }

    /// Partition `p` by 7/5 (the first time, to `MIN_SLOTS`).
    fn grow(&mut self, p: usize) {
        let cap = self.parts[p].cap;
        self.parts[p] = self.parts[p].moved(grown(cap), self.bits);
    }

    /// From one partition to `1 << MAX_PART_BITS`, each sized for its share at 3/5 full.
    fn split(&mut self) {
        let bits = MAX_PART_BITS;
        let n = 1usize << bits;
        let cap = (self.len * 5 / 3 / n).max(MIN_SLOTS);
        let mut parts: Vec<Part> = (0..n).map(|_| Part::with_cap(cap)).collect();
        for old in std::mem::take(&mut self.parts) {
            for i in 0..old.cap {
                let a = old.a(i);
                let k = a & ADDR_MASK;
                if k == 0 {
                    continue;
                }
                let p = (hash(k) >> (64 - bits)) as usize;
                if (parts[p].len + 1) * 5 > parts[p].cap * 4 {
                    // An unlucky partition: grown as inserts would grow it.
                    let c = parts[p].cap;
                    parts[p] = parts[p].moved(grown(c), bits);
                }
                parts[p].place(a, old.b(i), bits);
            }
        }
        self.parts = parts;
        self.bits = bits;
    }

    /// Removes `addr` from the slots (not the side map).
    fn remove_slot(&mut self, addr: u64) -> Option<Live> {
        let (p, i) = self.find(addr)?;
        let shift = self.bits;
        let part = &mut self.parts[p];
        let old = unpack(part.a(i), part.b(i)).1;
        part.vacate(i, shift);
        part.len -= 1;
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

    /// Loads the home slots of `addrs` (inserts or removes to come), so that their cache misses
    /// are taken together rather than one after another; returns a value of the loads only to
    /// keep them (pass it to `std::hint::black_box`).
    #[inline]
    pub fn touch(&self, addrs: impl Iterator<Item = u64>) -> u64 {
        let mut sum = 0;
        for addr in addrs {
            let (p, low) = self.part_of(hash(addr));
            let part = &self.parts[p];
            if part.cap > 0 {
                sum ^= part.a(part.home(low));
            }
        }
        sum
    }

    /// Every live block, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Live)> + '_ {
        self.parts
            .iter()
            .flat_map(|p| {
                p.buf.bytes().chunks_exact(SLOT).filter_map(|s| {
                    let a = word(s, 0);
                    (a & ADDR_MASK != 0).then(|| unpack(a, word(s, 8)))
                })
            })
            .chain(self.odd.iter().map(|(&k, &v)| (k, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = Live> + '_ {
        self.iter().map(|(_, l)| l)
    }

    /// Bytes the table holds (slots and side map entries, not counting empty partitions).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.cap * SLOT).sum::<usize>()
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
        let mut s = LiveSet::new();
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
        assert_eq!((s.len(), s.odd.len()), (10, 7));
        for (a, l) in odd.iter().chain(&fit) {
            assert_eq!(key(s.get(*a)), key(Some(*l)), "{a:#x}");
        }
        // Moving between slot and side map as the block changes.
        assert_eq!(key(s.insert(0x10, live(8, 8, 8))), Some((1 << 32, 3, 3)));
        assert_eq!(
            key(s.insert(0x50, live(9, 1 << 23, 9))).map(|k| k.0),
            Some(u64::from(u32::MAX))
        );
        assert_eq!((s.len(), s.odd.len()), (10, 7));
        assert_eq!(key(s.get(0x10)), Some((8, 8, 8)));
        assert_eq!(key(s.get(0x50)), Some((9, 1 << 23, 9)));
        let mut all: Vec<_> = s.iter().map(|(a, l)| (a, l.size)).collect();
        all.sort_unstable();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], (0, 1));
        for (a, _) in odd.iter().chain(&fit) {
            assert!(s.remove(*a).is_some());
            assert!(!s.contains_key(*a));
        }
        assert_eq!((s.len(), s.iter().count()), (0, 0));
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
        assert!(s.parts.iter().all(|p| p.len * 5 <= p.cap * 4));
        assert_eq!(
            s.parts.iter().map(|p| p.len).sum::<usize>() + s.odd.len(),
            s.len()
        );
        assert_eq!((s.bytes(), s.odd.len()), (3_767_139, 162));
        let c = s.clone();
        for (a, ..) in b {
            assert!(s.remove(a).is_some());
        }
        assert!(s.is_empty());
        assert_eq!(c.len(), m.len());
    }
}
