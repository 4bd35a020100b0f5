//! `EVENTS` records: a batch's 32-byte slots in a compact, lossless encoding (FORMAT.md, "EVENTS").
//!
//! Each slot record becomes one kind byte (`code | function << 3`), one or two bytes of field
//! lengths (a nibble per field: 0-8 bytes) and the fields' low bytes, little-endian: sequence
//! numbers as the difference from the one expected next, addresses and stack ids as differences
//! from the previous ones in the record (zigzag), sizes and counts as they are, return addresses
//! as differences from the previous frame. Lengths up front instead of LEB128 keep encoding and
//! decoding free of per-byte loops. Every record starts from zero state, so each decodes alone.
//! An allocator storm averages 5-7 bytes per event instead of 32.
//!
//! Runs of `NOP`s whose sequence numbers follow on (what elided pairs leave, see [`find_pairs`])
//! take one byte per up to 32 (`SKIP`), a `PAIRS` slot its stack, count and bytes. A `CONTENT`
//! record (what a freed block pointed to) takes its pair count, its stack and address as
//! differences, and per pair the offset's step and the word's difference from the previous word.
//!
//! [`encode`] never allocates (the preload's writer thread calls it into a fixed buffer);
//! [`expand`] turns a body back into the exact slots it came from.

use crate::slot::{self, SLOT_LEN};

const CODE_ALLOC: u8 = 0;
const CODE_FREE: u8 = 1;
const CODE_NOP: u8 = 2;
const CODE_FORK: u8 = 3;
const CODE_STACK: u8 = 4;
/// `function` + 1 `NOP`s numbered on from the one expected next (one byte for up to 32).
const CODE_SKIP: u8 = 5;
const CODE_PAIRS: u8 = 6;
/// An extended record, its kind in the function bits: 0 = `CONTENT` (version 4). The last code,
/// so that later kinds take function values here rather than a new format of kind byte.
const CODE_EXT: u8 = 7;
/// Function bits of `CODE_EXT`: a `CONTENT` record.
const EXT_CONTENT: u8 = 0;

/// The event code of each slot kind (`NONE`: not an event).
const CODE_OF: [u8; 256] = {
    let mut t = [NONE; 256];
    t[slot::KIND_ALLOC as usize] = CODE_ALLOC;
    t[slot::KIND_FREE as usize] = CODE_FREE;
    t[slot::KIND_NOP as usize] = CODE_NOP;
    t[slot::KIND_FORK as usize] = CODE_FORK;
    t[slot::KIND_PAIRS as usize] = CODE_PAIRS;
    t
};
const NONE: u8 = 0xff;

/// Most bytes one slot can take once encoded (an allocation: kind, two length bytes, four
/// 8-byte fields), plus the 8 bytes of slack the encoder writes past its end.
pub const MAX_SLOT_BYTES: usize = 35 + 8;

/// A signed difference as an unsigned number that is small when the difference is small.
#[inline]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
#[inline]
pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bytes needed for `v` (0 for 0).
#[inline]
pub fn width(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(8)
}

struct Out<'a> {
    buf: &'a mut [u8],
    n: usize,
}

impl Out<'_> {
    /// Room for one more slot's encoding (and the slack its 8-byte stores need)?
    #[inline]
    fn room(&self) -> Option<()> {
        (self.n + MAX_SLOT_BYTES <= self.buf.len()).then_some(())
    }

    #[inline]
    fn byte(&mut self, b: u8) {
        self.buf[self.n] = b;
        self.n += 1;
    }

    /// Writes all 8 bytes of `v` and keeps the first `len`.
    #[inline]
    fn field(&mut self, v: u64, len: usize) {
        self.buf[self.n..self.n + 8].copy_from_slice(&v.to_le_bytes());
        self.n += len;
    }

    /// One more `NOP`: counted in the `SKIP` that ends at `skip_end` if it is the last byte
    /// written and has room, else a new `SKIP`. Returns where the `SKIP` that counts it ends.
    #[inline]
    fn skip(&mut self, skip_end: usize) -> usize {
        if skip_end == self.n && self.buf[skip_end - 1] < CODE_SKIP | 31 << 3 {
            self.buf[skip_end - 1] += 1 << 3;
        } else {
            self.byte(CODE_SKIP);
        }
        self.n
    }

    /// A length byte for two values, then both.
    #[inline]
    fn pair(&mut self, a: u64, b: u64) {
        let (la, lb) = (width(a), width(b));
        self.byte((la | lb << 4) as u8);
        self.field(a, la);
        self.field(b, lb);
    }
}

