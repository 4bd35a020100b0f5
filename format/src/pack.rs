//! Packed traces (FORMAT.md, "Packed traces"): what `leakhunt run -o` keeps and `leakhunt pack`
//! writes. A packed trace is [`MAGIC`], a `u32` version and a `u32` of zero, then one zstd
//! frame holding a trace stream of version [`STREAM_VERSION`] whose allocator events travel in
//! `ORDERED` records: the events as a reader applied them, in sequence order, without sequence
//! numbers, each allocation's address told by which of a few predictions it matches and each
//! free naming its block by how many allocations ago it was made. Both sides replay the same
//! model ([`Packer`] writes, [`Unpacker`] reads), so the addresses come back exactly.
//!
//! This module is the codec of `ORDERED` bodies only; the zstd layer is the reader's and the
//! writer's (the CLI), so that the preload, which shares this crate, links no compressor.

use rustc_hash::FxHashMap;

use crate::compact::{ExpandError, Sink};
use crate::encode;
use crate::tag;

/// First eight bytes of a packed trace.
pub const MAGIC: [u8; 8] = *b"LKHUNTPK";
/// The packed wrapper's version.
pub const VERSION: u32 = 1;
/// Bytes before the zstd frame: magic, version, reserved word.
pub const PREAMBLE_LEN: usize = 16;
/// The version of the trace stream inside a packed trace (version 5: `ORDERED` and
/// `END_NOTE` records). The preload still writes [`crate::VERSION`].
pub const STREAM_VERSION: u32 = 5;

/// `END_NOTE` kinds: the stream packed was cut short (the message says where), stopped at a
/// decode error (the message), or (the last record of every packed trace) the packed trace
/// ends here.
pub const END_TRUNCATED: u8 = 0;
pub const END_CORRUPT: u8 = 1;
pub const END_WHOLE: u8 = 2;

/// The packed trace's 16-byte preamble.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p
}

/// The preamble of the trace stream inside a packed trace.
pub fn stream_preamble() -> [u8; crate::PREAMBLE_LEN] {
    let mut p = encode::preamble();
    p[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    p
}

/// Recently freed addresses kept per size class: a free pushes, an allocation that reuses one
/// takes it out (glibc's tcache and fastbins hand back the last freed chunk of a size first).
const DEPTH: usize = 64;
/// Depths told in the event's code; deeper ones are told apart.
const SHALLOW: usize = 16;
/// Recently freed addresses of any class (a block split or grown in place).
const RECENT: usize = 4;
/// Ends of the last few regions carved from the top (one per arena a thread uses).
const TOPS: usize = 4;
/// Allocation sites (stack, size, function) numbered for reuse; past this, new ones are told in
/// full every time.
const MAX_INFOS: usize = 1 << 16;
/// Stacks a new one may name as the one it shares its outer frames with.
const BASES: usize = 256;
/// Most `NOP`s one `ORDERED` record may hold (a reader may have to keep each while it waits
/// for lower numbers, as for the slots of an `EVENTS` record).
pub const MAX_RECORD_NOPS: u64 = crate::MAX_EVENTS_SLOTS as u64;

// Event codes: the first byte of every event (FORMAT.md, "ORDERED").
/// `ALLOC`, by where its address is: 0-3 the end of top `k`; 4-19 its class's freed address at
/// depth `d`; 20-23 the freed address (any class) at depth `d`; 24 the end of the last
/// allocation; 25 its class's freed address at a depth told apart (16-63); 26 told (zigzag
/// difference from top 0).
const A_CLASS: u8 = TOPS as u8;
const A_RECENT: u8 = A_CLASS + SHALLOW as u8;
const A_AFTER: u8 = A_RECENT + RECENT as u8;
const A_DEEP: u8 = A_AFTER + 1;
const A_TOLD: u8 = A_DEEP + 1;
/// `FREE`: 0x20 | mode (0: by age, 1: by distance from the last freed block, 2: address told)
/// | 4 when it carries the block's content.
const OP_FREE: u8 = 0x20;
const FREE_AGE: u8 = 0;
const FREE_NEAR: u8 = 1;
const FREE_TOLD: u8 = 2;
const FREE_CONTENT: u8 = 4;
const OP_NOPS: u8 = 0x28;
const OP_PAIRS: u8 = 0x29;
const OP_FORK: u8 = 0x2a;
const OP_GAP: u8 = 0x2b;
const OP_STACK: u8 = 0x2c;
const OP_ORPHANS: u8 = 0x2d;
/// The top two bits of an event's code: that many `NOP`s (1-3) came right before it.
const FOLD_SHIFT: u32 = 6;
const MAX_FOLDED: u64 = 3;
/// Streams of an `ORDERED` body, in order.
const STREAMS: usize = 6;
const S_KINDS: usize = 0;
const S_INFOS: usize = 1;
const S_ADDRS: usize = 2;
const S_REFS: usize = 3;
const S_MISC: usize = 4;
const S_STACKS: usize = 5;

use crate::compact::{unzigzag, zigzag};

#[inline]
fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// glibc's chunk for a request of `size` bytes (x86_64: 8 bytes of header, 16-byte alignment,
/// 32 at least): where the next chunk carved from the top begins.
#[inline]
fn chunk(size: u64) -> u64 {
    (size.saturating_add(8 + 15) & !15).max(32)
}

#[inline]
fn class(size: u64) -> u32 {
    (chunk(size) >> 4).min(u32::MAX as u64) as u32
}

/// A class's freed addresses, the last freed on top, the oldest dropped past [`DEPTH`]: a
/// ring, so that a push and a take from the top move nothing.
#[derive(Clone, Copy)]
struct Lifo {
    a: [u64; DEPTH],
    /// The slot the next push takes.
    top: u8,
    n: u8,
}

impl Default for Lifo {
    fn default() -> Lifo {
        Lifo {
            a: [0; DEPTH],
            top: 0,
            n: 0,
        }
    }
}

impl Lifo {
    /// The slot of depth `d` (0: the top).
    #[inline]
    fn at(&self, d: usize) -> usize {
        (self.top as usize + DEPTH - 1 - d) % DEPTH
    }
    #[inline]
    fn push(&mut self, v: u64) {
        self.a[self.top as usize] = v;
        self.top = ((self.top as usize + 1) % DEPTH) as u8;
        if (self.n as usize) < DEPTH {
            self.n += 1;
        }
    }
    /// The least depth that holds `v`. (All slots compared at once, then the depths of the
    /// matches: a miss, the common case, costs one pass the compiler vectorizes.)
    #[inline]
    fn find(&self, v: u64) -> Option<usize> {
        let mut mask = 0u64;
        for (i, &x) in self.a.iter().enumerate() {
            mask |= u64::from(x == v) << i;
        }
        let mut best = None;
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let d = (self.top as usize + DEPTH - 1 - i) % DEPTH;
            if d < self.n as usize && best.is_none_or(|b| d < b) {
                best = Some(d);
            }
        }
        best
    }
    #[inline]
    fn get(&self, d: usize) -> Option<u64> {
        (d < self.n as usize).then(|| self.a[self.at(d)])
    }
    /// Takes out the entry at depth `d` (below the count), the ones above it moving down.
    #[inline]
    fn remove(&mut self, d: usize) {
        for k in (0..d).rev() {
            self.a[self.at(k + 1)] = self.a[self.at(k)];
        }
        self.top = ((self.top as usize + DEPTH - 1) % DEPTH) as u8;
        self.n -= 1;
    }
}

