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
            let report_line = l.starts_with("==")
                && l[2..].split_once("==").is_some_and(|(pid, _)| {
                    !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
                });
            !l.starts_with("leakhunt: ") && !report_line
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
    /// The environment of the run under the preload alone (`run_opts`' counterpart).
    preload_env: Vec<(&'a str, &'a str)>,
    /// A file the program's last process writes when it is done (a daemon outlives the
    /// program): the outcome is taken once it exists.
    settle: Option<&'a str>,
}

fn settle(c: &Case, dir: &Path) {
    if let Some(f) = c.settle {
        for _ in 0..1000 {
            // Written, not only created (the fixture opens it, then writes).
            if std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() > 0) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{}: {f} never appeared in {}", c.name, dir.display());
    }
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
    settle(c, &d0);
    let plain = outcome(o.status, &o.stdout, &o.stderr, &d0);

    // The preload alone, its trace outside the program's directory; its heap scan's helper
    // starts as soon as the trace passes 1 KiB and the writer thread writes (with the program
    // all the while, where it runs that long).
    let d1 = fresh(&format!("{}-preload", c.name));
    let traces = fresh(&format!("{}-traces", c.name));
    let trace = traces.join("t.trace");
    let o = base(&d1)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_HELPER_EARLY_KB", "1")
        .envs(c.preload_env.iter().copied())
        .output()
        .unwrap();
    settle(c, &d1);
    // The last process's trace is complete once the file it writes last is there and it exited.
    std::thread::sleep(std::time::Duration::from_millis(if c.settle.is_some() {
        300
    } else {
        0
    }));
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
    settle(c, &d2);
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
    // The whole process on failure: which run, what it says of itself.
    let context = || {
        let mut q = p.clone();
        if let Some(o) = q.as_object_mut() {
            o.remove("growth");
            o.remove("timeline");
        }
        format!("{what}: {q:#}")
    };
    assert!(
        leaks(p).len() >= want.len(),
        "fewer records than expected: {}",
        context()
    );
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

/// A program that closes 0 and counts on its next open() getting 0, again and again for 3 s,
/// while leakhunt ends an epoch every 10 ms (reading its resident size) and sets up its snapshot
/// mailbox: leakhunt's own files are never opened in the program's descriptor table.
#[test]
fn the_lowest_free_descriptor_stays_the_programs() {
    let c = Case {
        name: "lowest",
        program: fixture("daemon_fds.c"),
        args: vec!["{dir}".into(), "lowest".into()],
        run_opts: vec!["--epoch", "10ms"],
        preload_env: vec![("LEAKHUNT_EPOCH_MS", "10")],
        settle: None,
    };
    let (plain, pre, run) = matrix(&c);
    assert_eq!(plain.code, Some(0), "{}", plain.stderr);
    for (what, r) in [("preload", &pre), ("run", &run)] {
        let p = &r["processes"][0];
        exactly(p, &[("daemon_fds.c", "DF_LEAK", 200 * 24, 200)], what);
        // Every epoch read the resident size (not 0: it was read, through leakhunt's own table).
        let t = &p["timeline"];
        assert!(t["epochs"].as_u64().unwrap() >= 100, "{what}: {t}");
        let rss = t["rss_bytes"].as_array().unwrap();
        assert!(rss.iter().all(|v| v.as_u64().unwrap() > 0), "{what}: {t}");
    }
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
            preload_env: vec![],
            settle: None,
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
            preload_env: vec![],
            settle: None,
        };
        let (plain, pre, run) = matrix(&c);
        let child = if how == "vfork" { 127 } else { 5 };
        assert_eq!(
            plain.stdout,
            format!("child exited {child}\nparent done\n"),
            "{how}"
        );
        for (what, r) in [("preload", &pre), ("run", &run)] {
            // The preload's trace is the parent's alone (a child writes a file of its own);
            // `run` follows a clone as it follows forks, as a process of its own, never a vfork
            // child (it shares the parent's memory).
            let n = r["processes"].as_array().unwrap().len();
            let want = if what == "run" && how != "vfork" {
                2
            } else {
                1
            };
            assert_eq!(n, want, "{how} {what}: {r:#}");
            if n == 2 {
                let ch = &r["processes"][1];
                assert_eq!(ch["ppid"], r["processes"][0]["pid"], "{how}");
                assert_eq!(ch["exit"], serde_json::json!({"code": 5}), "{how}");
                expect_leak(ch, "clones.c", "CL_CHILD", 7 * 48, 7);
                assert_eq!(leaks(ch).len(), 1, "{how}: only its own blocks: {ch:#}");
                assert!(
                    ch["warnings"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|w| w.as_str().unwrap().contains("without fork handlers")),
                    "{how}: {ch:#}"
                );
            }
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
fn a_daemon_that_detaches_is_traced_to_its_end_with_trace_children() {
    let exe = fixture("daemonize.c");
    let c = Case {
        name: "daemonize",
        program: exe.clone(),
        args: vec!["{dir}".into()],
        run_opts: vec!["--trace-children"],
        preload_env: vec![],
        settle: Some("done"),
    };
    let (plain, _, run) = matrix(&c);
    assert_eq!(plain.stdout, "started\n");
    assert_eq!(
        plain.files.keys().collect::<Vec<_>>(),
        ["daemon.pid", "done"]
    );
    // leakhunt run waited for the daemon, reparented away from the program, and took its
    // stream: the program, the first child and the daemon.
    let ps = run["processes"].as_array().unwrap();
    assert_eq!(ps.len(), 3, "{run:#}");
    assert!(
        ps[0]
            .get("warnings")
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing refused: {}",
        ps[0]["warnings"]
    );
    let daemon = ps
        .iter()
        .find(|p| !leaks(p).is_empty() && leaks(p)[0].bytes == 5 * 64)
        .unwrap_or_else(|| panic!("{run:#}"));
    expect_leak(daemon, "daemonize.c", "DZ_LEAK", 5 * 64, 5);
    assert_eq!(daemon["exit"], serde_json::json!({"code": 0}));
}

#[test]
fn a_vfork_child_that_fails_to_exec_leaves_the_parents_control_socket() {
    let exe = fixture("clones.c");
    let dir = fresh("vforkwait");
    let trace = dir.join("t.trace");
    let child = Command::new(&exe)
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
    // passes to its children is what leakhunt left in the array before main. Under `leakhunt
    // run` (no --trace-children) and under the preload alone with LEAKHUNT_TRACE_CHILDREN=0,
    // that is nothing of leakhunt's, also not the variable that asked for it.
    let script = "env | grep -c -E '^(LD_PRELOAD|LEAKHUNT_)' ; \
        sh -c 'echo child sees [$LD_PRELOAD]'; \
        (sleep 0.5; echo late child; sh -c 'echo grandchild' >&2) & \
        echo bash done";
    let c = Case {
        name: "bash",
        program: PathBuf::from("/bin/bash"),
        args: vec!["-c".into(), script.into()],
        run_opts: vec![],
        preload_env: vec![("LEAKHUNT_TRACE_CHILDREN", "0")],
        settle: None,
    };
    let (plain, pre, run) = matrix(&c);
    assert_eq!(plain.stdout, "0\nchild sees []\nbash done\nlate child\n");
    assert_eq!(plain.stderr, "grandchild\n");
    // The programs bash execs are not traced (no --trace-children); the shells it forks are
    // followed (as memcheck follows them), those that exec'd right away leave no report.
    for r in [&pre, &run] {
        let ps = r["processes"].as_array().unwrap();
        assert!(!ps.is_empty());
        assert_eq!(ps[0]["argv"][0], "/bin/bash");
        for p in ps {
            assert_eq!(p["exe"], ps[0]["exe"], "only bash: {r:#}");
        }
    }
}

/// The preload alone is inherited as every LD_PRELOAD library is: `LD_PRELOAD=libleakhunt.so
/// timeout 60 ./prog` traces prog too. The programs started see the environment the user set
/// (nothing added), and each writes its own trace: with a fixed LEAKHUNT_OUT, the first process
/// writes it and each other `<name>.<pid>`, without a word on the program's stderr.
#[test]
fn the_preload_alone_is_inherited_by_the_programs_it_starts() {
    let exe = fixture("simple.c");
    let dir = fresh("inherit");
    let trace = dir.join("t.trace");
    let out = Command::new("timeout")
        .args(["60", "/bin/sh", "-c"])
        .arg(format!(
            "env | grep -E '^(LD_PRELOAD|LEAKHUNT_)' | sort; {}",
            exe.display()
        ))
        .current_dir(&dir)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env_remove("LEAKHUNT_TRACE_CHILDREN")
        .output()
        .unwrap();
    let plain = plain(&exe, &[]);
    assert_eq!(out.status.code(), plain.status.code());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "LD_PRELOAD={}\nLEAKHUNT_OUT={}\n{}",
            preload().display(),
            trace.display(),
            String::from_utf8_lossy(&plain.stdout)
        )
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // timeout writes t.trace; its child sh (forked, then exec'd) and simple (exec'd by sh,
    // or forked first) write t.trace.<pid>.
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("t.trace")
        })
        .collect();
    traces.sort();
    assert_eq!(traces[0], trace);
    assert!(traces.len() >= 2, "{traces:?}");
    let refs: Vec<&Path> = traces.iter().map(|p| p.as_path()).collect();
    let (rep, json) = report(&refs);
    assert!(
        rep.status.success(),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    let ps = json["processes"].as_array().unwrap();
    let argv0 = |p: &Value| p["argv"][0].as_str().unwrap_or("").to_string();
    assert!(ps.iter().any(|p| argv0(p) == "timeout"), "{json:#}");
    let prog = ps
        .iter()
        .find(|p| argv0(p) == exe.to_str().unwrap())
        .unwrap_or_else(|| panic!("the program timeout started is traced: {json:#}"));
    // simple.c's leak, found in the grandchild's own trace.
    expect_leak(prog, "simple.c", "SIMPLE_A", 300, 3);
    expect_leak(prog, "simple.c", "SIMPLE_B", 40, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The heap scan at exit, with the preload alone, starts a helper process: the program never
/// sees it (no SIGCHLD for its handler, nothing for its `waitpid(-1)`, no output), and its trace
/// has the same kinds as `leakhunt run` gives.
#[test]
fn the_scan_at_exit_without_the_cli_is_invisible_to_the_program() {
    let c = Case {
        name: "sigchld",
        program: fixture("sigchld_exit.c"),
        args: vec![],
        run_opts: vec![],
        preload_env: vec![],
        settle: None,
    };
    let (plain, pre, run) = matrix(&c);
    assert_eq!(plain.stdout, "main done\n");
    for (what, r) in [("preload", &pre), ("run", &run)] {
        let p = &r["processes"][0];
        let kinds: Vec<(String, u64)> = records(p)
            .into_iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.1 == "sigchld_exit.c"))
            .map(|l| (l.kind, l.bytes))
            .collect();
        assert!(
            kinds.contains(&("definitely_lost".into(), 40)),
            "{what}: {kinds:?}"
        );
        assert!(
            kinds.contains(&("still_reachable".into(), 24)),
            "{what}: {kinds:?}"
        );
        assert_eq!(kinds.len(), 2, "{what}: {kinds:?}");
    }
}

