//! The live set: every block a process holds, by address, in about 16-24 bytes a block.
//!
//! Up to 65,536 blocks it is a plain hash map (a few MB, in cache, where a general map's
//! inserts and removes are cheapest); past that, the B+ tree below.
//!
//! A hash table keyed by address scatters what an allocator keeps together: a program that grows
//! its heap gets consecutive addresses, and each of them lands in a random slot of a table of
//! hundreds of MB (a cache and TLB miss per insert, ~100 ns, and every block moved again each
//! time the table grows). The tree keeps blocks in address order, 32 to a leaf, so consecutive
//! addresses fill the same leaf. A full leaf splits in two (or, when the new block goes past its
//! last, starts a new leaf and stays full, so a growing heap packs its leaves); nothing is moved
//! as the set grows, and leaves and inner nodes live in two vectors, grown by remapping their
//! pages, whose untouched tail is never resident.
//!
//! Finding a leaf rarely descends the tree. Each leaf knows the addresses it covers and its
//! neighbours; the leaf used last is tried first (a growing heap), then a hint: a table, by the
//! address's granule (the span of about 16 blocks of the average size; direct-mapped, four
//! entries a leaf), of the leaf that last took a block of that granule. A hint is checked
//! against the leaf's range, then its neighbours'; only when all miss does the lookup descend
//! (and fix the hint). So a free anywhere in a large heap costs about one miss to the hints (in
//! the cache) and one to the leaf, and [`LiveSet::touch`] loads the leaves of a batch of events
//! from their hints ahead of their inserts and removes, so that those misses overlap.
//!
//! A block, two words (the slot):
//! - `[0]`: the address (48 bits; 0 is never a key) and `born`'s low 16 bits;
//! - `[1]`: the size (32 bits), the stack (24 bits: the id's 23 low bits and the inherited-stack
//!   flag) and `born`'s high 8 bits.
//!
//! Blocks that do not fit (an address of 0 or beyond 48 bits, 4 GiB or more, a stack id or an
//! epoch index too large: rare, or a corrupt trace's) live in a side map. An address is in one of
//! the two places, never both.
//!
//! Memory: a leaf is 32 slots (544 B with its range and links). A full leaf first lends blocks
//! to a neighbour (under the same parent) with room for a quarter of a leaf, and splits in half
//! only when neither has (or stays full, above); one that falls below a quarter after a remove
//! merges with a neighbour when the two fit three quarters of a leaf (or either is empty). So a
//! heap that grows by increasing addresses takes ~17 B a block, one whose blocks come and go at
//! random ~22-27 B. The hints add 16 B a leaf (under 1 B a block), inner nodes ~1/20 of the
//! leaves.

use rustc_hash::FxHashMap;

use crate::process::{Live, INHERITED_STACK};

type Slot = [u64; 2];

const ADDR_BITS: u32 = 48;
const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;
/// Stack ids below this (and the same with the inherited flag) fit a slot.
const STACK_IDS: u32 = 1 << 23;
/// A slot's size: its second word's low 32 bits.
const SIZE_MASK: u64 = 0xffff_ffff;
/// Epoch indexes below this fit a slot.
const BORN_LIMIT: u32 = 1 << 24;
/// Below this many blocks the set is a plain hash map (in cache, it is faster than the tree);
/// at this many it moves into the tree.
const SPLIT_AT: usize = 1 << 16;
/// Slots in a leaf.
const LEAF: usize = 32;
/// Children of an inner node.
const FAN: usize = 32;
/// Inner levels at most: 32 * 32^11 leaves is far more than an address space holds.
const MAX_HEIGHT: usize = 12;

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

/// No leaf (a link's end, a path that leads nowhere).
const NONE: u32 = u32::MAX;

/// Up to [`LEAF`] slots in address order (the key: the first word's low 48 bits), the range of
/// addresses the leaf covers and its neighbours in address order.
#[derive(Clone, Copy)]
struct Leaf {
    /// The range: `lo..hi` (empty for a leaf on the free list).
    lo: u64,
    hi: u64,
    prev: u32,
    next: u32,
    len: u32,
    /// The slots' first words.
    keys: [u64; LEAF],
    /// The slots' second words.
    vals: [u64; LEAF],
}

impl Leaf {
    const EMPTY: Leaf = Leaf {
        lo: 0,
        hi: 0,
        prev: NONE,
        next: NONE,
        len: 0,
        keys: [0; LEAF],
        vals: [0; LEAF],
    };

    #[inline]
    fn n(&self) -> usize {
        self.len as usize
    }

    #[inline]
    fn covers(&self, addr: u64) -> bool {
        self.lo <= addr && addr < self.hi
    }

    /// Where `addr` is or would go, and whether it is there.
    #[inline]
    fn search(&self, addr: u64) -> (usize, bool) {
        let keys = &self.keys[..self.n()];
        // Blocks come in increasing addresses more often than not: past the last, no search.
        match keys.last() {
            None => return (0, false),
            Some(&k) if k & ADDR_MASK < addr => return (keys.len(), false),
            _ => {}
        }
        // A count rather than a binary search: the loads do not wait on each other, so a leaf
        // out of the cache costs one miss, not one a step.
        let i = keys.iter().filter(|&&k| k & ADDR_MASK < addr).count();
        (i, keys[i] & ADDR_MASK == addr)
    }

