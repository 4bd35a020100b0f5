//! Memory over time: live bytes and blocks per allocation stack (callsite) and for the whole
//! process, sampled at the epoch boundaries the tracer writes into the trace. A boundary applies
//! once every event numbered below it has been applied, so a live run and a report of its kept
//! trace see exactly the same series.
//!
//! Storage is O(callsites × epochs) at most, and less: a callsite gets a point only at the
//! boundaries where its value changed since the previous one.

use std::collections::VecDeque;

use leakhunt_format::Epoch;
use rustc_hash::FxHashMap;

/// Stack ids below this are counted in vectors; larger ones (inherited blocks of a fork child,
/// a corrupt trace) in maps.
const DENSE: usize = 1 << 22;

/// Boundaries kept at most: past this, every other one is dropped (the series keeps its shape at
/// half the resolution), so a run of any length takes bounded memory.
pub const MAX_BOUNDARIES: usize = 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub bytes: i64,
    pub blocks: i64,
    /// Allocations made (for the unwind-quality figures and the profiles' `alloc_objects`).
    pub allocs: u64,
    /// Their bytes (the profiles' `alloc_space`).
    pub alloc_bytes: u64,
}

/// The process at one boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boundary {
    pub index: u32,
    pub time_ns: u64,
    pub rss: u64,
    pub live_bytes: u64,
    pub live_blocks: u64,
    /// Allocations since the start.
    pub allocs: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Series {
    now: Vec<Counter>,
    sparse_now: FxHashMap<u32, Counter>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    /// Per stack: (boundary position, bytes, blocks) wherever the value changed.
    points: FxHashMap<u32, Vec<(u32, u64, u64)>>,
    pub boundaries: Vec<Boundary>,
    pending: VecDeque<Epoch>,
    /// The sequence number at which the next pending boundary applies (`u64::MAX`: none).
    pub next_seq: u64,
    /// The trace's index of the last boundary applied (0: none yet).
    pub last_index: u32,
    allocs: u64,
    /// Boundaries (trace indexes) that thinning keeps: the snapshots'.
    pinned: rustc_hash::FxHashSet<u32>,
    total: Counter,
}

impl Series {
    pub fn new() -> Series {
        Series {
            next_seq: u64::MAX,
            ..Series::default()
        }
    }

    /// The stack's counter since the last boundary, marked as changed.
    #[inline]
    fn now_mut(&mut self, stack: u32) -> &mut Counter {
        let i = stack as usize;
        if i < DENSE {
            if i >= self.now.len() {
                let n = (i + 1).next_power_of_two();
                self.now.resize(n, Counter::default());
                self.is_dirty.resize(n, false);
            }
            if !self.is_dirty[i] {
                self.is_dirty[i] = true;
                self.dirty.push(stack);
            }
            &mut self.now[i]
        } else {
            self.dirty.push(stack);
            self.sparse_now.entry(stack).or_default()
        }
    }

    /// `n` allocations from `stack`, `bytes` in all, that were freed again in the same interval
    /// (elided pairs: live bytes and blocks do not change).
    pub fn add_allocs(&mut self, stack: u32, n: u64, bytes: u64) {
        self.allocs += n;
        let c = self.now_mut(stack);
        c.allocs += n;
        c.alloc_bytes = c.alloc_bytes.saturating_add(bytes);
    }

    /// Blocks of `stack` appeared (positive) or went away (negative).
    #[inline]
    pub fn add(&mut self, stack: u32, bytes: i64, blocks: i64) {
        self.total.bytes += bytes;
        self.total.blocks += blocks;
        self.allocs += (blocks > 0) as u64;
        let c = self.now_mut(stack);
        c.bytes += bytes;
        c.blocks += blocks;
        if blocks > 0 {
            c.allocs += 1;
            c.alloc_bytes = c.alloc_bytes.saturating_add(bytes as u64);
        }
    }

    /// A boundary read from the trace; it applies at its sequence number.
    pub fn push(&mut self, e: Epoch) {
        self.pending.push_back(e);
        self.next_seq = self.pending.front().map_or(u64::MAX, |e| e.seq);
    }