/// The heap scan's helper started early (the preload alone) ends with its program, however the
/// program ends: killed, it leaves nothing running.
#[test]
fn the_helper_started_early_ends_when_its_program_is_killed() {
    let exe = fixture("snapscan.c");
    let dir = fresh("early-killed");
    let mut child = Command::new(&exe)
        .arg(&dir)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", dir.join("t.trace"))
        .env("LEAKHUNT_HELPER_EARLY_KB", "1")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(|| early_helper_of(child.id()).is_some()));
    let helper = early_helper_of(child.id()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // Gone, or a zombie its new parent has yet to reap.
    let running = || {
        std::fs::read_to_string(format!("/proc/{helper}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    };
    assert!(wait_for(|| !running()), "the helper outlived its program");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_recording_that_fails_says_so_and_fails_the_exit_code() {
    // The program takes every descriptor there is: leakhunt's is closed and no new one can be
    // made. The program must run on as it would; the report must not claim success.
    let exe = fixture("daemon_fds.c");
    let dir = fresh("exhaust");
    let r = leakhunt_tests::run(
        &exe,
        &[dir.to_str().unwrap(), "exhaust"],
        &["--error-exitcode", "9"],
    );
    assert_eq!(r.stdout(), "exhaust done\n");
    let p = r.main();
    let err = r.stderr();
    match p["summary"].get("recording_incomplete") {
        Some(why) => {
            assert_eq!(r.out.status.code(), Some(9), "{err}");
            assert!(
                why.as_str()
                    .unwrap()
                    .starts_with("recording stopped before the process exited"),
                "{why}"
            );
            // How many were lost is known when the process could say so at its end.
            assert!(
                err.contains("EVENTS LOST: unknown: recording stopped")
                    || (err.contains("EVENTS LOST: ")
                        && err.contains(" (recording stopped before the process exited")),
                "{err}"
            );
            assert!(!err.contains("no leaks are possible"), "{err}");
            assert_eq!(
                err.matches("too many open files in the process (EMFILE)")
                    .count(),
                1,
                "told once: {err}"
            );
        }
        // leakhunt got a descriptor back before the program took them all: then the leak is
        // there, exactly.
        None => {
            expect_leak(p, "daemon_fds.c", "DF_LEAK", 200 * 24, 200);
            assert_eq!(r.out.status.code(), Some(9));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn messages_never_reach_a_stderr_the_program_reopened() {
    // The program's fd 2 is its data file by the time the trace outgrows the file-size limit:
    // leakhunt's words about it must not land there.
    let exe = fixture("daemon_fds.c");
    let dir = fresh("stdlimit");
    let trace = dir.join("t.trace");
    let data = dir.join("files");
    std::fs::create_dir_all(&data).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 48; exec env LD_PRELOAD=\"$1\" \"$0\" \"$2\" std")
        .arg(&exe)
        .arg(preload())
        .arg(&data)
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_ELIDE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let written = std::fs::read_to_string(data.join("data")).unwrap();
    assert!(!written.contains("leakhunt"), "{written}");
    assert_eq!(written.lines().count(), 200);
    let (_, r) = report(&[&trace]);
    let why = r["processes"][0]["summary"]["recording_incomplete"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", r["processes"][0]["summary"]))
        .to_string();
    assert!(
        why.contains("ends without the process's end") || why.contains("cut short"),
        "{why}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_retitled_worker_is_named_by_its_title_and_empty_arguments_stay() {
    let exe = fixture("retitle.c");
    let args = ["a", "", "b c"];
    let want = plain(&exe, &args);
    let r = leakhunt_tests::run(&exe, &args, &["--trace-children"]);
    assert_eq!(r.out.stdout, want.stdout);
    assert_eq!(r.stdout(), "[a][][b c]\nworker exited 0\n");
    let ps = r.processes();
    assert_eq!(ps.len(), 2);
    let argv = serde_json::json!([exe.to_str().unwrap(), "a", "", "b c"]);
    assert_eq!(ps[0]["argv"], argv);
    assert!(ps[0].get("title").is_none(), "{}", ps[0]);
    assert_eq!(ps[1]["argv"], argv, "a child starts with its parent's argv");
    assert_eq!(
        ps[1]["title"],
        serde_json::json!(["retitle: worker process"])
    );
    expect_leak(&ps[1], "retitle.c", "RT_WORKER", 120, 3);
    expect_leak(&ps[0], "retitle.c", "RT_MASTER", 8, 1);
    assert!(
        r.stderr().contains("retitle: worker process"),
        "the text report names the worker: {}",
        r.stderr()
    );
}

/// Spawns `leakhunt run` with its private directory under `tmp`; returns the child and the
/// path of its trace socket once it exists.
#[allow(clippy::zombie_processes)] // the caller waits for it
fn run_in(tmp: &Path, args: &[&str]) -> (std::process::Child, PathBuf) {
    let child = Command::new(leakhunt())
        .arg("run")
        .args(args)
        .env("TMPDIR", tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        let sock = std::fs::read_dir(tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("trace.sock"))
            .find(|p| p.exists());
        if let Some(s) = sock {
            return (child, s);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("leakhunt run made no socket in {}", tmp.display());
}

/// The program `leakhunt run` (pid `cli`) started.
fn program_of(cli: u32) -> u32 {
    for _ in 0..500 {
        let kids =
            std::fs::read_to_string(format!("/proc/{cli}/task/{cli}/children")).unwrap_or_default();
        if let Some(k) = kids.split_whitespace().next() {
            return k.parse().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no program under leakhunt {cli}");
}

#[test]
fn a_connection_from_a_process_run_did_not_start_is_refused() {
    use std::io::Write;
    let tmp = fresh("rogue");
    let started = std::time::Instant::now();
    let json = tmp.join("r.json");
    let (child, sock) = run_in(
        &tmp,
        &["--json", json.to_str().unwrap(), "--", "sleep", "1.5"],
    );
    let program = program_of(child.id());
    // The run's token, as any process of the same user can read it from the program's
    // environment: with it, a process that is not the program's is still refused.
    // (Read once the program has been exec'd: before, its environment is leakhunt's own.)
    let token_hex = (0..500)
        .find_map(|_| {
            let environ = std::fs::read(format!("/proc/{program}/environ")).unwrap_or_default();
            let t = environ
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"LEAKHUNT_TOKEN="))
                .map(<[u8]>::to_vec);
            if t.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            t
        })
        .expect("the program's initial environment holds the token");
    let mut token = [0u8; 16];
    for (i, t) in token.iter_mut().enumerate() {
        *t = u8::from_str_radix(
            std::str::from_utf8(&token_hex[2 * i..2 * i + 2]).unwrap(),
            16,
        )
        .unwrap();
    }
    let golden = std::fs::read(workspace().join("format/golden/simple.trace")).unwrap();
    for tok in [[0u8; 16], token] {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let hello = leakhunt_format::hello::encode(&leakhunt_format::hello::Hello {
            kind: leakhunt_format::hello::NEW,
            token: tok,
            pid: std::process::id(),
            start_ns: 1,
            offset: 0,
        });
        let _ = c.write_all(&hello);
        let _ = c.write_all(&golden);
    }
    // And one that connects and says nothing, held open for as long as this test lives.
    let _silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(6),
        "a connection held open does not hold the run: {took:?}"
    );
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let me = std::process::id();
    assert_eq!(
        err.matches(&format!(
            "leakhunt: warning: refused a trace connection from pid {me}"
        ))
        .count(),
        3,
        "{err}"
    );
    assert!(err.contains("it does not hold this run's token"), "{err}");
    assert!(err.contains("it was not started by this run"), "{err}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ps = r["processes"].as_array().unwrap();
    assert_eq!(ps.len(), 1, "nothing added to the report: {r:#}");
    assert_eq!(ps[0]["pid"], program);
    let w = ps[0]["warnings"].as_array().unwrap();
    assert_eq!(
        w.iter()
            .filter(|w| w
                .as_str()
                .unwrap()
                .starts_with("refused a trace connection"))
            .count(),
        3,
        "{w:?}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn an_interrupted_report_keeps_the_trace_and_stops() {
    use std::os::unix::process::ExitStatusExt;
    let exe = fixture("simple.c");
    let dir = fresh("interrupt");
    let trace = dir.join("t.trace");
    // Once: the analysis stops at its next step (the test hook holds each step for a while)
    // and prints what is ready. Twice: leakhunt ends at once.
    for (sig, twice, delay) in [
        (libc_sig::INT, false, "1500"),
        (libc_sig::TERM, false, "1500"),
        (libc_sig::TERM, true, "30000"),
    ] {
        let _ = std::fs::remove_file(&trace);
        let child = Command::new(leakhunt())
            .args(["run", "-o"])
            .arg(&trace)
            .arg("--")
            .arg(&exe)
            .env("LEAKHUNT_TEST_REPORT_DELAY_MS", delay)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The program is quick; then the (slowed) analysis runs.
        for _ in 0..500 {
            if trace.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(trace.exists(), "the trace is in place before the analysis");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        let kill = |s: i32| {
            Command::new("kill")
                .arg(format!("-{s}"))
                .arg(child.id().to_string())
                .status()
                .unwrap()
        };
        kill(sig);
        if twice {
            std::thread::sleep(std::time::Duration::from_millis(50));
            kill(sig);
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "stopped at once: {:?}",
            t0.elapsed()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("leakhunt: interrupted"), "{err}");
        if twice {
            assert!(err.contains("leakhunt: stopped"), "{err}");
            assert_eq!(out.status.code(), Some(128 + sig), "{:?}", out.status);
        } else {
            assert!(err.contains("the report was interrupted"), "{err}");
            assert!(
                err.contains(&format!("leakhunt report {}", trace.display())),
                "{err}"
            );
            assert_eq!(out.status.signal(), Some(sig), "{:?}", out.status);
        }
        // The kept trace is whole.
        let (rep, r) = report(&[&trace]);
        assert!(rep.status.success());
        assert_eq!(r["processes"][0]["exit"], serde_json::json!({"code": 0}));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

mod libc_sig {
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}

/// Plants a symbolic link at `at` pointing to `to`, owned by uid 65534 (another user).
fn plant(at: &Path, to: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(to, at).unwrap();
    let ok = Command::new("chown")
        .args(["-h", "65534:65534"])
        .arg(at)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn planted_links_at_every_name_leakhunt_creates_are_never_written_through() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    }) {
        eprintln!("skipped: planting links as another user needs root (CI runs as root)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let exe = fixture("simple.c");
    let base = fresh("links");
    // A shared directory anyone can write to (no sticky bit: the kernel's protected_symlinks
    // does not help here), and a file of ours outside it.
    let shared = base.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = base.join("precious");
    std::fs::write(&victim, "precious\n").unwrap();
    let names = ["t.trace", "r.json", "r.html", "p.trace"];
    for n in names {
        plant(&shared.join(n), &victim);
    }
    // The partial trace's names hold the CLI's pid: plant them for the pids that come next.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pid in last + 1..last + 40 {
        for n in [0, 1] {
            plant(&shared.join(format!("t.trace.partial-{pid}-{n}")), &victim);
        }
    }
    let out = Command::new(leakhunt())
        .arg("run")
        .arg("-o")
        .arg(shared.join("t.trace"))
        .arg("--json")
        .arg(shared.join("r.json"))
        .arg("--html")
        .arg(shared.join("r.html"))
        .arg("--")
        .arg(&exe)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused to write the report: {err}"
    );
    assert!(
        err.contains("is a symbolic link that belongs to uid 65534, not to you"),
        "{err}"
    );
    // The kept trace replaced the link with a file of ours, readable by us alone.
    let t = shared.join("t.trace");
    let m = std::fs::symlink_metadata(&t).unwrap();
    assert!(m.is_file(), "{m:?}");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let (rep, _) = report(&[&t]);
    assert!(rep.status.success());

    // The preload alone: LEAKHUNT_OUT names a planted link.
    let out = Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", shared.join("p.trace"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), plain(&exe, &[]).status.code());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.trace exists: the trace goes to ") && err.contains("p.trace.2"),
        "{err}"
    );
    let p2 = std::fs::symlink_metadata(shared.join("p.trace.2")).unwrap();
    assert!(p2.is_file() && p2.permissions().mode() & 0o777 == 0o600);

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn snapshot_refuses_a_socket_directory_someone_else_made() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    }) {
        eprintln!("skipped: acting as two users needs root (CI runs as root)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // User 65534 runs a process; another user (root here) made /tmp/leakhunt-65534 first and
    // put a mailbox named after that process in it. A snapshot request must not go there.
    let as_nobody = |cmd: &mut Command| {
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    };
    let mut sleeper = Command::new("setpriv");
    as_nobody(&mut sleeper);
    let mut sleeper = sleeper.args(["sleep", "5"]).spawn().unwrap();
    let pid = sleeper.id();
    let dir = Path::new("/tmp/leakhunt-65534");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let trap = dir.join(format!("{pid}.ctl"));
    let mut planted = vec![0u8; 4096];
    planted[..4].copy_from_slice(b"LKCT");
    std::fs::write(&trap, &planted).unwrap();
    std::fs::set_permissions(&trap, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Wait until setpriv has become the sleeper (its pid then belongs to uid 65534).
    for _ in 0..200 {
        if std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.contains("65534"))
        }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut snap = Command::new("setpriv");
    as_nobody(&mut snap);
    let out = snap
        .arg(leakhunt())
        .args(["snapshot", &pid.to_string(), "--name", "x"])
        .output()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing /tmp/leakhunt-65534: it is not a directory of yours that only you can enter (owner uid 0, mode 777)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&trap).unwrap(),
        planted,
        "nothing was written into the planted mailbox"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_program_leakhunt_cannot_trace_is_run_unchanged_and_the_reason_named() {
    let src = fixtures_src().join("simple.c");
    let dir = fresh("static");
    let exe = dir.join("simple-static");
    let built = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(built.success(), "gcc -static (libc6-dev has libc.a)");
    let want = plain(&exe, &[]);
    let out = Command::new(leakhunt())
        .args(["run", "--"])
        .arg(&exe)
        .output()
        .unwrap();
    assert_eq!(out.stdout, want.stdout);
    assert_eq!(out.status.code(), want.status.code());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "sent no trace: {} is statically linked: no dynamic loader runs to load leakhunt's library",
            exe.display()
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_program_sees_one_descriptor_of_leakhunts_high_and_close_on_exec() {
    let ls = Path::new("/bin/ls");
    let fds = |out: &std::process::Output| -> Vec<u32> {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect()
    };
    let want = fds(&plain(ls, &["/proc/self/fd"]));
    // (With the scan's helper started early, its socket pair: two more, made with the trace.)
    for (preload_alone, early, ours) in [(true, false, 1), (true, true, 3), (false, false, 1)] {
        let dir = fresh("fds");
        let out = if preload_alone {
            Command::new(ls)
                .arg("/proc/self/fd")
                .env("LD_PRELOAD", preload())
                .env("LEAKHUNT_OUT", dir.join("t.trace"))
                .env("LEAKHUNT_HELPER_EARLY_KB", if early { "1" } else { "0" })
                .output()
                .unwrap()
        } else {
            Command::new(leakhunt())
                .args(["run", "-q", "--", "/bin/ls", "/proc/self/fd"])
                .output()
                .unwrap()
        };
        let got = fds(&out);
        let extra: Vec<u32> = got.iter().filter(|f| !want.contains(f)).copied().collect();
        assert_eq!(extra.len(), ours, "{want:?} -> {got:?}");
        assert!(extra.iter().all(|&f| f >= 64), "out of the way: {extra:?}");
        assert!(want.iter().all(|f| got.contains(f)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A program that writes junk into leakhunt's own descriptor: the CLI finds the stream corrupt
/// and reads no more of it. The program must still run to its end (it used to block for good
/// once the unread socket filled), the tracer says that recording stopped, and the report says
/// where the trace broke.
#[test]
fn a_stream_the_cli_cannot_read_never_holds_the_program_up() {
    let exe = fixture("scribble.c");
    let mut child = Command::new(leakhunt())
        .args(["run", "--"])
        .arg(&exe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the program was held up: still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt trace at byte offset") && err.contains("recording stopped"),
        "{err}"
    );
    assert!(err.contains("EVENTS LOST: unknown"), "{err}");
}