    #[inline]
    fn slot(&self, i: usize) -> Slot {
        [self.keys[i], self.vals[i]]
    }

    /// Puts `s` at `i` (the leaf has room).
    #[inline]
    fn insert_at(&mut self, i: usize, s: Slot) {
        let n = self.n();
        if i < n {
            self.keys.copy_within(i..n, i + 1);
            self.vals.copy_within(i..n, i + 1);
        }
        [self.keys[i], self.vals[i]] = s;
        self.len += 1;
    }

    #[inline]
    fn remove_at(&mut self, i: usize) -> Slot {
        let n = self.n();
        let s = self.slot(i);
        self.keys.copy_within(i + 1..n, i);
        self.vals.copy_within(i + 1..n, i);
        self.len -= 1;
        s
    }
}

/// Up to [`FAN`] children (leaves one level up, inner nodes above) and the addresses that divide
/// them.
#[derive(Clone, Copy)]
struct Inner {
    /// `seps[i]`: the least address of child `i + 1`'s range (child `i` covers
    /// `seps[i - 1]..seps[i]`, the first and the last what the node covers on their side).
    seps: [u64; FAN - 1],
    kids: [u32; FAN],
    len: u32,
}

impl Inner {
    const EMPTY: Inner = Inner {
        seps: [0; FAN - 1],
        kids: [0; FAN],
        len: 0,
    };

    #[inline]
    fn n(&self) -> usize {
        self.len as usize
    }

    /// The child whose range holds `addr`.
    #[inline]
    fn child(&self, addr: u64) -> usize {
        // A count, as in a leaf: the loads do not wait on each other.
        self.seps[..self.n() - 1]
            .iter()
            .filter(|&&s| s <= addr)
            .count()
    }
}

/// The B+ tree of the blocks that fit a slot (see the module's docs).
#[derive(Clone)]
struct Tree {
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    free_leaves: Vec<u32>,
    free_inners: Vec<u32>,
    root: u32,
    /// Inner levels above the leaves (0: the root is a leaf).
    height: usize,
    /// Blocks in the leaves, and their bytes.
    len: usize,
    bytes: u64,
    /// The leaf used last (the finger).
    last: u32,
    /// (inner node, child taken) from the root down to `path_leaf`, `height` of them: valid
    /// while the tree keeps its shape (a split or a merge ends it).
    path: [(u32, u32); MAX_HEIGHT],
    path_leaf: u32,
    /// By its granule (direct-mapped), the leaf that last took a block of an address, plus one (0:
    /// none; a hint: checked against the leaf's range, or its neighbours', before it is used);
    /// `1 << hint_bits` of them.
    hints: Vec<u32>,
    hint_bits: u32,
    /// Hints cover the address space in granules of `1 << granule_bits` bytes.
    granule_bits: u32,
    /// The granule of the hint set last by an insert.
    granule: u64,
}

/// A node of `pool` from its free list, or a new one (`empty`).
fn take<T>(pool: &mut Vec<T>, free: &mut Vec<u32>, empty: T) -> usize {
    match free.pop() {
        Some(i) => i as usize,
        None => {
            pool.push(empty);
            pool.len() - 1
        }
    }
}

/// Two distinct elements of `v`, mutably.
fn two<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    debug_assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// The least hint table: 4,096 entries.
const MIN_HINT_BITS: u32 = 12;

impl Tree {
    fn new() -> Tree {
        let mut root = Leaf::EMPTY;
        root.hi = u64::MAX;
        Tree {
            leaves: vec![root],
            inners: Vec::new(),
            free_leaves: Vec::new(),
            free_inners: Vec::new(),
            root: 0,
            height: 0,
            len: 0,
            bytes: 0,
            last: 0,
            path: [(0, 0); MAX_HEIGHT],
            path_leaf: 0,
            hints: vec![0; 1 << MIN_HINT_BITS],
            hint_bits: MIN_HINT_BITS,
            granule_bits: 10,
            granule: u64::MAX,
        }
    }

    #[inline]
    fn hint_of(&self, addr: u64) -> usize {
        // Direct-mapped (a heap's granules take consecutive entries): a growing heap writes its
        // hints in order, and a heap of up to `1 << (granule_bits + hint_bits)` bytes maps to
        // distinct entries.
        (addr >> self.granule_bits) as usize & ((1 << self.hint_bits) - 1)
    }

    /// Of leaf `i` and its neighbours, the one that covers `addr`.
    #[inline]
    fn around(&self, i: usize, addr: u64) -> Option<usize> {
        let l = self.leaves.get(i)?;
        let j = if l.covers(addr) {
            return Some(i);
        } else if addr < l.lo {
            l.prev
        } else {
            l.next
        };
        (self.leaves.get(j as usize)?.covers(addr)).then_some(j as usize)
    }

