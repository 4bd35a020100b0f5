//! The hostile-program matrix: programs that behave like daemons and servers (they take every
//! descriptor, reopen stderr onto a data file, make processes without fork handlers, run as a
//! shell) each run plain, under the preload alone and under `leakhunt run`. Their stdout, stderr
//! (leakhunt's own lines aside), exit status or signal and every file they wrote must be the same
//! byte for byte, and their leaks must still be reported exactly.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use leakhunt_tests::*;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    stdout: String,
    /// stderr without leakhunt's own lines (`leakhunt: ...` and the `==pid==` report).
    stderr: String,
    code: Option<i32>,
    signal: Option<i32>,
    /// Every file the program wrote in its directory: relative path and contents.
    files: BTreeMap<String, Vec<u8>>,
}

fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn without_leakhunt(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| {
            !l.starts_with("leakhunt: ")
                && !(l.starts_with("==")
                    && l[2..].split_once("==").is_some_and(|(pid, _)| {
                        !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
                    }))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn outcome(status: ExitStatus, stdout: &[u8], stderr: &[u8], dir: &Path) -> Outcome {
    Outcome {
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        stderr: without_leakhunt(stderr),
        code: status.code(),
        signal: status.signal(),
        files: files_in(dir),
    }
}

struct Case<'a> {
    name: &'a str,
    program: PathBuf,
    /// `{dir}` stands for the run's own directory.
    args: Vec<String>,
    run_opts: Vec<&'a str>,
}

/// A scratch directory, emptied.
fn fresh(name: &str) -> PathBuf {
    let d = workspace().join(format!(
        "target/test-scratch/hostile-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the case plain, under the preload alone and under `leakhunt run`; asserts the three
/// outcomes are the same; returns the reports of the preload's trace and of the run.
fn matrix(c: &Case) -> (Outcome, Value, Value) {
    let args = |dir: &Path| -> Vec<String> {
        c.args
            .iter()
            .map(|a| a.replace("{dir}", dir.to_str().unwrap()))
            .collect()
    };
    let base = |dir: &Path| {
        let mut cmd = Command::new(&c.program);
        cmd.args(args(dir))
            .current_dir(dir)
            .env_remove("LD_PRELOAD")
            .env_remove("LEAKHUNT_OUT");
        cmd
    };
    // Plain.
    let d0 = fresh(&format!("{}-plain", c.name));
    let o = base(&d0).output().unwrap();
    let plain = outcome(o.status, &o.stdout, &o.stderr, &d0);

    // The preload alone, its trace outside the program's directory.
    let d1 = fresh(&format!("{}-preload", c.name));
    let traces = fresh(&format!("{}-traces", c.name));
    let trace = traces.join("t.trace");
    let o = base(&d1)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .output()
        .unwrap();
    let pre = outcome(o.status, &o.stdout, &o.stderr, &d1);
    assert_eq!(pre, plain, "{}: under the preload alone", c.name);
    let (rep_out, pre_report) = report(&[&trace]);
    assert!(
        rep_out.status.success(),
        "{}: {}",
        c.name,
        String::from_utf8_lossy(&rep_out.stderr)
    );

    // leakhunt run.
    let d2 = fresh(&format!("{}-run", c.name));
    let json = traces.join("run.json");
    let o = Command::new(leakhunt())
        .arg("run")
        .args(&c.run_opts)
        .arg("--json")
        .arg(&json)
        .arg("--")
        .arg(&c.program)
        .args(args(&d2))
        .current_dir(&d2)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let run = outcome(o.status, &o.stdout, &o.stderr, &d2);
    assert_eq!(run, plain, "{}: under leakhunt run", c.name);
    let run_report: Value = serde_json::from_str(
        &std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{}: no report ({e})", c.name)),
    )
    .unwrap();
    for d in [d0, d1, d2, traces] {
        let _ = std::fs::remove_dir_all(d);
    }
    (plain, pre_report, run_report)
}

/// The process's leaks are exactly `want` (file, marker, bytes, blocks), and its recording is
/// complete.
fn exactly(p: &Value, want: &[(&str, &str, u64, u64)], what: &str) {
    for (file, marker, bytes, blocks) in want {
        expect_leak(p, file, marker, *bytes, *blocks);
    }
    assert_eq!(leaks(p).len(), want.len(), "{what}: {:#?}", leaks(p));
    assert_eq!(summary(p, "events_lost"), 0, "{what}");
    assert!(
        p["summary"].get("recording_incomplete").is_none(),
        "{what}: {}",
        p["summary"]
    );
}

#[test]
fn daemons_that_take_every_descriptor_keep_their_files_and_their_leaks_are_reported() {
    let exe = fixture("daemon_fds.c");
    for how in ["closeall", "closerange", "lowlimit", "std"] {
        let c = Case {
            name: how,
            program: exe.clone(),
            args: vec!["{dir}".into(), how.into()],
            run_opts: vec![],
        };
        let (plain, pre, run) = matrix(&c);
        let n_files = if how == "std" { 3 } else { 600 };
        assert_eq!(plain.files.len(), n_files, "{how}");
        assert_eq!(plain.code, Some(0), "{how}: {}", plain.stderr);
        for (what, r) in [("preload", &pre), ("run", &run)] {
            let p = &r["processes"][0];
            exactly(
                p,
                &[("daemon_fds.c", "DF_LEAK", 200 * 24, 200)],
                &format!("{how} {what}"),
            );
            // Closed with the rest (numbers above the lowered limit are left alone, and 0-2 are
            // never leakhunt's): re-opened or re-connected.
            if how.starts_with("close") {
                assert!(
                    p["captures"]["output_retaken"].as_u64().unwrap() >= 1,
                    "{how} {what}: the descriptor was taken and re-made: {}",
                    p["captures"]
                );
            }
        }
    }
}

#[test]
fn children_made_without_fork_handlers_are_never_traced_as_their_parent() {
    let exe = fixture("clones.c");
    for how in ["clone", "_Fork", "vfork"] {
        let c = Case {
            name: how,
            program: exe.clone(),
            args: vec![how.into()],
            run_opts: vec![],
        };
        let (plain, pre, run) = matrix(&c);
        let child = if how == "vfork" { 127 } else { 5 };
        assert_eq!(
            plain.stdout,
            format!("child exited {child}\nparent done\n"),
            "{how}"
        );
        for (what, r) in [("preload", &pre), ("run", &run)] {
            assert_eq!(r["processes"].as_array().unwrap().len(), 1, "{how} {what}");
            let p = &r["processes"][0];
            assert_eq!(p["exit"], serde_json::json!({"code": 0}), "{how} {what}");
            let l = leaks(p);
            assert_eq!(l.len(), 2, "{how} {what}: {l:#?}");
            assert!(
                l.iter().all(|l| (l.bytes, l.blocks) == (50 * 32, 50)
                    && l.frames[0].0 == "parent_leak"),
                "{how} {what}: {l:#?}"
            );
        }
        // Traced as children, the clones are processes of their own.
        if how != "vfork" {
            let r = leakhunt_tests::run(&exe, &[how], &["--trace-children"]);
            let ps = r.processes();
            assert_eq!(ps.len(), 2, "{how}: {:#}", r.json);
            assert_eq!(ps[1]["ppid"], ps[0]["pid"]);
            assert_eq!(ps[1]["exit"], serde_json::json!({"code": 5}));
            expect_leak(&ps[1], "clones.c", "CL_CHILD", 7 * 48, 7);
            assert_eq!(leaks(&ps[0]).len(), 2);
        }
    }
}

#[test]
fn a_vfork_child_that_fails_to_exec_leaves_the_parents_control_socket() {
    let exe = fixture("clones.c");
    let dir = fresh("vforkwait");
    let trace = dir.join("t.trace");
    let mut child = Command::new(&exe)
        .args(["vforkwait", dir.to_str().unwrap()])
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = dir.join("pid");
    for _ in 0..1000 {
        if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let snap = Command::new(leakhunt())
        .args(["snapshot", pid.trim(), "--name", "after-vfork"])
        .output()
        .unwrap();
    assert!(
        snap.status.success(),
        "the parent is still traced after its vfork child's _exit: {}",
        String::from_utf8_lossy(&snap.stderr)
    );
    // The writer thread takes the request within its next flush.
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(dir.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "child exited 127\nparent done\n"
    );
    let (_, r) = report(&[&trace]);
    let p = &r["processes"][0];
    assert_eq!(
        p["exit"],
        serde_json::json!({"code": 0}),
        "not the child's 127"
    );
    let dump = Command::new(leakhunt())
        .arg("dump")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("name: \"after-vfork\""));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shell_passes_on_neither_the_preload_nor_leakhunts_variables() {
    // bash exports its own setenv/unsetenv and keeps its own copy of the environment: what it
    // passes to its children is what leakhunt left in the array before main.
    let script = "env | grep -c -E '^(LD_PRELOAD|LEAKHUNT_)' ; \
        sh -c 'echo child sees [$LD_PRELOAD]'; \
        (sleep 0.5; echo late child; sh -c 'echo grandchild' >&2) & \
        echo bash done";
    let c = Case {
        name: "bash",
        program: PathBuf::from("/bin/bash"),
        args: vec!["-c".into(), script.into()],
        run_opts: vec![],
    };
    let (plain, pre, run) = matrix(&c);
    assert_eq!(plain.stdout, "0\nchild sees []\nbash done\nlate child\n");
    assert_eq!(plain.stderr, "grandchild\n");
    for r in [&pre, &run] {
        let ps = r["processes"].as_array().unwrap();
        assert_eq!(ps.len(), 1, "children untraced: {r:#}");
        assert_eq!(ps[0]["argv"][0], "/bin/bash");
    }
}