#[inline]
fn u32_at(s: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

#[inline]
fn u64_at(s: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The slots of up to two runs, in order (a ring drained in two parts where it wraps).
struct Slots<'a> {
    a: &'a [u8],
    b: &'a [u8],
}

impl<'a> Slots<'a> {
    fn new(runs: &[&'a [u8]]) -> Slots<'a> {
        Slots {
            a: runs.first().copied().unwrap_or(&[]),
            b: runs.get(1).copied().unwrap_or(&[]),
        }
    }

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.a.len() < SLOT_LEN {
            if self.b.len() < SLOT_LEN {
                return None;
            }
            self.a = core::mem::take(&mut self.b);
        }
        let (s, rest) = self.a.split_at(SLOT_LEN);
        self.a = rest;
        Some(s)
    }
}

/// Encodes the slots of `runs` (at most two, each a whole number of slots; together a sequence
/// of slot records, a stack record possibly continuing from one run into the next) into `out`. Returns
/// the bytes written, or `None` when a slot is not one this encoding knows, a stack record is
/// cut short, or `out` is too small (`slots * MAX_SLOT_BYTES` always suffices): the caller then
/// sends the slots as they are.
pub fn encode(runs: &[&[u8]], out: &mut [u8]) -> Option<usize> {
    encode_with(runs, out, None)
}

/// [`encode`], sending the pairs that [`find_pairs`] marked as `PAIRS` and `NOP`s.
pub fn encode_elided(runs: &[&[u8]], out: &mut [u8], pairs: &Pairs) -> Option<usize> {
    encode_with(runs, out, Some(pairs))
}

fn encode_with(runs: &[&[u8]], out: &mut [u8], pairs: Option<&Pairs>) -> Option<usize> {
    let mut o = Out { buf: out, n: 0 };
    let mut chunks = Slots::new(runs);
    let (mut next_seq, mut addr, mut stack, mut frame) = (0u64, 0u64, 0u32, 0u64);
    // Just past the last `SKIP` written (none: `usize::MAX`).
    let mut skip_end = usize::MAX;
    let mut i = 0usize; // slot index
    while let Some(mut s) = chunks.next() {
        let at = i;
        i += 1;
        let f = s[1];
        if f >= 32 {
            return None;
        }
        o.room()?;
        // An elided event: the `PAIRS` slot for its group at the group's last event, else a `NOP`
        // (most often one more of a run of `NOP`s: counted at once).
        let made: [u8; SLOT_LEN];
        let mut nop = s[0] == slot::KIND_NOP;
        if let Some(p) = pairs {
            let m = p.marks.get(at).copied().unwrap_or(0);
            if m != 0 {
                let g = p.groups.get(m as usize - 1)?;
                let seq = u64_at(s, 8);
                nop = g.last as usize != at;
                if nop && seq == next_seq {
                    // The common case, first: one more `NOP` of a run, no slot made for it.
                    next_seq = seq.wrapping_add(1);
                    skip_end = o.skip(skip_end);
                    continue;
                }
                made = if nop {
                    slot::nop(seq)
                } else {
                    slot::pairs(g.stack, seq, g.count, g.bytes)
                };
                s = &made;
            }
        }
        if nop && u64_at(s, 8) == next_seq {
            next_seq = next_seq.wrapping_add(1);
            skip_end = o.skip(skip_end);
            continue;
        }
        let kind = s[0];
        if kind == slot::KIND_STACK {
            let n = u16::from_le_bytes([s[2], s[3]]) as usize;
            o.byte(CODE_STACK | f << 3);
            o.byte(s[2]);
            o.byte(s[3]);
            o.pair(u32_at(s, 4) as u64, u32_at(s, 8) as u64);
            let mut left = n;
            while left > 0 {
                let c = chunks.next()?;
                i += 1;
                o.room()?;
                let k = left.min(slot::FRAMES_PER_SLOT);
                let mut d = [0u64; slot::FRAMES_PER_SLOT];
                for (i, d) in d.iter_mut().enumerate().take(k) {
                    let fr = u64_at(c, i * 8);
                    *d = zigzag(fr.wrapping_sub(frame) as i64);
                    frame = fr;
                }
                o.pair(d[0], d[1]);
                if k > 2 {
                    o.pair(d[2], d[3]);
                }
                left -= k;
            }
            continue;
        }
        if kind == slot::KIND_CONTENT {
            let n = u16::from_le_bytes([s[2], s[3]]) as usize;
            // What the expansion could not give back exactly goes as slots.
            if f != 0 || n > slot::MAX_CONTENT_PAIRS || u64_at(s, 16) | u64_at(s, 24) != 0 {
                return None;
            }
            let (id, a) = (u32_at(s, 4), u64_at(s, 8));
            o.byte(CODE_EXT | EXT_CONTENT << 3);
            o.byte(s[2]);
            o.byte(s[3]);
            o.pair(
                zigzag(id.wrapping_sub(stack) as i32 as i64),
                zigzag(a.wrapping_sub(addr) as i64),
            );
            (stack, addr) = (id, a);
            let (mut off, mut word) = (0u64, a);
            let mut left = n;
            while left > 0 {
                let c = chunks.next()?;
                i += 1;
                o.room()?;
                let k = left.min(slot::PAIRS_PER_SLOT);
                for j in 0..k {
                    let (po, pw) = (u64_at(c, j * 16), u64_at(c, j * 16 + 8));
                    o.pair(po.wrapping_sub(off), zigzag(pw.wrapping_sub(word) as i64));
                    (off, word) = (po, pw);
                }
                if k < slot::PAIRS_PER_SLOT && u64_at(c, 16) | u64_at(c, 24) != 0 {
                    return None;
                }
                left -= k;
            }
            continue;
        }
        let seq = u64_at(s, 8);
        let dseq = zigzag(seq.wrapping_sub(next_seq) as i64);
        next_seq = seq.wrapping_add(1);
        // One shape for every event kind, selected without a jump table (which cost more than
        // the rest of the encoding).
        let code = CODE_OF[kind as usize];
        if code > CODE_PAIRS {
            return None;
        }
        let has_addr = code <= CODE_FREE;
        let a = u64_at(s, 16);
        let word = u32_at(s, 4);
        let x = if has_addr {
            zigzag(a.wrapping_sub(addr) as i64)
        } else if code == CODE_FORK {
            word as u64
        } else if code == CODE_PAIRS {
            a
        } else {
            0
        };
        if has_addr {
            addr = a;
        }
        o.byte(code | f << 3);
        o.pair(dseq, x);
        if code == CODE_ALLOC || code == CODE_PAIRS {
            o.pair(
                u64_at(s, 24),
                zigzag(word.wrapping_sub(stack) as i32 as i64),
            );
            stack = word;
        }
    }
    Some(o.n)
}

/// One group of elided pairs: allocations from `stack` in one epoch interval, each freed again.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct Group {
    pub stack: u32,
    interval: u32,
    pub count: u64,
    pub bytes: u64,
    /// Slot index of the group's last event (where its `PAIRS` slot goes).
    pub last: u32,
}

/// What [`find_pairs`] found: per slot, 0 (sent as it is) or 1 + the index of its group.
pub struct Pairs<'a> {
    pub marks: &'a [u16],
    pub groups: &'a [Group],
}

/// Room [`find_pairs`] works in, provided by the caller (the preload's writer thread maps it once):
/// `table` a power of two at least twice the slots of a batch, `marks` one per slot (at most
/// 32,767 slots), `groups` a power of two.
pub struct PairScratch<'a> {
    pub table: &'a mut [u32],
    pub marks: &'a mut [u16],
    pub groups: &'a mut [Group],
}

/// One address's frees in a writer's view of every thread's undrained slots (see [`Foreign`]):
/// the first thread seen freeing it and the range of its frees' numbers, and the range of every
/// other thread's (as offsets from the view's base number; `olo > ohi`: none). An entry of
/// another pass (`gen`) is empty: the table is never cleared.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct FreeSeen {
    addr: u64,
    gen: u32,
    tid: u32,
    lo: u32,
    hi: u32,
    olo: u32,
    ohi: u32,
}

/// **Frees of other threads.** Which thread freed each address, over the undrained slots of
/// every thread's ring, read after the batch being paired was cut (see [`find_pairs`]): a block
/// another thread frees was published as freed before the real free ran, so before the address
/// could come back to anyone, and so before any later free of it by this thread.
pub struct Foreign<'a> {
    seen: &'a mut [FreeSeen],
    mask: usize,
    base: u64,
    below: u64,
    gen: u32,
    added: usize,
}