    /// The leaf that covers `addr`, found without a descent: the last one, or the hint's or a
    /// neighbour of it.
    #[inline]
    fn near(&self, addr: u64) -> Option<usize> {
        let last = self.last as usize;
        if self.leaves[last].covers(addr) {
            return Some(last);
        }
        let h = self.hints[self.hint_of(addr)] as usize;
        self.around(h.wrapping_sub(1), addr)
    }

    /// The leaf that covers `addr`, read only.
    #[inline]
    fn seek(&self, addr: u64) -> usize {
        if let Some(i) = self.near(addr) {
            return i;
        }
        let mut node = self.root;
        for _ in 0..self.height {
            let n = &self.inners[node as usize];
            node = n.kids[n.child(addr)];
        }
        node as usize
    }

    /// The leaf that covers `addr`, made the last (and the hint of its granule when the last
    /// and the hint did not lead to it).
    #[inline]
    fn locate(&mut self, addr: u64) -> usize {
        let last = self.last as usize;
        if self.leaves[last].covers(addr) {
            return last;
        }
        let h = self.hint_of(addr);
        let hinted = (self.hints[h] as usize).wrapping_sub(1);
        let i = match self.around(hinted, addr) {
            Some(i) if i == hinted => i,
            near => {
                let i = near.unwrap_or_else(|| self.descend(addr));
                self.hints[h] = i as u32 + 1;
                i
            }
        };
        self.last = i as u32;
        i
    }

    /// Down from the root to the leaf that covers `addr`, keeping the path.
    fn descend(&mut self, addr: u64) -> usize {
        let mut node = self.root;
        for depth in 0..self.height {
            let n = &self.inners[node as usize];
            let i = n.child(addr);
            self.path[depth] = (node, i as u32);
            node = n.kids[i];
        }
        self.path_leaf = node;
        node as usize
    }

    /// The path to leaf `li`, which covers `addr`.
    fn path_to(&mut self, li: usize, addr: u64) {
        if self.path_leaf as usize != li {
            let d = self.descend(addr);
            debug_assert_eq!(d, li);
        } else if cfg!(debug_assertions) {
            // The path kept across a split is the one a descent finds.
            let kept = self.path;
            assert_eq!(self.descend(addr), li);
            assert_eq!(kept[..self.height], self.path[..self.height]);
        }
    }

    fn get(&self, addr: u64) -> Option<Slot> {
        let leaf = &self.leaves[self.seek(addr)];
        match leaf.search(addr) {
            (i, true) => Some(leaf.slot(i)),
            _ => None,
        }
    }

    /// Puts `s` in for `addr` (its key); returns the slot it replaced.
    #[inline]
    fn insert(&mut self, addr: u64, s: Slot) -> Option<Slot> {
        let li = self.locate(addr);
        let leaf = &mut self.leaves[li];
        let (i, found) = leaf.search(addr);
        if found {
            let old = leaf.slot(i);
            [leaf.keys[i], leaf.vals[i]] = s;
            self.bytes = self.bytes - (old[1] & SIZE_MASK) + (s[1] & SIZE_MASK);
            return Some(old);
        }
        self.bytes += s[1] & SIZE_MASK;
        if leaf.n() < LEAF {
            leaf.insert_at(i, s);
        } else {
            self.split_leaf(li, i, addr, s);
        }
        self.len += 1;
        // The block's granule leads to the leaf that took it (once a granule for a heap that
        // grows: consecutive entries).
        let g = addr >> self.granule_bits;
        if g != self.granule {
            self.granule = g;
            let h = self.hint_of(addr);
            self.hints[h] = self.last + 1;
        }
        None
    }

    /// Four hints a leaf, their granule the span of 16 blocks of the average size, set again
    /// from every leaf's blocks (once a granule in a run).
    #[inline(never)]
    fn more_hints(&mut self) {
        self.hint_bits = (self.leaves.len() * 4).next_power_of_two().trailing_zeros();
        let span = (self.bytes / self.len.max(1) as u64).max(16) * 16;
        self.granule_bits = 63 - span.leading_zeros();
        self.hints = vec![0; 1 << self.hint_bits];
        self.granule = u64::MAX;
        for li in 0..self.leaves.len() {
            let mut g = u64::MAX;
            for j in 0..self.leaves[li].n() {
                let a = self.leaves[li].keys[j] & ADDR_MASK;
                if a >> self.granule_bits != g {
                    g = a >> self.granule_bits;
                    let h = self.hint_of(a);
                    self.hints[h] = li as u32 + 1;
                }
            }
        }
    }

    fn new_leaf(&mut self) -> usize {
        take(&mut self.leaves, &mut self.free_leaves, Leaf::EMPTY)
    }

    fn new_inner(&mut self) -> usize {
        take(&mut self.inners, &mut self.free_inners, Inner::EMPTY)
    }

