//! Orphan sites (`leakhunt run --orphans`, `LEAKHUNT_ORPHANS=1`): every free sends, right before
//! its `FREE`, a `CONTENT` record with the free's stack and the heap pointers the block held.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use leakhunt_format::slot::{SlotIter, SlotRecord};
use leakhunt_format::{Reader, Record};
use leakhunt_tests::*;

/// Every slot record of a trace file, thread by thread in the order written.
fn slot_records(trace: &Path) -> Vec<SlotRecord> {
    let mut data = std::fs::read(trace).unwrap();
    let packed = data.starts_with(&leakhunt_format::pack::MAGIC);
    if packed {
        // A kept trace (`leakhunt run -o`): its events in sequence order, as slots again.
        data = zstd::stream::decode_all(&data[leakhunt_format::pack::PREAMBLE_LEN..]).unwrap();
    }
    let mut r = Reader::new(&data[..]);
    r.packed(packed);
    let mut out = Vec::new();
    let mut unpacker = leakhunt_format::pack::Unpacker::new();
    while let Some(rec) = r.next_record().unwrap() {
        let slots = match rec {
            Record::Batch { slots, .. } => slots,
            Record::Events { count, body, .. } => {
                let mut v = Vec::new();
                leakhunt_format::compact::expand(&body, count as usize, &mut v).unwrap();
                v
            }
            Record::Ordered { body, .. } => {
                let mut sink = Slots(Vec::new());
                unpacker.decode(&body, &mut sink).unwrap();
                out.extend(sink.0);
                continue;
            }
            _ => continue,
        };
        out.extend(SlotIter::new(&slots).map(Result::unwrap));
    }
    out
}

/// The events of `ORDERED` records as the slots they were.
struct Slots(Vec<SlotRecord>);

impl leakhunt_format::compact::Sink for Slots {
    fn alloc(&mut self, f: u8, stack: u32, seq: u64, addr: u64, size: u64) -> Result<(), String> {
        let func = leakhunt_format::AllocFn::from_u8(f).ok_or("alloc fn")?;
        self.0.push(SlotRecord::Alloc {
            func,
            stack,
            seq,
            addr,
            size,
        });
        Ok(())
    }
    fn free(&mut self, _f: u8, seq: u64, addr: u64) -> Result<(), String> {
        self.0.push(SlotRecord::Free {
            func: leakhunt_format::FreeFn::Free,
            seq,
            addr,
        });
        Ok(())
    }
    fn nop(&mut self, seq: u64) -> Result<(), String> {
        self.0.push(SlotRecord::Nop { seq });
        Ok(())
    }
    fn fork(&mut self, seq: u64, child: u32) -> Result<(), String> {
        self.0.push(SlotRecord::Fork { seq, child });
        Ok(())
    }
    fn stack(&mut self, id: u32, gen: u32, reason: u8, frames: &[u64]) -> Result<(), String> {
        let reason = leakhunt_format::StopReason::from_u8(reason).ok_or("stop reason")?;
        self.0.push(SlotRecord::Stack {
            id,
            gen,
            reason,
            frames: frames.to_vec(),
        });
        Ok(())
    }
    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) -> Result<(), String> {
        self.0.push(SlotRecord::Pairs {
            seq,
            stack,
            count,
            bytes,
        });
        Ok(())
    }
    fn content(&mut self, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) -> Result<(), String> {
        // The packed trace's "orphans on" marker is no record of the trace.
        if addr != 0 {
            self.0.push(SlotRecord::Content {
                addr,
                free_stack,
                pairs: pairs.to_vec(),
            });
        }
        Ok(())
    }
}

/// (struct, hdr, body) as the fixture printed them.
fn printed(stdout: &[u8]) -> Vec<(u64, u64, u64)> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(['=', ' ']).collect();
            (hex(f[3]), hex(f[5]), hex(f[7]))
        })
        .collect()
}

/// Checks the trace against what the fixture printed: each request's free comes with a
/// `CONTENT` record holding exactly its header and body pointers, right before its `FREE`, all
/// from one free stack (another than the body's free).
fn check(trace: &Path, reqs: &[(u64, u64, u64)]) {
    assert_eq!(reqs.len(), 100);
    let recs = slot_records(trace);
    let stacks: HashMap<u32, usize> = recs
        .iter()
        .filter_map(|r| match r {
            SlotRecord::Stack { id, frames, .. } => Some((*id, frames.len())),
            _ => None,
        })
        .collect();
    let (mut contents, mut frees) = (0, 0);
    let mut found = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        match r {
            SlotRecord::Content {
                addr,
                free_stack,
                pairs,
            } => {
                contents += 1;
                // Its FREE follows at once, for the same block.
                assert!(
                    matches!(&recs[i + 1], SlotRecord::Free { addr: a, .. } if a == addr),
                    "{:?}",
                    &recs[i + 1]
                );
                assert!(stacks.get(free_stack).is_some_and(|&n| n >= 2));
                found.push((*addr, *free_stack, pairs.clone()));
            }
            SlotRecord::Free { .. } => frees += 1,
            _ => {}
        }
    }
    // Every free has its content record.
    assert_eq!(contents, frees);
    let structs: std::collections::HashSet<u64> = reqs.iter().map(|r| r.0).collect();
    let of_structs: Vec<_> = found.iter().filter(|c| structs.contains(&c.0)).collect();
    assert_eq!(of_structs.len(), 100, "{of_structs:?}");
    for (c, &(addr, hdr, body)) in of_structs.iter().zip(reqs) {
        assert_eq!(c.0, addr);
        assert_eq!(c.2, [(0x18, hdr), (0x20, body)], "request at {addr:#x}");
    }
    let free_stack = of_structs[0].1;
    assert!(of_structs.iter().all(|c| c.1 == free_stack));
    // The bodies' frees: nothing pointer-like in 100 bytes of 'x', another call site.
    let bodies: std::collections::HashSet<u64> = reqs.iter().map(|r| r.2).collect();
    let of_bodies: Vec<_> = found.iter().filter(|c| bodies.contains(&c.0)).collect();
    assert_eq!(of_bodies.len(), 100);
    assert!(of_bodies
        .iter()
        .all(|c| c.2.is_empty() && c.1 != free_stack));
}