impl<'a> Foreign<'a> {
    /// A view for frees among at most `slots` slots, numbered from `base` up to (not
    /// including) `below`, less than 2^32 in all (frees numbered `below` or above are left out:
    /// the caller pairs only events numbered below it), in `room` (a power of two, its entries
    /// zeroed once or left by earlier views); `gen` tells this view's entries from theirs
    /// (never 0, and never the same as a recent view's). `None` when `room` is too small.
    pub fn new(
        room: &'a mut [FreeSeen],
        slots: usize,
        base: u64,
        below: u64,
        gen: u32,
    ) -> Option<Foreign<'a>> {
        let n = slots.next_power_of_two().max(64);
        if n > room.len()
            || !room.len().is_power_of_two()
            || gen == 0
            || below < base
            || below - base > u32::MAX as u64
        {
            return None;
        }
        Some(Foreign {
            seen: &mut room[..n],
            mask: n - 1,
            base,
            below,
            gen,
            added: 0,
        })
    }

    /// Adds the frees among the slots of `runs` (one ring's, as for [`find_pairs`]) of thread
    /// `tid`. False when a number lies outside the view's range or the view is full: it must
    /// not be used then.
    pub fn add(&mut self, tid: u32, runs: &[&[u8]]) -> bool {
        let mut slots = Slots::new(runs);
        while let Some(s) = slots.next() {
            let skip = match s[0] {
                slot::KIND_STACK => slot::stack_slots(u16::from_le_bytes([s[2], s[3]]) as usize),
                slot::KIND_CONTENT => {
                    slot::content_slots(u16::from_le_bytes([s[2], s[3]]) as usize)
                }
                slot::KIND_FREE => {
                    let (seq, addr) = (u64_at(s, 8), u64_at(s, 16));
                    if seq < self.base {
                        return false;
                    }
                    if seq < self.below {
                        // At most three quarters full: probes stay short.
                        if self.added * 4 >= self.seen.len() * 3 {
                            return false;
                        }
                        self.insert(tid, addr, (seq - self.base) as u32);
                    }
                    1
                }
                _ => 1,
            };
            for _ in 1..skip {
                if slots.next().is_none() {
                    break;
                }
            }
        }
        true
    }

    #[inline]
    fn home(&self, addr: u64) -> usize {
        (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize & self.mask
    }

    fn insert(&mut self, tid: u32, addr: u64, off: u32) {
        let mut h = self.home(addr);
        loop {
            let e = &mut self.seen[h];
            if e.gen != self.gen {
                *e = FreeSeen {
                    addr,
                    gen: self.gen,
                    tid,
                    lo: off,
                    hi: off,
                    olo: u32::MAX,
                    ohi: 0,
                };
                self.added += 1;
                return;
            }
            if e.addr == addr {
                if e.tid == tid {
                    e.lo = e.lo.min(off);
                    e.hi = e.hi.max(off);
                } else {
                    e.olo = e.olo.min(off);
                    e.ohi = e.ohi.max(off);
                }
                return;
            }
            h = (h + 1) & self.mask;
        }
    }

    /// Whether a thread other than `tid` freed `addr` with a number strictly between `after`
    /// and `before` (or may have: a thread's frees are kept as a range).
    pub fn clashes(&self, tid: u32, addr: u64, after: u64, before: u64) -> bool {
        let mut h = self.home(addr);
        loop {
            let e = &self.seen[h];
            if e.gen != self.gen {
                return false;
            }
            if e.addr == addr {
                let within = |lo: u32, hi: u32| {
                    lo <= hi && self.base + (lo as u64) < before && self.base + (hi as u64) > after
                };
                return (e.tid != tid && within(e.lo, e.hi)) || within(e.olo, e.ohi);
            }
            h = (h + 1) & self.mask;
        }
    }
}

/// Set in a `table` entry: the address was allocated again while live (a free was never seen),
/// so nothing on it is elided in this batch (the reader must see the reuse).
const POISON: u32 = 1 << 15;
/// A `table` entry: slot index + 1 (and `POISON`) in the low 16 bits, the allocation's run of
/// consecutive sequence numbers in the high 16.
const SLOT_BITS: u32 = 0xffff;

/// An allocation function and a free function that belong together (a mismatch stays visible):
/// `new` with `delete`, `new[]` with `delete[]`, every other allocation function with `free` or
/// `realloc`. One load and a bit test: the writer asks it for every pair it finds.
#[inline]
fn same_family(alloc: u8, free: u8) -> bool {
    FAMILY
        .get(alloc as usize)
        .is_some_and(|&frees| free < 8 && frees & 1 << free != 0)
}

/// Per allocation function (`AllocFn` as `u8`), the free functions (`FreeFn` bits) that match it.
const FAMILY: [u8; crate::AllocFn::Reallocarray as usize + 1] = {
    const FREE_OR_REALLOC: u8 = 1 << crate::FreeFn::Free as u8 | 1 << crate::FreeFn::Realloc as u8;
    let mut t = [FREE_OR_REALLOC; crate::AllocFn::Reallocarray as usize + 1];
    t[crate::AllocFn::New as usize] = 1 << crate::FreeFn::Delete as u8;
    t[crate::AllocFn::NewArray as usize] = 1 << crate::FreeFn::DeleteArray as u8;
    t
};