    /// Full leaf `li`, which covers `addr`, takes `s` at `i` by splitting in two.
    #[inline(never)]
    fn split_leaf(&mut self, li: usize, i: usize, addr: u64, s: Slot) {
        self.path_to(li, addr);
        if self.lend(li, addr, s) {
            return;
        }
        let ri = self.new_leaf();
        if self.leaves.len() * 2 > self.hints.len() {
            self.more_hints();
        }
        let (left, right) = two(&mut self.leaves, li, ri);
        if i == LEAF {
            // Past the last: the full leaf stays full (a growing heap packs its leaves).
            right.insert_at(0, s);
        } else if i == 0 {
            // Before the first (a heap growing down): the same, the other way.
            (right.keys, right.vals, right.len) = (left.keys, left.vals, left.len);
            left.len = 0;
            left.insert_at(0, s);
        } else {
            let mid = LEAF / 2;
            right.keys[..LEAF - mid].copy_from_slice(&left.keys[mid..]);
            right.vals[..LEAF - mid].copy_from_slice(&left.vals[mid..]);
            right.len = (LEAF - mid) as u32;
            left.len = mid as u32;
            if i <= mid {
                left.insert_at(i, s);
            } else {
                right.insert_at(i - mid, s);
            }
        }
        let sep = right.keys[0] & ADDR_MASK;
        // The next block most likely comes where this one went.
        self.last = if addr < sep { li } else { ri } as u32;
        (right.lo, right.hi, left.hi) = (sep, left.hi, sep);
        (right.prev, right.next, left.next) = (li as u32, left.next, ri as u32);
        let next = self.leaves[ri].next as usize;
        if let Some(n) = self.leaves.get_mut(next) {
            n.prev = ri as u32;
        }
        let height = self.height;
        let d = height.wrapping_sub(1);
        let parent = self
            .path
            .get(d)
            .map(|&(pi, _)| self.inners[pi as usize].len);
        self.add_child(height, sep, ri as u32);
        // The path stays good for the leaf that took the block when its parent took the new
        // leaf without splitting (a growing heap's next block goes there, and its split needs
        // no descent).
        self.path_leaf = NONE;
        if let Some(n) = parent.filter(|&n| (n as usize) < FAN && self.height == height) {
            debug_assert_eq!(self.inners[self.path[d].0 as usize].len, n + 1);
            if self.last == ri as u32 {
                self.path[d].1 += 1;
            }
            self.path_leaf = self.last;
        }
    }

    /// Full leaf `li` (the path's), which covers `addr`, lends its last or first blocks to a
    /// neighbour under the same parent with room for them, then takes `s`: blocks that come and
    /// go at random would otherwise split leaves into halves that stay half full. Returns
    /// whether it could.
    fn lend(&mut self, li: usize, addr: u64, s: Slot) -> bool {
        let Some(&(pi, ci)) = self.height.checked_sub(1).and_then(|d| self.path.get(d)) else {
            return false;
        };
        let (pi, ci) = (pi as usize, ci as usize);
        let p = &self.inners[pi];
        let room = |t: &Tree, j: usize| (LEAF - t.leaves[p.kids[j] as usize].n()) / 2;
        let (right, k) = match (ci + 1 < p.n(), ci > 0) {
            (true, _) if room(self, ci + 1) >= LEAF / 8 => (true, room(self, ci + 1)),
            (_, true) if room(self, ci - 1) >= LEAF / 8 => (false, room(self, ci - 1)),
            _ => return false,
        };
        let (l, r, sep_at) = if right {
            (li, p.kids[ci + 1] as usize, ci)
        } else {
            (p.kids[ci - 1] as usize, li, ci - 1)
        };
        let (left, rt) = two(&mut self.leaves, l, r);
        let (ln, rn) = (left.n(), rt.n());
        if right {
            // The left's last k to the right's front.
            rt.keys.copy_within(..rn, k);
            rt.vals.copy_within(..rn, k);
            rt.keys[..k].copy_from_slice(&left.keys[ln - k..ln]);
            rt.vals[..k].copy_from_slice(&left.vals[ln - k..ln]);
            (left.len, rt.len) = ((ln - k) as u32, (rn + k) as u32);
        } else {
            // The right's first k to the left's end.
            left.keys[ln..ln + k].copy_from_slice(&rt.keys[..k]);
            left.vals[ln..ln + k].copy_from_slice(&rt.vals[..k]);
            rt.keys.copy_within(k..rn, 0);
            rt.vals.copy_within(k..rn, 0);
            (left.len, rt.len) = ((ln + k) as u32, (rn - k) as u32);
        }
        let sep = rt.keys[0] & ADDR_MASK;
        (left.hi, rt.lo) = (sep, sep);
        self.inners[pi].seps[sep_at] = sep;
        let to = if addr < sep { l } else { r };
        let leaf = &mut self.leaves[to];
        let (i, _) = leaf.search(addr);
        leaf.insert_at(i, s);
        self.last = to as u32;
        // The path leads to leaf li still (the shape is the same).
        true
    }

