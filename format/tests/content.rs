//! `CONTENT` records (version 4, `LEAKHUNT_ORPHANS=1`) in whole traces: they read back through
//! both the slot and the compact paths, a sink that wants them gets them, and a cut or
//! inconsistent one is a decode error naming the problem, never a panic.

use leakhunt_format::compact::{self, Sink};
use leakhunt_format::decode::reseal_for_fuzzing;
use leakhunt_format::slot::{self, SlotIter, SlotRecord, SLOT_LEN};
use leakhunt_format::{encode, validate, DecodeError, FreeFn, Reader, Record, StopReason};

fn content(v: &mut Vec<u8>, stack: u32, addr: u64, pairs: &[(u64, u64)]) {
    v.extend_from_slice(&slot::content_header(stack, addr, pairs.len() as u16));
    for c in pairs.chunks(slot::PAIRS_PER_SLOT) {
        v.extend_from_slice(&slot::content_pairs(c));
    }
}

/// What a free with orphans on sends: its stack (new), the block's heap words, the `FREE`.
fn slots() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 2));
    v.extend_from_slice(&slot::frames(&[0x5555_0000_1234, 0x5555_0000_2000]));
    v.extend_from_slice(&slot::alloc(
        leakhunt_format::AllocFn::Malloc,
        1,
        0,
        0x5555_0001_0000,
        40,
    ));
    v.extend_from_slice(&slot::stack_header(2, 0, StopReason::End, 1));
    v.extend_from_slice(&slot::frames(&[0x5555_0000_3000]));
    let pairs: Vec<(u64, u64)> = (0..5)
        .map(|i| (8 * i, 0x5555_0002_0000 + 0x40 * i))
        .collect();
    content(&mut v, 2, 0x5555_0001_0000, &pairs);
    v.extend_from_slice(&slot::free(FreeFn::Free, 1, 0x5555_0001_0000));
    content(&mut v, 2, 0x5555_0003_0000, &[]);
    v.extend_from_slice(&slot::free(FreeFn::Free, 2, 0x5555_0003_0000));
    v
}

fn trace(as_events: bool, s: &[u8]) -> Vec<u8> {
    let mut t = encode::preamble().to_vec();
    if as_events {
        encode::events(7, s, &mut t);
    } else {
        encode::batch(7, s, &mut t);
    }
    encode::exit(leakhunt_format::ExitKind::Code(0), &mut t);
    t
}

/// A content record as a sink gets it: (address, free stack, pairs).
type Seen = (u64, u32, Vec<(u64, u64)>);

#[derive(Default)]
struct Contents(Vec<Seen>);

impl Sink for Contents {
    fn alloc(&mut self, _: u8, _: u32, _: u64, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn free(&mut self, _: u8, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn nop(&mut self, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn fork(&mut self, _: u64, _: u32) -> Result<(), String> {
        Ok(())
    }
    fn stack(&mut self, _: u32, _: u32, _: u8, _: &[u64]) -> Result<(), String> {
        Ok(())
    }
    fn pairs(&mut self, _: u64, _: u32, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn content(&mut self, addr: u64, stack: u32, pairs: &[(u64, u64)]) -> Result<(), String> {
        self.0.push((addr, stack, pairs.to_vec()));
        Ok(())
    }
}

#[test]
fn content_reads_back_from_batches_and_events() {
    let s = slots();
    for as_events in [false, true] {
        let t = trace(as_events, &s);
        assert_eq!(validate(&t), Ok(2));
        let mut r = Reader::new(&t[..]);
        assert!(r.next_record().unwrap().is_some());
        assert_eq!(r.version(), 4);
        let mut r = Reader::new(&t[..]);
        match r.next_record().unwrap().unwrap() {
            Record::Batch { slots, .. } => {
                assert!(!as_events);
                assert_eq!(slots, s);
            }
            Record::Events { count, body, .. } => {
                assert!(as_events);
                assert!(body.len() < s.len() / 3, "{} bytes", body.len());
                let mut c = Contents::default();
                compact::decode(&body, count as usize, &mut c).unwrap();
                assert_eq!(c.0.len(), 2);
                assert_eq!(
                    (c.0[0].0, c.0[0].1, c.0[0].2.len()),
                    (0x5555_0001_0000, 2, 5)
                );
                assert_eq!(c.0[0].2[4], (0x20, 0x5555_0002_0100));
                assert_eq!(
                    (c.0[1].0, c.0[1].1, c.0[1].2.len()),
                    (0x5555_0003_0000, 2, 0)
                );
                let mut back = Vec::new();
                compact::expand(&body, count as usize, &mut back).unwrap();
                assert_eq!(back, s);
            }
            other => panic!("{other:?}"),
        }
    }
    let got: Vec<_> = SlotIter::new(&s).collect::<Result<_, _>>().unwrap();
    assert!(matches!(
        &got[3],
        SlotRecord::Content { addr: 0x5555_0001_0000, free_stack: 2, pairs } if pairs.len() == 5
    ));
}

#[test]
fn a_cut_or_inconsistent_content_record_is_a_clear_error() {
    let s = slots();
    // Where the first content record starts: after two stack records and an allocation.
    let at = (slot::stack_slots(2) + 1 + slot::stack_slots(1)) * SLOT_LEN;
    assert_eq!(s[at], slot::KIND_CONTENT);
    let corrupt = |t: &[u8]| match validate(t) {
        Err(DecodeError::Corrupt { what, .. }) => what,
        other => panic!("{other:?}"),
    };
    // The batch ends inside the record.
    let e = corrupt(&trace(false, &s[..at + 2 * SLOT_LEN]));
    assert!(
        e.contains("content record of 5 pairs needs 3 more slots"),
        "{e}"
    );
    // A count the record's slots do not hold, in slots and in events.
    let mut bad = s.clone();
    bad[at + 2] = 9;
    let e = corrupt(&trace(false, &bad));
    assert!(e.contains("content record"), "{e}");
    let mut bad = s.clone();
    bad[at + 2] = 0x01;
    bad[at + 3] = 0x02;
    let e = corrupt(&trace(false, &bad));
    assert!(e.contains("513 pairs, more than the 256"), "{e}");
    // Offsets out of order.
    let mut bad = s.clone();
    bad[at + SLOT_LEN + 16] = 0;
    let e = corrupt(&trace(false, &bad));
    assert!(e.contains("pair 1: offset 0x0 is not above"), "{e}");
    let e = corrupt(&trace(true, &bad));
    assert!(e.contains("pair 1: offset 0x0 is not above"), "{e}");
    // Every cut of an events record, every mutation behind valid checksums: errors, no panic.
    let t = trace(true, &s);
    let end = 16 + 8 + u32::from_le_bytes([t[20], t[21], t[22], t[23]]) as usize;
    for cut in 17..end {
        assert!(validate(&t[..cut]).is_err(), "cut at {cut}");
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20_000 {
        let mut d = t.clone();
        for _ in 0..1 + (x % 4) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 16 + (x as usize % (d.len() - 16));
            d[at] = (x >> 32) as u8;
        }
        reseal_for_fuzzing(&mut d);
        let _ = validate(&d);
    }
}