/// Classes below this are found through a table, the others through a map.
const SMALL_CLASSES: u32 = 4096;

/// The freed addresses of each size class.
#[derive(Default)]
struct Classes {
    /// By class: 0, none yet; else the index in `lifos` plus 1.
    small: Vec<u32>,
    big: FxHashMap<u32, u32>,
    lifos: Vec<Lifo>,
}

impl Classes {
    #[inline]
    fn index(&self, cls: u32) -> Option<usize> {
        let i = if cls < SMALL_CLASSES {
            *self.small.get(cls as usize)?
        } else {
            *self.big.get(&cls)?
        };
        (i > 0).then(|| i as usize - 1)
    }
    #[inline]
    fn get(&self, cls: u32) -> Option<&Lifo> {
        self.index(cls).map(|i| &self.lifos[i])
    }
    #[inline]
    fn get_mut(&mut self, cls: u32) -> Option<&mut Lifo> {
        self.index(cls).map(|i| &mut self.lifos[i])
    }
    #[inline]
    fn push(&mut self, cls: u32, addr: u64) {
        let i = match self.index(cls) {
            Some(i) => i,
            None => {
                self.lifos.push(Lifo::default());
                let n = self.lifos.len() as u32;
                if cls < SMALL_CLASSES {
                    let c = cls as usize;
                    if self.small.len() <= c {
                        self.small.resize(c + 1, 0);
                    }
                    self.small[c] = n;
                } else {
                    self.big.insert(cls, n);
                }
                n as usize - 1
            }
        };
        self.lifos[i].push(addr);
    }
}

/// The state both sides keep, changed alike by every event.
#[derive(Default)]
struct Model {
    tops: [u64; TOPS],
    classes: Classes,
    /// Freed addresses of any class, the last first, with their classes.
    recent: [(u64, u32); RECENT],
    /// The end of the last allocation's chunk.
    after: u64,
    /// Allocations so far (the next one's ordinal).
    allocs: u64,
    /// The ordinal of the block freed last.
    last_freed_ordinal: u64,
    /// The stack of the last allocation site told in full.
    info_stack: u32,
    /// The last `STACK` event's id, and the frames of the last [`BASES`] ones (the last
    /// last).
    stack_id: u32,
    bases: std::collections::VecDeque<Vec<u64>>,
    /// The last `PAIRS` event's stack, and each stack's bytes per pair in its last one.
    pairs_stack: u32,
    pair_size: FxHashMap<u32, u64>,
    /// The last content's free stack.
    content_stack: u32,
    next_seq: u64,
}

impl Model {
    /// A new stack's frames: kept as a base for the next ones.
    fn stacked(&mut self, frames: Vec<u64>) {
        if self.bases.len() == BASES {
            self.bases.pop_front();
        }
        self.bases.push_back(frames);
    }

    /// The bytes `count` pairs of `stack` are predicted to hold, and the prediction updated to
    /// `bytes`.
    fn pair_bytes(&mut self, stack: u32, count: u64, bytes: Option<u64>) -> u64 {
        let per = self.pair_size.get(&stack).copied().unwrap_or(0);
        if let Some(b) = bytes {
            if let Some(per) = b.checked_div(count) {
                self.pair_size.insert(stack, per);
            }
        }
        per.wrapping_mul(count)
    }

    /// What prediction `code` (below [`A_TOLD`]) says for an allocation of class `cls`.
    #[inline]
    fn predict(&self, code: u8, cls: u32) -> Option<u64> {
        if code < A_CLASS {
            Some(self.tops[code as usize])
        } else if code < A_RECENT {
            self.classes.get(cls)?.get((code - A_CLASS) as usize)
        } else if code < A_AFTER {
            let (a, c) = self.recent[(code - A_RECENT) as usize];
            (c != 0).then_some(a)
        } else {
            Some(self.after)
        }
    }

