//! Events waiting for a lower sequence number, one queue per thread (a thread's events come in
//! its sequence order), merged through a min-heap of the queues' first sequence numbers: with
//! threads whose events interleave finely (every batch of one waits for the other's), each waiting
//! event costs a queue push and a heap step over the few threads, not an ordered-map insert.
//!
//! A queue keeps its events encoded (differences from the event before it, LEB128), about 6-9
//! bytes an event instead of the 32 of a decoded one, in chunks of 4 KiB given back as they are
//! read: with hundreds of threads on two cores, one number that a preempted thread holds keeps
//! every other thread's events waiting, up to hundreds of thousands at once, and those are
//! most of what the CLI holds then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::process::Ev;

/// Bytes of one chunk of a queue.
const CHUNK: usize = 4096;
/// The most bytes one event takes encoded: a kind byte and four LEB128 values.
const MAX_EVENT: usize = 1 + 4 * 10;

const K_ALLOC: u8 = 0;
const K_FREE: u8 = 1;
const K_NOP: u8 = 2;
const K_FORK: u8 = 3;
const K_PAIRS: u8 = 4;

#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[inline]
fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn get(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let c = b[*at];
        *at += 1;
        v |= ((c & 0x7f) as u64) << shift;
        if c < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// What an event is encoded against: the previous event's number, address and stack.
#[derive(Clone, Copy, Default)]
struct Prev {
    seq: u64,
    addr: u64,
    stack: u32,
}

impl Prev {
    /// Encodes `ev`, numbered `seq` (above `self.seq`), after the event `self` describes.
    fn encode(&mut self, seq: u64, ev: &Ev, out: &mut Vec<u8>) {
        let dseq = seq - self.seq;
        self.seq = seq;
        match *ev {
            Ev::Alloc {
                addr,
                size,
                stack,
                func,
            } => {
                out.push(K_ALLOC);
                out.push(func);
                put(out, dseq);
                put(out, zigzag(addr.wrapping_sub(self.addr) as i64));
                put(out, size);
                put(out, zigzag(stack.wrapping_sub(self.stack) as i32 as i64));
                (self.addr, self.stack) = (addr, stack);
            }
            Ev::Free { addr } => {
                out.push(K_FREE);
                put(out, dseq);
                put(out, zigzag(addr.wrapping_sub(self.addr) as i64));
                self.addr = addr;
            }
            Ev::Nop => {
                out.push(K_NOP);
                put(out, dseq);
            }
            Ev::Fork { child } => {
                out.push(K_FORK);
                put(out, dseq);
                put(out, child as u64);
            }
            Ev::Pairs {
                stack,
                count,
                bytes,
            } => {
                out.push(K_PAIRS);
                put(out, dseq);
                put(out, zigzag(stack.wrapping_sub(self.stack) as i32 as i64));
                put(out, count);
                put(out, bytes);
                self.stack = stack;
            }
        }
    }

    /// Decodes the event at `b[*at..]` (written by [`Prev::encode`] after `self`).
    fn decode(&mut self, b: &[u8], at: &mut usize) -> (u64, Ev) {
        let kind = b[*at];
        *at += 1;
        let func = if kind == K_ALLOC {
            *at += 1;
            b[*at - 1]
        } else {
            0
        };
        self.seq = self.seq.wrapping_add(get(b, at));
        let ev = match kind {
            K_ALLOC => {
                self.addr = self.addr.wrapping_add(unzigzag(get(b, at)) as u64);
                let size = get(b, at);
                self.stack = self.stack.wrapping_add(unzigzag(get(b, at)) as u32);
                Ev::Alloc {
                    addr: self.addr,
                    size,
                    stack: self.stack,
                    func,
                }
            }
            K_FREE => {
                self.addr = self.addr.wrapping_add(unzigzag(get(b, at)) as u64);
                Ev::Free { addr: self.addr }
            }
            K_FORK => Ev::Fork {
                child: get(b, at) as u32,
            },
            K_PAIRS => {
                self.stack = self.stack.wrapping_add(unzigzag(get(b, at)) as u32);
                let count = get(b, at);
                let bytes = get(b, at);
                Ev::Pairs {
                    stack: self.stack,
                    count,
                    bytes,
                }
            }
            _ => Ev::Nop,
        };
        (self.seq, ev)
    }
}

/// One thread's waiting events: the first decoded, the rest encoded in chunks.
#[derive(Default)]
struct Queue {
    head: Option<(u64, Ev)>,
    chunks: VecDeque<Vec<u8>>,
    /// Where the next event starts in `chunks[0]`.
    read: usize,
    /// The last event decoded (`head`'s) and the last event pushed.
    r: Prev,
    w: Prev,
}

impl Queue {
    fn push(&mut self, seq: u64, ev: Ev) {
        if self.head.is_none() {
            self.head = Some((seq, ev));
            let mut p = Prev::default();
            p.encode(seq, &ev, &mut Vec::new());
            (self.r, self.w) = (p, p);
            return;
        }
        if self
            .chunks
            .back()
            .is_none_or(|c| c.len() + MAX_EVENT > CHUNK)
        {
            self.chunks.push_back(Vec::with_capacity(CHUNK));
        }
        if let Some(c) = self.chunks.back_mut() {
            self.w.encode(seq, &ev, c);
        }
    }

    /// The last number pushed (the queue is not empty).
    fn last(&self) -> u64 {
        self.w.seq
    }

    fn pop(&mut self) -> Option<(u64, Ev)> {
        let e = self.head.take()?;
        if let Some(c) = self.chunks.front() {
            let mut at = self.read;
            self.head = Some(self.r.decode(c, &mut at));
            if at == c.len() {
                self.chunks.pop_front();
                self.read = 0;
            } else {
                self.read = at;
            }
        }
        Some(e)
    }

    /// Every event, in order (the queue is left empty).
    fn take_all(&mut self) -> Vec<(u64, Ev)> {
        let mut v = Vec::new();
        while let Some(e) = self.pop() {
            v.push(e);
        }
        v
    }

    /// Calls `f` with every waiting number.
    fn for_each_seq(&self, mut f: impl FnMut(u64)) {
        let Some((s, _)) = self.head else { return };
        f(s);
        let mut p = self.r;
        let mut read = self.read;
        for c in &self.chunks {
            let mut at = read;
            while at < c.len() {
                f(p.decode(c, &mut at).0);
            }
            read = 0;
        }
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    queues: Vec<Queue>,
    by_tid: FxHashMap<u32, usize>,
    /// (first sequence number, queue) for every non-empty queue, exactly one entry each.
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    len: usize,
}

impl Pending {
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push(&mut self, tid: u32, seq: u64, ev: Ev) {
        let queues = &mut self.queues;
        let q = *self.by_tid.entry(tid).or_insert_with(|| {
            queues.push(Queue::default());
            queues.len() - 1
        });
        let queue = &mut self.queues[q];
        self.len += 1;
        if queue.head.is_none() {
            queue.push(seq, ev);
            self.heads.push(Reverse((seq, q)));
        } else if queue.last() < seq {
            queue.push(seq, ev);
        } else {
            // Out of order within a thread (a thread id reused by a later thread, a recovered
            // ring): the queue is rewritten in order, and its heap entry set right.
            let mut all = queue.take_all();
            let at = all.partition_point(|&(s, _)| s < seq);
            all.insert(at, (seq, ev));
            for (s, e) in all {
                queue.push(s, e);
            }
            if at == 0 {
                self.rebuild_heads();
            }
        }
    }

    fn rebuild_heads(&mut self) {
        self.heads = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(q, queue)| queue.head.map(|(s, _)| Reverse((s, q))))
            .collect();
    }

    /// The lowest waiting sequence number.
    #[inline]
    pub(crate) fn first(&self) -> Option<u64> {
        self.heads.peek().map(|Reverse((s, _))| *s)
    }

    /// Takes the event with the lowest sequence number.
    pub(crate) fn pop(&mut self) -> Option<(u64, Ev)> {
        let mut top = self.heads.peek_mut()?;
        let Reverse((_, q)) = *top;
        let queue = &mut self.queues[q];
        let e = queue.pop()?;
        match queue.head {
            Some((s, _)) => *top = Reverse((s, q)),
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        self.len -= 1;
        Some(e)
    }

    /// Every waiting sequence number (for a few lookups at a time: see `Process::recover`).
    pub(crate) fn seqs(&self) -> FxHashSet<u64> {
        let mut set = FxHashSet::default();
        for q in &self.queues {
            q.for_each_seq(|s| {
                set.insert(s);
            });
        }
        set
    }

    /// Bytes the encoded events hold (chunks allocated), for tests.
    #[cfg(test)]
    fn chunk_bytes(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.chunks.iter().map(|c| c.capacity()).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &Ev, b: &Ev) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn events_come_back_exactly_in_sequence_order() {
        // Three threads' events, every kind, extreme values, interleaved numbers.
        let evs = [
            Ev::Alloc {
                addr: 0x7fff_ffff_fff0,
                size: 1 << 46,
                stack: u32::MAX,
                func: 31,
            },
            Ev::Free { addr: 0x10 },
            Ev::Nop,
            Ev::Fork { child: u32::MAX },
            Ev::Pairs {
                stack: 0,
                count: u64::MAX,
                bytes: u64::MAX,
            },
            Ev::Alloc {
                addr: 0x10,
                size: 0,
                stack: 7,
                func: 0,
            },
            Ev::Free { addr: u64::MAX },
        ];
        let mut p = Pending::default();
        let mut want = Vec::new();
        for k in 0..3000u64 {
            let ev = evs[(k % 7) as usize];
            // Numbers far apart too: differences of up to 2^40.
            let seq = 1 + k * 3 + if k > 2000 { 1 << 40 } else { 0 };
            p.push((k % 3) as u32, seq, ev);
            want.push((seq, ev));
        }
        want.sort_by_key(|&(s, _)| s);
        assert_eq!(p.first(), Some(1));
        let mut got = Vec::new();
        while let Some(e) = p.pop() {
            got.push(e);
        }
        assert_eq!(got.len(), want.len());
        for ((gs, ge), (ws, we)) in got.iter().zip(&want) {
            assert_eq!(gs, ws);
            assert!(same(ge, we), "{ge:?} != {we:?}");
        }
        assert!(p.is_empty());
    }

    #[test]
    fn a_number_out_of_order_within_a_thread_is_put_in_its_place() {
        let mut p = Pending::default();
        for s in [5, 9, 12] {
            p.push(1, s, Ev::Free { addr: s * 16 });
        }
        p.push(1, 7, Ev::Nop);
        p.push(1, 2, Ev::Free { addr: 0x20 });
        p.push(2, 3, Ev::Nop);
        let order: Vec<u64> = std::iter::from_fn(|| p.pop().map(|(s, _)| s)).collect();
        assert_eq!(order, [2, 3, 5, 7, 9, 12]);
    }

    #[test]
    fn waiting_events_are_held_encoded_and_given_back_as_read() {
        // One missing number (0) holds 64 threads' 1,000 events each back (each thread allocates
        // a block and frees it, the next 48 bytes further on): they are held in 6 bytes an
        // allocation and 3 a free, and once the number comes they go out in order, every chunk
        // given back.
        let mut p = Pending::default();
        for k in 0..64_000u64 {
            let (t, m) = (k % 64, k / 64);
            let addr = 0x5555_0000_0000 + t * (1 << 20) + (m / 2) * 48;
            let ev = if m % 2 == 0 {
                Ev::Alloc {
                    addr,
                    size: 100,
                    stack: 3,
                    func: 0,
                }
            } else {
                Ev::Free { addr }
            };
            p.push(t as u32 + 1, k + 1, ev);
        }
        let used: usize = p
            .queues
            .iter()
            .map(|q| q.chunks.iter().map(|c| c.len()).sum::<usize>())
            .sum();
        // An allocation: kind, function, number, address, size, stack; a free: kind, number,
        // address; each queue's first (an allocation) is held decoded.
        assert_eq!(used, 64 * (499 * 6 + 500 * 3));
        assert_eq!(p.chunk_bytes(), 64 * 2 * CHUNK);
        p.push(100, 0, Ev::Nop);
        assert_eq!(p.seqs().len(), 64_001);
        let mut next = 0;
        while let Some((seq, _)) = p.pop() {
            assert_eq!(seq, next);
            next += 1;
        }
        assert_eq!((next, p.is_empty(), p.chunk_bytes()), (64_001, true, 0));
    }
}
