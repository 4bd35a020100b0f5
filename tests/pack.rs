//! Packed traces (`leakhunt run -o`, `leakhunt pack`, FORMAT.md "Packed traces"): the report of
//! a packed trace, text and JSON, is the report of the trace it was packed from; a damaged
//! packed trace is an error that says so, never a panic or a wrong figure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use leakhunt_tests::*;
use serde_json::Value;

fn fresh(name: &str) -> PathBuf {
    let d = scratch(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `leakhunt report TRACES` twice: the text report (stdout and stderr), and the JSON one less
/// the CLI's own peak RSS (a figure of the reading process, not of the trace).
fn reports(traces: &[&Path]) -> (String, Value) {
    let out = Command::new(leakhunt())
        .arg("report")
        .args(traces)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (rep, mut json) = report(traces);
    assert!(rep.status.success(), "{}", text(&rep));
    json.as_object_mut().unwrap().remove("cli_peak_rss_bytes");
    (text(&out), json)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pack(input: &Path, output: &Path) -> Output {
    Command::new(leakhunt())
        .arg("pack")
        .arg(input)
        .arg(output)
        .output()
        .unwrap()
}

fn is_packed(p: &Path) -> bool {
    std::fs::read(p)
        .unwrap()
        .starts_with(b"LKHUNTPK\x01\0\0\0\0\0\0\0")
}

/// The preload alone writes `dir/raw.trace` of `exe args` with `env`.
fn preload_trace(dir: &Path, exe: &Path, args: &[&str], env: &[(&str, &str)]) -> PathBuf {
    let trace = dir.join("raw.trace");
    // The preload creates its trace with O_EXCL.
    let _ = std::fs::remove_file(&trace);
    let out = Command::new(exe)
        .args(args)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    trace
}

fn same_report_packed(name: &str, exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let dir = fresh(name);
    let raw = preload_trace(&dir, exe, args, env);
    let packed = dir.join("packed.trace");
    let out = pack(&raw, &packed);
    assert!(out.status.success(), "{}", text(&out));
    assert!(is_packed(&packed));
    let (raw_size, packed_size) = (
        std::fs::metadata(&raw).unwrap().len(),
        std::fs::metadata(&packed).unwrap().len(),
    );
    assert!(packed_size < raw_size, "{packed_size} vs {raw_size}");
    let (t1, j1) = reports(&[&raw]);
    let (t2, j2) = reports(&[&packed]);
    assert_eq!(t1, t2, "{name}: the text reports differ");
    assert_eq!(j1, j2, "{name}: the JSON reports differ");
    // Packing a packed trace changes nothing either.
    let again = dir.join("again.trace");
    assert!(pack(&packed, &again).status.success());
    assert_eq!(reports(&[&again]).1, j1);
    let _ = std::fs::remove_dir_all(&dir);
    j1
}

#[test]
fn a_packed_trace_reports_leaks_and_their_kinds_as_the_trace_it_came_from() {
    let j = same_report_packed("pk-simple", &fixture("simple.c"), &[], &[]);
    let p = &j["processes"][0];
    assert!(!p["leaks"].as_array().unwrap().is_empty(), "{p}");
    assert_eq!(p["reachability"]["scanned"], true, "{p}");
    assert!(p["reachability"]["definitely_lost"][1].as_u64().unwrap() > 0);
}

#[test]
fn a_packed_trace_keeps_epochs_snapshots_threads_and_elided_pairs() {
    let j = same_report_packed(
        "pk-stress",
        &fixture("stress.c"),
        &["100000", "4"],
        &[("LEAKHUNT_EPOCH_MS", "5"), ("LEAKHUNT_SNAPSHOT_MS", "20")],
    );
    let p = &j["processes"][0];
    assert!(p["timeline"]["epochs"].as_u64().unwrap() >= 3, "{p}");
    assert!(summary(p, "allocs") > 100_000);
    assert_eq!(summary(p, "events_lost"), 0);
}

#[test]
fn a_packed_trace_keeps_what_freed_blocks_held() {
    let j = same_report_packed(
        "pk-orphans",
        &fixture("orphan_member.c"),
        &[],
        &[("LEAKHUNT_ORPHANS", "1")],
    );
    let leaks = j["processes"][0]["leaks"].to_string();
    assert!(leaks.contains("req_free"), "the orphan site: {leaks}");
}

/// `leakhunt run -o` keeps packed traces, the fork child's too, and their report is the run's.
#[test]
fn run_keeps_packed_traces_that_report_as_the_run() {
    let dir = fresh("pk-run");
    let trace = dir.join("t.trace");
    let json = dir.join("run.json");
    let out = Command::new(leakhunt())
        .args(["run", "--json"])
        .arg(&json)
        .arg("-o")
        .arg(&trace)
        .arg("--")
        .arg(fixture("fork.c"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("t.trace")
        })
        .collect();
    kept.sort();
    assert_eq!(kept.len(), 2, "the program's and its child's: {kept:?}");
    assert!(kept.iter().all(|k| is_packed(k)));
    let mut run: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    run.as_object_mut().unwrap().remove("cli_peak_rss_bytes");
    let refs: Vec<&Path> = kept.iter().map(PathBuf::as_path).collect();
    let (_, rep) = reports(&refs);
    assert_eq!(run, rep);
    // The child's heap holds what it inherited: the fork point survived packing.
    let child = rep["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["exit"]["code"] == 7)
        .unwrap();
    assert_eq!(summary(child, "in_use_at_exit_bytes"), 222 + 111);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_trace_cut_short_is_packed_with_its_truncation() {
    let dir = fresh("pk-cut");
    let raw = preload_trace(&dir, &fixture("stress.c"), &["20000", "2"], &[]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::write(&raw, &data[..data.len() * 2 / 3]).unwrap();
    let packed = dir.join("packed.trace");
    let out = pack(&raw, &packed);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("trace truncated at byte offset"),
        "{}",
        text(&out)
    );
    let (t1, j1) = reports(&[&raw]);
    let (t2, j2) = reports(&[&packed]);
    assert!(t1.contains("trace truncated at byte offset"), "{t1}");
    assert_eq!((t1, j1), (t2, j2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `leakhunt report` of `bytes`: its exit status and its output, checked not to be a panic.
fn report_of(dir: &Path, bytes: &[u8]) -> (Option<i32>, String) {
    let t = dir.join("bad.trace");
    std::fs::write(&t, bytes).unwrap();
    let out = Command::new(leakhunt())
        .arg("report")
        .arg(&t)
        .output()
        .unwrap();
    let err = text(&out);
    assert!(!err.contains("panicked"), "{err}");
    (out.status.code(), err)
}

/// `leakhunt report` of `bytes`: it fails, saying `what`, and does not panic.
fn refused(dir: &Path, bytes: &[u8], what: &str) {
    let (code, err) = report_of(dir, bytes);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
}

#[test]
fn a_damaged_packed_trace_is_an_error_naming_the_damage() {
    let dir = fresh("pk-bad");
    let raw = preload_trace(&dir, &fixture("stress.c"), &["20000", "2"], &[]);
    let packed = dir.join("packed.trace");
    assert!(pack(&raw, &packed).status.success());
    let good = std::fs::read(&packed).unwrap();
    // Cut short: zstd's frame ends early.
    refused(
        &dir,
        &good[..good.len() / 2],
        "compressed stream is damaged or cut short",
    );
    refused(
        &dir,
        &good[..20],
        "compressed stream is damaged or cut short",
    );
    refused(&dir, &good[..12], "packed trace's 16-byte preamble");
    // A flipped bit anywhere in the compressed stream: zstd or a record checksum catches it.
    for at in [16, 40, good.len() / 3, good.len() / 2, good.len() - 5] {
        let mut d = good.clone();
        d[at] ^= 0x10;
        let (code, err) = report_of(&dir, &d);
        assert_eq!(code, Some(2), "byte {at}: {err}");
        assert!(
            err.contains("packed trace") || err.contains("corrupt trace"),
            "byte {at}: {err}"
        );
    }
    // Cut where zstd's second frame begins: each frame is whole, the trace is not.
    let big = preload_trace(&dir, &fixture("stress.c"), &["100000", "4"], &[]);
    assert!(pack(&big, &packed).status.success());
    let d = std::fs::read(&packed).unwrap();
    let magic = [0x28, 0xb5, 0x2f, 0xfd];
    let second = (17..d.len() - 4)
        .find(|&i| d[i..i + 4] == magic)
        .expect("a second zstd frame");
    refused(
        &dir,
        &d[..second],
        "the packed trace ends before its last record",
    );
    // A newer packing.
    let mut d = good.clone();
    d[8] = 2;
    refused(
        &dir,
        &d,
        "packed trace version 2 is not one this leakhunt reads",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