    /// An allocation at `addr` whose address was told by `code` (`depth`: in its class, for
    /// [`A_DEEP`]): the predictions move on.
    #[inline]
    fn allocated(&mut self, code: u8, depth: usize, addr: u64, size: u64, cls: u32) {
        let end = addr.wrapping_add(chunk(size));
        if code < A_CLASS {
            let k = code as usize;
            self.tops.copy_within(0..k, 1);
            self.tops[0] = end;
        } else if code < A_RECENT || code == A_DEEP {
            let d = if code == A_DEEP {
                depth
            } else {
                (code - A_CLASS) as usize
            };
            if let Some(l) = self.classes.get_mut(cls) {
                l.remove(d);
            }
        } else if code < A_AFTER {
            let d = (code - A_RECENT) as usize;
            let (a, c) = self.recent[d];
            self.recent.copy_within(d + 1.., d);
            self.recent[RECENT - 1] = (0, 0);
            if let Some(l) = self.classes.get_mut(c) {
                if let Some(i) = l.find(a) {
                    l.remove(i);
                }
            }
        } else if code == A_TOLD {
            self.tops.copy_within(0..TOPS - 1, 1);
            self.tops[0] = end;
        }
        self.after = end;
        self.allocs += 1;
    }

    #[inline]
    fn freed(&mut self, addr: u64, known: Option<(u64, u32)>) {
        if let Some((ordinal, cls)) = known {
            self.classes.push(cls, addr);
            self.last_freed_ordinal = ordinal;
            self.recent.copy_within(0..RECENT - 1, 1);
            self.recent[0] = (addr, cls);
        }
    }
}

/// Writes events in sequence order as `ORDERED` records.
#[derive(Default)]
pub struct Packer {
    m: Model,
    /// Live blocks: address -> (ordinal, size class).
    live: FxHashMap<u64, (u64, u32)>,
    infos: FxHashMap<(u32, u64, u8), u32>,
    streams: [Vec<u8>; STREAMS],
    ops: u32,
    /// `NOP`s waiting to be told as one run.
    nops: u64,
    /// `NOP`s told in the record being built.
    record_nops: u64,
    /// Records closed, not yet taken by [`Packer::flush`].
    sealed: Vec<u8>,
}

impl Packer {
    pub fn new() -> Packer {
        Packer::default()
    }

    /// Events waiting in the record being built.
    pub fn pending(&self) -> u32 {
        self.ops + u32::from(self.nops > 0)
    }

    /// Bytes the records not yet taken hold so far.
    pub fn pending_bytes(&self) -> usize {
        self.sealed.len() + self.streams.iter().map(Vec::len).sum::<usize>()
    }

    #[inline]
    fn op(&mut self, kind: u8) {
        self.streams[S_KINDS].push(kind);
        self.ops += 1;
    }

    /// The next event is numbered `seq`: numbers skipped since the last one were never
    /// received (a `GAP`).
    #[inline]
    fn seq(&mut self, seq: u64) {
        let expected = self.m.next_seq.wrapping_add(self.nops);
        if seq != expected {
            self.op(OP_GAP);
            put(&mut self.streams[S_MISC], seq.wrapping_sub(expected));
        }
    }

    #[inline]
    fn flush_nops(&mut self) {
        while self.nops > 0 {
            if self.record_nops == MAX_RECORD_NOPS {
                self.close();
            }
            let n = self.nops.min(MAX_RECORD_NOPS - self.record_nops);
            self.nops -= n;
            self.record_nops += n;
            self.streams[S_KINDS].push(OP_NOPS);
            put(&mut self.streams[S_MISC], n - 1);
            self.ops += 1;
            self.m.next_seq = self.m.next_seq.wrapping_add(n);
        }
    }

    /// Before event `seq`: a run of up to [`MAX_FOLDED`] `NOP`s right before it is told in its
    /// code (returned, shifted into place); anything else as `NOPS` and `GAP` events.
    #[inline]
    fn lead(&mut self, seq: u64) -> u8 {
        let n = self.nops;
        if n > 0
            && n <= MAX_FOLDED
            && seq == self.m.next_seq.wrapping_add(n)
            && self.record_nops + n <= MAX_RECORD_NOPS
        {
            self.nops = 0;
            self.record_nops += n;
            self.m.next_seq = seq;
            return (n as u8) << FOLD_SHIFT;
        }
        self.flush_nops();
        self.seq(seq);
        0
    }

