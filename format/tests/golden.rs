//! The committed golden traces (written by libleakhunt.so for the `simple` test fixture:
//! `golden/simple.trace` in version 1 with `BATCH` records, `golden/simple-v2.trace` in version 2
//! with an `EVENTS` record, `golden/simple-v3.trace` in version 3 with elided pairs) still decode
//! to exactly what they held when they were written. A
//! change that breaks them breaks every trace users have kept: bump the version instead.

use leakhunt_format::slot::{SlotIter, SlotRecord};
use leakhunt_format::{validate, ExitKind, Reader, Record, StopReason};

const GOLDEN: &[u8] = include_bytes!("../golden/simple.trace");
const GOLDEN_V2: &[u8] = include_bytes!("../golden/simple-v2.trace");
const GOLDEN_V3: &[u8] = include_bytes!("../golden/simple-v3.trace");

#[test]
fn golden_v3_trace_with_elided_pairs_decodes_to_the_same_events() {
    assert_eq!(
        validate(GOLDEN_V3),
        Ok(10),
        "header, 6 modules, events, stats, exit"
    );
    assert_eq!(&GOLDEN_V3[8..12], &3u32.to_le_bytes(), "a version 3 trace");
    let mut r = Reader::new(GOLDEN_V3);
    let mut slots = Vec::new();
    let mut elided_stat = None;
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Events {
                tid, count, body, ..
            } => {
                assert_eq!((tid, count, body.len()), (9940, 21, 186));
                leakhunt_format::compact::expand(&body, count as usize, &mut slots).unwrap();
            }
            Record::Stats(s) => elided_stat = s.iter().find(|(k, _)| *k == 9).map(|(_, v)| *v),
            Record::Batch { .. } => panic!("the writer sends events records"),
            _ => {}
        }
    }
    let mut allocs = Vec::new();
    let mut rest = Vec::new();
    let mut stacks = Vec::new();
    for s in SlotIter::new(&slots) {
        match s.unwrap() {
            SlotRecord::Alloc {
                seq, size, stack, ..
            } => allocs.push((seq, size, stack)),
            SlotRecord::Stack { id, frames, .. } => stacks.push((id, frames.len())),
            other => rest.push(other),
        }
    }
    // The leaked blocks as they were; the malloc(50) freed at once and printf's 4 KiB buffer
    // (freed at exit) as one PAIRS slot each, their other numbers NOPs (sent as SKIP runs).
    assert_eq!(allocs, [(0, 100, 1), (1, 100, 1), (2, 100, 1), (3, 40, 2)]);
    assert_eq!(stacks, [(1, 6), (2, 7), (3, 5), (4, 11)]);
    assert_eq!(
        rest,
        [
            SlotRecord::Nop { seq: 4 },
            SlotRecord::Pairs {
                seq: 5,
                stack: 3,
                count: 1,
                bytes: 50
            },
            SlotRecord::Nop { seq: 6 },
            SlotRecord::Pairs {
                seq: 7,
                stack: 4,
                count: 1,
                bytes: 4096
            },
        ]
    );
    assert_eq!(elided_stat, Some(4));
}

#[test]
fn golden_v2_trace_with_an_events_record_decodes_to_the_same_events() {
    assert_eq!(
        validate(GOLDEN_V2),
        Ok(10),
        "header, 6 modules, events, stats, exit"
    );
    assert_eq!(&GOLDEN_V2[8..12], &2u32.to_le_bytes(), "a version 2 trace");
    let mut r = Reader::new(GOLDEN_V2);
    let mut allocs = Vec::new();
    let mut frees = Vec::new();
    let mut stacks = Vec::new();
    let mut events_records = 0;
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Header(h) => assert_eq!((h.pid, h.ppid), (14657, 14653)),
            Record::Events {
                tid, count, body, ..
            } => {
                events_records += 1;
                assert_eq!((tid, count, body.len()), (14657, 21, 189));
                let mut slots = Vec::new();
                leakhunt_format::compact::expand(&body, count as usize, &mut slots).unwrap();
                for s in SlotIter::new(&slots) {
                    match s.unwrap() {
                        SlotRecord::Alloc {
                            seq, size, stack, ..
                        } => allocs.push((seq, size, stack)),
                        SlotRecord::Free { seq, .. } => frees.push(seq),
                        SlotRecord::Stack { id, frames, .. } => stacks.push((id, frames.len())),
                        other => panic!("unexpected slot {other:?}"),
                    }
                }
            }
            Record::Batch { .. } => panic!("a version 2 writer sends events records"),
            _ => {}
        }
    }
    assert_eq!(events_records, 1);
    // The same program as the version 1 golden trace, the same events.
    assert_simple_events(&allocs, &frees, &stacks);
}

