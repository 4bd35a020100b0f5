//! Events waiting for a lower sequence number, one queue per thread (a thread's events come in
//! its sequence order), merged through a min-heap of the queues' first sequence numbers: with
//! threads whose events interleave finely (every batch of one waits for the other's), each waiting
//! event costs a queue push and a heap step over the few threads, not an ordered-map insert.
//!
//! A queue keeps its events encoded (differences from the event before it, each value in as
//! many bytes as it needs behind a length nibble), 3-7 bytes an event of a heap's usual churn
//! instead of the 32 of a decoded one, in chunks of 4 KiB given back as they are read: with
//! hundreds of threads on two cores, one number that a preempted thread holds keeps every
//! other thread's events waiting, up to hundreds of thousands at once, and those are most of
//! what the CLI holds then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::process::Ev;
use leakhunt_format::compact::{unzigzag, width, zigzag};

/// Bytes of one chunk of a queue.
const CHUNK: usize = 4096;
/// The most bytes one event takes encoded (a kind byte, two length bytes, four 8-byte fields),
/// and the 8 bytes past it that the 8-byte stores and loads may touch.
const MAX_EVENT: usize = 3 + 4 * 8 + 8;

const K_ALLOC: u8 = 0;
const K_FREE: u8 = 1;
const K_NOP: u8 = 2;
const K_FORK: u8 = 3;
const K_PAIRS: u8 = 4;

/// A chunk of encoded events, written and read 8 bytes at a time (a kind byte, then per two
/// values a length byte and each in as many bytes as it needs, as the trace's compact records);
/// `END` follows the last event of a chunk that is not a queue's last.
type Chunk = Box<[u8; CHUNK]>;

/// Marks the end of a chunk's events (no kind byte reads so: kinds are below 8, functions 32).
const END: u8 = 0xff;

/// Writes into a chunk at `*len` (which has room for an event).
struct Out<'a> {
    buf: &'a mut [u8; CHUNK],
    len: &'a mut usize,
}

impl Out<'_> {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.buf[*self.len] = b;
        *self.len += 1;
    }

    /// A length byte for `a` and `b`, then both.
    #[inline]
    fn pair(&mut self, a: u64, b: u64) {
        let (la, lb) = (width(a), width(b));
        self.byte((la | lb << 4) as u8);
        let n = *self.len;
        self.buf[n..n + 8].copy_from_slice(&a.to_le_bytes());
        self.buf[n + la..n + la + 8].copy_from_slice(&b.to_le_bytes());
        *self.len = n + la + lb;
    }
}

/// The value of `len` bytes (0-8) at `buf[*at..]`.
#[inline]
fn field(buf: &[u8; CHUNK], at: &mut usize, len: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[*at..*at + 8]);
    *at += len;
    u64::from_le_bytes(w) & u64::MAX.checked_shr(64 - 8 * len as u32).unwrap_or(0)
}

/// The two values after a length byte at `buf[*at..]`.
#[inline]
fn pair(buf: &[u8; CHUNK], at: &mut usize) -> (u64, u64) {
    let l = buf[*at];
    *at += 1;
    let a = field(buf, at, (l & 15) as usize);
    let b = field(buf, at, (l >> 4) as usize);
    (a, b)
}

/// What an event is encoded against: the previous event's number, address and stack.
#[derive(Clone, Copy, Default)]
struct Prev {
    seq: u64,
    addr: u64,
    stack: u32,
}

