//! Fixed 32-byte slots: what a hook writes into its thread's ring and what a `Batch` record
//! carries. All fields little-endian. Encoding functions here never allocate (the preload calls
//! them on its hot path).
//!
//! | kind | bytes 0..8 | 8..16 | 16..24 | 24..32 |
//! |---|---|---|---|---|
//! | `ALLOC` | kind, alloc fn, 0, 0, stack id u32 | seq | address | size |
//! | `FREE` | kind, free fn, 0 ... | seq | address | 0 |
//! | `NOP` | kind, 0 ... | seq | 0 | 0 |
//! | `FORK` | kind, 0, 0, 0, child pid u32 | seq | 0 | 0 |
//! | `PAIRS` | kind, 0, 0, 0, stack id u32 | seq | count | bytes |
//! | `CONTENT` | kind, 0, pair count u16, free stack id u32 | address | 0 | 0 |
//! | `STACK` | kind, stop reason, frame count u16, stack id u32 | module generation u32, 0 | 0 | 0 |
//!
//! A `STACK` slot is followed by `ceil(frames / 4)` slots of four `u64` return addresses,
//! innermost first. Sequence numbers are dense per process: every number from 0 up is used by
//! exactly one `ALLOC`, `FREE`, `NOP`, `FORK` or `PAIRS`, which lets a reader detect lost events
//! exactly.
//!
//! `CONTENT` (format version 4, `LEAKHUNT_ORPHANS=1`) says which heap blocks a block still
//! pointed to when it was freed: it comes in the freeing thread's stream immediately before that
//! `FREE` (a `realloc`'s `FREE`: the words it drops), takes no sequence number (like `STACK`),
//! and is followed by `ceil(count / 2)` slots of two (offset `u64`, word `u64`) pairs each, a
//! missing second pair zero. Offsets are multiples of 8, ascending, below [`CONTENT_BYTES`]; at
//! most [`MAX_CONTENT_PAIRS`] pairs. The stack id is the free's own call stack (FORMAT.md,
//! "Orphan sites").
//!
//! `PAIRS` stands for `count` allocations from one stack, `bytes` in all, each freed again before
//! the next epoch boundary: the writer thread finds such pairs within one drained batch and sends
//! this one slot for them (at the sequence number of the group's last event) and `NOP`s for the
//! numbers of the others (format version 3; FORMAT.md, "Elided pairs").

use crate::{AllocFn, FreeFn, StopReason};

pub const SLOT_LEN: usize = 32;
pub type Slot = [u8; SLOT_LEN];

pub const KIND_ALLOC: u8 = 1;
pub const KIND_FREE: u8 = 2;
pub const KIND_NOP: u8 = 3;
/// The process forked (with children traced): the child starts with the heap as it is at this
/// point of the sequence.
pub const KIND_FORK: u8 = 4;
/// Allocations freed again within one epoch interval, counted instead of sent (see above).
pub const KIND_PAIRS: u8 = 5;
/// What a freed block still pointed to, before its `FREE` (see above; version 4).
pub const KIND_CONTENT: u8 = 6;
pub const KIND_STACK: u8 = 16;

/// Most (offset, word) pairs one `CONTENT` record carries.
pub const MAX_CONTENT_PAIRS: usize = 256;
/// How far into a freed block the tracer reads: offsets of `CONTENT` pairs are below this.
pub const CONTENT_BYTES: u64 = 4096;
/// (offset, word) pairs per continuation slot of a `CONTENT` record.
pub const PAIRS_PER_SLOT: usize = SLOT_LEN / 16;

/// Frames per continuation slot of a stack record.
pub const FRAMES_PER_SLOT: usize = SLOT_LEN / 8;

/// Number of slots a stack of `frames` frames occupies, header included.
pub const fn stack_slots(frames: usize) -> usize {
    1 + frames.div_ceil(FRAMES_PER_SLOT)
}

/// Number of slots a `CONTENT` record of `pairs` pairs occupies, header included.
pub const fn content_slots(pairs: usize) -> usize {
    1 + pairs.div_ceil(PAIRS_PER_SLOT)
}