/// **Elided pairs.** Finds, in the slots of `runs` (one drained batch of one thread, as for
/// [`encode`]), every allocation freed again later in the same batch by the matching kind of free,
/// where no other thread can have freed the block in between (had one, and got the address back,
/// this free would release that block, not the one allocated here): without `foreign`, every
/// sequence number between the two is in the batch (no other thread took one); with
/// `foreign` (`(view, tid)`: every thread's frees published up to after this batch was cut, and
/// `floor` above every number drained before them), no other thread's free of the address lies
/// between the two. And
/// with no epoch boundary between the two (`bounds`: the boundaries' sequence numbers, ascending;
/// a boundary `b` separates numbers below `b` from the rest; allocations numbered below `floor`,
/// whose boundaries are no longer all known, are never elided). Such a pair changes no live set at any
/// boundary: the reader needs only that it happened, which a `PAIRS` slot per stack and interval
/// says (count and bytes), at the number of the group's last event; the other numbers become
/// `NOP`s. Returns the marks for [`encode_elided`] and how many events were elided, or `None` when
/// the scratch is too small for the batch (send it whole).
pub fn find_pairs<'s>(
    runs: &[&[u8]],
    bounds: &[u64],
    floor: u64,
    scratch: &'s mut PairScratch<'_>,
    foreign: Option<(&Foreign<'_>, u32)>,
) -> Option<(Pairs<'s>, usize)> {
    let slots: usize = runs.iter().map(|r| r.len() / SLOT_LEN).sum();
    let PairScratch {
        table,
        marks,
        groups,
    } = scratch;
    if slots > marks.len()
        || slots >= POISON as usize
        || table.len() < 2 * slots
        || !table.len().is_power_of_two()
        || !groups.len().is_power_of_two()
    {
        return None;
    }
    // Only as much table and as many groups as this batch can use are cleared and used: a
    // writer draining often sends small batches.
    let (tn, gn) = (table.len(), groups.len());
    let table = &mut table[..(2 * slots).next_power_of_two().max(64).min(tn)];
    let groups = &mut groups[..(slots / 2 + 1).next_power_of_two().max(16).min(gn)];
    table.fill(0);
    groups.fill(Group::default());
    let marks = &mut marks[..slots];
    marks.fill(0);
    let (tmask, gmask) = (table.len() - 1, groups.len() - 1);
    let interval = |seq: u64| bounds.iter().take_while(|&&b| b <= seq).count() as u32;
    // The slot at index `i` (the runs taken as one).
    let first = runs.first().copied().unwrap_or(&[]);
    let second = runs.get(1).copied().unwrap_or(&[]);
    let slot_at = |i: usize| -> &[u8] {
        let at = i * SLOT_LEN;
        if at < first.len() {
            &first[at..at + SLOT_LEN]
        } else {
            &second[at - first.len()..at - first.len() + SLOT_LEN]
        }
    };
    let hash = |addr: u64| (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize & tmask;
    let mut elided = 0;
    let mut i = 0;
    // Runs of consecutive sequence numbers: a new one starts wherever another thread took one.
    let (mut run, mut expect) = (0u32, None::<u64>);
    // The slot right after the last `CONTENT` record: a `FREE` there is not elided (its content
    // names the block, which the reader must then know).
    let mut after_content = usize::MAX;
    while i < slots {
        let s = slot_at(i);
        if s[0] == slot::KIND_STACK {
            i += slot::stack_slots(u16::from_le_bytes([s[2], s[3]]) as usize);
            continue;
        }
        if s[0] == slot::KIND_CONTENT {
            i += slot::content_slots(u16::from_le_bytes([s[2], s[3]]) as usize);
            after_content = i;
            continue;
        }
        let seq = u64_at(s, 8);
        if expect.is_some_and(|e| e != seq) {
            run += 1;
        }
        expect = Some(seq.wrapping_add(1));
        match s[0] {
            slot::KIND_ALLOC => {
                let addr = u64_at(s, 16);
                let mut h = hash(addr);
                let me = (i as u32 + 1) | run << 16;
                loop {
                    let e = table[h];
                    if e == 0 {
                        table[h] = me;
                        break;
                    }
                    let j = (e & SLOT_BITS & !POISON) as usize - 1;
                    if u64_at(slot_at(j), 16) == addr {
                        // Allocated again: if the earlier block was not freed here, this batch
                        // shows a reuse the reader must see whole.
                        let live = e & POISON != 0 || marks[j] == 0;
                        table[h] = me | if live { POISON } else { 0 };
                        break;
                    }
                    h = (h + 1) & tmask;
                }
            }
            slot::KIND_FREE => {
                let addr = u64_at(s, 16);
                let mut h = hash(addr);
                while table[h] != 0 {
                    let e = table[h];
                    let j = (e & SLOT_BITS & !POISON) as usize - 1;
                    let a = slot_at(j);
                    if u64_at(a, 16) != addr {
                        h = (h + 1) & tmask;
                        continue;
                    }
                    let sa = u64_at(a, 8);
                    // Another thread took a number in between: did it free this address?
                    let crossed = e >> 16 != run
                        && foreign.is_none_or(|(f, tid)| f.clashes(tid, addr, sa, seq));
                    if e & POISON != 0
                        || after_content == i
                        || crossed
                        || sa < floor
                        || marks[j] != 0
                        || !same_family(a[1], s[1])
                        || interval(sa) != interval(seq)
                    {
                        break;
                    }
                    let stack = u32_at(a, 4);
                    let iv = interval(sa);
                    let mut g = (stack.wrapping_mul(0x9E37_79B9) ^ iv) as usize & gmask;
                    let mut probes = 0;
                    while groups[g].count != 0
                        && (groups[g].stack != stack || groups[g].interval != iv)
                    {
                        g = (g + 1) & gmask;
                        probes += 1;
                        if probes > gmask {
                            break;
                        }
                    }
                    if probes > gmask {
                        break;
                    }
                    let gr = &mut groups[g];
                    gr.stack = stack;
                    gr.interval = iv;
                    gr.count += 1;
                    gr.bytes += u64_at(a, 24);
                    gr.last = i as u32;
                    marks[j] = g as u16 + 1;
                    marks[i] = g as u16 + 1;
                    elided += 2;
                    break;
                }
            }
            _ => {}
        }
        i += 1;
    }
    Some((Pairs { marks, groups }, elided))
}

/// Why an `EVENTS` body could not be expanded: the byte offset in the body and what was wrong.
#[derive(Debug)]
pub struct ExpandError {
    pub at: usize,
    pub what: String,
}

struct In<'a> {
    data: &'a [u8],
    pos: usize,
}

/// What went wrong while reading a field (turned into an [`ExpandError`] by `expand`, off the
/// hot path).
enum Bad {
    /// The body ends before this field.
    End(&'static str),
    /// A length nibble above 8.
    Width(&'static str, usize),
}

impl In<'_> {
    fn err(&self, what: impl Into<String>) -> ExpandError {
        ExpandError {
            at: self.pos,
            what: what.into(),
        }
    }

    #[cold]
    fn bad(&self, b: Bad) -> ExpandError {
        match b {
            Bad::End(what) => self.err(format!("the record ends inside {what}")),
            Bad::Width(what, len) => self.err(format!("{what}: a length of {len} bytes")),
        }
    }

    #[inline(always)]
    fn byte(&mut self, what: &'static str) -> Result<u8, Bad> {
        match self.data.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(Bad::End(what)),
        }
    }

    /// A field of `len` bytes (0-8).
    #[inline(always)]
    fn field(&mut self, len: usize, what: &'static str) -> Result<u64, Bad> {
        if len > 8 {
            return Err(Bad::Width(what, len));
        }
        let v = match self.data.get(self.pos..self.pos + 8) {
            Some(b) => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
            None => {
                let Some(b) = self.data.get(self.pos..self.pos + len) else {
                    return Err(Bad::End(what));
                };
                let mut w = [0u8; 8];
                w[..len].copy_from_slice(b);
                u64::from_le_bytes(w)
            }
        };
        self.pos += len;
        // The low `len` bytes (none for 0: a shift of 64 yields nothing).
        Ok(v & u64::MAX.checked_shr(64 - 8 * len as u32).unwrap_or(0))
    }

    /// A length byte, then two fields.
    #[inline(always)]
    fn pair(&mut self, a: &'static str, b: &'static str) -> Result<(u64, u64), Bad> {
        let l = self.byte(a)?;
        let x = self.field((l & 15) as usize, a)?;
        let y = self.field((l >> 4) as usize, b)?;
        Ok((x, y))
    }
}