    /// Event `seq`: `size` bytes at `addr` from stack `stack` by allocation function `func`.
    pub fn alloc(&mut self, seq: u64, addr: u64, size: u64, stack: u32, func: u8) {
        let fold = self.lead(seq);
        let cls = class(size);
        let m = &mut self.m;
        // The predictions in the order of [`TRIES`], the likeliest first.
        let lifo = m.classes.get(cls);
        let mut depth = 0;
        let code = if lifo.and_then(|l| l.get(0)) == Some(addr) {
            A_CLASS
        } else if m.tops[0] == addr {
            0
        } else if m.after == addr {
            A_AFTER
        } else if let Some(r) = m.recent.iter().position(|&(a, c)| c != 0 && a == addr) {
            A_RECENT + r as u8
        } else if let Some(d) = lifo.and_then(|l| l.find(addr)) {
            depth = d;
            if d < SHALLOW {
                A_CLASS + d as u8
            } else {
                put(&mut self.streams[S_ADDRS], (d - SHALLOW) as u64);
                A_DEEP
            }
        } else if let Some(k) = m.tops.iter().position(|&t| t == addr) {
            k as u8
        } else {
            put(
                &mut self.streams[S_ADDRS],
                zigzag(addr.wrapping_sub(m.tops[0]) as i64),
            );
            A_TOLD
        };
        debug_assert!(code >= A_DEEP || m.predict(code, cls) == Some(addr));
        let key = (stack, size, func);
        match self.infos.get(&key) {
            Some(&i) => put(&mut self.streams[S_INFOS], u64::from(i) + 1),
            None => {
                let s = &mut self.streams[S_INFOS];
                s.push(0);
                s.push(func);
                put(
                    s,
                    zigzag(i64::from(stack.wrapping_sub(self.m.info_stack) as i32)),
                );
                put(s, size);
                self.m.info_stack = stack;
                if self.infos.len() < MAX_INFOS {
                    let n = self.infos.len() as u32;
                    self.infos.insert(key, n);
                }
            }
        }
        self.streams[S_KINDS].push(code | fold);
        self.ops += 1;
        let ordinal = self.m.allocs;
        self.m.allocated(code, depth, addr, size, cls);
        self.live.insert(addr, (ordinal, cls));
        self.m.next_seq = seq.wrapping_add(1);
    }

    /// Event `seq` frees `addr`; `content`: the free's stack and the (offset, word) pairs the
    /// block still held (`CONTENT`), when its record goes with this free.
    pub fn free(&mut self, seq: u64, addr: u64, content: Option<(u32, &[(u64, u64)])>) {
        let fold = self.lead(seq);
        let known = self.live.remove(&addr);
        let mut kind = OP_FREE;
        match known {
            Some((ordinal, _)) => {
                let age = self.m.allocs - 1 - ordinal;
                let near = zigzag(ordinal.wrapping_sub(self.m.last_freed_ordinal) as i64);
                if near < age {
                    kind |= FREE_NEAR;
                    put(&mut self.streams[S_REFS], near);
                } else {
                    put(&mut self.streams[S_REFS], age);
                }
            }
            None => {
                kind |= FREE_TOLD;
                put(
                    &mut self.streams[S_ADDRS],
                    zigzag(addr.wrapping_sub(self.m.tops[0]) as i64),
                );
            }
        }
        if let Some((stack, pairs)) = content {
            kind |= FREE_CONTENT;
            let s = &mut self.streams[S_MISC];
            put(
                s,
                zigzag(i64::from(stack.wrapping_sub(self.m.content_stack) as i32)),
            );
            self.m.content_stack = stack;
            put(s, pairs.len() as u64);
            let (mut off, mut word) = (0u64, addr);
            for &(o, w) in pairs {
                put(s, o.wrapping_sub(off));
                put(s, zigzag(w.wrapping_sub(word) as i64));
                (off, word) = (o, w);
            }
        }
        self.streams[S_KINDS].push(kind | fold);
        self.ops += 1;
        self.m.freed(addr, known);
        self.m.next_seq = seq.wrapping_add(1);
    }

    /// `count` `NOP`s numbered from `seq`.
    pub fn nops(&mut self, seq: u64, count: u64) {
        if count == 0 {
            return;
        }
        if seq != self.m.next_seq.wrapping_add(self.nops) {
            self.flush_nops();
            self.seq(seq);
            self.m.next_seq = seq;
        }
        self.nops += count;
    }

    /// Event `seq`: `count` allocations from `stack`, `bytes` in all, each freed again.
    pub fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) {
        let fold = self.lead(seq);
        self.op(OP_PAIRS | fold);
        let predicted = self.m.pair_bytes(stack, count, Some(bytes));
        let s = &mut self.streams[S_MISC];
        put(
            s,
            zigzag(i64::from(stack.wrapping_sub(self.m.pairs_stack) as i32)),
        );
        put(s, count);
        put(s, zigzag(bytes.wrapping_sub(predicted) as i64));
        self.m.pairs_stack = stack;
        self.m.next_seq = seq.wrapping_add(1);
    }

    /// Event `seq`: the process forked `child`.
    pub fn fork(&mut self, seq: u64, child: u32) {
        let fold = self.lead(seq);
        self.op(OP_FORK | fold);
        put(&mut self.streams[S_MISC], u64::from(child));
        self.m.next_seq = seq.wrapping_add(1);
    }

    /// Stack `id` (takes no sequence number).
    pub fn stack(&mut self, id: u32, gen: u32, reason: u8, frames: &[u64]) {
        self.flush_nops();
        self.op(OP_STACK);
        // The recent stack that shares the most outermost frames (the latest of those), then
        // how many, then the others, each against the base's frame as far from the outer end
        // (0 past it).
        let common = |b: &Vec<u64>| {
            frames
                .iter()
                .rev()
                .zip(b.iter().rev())
                .take_while(|(x, y)| x == y)
                .count()
        };
        let (back, shared) = self
            .m
            .bases
            .iter()
            .rev()
            .enumerate()
            .map(|(back, b)| (back, common(b)))
            .fold((0, 0), |best, c| if c.1 > best.1 { c } else { best });
        let empty = Vec::new();
        let base = self
            .m
            .bases
            .len()
            .checked_sub(1 + back)
            .map_or(&empty, |i| &self.m.bases[i]);
        let s = &mut self.streams[S_STACKS];
        put(
            s,
            zigzag(i64::from(id.wrapping_sub(self.m.stack_id) as i32)),
        );
        put(s, u64::from(gen));
        s.push(reason);
        put(s, frames.len() as u64);
        put(s, back as u64);
        put(s, shared as u64);
        let n = frames.len();
        for (i, &f) in frames[..n - shared].iter().enumerate() {
            let from_end = n - 1 - i;
            let b = base.len().checked_sub(1 + from_end).map_or(0, |j| base[j]);
            put(s, zigzag(f.wrapping_sub(b) as i64));
        }
        self.m.stack_id = id;
        self.m.stacked(frames.to_vec());
    }

    /// The process's reader began to keep what freed blocks held (its first `CONTENT`).
    pub fn orphans(&mut self) {
        self.flush_nops();
        self.op(OP_ORPHANS);
    }

    /// Appends the events told since the last call as `ORDERED` records (none if there are
    /// none). Call it before every other record, so that each lands where it was applied.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        self.flush_nops();
        self.close();
        out.extend_from_slice(&self.sealed);
        self.sealed.clear();
    }

    /// Closes the record being built.
    fn close(&mut self) {
        self.record_nops = 0;
        if self.ops == 0 {
            return;
        }
        // The body in parts, copied once, into the record.
        let ops = self.ops.to_le_bytes();
        let lens: [[u8; 4]; STREAMS] =
            std::array::from_fn(|i| (self.streams[i].len() as u32).to_le_bytes());
        let [k, i, a, r, m, s] = &self.streams;
        let parts: [&[u8]; 1 + 2 * STREAMS] = [
            &ops, &lens[0], k, &lens[1], i, &lens[2], a, &lens[3], r, &lens[4], m, &lens[5], s,
        ];
        encode::sealed(tag::ORDERED, &parts, &mut self.sealed);
        for s in &mut self.streams {
            s.clear();
        }
        self.ops = 0;
    }
}