impl Prev {
    /// Encodes `ev`, numbered `seq` (above `self.seq`), after the event `self` describes, into
    /// `c` (which has room).
    fn encode(&mut self, seq: u64, ev: &Ev, mut c: Out) {
        // Wrapping: a queue rewritten in order (see `Pending::push`) starts again below its last.
        let dseq = seq.wrapping_sub(self.seq);
        self.seq = seq;
        match *ev {
            Ev::Alloc {
                addr,
                size,
                stack,
                func,
            } => {
                c.byte(K_ALLOC | func << 3);
                c.pair(dseq, zigzag(addr.wrapping_sub(self.addr) as i64));
                c.pair(size, zigzag(stack.wrapping_sub(self.stack) as i32 as i64));
                (self.addr, self.stack) = (addr, stack);
            }
            Ev::Free { addr } => {
                c.byte(K_FREE);
                c.pair(dseq, zigzag(addr.wrapping_sub(self.addr) as i64));
                self.addr = addr;
            }
            Ev::Nop => {
                c.byte(K_NOP);
                c.pair(dseq, 0);
            }
            Ev::Fork { child } => {
                c.byte(K_FORK);
                c.pair(dseq, child as u64);
            }
            Ev::Pairs {
                stack,
                count,
                bytes,
            } => {
                c.byte(K_PAIRS);
                c.pair(dseq, zigzag(stack.wrapping_sub(self.stack) as i32 as i64));
                c.pair(count, bytes);
                self.stack = stack;
            }
        }
    }