/// Receives the events of an `EVENTS` body in order (see [`decode`]). An error ends the decoding;
/// it is reported at the event's offset in the body.
pub trait Sink {
    fn alloc(&mut self, func: u8, stack: u32, seq: u64, addr: u64, size: u64)
        -> Result<(), String>;
    fn free(&mut self, func: u8, seq: u64, addr: u64) -> Result<(), String>;
    fn nop(&mut self, seq: u64) -> Result<(), String>;
    fn fork(&mut self, seq: u64, child: u32) -> Result<(), String>;
    fn stack(&mut self, id: u32, gen: u32, reason: u8, frames: &[u64]) -> Result<(), String>;
    /// `count` allocations from `stack`, `bytes` in all, each freed again (see [`find_pairs`]).
    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) -> Result<(), String>;
    /// Block `addr`, freed at stack `free_stack` by the `FREE` that follows in this stream,
    /// still held these (offset, word) pairs (a `CONTENT` record; version 4). Ignored unless a
    /// sink wants it.
    fn content(&mut self, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) -> Result<(), String> {
        let _ = (addr, free_stack, pairs);
        Ok(())
    }
    /// `count` `NOP`s numbered `seq`, `seq + 1`, ...
    fn skip(&mut self, seq: u64, count: u64) -> Result<(), String> {
        for i in 0..count {
            self.nop(seq.wrapping_add(i))?;
        }
        Ok(())
    }
}

/// Decodes `body` (an `EVENTS` record after its 8-byte head) into `sink`, checking that it holds
/// exactly `count` slots' worth of events, as the head announces.
pub fn decode(body: &[u8], count: usize, sink: &mut impl Sink) -> Result<(), ExpandError> {
    let mut r = In { data: body, pos: 0 };
    macro_rules! read {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(b) => return Err(r.bad(b)),
            }
        };
    }
    let (mut next_seq, mut addr, mut stack, mut frame) = (0u64, 0u64, 0u32, 0u64);
    let mut left = count;
    let mut frames: Vec<u64> = Vec::new();
    let mut content: Vec<(u64, u64)> = Vec::new();
    while r.pos < body.len() {
        let at = r.pos;
        let fail = |what: String| ExpandError { at, what };
        let over = || ExpandError {
            at,
            what: format!("more slots than the record's head announces ({count})"),
        };
        let kind = read!(r.byte("an event"));
        let (code, f) = (kind & 7, kind >> 3);
        if code == CODE_SKIP {
            let k = f as usize + 1;
            left = left.checked_sub(k).ok_or_else(over)?;
            sink.skip(next_seq, k as u64).map_err(fail)?;
            next_seq = next_seq.wrapping_add(k as u64);
            continue;
        }
        if code == CODE_STACK {
            let n = u16::from_le_bytes([
                read!(r.byte("a frame count")),
                read!(r.byte("a frame count")),
            ]);
            let (id, gen) = read!(r.pair("a stack id", "a module generation"));
            let (Ok(id), Ok(gen)) = (u32::try_from(id), u32::try_from(gen)) else {
                return Err(fail("a stack id or generation beyond 32 bits".into()));
            };
            let n = n as usize;
            left = left.checked_sub(slot::stack_slots(n)).ok_or_else(over)?;
            frames.clear();
            frames.resize(n, 0);
            let mut i = 0;
            while i < n {
                let (a, b) = read!(r.pair("a return address", "a return address"));
                for d in [a, b].into_iter().take(n - i) {
                    frame = frame.wrapping_add(unzigzag(d) as u64);
                    frames[i] = frame;
                    i += 1;
                }
            }
            sink.stack(id, gen, f, &frames[..n]).map_err(fail)?;
            continue;
        }
        if code == CODE_EXT {
            if f != EXT_CONTENT {
                return Err(fail(format!("unknown extended event kind {f}")));
            }
            let n = u16::from_le_bytes([
                read!(r.byte("a content pair count")),
                read!(r.byte("a content pair count")),
            ]) as usize;
            if n > slot::MAX_CONTENT_PAIRS {
                return Err(fail(format!(
                    "content record of {n} pairs, more than the {} a record holds",
                    slot::MAX_CONTENT_PAIRS
                )));
            }
            left = left.checked_sub(slot::content_slots(n)).ok_or_else(over)?;
            let (dstack, daddr) = read!(r.pair("a content stack id", "a content address"));
            stack = stack.wrapping_add(unzigzag(dstack) as u32);
            addr = addr.wrapping_add(unzigzag(daddr) as u64);
            content.clear();
            let (mut off, mut word) = (0u64, addr);
            for _ in 0..n {
                let (doff, dword) = read!(r.pair("a content offset", "a content word"));
                off = off.wrapping_add(doff);
                word = word.wrapping_add(unzigzag(dword) as u64);
                content.push((off, word));
            }
            slot::check_content(&content).map_err(fail)?;
            sink.content(addr, stack, &content).map_err(fail)?;
            continue;
        }
        if code > CODE_PAIRS {
            return Err(fail(format!("unknown event code {code}")));
        }
        left = left.checked_sub(1).ok_or_else(over)?;
        let (dseq, x) = read!(r.pair("a sequence number", "an event field"));
        let seq = next_seq.wrapping_add(unzigzag(dseq) as u64);
        next_seq = seq.wrapping_add(1);
        match code {
            CODE_ALLOC => {
                addr = addr.wrapping_add(unzigzag(x) as u64);
                let (size, dstack) = read!(r.pair("a size", "a stack id"));
                stack = stack.wrapping_add(unzigzag(dstack) as u32);
                sink.alloc(f, stack, seq, addr, size).map_err(fail)?;
            }
            CODE_FREE => {
                addr = addr.wrapping_add(unzigzag(x) as u64);
                sink.free(f, seq, addr).map_err(fail)?;
            }
            CODE_NOP => sink.nop(seq).map_err(fail)?,
            CODE_PAIRS => {
                let (bytes, dstack) = read!(r.pair("a byte count", "a stack id"));
                stack = stack.wrapping_add(unzigzag(dstack) as u32);
                sink.pairs(seq, stack, x, bytes).map_err(fail)?;
            }
            _ => {
                let Ok(child) = u32::try_from(x) else {
                    return Err(fail(format!("child pid {x} beyond 32 bits")));
                };
                sink.fork(seq, child).map_err(fail)?;
            }
        }
    }
    if left != 0 {
        return Err(r.err(format!(
            "{} slots, but the record's head announces {count}",
            count - left
        )));
    }
    Ok(())
}

/// Rebuilds the slots an `EVENTS` body came from.
struct SlotSink<'a>(&'a mut Vec<u8>);

