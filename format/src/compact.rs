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
//! [`encode`] never allocates (the preload's writer thread calls it into a fixed buffer);
//! [`expand`] turns a body back into the exact slots it came from.

use crate::slot::{self, SLOT_LEN};

const CODE_ALLOC: u8 = 0;
const CODE_FREE: u8 = 1;
const CODE_NOP: u8 = 2;
const CODE_FORK: u8 = 3;
const CODE_STACK: u8 = 4;

/// The event code of each slot kind (`NONE`: not an event).
const CODE_OF: [u8; 256] = {
    let mut t = [NONE; 256];
    t[slot::KIND_ALLOC as usize] = CODE_ALLOC;
    t[slot::KIND_FREE as usize] = CODE_FREE;
    t[slot::KIND_NOP as usize] = CODE_NOP;
    t[slot::KIND_FORK as usize] = CODE_FORK;
    t
};
const NONE: u8 = 0xff;

/// Most bytes one slot can take once encoded (an allocation: kind, two length bytes, four
/// 8-byte fields), plus the 8 bytes of slack the encoder writes past its end.
pub const MAX_SLOT_BYTES: usize = 35 + 8;

#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bytes needed for `v` (0 for 0).
#[inline]
fn width(v: u64) -> usize {
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
    let mut o = Out { buf: out, n: 0 };
    let mut chunks = Slots::new(runs);
    let (mut next_seq, mut addr, mut stack, mut frame) = (0u64, 0u64, 0u32, 0u64);
    while let Some(s) = chunks.next() {
        let f = s[1];
        if f >= 32 {
            return None;
        }
        o.room()?;
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
        let seq = u64_at(s, 8);
        let dseq = zigzag(seq.wrapping_sub(next_seq) as i64);
        next_seq = seq.wrapping_add(1);
        // One shape for every event kind, selected without a jump table (which cost more than
        // the rest of the encoding).
        let code = CODE_OF[kind as usize];
        if code > CODE_FORK {
            return None;
        }
        let has_addr = code <= CODE_FREE;
        let a = u64_at(s, 16);
        let word = u32_at(s, 4);
        let x = if has_addr {
            zigzag(a.wrapping_sub(addr) as i64)
        } else if code == CODE_FORK {
            word as u64
        } else {
            0
        };
        if has_addr {
            addr = a;
        }
        o.byte(code | f << 3);
        o.pair(dseq, x);
        if code == CODE_ALLOC {
            o.pair(
                u64_at(s, 24),
                zigzag(word.wrapping_sub(stack) as i32 as i64),
            );
            stack = word;
        }
    }
    Some(o.n)
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
    while r.pos < body.len() {
        let at = r.pos;
        let fail = |what: String| ExpandError { at, what };
        let over = || ExpandError {
            at,
            what: format!("more slots than the record's head announces ({count})"),
        };
        let kind = read!(r.byte("an event"));
        let (code, f) = (kind & 7, kind >> 3);
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
        if code > CODE_FORK {
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
        v
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
        let e = expand(&[7], 1, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("unknown event code 7"), "{}", e.what);
        let e = expand(&[0, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1, &mut Vec::new()).unwrap_err();
        assert!(e.what.contains("a length of 9 bytes"), "{}", e.what);
    }
}
