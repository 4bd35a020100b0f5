//! Support for the fuzz target `cli/fuzz` (`report`) and for the tests that run its seeds on
//! stable: everything `leakhunt report` does with a trace, from its bytes, and the hostile files
//! its module-path seeds name.

use std::path::{Path, PathBuf};

use anyhow::Result;
use leakhunt_symbolizer::Symbolizer;

use crate::process::Process;
use crate::report::{self, Report};

/// What `leakhunt report` does with one trace, from its bytes: decode, check, link forks,
/// build the report through `sym` (so that the module paths of the input reach the
/// symbolizer's file opening), and render it as text, the live view, JSON and HTML. Returns
/// the text report. Any input must give a report or an error, never a panic or a hang.
pub fn report_from_bytes(data: &[u8], sym: &mut Symbolizer) -> Result<String> {
    let mut p = crate::compare::checked(Path::new("input"), Process::read_stream(data))?;
    Process::link_forks(&mut [&mut p]);
    let r = Report::new(vec![report::build_with(&p, None, None, sym)]);
    let mut text = String::new();
    for p in &r.processes {
        report::render_text(p, &mut text);
    }
    text.push_str(&crate::growth::live_view(&p, sym));
    serde_json::to_string(&r)?;
    crate::html::render(&r);
    Ok(text)
}

/// The directory of the hostile files that the module-path seeds name.
pub const HOSTILE_DIR: &str = "/tmp/leakhunt-fuzz";

