//! Symbolizer cost: the first lookup in a module (opening it, parsing DWARF) and warm lookups of
//! addresses across this bench executable's own functions.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use leakhunt_symbolizer::Symbolizer;
use object::{Object, ObjectSymbol, SymbolKind};

/// Addresses inside the first `n` function symbols of `path` (their ELF vaddrs).
fn function_addresses(path: &str, n: usize) -> Vec<u64> {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 8)
        .take(n)
        .map(|s| s.address() + s.size() / 2)
        .collect()
}

fn symbolize(c: &mut Criterion) {
    let exe = std::env::current_exe().unwrap();
    let path = exe.to_str().unwrap().to_string();
    let addrs = function_addresses(&path, 256);
    let mut g = c.benchmark_group("symbolize");
    g.sample_size(10);
    g.bench_function("first lookup (load module)", |b| {
        b.iter(|| {
            let mut s = Symbolizer::new();
            black_box(s.symbolize(&path, &[], addrs[0]))
        })
    });
    let mut s = Symbolizer::new();
    s.symbolize(&path, &[], addrs[0]);
    g.sample_size(50);
    g.bench_function("256 warm lookups", |b| {
        b.iter(|| {
            let mut frames = 0;
            for &a in &addrs {
                frames += s.symbolize(&path, &[], a).len();
            }
            black_box(frames)
        })
    });
    g.finish();
}

criterion_group!(benches, symbolize);
criterion_main!(benches);