    /// Applies the pending boundaries at or below `seq` (every event below it has been applied),
    /// or all of them (`u64::MAX`, at the end of the stream).
    pub fn reach(&mut self, seq: u64) {
        while let Some(e) = self.pending.front().copied() {
            if e.seq > seq {
                break;
            }
            self.pending.pop_front();
            self.close(e);
        }
        self.next_seq = self.pending.front().map_or(u64::MAX, |e| e.seq);
    }

    fn close(&mut self, e: Epoch) {
        let pos = self.boundaries.len() as u32;
        self.dirty.sort_unstable();
        self.dirty.dedup();
        for &stack in &self.dirty {
            let c = self.counter(stack);
            let pts = self.points.entry(stack).or_default();
            let v = (pos, c.bytes.max(0) as u64, c.blocks.max(0) as u64);
            if pts.last().is_none_or(|&(_, b, n)| (b, n) != (v.1, v.2)) {
                pts.push(v);
            }
            if let Some(d) = self.is_dirty.get_mut(stack as usize) {
                *d = false;
            }
        }
        self.dirty.clear();
        self.boundaries.push(Boundary {
            index: e.index,
            time_ns: e.time_ns,
            rss: e.rss,
            live_bytes: self.total.bytes.max(0) as u64,
            live_blocks: self.total.blocks.max(0) as u64,
            allocs: self.allocs,
        });
        self.last_index = e.index;
        if self.boundaries.len() > MAX_BOUNDARIES {
            self.thin();
        }
    }

    /// Keeps a boundary at a snapshot's index from being thinned away.
    pub fn pin(&mut self, index: u32) {
        self.pinned.insert(index);
    }

    /// Keeps every other boundary (positions 0, 2, 4, ...), the pinned ones and the last. A
    /// callsite's value at a kept boundary is its value there: the last point at or before it.
    fn thin(&mut self) {
        let n = self.boundaries.len();
        let keep: Vec<usize> = (0..n)
            .filter(|&i| {
                i % 2 == 0 || i == n - 1 || self.pinned.contains(&self.boundaries[i].index)
            })
            .collect();
        self.boundaries = keep.iter().map(|&i| self.boundaries[i]).collect();
        for pts in self.points.values_mut() {
            let mut out: Vec<(u32, u64, u64)> = Vec::with_capacity(pts.len() / 2 + 1);
            for &(p, b, c) in pts.iter() {
                // The first kept boundary at or after the point's own.
                let k = keep.partition_point(|&i| i < p as usize) as u32;
                if k as usize == keep.len() {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.0 == k => *last = (k, b, c),
                    _ => out.push((k, b, c)),
                }
            }
            // A value that ends up equal to the one before it needs no point.
            out.dedup_by(|b, a| (a.1, a.2) == (b.1, b.2));
            *pts = out;
        }
    }

    fn counter(&self, stack: u32) -> Counter {
        match self.now.get(stack as usize) {
            Some(c) => *c,
            None => self.sparse_now.get(&stack).copied().unwrap_or_default(),
        }
    }