impl Sink for SlotSink<'_> {
    fn alloc(
        &mut self,
        func: u8,
        stack: u32,
        seq: u64,
        addr: u64,
        size: u64,
    ) -> Result<(), String> {
        let mut s = [0u8; SLOT_LEN];
        s[0] = slot::KIND_ALLOC;
        s[1] = func;
        s[4..8].copy_from_slice(&stack.to_le_bytes());
        s[8..16].copy_from_slice(&seq.to_le_bytes());
        s[16..24].copy_from_slice(&addr.to_le_bytes());
        s[24..32].copy_from_slice(&size.to_le_bytes());
        self.0.extend_from_slice(&s);
        Ok(())
    }

    fn free(&mut self, func: u8, seq: u64, addr: u64) -> Result<(), String> {
        let mut s = [0u8; SLOT_LEN];
        s[0] = slot::KIND_FREE;
        s[1] = func;
        s[8..16].copy_from_slice(&seq.to_le_bytes());
        s[16..24].copy_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&s);
        Ok(())
    }

    fn nop(&mut self, seq: u64) -> Result<(), String> {
        self.0.extend_from_slice(&slot::nop(seq));
        Ok(())
    }

    fn fork(&mut self, seq: u64, child: u32) -> Result<(), String> {
        self.0.extend_from_slice(&slot::fork(seq, child));
        Ok(())
    }

    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) -> Result<(), String> {
        self.0
            .extend_from_slice(&slot::pairs(stack, seq, count, bytes));
        Ok(())
    }

    fn content(&mut self, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) -> Result<(), String> {
        self.0
            .extend_from_slice(&slot::content_header(free_stack, addr, pairs.len() as u16));
        for c in pairs.chunks(slot::PAIRS_PER_SLOT) {
            self.0.extend_from_slice(&slot::content_pairs(c));
        }
        Ok(())
    }

    fn stack(&mut self, id: u32, gen: u32, reason: u8, frames: &[u64]) -> Result<(), String> {
        let mut h = [0u8; SLOT_LEN];
        h[0] = slot::KIND_STACK;
        h[1] = reason;
        h[2..4].copy_from_slice(&(frames.len() as u16).to_le_bytes());
        h[4..8].copy_from_slice(&id.to_le_bytes());
        h[8..12].copy_from_slice(&gen.to_le_bytes());
        self.0.extend_from_slice(&h);
        for c in frames.chunks(slot::FRAMES_PER_SLOT) {
            self.0.extend_from_slice(&slot::frames(c));
        }
        Ok(())
    }
}