    /// A node at depth `depth` of the path split: `kid`, covering from `sep` on, goes into its
    /// parent right after it.
    fn add_child(&mut self, depth: usize, sep: u64, kid: u32) {
        if depth == 0 {
            // The root split: a new root above it.
            let r = self.new_inner();
            let n = &mut self.inners[r];
            n.kids[..2].copy_from_slice(&[self.root, kid]);
            n.seps[0] = sep;
            n.len = 2;
            self.root = r as u32;
            self.height += 1;
            return;
        }
        let (pi, ci) = self.path[depth - 1];
        let (pi, at) = (pi as usize, ci as usize + 1);
        let p = &mut self.inners[pi];
        let n = p.n();
        if n < FAN {
            p.kids.copy_within(at..n, at + 1);
            p.seps.copy_within(at - 1..n - 1, at);
            p.kids[at] = kid;
            p.seps[at - 1] = sep;
            p.len += 1;
            return;
        }
        // FAN + 1 children in two nodes: the left keeps all but the new one when it comes last.
        let mut kids = [0u32; FAN + 1];
        let mut seps = [0u64; FAN];
        kids[..at].copy_from_slice(&p.kids[..at]);
        kids[at] = kid;
        kids[at + 1..].copy_from_slice(&p.kids[at..]);
        seps[..at - 1].copy_from_slice(&p.seps[..at - 1]);
        seps[at - 1] = sep;
        seps[at..].copy_from_slice(&p.seps[at - 1..]);
        // The same the other way when it comes second (a heap growing down).
        let m = match at {
            FAN => FAN,
            1 => 1,
            _ => FAN.div_ceil(2),
        };
        let qi = self.new_inner();
        let (p, q) = two(&mut self.inners, pi, qi);
        p.kids[..m].copy_from_slice(&kids[..m]);
        p.seps[..m - 1].copy_from_slice(&seps[..m - 1]);
        p.len = m as u32;
        q.kids[..FAN + 1 - m].copy_from_slice(&kids[m..]);
        q.seps[..FAN - m].copy_from_slice(&seps[m..]);
        q.len = (FAN + 1 - m) as u32;
        self.add_child(depth - 1, seps[m - 1], qi as u32);
    }

    /// Takes `addr` out; returns its slot.
    #[inline]
    fn remove(&mut self, addr: u64) -> Option<Slot> {
        let li = self.locate(addr);
        let leaf = &mut self.leaves[li];
        let (i, found) = leaf.search(addr);
        if !found {
            return None;
        }
        let old = leaf.remove_at(i);
        self.len -= 1;
        self.bytes -= old[1] & SIZE_MASK;
        if leaf.n() < LEAF / 4 && self.height > 0 {
            self.merge_leaf(li, addr);
        }
        Some(old)
    }

    /// Leaf `li`, which covers `addr`, fell below a quarter: it and a neighbour become one leaf
    /// where they fit three quarters of one, or either is empty.
    #[inline(never)]
    fn merge_leaf(&mut self, li: usize, addr: u64) {
        self.path_to(li, addr);
        let (pi, ci) = self.path[self.height - 1];
        let p = &self.inners[pi as usize];
        let (n, ci) = (p.n(), ci as usize);
        if n < 2 {
            return;
        }
        let a = if ci + 1 < n { ci } else { ci - 1 };
        let (l, r) = (p.kids[a] as usize, p.kids[a + 1] as usize);
        let (ln, rn) = (self.leaves[l].n(), self.leaves[r].n());
        if ln + rn > LEAF * 3 / 4 && ln != 0 && rn != 0 {
            return;
        }
        let (left, right) = two(&mut self.leaves, l, r);
        left.keys[ln..ln + rn].copy_from_slice(&right.keys[..rn]);
        left.vals[ln..ln + rn].copy_from_slice(&right.vals[..rn]);
        left.len += right.len;
        (left.hi, left.next) = (right.hi, right.next);
        *right = Leaf::EMPTY;
        let next = self.leaves[l].next as usize;
        if let Some(n) = self.leaves.get_mut(next) {
            n.prev = l as u32;
        }
        self.free_leaves.push(r as u32);
        self.last = l as u32;
        self.remove_child(self.height - 1, a + 1);
        self.path_leaf = NONE;
    }