#[inline]
fn put_u32(s: &mut Slot, at: usize, v: u32) {
    s[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[inline]
fn put_u64(s: &mut Slot, at: usize, v: u64) {
    s[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[inline]
fn get_u32(s: &Slot, at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

#[inline]
fn get_u64(s: &Slot, at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(b)
}

#[inline]
pub fn alloc(f: AllocFn, stack: u32, seq: u64, addr: u64, size: u64) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_ALLOC;
    s[1] = f as u8;
    put_u32(&mut s, 4, stack);
    put_u64(&mut s, 8, seq);
    put_u64(&mut s, 16, addr);
    put_u64(&mut s, 24, size);
    s
}

#[inline]
pub fn free(f: FreeFn, seq: u64, addr: u64) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_FREE;
    s[1] = f as u8;
    put_u64(&mut s, 8, seq);
    put_u64(&mut s, 16, addr);
    s
}

#[inline]
pub fn nop(seq: u64) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_NOP;
    put_u64(&mut s, 8, seq);
    s
}

#[inline]
pub fn fork(seq: u64, child: u32) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_FORK;
    put_u32(&mut s, 4, child);
    put_u64(&mut s, 8, seq);
    s
}

#[inline]
pub fn pairs(stack: u32, seq: u64, count: u64, bytes: u64) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_PAIRS;
    put_u32(&mut s, 4, stack);
    put_u64(&mut s, 8, seq);
    put_u64(&mut s, 16, count);
    put_u64(&mut s, 24, bytes);
    s
}

#[inline]
pub fn stack_header(id: u32, gen: u32, reason: StopReason, frames: u16) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_STACK;
    s[1] = reason as u8;
    s[2..4].copy_from_slice(&frames.to_le_bytes());
    put_u32(&mut s, 4, id);
    put_u32(&mut s, 8, gen);
    s
}

/// The continuation slot holding frames `chunk[0..4]` (missing ones are zero).
#[inline]
pub fn frames(chunk: &[u64]) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    for (i, f) in chunk.iter().take(FRAMES_PER_SLOT).enumerate() {
        put_u64(&mut s, i * 8, *f);
    }
    s
}

/// The header of a `CONTENT` record: block `addr`, freed at stack `free_stack`, with `pairs`
/// (offset, word) pairs in the slots that follow.
#[inline]
pub fn content_header(free_stack: u32, addr: u64, pairs: u16) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    s[0] = KIND_CONTENT;
    s[2..4].copy_from_slice(&pairs.to_le_bytes());
    put_u32(&mut s, 4, free_stack);
    put_u64(&mut s, 8, addr);
    s
}

/// The continuation slot of a `CONTENT` record holding `chunk[0..2]` (a missing pair is zero).
#[inline]
pub fn content_pairs(chunk: &[(u64, u64)]) -> Slot {
    let mut s = [0u8; SLOT_LEN];
    for (i, &(off, word)) in chunk.iter().take(PAIRS_PER_SLOT).enumerate() {
        put_u64(&mut s, i * 16, off);
        put_u64(&mut s, i * 16 + 8, word);
    }
    s
}

/// Checks the (offset, word) pairs of a `CONTENT` record: offsets multiples of 8, ascending,
/// below [`CONTENT_BYTES`], at most [`MAX_CONTENT_PAIRS`] of them. The error names the problem.
pub fn check_content(pairs: &[(u64, u64)]) -> Result<(), String> {
    if pairs.len() > MAX_CONTENT_PAIRS {
        return Err(format!(
            "content record of {} pairs, more than the {MAX_CONTENT_PAIRS} a record holds",
            pairs.len()
        ));
    }
    let mut next = 0u64;
    for (i, &(off, _)) in pairs.iter().enumerate() {
        let wrong = if off < next {
            "not above the previous pair's"
        } else if !off.is_multiple_of(8) {
            "not a multiple of 8"
        } else if off >= CONTENT_BYTES {
            "beyond the 4096 bytes a free reads"
        } else {
            next = off + 8;
            continue;
        };
        return Err(format!(
            "content record pair {i}: offset {off:#x} is {wrong}"
        ));
    }
    Ok(())
}

/// A decoded slot record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotRecord {
    Alloc {
        func: AllocFn,
        stack: u32,
        seq: u64,
        addr: u64,
        size: u64,
    },
    Free {
        func: FreeFn,
        seq: u64,
        addr: u64,
    },
    Nop {
        seq: u64,
    },
    Fork {
        seq: u64,
        child: u32,
    },
    Pairs {
        seq: u64,
        stack: u32,
        count: u64,
        bytes: u64,
    },
    Stack {
        id: u32,
        gen: u32,
        reason: StopReason,
        frames: Vec<u64>,
    },
    /// What block `addr` still pointed to when it was freed (at stack `free_stack`): (offset,
    /// word) pairs. Unsequenced: it belongs to the `FREE` that follows it.
    Content {
        addr: u64,
        free_stack: u32,
        pairs: Vec<(u64, u64)>,
    },
}

/// Why a slot sequence could not be decoded; `at` is the byte offset inside the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotError {
    pub at: usize,
    pub what: String,
}

