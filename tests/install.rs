//! `scripts/install PREFIX`: the binary in PREFIX/bin, the preload library in
//! PREFIX/lib/leakhunt, and an installed `leakhunt run` that finds the library there and reports
//! the exact leak of a fixture; the preload alone from there finds `leakhunt` for its heap scan.
//! Known figures from `tests/fixtures/profiled.c`: 3 rounds leak 3 blocks of 48 bytes at
//! `leak_node` (the last one still held by a global).

use std::path::{Path, PathBuf};
use std::process::Command;

use leakhunt_tests::*;

/// Installs what `bin_dir()` holds (no build: this runs inside `cargo test`) under a fresh
/// prefix.
fn install(name: &str) -> PathBuf {
    let prefix = scratch(name);
    let _ = std::fs::remove_dir_all(&prefix);
    let out = run_ok(
        Command::new(workspace().join("scripts/install"))
            .arg("--no-build")
            .arg(&prefix)
            .env("LEAKHUNT_BIN_DIR", bin_dir()),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("leakhunt installed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    prefix
}

fn installed_run(leakhunt: &Path, json: &Path, program: &Path) -> std::process::Output {
    Command::new(leakhunt)
        .env_remove("LEAKHUNT_PRELOAD")
        .env_remove("LEAKHUNT_CLI")
        .arg("run")
        .arg("--json")
        .arg(json)
        .arg("--")
        .arg(program)
        .arg("3")
        .output()
        .unwrap()
}

#[test]
fn an_installed_leakhunt_finds_its_preload_library_and_reports_the_exact_leak() {
    let prefix = install("prefix");
    let bin = prefix.join("bin/leakhunt");
    let lib = prefix.join("lib/leakhunt/libleakhunt.so");
    assert!(bin.is_file() && lib.is_file());
    assert_eq!(
        std::fs::read_link(prefix.join("lib/leakhunt/leakhunt")).unwrap(),
        Path::new("../../bin/leakhunt")
    );
    assert!(prefix.join("share/man/man1/leakhunt-run.1").is_file());

    // `leakhunt run` from the prefix: the library found in ../lib/leakhunt/.
    let exe = fixture("profiled.c");
    let json = prefix.join("report.json");
    let out = installed_run(&bin, &json, &exe);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let p = &v["processes"][0];
    expect_leak(p, "profiled.c", "leak", 144, 3);
    assert_eq!(
        p["reachability"]["definitely_lost"],
        serde_json::json!([96, 2])
    );

    // The preload alone from the prefix: its heap scan at exit starts `leakhunt` found next to
    // the library (the link), so the trace has memcheck's kinds.
    let dir = prefix.join("alone");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(&exe)
        .arg("3")
        .current_dir(&dir)
        .env("LD_PRELOAD", &lib)
        .env_remove("LEAKHUNT_CLI")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "trace"))
        .expect("the preload alone writes leakhunt.PID.trace");
    let out = Command::new(&bin)
        .args(["report", "--json", "-"])
        .arg(&trace)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let p = &v["processes"][0];
    assert_eq!(p["reachability"]["scanned"], true, "{}", p["reachability"]);
    assert_eq!(
        p["reachability"]["definitely_lost"],
        serde_json::json!([96, 2])
    );
    expect_leak(p, "profiled.c", "leak", 144, 3);
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn a_leakhunt_without_its_library_says_where_it_looked() {
    let prefix = scratch("lonely");
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    let bin = prefix.join("bin/leakhunt");
    std::fs::copy(leakhunt(), &bin).unwrap();
    let exe = fixture("profiled.c");
    let out = installed_run(&bin, &prefix.join("r.json"), &exe);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    let bin_dir = prefix.join("bin");
    assert!(
        err.contains(&format!(
            "cannot find libleakhunt.so beside {}: looked for {}/libleakhunt.so and {}/../lib/leakhunt/libleakhunt.so",
            bin.display(),
            bin_dir.display(),
            bin_dir.display()
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&prefix);
}