    /// Child `k` (never the first) of the inner node at depth `depth` of the path was merged
    /// into the one before it: takes it and the address before it out, then merges the node
    /// with a neighbour the same way, or lowers the root.
    fn remove_child(&mut self, depth: usize, k: usize) {
        let pi = self.path[depth].0 as usize;
        let p = &mut self.inners[pi];
        let n = p.n();
        p.kids.copy_within(k + 1..n, k);
        p.seps.copy_within(k..n - 1, k - 1);
        p.len -= 1;
        if depth == 0 {
            if p.len == 1 {
                // A root of one child: the child is the root.
                self.root = p.kids[0];
                p.len = 0;
                self.free_inners.push(pi as u32);
                self.height -= 1;
            }
            return;
        }
        if p.n() >= FAN / 4 {
            return;
        }
        let (gi, ci) = self.path[depth - 1];
        let g = &self.inners[gi as usize];
        let (gn, ci) = (g.n(), ci as usize);
        if gn < 2 {
            return;
        }
        let a = if ci + 1 < gn { ci } else { ci - 1 };
        let (l, r, sep) = (g.kids[a] as usize, g.kids[a + 1] as usize, g.seps[a]);
        let (ln, rn) = (self.inners[l].n(), self.inners[r].n());
        if ln + rn > FAN * 3 / 4 {
            // Too many for one: the fuller lends the other children until they are even.
            let k = ln.max(rn) - (ln + rn) / 2;
            let (left, right) = two(&mut self.inners, l, r);
            let sep = if ln < rn {
                // The right's first k to the left's end.
                left.seps[ln - 1] = sep;
                left.seps[ln..ln + k - 1].copy_from_slice(&right.seps[..k - 1]);
                left.kids[ln..ln + k].copy_from_slice(&right.kids[..k]);
                let up = right.seps[k - 1];
                right.seps.copy_within(k..rn - 1, 0);
                right.kids.copy_within(k..rn, 0);
                up
            } else {
                // The left's last k to the right's front.
                right.seps.copy_within(..rn - 1, k);
                right.kids.copy_within(..rn, k);
                right.seps[k - 1] = sep;
                right.seps[..k - 1].copy_from_slice(&left.seps[ln - k..ln - 1]);
                right.kids[..k].copy_from_slice(&left.kids[ln - k..ln]);
                left.seps[ln - k - 1]
            };
            (left.len, right.len) = if ln < rn {
                ((ln + k) as u32, (rn - k) as u32)
            } else {
                ((ln - k) as u32, (rn + k) as u32)
            };
            self.inners[gi as usize].seps[a] = sep;
            return;
        }
        let (left, right) = two(&mut self.inners, l, r);
        left.seps[ln - 1] = sep;
        left.seps[ln..ln + rn - 1].copy_from_slice(&right.seps[..rn - 1]);
        left.kids[ln..ln + rn].copy_from_slice(&right.kids[..rn]);
        left.len += right.len;
        right.len = 0;
        self.free_inners.push(r as u32);
        self.remove_child(depth - 1, a + 1);
    }

    fn bytes(&self) -> usize {
        self.leaves.len() * std::mem::size_of::<Leaf>()
            + self.inners.len() * std::mem::size_of::<Inner>()
            + (self.free_leaves.capacity() + self.free_inners.capacity() + self.hints.len()) * 4
    }
}

/// The live blocks of a process by address (see the module's docs). `get`, `contains_key`,
/// `iter` and `touch` never allocate; `insert` allocates only when the tree grows.
#[derive(Clone, Default)]
pub struct LiveSet {
    /// The blocks that fit a slot, once the set has grown past [`SPLIT_AT`].
    tree: Option<Box<Tree>>,
    len: usize,
    /// Blocks that do not fit a slot (every block while the set is small).
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

    pub fn get(&self, addr: u64) -> Option<Live> {
        if let Some(s) = self.tree.as_ref().and_then(|t| t.get(addr)) {
            return Some(unpack(s).1);
        }
        if self.odd.is_empty() {
            None
        } else {
            self.odd.get(&addr).copied()
        }
    }

    pub fn contains_key(&self, addr: u64) -> bool {
        self.get(addr).is_some()
    }

    /// Makes `addr` live with `l`; returns what was live there before.
    #[inline]
    pub fn insert(&mut self, addr: u64, l: Live) -> Option<Live> {
        let Some(t) = &mut self.tree else {
            // Small: every block in the map (faster in cache), until the tree pays.
            let old = self.odd.insert(addr, l);
            if old.is_none() {
                self.len += 1;
                if self.len >= SPLIT_AT {
                    self.build();
                }
            }
            return old;
        };
        let Some(s) = pack(addr, l) else {
            // Out of the tree (if there), into the side map.
            let old = t.remove(addr).map(|s| unpack(s).1);
            let odd = self.odd.insert(addr, l);
            if old.is_none() && odd.is_none() {
                self.len += 1;
            }
            return old.or(odd);
        };
        if let Some(old) = t.insert(addr, s) {
            return Some(unpack(old).1);
        }
        if !self.odd.is_empty() {
            if let Some(old) = self.odd.remove(&addr) {
                return Some(old);
            }
        }
        self.len += 1;
        None
    }

    /// From the map to the tree (the blocks that fit a slot), in address order.
    fn build(&mut self) {
        let mut t = Tree::new();
        let mut slots: Vec<Slot> = self.odd.iter().filter_map(|(&a, &l)| pack(a, l)).collect();
        slots.sort_unstable_by_key(|s| s[0] & ADDR_MASK);
        for s in slots {
            t.insert(s[0] & ADDR_MASK, s);
        }
        self.odd.retain(|&a, l| pack(a, *l).is_none());
        self.odd.shrink_to_fit();
        self.tree = Some(Box::new(t));
    }

    /// `addr` is no longer live: returns what was.
    #[inline]
    pub fn remove(&mut self, addr: u64) -> Option<Live> {
        let l = match self.tree.as_mut().and_then(|t| t.remove(addr)) {
            Some(s) => Some(unpack(s).1),
            None if self.odd.is_empty() => None,
            None => self.odd.remove(&addr),
        };
        self.len -= usize::from(l.is_some());
        l
    }

    /// Whether the set is small enough to be a plain map, in cache (loading its blocks ahead
    /// gains nothing).
    #[inline]
    pub fn is_small(&self) -> bool {
        self.tree.is_none()
    }

    /// Whether `addr` is in the leaf used last (in the cache: loading it ahead gains nothing).
    #[inline]
    pub fn is_near(&self, addr: u64) -> bool {
        self.tree
            .as_ref()
            .is_some_and(|t| t.leaves[t.last as usize].covers(addr))
    }