/// Iterates the slot records of one batch payload (after its 8-byte batch header).
pub struct SlotIter<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> SlotIter<'a> {
    pub fn new(data: &'a [u8]) -> SlotIter<'a> {
        SlotIter { data, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    fn slot(&self, at: usize) -> Option<Slot> {
        let b = self.data.get(at..at + SLOT_LEN)?;
        let mut s = [0u8; SLOT_LEN];
        s.copy_from_slice(b);
        Some(s)
    }
}

impl Iterator for SlotIter<'_> {
    type Item = Result<SlotRecord, SlotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.data.len() {
            return None;
        }
        let at = self.pos;
        let Some(s) = self.slot(at) else {
            self.pos = self.data.len();
            return Some(Err(SlotError {
                at,
                what: format!("partial slot of {} bytes", self.data.len() - at),
            }));
        };
        self.pos += SLOT_LEN;
        let bad = |what: String| Some(Err(SlotError { at, what }));
        match s[0] {
            KIND_ALLOC => match AllocFn::from_u8(s[1]) {
                Some(func) => Some(Ok(SlotRecord::Alloc {
                    func,
                    stack: get_u32(&s, 4),
                    seq: get_u64(&s, 8),
                    addr: get_u64(&s, 16),
                    size: get_u64(&s, 24),
                })),
                None => bad(format!("unknown allocation function {}", s[1])),
            },
            KIND_FREE => match FreeFn::from_u8(s[1]) {
                Some(func) => Some(Ok(SlotRecord::Free {
                    func,
                    seq: get_u64(&s, 8),
                    addr: get_u64(&s, 16),
                })),
                None => bad(format!("unknown free function {}", s[1])),
            },
            KIND_NOP => Some(Ok(SlotRecord::Nop {
                seq: get_u64(&s, 8),
            })),
            KIND_FORK => Some(Ok(SlotRecord::Fork {
                seq: get_u64(&s, 8),
                child: get_u32(&s, 4),
            })),
            KIND_PAIRS => Some(Ok(SlotRecord::Pairs {
                seq: get_u64(&s, 8),
                stack: get_u32(&s, 4),
                count: get_u64(&s, 16),
                bytes: get_u64(&s, 24),
            })),
            KIND_STACK => {
                let Some(reason) = StopReason::from_u8(s[1]) else {
                    return bad(format!("unknown unwind stop reason {}", s[1]));
                };
                let n = u16::from_le_bytes([s[2], s[3]]) as usize;
                let need = stack_slots(n) - 1;
                let end = self.pos + need * SLOT_LEN;
                if end > self.data.len() {
                    self.pos = self.data.len();
                    return bad(format!(
                        "stack record of {n} frames needs {need} more slots, batch ends first"
                    ));
                }
                let mut frames = Vec::with_capacity(n);
                for i in 0..n {
                    let off = self.pos + i * 8;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.data[off..off + 8]);
                    frames.push(u64::from_le_bytes(b));
                }
                self.pos = end;
                Some(Ok(SlotRecord::Stack {
                    id: get_u32(&s, 4),
                    gen: get_u32(&s, 8),
                    reason,
                    frames,
                }))
            }
            KIND_CONTENT => {
                if s[1] != 0 || get_u64(&s, 16) != 0 || get_u64(&s, 24) != 0 {
                    return bad("content record with non-zero reserved bytes".into());
                }
                let n = u16::from_le_bytes([s[2], s[3]]) as usize;
                if n > MAX_CONTENT_PAIRS {
                    self.pos = self.data.len();
                    return bad(format!(
                        "content record of {n} pairs, more than the {MAX_CONTENT_PAIRS} a record holds"
                    ));
                }
                let need = content_slots(n) - 1;
                let end = self.pos + need * SLOT_LEN;
                if end > self.data.len() {
                    self.pos = self.data.len();
                    return bad(format!(
                        "content record of {n} pairs needs {need} more slots, batch ends first"
                    ));
                }
                let at_pairs = self.pos;
                let word = |i: usize| {
                    let off = at_pairs + i * 8;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.data[off..off + 8]);
                    u64::from_le_bytes(b)
                };
                let pairs: Vec<(u64, u64)> =
                    (0..n).map(|i| (word(2 * i), word(2 * i + 1))).collect();
                let padding = if n % PAIRS_PER_SLOT == 1 {
                    word(2 * n) | word(2 * n + 1)
                } else {
                    0
                };
                self.pos = end;
                if padding != 0 {
                    return bad(format!(
                        "content record of {n} pairs: its last slot's unused pair is not zero"
                    ));
                }
                if let Err(what) = check_content(&pairs) {
                    return bad(what);
                }
                Some(Ok(SlotRecord::Content {
                    addr: get_u64(&s, 8),
                    free_stack: get_u32(&s, 4),
                    pairs,
                }))
            }
            k => bad(format!("unknown slot kind {k}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_kind() {
        let frames_in: Vec<u64> = (1..=6).map(|i| 0x1000 * i).collect();
        let mut buf = Vec::new();
        buf.extend_from_slice(&stack_header(7, 3, StopReason::MaxDepth, 6));
        for c in frames_in.chunks(FRAMES_PER_SLOT) {
            buf.extend_from_slice(&frames(c));
        }
        buf.extend_from_slice(&alloc(AllocFn::Calloc, 7, 10, 0xdead0, 48));
        buf.extend_from_slice(&free(FreeFn::Delete, 11, 0xdead0));
        buf.extend_from_slice(&nop(12));
        let got: Vec<_> = SlotIter::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                SlotRecord::Stack {
                    id: 7,
                    gen: 3,
                    reason: StopReason::MaxDepth,
                    frames: frames_in
                },
                SlotRecord::Alloc {
                    func: AllocFn::Calloc,
                    stack: 7,
                    seq: 10,
                    addr: 0xdead0,
                    size: 48
                },
                SlotRecord::Free {
                    func: FreeFn::Delete,
                    seq: 11,
                    addr: 0xdead0
                },
                SlotRecord::Nop { seq: 12 },
            ]
        );
        assert_eq!(stack_slots(6), 3);
        assert_eq!(stack_slots(0), 1);
    }

    #[test]
    fn truncated_stack_is_an_error_with_offset() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&nop(0));
        buf.extend_from_slice(&stack_header(1, 0, StopReason::End, 9));
        buf.extend_from_slice(&frames(&[1, 2, 3, 4]));
        let got: Vec<_> = SlotIter::new(&buf).collect();
        assert_eq!(got.len(), 2);
        let err = got[1].clone().unwrap_err();
        assert_eq!(err.at, 32);
        assert!(err.what.contains("9 frames"), "{}", err.what);
    }

    fn content_record(addr: u64, stack: u32, pairs: &[(u64, u64)]) -> Vec<u8> {
        let mut v = content_header(stack, addr, pairs.len() as u16).to_vec();
        for c in pairs.chunks(PAIRS_PER_SLOT) {
            v.extend_from_slice(&content_pairs(c));
        }
        v
    }

    #[test]
    fn content_round_trips_and_takes_no_sequence_number() {
        let pairs = [
            (0x18, 0x5555_0000_1000),
            (0x20, 0x5555_0000_2000),
            (0x28, 8),
        ];
        let mut buf = content_record(0x5555_0000_0040, 9, &pairs);
        assert_eq!(buf.len(), content_slots(3) * SLOT_LEN);
        buf.extend_from_slice(&free(FreeFn::Free, 4, 0x5555_0000_0040));
        buf.extend_from_slice(&content_record(0x70, 2, &[]));
        buf.extend_from_slice(&free(FreeFn::Delete, 5, 0x70));
        let got: Vec<_> = SlotIter::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                SlotRecord::Content {
                    addr: 0x5555_0000_0040,
                    free_stack: 9,
                    pairs: pairs.to_vec()
                },
                SlotRecord::Free {
                    func: FreeFn::Free,
                    seq: 4,
                    addr: 0x5555_0000_0040
                },
                SlotRecord::Content {
                    addr: 0x70,
                    free_stack: 2,
                    pairs: vec![]
                },
                SlotRecord::Free {
                    func: FreeFn::Delete,
                    seq: 5,
                    addr: 0x70
                },
            ]
        );
        assert_eq!(content_slots(0), 1);
        assert_eq!(content_slots(256), 129);
    }

    #[test]
    fn bad_content_records_are_errors_that_name_the_problem() {
        let err = |buf: &[u8]| {
            let got: Vec<_> = SlotIter::new(buf).collect();
            got.into_iter()
                .find_map(Result::err)
                .expect("an error")
                .what
        };
        // Cut short: 3 pairs need 2 more slots.
        let full = content_record(0x40, 1, &[(0, 0x10), (8, 0x20), (16, 0x30)]);
        let e = err(&full[..2 * SLOT_LEN]);
        assert!(e.contains("3 pairs needs 2 more slots"), "{e}");
        // More pairs than a record holds.
        let e = err(&content_header(1, 0x40, 257));
        assert!(e.contains("more than the 256"), "{e}");
        // Offsets out of order, unaligned, beyond what a free reads.
        let e = err(&content_record(0x40, 1, &[(16, 1), (8, 2)]));
        assert!(e.contains("pair 1: offset 0x8 is not above"), "{e}");
        let e = err(&content_record(0x40, 1, &[(12, 1)]));
        assert!(e.contains("not a multiple of 8"), "{e}");
        let e = err(&content_record(0x40, 1, &[(4096, 1)]));
        assert!(e.contains("beyond the 4096 bytes"), "{e}");
        // Reserved bytes and padding.
        let mut bad = full.clone();
        bad[1] = 1;
        assert!(err(&bad).contains("reserved"));
        let mut bad = content_record(0x40, 1, &[(0, 1)]);
        bad[SLOT_LEN + 20] = 1;
        assert!(err(&bad).contains("unused pair is not zero"));
    }
}
