// Rust collection churn: a HashMap<String, Vec<u64>> kept near 1,000 entries, String formatting
// and Vec growth. Every 5,000 iterations leak_config() leaks 48 bytes through Box::leak: the known
// leak.
//   rust_churn ITERATIONS
use std::collections::HashMap;
use std::hint::black_box;

#[inline(never)]
fn leak_config(i: u64) {
    let b: &'static mut [u64; 6] = Box::leak(Box::new([i; 6]));
    black_box(b);
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let mut map: HashMap<String, Vec<u64>> = HashMap::new();
    let (mut rng, mut total) = (88172645463325252u64, 0u64);
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = format!("key-{}", rng % 2000);
        match map.remove(&key) {
            Some(v) => total += v.len() as u64,
            None => {
                let v: Vec<u64> = (0..rng % 24).collect();
                map.insert(key, v);
            }
        }
        if i % 5000 == 4999 {
            leak_config(i);
        }
    }
    println!("{} entries, {}", map.len(), total);
}