    /// Loads the leaves of `addrs` (inserts or removes to come), so that their cache misses
    /// are taken together rather than one after another; returns a value of the loads only to
    /// keep them (pass it to `std::hint::black_box`).
    #[inline]
    pub fn touch(&self, addrs: impl Iterator<Item = u64> + Clone) -> u64 {
        let Some(t) = &self.tree else { return 0 };
        let mut sum = 0;
        let last = &t.leaves[t.last as usize];
        let load = |l: &Leaf| {
            let mut sum = l.lo;
            for j in (0..LEAF).step_by(8) {
                sum ^= l.keys[j] ^ l.vals[j];
            }
            sum
        };
        // The hints first, all of them (each a load that may miss), then their leaves (no
        // descent): ranges and slots, a load a line; then, where a hint's leaf does not cover its
        // address, the neighbour that will. Each round's loads wait on none of their own.
        let mut hinted = [usize::MAX; 32];
        for (h, a) in hinted.iter_mut().zip(addrs.clone()) {
            if !last.covers(a) {
                *h = (t.hints[t.hint_of(a)] as usize).wrapping_sub(1);
            }
        }
        for &h in &hinted {
            sum ^= t.leaves.get(h).map_or(0, load);
        }
        for (&h, addr) in hinted.iter().zip(addrs) {
            match t.leaves.get(h) {
                Some(l) if !l.covers(addr) => {
                    let j = if addr < l.lo { l.prev } else { l.next };
                    sum ^= t.leaves.get(j as usize).map_or(0, load);
                }
                _ => {}
            }
        }
        sum
    }

    /// Every live block, in no particular order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            leaves: self.tree.as_ref().map_or(&[], |t| &t.leaves[..]),
            leaf: 0,
            at: 0,
            odd: self.odd.iter(),
        }
    }

    /// Calls `f` with every live block's stack and size, in no particular order (faster than
    /// [`LiveSet::iter`]: the tree's leaves are read for their second words only).
    pub fn for_each_stack_size(&self, mut f: impl FnMut(u32, u64)) {
        if let Some(t) = &self.tree {
            for l in &t.leaves {
                for &v in &l.vals[..l.n()] {
                    let (_, live) = unpack([0, v]);
                    f(live.stack, live.size);
                }
            }
        }
        for l in self.odd.values() {
            f(l.stack, l.size);
        }
    }

    pub fn values(&self) -> impl Iterator<Item = Live> + '_ {
        self.iter().map(|(_, l)| l)
    }

    /// Bytes the set holds (the tree's nodes and the side map's entries).
    pub fn bytes(&self) -> usize {
        self.tree.as_ref().map_or(0, |t| t.bytes())
            + self.odd.capacity() * (std::mem::size_of::<(u64, Live)>() + 1)
    }
}

/// The blocks of a [`LiveSet`]: the tree's leaf by leaf, then the side map's.
pub struct Iter<'a> {
    leaves: &'a [Leaf],
    leaf: usize,
    /// The next slot in `leaves[leaf]`.
    at: usize,
    odd: std::collections::hash_map::Iter<'a, u64, Live>,
}

