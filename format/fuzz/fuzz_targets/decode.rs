//! Fuzz the trace decoder: `cargo +nightly fuzz run decode` in `format/` (seed the corpus with
//! `golden/simple.trace`). Any input must give Ok or an error, never a
//! panic, an abort or an allocation beyond the record size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = leakhunt_format::validate(data);
});
