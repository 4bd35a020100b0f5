//! Encoder and decoder throughput: sealing batches of event slots into records, and reading a
//! stream of them back (CRC-32 checked, slots split into records).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use leakhunt_format::{encode, slot, AllocFn, FreeFn, Reader, Record};

/// A batch of `n` slots: allocations and frees alternating, as in an allocator storm.
fn storm_slots(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * slot::SLOT_LEN);
    for i in 0..n as u64 {
        let s = if i % 2 == 0 {
            slot::alloc(
                AllocFn::Malloc,
                1 + (i % 64) as u32,
                i,
                0x10000 + i * 16,
                16 + i % 1000,
            )
        } else {
            slot::free(FreeFn::Free, i, 0x10000 + (i - 1) * 16)
        };
        v.extend_from_slice(&s);
    }
    v
}

fn codec(c: &mut Criterion) {
    let batch = storm_slots(4096);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(4096));
    g.bench_function("encode batch of 4096 events", |b| {
        let mut out = Vec::with_capacity(batch.len() + 64);
        b.iter(|| {
            out.clear();
            encode::batch(7, black_box(&batch), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("compact-encode batch of 4096 events", |b| {
        let mut out = vec![0u8; 4096 * leakhunt_format::compact::MAX_SLOT_BYTES];
        b.iter(|| {
            black_box(leakhunt_format::compact::encode(
                &[black_box(&batch)],
                &mut out,
            ))
        })
    });
    g.bench_function("find pairs and compact-encode batch of 4096 events", |b| {
        use leakhunt_format::compact::{self, Group, PairScratch};
        let mut out = vec![0u8; 4096 * compact::MAX_SLOT_BYTES];
        let (mut table, mut marks, mut groups) = (
            vec![0u32; 8192],
            vec![0u16; 4096],
            vec![Group::default(); 1024],
        );
        b.iter(|| {
            let mut sc = PairScratch {
                table: &mut table,
                marks: &mut marks,
                groups: &mut groups,
            };
            let (pairs, elided) =
                compact::find_pairs(&[black_box(&batch)], &[], 0, &mut sc, None).unwrap();
            assert_eq!(elided, 4096);
            black_box(compact::encode_elided(&[&batch], &mut out, &pairs))
        })
    });
    let mut packed = vec![0u8; 4096 * leakhunt_format::compact::MAX_SLOT_BYTES];
    let n = leakhunt_format::compact::encode(&[&batch], &mut packed).unwrap();
    g.bench_function("compact-expand batch of 4096 events", |b| {
        let mut slots = Vec::with_capacity(batch.len());
        b.iter(|| {
            slots.clear();
            leakhunt_format::compact::expand(black_box(&packed[..n]), 4096, &mut slots).unwrap();
            black_box(slots.len())
        })
    });
    let mut stream = encode::preamble().to_vec();
    for _ in 0..64 {
        encode::batch(7, &batch, &mut stream);
    }
    g.throughput(Throughput::Elements(64 * 4096));
    g.bench_function("decode 64 batches", |b| {
        b.iter(|| {
            let mut r = Reader::new(black_box(&stream[..]));
            let mut slots = 0;
            while let Some(rec) = r.next_record().unwrap() {
                match rec {
                    Record::Batch { slots: s, .. } => slots += s.len() / slot::SLOT_LEN,
                    Record::Events { count, .. } => slots += count as usize,
                    _ => {}
                }
            }
            black_box(slots)
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