impl Iterator for Iter<'_> {
    type Item = (u64, Live);

    #[inline]
    fn next(&mut self) -> Option<(u64, Live)> {
        while let Some(l) = self.leaves.get(self.leaf) {
            if self.at < l.n() {
                self.at += 1;
                return Some(unpack(l.slot(self.at - 1)));
            }
            (self.leaf, self.at) = (self.leaf + 1, 0);
        }
        self.odd.next().map(|(&k, &v)| (k, v))
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

    fn xorshift(rng: &mut u64) -> u64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
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
    /// into the tree; the addresses crowd a few ranges (as an allocator's do).
    #[test]
    fn agrees_with_a_hash_map_through_growth_and_split() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| xorshift(&mut rng) % n;
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
            if round % 50_000 == 0 {
                check(&s);
            }
        }
        check(&s);
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
        // The tree's nodes and hints, and the side map's entries.
        assert_eq!((s.bytes(), s.odd.len()), (3_619_955, 162));
        let c = s.clone();
        for (a, ..) in b {
            assert!(s.remove(a).is_some());
        }
        assert!(s.is_empty());
        assert_eq!(check(&s), (0, 1));
        assert_eq!(c.len(), m.len());
    }

    /// Walks the tree from the root: every inner node's addresses in order and within its range,
    /// every leaf's range the one its parents give it, its keys in order within it, the leaves
    /// linked in address order, the free lists empty nodes, the count the blocks'. Returns the
    /// height and the leaves in use.
    fn check(s: &LiveSet) -> (usize, usize) {
        let Some(t) = &s.tree else { return (0, 0) };
        fn walk(t: &Tree, node: u32, depth: usize, lo: u64, hi: u64, out: &mut Vec<u32>) {
            if depth == t.height {
                let l = &t.leaves[node as usize];
                assert_eq!((l.lo, l.hi), (lo, hi), "leaf {node}'s range");
                let keys: Vec<u64> = l.keys[..l.n()].iter().map(|k| k & ADDR_MASK).collect();
                assert!(
                    keys.windows(2).all(|w| w[0] < w[1]),
                    "leaf {node} out of order"
                );
                assert!(keys.iter().all(|&k| lo <= k && k < hi), "leaf {node}");
                out.push(node);
                return;
            }
            let n = &t.inners[node as usize];
            assert!(
                n.n() >= 1 && (depth > 0 || n.n() >= 2),
                "inner {node}: {}",
                n.n()
            );
            let mut bounds = vec![lo];
            bounds.extend_from_slice(&n.seps[..n.n() - 1]);
            bounds.push(hi);
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "inner {node}");
            for (i, &kid) in n.kids[..n.n()].iter().enumerate() {
                walk(t, kid, depth + 1, bounds[i], bounds[i + 1], out);
            }
        }
        let mut order = Vec::new();
        walk(t, t.root, 0, 0, u64::MAX, &mut order);
        for (i, &l) in order.iter().enumerate() {
            let leaf = &t.leaves[l as usize];
            let prev = if i == 0 { NONE } else { order[i - 1] };
            let next = order.get(i + 1).copied().unwrap_or(NONE);
            assert_eq!((leaf.prev, leaf.next), (prev, next), "leaf {l}'s links");
        }
        for &f in &t.free_leaves {
            let l = &t.leaves[f as usize];
            assert!(l.n() == 0 && l.lo == l.hi && !order.contains(&f));
        }
        assert_eq!(order.len() + t.free_leaves.len(), t.leaves.len());
        let blocks: usize = order.iter().map(|&l| t.leaves[l as usize].n()).sum();
        assert_eq!(blocks, t.len);
        assert_eq!(blocks + s.odd.len(), s.len());
        (t.height, order.len())
    }

    /// A heap that grows (up, or down) fills its leaves: ~17 B a block. Freed in a random
    /// order, the tree merges its leaves as it empties, down to one.
    #[test]
    fn a_growing_heap_packs_its_leaves_and_an_emptying_one_merges_them() {
        for (step, name) in [(112i64, "up"), (-48, "down")] {
            let mut s = LiveSet::new();
            let base = 0x5555_0000_0000u64;
            let n = 1_000_000u64;
            let addrs: Vec<u64> = (0..n)
                .map(|i| base.wrapping_add_signed(step * i as i64))
                .collect();
            for (i, &a) in addrs.iter().enumerate() {
                assert!(s.insert(a, live(100, i as u32 % 7, 0)).is_none());
            }
            let (height, leaves) = check(&s);
            // 1 M blocks in 31,250 full leaves, 977 inner nodes (every one full but the last of
            // each level), three levels.
            assert_eq!(
                (height, leaves, s.tree.as_ref().unwrap().inners.len()),
                (3, 31_250, 1_009),
                "{name}"
            );
            assert_eq!(s.bytes() / n as usize, 17, "{name}");
            assert_eq!(s.get(addrs[777_777]).map(|l| l.stack), Some(777_777 % 7));
            let mut rng = 0x2545_F491_4F6C_DD1Du64;
            let mut order = addrs.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, (xorshift(&mut rng) % (i as u64 + 1)) as usize);
            }
            for (i, &a) in order.iter().enumerate() {
                assert_eq!(s.remove(a).map(|l| l.size), Some(100));
                if i % 100_000 == 0 {
                    check(&s);
                }
            }
            assert_eq!((s.len(), check(&s)), (0, (0, 1)), "{name}");
            assert!(s.remove(addrs[0]).is_none());
        }
    }

    /// Blocks coming and going at random over a large set: the tree stays consistent, finds
    /// every block, and holds at most 32 B a live block at its peak.
    #[test]
    fn a_heap_churning_at_random_stays_within_32_bytes_a_block() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || xorshift(&mut rng);
        let mut s = LiveSet::new();
        let mut held: Vec<u64> = Vec::new();
        let mut m: std::collections::HashMap<u64, u64> = Default::default();
        let mut peak = (0, 0);
        for round in 0..1_500_000u64 {
            // Growing to ~400 K blocks, then as many frees as allocations.
            let grow = round < 600_000 || next() % 2 == 0;
            if grow || held.is_empty() {
                let a = 0x7f00_0000_0000 + 16 * (next() % 4_000_000);
                let size = 16 + next() % 500;
                let old = s
                    .insert(a, live(size, (round % 1000) as u32, 0))
                    .map(|l| l.size);
                assert_eq!(old, m.insert(a, size));
                if old.is_none() {
                    held.push(a);
                }
            } else {
                let i = (next() % held.len() as u64) as usize;
                let a = held.swap_remove(i);
                assert_eq!(s.remove(a).map(|l| l.size), m.remove(&a));
            }
            if s.bytes() > peak.0 {
                peak = (s.bytes(), s.len());
            }
            if round % 250_000 == 0 {
                check(&s);
            }
        }
        check(&s);
        for (a, size) in &m {
            assert_eq!(s.get(*a).map(|l| l.size), Some(*size));
        }
        assert_eq!((s.len(), peak), (m.len(), (13_563_920, 498_623)));
        assert!(peak.0 < 32 * peak.1);
    }
}
