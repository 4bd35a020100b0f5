//! Fuzz the trace decoder: `cargo +nightly fuzz run decode` in `format/` (seed the corpus with
//! `golden/simple.trace` and `golden/simple-v2.trace`). Any input must give Ok or an error, never
//! a panic, an abort or an allocation beyond the record size limit.
//!
//! Record checksums stop almost every mutation at the frame, so each input is decoded twice:
//! as it is, and with every record's checksum recomputed, which lets mutations reach the record
//! and slot decoders behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = leakhunt_format::validate(data);
    let mut sealed = data.to_vec();
    leakhunt_format::decode::reseal_for_fuzzing(&mut sealed);
    let _ = leakhunt_format::validate(&sealed);
});
