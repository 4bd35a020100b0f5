//! Processes: fork, exec, signals, real programs, and what happens when the trace cannot be
//! written. The traced program's output and status never change.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use leakhunt_tests::*;
use serde_json::json;

#[test]
fn fork_children_are_followed_unless_asked_not_to() {
    let exe = fixture("fork.c");
    let plain_out = plain(&exe, &[]);
    let r = run(&exe, &[], &["--no-follow-forks"]);
    assert_eq!(r.out.stdout, plain_out.stdout);
    assert_eq!(r.stdout(), "child exited 7\n");
    assert_eq!(r.out.status.code(), Some(0));
    assert_eq!(
        r.processes().len(),
        1,
        "the child is not followed when asked"
    );
    let p = r.main();
    expect_leak(p, "fork.c", "FK_PARENT", 111, 1);
    assert_eq!(leaks(p).len(), 1);
    // By default, as memcheck: the child is a process of its own, with what it inherited.
    let r = run(&exe, &[], &[]);
    assert_eq!(r.out.stdout, plain_out.stdout);
    let ps = r.processes();
    assert_eq!(ps.len(), 2, "{:#}", r.json);
    assert_eq!(ps[1]["ppid"], ps[0]["pid"]);
    assert_eq!(ps[1]["exit"], json!({"code": 7}));
    expect_leak(&ps[1], "fork.c", "FK_CHILD", 222, 1);
    expect_leak(&ps[1], "fork.c", "FK_PARENT", 111, 1);
    assert_eq!(leaks(&ps[1]).len(), 2, "{:#?}", leaks(&ps[1]));
    assert_eq!(summary(&ps[1], "unmatched_frees"), 0);
    assert_eq!(leaks(&ps[0]).len(), 1);
    // Without a heap scan the child takes what it inherited at the end of the run instead.
    let r = run(&exe, &[], &["--no-reachability"]);
    let ps = r.processes();
    assert_eq!(ps.len(), 2, "{:#}", r.json);
    expect_leak(&ps[1], "fork.c", "FK_PARENT", 111, 1);
    assert_eq!(summary(&ps[1], "in_use_at_exit_bytes"), 333);

    let trace = workspace().join(format!(
        "target/test-scratch/fork-{}.trace",
        std::process::id()
    ));
    let r = run(
        &exe,
        &[],
        &["--trace-children", "--output", trace.to_str().unwrap()],
    );
    assert_eq!(r.out.stdout, plain_out.stdout);
    assert_eq!(r.out.status.code(), Some(0));
    let ps = r.processes();
    assert_eq!(ps.len(), 2, "{:#}", r.json);
    let (parent, child) = (&ps[0], &ps[1]);
    assert_eq!(child["ppid"], parent["pid"]);
    assert_eq!(child["exit"], json!({"code": 7}));
    assert_eq!(parent["exit"], json!({"code": 0}));
    expect_leak(child, "fork.c", "FK_CHILD", 222, 1);
    assert_eq!(
        summary(child, "allocs"),
        1,
        "the child's own calls start at the fork"
    );
    // Its heap starts as the parent's: the 111-byte block it inherited is still live at its exit,
    // the 55-byte one it freed is not, and that free matched.
    expect_leak(child, "fork.c", "FK_PARENT", 111, 1);
    assert_eq!(leaks(child).len(), 2, "{:#?}", leaks(child));
    assert_eq!(summary(child, "in_use_at_exit_bytes"), 333);
    assert_eq!(summary(child, "unmatched_frees"), 0);
    // The kept traces, reported together, say the same (the child's is TRACE.<pid>).
    let child_trace = format!("{}.{}", trace.display(), child["pid"]);
    let (out, offline) = report(&[&trace, Path::new(&child_trace)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(offline["processes"][1]["summary"], child["summary"]);
    assert_eq!(offline["processes"][1]["leaks"], child["leaks"]);
    expect_leak(parent, "fork.c", "FK_PARENT", 111, 1);
    assert_eq!(
        leaks(parent).len(),
        1,
        "the parent is undisturbed by its child"
    );
}

#[test]
fn exec_ends_the_old_image_and_traces_the_new_one_only_with_trace_children() {
    let exe = fixture("exec.c");
    for how in ["execl", "execle", "execvp"] {
        let expected = if how == "execle" { "le" } else { "-" };
        let want = format!("child ran with 1 2 3 4 5 6 LH_TEST={expected}\n");
        let r = run(&exe, &[how], &[]);
        assert_eq!(r.stdout(), want, "{how}");
        assert_eq!(r.out.status.code(), Some(0));
        assert_eq!(
            r.processes().len(),
            1,
            "{how}: the new image is not traced by default"
        );
        let p = r.main();
        assert_eq!(p["exit"], json!({"exec": true}), "{how}");
        expect_leak(p, "exec.c", "EX_PARENT", 123, 1);
        assert!(
            r.stderr().contains("process replaced its image by exec"),
            "{}",
            r.stderr()
        );

        let r = run(&exe, &[how], &["--trace-children"]);
        assert_eq!(r.stdout(), want, "{how}");
        assert_eq!(r.out.status.code(), Some(0));
        let ps = r.processes();
        assert_eq!(ps.len(), 2, "{how}: {:#}", r.json);
        assert_eq!(ps[0]["pid"], ps[1]["pid"], "exec keeps the pid");
        assert_eq!(ps[0]["exit"], json!({"exec": true}));
        assert_eq!(ps[1]["exit"], json!({"code": 0}));
        assert_eq!(ps[1]["argv"][1], "child");
        expect_leak(&ps[1], "exec.c", "EX_CHILD", 321, 1);
        assert!(
            leaks(&ps[1]).iter().all(|l| l.bytes != 123),
            "{how}: images are separate"
        );
    }
}

#[test]
fn sigkill_keeps_what_reached_leakhunt() {
    let exe = fixture("exits.c");
    // "kill" waits until the events were sent; "killnow" dies with them still in the rings,
    // which leakhunt run reads back from their shared files.
    for how in ["kill", "killnow"] {
        let trace = workspace().join(format!(
            "target/test-scratch/{how}-{}.trace",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&trace);
        let r = run(&exe, &[how], &["--output", trace.to_str().unwrap()]);
        assert_eq!(r.stdout(), format!("ending by {how}\n"));
        assert_eq!(r.out.status.signal(), Some(9));
        let p = r.main();
        assert_eq!(
            p["exit"],
            json!({"signal": 9}),
            "leakhunt run saw the death in waitpid"
        );
        expect_leak(p, "exits.c", "EXIT_BIG", 4096, 1);
        expect_leak(p, "exits.c", "EXIT_SMALL", 17, 1);
        assert_eq!(summary(p, "events_lost"), 0, "{how}");
        // The kept trace holds the recovered events too.
        let (out, offline) = report(&[&trace]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let q = &offline["processes"][0];
        expect_leak(q, "exits.c", "EXIT_BIG", 4096, 1);
        expect_leak(q, "exits.c", "EXIT_SMALL", 17, 1);
        assert_eq!(q["summary"], p["summary"], "{how}");
    }
}

#[test]
fn the_programs_own_signal_handling_is_untouched() {
    let exe = fixture("signals.c");
    let want = plain(&exe, &[]);
    assert_eq!(want.status.code(), Some(9));
    let r = run(&exe, &[], &[]);
    assert_eq!(r.out.stdout, want.stdout);
    assert_eq!(
        r.stdout(),
        "previous SIGSEGV handler is default: 1\nSIGUSR1 handled: 1\n\
         SIGUSR2 on the alternate stack allocated: 1\ncaught SIGSEGV\n"
    );
    assert_eq!(r.out.status.code(), Some(9));
    assert_eq!(r.main()["exit"], json!({"code": 9}));
    expect_leak(r.main(), "signals.c", "SG_LEAK", 64, 1);
    // Allocated in a handler on the alternate stack: the walk stays on that stack.
    let l = expect_leak(r.main(), "signals.c", "SG_ALT", 32, 1);
    assert_eq!(l.frames[0].0, "on_usr2");
}

/// A Debian program, by its packaged path (falling back to PATH).
fn debian(name: &str) -> std::path::PathBuf {
    let p = Path::new("/usr/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: install the Debian package (.ci/run does)",
        p.display()
    );
    p
}

fn same_as_plain(program: &Path, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    use std::process::Stdio;
    let go = |cmd: &mut Command| {
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut i = child.stdin.take().unwrap();
        i.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(i);
        child.wait_with_output().unwrap()
    };
    let a = go(&mut Command::new(program));
    // One name per test thread: the tests run in parallel.
    let json = scratch("lh-real.json");
    let b = go(Command::new(leakhunt())
        .args(["run", "-q", "--json"])
        .arg(&json)
        .arg("--")
        .arg(program));
    assert_eq!(
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
        "{program:?} {args:?}: stdout differs under leakhunt"
    );
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{program:?} {args:?}: status differs"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let p = &report["processes"][0];
    assert!(
        summary(p, "allocs") > 50,
        "{program:?} was traced: {}",
        p["summary"]
    );
    assert_eq!(summary(p, "events_lost"), 0);
    assert_eq!(
        p["unwind"]["stopped_early"],
        json!({}),
        "{program:?}: every stack unwound fully"
    );
    assert_eq!(p["exit"], json!({"code": a.status.code().unwrap()}));
}

#[test]
fn python3_output_and_status_unchanged() {
    let py = debian("python3");
    let script = "import json, collections, threading\n\
        d = collections.Counter(str(i % 97) for i in range(200000))\n\
        out = []\n\
        t = [threading.Thread(target=lambda k=k: out.append(sum(range(k * 10000)))) for k in range(4)]\n\
        [x.start() for x in t]; [x.join() for x in t]\n\
        print(json.dumps(sorted(d.items())[:5]), sorted(out))\n\
        raise SystemExit(3)\n";
    same_as_plain(&py, &["-c", script], None);
}

#[test]
fn sqlite3_output_and_status_unchanged() {
    let sql = "create table t(a integer primary key, b text);\n\
        with recursive c(x) as (select 1 union all select x+1 from c where x < 20000)\n\
        insert into t select x, hex(randomblob(16)) || x from c;\n\
        create index tb on t(b);\n\
        select count(*), sum(a), min(length(b)), max(length(b)) from t;\n\
        select a from t where a % 5000 = 0 order by a;\n";
    same_as_plain(&debian("sqlite3"), &[":memory:"], Some(sql));
}

#[test]
fn perl_output_and_status_unchanged() {
    same_as_plain(
        &debian("perl"),
        &["-e", "my %h; $h{$_ % 1000} .= 'x' x ($_ % 7) for 1..100000; print scalar(keys %h), ' ', length(join('', values %h)), qq(\\n); exit 4"],
        None,
    );
}

#[test]
fn git_output_and_status_unchanged() {
    let git = debian("git");
    same_as_plain(&git, &["hash-object", "--stdin"], Some("leakhunt\n"));
    same_as_plain(&git, &["version"], None);
}

#[test]
fn a_dead_cli_an_unwritable_or_a_full_trace_never_stops_the_program() {
    let exe = fixture("many.c");
    let want = plain(&exe, &[]);
    // The CLI accepts, then goes away at once.
    let dir = std::env::temp_dir().join(format!("lh-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        drop(c);
    });
    let out = Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_SOCKET", &sock)
        .output()
        .unwrap();
    t.join().unwrap();
    assert_eq!(out.stdout, want.stdout);
    assert_eq!(out.status.code(), want.status.code());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("leakhunt:").count(), 1, "told once: {err}");
    assert!(err.contains("the leakhunt CLI went away"), "{err}");
    assert!(err.contains("the program continues untraced"), "{err}");

    // A trace file that cannot be created.
    let out = Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", dir.join("no/such/dir/t.trace"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, want.stdout);
    assert_eq!(out.status.code(), want.status.code());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("leakhunt:").count(), 1, "told once: {err}");
    assert!(
        err.contains("cannot create the trace file: no such file or directory"),
        "{err}"
    );

    // The trace file hits the file-size limit (as on a full disk, writes fail): the program is
    // neither killed by SIGXFSZ nor stopped; one message.
    // The preload goes on the program itself (through env), not on the shell that sets the
    // limit: the shell's own short trace could fit under it.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 4; exec env LD_PRELOAD=\"$1\" \"$0\"")
        .arg(&exe)
        .arg(preload())
        .env("LEAKHUNT_OUT", dir.join("small.trace"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, want.stdout);
    assert_eq!(out.status.code(), want.status.code(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("leakhunt:").count(), 1, "told once: {err}");
    assert!(
        err.contains("cannot write the trace: file too large"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `leakhunt snapshot PID --reachability`: the blocks live at that point, sorted into memcheck's
/// kinds while the program's threads are held, under `leakhunt run` and under the preload alone
/// (through its helper: started for the scan, or, in `preload-early`, started as the trace
/// passed 1 KiB, which answers the snapshot's scan and then the exit's); the exit's scan is its
/// own.
#[test]
fn a_snapshot_scans_the_heap_of_the_running_process() {
    let exe = fixture("snapscan.c");
    for mode in ["run", "preload", "preload-early"] {
        let dir = workspace().join(format!(
            "target/test-scratch/snapscan-{mode}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("r.json");
        let trace = dir.join("t.trace");
        let mut cmd = if mode == "run" {
            let mut c = Command::new(leakhunt());
            c.args(["run", "-q", "--json"])
                .arg(&json)
                .arg("--")
                .arg(&exe);
            c
        } else {
            let mut c = Command::new(&exe);
            c.env("LD_PRELOAD", preload())
                .env("LEAKHUNT_OUT", &trace)
                .env(
                    "LEAKHUNT_HELPER_EARLY_KB",
                    if mode == "preload" { "0" } else { "1" },
                );
            c
        };
        let child = cmd
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dir.join("ready").exists() {
            assert!(std::time::Instant::now() < deadline, "{mode}: never ready");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The program: the child itself, or the CLI's child.
        let pid = if mode == "run" {
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        } else {
            child.id().to_string()
        };
        // The helper started early is there before the snapshot, and only in that mode.
        let helper = || early_helper_of(pid.parse().unwrap());
        if mode == "preload-early" {
            assert!(
                wait_for(|| helper().is_some()),
                "{mode}: no helper started early"
            );
        } else {
            assert_eq!(helper(), None, "{mode}");
        }
        let before = helper();
        let s = Command::new(leakhunt())
            .args(["snapshot", &pid, "--name", "mid", "--reachability"])
            .output()
            .unwrap();
        assert!(
            s.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        // It answered the snapshot's scan and stays for the exit's (then it ends).
        assert_eq!(helper(), before, "{mode}");
        std::fs::write(dir.join("go"), "").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{mode}");
        assert!(wait_for(|| helper().is_none()), "{mode}: the helper stays");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n", "{mode}");
        let report: serde_json::Value = if mode == "run" {
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
        } else {
            report(&[&trace]).1
        };
        let p = &report["processes"][0];
        let scans = p["snapshot_scans"]
            .as_array()
            .unwrap_or_else(|| panic!("{mode}: {p:#}"));
        assert_eq!(scans.len(), 1, "{mode}: {scans:#?}");
        let s = &scans[0];
        assert_eq!(s["snapshot"], "mid", "{mode}");
        assert_eq!(s["scanned"], true, "{mode}: {s:#}");
        assert_eq!(s["definitely_lost"], json!([400, 10]), "{mode}: {s:#}");
        assert!(
            s["still_reachable"][1].as_u64().unwrap() >= 5,
            "{mode}: {s:#}"
        );
        assert!(s["threads_held"].as_u64().unwrap() >= 1, "{mode}: {s:#}");
        assert!(s["held_ms"].as_f64().unwrap() > 0.0, "{mode}: {s:#}");
        // At exit: the kept blocks were freed, one more lost.
        let r = &p["reachability"];
        assert_eq!(r["definitely_lost"], json!([472, 11]), "{mode}: {r:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
