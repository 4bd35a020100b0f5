//! Ingest against the live set's size (issue 14: >= 20 M events/s whatever the live set): a
//! trace of compact `EVENTS` records (4,096 events each, as the preload drains its rings) in
//! which one thread allocates N blocks of 100 bytes at an allocator's addresses (112 bytes apart)
//! and keeps them (`scripts/bench/bigheap.c`), then frees a random live block and allocates
//! again (mostly at the freed address), N events more: a cache or a heap that churns at a large
//! live set of constant size. Read with
//! `Process::read_stream`; the throughput is events per second of the whole read.
//!
//!   cargo bench -p leakhunt --bench liveset             (1 M and 5 M blocks)
//!   LIVESET_50M=1 cargo bench -p leakhunt --bench liveset   (also 50 M: ~2 GB, minutes)

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use leakhunt::process::Process;
use leakhunt_format::{encode, slot, AllocFn, FreeFn, StopReason};

/// (stream, events): `blocks` allocations kept, then `churn` frees each followed by an
/// allocation at the freed address or a new one.
fn stream(blocks: u64, churn: u64) -> (Vec<u8>, u64) {
    let mut out = encode::preamble().to_vec();
    let mut slots = Vec::with_capacity(4096 * slot::SLOT_LEN);
    slots.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 2));
    slots.extend_from_slice(&slot::frames(&[0x1000, 0x2000]));
    let mut seq = 0u64;
    let flush = |slots: &mut Vec<u8>, out: &mut Vec<u8>, force: bool| {
        if force || slots.len() >= 4096 * slot::SLOT_LEN {
            encode::events(1, slots, out);
            slots.clear();
        }
    };
    let base = 0x5555_5555_0000u64;
    for i in 0..blocks {
        slots.extend_from_slice(&slot::alloc(AllocFn::Malloc, 1, seq, base + 112 * i, 100));
        seq += 1;
        flush(&mut slots, &mut out, false);
    }
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut live: Vec<u64> = (0..blocks).map(|i| base + 112 * i).collect();
    let mut top = blocks;
    for _ in 0..churn / 2 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // A live block freed, and its address given back (most) or one past the heap's top:
        // the live set keeps its size.
        let i = (rng % blocks) as usize;
        slots.extend_from_slice(&slot::free(FreeFn::Free, seq, live[i]));
        seq += 1;
        if rng >> 62 == 0 {
            live[i] = base + 112 * top;
            top += 1;
        }
        slots.extend_from_slice(&slot::alloc(AllocFn::Malloc, 1, seq, live[i], 100));
        seq += 1;
        flush(&mut slots, &mut out, false);
    }
    flush(&mut slots, &mut out, true);
    (out, seq)
}

fn liveset(c: &mut Criterion) {
    let mut sizes = vec![1_000_000u64, 5_000_000];
    if std::env::var_os("LIVESET_50M").is_some() {
        sizes.push(50_000_000);
    }
    let mut g = c.benchmark_group("liveset");
    g.sample_size(10);
    // The reference: 5 M events at a live set that stays in cache.
    let cases = std::iter::once((1_000u64, "churn 5 M events", 5_000_000u64)).chain(
        sizes
            .iter()
            .flat_map(|&n| [(n, "grow", 0), (n, "grow+churn", n)]),
    );
    for (n, what, churn) in cases {
        {
            let (data, events) = stream(n, churn);
            g.throughput(Throughput::Elements(events));
            g.bench_with_input(BenchmarkId::new(what, n), &data, |b, data| {
                b.iter(|| {
                    let (p, err) = Process::read_stream(black_box(&data[..]));
                    assert!(err.is_none());
                    black_box(p.live.len())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, liveset);
criterion_main!(benches);
