//! The CLI's contract: bad input gets a one-line error naming the problem, never a panic or wrong
//! figures; `report` on a kept trace says what the live run said; exit statuses.

use std::path::PathBuf;
use std::process::{Command, Output};

use leakhunt_tests::*;
use serde_json::json;

fn golden() -> PathBuf {
    workspace().join("format/golden/simple.trace")
}

fn leakhunt_cmd(args: &[&str]) -> Output {
    Command::new(leakhunt()).args(args).output().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = workspace().join("target/test-scratch");
    std::fs::create_dir_all(&d).unwrap();
    d.join(format!("cli-{}-{name}", std::process::id()))
}

fn report_json(trace: &std::path::Path) -> (Output, Value) {
    report(&[trace])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn golden_trace_reports_its_known_figures() {
    let (out, v) = report_json(&golden());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let p = &v["processes"][0];
    assert_eq!(p["pid"], 14796);
    assert_eq!(p["exit"], json!({"code": 0}));
    assert_eq!(
        p["summary"],
        json!({"in_use_at_exit_bytes": 340, "in_use_at_exit_blocks": 4, "allocs": 6, "frees": 2,
               "bytes_allocated": 4486, "events_lost": 0, "unmatched_frees": 0})
    );
    let l: Vec<(u64, u64)> = leaks(p).iter().map(|l| (l.bytes, l.blocks)).collect();
    assert_eq!(l, [(300, 3), (40, 1)]);
    // The fixture binary of that run is not here (or was rebuilt): frames fall back to module +
    // offset, with a warning, and the figures stand.
    let top = &p["leaks"][0]["stack"][0];
    assert_eq!(top["module"], "/work/main/target/fixtures/simple");
    assert_eq!(top["offset"], 0x1162);
}

#[test]
fn json_on_stdout_is_json_alone_and_the_text_goes_to_stderr() {
    let out = leakhunt_cmd(&["report", "--json", "-", golden().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON alone ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["processes"][0]["pid"], 14796);
    assert!(
        stderr(&out).contains("300 bytes in 3 blocks are"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_golden_trace_reports_the_same_figures_and_progress_shows_on_request() {
    // Version 1 (slots), version 2 (compact events) and version 3 (elided pairs) traces of the
    // same program.
    let v2 = workspace().join("format/golden/simple-v2.trace");
    let v3 = workspace().join("format/golden/simple-v3.trace");
    let (_, a) = report_json(&golden());
    let (out, b) = report_json(&v2);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (out, c) = report_json(&v3);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (a, b, c) = (&a["processes"][0], &b["processes"][0], &c["processes"][0]);
    assert_eq!(a["summary"], b["summary"]);
    assert_eq!(a["summary"], c["summary"]);
    assert_eq!(c["captures"]["elided_events"], 4);
    let sizes =
        |p: &Value| -> Vec<(u64, u64)> { leaks(p).iter().map(|l| (l.bytes, l.blocks)).collect() };
    assert_eq!(sizes(a), sizes(b));
    assert_eq!(sizes(a), sizes(c));
    // Progress: one line per redraw on stderr, ending at 100%; nothing on a small trace by
    // default (stderr is not a terminal here).
    let out = leakhunt_cmd(&["report", "--progress", "always", v2.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(
        err.contains("leakhunt: reading") && err.contains(": 100% (0 of 0 MiB"),
        "{err}"
    );
    let out = leakhunt_cmd(&["report", v2.to_str().unwrap()]);
    assert!(!stderr(&out).contains("reading"), "{}", stderr(&out));
    let out = leakhunt_cmd(&["report", "--progress", "sometimes", v2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'sometimes'"),
        "{}",
        stderr(&out)
    );
}

/// `leakhunt report TRACE` with stderr on a terminal of its own (a pseudo-terminal that python3
/// opens), stdout discarded: what was drawn on the terminal. The bar's threshold is `min_bytes`
/// (64 MiB without it).
fn report_on_a_terminal(trace: &std::path::Path, min_bytes: Option<&str>) -> String {
    const PTY: &str = r"import os, subprocess, sys
m, s = os.openpty()
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=s)
os.close(s)
out = b''
while True:
    try:
        d = os.read(m, 65536)
    except OSError:
        break
    if not d:
        break
    out += d
sys.stdout.buffer.write(out)
sys.exit(p.wait())
";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PTY])
        .arg(leakhunt())
        .arg("report")
        .arg(trace);
    match min_bytes {
        Some(b) => cmd.env("LEAKHUNT_TEST_PROGRESS_MIN_BYTES", b),
        None => cmd.env_remove("LEAKHUNT_TEST_PROGRESS_MIN_BYTES"),
    };
    let out = run_ok(&mut cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_is_a_bar_on_a_terminal_and_nothing_when_stderr_is_captured() {
    let v2 = workspace().join("format/golden/simple-v2.trace");
    // Captured stderr: not a byte of progress, even with the bar's threshold at 0 bytes.
    let out = Command::new(leakhunt())
        .env("LEAKHUNT_TEST_PROGRESS_MIN_BYTES", "0")
        .arg("report")
        .arg(&v2)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        !out.stderr.contains(&b'\r') && !out.stderr.contains(&0x1b),
        "{:?}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("reading"), "{}", stderr(&out));
    // On a terminal, a trace over the threshold: indicatif's bar, finished at 100%.
    let size = std::fs::metadata(&v2).unwrap().len();
    let shown = report_on_a_terminal(&v2, Some("0"));
    assert!(
        shown.contains(&format!("leakhunt: reading {}: 100%", v2.display())),
        "{shown:?}"
    );
    let human = if size >= 1024 {
        format!("{:.2} KiB", size as f64 / 1024.0)
    } else {
        format!("{size} B")
    };
    assert!(shown.contains(&format!("{human} of {human}")), "{shown:?}");
    // A trace under 64 MiB: nothing, on a terminal too.
    let quiet = report_on_a_terminal(&v2, None);
    assert!(!quiet.contains("reading"), "{quiet:?}");
}

#[test]
fn truncated_traces_report_what_they_hold_with_a_warning() {
    let data = std::fs::read(golden()).unwrap();
    // Cut inside the batch record (it starts at byte 783): the modules and header survive.
    for cut in [800usize, 1000, 1400] {
        let t = scratch(&format!("cut{cut}.trace"));
        std::fs::write(&t, &data[..cut]).unwrap();
        let (out, v) = report_json(&t);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let p = &v["processes"][0];
        let w = p["warnings"].as_array().unwrap();
        assert!(
            w.iter().any(|w| w
                .as_str()
                .unwrap()
                .contains("trace truncated at byte offset 783")),
            "{w:?}"
        );
        assert_eq!(p["exit"], Value::Null, "the end was not recorded");
        assert!(String::from_utf8_lossy(&out.stdout).contains("process end not recorded"));
    }
    // Cut after the batch: the events are all there.
    let t = scratch("cut-late.trace");
    std::fs::write(&t, &data[..data.len() - 3]).unwrap();
    let (_, v) = report_json(&t);
    assert_eq!(summary(&v["processes"][0], "in_use_at_exit_bytes"), 340);
}

fn one_line_error(trace_bytes: &[u8], name: &str, want: &str) {
    let t = scratch(name);
    std::fs::write(&t, trace_bytes).unwrap();
    let out = leakhunt_cmd(&["report", t.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("leakhunt: error: "), "{err}");
    assert!(err.contains(want), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn corrupt_newer_and_foreign_input_are_clear_errors() {
    let data = std::fs::read(golden()).unwrap();
    let mut flipped = data.clone();
    flipped[1000] ^= 0x40;
    one_line_error(
        &flipped,
        "flip.trace",
        "corrupt trace at byte offset 783: record tag 4",
    );
    let mut newer = data.clone();
    newer[8] = 7;
    one_line_error(
        &newer,
        "newer.trace",
        "trace format version 7 at byte offset 8 is newer than this leakhunt reads (up to 4)",
    );
    one_line_error(
        b"\x7fELF\x02\x01\x01\x00 not a trace",
        "elf.trace",
        "not a leakhunt trace: expected magic \"LKHUNTTR\" at byte offset 0",
    );
    one_line_error(b"", "empty.trace", "empty.trace: empty, not a trace");
    let out = leakhunt_cmd(&["report", "/nonexistent/x.trace"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot open trace /nonexistent/x.trace"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_and_programs_that_cannot_start() {
    let out = leakhunt_cmd(&["run", "--bogus", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--bogus'"),
        "{}",
        stderr(&out)
    );
    let out = leakhunt_cmd(&["run", "--max-frames", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--max-frames"), "{}", stderr(&out));
    let out = leakhunt_cmd(&["run", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127), "like a shell: not found");
    assert!(
        stderr(&out).contains("/nonexistent/program"),
        "{}",
        stderr(&out)
    );
    let out = leakhunt_cmd(&[
        "run",
        "--",
        workspace().join("format/FORMAT.md").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(126), "like a shell: not executable");
}

#[test]
fn report_of_a_kept_trace_equals_the_live_report() {
    let exe = fixture("simple.c");
    let trace = scratch("kept.trace");
    let _ = std::fs::remove_file(&trace);
    let live = run(&exe, &[], &["--output", trace.to_str().unwrap()]);
    let (out, mut offline) = report_json(&trace);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Everything but the CLI's own memory, which is the CLI's and not the program's.
    let mut live_json = live.json.clone();
    assert!(live_json["cli_peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    live_json["cli_peak_rss_bytes"] = Value::Null;
    offline["cli_peak_rss_bytes"] = Value::Null;
    assert_eq!(
        live_json, offline,
        "offline report differs from the live one"
    );
    assert_eq!(summary(live.main(), "in_use_at_exit_bytes"), 340);
}

#[test]
fn preload_alone_writes_a_private_trace_that_report_reads() {
    let exe = fixture("simple.c");
    let dir = scratch("alone");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(&exe)
        .current_dir(&dir)
        .env("LD_PRELOAD", preload())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "simple done\n");
    assert!(
        out.stderr.is_empty(),
        "silent when all is well: {}",
        stderr(&out)
    );
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("leakhunt.") && name.ends_with(".trace"),
        "{name}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, v) = report_json(&files[0]);
    let p = &v["processes"][0];
    assert_eq!(
        p["exit"],
        json!({"code": 0}),
        "return from main is recorded without leakhunt run"
    );
    expect_leak(p, "simple.c", "SIMPLE_A", 300, 3);
}

#[test]
fn error_exitcode_only_when_leaks_are_found() {
    let leaky = fixture("simple.c");
    let clean = fixture("clean.c");
    let r = run(&leaky, &[], &["--error-exitcode", "42"]);
    assert_eq!(r.out.status.code(), Some(42));
    let r = run(&clean, &[], &["--error-exitcode", "42"]);
    assert_eq!(r.out.status.code(), Some(0));
    let exits = fixture("exits.c");
    let r = run(&exits, &["exit"], &[]);
    assert_eq!(
        r.out.status.code(),
        Some(3),
        "the program's own status otherwise"
    );
}

/// Runs `cmd` with its output in files, failing the test if it has not finished after 20 s: a
/// hang fails, and the test does not hang with it.
fn within_20s(cmd: &mut Command) -> Output {
    use std::process::Stdio;
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        scratch(&format!("stdout{n}")),
        scratch(&format!("stderr{n}")),
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let o = Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    };
    let _ = (std::fs::remove_file(&out), std::fs::remove_file(&err));
    o
}

fn leakhunt_within_20s(args: &[&std::ffi::OsStr]) -> Output {
    within_20s(Command::new(leakhunt()).args(args))
}

fn mkfifo(p: &std::path::Path) {
    let _ = std::fs::remove_file(p);
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success(), "mkfifo {}", p.display());
}

/// A FIFO, a directory, a socket, a 20 GiB sparse file and an empty file in a fresh directory,
/// named in that order.
fn hostile_files(name: &str) -> (PathBuf, [PathBuf; 5], std::os::unix::net::UnixListener) {
    let d = scratch(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let dir = d.join("dir");
    std::fs::create_dir(&dir).unwrap();
    let sock = d.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let huge = d.join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    (d, [fifo, dir, sock, huge, empty], listener)
}

#[test]
fn a_fifo_a_device_a_directory_a_socket_or_a_huge_file_as_the_trace_is_a_clear_error_at_once() {
    let (d, [fifo, dir, sock, huge, empty], _l) = hostile_files("hostile-traces");
    let cases: [(&std::path::Path, String); 6] = [
        (
            &fifo,
            format!(
                "{}: a pipe or FIFO with no writer, or whose writer sent nothing: empty, not a trace",
                fifo.display()
            ),
        ),
        (
            "/dev/zero".as_ref(),
            "/dev/zero is a character device, not a trace".into(),
        ),
        (&dir, format!("{} is a directory, not a trace", dir.display())),
        (&sock, format!("{} is a socket, not a trace", sock.display())),
        (
            &huge,
            format!(
                "{}: not a leakhunt trace: expected magic \"LKHUNTTR\" at byte offset 0, found \"\\0\\0\\0\\0\\0\\0\\0\\0\"",
                huge.display()
            ),
        ),
        (&empty, format!("{}: empty, not a trace", empty.display())),
    ];
    let g = golden();
    for (path, want) in &cases {
        let p = path.as_os_str();
        for args in [
            vec!["report".as_ref(), p],
            vec!["diff".as_ref(), p],
            vec!["diff".as_ref(), g.as_os_str(), p],
            vec!["verify".as_ref(), g.as_os_str(), p],
            vec!["dump".as_ref(), p],
        ] {
            let out = leakhunt_within_20s(&args);
            assert_eq!(
                (out.status.code(), stderr(&out)),
                (Some(2), format!("leakhunt: error: {want}\n")),
                "{args:?}"
            );
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_trace_through_a_pipe_is_read_and_a_diff_of_one_asks_for_a_file() {
    // bash's process substitution gives a pipe with a writer (/dev/fd/63): read to its end.
    let json = scratch("piped.json");
    let out = within_20s(
        Command::new("bash")
            .arg("-c")
            .arg(r#"exec "$0" report --json "$1" <(cat "$2")"#)
            .arg(leakhunt())
            .arg(&json)
            .arg(golden()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let p = &v["processes"][0];
    assert_eq!(summary(p, "in_use_at_exit_bytes"), 340);
    let l: Vec<(u64, u64)> = leaks(p).iter().map(|l| (l.bytes, l.blocks)).collect();
    assert_eq!(l, [(300, 3), (40, 1)]);
    // A diff of points of one trace reads it twice, which a pipe cannot give.
    let out = within_20s(
        Command::new("bash")
            .arg("-c")
            .arg(r#"exec "$0" diff <(cat "$1")"#)
            .arg(leakhunt())
            .arg(golden()),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("leakhunt: error: /dev/fd/")
            && err.ends_with(": a diff of one trace reads it twice: give a file, not a pipe\n"),
        "{err}"
    );
}

/// The golden trace with every module record's path replaced by `path`.
fn with_module_paths(path: &std::path::Path) -> Vec<u8> {
    use leakhunt_format::{encode, Reader, Record};
    let data = std::fs::read(golden()).unwrap();
    let mut r = Reader::new(&data[..]);
    let mut out = encode::preamble().to_vec();
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Header(h) => encode::header(&h, &mut out),
            Record::Module(mut m) => {
                m.path = path.to_str().unwrap().into();
                encode::module(&m, &mut out)
            }
            Record::Batch { tid, slots, .. } => encode::batch(tid, &slots, &mut out),
            Record::Stats(s) => encode::stats(&s, &mut out),
            Record::Exit(e) => encode::exit(e, &mut out),
            other => panic!("the golden trace holds no {other:?}"),
        }
    }
    out
}

#[test]
fn module_records_naming_a_fifo_a_device_a_directory_or_a_huge_file_are_warnings_at_once() {
    let (d, [fifo, dir, sock, huge, empty], _l) = hostile_files("hostile-modules");
    let cases: [(&std::path::Path, &str); 7] = [
        (&fifo, "is a FIFO, not an ELF file"),
        (
            "/dev/zero".as_ref(),
            "is a character device, not an ELF file",
        ),
        (&dir, "is a directory, not an ELF file"),
        (&sock, "is a socket, not an ELF file"),
        (
            &huge,
            "is 21474836480 bytes, more than the 4 GiB leakhunt reads of one file",
        ),
        (&empty, "is 0 bytes long, not an ELF file"),
        (
            "/proc/self/mem".as_ref(),
            "is 0 bytes long, not an ELF file",
        ),
    ];
    for (i, (module, why)) in cases.iter().enumerate() {
        let trace = d.join(format!("{i}.trace"));
        std::fs::write(&trace, with_module_paths(module)).unwrap();
        let json = d.join(format!("{i}.json"));
        let out = leakhunt_within_20s(&[
            "report".as_ref(),
            "--json".as_ref(),
            json.as_os_str(),
            trace.as_os_str(),
        ]);
        assert_eq!(
            (out.status.code(), stderr(&out)),
            (
                Some(0),
                format!(
                    "leakhunt: warning: {} {why}; its frames show as module+offset\n",
                    module.display()
                )
            )
        );
        // The figures stand, the frames are module+offset.
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let p = &v["processes"][0];
        assert_eq!(summary(p, "in_use_at_exit_bytes"), 340);
        let l: Vec<(u64, u64)> = leaks(p).iter().map(|l| (l.bytes, l.blocks)).collect();
        assert_eq!(l, [(300, 3), (40, 1)]);
        let top = &p["leaks"][0]["stack"][0];
        assert_eq!(top["module"], module.to_str().unwrap());
        assert_eq!(top["offset"], 0x1162);
        assert_eq!(top["function"], Value::Null);
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn argv_reaches_the_report_exactly_with_empty_arguments_and_control_characters() {
    // The coreutils program, not the shell's builtin: a dynamically linked, traced process.
    let exe = std::path::Path::new("/usr/bin/printf");
    assert!(exe.is_file(), "coreutils' printf");
    let r = run(exe, &["[%s]", "a", "", "b"], &[]);
    assert_eq!(r.stdout(), "[a][][b]");
    assert_eq!(
        r.main()["argv"],
        json!(["/usr/bin/printf", "[%s]", "a", "", "b"])
    );
    let pid = r.main()["pid"].as_u64().unwrap();
    let header = format!("=={pid}== leakhunt: /usr/bin/printf '[%s]' a '' b\n");
    assert!(r.stderr().contains(&header), "{}", r.stderr());
    // Control characters: raw in JSON, escaped in the text (no escape sequence reaches the
    // terminal, no forged line).
    let r = run(exe, &["%s|", "\x1b[2Jred", "two\nlines", "tab\t"], &[]);
    assert_eq!(r.stdout(), "\x1b[2Jred|two\nlines|tab\t|");
    assert_eq!(
        r.main()["argv"],
        json!([
            "/usr/bin/printf",
            "%s|",
            "\x1b[2Jred",
            "two\nlines",
            "tab\t"
        ])
    );
    let pid = r.main()["pid"].as_u64().unwrap();
    let header = format!(
        "=={pid}== leakhunt: /usr/bin/printf '%s|' $'\\x1b[2Jred' $'two\\nlines' $'tab\\t'\n"
    );
    assert!(r.stderr().contains(&header), "{}", r.stderr());
    assert!(!r.stderr().contains('\x1b'), "{}", r.stderr());
}

#[test]
fn a_process_that_dropped_its_user_says_why_it_has_no_heap_scan() {
    let exe = fixture("drop_user.c");
    let dir = scratch("dropped");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.trace");
    let out = Command::new(&exe)
        .current_dir(&dir)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "dropped\n");
    let (rep, v) = report(&[&trace]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    let p = &v["processes"][0];
    // The block is reported (unfreed, without a kind), and the report says why there are no
    // kinds.
    let kept = leak_at(p, "drop_user.c", line_of("drop_user.c", "DROP_KEPT"));
    assert_eq!((kept.kind.as_str(), kept.bytes), ("unfreed", 64));
    let w = p["warnings"].to_string();
    assert!(
        w.contains("no heap scan at exit: the process is not dumpable"),
        "{w}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