    /// Decodes the event at `buf[*at..]` (written by [`Prev::encode`] after `self`).
    #[inline(always)]
    fn decode(&mut self, buf: &[u8; CHUNK], at: &mut usize) -> (u64, Ev) {
        let head = buf[*at];
        *at += 1;
        let (dseq, x) = pair(buf, at);
        self.seq = self.seq.wrapping_add(dseq);
        let ev = match head & 7 {
            K_ALLOC => {
                let (size, dstack) = pair(buf, at);
                self.addr = self.addr.wrapping_add(unzigzag(x) as u64);
                self.stack = self.stack.wrapping_add(unzigzag(dstack) as u32);
                Ev::Alloc {
                    addr: self.addr,
                    size,
                    stack: self.stack,
                    func: head >> 3,
                }
            }
            K_FREE => {
                self.addr = self.addr.wrapping_add(unzigzag(x) as u64);
                Ev::Free { addr: self.addr }
            }
            K_FORK => Ev::Fork { child: x as u32 },
            K_PAIRS => {
                let (count, bytes) = pair(buf, at);
                self.stack = self.stack.wrapping_add(unzigzag(x) as u32);
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

/// One thread's waiting events, encoded in chunks (the first event's number is also the
/// queue's key in the heap).
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    /// Where the next event starts in the first chunk, and where the next one goes in the last.
    read: usize,
    write: usize,
    /// The last event decoded and the last event pushed (equal when the queue is empty).
    r: Prev,
    w: Prev,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Appends `ev` (numbered above every event pushed so far); `spare`: chunks to reuse.
    fn push(&mut self, seq: u64, ev: Ev, spare: &mut Vec<Chunk>) {
        if self.chunks.is_empty() || self.write + MAX_EVENT > CHUNK {
            if let Some(c) = self.chunks.back_mut() {
                c[self.write] = END;
            }
            self.chunks
                .push_back(spare.pop().unwrap_or_else(|| Box::new([0; CHUNK])));
            self.write = 0;
        }
        if let Some(c) = self.chunks.back_mut() {
            self.w.encode(
                seq,
                &ev,
                Out {
                    buf: c,
                    len: &mut self.write,
                },
            );
        }
    }

    /// The last number pushed (the queue is not empty).
    fn last(&self) -> u64 {
        self.w.seq
    }

    /// The first event's number, without taking it.
    fn first(&self) -> Option<u64> {
        let c = self.chunks.front()?;
        let mut at = self.read + 1;
        Some(self.r.seq.wrapping_add(pair(c, &mut at).0))
    }

    /// Takes the first event; an emptied chunk goes to `spare`.
    #[inline(always)]
    fn pop(&mut self, spare: &mut Vec<Chunk>) -> Option<(u64, Ev)> {
        let c = self.chunks.front()?;
        let mut at = self.read;
        let e = self.r.decode(c, &mut at);
        self.read = at;
        if self.ends(0, at) {
            if let Some(c) = self.chunks.pop_front() {
                if spare.len() < SPARE {
                    spare.push(c);
                }
            }
            self.read = 0;
            if self.chunks.is_empty() {
                self.write = 0;
            }
        }
        Some(e)
    }

    /// Every event, in order (the queue is left empty).
    fn take_all(&mut self) -> Vec<(u64, Ev)> {
        let mut v = Vec::new();
        while let Some(e) = self.pop(&mut Vec::new()) {
            v.push(e);
        }
        v
    }

    /// Whether the events of chunk `k` end at `at`: where the last chunk is written up to, or
    /// at the `END` after a full one's last event.
    #[inline(always)]
    fn ends(&self, k: usize, at: usize) -> bool {
        if k + 1 == self.chunks.len() {
            at == self.write
        } else {
            self.chunks[k][at] == END
        }
    }

    /// Calls `f` with every waiting event's number and the bytes it takes encoded.
    fn walk(&self, mut f: impl FnMut(u64, usize)) {
        let mut p = self.r;
        let mut at = self.read;
        for (k, c) in self.chunks.iter().enumerate() {
            while !self.ends(k, at) {
                let from = at;
                f(p.decode(c, &mut at).0, at - from);
            }
            at = 0;
        }
    }

    /// Bytes of events held (for tests).
    #[cfg(test)]
    fn used(&self) -> usize {
        let mut n = 0;
        self.walk(|_, len| n += len);
        n
    }
}

/// Emptied chunks kept for reuse.
const SPARE: usize = 16;

#[derive(Default)]
pub(crate) struct Pending {
    queues: Vec<Queue>,
    by_tid: FxHashMap<u32, usize>,
    /// (first sequence number, queue) for every non-empty queue, exactly one entry each.
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    len: usize,
    spare: Vec<Chunk>,
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
        if queue.is_empty() {
            queue.push(seq, ev, &mut self.spare);
            self.heads.push(Reverse((seq, q)));
        } else if queue.last() < seq {
            queue.push(seq, ev, &mut self.spare);
        } else {
            // Out of order within a thread (a thread id reused by a later thread, a recovered
            // ring): the queue is rewritten in order, and its heap entry set right.
            let mut all = queue.take_all();
            let at = all.partition_point(|&(s, _)| s < seq);
            all.insert(at, (seq, ev));
            for (s, e) in all {
                queue.push(s, e, &mut self.spare);
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
            .filter_map(|(q, queue)| queue.first().map(|s| Reverse((s, q))))
            .collect();
    }

    /// The lowest waiting sequence number.
    #[inline]
    pub(crate) fn first(&self) -> Option<u64> {
        self.heads.peek().map(|Reverse((s, _))| *s)
    }

    /// Takes the event with the lowest sequence number.
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<(u64, Ev)> {
        let mut top = self.heads.peek_mut()?;
        let Reverse((_, q)) = *top;
        let queue = &mut self.queues[q];
        let e = queue.pop(&mut self.spare)?;
        match queue.first() {
            Some(s) => *top = Reverse((s, q)),
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
            q.walk(|s, _| {
                set.insert(s);
            });
        }
        set
    }

    /// Bytes the encoded events hold (chunks allocated), for tests.
    #[cfg(test)]
    fn chunk_bytes(&self) -> usize {
        self.queues.iter().map(|q| q.chunks.len() * CHUNK).sum()
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
        let used: usize = p.queues.iter().map(Queue::used).sum();
        // An allocation: kind, function, number, address, size, stack (1 byte each); a free:
        // kind, number, address; each queue's first allocation's address is 7 bytes (from 0).
        assert_eq!(used, 64 * (499 * 6 + 12 + 500 * 3));
        assert_eq!(p.chunk_bytes(), 64 * 2 * CHUNK);
        p.push(100, 0, Ev::Nop);
        assert_eq!(p.seqs().len(), 64_001);
        let mut next = 0;
        while let Some((seq, _)) = p.pop() {
            assert_eq!(seq, next);
            next += 1;
        }
        assert_eq!((next, p.is_empty(), p.chunk_bytes()), (64_001, true, 0));
        assert_eq!(p.spare.len(), SPARE);
    }
}
