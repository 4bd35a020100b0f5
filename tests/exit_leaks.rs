//! Exact exit-time leak figures for fixtures with known answers.

use std::process::Command;

use leakhunt_tests::*;

fn frames_fn(l: &Leak) -> Vec<&str> {
    l.frames.iter().map(|f| f.0.as_str()).collect()
}

#[test]
fn simple_leaks_exact_bytes_blocks_and_lines() {
    let exe = fixture("simple.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "simple done\n");
    assert_eq!(r.out.status.code(), Some(0));
    let p = r.main();
    let a = expect_leak(p, "simple.c", "SIMPLE_A", 300, 3);
    assert_eq!(frames_fn(&a), ["make_a", "main"]);
    assert_eq!(
        a.frames[1],
        (
            "main".into(),
            "simple.c".into(),
            line_of("simple.c", "SIMPLE_MAIN_A")
        )
    );
    let b = expect_leak(p, "simple.c", "SIMPLE_B", 40, 1);
    assert_eq!(frames_fn(&b), ["make_b", "helper", "main"]);
    assert_eq!(b.frames[1].2, line_of("simple.c", "SIMPLE_HELPER"));
    assert_eq!(b.frames[2].2, line_of("simple.c", "SIMPLE_MAIN_B"));
    assert_eq!(leaks(p).len(), 2);
    assert_eq!(summary(p, "in_use_at_exit_bytes"), 340);
    assert_eq!(summary(p, "in_use_at_exit_blocks"), 4);
    assert_eq!(summary(p, "events_lost"), 0);
    assert_eq!(p["exit"], serde_json::json!({"code": 0}));
    assert_eq!(p["unwind"]["stopped_early"], serde_json::json!({}));
    // Nothing points at either any more: definitely lost, in memcheck's order (smallest first)
    // and words.
    let recs = records(p);
    assert_eq!(
        recs.iter().map(|l| (&*l.kind, l.bytes)).collect::<Vec<_>>(),
        [("definitely_lost", 40), ("definitely_lost", 300)]
    );
    assert!(
        r.stderr()
            .contains("300 bytes in 3 blocks are definitely lost in loss record 2 of 2"),
        "{}",
        r.stderr()
    );
    assert!(r
        .stderr()
        .contains("   definitely lost: 340 bytes in 4 blocks"));
    // Without the heap scan, the old words.
    let r = run(&exe, &[], &["--no-reachability"]);
    assert!(
        r.stderr()
            .contains("300 bytes in 3 blocks are unfreed at exit (record 1 of 2)"),
        "{}",
        r.stderr()
    );
    assert_eq!(records(r.main())[0].kind, "unfreed");
    assert!(r.stderr().contains("in use at exit: 340 bytes in 4 blocks"));
}

#[test]
fn leak_free_program_reports_nothing() {
    let exe = fixture("clean.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "clean\n");
    let p = r.main();
    assert!(leaks(p).is_empty(), "{:#?}", leaks(p));
    assert_eq!(summary(p, "in_use_at_exit_bytes"), 0);
    assert_eq!(summary(p, "allocs"), summary(p, "frees"));
    assert!(r
        .stderr()
        .contains("All heap blocks were freed -- no leaks are possible"));
}

#[test]
fn calloc_realloc_and_glibc_edge_cases() {
    let exe = fixture("reallocs.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "1 1 1\n");
    let p = r.main();
    let f = "reallocs.c";
    expect_leak(p, f, "RA_CALLOC", 100, 1);
    expect_leak(p, f, "RA_CHAIN", 300, 1);
    expect_leak(p, f, "RA_ARRAY", 42, 1);
    expect_leak(p, f, "RA_ZERO", 0, 1);
    assert_eq!(leaks(p).len(), 4, "{:#?}", leaks(p));
    assert_eq!(summary(p, "in_use_at_exit_bytes"), 442);
    assert_eq!(summary(p, "in_use_at_exit_blocks"), 4);
    // reallocarray is recorded once (glibc's own would call our realloc from inside the hook).
    assert_eq!(p["warnings"], serde_json::json!([]), "{:#}", p["warnings"]);
}

#[test]
fn every_aligned_allocator() {
    let exe = fixture("aligned.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "1 1\n");
    let p = r.main();
    let f = "aligned.c";
    for (m, bytes) in [
        ("AL_POSIX", 200),
        ("AL_ALIGNED", 256),
        ("AL_MEMALIGN", 96),
        ("AL_VALLOC", 1000),
        ("AL_PVALLOC", 8192),
    ] {
        let l = leak_at(p, f, line_of(f, m));
        assert_eq!((l.bytes, l.blocks), (bytes, 1), "{m}");
        assert_eq!(l.frames[0].0, "main", "{m}");
    }
    assert_eq!(leaks(p).len(), 5);
}

#[test]
fn libc_allocates_on_the_programs_behalf() {
    let exe = fixture("libc_alloc.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "seventeen chars! 42-answer 9\n");
    let p = r.main();
    let f = "libc_alloc.c";
    let s = expect_leak(p, f, "LC_STRDUP", 17, 1);
    assert_eq!(s.frames[0].0, "strdup");
    let a = leak_at(p, f, line_of(f, "LC_ASPRINTF"));
    assert_eq!(a.blocks, 1);
    assert_eq!(
        a.bytes, 10,
        "asprintf shrinks its buffer to the string: {a:?}"
    );
    let g = expect_leak(p, f, "LC_GETLINE", 120, 1);
    assert_eq!(g.frames[0].0, "getdelim");
    assert_eq!(leaks(p).len(), 3, "{:#?}", leaks(p));
}

#[test]
fn leak_in_a_library_closed_before_exit_still_symbolizes() {
    let exe = fixture("dlopen_main.c");
    let lib = fixture("plugin.c");
    let r = run(&exe, &[lib.to_str().unwrap()], &[]);
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    let p = r.main();
    let l = expect_leak(p, "plugin.c", "PLUGIN_LEAK", 77, 1);
    assert_eq!(l.frames[0].0, "plugin_leak");
    assert_eq!(
        l.frames[1],
        (
            "main".into(),
            "dlopen_main.c".into(),
            line_of("dlopen_main.c", "DL_CALL")
        )
    );
}

#[test]
fn leaks_from_four_threads_and_cross_thread_frees() {
    let exe = fixture("threads.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "threads done\n");
    let p = r.main();
    let line = line_of("threads.c", "TH_LEAK");
    let mut got: Vec<(u64, u64)> = leaks(p)
        .iter()
        .filter(|l| {
            l.frames
                .first()
                .is_some_and(|f| f.0 == "worker" && f.2 == line)
        })
        .map(|l| (l.bytes, l.blocks))
        .collect();
    got.sort();
    // Thread i leaks i+1 blocks of 1000+i bytes; all stacks are identical, so one record.
    assert_eq!(
        got,
        vec![(1000 + 2 * 1001 + 3 * 1002 + 4 * 1003, 10)],
        "{:#?}",
        leaks(p)
    );
    assert_eq!(
        leaks(p).len(),
        1,
        "the 4000 handed-off blocks are all freed: {:#?}",
        leaks(p)
    );
    assert_eq!(summary(p, "events_lost"), 0);
}

#[test]
fn cxx_new_new_array_and_container_members() {
    let exe = fixture("cxx.cpp");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "5 q 10 3\n");
    let p = r.main();
    let f = "cxx.cpp";
    let n = expect_leak(p, f, "CX_NEW", 4, 1);
    assert_eq!(n.frames[0].0, "main");
    expect_leak(p, f, "CX_NEWARR", 100, 1);
    let h = leak_at(p, f, line_of(f, "CX_HOLDER"));
    assert_eq!(
        (h.bytes, h.blocks),
        (56, 1),
        "sizeof(Holder) = vector 24 + string 32"
    );
    assert_eq!(h.frames[0].0, "make_holder");
    expect_leak(p, f, "CX_VEC", 40, 1);
    expect_leak(p, f, "CX_STR", 41, 1);
    assert_eq!(leaks(p).len(), 5, "{:#?}", leaks(p));
}

/// A `std::bad_alloc` the real operator new throws reaches the program's handler through the
/// preload's operator shims (their frames unwind), under `leakhunt run` and with the preload
/// alone: the program prints and exits as it does untraced, and its one leak is reported.
#[test]
fn bad_alloc_unwinds_through_the_operator_shims() {
    let exe = fixture("bad_alloc.cpp");
    let alone = plain(&exe, &[]);
    assert_eq!(String::from_utf8_lossy(&alone.stdout), "caught 6 null 3\n");
    assert!(alone.status.success());
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "caught 6 null 3\n", "{}", r.stderr());
    assert!(r.out.status.success(), "{}", r.stderr());
    let check = |p: &serde_json::Value| {
        let l = expect_leak(p, "bad_alloc.cpp", "BA_LEAK", 64, 1);
        assert_eq!(l.frames[0].0, "main", "{l:#?}");
        assert_eq!(leaks(p).len(), 1, "{:#?}", leaks(p));
    };
    check(r.main());
    let trace = scratch("bad_alloc.lh");
    let out = Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_CLI", leakhunt())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "caught 6 null 3\n");
    assert!(out.status.success());
    let (_, rep) = report(&[&trace]);
    let _ = std::fs::remove_file(&trace);
    check(&rep["processes"][0]);
}

#[test]
fn rust_box_leak_and_mem_forget() {
    let exe = fixture("rust_leak.rs");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "rust 1 10\n");
    let p = r.main();
    let f = "rust_leak.rs";
    let b = expect_leak(p, f, "RS_BOX", 64, 1);
    assert!(
        b.frames.iter().any(|fr| fr.0 == "rust_leak::leak_box"),
        "{b:#?}"
    );
    let v = expect_leak(p, f, "RS_FORGET", 128, 1);
    assert!(
        v.frames.iter().any(|fr| fr.0 == "rust_leak::forget_vec"),
        "{v:#?}"
    );
}

#[test]
fn one_hundred_thousand_tiny_leaks() {
    let exe = fixture("many.c");
    let r = run(&exe, &[], &[]);
    let p = r.main();
    expect_leak(p, "many.c", "MANY", 800_000, 100_000);
    assert_eq!(summary(p, "allocs"), 100_000);
    assert_eq!(summary(p, "events_lost"), 0);
}

fn exits(how: &str) -> Run {
    let exe = fixture("exits.c");
    let r = run(&exe, &[how], &[]);
    assert_eq!(r.stdout(), format!("ending by {how}\n"));
    let p = r.main();
    expect_leak(p, "exits.c", "EXIT_BIG", 4096, 1);
    expect_leak(p, "exits.c", "EXIT_SMALL", 17, 1);
    r
}

#[test]
fn exit_by_return_exit_and_underscore_exit() {
    for (how, code) in [("return", 5), ("exit", 3), ("_exit", 4)] {
        let r = exits(how);
        assert_eq!(r.out.status.code(), Some(code), "{how}");
        assert_eq!(
            r.main()["exit"],
            serde_json::json!({ "code": code }),
            "{how}"
        );
    }
}

#[test]
fn abort_and_sigsegv_are_reported_and_reraised() {
    use std::os::unix::process::ExitStatusExt;
    for (how, sig) in [("abort", 6), ("segv", 11)] {
        let r = exits(how);
        assert_eq!(
            r.out.status.signal(),
            Some(sig),
            "leakhunt dies of the program's signal: {how}"
        );
        assert_eq!(
            r.main()["exit"],
            serde_json::json!({ "signal": sig }),
            "{how}"
        );
        let name = if sig == 6 { "SIGABRT" } else { "SIGSEGV" };
        assert!(
            r.stderr()
                .contains(&format!("process was killed by {name}")),
            "{}",
            r.stderr()
        );
    }
}

/// A leaked list of 600,000 blocks: the heap scan's result (one entry per lost block, ~11 MB)
/// is larger than the socket's buffers both ways, and the process echoes it into its stream
/// while the CLI sends it. Exact kinds, and the run ends (it once waited on itself forever).
#[test]
fn a_result_larger_than_the_socket_buffers_goes_through() {
    let (exe, _) = generated_fixture(
        "long_list",
        "#include <stdlib.h>\n\
         struct n { struct n *next; long v; };\n\
         int main(void) {\n\
             struct n *h = 0;\n\
             for (long i = 0; i < 600000; i++) {\n\
                 struct n *x = malloc(sizeof *x);\n\
                 x->next = h; x->v = i; h = x;\n\
             }\n\
             h = 0;\n\
             return 0;\n\
         }\n",
    );
    let json = std::env::temp_dir().join(format!("lh-long-list-{}.json", std::process::id()));
    let out = std::process::Command::new("timeout")
        .args(["120", leakhunt().to_str().unwrap(), "run", "--json"])
        .arg(&json)
        .arg("--")
        .arg(&exe)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let p = &r["processes"][0];
    assert_eq!(
        p["reachability"]["definitely_lost"],
        serde_json::json!([16, 1])
    );
    assert_eq!(
        p["reachability"]["indirectly_lost"],
        serde_json::json!([599_999 * 16, 599_999])
    );
    let recs = records(p);
    let head = recs.iter().find(|l| l.kind == "definitely_lost").unwrap();
    assert_eq!(
        (head.bytes, head.indirect, head.blocks),
        (16, 599_999 * 16, 1)
    );
}

#[test]
fn code_a_jit_made_is_walked_by_frame_pointer_and_named_from_its_perf_map() {
    let exe = fixture("jit_perfmap.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "jit done\n");
    let p = r.main();
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", p["pid"]));
    let raw = p["leaks"].as_array().unwrap();
    let recs = records(p);
    let at = |name: &str| {
        let i = recs
            .iter()
            .position(|l| l.frames[0].0 == name)
            .unwrap_or_else(|| panic!("no record at {name}: {}", r.stderr()));
        (&recs[i], raw[i]["unwind"].as_str())
    };
    // Through two JIT frames into the C code that called them, to the outermost frame.
    let (framed, unwind) = at("JIT:inner_stub");
    assert_eq!(
        (&*framed.kind, framed.bytes, framed.blocks),
        ("definitely_lost", 500, 5)
    );
    let drive = line_of("jit_perfmap.c", "DRIVE");
    assert_eq!(
        framed.frames[..3],
        [
            ("JIT:inner_stub".to_string(), String::new(), 0),
            ("JIT:outer_stub".to_string(), String::new(), 0),
            ("drive".to_string(), "jit_perfmap.c".to_string(), drive),
        ],
        "{}",
        r.stderr()
    );
    assert_eq!(framed.frames[3].0, "main");
    assert_eq!(unwind, None, "a complete stack");
    // A frame record whose return address lies in no executable memory is not followed.
    let (fake, unwind) = at("JIT:fake_stub");
    assert_eq!((fake.bytes, fake.blocks, fake.frames.len()), (200, 2, 1));
    assert_eq!(unwind, Some("stopped: address in no known module"));
    // A stub without a frame of its own that only aligned the stack: its epilogue (`add rsp,
    // 8; ret`) at the return address gives its caller, main, and the stack is complete.
    let (frameless, unwind) = at("JIT:frameless_stub");
    assert_eq!((frameless.bytes, frameless.blocks), (300, 3));
    assert_eq!(
        frameless.frames[1],
        (
            "main".to_string(),
            "jit_perfmap.c".to_string(),
            line_of("jit_perfmap.c", "FRAMELESS_CALL")
        ),
        "{:?}",
        frameless.frames
    );
    assert_eq!(unwind, None);
    assert_eq!(summary(p, "allocs") - summary(p, "frees"), 10);
}

#[test]
fn a_growing_callsite_whose_stack_stopped_says_so() {
    let exe = fixture("jit_perfmap.c");
    let r = run(&exe, &["12"], &["--epoch", "1h", "--warmup", "0s"]);
    assert_eq!(r.stdout(), "jit done\n");
    let p = r.main();
    remove_jit_files(&p["pid"]);
    let g = p["growth"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["stack"][0]["function"] == "JIT:fake_stub")
        .unwrap_or_else(|| panic!("{}", r.stderr()));
    // 4 blocks a round after the first boundary's round: 11 rounds.
    assert_eq!(
        (g["delta_blocks"].as_i64(), g["delta_bytes"].as_i64()),
        (Some(44), Some(4400))
    );
    assert_eq!(g["unwind"], "stopped: address in no known module");
    let text = r.stderr();
    // In the growth section (after the exit records).
    let growth = text
        .find("MEMORY OVER TIME")
        .unwrap_or_else(|| panic!("{text}"));
    let at = growth
        + text[growth..]
            .find(": JIT:fake_stub")
            .unwrap_or_else(|| panic!("{text}"));
    assert!(
        text[at..].contains("(stack stopped: address in no known module)"),
        "{text}"
    );
}

/// libc's compressed debug sections, inflated once, are kept in the cache directory and read
/// back: the report is the same (the CLI's own peak RSS aside) from a cold cache, a warm one, one whose kept
/// `.debug_info` was damaged (inflated again and kept whole) and none at all; a thread's stack
/// still ends in libc's `start_thread` and `clone3`, named from that debug information
/// (Debian 12's glibc 2.36: the lines are its).
#[test]
fn kept_debug_sections_give_the_same_report() {
    let exe = fixture("threads.c");
    let dir = scratch("debug-cache");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.trace");
    run_ok(
        Command::new(&exe)
            .env("LD_PRELOAD", preload())
            .env("LEAKHUNT_OUT", &trace)
            .env("LEAKHUNT_REACH", "0"),
    );
    let cache = dir.join("cache");
    // (The CLI's own peak RSS aside.)
    let report = |env: &[(&str, &std::ffi::OsStr)]| -> serde_json::Value {
        let out = run_ok(
            Command::new(leakhunt())
                .args(["report", "--json", "-"])
                .arg(&trace)
                .envs(env.iter().copied()),
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_object_mut().unwrap().remove("cli_peak_rss_bytes");
        v
    };
    let with_cache = [("LEAKHUNT_CACHE_DIR", cache.as_os_str())];
    let cold = report(&with_cache);
    let info: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("-debug_info-"))
        .collect();
    assert_eq!(info.len(), 1, "libc's .debug_info kept: {info:?}");
    let warm = report(&with_cache);
    assert_eq!(warm, cold);
    let mut bytes = std::fs::read(&info[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&info[0], &bytes).unwrap();
    assert_eq!(report(&with_cache), cold);
    assert_ne!(std::fs::read(&info[0]).unwrap(), bytes, "kept again whole");
    assert_eq!(report(&[("LEAKHUNT_CACHE", "0".as_ref())]), cold);
    let leak = leak_at(
        &cold["processes"][0],
        "threads.c",
        line_of("threads.c", "TH_LEAK"),
    );
    let names: Vec<(&str, &str, u32)> = leak
        .frames
        .iter()
        .map(|f| (f.0.as_str(), f.1.as_str(), f.2))
        .collect();
    assert_eq!(
        names[1..],
        [
            ("start_thread", "pthread_create.c", 442),
            ("clone3", "clone3.S", 81)
        ],
        "{names:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