#[test]
fn each_free_says_what_the_block_still_pointed_to() {
    let exe = fixture("orphan_member.c");
    let dir = workspace().join("target/test-scratch");
    std::fs::create_dir_all(&dir).unwrap();

    // The preload alone.
    let trace = dir.join(format!("orphans-{}.trace", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let out = run_ok(
        Command::new(&exe)
            .env("LD_PRELOAD", preload())
            .env("LEAKHUNT_ORPHANS", "1")
            .env("LEAKHUNT_OUT", &trace)
            .env("LEAKHUNT_REACH", "0"),
    );
    check(&trace, &printed(&out.stdout));
    let data = std::fs::read(&trace).unwrap();
    assert_eq!(data[8..12], 4u32.to_le_bytes(), "format version 4");
    std::fs::remove_file(&trace).unwrap();

    // `leakhunt run --orphans -o TRACE`: the same records reach the kept trace.
    let kept = dir.join(format!("orphans-run-{}.trace", std::process::id()));
    let _ = std::fs::remove_file(&kept);
    let out = run_ok(
        Command::new(leakhunt())
            .args(["run", "--orphans", "--no-reachability", "-o"])
            .arg(&kept)
            .arg("--")
            .arg(&exe),
    );
    check(&kept, &printed(&out.stdout));
    std::fs::remove_file(&kept).unwrap();

    // Without the option: no content records, the frees as before.
    let out = Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_REACH", "0")
        .env("LEAKHUNT_ELIDE", "0")
        .output()
        .unwrap();
    assert!(out.status.success());
    let recs = slot_records(&trace);
    assert!(!recs.iter().any(|r| matches!(r, SlotRecord::Content { .. })));
    assert!(
        recs.iter()
            .filter(|r| matches!(r, SlotRecord::Free { .. }))
            .count()
            >= 200
    );
    std::fs::remove_file(&trace).unwrap();
}

/// A content record's block and pairs, and the record after it.
type Seen<'a> = (u64, Vec<(u64, u64)>, &'a SlotRecord);

#[test]
fn a_realloc_sends_the_words_it_drops() {
    // A block of four pointers shrunk to two, moved by growing, grown in place, freed by
    // realloc(p, 0).
    let (exe, _) = generated_fixture(
        "orphan_realloc",
        r#"
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    void **v = malloc(4 * sizeof *v);
    for (int i = 0; i < 4; i++) v[i] = malloc(16);
    printf("%p %p %p %p %p\n", (void *)v, v[0], v[1], v[2], v[3]);
    v = realloc(v, 2 * sizeof *v);            /* shrinks: drops v[2], v[3] */
    printf("%p\n", (void *)v);
    void **w = realloc(v, 4096);              /* moves (grows): drops nothing */
    printf("%p\n", (void *)w);
    w = realloc(w, 0);                        /* frees: drops v[0], v[1] */
    printf("%d\n", w == NULL);
    return 0;
}
"#,
    );
    let dir = workspace().join("target/test-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join(format!("orphans-realloc-{}.trace", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let out = run_ok(
        Command::new(&exe)
            .env("LD_PRELOAD", preload())
            .env("LEAKHUNT_ORPHANS", "1")
            .env("LEAKHUNT_OUT", &trace)
            .env("LEAKHUNT_REACH", "0"),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let (v, p): (u64, Vec<u64>) = (
        hex(lines[0][0]),
        lines[0][1..].iter().map(|s| hex(s)).collect(),
    );
    let (v2, w) = (hex(lines[1][0]), hex(lines[2][0]));
    assert_eq!(lines[3][0], "1");
    let recs = slot_records(&trace);
    // (block, pairs) of each content record, with the record that follows it.
    let contents: Vec<Seen> = recs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            SlotRecord::Content { addr, pairs, .. } => Some((*addr, pairs.clone(), &recs[i + 1])),
            _ => None,
        })
        .filter(|c| [v, v2, w].contains(&c.0))
        .collect();
    let is_realloc_free = |r: &SlotRecord, a: u64| matches!(r, SlotRecord::Free { func: leakhunt_format::FreeFn::Realloc, addr, .. } if *addr == a);
    // The shrink (in place or not), the move, the free; no record for growing in place.
    assert_eq!(contents.len(), 3, "{contents:?}");
    assert_eq!(
        (contents[0].0, &contents[0].1[..]),
        (v, &[(16, p[2]), (24, p[3])][..])
    );
    assert!(is_realloc_free(contents[0].2, v));
    assert_eq!((contents[1].0, contents[1].1.len()), (v2, 0));
    assert!(is_realloc_free(contents[1].2, v2));
    // All of it: the first two words, and what the realloc that moved it copied past them
    // (the old block's usable bytes, `v[2]` and `v[3]` among them).
    assert_eq!(contents[2].0, w);
    assert_eq!(contents[2].1[..2], [(0, p[0]), (8, p[1])]);
    assert!(contents[2].1.iter().all(|&(off, _)| off < 40));
    assert!(is_realloc_free(contents[2].2, w));
    std::fs::remove_file(&trace).unwrap();
}
