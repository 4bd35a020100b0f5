//! Fuzz what `leakhunt report` does with a trace, symbolizer included, so that the module paths
//! of the input reach the code that opens module and debug files. In `cli/`:
//!
//! ```sh
//! mkdir -p fuzz/corpus/report && cp fuzz/seeds/report/* ../format/golden/*.trace fuzz/corpus/report/
//! cargo +nightly fuzz run report fuzz/corpus/report -- -timeout=5
//! ```
//!
//! The seeds are the golden trace with every module path replaced by a hostile one (a FIFO, a
//! directory, a socket, a 5 GiB sparse file, /dev/zero, /proc/self/mem...; the files are made
//! in /tmp/leakhunt-fuzz on start). Any input must give a report or an error, never a panic,
//! a hang (libFuzzer's -timeout) or an allocation beyond its limit. On stable, the seeds run
//! through the same function in `leakhunt::fuzzing`'s tests.
//!
//! Record checksums stop almost every mutation at the frame, so each input is reported twice:
//! as it is, and with every record's checksum recomputed.
#![no_main]

use leakhunt_symbolizer::Symbolizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static HOSTILE: std::sync::Once = std::sync::Once::new();
    HOSTILE.call_once(|| {
        leakhunt::fuzzing::hostile_files()
            .expect("the hostile files are made in /tmp/leakhunt-fuzz");
    });
    let _ = leakhunt::fuzzing::report_from_bytes(data, &mut Symbolizer::new());
    let mut sealed = data.to_vec();
    leakhunt_format::decode::reseal_for_fuzzing(&mut sealed);
    let _ = leakhunt::fuzzing::report_from_bytes(&sealed, &mut Symbolizer::new());
});