/// Appends to `slots` the 32-byte slots that `body` (an `EVENTS` record after its 8-byte head)
/// encodes: exactly `count` of them (the head's count).
pub fn expand(body: &[u8], count: usize, slots: &mut Vec<u8>) -> Result<(), ExpandError> {
    slots.reserve(count.min(crate::MAX_EVENTS_SLOTS as usize) * SLOT_LEN);
    decode(body, count, &mut SlotSink(slots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllocFn, FreeFn, StopReason};

    /// [`super::same_family`] as the enums say it, for every byte pair.
    #[test]
    fn same_family_is_the_enums_pairing() {
        use AllocFn as A;
        use FreeFn as F;
        let by_enums = |alloc: u8, free: u8| match (A::from_u8(alloc), F::from_u8(free)) {
            (Some(A::New), Some(F::Delete)) | (Some(A::NewArray), Some(F::DeleteArray)) => true,
            (Some(A::New | A::NewArray), _) | (_, Some(F::Delete | F::DeleteArray)) => false,
            (Some(_), Some(_)) => true,
            _ => false,
        };
        let mut matches = 0;
        for alloc in 0..=255u8 {
            for free in 0..=255u8 {
                assert_eq!(
                    super::same_family(alloc, free),
                    by_enums(alloc, free),
                    "{alloc} {free}"
                );
                matches += by_enums(alloc, free) as u32;
            }
        }
        // 9 functions with free and realloc, new with delete, new[] with delete[].
        assert_eq!(matches, 20);
    }

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&slot::stack_header(7, 3, StopReason::MaxDepth, 6));
        v.extend_from_slice(&slot::frames(&[
            0x5555_0000_1234,
            0x5555_0000_1000,
            0x7f00_0000_0010,
            1,
        ]));
        v.extend_from_slice(&slot::frames(&[u64::MAX, 0]));
        v.extend_from_slice(&slot::alloc(AllocFn::Calloc, 7, 10, 0x5555_0001_0000, 48));
        v.extend_from_slice(&slot::free(FreeFn::Delete, 11, 0x5555_0001_0000));
        v.extend_from_slice(&slot::nop(5));
        v.extend_from_slice(&slot::fork(u64::MAX, 4242));
        v.extend_from_slice(&slot::alloc(
            AllocFn::Reallocarray,
            u32::MAX,
            0,
            u64::MAX,
            u64::MAX,
        ));
        v.extend_from_slice(&slot::free(FreeFn::Realloc, 1, 0));
        content(
            &mut v,
            7,
            0x5555_0001_0040,
            &[(0x18, 0x5555_0001_0000), (0x20, 0x7fff_0000_0000)],
        );
        content(
            &mut v,
            u32::MAX,
            0x5555_0001_0040,
            &[(0, u64::MAX), (8, 0), (0xff8, 1)],
        );
        v.extend_from_slice(&slot::free(FreeFn::Free, 2, 0x5555_0001_0040));
        content(&mut v, 0, 0, &[]);
        v
    }

    fn content(v: &mut Vec<u8>, stack: u32, addr: u64, pairs: &[(u64, u64)]) {
        v.extend_from_slice(&slot::content_header(stack, addr, pairs.len() as u16));
        for c in pairs.chunks(slot::PAIRS_PER_SLOT) {
            v.extend_from_slice(&slot::content_pairs(c));
        }
    }

    #[test]
    fn roundtrip_is_exact_even_across_runs() {
        let v = sample();
        let slots = v.len() / SLOT_LEN;
        let mut out = vec![0u8; slots * MAX_SLOT_BYTES];
        // The stack record continues from the first run into the second (a ring that wrapped).
        let n = encode(&[&v[..2 * SLOT_LEN], &v[2 * SLOT_LEN..]], &mut out).unwrap();
        assert!(n < v.len() / 2, "{n} bytes for {} slot bytes", v.len());
        let mut back = Vec::new();
        expand(&out[..n], slots, &mut back).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn encode_refuses_what_it_cannot_carry() {
        let v = sample();
        // Too small a buffer, a cut stack record, an unknown kind.
        assert!(encode(&[&v], &mut [0u8; 16]).is_none());
        assert!(encode(&[&v[..2 * SLOT_LEN]], &mut [0u8; 4096]).is_none());
        let mut bad = v.clone();
        bad[3 * SLOT_LEN] = 99;
        assert!(encode(&[&bad], &mut [0u8; 4096]).is_none());
    }

    #[test]
    fn expand_reports_bad_bodies_with_offsets() {
        let v = sample();
        let slots = v.len() / SLOT_LEN;
        let mut out = vec![0u8; slots * MAX_SLOT_BYTES];
        let n = encode(&[&v], &mut out).unwrap();
        let e = expand(&out[..n - 1], slots, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("the record ends"), "{}", e.what);
        let e = expand(&out[..n], slots - 1, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("announces"), "{}", e.what);
        let e = expand(&out[..n], slots + 1, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("announces"), "{}", e.what);
        let e = expand(&[7 | 1 << 3], 1, &mut Vec::new()).unwrap_err();
        assert!(
            e.what.contains("unknown extended event kind 1"),
            "{}",
            e.what
        );
        let e = expand(&[0, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("a length of 9 bytes"), "{}", e.what);
    }

    #[test]
    fn bad_content_records_are_errors_not_panics() {
        let mut v = Vec::new();
        content(
            &mut v,
            3,
            0x1000,
            &[(0x10, 0x2000), (0x20, 0x3000), (0x28, 0x3000)],
        );
        v.extend_from_slice(&slot::free(FreeFn::Free, 0, 0x1000));
        let slots = v.len() / SLOT_LEN;
        let mut out = vec![0u8; slots * MAX_SLOT_BYTES];
        let n = encode(&[&v], &mut out).unwrap();
        let body = &out[..n];
        let mut back = Vec::new();
        expand(body, slots, &mut back).unwrap();
        assert_eq!(back, v);
        // Every cut is an error that says where the record ends.
        for cut in 0..n {
            let e = expand(&body[..cut], slots, &mut Vec::new()).unwrap_err();
            assert!(
                e.what.contains("the record ends inside") || e.what.contains("announces"),
                "cut {cut}: {}",
                e.what
            );
        }
        // The head announcing fewer slots than the content record takes.
        let e = expand(body, 2, &mut Vec::new()).unwrap_err();
        assert!(
            e.what
                .contains("more slots than the record's head announces"),
            "{}",
            e.what
        );
        // A pair count beyond a record's.
        let e = expand(&[7, 0x01, 0x01], 200, &mut Vec::new()).unwrap_err();
        assert!(
            e.what.contains("257 pairs, more than the 256"),
            "{}",
            e.what
        );
        // A second offset no higher than the first: kind, count (2), the head pair (length,
        // stack id 1 byte, address 2), the first pair (length, offset step 1, word 2), then the
        // second pair's length and offset step, set to 0.
        let mut bad = body.to_vec();
        assert_eq!(bad[..4], [7, 3, 0, 0x21], "{bad:?}");
        assert_eq!(bad[7..9], [0x21, 0x10], "{bad:?}");
        assert_eq!(bad[11..13], [0x21, 0x10], "{bad:?}");
        bad[12] = 0;
        let e = expand(&bad, slots, &mut Vec::new()).unwrap_err();
        assert!(
            e.what.contains("pair 1: offset 0x10 is not above"),
            "{}",
            e.what
        );
        // Non-zero reserved bytes or padding in slots are sent as slots, never encoded lossily.
        let mut odd = Vec::new();
        content(&mut odd, 1, 0x40, &[(0, 0x10)]);
        odd[SLOT_LEN + 16] = 1;
        assert!(encode(&[&odd], &mut [0u8; 4096]).is_none());
        let mut odd = Vec::new();
        content(&mut odd, 1, 0x40, &[]);
        odd[20] = 1;
        assert!(encode(&[&odd], &mut [0u8; 4096]).is_none());
    }

    #[test]
    fn a_free_with_content_is_never_elided() {
        use AllocFn::*;
        let mut v = Vec::new();
        v.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 1));
        v.extend_from_slice(&slot::frames(&[0x1000]));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 0, 0xa0, 100));
        content(&mut v, 1, 0xa0, &[(8, 0xb0)]);
        v.extend_from_slice(&slot::free(FreeFn::Free, 1, 0xa0));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 2, 0xb0, 10)); // elided
        v.extend_from_slice(&slot::free(FreeFn::Free, 3, 0xb0));
        let (back, elided, _) = scratch_run(&v, &[]);
        assert_eq!(elided, 2);
        let mut want = v.clone();
        want[6 * SLOT_LEN..7 * SLOT_LEN].copy_from_slice(&slot::nop(2));
        want[7 * SLOT_LEN..8 * SLOT_LEN].copy_from_slice(&slot::pairs(1, 3, 1, 10));
        assert_eq!(back, want);
    }

    /// Room for batches of up to 32 slots.
    fn small_scratch() -> (Vec<u32>, Vec<u16>, Vec<Group>) {
        (vec![0u32; 64], vec![0u16; 32], vec![Group::default(); 16])
    }

    fn scratch_run(v: &[u8], bounds: &[u64]) -> (Vec<u8>, usize, Vec<u8>) {
        let slots = v.len() / SLOT_LEN;
        let (mut table, mut marks, mut groups) = small_scratch();
        let mut sc = PairScratch {
            table: &mut table,
            marks: &mut marks,
            groups: &mut groups,
        };
        // Split in two runs, as a ring that wrapped.
        let runs: [&[u8]; 2] = [&v[..3 * SLOT_LEN], &v[3 * SLOT_LEN..]];
        let (pairs, elided) = find_pairs(&runs, bounds, 0, &mut sc, None).unwrap();
        let mut out = vec![0u8; slots * MAX_SLOT_BYTES];
        let n = encode_elided(&runs, &mut out, &pairs).unwrap();
        let mut back = Vec::new();
        expand(&out[..n], slots, &mut back).unwrap();
        out.truncate(n);
        (back, elided, out)
    }

    #[test]
    fn pairs_freed_within_an_interval_are_elided_and_nothing_else() {
        use AllocFn::*;
        let mut v = Vec::new();
        v.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 2));
        v.extend_from_slice(&slot::frames(&[0x1000, 0x2000]));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 0, 0xa0, 100)); // freed at 2: elided
        v.extend_from_slice(&slot::alloc(Calloc, 1, 1, 0xb0, 200)); // freed at 3, across 3
        v.extend_from_slice(&slot::free(FreeFn::Free, 2, 0xa0));
        v.extend_from_slice(&slot::free(FreeFn::Free, 3, 0xb0));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 4, 0xa0, 50)); // delete of malloc: kept
        v.extend_from_slice(&slot::free(FreeFn::Delete, 5, 0xa0));
        v.extend_from_slice(&slot::alloc(New, 2, 6, 0xc0, 8)); // new/delete: elided
        v.extend_from_slice(&slot::free(FreeFn::Delete, 7, 0xc0));
        v.extend_from_slice(&slot::alloc(Malloc, 2, 8, 0xd0, 16)); // reused while live: kept
        v.extend_from_slice(&slot::alloc(Malloc, 2, 9, 0xd0, 24));
        v.extend_from_slice(&slot::free(FreeFn::Realloc, 10, 0xd0));
        v.extend_from_slice(&slot::free(FreeFn::Free, 11, 0xe0)); // never allocated here
        let (back, elided, _) = scratch_run(&v, &[3]);
        assert_eq!(elided, 4);
        let mut want = v.clone();
        let put = |w: &mut Vec<u8>, i: usize, s: slot::Slot| {
            w[i * SLOT_LEN..(i + 1) * SLOT_LEN].copy_from_slice(&s)
        };
        put(&mut want, 2, slot::nop(0));
        put(&mut want, 4, slot::pairs(1, 2, 1, 100));
        put(&mut want, 8, slot::nop(6));
        put(&mut want, 9, slot::pairs(2, 7, 1, 8));
        assert_eq!(back, want);

        // Without the boundary the calloc at 1 pairs too: one group of two for stack 1.
        let (back, elided, _) = scratch_run(&v, &[]);
        assert_eq!(elided, 6);
        put(&mut want, 3, slot::nop(1));
        put(&mut want, 4, slot::nop(2));
        put(&mut want, 5, slot::pairs(1, 3, 2, 300));
        assert_eq!(back, want);
    }

    #[test]
    fn no_pair_across_a_number_another_thread_took() {
        use AllocFn::*;
        let mut v = Vec::new();
        v.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 1));
        v.extend_from_slice(&slot::frames(&[0x1000]));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 0, 0xa0, 100));
        // 1: another thread's (it may free 0xa0 and get it back before the free at 2)
        v.extend_from_slice(&slot::free(FreeFn::Free, 2, 0xa0));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 3, 0xb0, 10));
        v.extend_from_slice(&slot::free(FreeFn::Free, 4, 0xb0));
        v.extend_from_slice(&slot::nop(5));
        let (back, elided, _) = scratch_run(&v, &[]);
        assert_eq!(elided, 2);
        let mut want = v.clone();
        want[4 * SLOT_LEN..5 * SLOT_LEN].copy_from_slice(&slot::nop(3));
        want[5 * SLOT_LEN..6 * SLOT_LEN].copy_from_slice(&slot::pairs(1, 4, 1, 10));
        assert_eq!(back, want);
    }

    /// With every thread's frees in view, a pair across another thread's numbers is elided
    /// unless that thread freed the pair's address in between.
    #[test]
    fn pairs_across_other_threads_numbers_unless_they_freed_the_address() {
        use AllocFn::*;
        let mut v = Vec::new();
        v.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 1));
        v.extend_from_slice(&slot::frames(&[0x1000]));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 10, 0xa0, 100));
        v.extend_from_slice(&slot::alloc(Malloc, 1, 12, 0xb0, 10));
        v.extend_from_slice(&slot::free(FreeFn::Free, 14, 0xa0)); // 0xa0 freed by 2 at 11
        v.extend_from_slice(&slot::free(FreeFn::Free, 16, 0xb0)); // 0xb0 freed by 2 at 17: after
                                                                  // Thread 2's frees (its slots, as the writer reads its ring).
        let other: Vec<u8> = [
            slot::free(FreeFn::Free, 11, 0xa0),
            slot::free(FreeFn::Free, 13, 0xc0),
            slot::free(FreeFn::Free, 17, 0xb0),
        ]
        .concat();
        let mut room = vec![FreeSeen::default(); 64];
        let mut view = Foreign::new(&mut room, 16, 0, 100, 1).unwrap();
        assert!(view.add(1, &[&v]));
        assert!(view.add(2, &[&other]));
        assert!(view.clashes(1, 0xa0, 10, 14));
        assert!(
            !view.clashes(1, 0xa0, 14, 20),
            "its own free at 14, the other's before"
        );
        assert!(!view.clashes(1, 0xb0, 12, 16));
        assert!(!view.clashes(1, 0xd0, 0, 99), "never freed");
        let (mut table, mut marks, mut groups) = small_scratch();
        let mut sc = PairScratch {
            table: &mut table,
            marks: &mut marks,
            groups: &mut groups,
        };
        let (pairs, elided) = find_pairs(&[&v], &[], 0, &mut sc, Some((&view, 1))).unwrap();
        assert_eq!(elided, 2, "0xb0's pair only");
        let m = &pairs.marks[2..6];
        assert!(m[0] == 0 && m[2] == 0 && m[1] != 0 && m[1] == m[3], "{m:?}");
        // Without the view, no pair crosses another thread's number.
        let (_, elided) = find_pairs(&[&v], &[], 0, &mut sc, None).unwrap();
        assert_eq!(elided, 0);
        // A number below the floor (drained before this view was read) elides nothing.
        let (_, elided) = find_pairs(&[&v], &[], 13, &mut sc, Some((&view, 1))).unwrap();
        assert_eq!(elided, 0);
        // A view whose frees go below its base, or that fills up, is not to be used.
        let mut room = vec![FreeSeen::default(); 64];
        let mut low = Foreign::new(&mut room, 16, 12, 100, 2).unwrap();
        assert!(!low.add(2, &[&other]));
        let many: Vec<u8> = (0..60u64)
            .flat_map(|i| slot::free(FreeFn::Free, i, 0x1000 + 16 * i))
            .collect();
        let mut room = vec![FreeSeen::default(); 64];
        let mut full = Foreign::new(&mut room, 60, 0, 100, 3).unwrap();
        assert!(!full.add(1, &[&many]));
        // Frees numbered from `below` on are left out.
        let mut room = vec![FreeSeen::default(); 64];
        let mut early = Foreign::new(&mut room, 16, 0, 12, 4).unwrap();
        assert!(early.add(2, &[&other]));
        assert!(early.clashes(1, 0xa0, 10, 14));
        assert!(!early.clashes(1, 0xb0, 12, 18));
    }

    #[test]
    fn contiguous_nops_take_a_byte_per_32() {
        let v: Vec<u8> = (0..40).flat_map(slot::nop).collect();
        let mut out = vec![0u8; 40 * MAX_SLOT_BYTES];
        let n = encode(&[&v], &mut out).unwrap();
        assert_eq!(n, 2);
        let mut back = Vec::new();
        expand(&out[..n], 40, &mut back).unwrap();
        assert_eq!(back, v);
        // A count beyond the head's is an error, not a panic.
        assert!(expand(&out[..n], 39, &mut Vec::new()).is_err());
    }

    #[test]
    fn find_pairs_declines_a_batch_larger_than_its_scratch() {
        let v: Vec<u8> = (0..40).flat_map(slot::nop).collect();
        let (mut table, mut marks, mut groups) = small_scratch();
        let mut sc = PairScratch {
            table: &mut table,
            marks: &mut marks,
            groups: &mut groups,
        };
        assert!(find_pairs(&[&v], &[], 0, &mut sc, None).is_none());
    }
}