/// Makes (where missing) the hostile files that the module-path seeds name, in
/// [`HOSTILE_DIR`]: `fifo`, `dir`, `socket` (a socket file, no listener), `huge` (a 5 GiB sparse
/// file) and `zeros` (a 64 MiB sparse file, under the symbolizer's size limit). Returns the
/// directory.
pub fn hostile_files() -> Result<PathBuf> {
    use rustix::fs::{FileType, Mode, CWD};
    let d = PathBuf::from(HOSTILE_DIR);
    std::fs::create_dir_all(&d)?;
    let fifo = d.join("fifo");
    if !fifo.exists() {
        match rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from(0o600), 0) {
            Err(rustix::io::Errno::EXIST) | Ok(()) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    std::fs::create_dir_all(d.join("dir"))?;
    let sock = d.join("socket");
    if std::fs::symlink_metadata(&sock).is_err() {
        // The socket file stays after the listener is gone.
        drop(std::os::unix::net::UnixListener::bind(&sock));
    }
    for (name, len) in [("huge", 5u64 << 30), ("zeros", 64 << 20)] {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(d.join(name))?;
        if f.metadata()?.len() != len {
            f.set_len(len)?;
        }
    }
    Ok(d)
}

/// The module-path seeds: (file name under `cli/fuzz/seeds/report/`, the module path every
/// module record of the golden trace is given).
pub const MODULE_SEEDS: &[(&str, &str)] = &[
    ("module-fifo.trace", "/tmp/leakhunt-fuzz/fifo"),
    ("module-dir.trace", "/tmp/leakhunt-fuzz/dir"),
    ("module-socket.trace", "/tmp/leakhunt-fuzz/socket"),
    ("module-huge.trace", "/tmp/leakhunt-fuzz/huge"),
    ("module-zeros.trace", "/tmp/leakhunt-fuzz/zeros"),
    ("module-dev-zero.trace", "/dev/zero"),
    ("module-dev-stdin.trace", "/dev/stdin"),
    ("module-proc-self-mem.trace", "/proc/self/mem"),
    ("module-root.trace", "/"),
    ("module-empty-path.trace", ""),
];

/// `trace` (a whole, valid trace) with every module record's path replaced by `path`.
pub fn with_module_paths(trace: &[u8], path: &str) -> Result<Vec<u8>> {
    use leakhunt_format::{encode, Reader, Record};
    let mut r = Reader::new(trace);
    let mut out = encode::preamble().to_vec();
    while let Some(rec) = r.next_record()? {
        match rec {
            Record::Header(h) => encode::header(&h, &mut out),
            Record::Module(mut m) => {
                m.path = path.into();
                encode::module(&m, &mut out)
            }
            Record::Batch { tid, slots, .. } => encode::batch(tid, &slots, &mut out),
            Record::Stats(s) => encode::stats(&s, &mut out),
            Record::Exit(e) => encode::exit(e, &mut out),
            other => anyhow::bail!("with_module_paths does not re-encode {other:?}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .into()
    }

    /// The report of `data` and the symbolizer's warnings, on a thread given 20 s: a hang fails.
    fn within_20s(data: Vec<u8>) -> (Result<String>, Vec<String>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sym = Symbolizer::new();
            let r = report_from_bytes(&data, &mut sym);
            let _ = tx.send((r, sym.warnings().to_vec()));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the report finished within 20 s")
    }

    #[test]
    fn the_module_path_seeds_are_current_and_each_is_a_warning_at_once() {
        // LEAKHUNT_BLESS=1 writes the seeds again.
        hostile_files().unwrap();
        let golden = std::fs::read(workspace().join("format/golden/simple.trace")).unwrap();
        let dir = workspace().join("cli/fuzz/seeds/report");
        let bless = std::env::var_os("LEAKHUNT_BLESS").is_some();
        let want = |path: &str| -> Option<String> {
            let why = match path {
                "/tmp/leakhunt-fuzz/fifo" => "is a FIFO, not an ELF file",
                "/tmp/leakhunt-fuzz/dir" | "/" => "is a directory, not an ELF file",
                "/tmp/leakhunt-fuzz/socket" => "is a socket, not an ELF file",
                "/tmp/leakhunt-fuzz/huge" => {
                    "is 5368709120 bytes, more than the 4 GiB leakhunt reads of one file"
                }
                "/tmp/leakhunt-fuzz/zeros" => {
                    "is not an ELF file (it does not start with the ELF magic)"
                }
                "/dev/zero" => "is a character device, not an ELF file",
                "/proc/self/mem" => "is 0 bytes long, not an ELF file",
                // stdin of a test is whatever the harness gives: said, whatever it is.
                "/dev/stdin" => return None,
                "" => {
                    return Some(
                        "cannot read module : No such file or directory (os error 2); its frames show as module+offset"
                            .into(),
                    )
                }
                _ => unreachable!("{path}"),
            };
            Some(format!("{path} {why}; its frames show as module+offset"))
        };
        for (name, path) in MODULE_SEEDS {
            let seed = with_module_paths(&golden, path).unwrap();
            let file = dir.join(name);
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&file, &seed).unwrap();
            }
            assert_eq!(
                std::fs::read(&file).ok().as_ref(),
                Some(&seed),
                "{} is not current: run with LEAKHUNT_BLESS=1",
                file.display()
            );
            let (r, warnings) = within_20s(seed);
            let text = r.unwrap();
            assert!(
                text.contains("300 bytes in 3 blocks are unfreed at exit (record 1 of 2)"),
                "{text}"
            );
            match want(path) {
                Some(w) => assert_eq!(warnings, [w], "{path}"),
                None => assert_eq!(warnings.len(), 1, "{path}: {warnings:?}"),
            }
        }
    }

    #[test]
    fn inputs_the_fuzzer_found_stay_fixed() {
        // Each `regression-*` seed made the fuzz target panic once (with overflow checks, as a
        // debug build has them: `cargo test -p leakhunt` catches their return, a release build
        // would wrap silently). Each runs as it is and resealed, as the fuzz target runs it.
        let dir = workspace().join("cli/fuzz/seeds/report");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("regression-")
            {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let mut sealed = data.clone();
            leakhunt_format::decode::reseal_for_fuzzing(&mut sealed);
            for d in [data, sealed] {
                let _ = within_20s(d);
            }
            n += 1;
        }
        assert!(n >= 1, "no regression seeds in {}", dir.display());
    }

    #[test]
    fn report_from_bytes_gives_errors_for_what_is_not_a_trace() {
        let mut sym = Symbolizer::new();
        let e = report_from_bytes(b"", &mut sym).unwrap_err().to_string();
        assert_eq!(e, "input: trace truncated at byte offset 0: expected the 16-byte preamble, found 0 bytes; no process header was recorded");
        let e = report_from_bytes(&[0; 64], &mut sym)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("input: not a leakhunt trace"), "{e}");
    }
}