/// The events of the `simple` fixture: (seq, size, stack) of each allocation, the frees'
/// sequence numbers, (id, frame count) of each stack.
fn assert_simple_events(allocs: &[(u64, u64, u32)], frees: &[u64], stacks: &[(u32, usize)]) {
    assert_eq!(
        allocs,
        [
            (0, 100, 1),
            (1, 100, 1),
            (2, 100, 1),
            (3, 40, 2),
            (4, 50, 3),
            (6, 4096, 4)
        ]
    );
    assert_eq!(frees, [5, 7]);
    assert_eq!(stacks, [(1, 6), (2, 7), (3, 5), (4, 11)]);
}

#[test]
fn golden_trace_decodes_exactly() {
    assert_eq!(
        validate(GOLDEN),
        Ok(10),
        "header, 6 modules, batch, stats, exit"
    );
    let mut r = Reader::new(GOLDEN);
    let mut modules = Vec::new();
    let mut allocs = Vec::new();
    let mut frees = Vec::new();
    let mut stacks = Vec::new();
    let mut exit = None;
    let mut stats = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Header(h) => {
                assert_eq!((h.pid, h.ppid), (14796, 14790));
                assert_eq!(h.arch, "x86_64");
                assert_eq!(h.exe, "/work/main/target/fixtures/simple");
                assert_eq!(h.argv, ["/work/main/target/fixtures/simple"]);
                assert_eq!(h.max_frames, 64);
                assert_eq!(h.start_realtime_ns, 1795485825912455981);
            }
            Record::Module(m) => modules.push((m.id, m.path, m.build_id.len())),
            Record::Batch { tid, slots, .. } => {
                assert_eq!(tid, 14796);
                for s in SlotIter::new(&slots) {
                    match s.unwrap() {
                        SlotRecord::Alloc {
                            seq, size, stack, ..
                        } => allocs.push((seq, size, stack)),
                        SlotRecord::Free { seq, .. } => frees.push(seq),
                        SlotRecord::Stack {
                            id, reason, frames, ..
                        } => {
                            assert_eq!(reason, StopReason::End);
                            stacks.push((id, frames.len()))
                        }
                        SlotRecord::Nop { .. }
                        | SlotRecord::Fork { .. }
                        | SlotRecord::Pairs { .. }
                        | SlotRecord::Content { .. } => {
                            panic!("no no-ops, forks, pairs or contents in this trace")
                        }
                    }
                }
            }
            Record::Stats(s) => stats = s,
            Record::Exit(e) => exit = Some(e),
            other => panic!("unexpected record {other:?}"),
        }
    }
    assert_eq!(
        modules,
        [
            (0, "/work/main/target/fixtures/simple".to_string(), 20),
            (1, "linux-vdso.so.1".to_string(), 20),
            (
                2,
                "/work/main/target/release/libleakhunt.so".to_string(),
                20
            ),
            (3, "/lib/x86_64-linux-gnu/libc.so.6".to_string(), 20),
            (4, "/lib/x86_64-linux-gnu/libgcc_s.so.1".to_string(), 20),
            (5, "/lib64/ld-linux-x86-64.so.2".to_string(), 20),
        ]
    );
    assert_simple_events(&allocs, &frees, &stacks);
    assert_eq!(stats, [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1)]);
    assert_eq!(exit, Some(ExitKind::Code(0)));
}
