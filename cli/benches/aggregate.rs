//! The aggregator's ingest rate: a trace stream of allocation/free events (256 live blocks
//! recycled, as in the malloc storm) rebuilt into a process's live set, totals and per-stack
//! counts. The target is 20 M events/s on one core.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use leakhunt::process::Process;
use leakhunt_format::{encode, slot, AllocFn, FreeFn, StopReason};

fn storm_stream(events: u64) -> Vec<u8> {
    let mut out = encode::preamble().to_vec();
    let mut batch = Vec::new();
    batch.extend_from_slice(&slot::stack_header(1, 0, StopReason::End, 4));
    batch.extend_from_slice(&slot::frames(&[0x1000, 0x2000, 0x3000, 0x4000]));
    let mut live = [0u64; 256];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut seq = 0;
    let mut next_addr = 0x10_0000u64;
    while seq < events {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = (rng & 255) as usize;
        if live[k] != 0 {
            batch.extend_from_slice(&slot::free(FreeFn::Free, seq, live[k]));
            seq += 1;
        }
        next_addr += 64;
        live[k] = next_addr;
        batch.extend_from_slice(&slot::alloc(
            AllocFn::Malloc,
            1,
            seq,
            next_addr,
            16 + rng % 1000,
        ));
        seq += 1;
        if batch.len() >= 4096 * slot::SLOT_LEN {
            encode::batch(1, &batch, &mut out);
            batch.clear();
        }
    }
    encode::batch(1, &batch, &mut out);
    out
}

fn aggregate(c: &mut Criterion) {
    let events = 1_000_000;
    let stream = storm_stream(events);
    let mut g = c.benchmark_group("aggregate");
    g.throughput(Throughput::Elements(events));
    g.sample_size(20);
    g.bench_function("read_stream, 1 M storm events", |b| {
        b.iter(|| {
            let (p, err) = Process::read_stream(black_box(&stream[..]));
            assert!(err.is_none());
            black_box(p.totals.allocs)
        })
    });
    g.finish();
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
