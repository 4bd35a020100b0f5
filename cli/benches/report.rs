//! The analyses after exit against the number of callsites (issue 10 item 10: they grew with its
//! square): a synthetic trace of N callsites, 8 frames each across 64 modules, each leaking a
//! 32-byte block per epoch for E epochs, read once; the bench builds the process's report (exit
//! records and growth entries; symbolization finds no files, so it measures the rest). Time per
//! callsite should stay flat as N grows.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use leakhunt::process::Process;
use leakhunt_format::encode::{self, Header, Module};
use leakhunt_format::{slot, AllocFn, Epoch, StopReason};
use leakhunt_symbolizer::Symbolizer;

const MODULES: u64 = 64;
/// Each module's text: 1 MiB at 16 MiB steps.
fn module_base(m: u64) -> u64 {
    0x1000_0000 + (m << 24)
}

fn trace(sites: u32, epochs: u32) -> Vec<u8> {
    let mut out = encode::preamble().to_vec();
    encode::header(
        &Header {
            arch: "x86_64".into(),
            pointer_size: 8,
            little_endian: true,
            pid: 1,
            ppid: 0,
            start_realtime_ns: 0,
            start_monotonic_ns: 0,
            exe: "bench".into(),
            argv: vec!["bench".into()],
            max_frames: 64,
        },
        &mut out,
    );
    for m in 0..MODULES {
        encode::module(
            &Module {
                id: m as u32,
                gen: 0,
                bias: module_base(m),
                // Not a file: the symbolizer gives up on it at once, without a warning.
                path: format!("[bench-{m}]"),
                build_id: vec![m as u8; 20],
                ranges: vec![(module_base(m), module_base(m) + (1 << 20))],
            },
            &mut out,
        );
    }
    let mut slots = Vec::new();
    for s in 1..=sites {
        // The allocating frame is the callsite's own; its callers are shared by many.
        let s64 = u64::from(s);
        let frames: Vec<u64> = (0..8u64)
            .map(|f| {
                let m = (s64 + f * 7) % MODULES;
                let off = if f == 0 {
                    16 * s64
                } else {
                    0x8_0000 + 16 * (s64 % (64 >> f.min(6)))
                };
                module_base(m) + off + 5
            })
            .collect();
        slots.extend_from_slice(&slot::stack_header(s, 0, StopReason::End, 8));
        for c in frames.chunks(slot::FRAMES_PER_SLOT) {
            slots.extend_from_slice(&slot::frames(c));
        }
    }
    let (mut seq, mut addr) = (0u64, 0x7000_0000_0000u64);
    for e in 1..=epochs {
        for s in 1..=sites {
            slots.extend_from_slice(&slot::alloc(AllocFn::Malloc, s, seq, addr, 32));
            seq += 1;
            addr += 32;
        }
        encode::batch(1, &slots, &mut out);
        slots.clear();
        encode::epoch(
            &Epoch {
                index: e,
                time_ns: u64::from(e) * 100_000_000,
                seq,
                rss: 1 << 24,
            },
            &mut out,
        );
    }
    out
}

fn report(c: &mut Criterion) {
    let mut g = c.benchmark_group("report after exit");
    g.sample_size(10);
    for (sites, epochs) in [(1024, 20), (4096, 20), (16384, 20), (4096, 400)] {
        let (p, err) = Process::read_stream(&trace(sites, epochs)[..]);
        assert!(err.is_none());
        g.throughput(Throughput::Elements(u64::from(sites)));
        g.bench_with_input(
            BenchmarkId::new(format!("{epochs} epochs"), format!("{sites} callsites")),
            &p,
            |b, p| {
                b.iter(|| {
                    let r = leakhunt::report::build(black_box(p), None, &mut Symbolizer::new());
                    assert_eq!(
                        (r.leaks.len(), r.growth.len()),
                        (sites as usize, sites as usize)
                    );
                    black_box(r)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, report);
criterion_main!(benches);