    /// (stack id, allocations made from it) for every stack that allocated.
    pub fn allocs_by_stack(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.now
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, c.allocs))
            .chain(self.sparse_now.iter().map(|(&id, c)| (id, c.allocs)))
            .filter(|&(_, n)| n > 0)
    }

    /// (stack id, allocations, their bytes) for every stack that allocated, up to now.
    pub fn alloc_totals(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.now
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, c.allocs, c.alloc_bytes))
            .chain(
                self.sparse_now
                    .iter()
                    .map(|(&id, c)| (id, c.allocs, c.alloc_bytes)),
            )
            .filter(|&(_, n, _)| n > 0)
    }

    /// Stacks that had live blocks at some boundary.
    pub fn stacks(&self) -> impl Iterator<Item = u32> + '_ {
        self.points.keys().copied()
    }

    /// The points of `stack`: (boundary position, live bytes, live blocks) at each boundary where
    /// its value changed, in boundary order; before the first, it had none.
    pub fn points(&self, stack: u32) -> &[(u32, u64, u64)] {
        self.points.get(&stack).map_or(&[], |v| v.as_slice())
    }

    /// Live (bytes, blocks) of `stack` at boundary position `pos` (a binary search, where
    /// [`Series::of`] gives every boundary).
    pub fn at(&self, stack: u32, pos: usize) -> (u64, u64) {
        let pts = self.points(stack);
        let i = pts.partition_point(|&(p, _, _)| p as usize <= pos);
        i.checked_sub(1).map_or((0, 0), |i| (pts[i].1, pts[i].2))
    }

    /// Live (bytes, blocks) of `stack` at every boundary.
    pub fn of(&self, stack: u32) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.boundaries.len());
        let mut cur = (0, 0);
        let mut it = self
            .points
            .get(&stack)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .peekable();
        for pos in 0..self.boundaries.len() as u32 {
            while let Some(&&(p, b, n)) = it.peek() {
                if p > pos {
                    break;
                }
                cur = (b, n);
                it.next();
            }
            out.push(cur);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(index: u32, seq: u64) -> Epoch {
        Epoch {
            index,
            time_ns: index as u64 * 1_000_000_000,
            seq,
            rss: 1000 * index as u64,
        }
    }

    #[test]
    fn boundaries_apply_at_their_sequence_number_and_points_are_sparse() {
        let mut s = Series::new();
        s.add(1, 100, 1);
        s.push(epoch(1, 5));
        s.push(epoch(2, 9));
        assert_eq!(s.next_seq, 5);
        s.reach(4);
        assert!(
            s.boundaries.is_empty(),
            "seq 4 is below the first boundary's 5"
        );
        s.reach(5);
        assert_eq!(s.boundaries.len(), 1);
        s.add(7, 30, 1);
        s.reach(u64::MAX);
        s.push(epoch(3, 12));
        s.add(1, -100, -1);
        s.reach(12);
        assert_eq!(s.of(1), [(100, 1), (100, 1), (0, 0)]);
        assert_eq!(s.of(7), [(0, 0), (30, 1), (30, 1)]);
        assert_eq!(s.of(99), [(0, 0), (0, 0), (0, 0)]);
        for stack in [1, 7, 99] {
            let at: Vec<_> = (0..3).map(|pos| s.at(stack, pos)).collect();
            assert_eq!(at, s.of(stack), "stack {stack}");
        }
        // Stack 1 did not change at the second boundary: no point stored for it.
        assert_eq!(s.points[&1].len(), 2);
        let totals: Vec<_> = s.boundaries.iter().map(|b| (b.live_bytes, b.rss)).collect();
        assert_eq!(totals, [(100, 1000), (130, 2000), (30, 3000)]);
        assert_eq!(s.last_index, 3);
    }

    #[test]
    fn long_runs_are_thinned_to_a_bounded_number_of_boundaries() {
        let mut s = Series::new();
        for i in 1..=3000u32 {
            // Stack 1 grows by one block every epoch; stack 2 steps up every 100.
            s.add(1, 10, 1);
            if i % 100 == 0 {
                s.add(2, 1000, 1);
            }
            s.push(epoch(i, i as u64));
            s.reach(i as u64);
        }
        let n = s.boundaries.len();
        assert!(n <= MAX_BOUNDARIES && n > MAX_BOUNDARIES / 4, "{n}");
        // The values at the kept boundaries are those at their original boundaries.
        let one = s.of(1);
        let two = s.of(2);
        for (k, b) in s.boundaries.iter().enumerate() {
            assert_eq!(
                one[k],
                (10 * b.index as u64, b.index as u64),
                "at {}",
                b.index
            );
            assert_eq!(two[k].0, 1000 * (b.index as u64 / 100), "at {}", b.index);
            assert_eq!(
                b.live_bytes,
                10 * b.index as u64 + 1000 * (b.index as u64 / 100)
            );
        }
        assert_eq!(s.last_index, 3000);
    }

    #[test]
    fn thinning_keeps_snapshots() {
        let mut s = Series::new();
        s.pin(777);
        for i in 1..=3000u32 {
            s.add(1, 1, 1);
            s.push(epoch(i, i as u64));
            s.reach(i as u64);
        }
        let at = s.boundaries.iter().position(|b| b.index == 777).unwrap();
        assert_eq!(s.of(1)[at], (777, 777));
    }
}
