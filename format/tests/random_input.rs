//! The decoder never panics, whatever it is fed: random bytes, random bytes behind a valid
//! preamble, and the golden trace with bytes flipped, cut or spliced. (The same entry point is
//! the cargo-fuzz target in `format/fuzz`.)

use leakhunt_format::decode::reseal_for_fuzzing;
use leakhunt_format::{encode, validate, VERSION};

const GOLDEN: &[u8] = include_bytes!("../golden/simple.trace");

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `d` is the golden trace with only its version changed, to another version this reader knows.
/// The preamble has no checksum, and every version reads the records of the older ones the same
/// way, so such a trace must decode to the same records (checked by the callers), not fail.
fn relabelled(d: &[u8]) -> bool {
    d.len() == GOLDEN.len()
        && d[..8] == GOLDEN[..8]
        && d[12..] == GOLDEN[12..]
        && (1..=VERSION).contains(&u32::from_le_bytes([d[8], d[9], d[10], d[11]]))
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x2545F4914F6CDD1D);
    for _ in 0..20_000 {
        let len = rng.below(600);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            let p = encode::preamble();
            let n = p.len().min(data.len());
            data[..n].copy_from_slice(&p[..n]);
        }
        let _ = validate(&data);
    }
}

#[test]
fn mutated_golden_trace_never_panics_and_is_rejected() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for i in 0..20_000 {
        let mut d = GOLDEN.to_vec();
        match i % 4 {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(d.len());
                    d[at] ^= 1 << rng.below(8);
                }
            }
            1 => d.truncate(rng.below(d.len())),
            2 => {
                let (a, b) = (rng.below(d.len()), rng.below(d.len()));
                let chunk = d[a.min(b)..a.max(b)].to_vec();
                let at = rng.below(d.len());
                d.splice(at..at, chunk);
            }
            _ => {
                let at = rng.below(d.len());
                d[at] = 0xff;
                d.insert(at, 0xff);
            }
        }
        let r = validate(&d);
        if relabelled(&d) {
            assert_eq!(r, validate(GOLDEN));
        } else if d != GOLDEN && i % 4 == 0 {
            assert!(r.is_err(), "a flipped bit went unnoticed");
        }
    }
}

#[test]
fn every_single_bit_flip_is_an_error() {
    let mut bad = vec![];
    for at in 0..GOLDEN.len() {
        for bit in 0..8 {
            let mut d = GOLDEN.to_vec();
            d[at] ^= 1 << bit;
            if relabelled(&d) {
                assert_eq!(validate(&d), validate(GOLDEN));
            } else if validate(&d).is_ok() {
                bad.push((at, bit));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn mutations_behind_valid_checksums_never_panic() {
    let mut rng = Rng(0xD1B54A32D192ED03);
    for _ in 0..50_000 {
        let mut d = GOLDEN.to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = 16 + rng.below(d.len() - 16);
            d[at] = rng.next() as u8;
        }
        reseal_for_fuzzing(&mut d);
        let _ = validate(&d);
    }
}