/// Reads `ORDERED` bodies back into events, replaying the writer's model.
#[derive(Default)]
pub struct Unpacker {
    m: Model,
    /// Live blocks: ordinal -> (address, size class).
    live: FxHashMap<u64, (u64, u32)>,
    infos: Vec<(u32, u64, u8)>,
    content: Vec<(u64, u64)>,
}

struct Cur<'a> {
    d: &'a [u8],
    pos: usize,
    /// Where this stream starts in the body.
    base: usize,
    name: &'static str,
}

impl Cur<'_> {
    fn err(&self, what: impl Into<String>) -> ExpandError {
        ExpandError {
            at: self.base + self.pos,
            what: format!("{} stream: {}", self.name, what.into()),
        }
    }
    #[inline]
    fn byte(&mut self, what: &str) -> Result<u8, ExpandError> {
        let b = *self
            .d
            .get(self.pos)
            .ok_or_else(|| self.err(format!("ends before {what}")))?;
        self.pos += 1;
        Ok(b)
    }
    #[inline]
    fn var(&mut self, what: &str) -> Result<u64, ExpandError> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.byte(what)?;
            if shift == 63 && b > 1 {
                return Err(self.err(format!("{what}: a number longer than 64 bits")));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
            shift += 7;
        }
    }
    #[inline]
    fn zz(&mut self, what: &str) -> Result<i64, ExpandError> {
        Ok(unzigzag(self.var(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ExpandError> {
        u32::try_from(self.var(what)?).map_err(|_| self.err(format!("{what} beyond 32 bits")))
    }
}

impl Unpacker {
    pub fn new() -> Unpacker {
        Unpacker::default()
    }

    /// Decodes one `ORDERED` body into `sink`, with the sequence numbers the events had.
    pub fn decode(&mut self, body: &[u8], sink: &mut impl Sink) -> Result<(), ExpandError> {
        let bad = |at: usize, what: String| ExpandError { at, what };
        if body.len() < 4 {
            return Err(bad(0, "no event count".into()));
        }
        let ops = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
        let names = [
            "kinds",
            "infos",
            "addresses",
            "references",
            "misc",
            "stacks",
        ];
        let mut pos = 4;
        let mut cur: Vec<Cur> = Vec::with_capacity(STREAMS);
        for name in names {
            let len = body
                .get(pos..pos + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| bad(pos, format!("ends before the {name} stream's length")))?;
            pos += 4;
            let d = body.get(pos..pos.saturating_add(len)).ok_or_else(|| {
                bad(
                    pos,
                    format!(
                        "the {name} stream claims {len} bytes, the record has {}",
                        body.len() - pos
                    ),
                )
            })?;
            cur.push(Cur {
                d,
                pos: 0,
                base: pos,
                name,
            });
            pos += len;
        }
        if pos != body.len() {
            return Err(bad(
                pos,
                format!("{} bytes after the last stream", body.len() - pos),
            ));
        }
        let [kinds, infos, addrs, refs, misc, stacks] = &mut cur[..] else {
            return Err(bad(0, "streams missing".into()));
        };
        let m = &mut self.m;
        let mut nops = 0u64;
        for _ in 0..ops {
            let at = kinds.base + kinds.pos;
            let byte = kinds.byte("an event")?;
            let fail = |what: String| ExpandError { at, what };
            let (kind, folded) = (
                byte & ((1 << FOLD_SHIFT) - 1),
                u64::from(byte >> FOLD_SHIFT),
            );
            if folded > 0 {
                nops += folded;
                if nops > MAX_RECORD_NOPS {
                    return Err(fail(format!(
                        "more NOPs than the {MAX_RECORD_NOPS} a record may hold"
                    )));
                }
                sink.skip(m.next_seq, folded).map_err(fail)?;
                m.next_seq = m.next_seq.wrapping_add(folded);
            }
            match kind {
                0..=A_TOLD => {
                    let (stack, size, func) = match infos.var("an allocation site")? {
                        0 => {
                            let func = infos.byte("an allocation function")?;
                            let stack = m.info_stack.wrapping_add(infos.zz("a stack id")? as u32);
                            let size = infos.var("a size")?;
                            m.info_stack = stack;
                            if self.infos.len() < MAX_INFOS {
                                self.infos.push((stack, size, func));
                            }
                            (stack, size, func)
                        }
                        i => *self.infos.get(i as usize - 1).ok_or_else(|| {
                            infos.err(format!(
                                "allocation site {} of {} known",
                                i - 1,
                                self.infos.len()
                            ))
                        })?,
                    };
                    let cls = class(size);
                    let mut depth = 0;
                    let addr = if kind == A_TOLD {
                        m.tops[0].wrapping_add(addrs.zz("an address")? as u64)
                    } else if kind == A_DEEP {
                        depth = SHALLOW.saturating_add(addrs.var("a depth")? as usize);
                        m.classes
                            .get(cls)
                            .and_then(|l| l.get(depth))
                            .ok_or_else(|| {
                                fail(format!(
                                    "an allocation at freed address {depth} of its class, of which there are fewer"
                                ))
                            })?
                    } else {
                        m.predict(kind, cls).ok_or_else(|| {
                            fail(format!(
                                "an allocation at freed address {kind}, of which there are fewer"
                            ))
                        })?
                    };
                    let ordinal = m.allocs;
                    m.allocated(kind, depth, addr, size, cls);
                    self.live.insert(ordinal, (addr, cls));
                    sink.alloc(func, stack, m.next_seq, addr, size)
                        .map_err(fail)?;
                    m.next_seq = m.next_seq.wrapping_add(1);
                }
                k if k & !7 == OP_FREE && k & 3 != 3 => {
                    let (addr, known) = match k & 3 {
                        FREE_TOLD => (m.tops[0].wrapping_add(addrs.zz("an address")? as u64), None),
                        mode => {
                            let ordinal = if mode == FREE_AGE {
                                let age = refs.var("a block's age")?;
                                m.allocs.checked_sub(age.wrapping_add(1))
                            } else {
                                let d = refs.zz("a block's distance")?;
                                Some(m.last_freed_ordinal.wrapping_add(d as u64))
                            };
                            let Some((addr, cls)) = ordinal.and_then(|o| self.live.remove(&o))
                            else {
                                return Err(fail(format!(
                                    "a free names allocation {}, which is not live",
                                    ordinal.map_or("before the first".into(), |o| o.to_string())
                                )));
                            };
                            (addr, ordinal.map(|o| (o, cls)))
                        }
                    };
                    if k & FREE_CONTENT != 0 {
                        let stack = m
                            .content_stack
                            .wrapping_add(misc.zz("a content's stack")? as u32);
                        m.content_stack = stack;
                        let n = misc.var("a content's count")?;
                        if n > 256 {
                            return Err(fail(format!("a content of {n} words (at most 256)")));
                        }
                        self.content.clear();
                        let (mut off, mut word) = (0u64, addr);
                        for _ in 0..n {
                            off = off.wrapping_add(misc.var("a content offset")?);
                            word = word.wrapping_add(misc.zz("a content word")? as u64);
                            self.content.push((off, word));
                        }
                        sink.content(addr, stack, &self.content).map_err(fail)?;
                    }
                    m.freed(addr, known);
                    sink.free(0, m.next_seq, addr).map_err(fail)?;
                    m.next_seq = m.next_seq.wrapping_add(1);
                }
                OP_NOPS => {
                    let n = misc.var("a run of NOPs")?.wrapping_add(1);
                    nops = nops.saturating_add(n);
                    if n == 0 || nops > MAX_RECORD_NOPS {
                        return Err(fail(format!(
                            "more NOPs than the {MAX_RECORD_NOPS} a record may hold"
                        )));
                    }
                    sink.skip(m.next_seq, n).map_err(fail)?;
                    m.next_seq = m.next_seq.wrapping_add(n);
                }
                OP_PAIRS => {
                    let stack = m.pairs_stack.wrapping_add(misc.zz("a stack id")? as u32);
                    let count = misc.var("a count")?;
                    let d = misc.zz("bytes")? as u64;
                    let bytes = m.pair_bytes(stack, count, None).wrapping_add(d);
                    m.pair_bytes(stack, count, Some(bytes));
                    m.pairs_stack = stack;
                    sink.pairs(m.next_seq, stack, count, bytes).map_err(fail)?;
                    m.next_seq = m.next_seq.wrapping_add(1);
                }
                OP_FORK => {
                    let child = misc.u32("a child pid")?;
                    sink.fork(m.next_seq, child).map_err(fail)?;
                    m.next_seq = m.next_seq.wrapping_add(1);
                }
                OP_GAP => {
                    let n = misc.var("a gap")?;
                    m.next_seq = m.next_seq.wrapping_add(n);
                }
                OP_STACK => {
                    let id = m.stack_id.wrapping_add(stacks.zz("a stack id")? as u32);
                    let gen = stacks.u32("a module generation")?;
                    let reason = stacks.byte("a stop reason")?;
                    let n = stacks.var("a frame count")?;
                    let back = stacks.var("a base stack")?;
                    let shared = stacks.var("shared frames")?;
                    let empty = Vec::new();
                    let base = match (m.bases.len() as u64).checked_sub(1 + back) {
                        Some(i) => &m.bases[i as usize],
                        None if back == 0 => &empty,
                        None => {
                            return Err(fail(format!(
                                "a stack based on the one {back} before, of {} kept",
                                m.bases.len()
                            )))
                        }
                    };
                    if n > u64::from(u16::MAX) || shared > n || shared > base.len() as u64 {
                        return Err(fail(format!(
                            "a stack of {n} frames sharing {shared} with its base ({})",
                            base.len()
                        )));
                    }
                    let (n, shared) = (n as usize, shared as usize);
                    let mut frames = Vec::with_capacity(n);
                    for i in 0..n - shared {
                        let from_end = n - 1 - i;
                        let b = base.len().checked_sub(1 + from_end).map_or(0, |j| base[j]);
                        let d = stacks.zz("a frame")?;
                        frames.push(b.wrapping_add(d as u64));
                    }
                    frames.extend_from_slice(&base[base.len() - shared..]);
                    sink.stack(id, gen, reason, &frames).map_err(fail)?;
                    m.stack_id = id;
                    m.stacked(frames);
                }
                OP_ORPHANS => sink.content(0, 0, &[]).map_err(fail)?,
                k => return Err(fail(format!("unknown event code {k:#x}"))),
            }
        }
        for c in cur.iter() {
            if c.pos != c.d.len() {
                return Err(c.err(format!(
                    "{} bytes left after the record's {ops} events",
                    c.d.len() - c.pos
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a sink was told, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Alloc(u8, u32, u64, u64, u64),
        Free(u64, u64),
        Nop(u64),
        Fork(u64, u32),
        Stack(u32, u32, u8, Vec<u64>),
        Pairs(u64, u32, u64, u64),
        Content(u64, u32, Vec<(u64, u64)>),
    }

    #[derive(Default)]
    struct Log(Vec<Ev>);

    impl Sink for Log {
        fn alloc(&mut self, f: u8, st: u32, seq: u64, a: u64, s: u64) -> Result<(), String> {
            self.0.push(Ev::Alloc(f, st, seq, a, s));
            Ok(())
        }
        fn free(&mut self, _f: u8, seq: u64, a: u64) -> Result<(), String> {
            self.0.push(Ev::Free(seq, a));
            Ok(())
        }
        fn nop(&mut self, seq: u64) -> Result<(), String> {
            self.0.push(Ev::Nop(seq));
            Ok(())
        }
        fn skip(&mut self, seq: u64, count: u64) -> Result<(), String> {
            if count > 100_000 {
                return Err(format!("{count} NOPs"));
            }
            (0..count).try_for_each(|i| self.nop(seq + i))
        }
        fn fork(&mut self, seq: u64, c: u32) -> Result<(), String> {
            self.0.push(Ev::Fork(seq, c));
            Ok(())
        }
        fn stack(&mut self, id: u32, g: u32, r: u8, fr: &[u64]) -> Result<(), String> {
            self.0.push(Ev::Stack(id, g, r, fr.to_vec()));
            Ok(())
        }
        fn pairs(&mut self, seq: u64, st: u32, c: u64, b: u64) -> Result<(), String> {
            self.0.push(Ev::Pairs(seq, st, c, b));
            Ok(())
        }
        fn content(&mut self, a: u64, st: u32, p: &[(u64, u64)]) -> Result<(), String> {
            self.0.push(Ev::Content(a, st, p.to_vec()));
            Ok(())
        }
    }

    /// A random but allocator-like run of events: reuse of freed addresses, carving from a
    /// top, frees of live and unknown blocks, runs of NOPs, gaps, forks, stacks, contents.
    fn events(seed: u64, n: usize) -> Vec<Ev> {
        let mut x = seed | 1;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m.max(1)
        };
        let (mut seq, mut top) = (0u64, 0x5555_0000_0000u64);
        let mut live: Vec<(u64, u64)> = vec![];
        let mut freed: Vec<(u64, u64)> = vec![];
        let mut out = vec![];
        let mut frames = vec![0x5555_1234_0000u64; 6];
        for _ in 0..n {
            match next(20) {
                0..=7 => {
                    let size = [24, 40, 100, 1000, 5000, 1 << 20][next(6) as usize] + next(3);
                    let addr = match next(4) {
                        0 | 1 if !freed.is_empty() => {
                            let i = freed.len() - 1 - next(3.min(freed.len() as u64)) as usize;
                            freed.remove(i).0
                        }
                        2 => 0x7f00_0000_0000 + next(1 << 30) * 16,
                        _ => {
                            let a = top;
                            top += chunk(size);
                            a
                        }
                    };
                    live.push((addr, size));
                    out.push(Ev::Alloc(next(11) as u8, next(40) as u32, seq, addr, size));
                    seq += 1;
                }
                8..=13 if !live.is_empty() => {
                    let i = live.len() - 1 - next(live.len().min(50) as u64) as usize;
                    let (a, s) = live.swap_remove(i);
                    freed.push((a, s));
                    if next(5) == 0 {
                        let k = next(5);
                        let pairs: Vec<_> = (0..k)
                            .map(|j| (j * 16 + 8 * next(2), top - next(999) * 16))
                            .collect();
                        out.push(Ev::Content(a, next(9) as u32, pairs));
                    }
                    out.push(Ev::Free(seq, a));
                    seq += 1;
                }
                14 => {
                    out.push(Ev::Free(seq, 0x1000 + next(1 << 20) * 16));
                    seq += 1;
                }
                15 => {
                    for _ in 0..1 + next(40) {
                        out.push(Ev::Nop(seq));
                        seq += 1;
                    }
                }
                16 => seq += 1 + next(5),
                17 => {
                    out.push(Ev::Pairs(seq, next(40) as u32, 1 + next(9), next(1 << 20)));
                    seq += 1;
                }
                18 => {
                    out.push(Ev::Fork(seq, next(1 << 22) as u32));
                    seq += 1;
                }
                _ => {
                    let keep = next(frames.len() as u64 + 1) as usize;
                    let mut f: Vec<u64> = (0..next(5))
                        .map(|_| 0x5555_0000_0000 + next(1 << 24))
                        .collect();
                    f.extend_from_slice(&frames[frames.len() - keep..]);
                    out.push(Ev::Stack(
                        next(1 << 20) as u32,
                        next(4) as u32,
                        next(6) as u8,
                        f.clone(),
                    ));
                    if !f.is_empty() {
                        frames = f;
                    }
                }
            }
        }
        out
    }

    /// Packs `evs` as a reader would tell them, records closed every `every` events.
    fn pack(evs: &[Ev], every: usize) -> Vec<u8> {
        let mut p = Packer::new();
        let mut out = Vec::new();
        let mut content: Option<(u32, Vec<(u64, u64)>)> = None;
        for (i, e) in evs.iter().enumerate() {
            match e.clone() {
                Ev::Alloc(f, st, seq, a, s) => p.alloc(seq, a, s, st, f),
                Ev::Free(seq, a) => {
                    let c = content.take();
                    p.free(seq, a, c.as_ref().map(|(s, v)| (*s, &v[..])));
                }
                Ev::Nop(seq) => p.nops(seq, 1),
                Ev::Fork(seq, c) => p.fork(seq, c),
                Ev::Stack(id, g, r, f) => p.stack(id, g, r, &f),
                Ev::Pairs(seq, st, c, b) => p.pairs(seq, st, c, b),
                Ev::Content(_, st, v) => content = Some((st, v)),
            }
            if i % every == every - 1 {
                p.flush(&mut out);
            }
        }
        p.flush(&mut out);
        out
    }

    /// The `ORDERED` bodies of `records`.
    fn bodies(records: &[u8]) -> Vec<Vec<u8>> {
        let mut t = stream_preamble().to_vec();
        t.extend_from_slice(records);
        let mut r = crate::Reader::new(&t[..]);
        r.packed(true);
        let mut out = vec![];
        while let Some(rec) = r.next_record().unwrap() {
            match rec {
                crate::Record::Ordered { body, .. } => out.push(body),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[test]
    fn events_come_back_exactly_with_their_numbers() {
        for seed in 1..40u64 {
            let evs = events(seed * 7919, 3000);
            let packed = pack(&evs, 1 + seed as usize * 37);
            let mut un = Unpacker::new();
            let mut log = Log::default();
            for b in bodies(&packed) {
                un.decode(&b, &mut log).unwrap();
            }
            assert_eq!(log.0, evs, "seed {seed}");
        }
    }

    #[test]
    fn damaged_bodies_are_errors_never_panics() {
        let evs = events(42, 4000);
        let packed = pack(&evs, 500);
        let bodies = bodies(&packed);
        let mut x = 99u64;
        let mut next = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % m as u64) as usize
        };
        let mut errors = 0;
        for _ in 0..3000 {
            let mut un = Unpacker::new();
            let mut log = Log::default();
            let k = next(bodies.len());
            for (i, b) in bodies.iter().enumerate() {
                let mut b = b.clone();
                if i == k {
                    match next(3) {
                        0 => {
                            let at = next(b.len());
                            b[at] ^= 1 << next(8);
                        }
                        1 => b.truncate(next(b.len())),
                        _ => {
                            let at = next(b.len());
                            b[at] = 0xff;
                        }
                    }
                }
                if un.decode(&b, &mut log).is_err() {
                    errors += 1;
                    break;
                }
            }
        }
        // Most damage is caught (the rest decodes to other events: the record checksums and
        // zstd's own catch what reaches a reader).
        assert!(errors > 1500, "{errors}");
    }

    #[test]
    fn a_class_stack_is_a_bounded_lifo() {
        // Against a plain vector: pushes past the depth drop the bottom, finds give the least
        // depth, removes close the gap.
        let (mut l, mut v) = (Lifo::default(), Vec::<u64>::new());
        let mut x = 7u64;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) || v.is_empty() {
                let val = x % 50;
                l.push(val);
                v.push(val);
                if v.len() > DEPTH {
                    v.remove(0);
                }
            } else {
                let d = (x >> 8) as usize % v.len();
                assert_eq!(l.get(d), Some(v[v.len() - 1 - d]), "step {step}");
                l.remove(d);
                v.remove(v.len() - 1 - d);
            }
            for val in 0..50 {
                let want = v.iter().rev().position(|&y| y == val);
                assert_eq!(l.find(val), want, "step {step}");
            }
            assert_eq!(l.get(v.len()), None);
        }
    }

    #[test]
    fn a_free_of_a_block_not_live_is_an_error_naming_it() {
        let mut p = Packer::new();
        p.alloc(0, 0x1000, 16, 1, 0);
        p.free(1, 0x1000, None);
        let mut out = vec![];
        p.flush(&mut out);
        let mut b = bodies(&out).remove(0);
        // The free's age (0) said as 5: allocation -5 is not live.
        let refs_at = b.len() - 4 * 2 - 1;
        assert_eq!(b[refs_at], 0);
        b[refs_at] = 5;
        let e = Unpacker::new().decode(&b, &mut Log::default()).unwrap_err();
        assert!(e.what.contains("not live"), "{}", e.what);
    }
}
