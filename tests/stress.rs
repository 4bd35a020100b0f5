//! Exact accounting under load: 4 threads x 1M allocator calls of random sizes, a third of the
//! frees on another thread. leakhunt's counts equal the program's own, nothing is live at exit
//! and no event is lost.

use leakhunt_tests::*;
use std::path::Path;
use std::process::Command;

fn counts(stdout: &str) -> (u64, u64, u64) {
    let w: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!((w[0], w[2], w[4]), ("allocs", "frees", "bytes"), "{stdout}");
    (
        w[1].parse().unwrap(),
        w[3].parse().unwrap(),
        w[5].parse().unwrap(),
    )
}

fn totals(p: &Value) -> (u64, u64, u64) {
    (
        summary(p, "allocs"),
        summary(p, "frees"),
        summary(p, "bytes_allocated"),
    )
}

#[test]
fn four_threads_million_ops_exact_counts() {
    let exe = fixture("stress.c");
    // The same program with no work: what thread start-up and exit cost in allocator calls
    // (glibc's own, not the program's), to take off the totals.
    let base = run(&exe, &["0", "4"], &[]);
    assert_eq!(counts(&base.stdout()), (0, 0, 0));
    let (ba, bf, bb) = totals(base.main());

    let r = run(&exe, &["1000000", "4"], &[]);
    assert_eq!(r.out.status.code(), Some(0));
    let (pa, pf, pb) = counts(&r.stdout());
    assert!(pa > 2_000_000 && pa == pf, "{}", r.stdout());
    let p = r.main();
    let (la, lf, lb) = totals(p);
    assert_eq!(
        (la - ba, lf - bf, lb - bb),
        (pa, pf, pb),
        "leakhunt minus baseline = program"
    );
    assert_eq!(summary(p, "in_use_at_exit_bytes"), 0);
    assert_eq!(summary(p, "in_use_at_exit_blocks"), 0);
    assert_eq!(summary(p, "events_lost"), 0);
    assert_eq!(
        summary(p, "unmatched_frees"),
        0,
        "every free matched its allocation"
    );
    assert!(leaks(p).is_empty());
    assert_eq!(p["warnings"], serde_json::json!([]));
    assert_eq!(p["unwind"]["stopped_early"], serde_json::json!({}));
    // Exact with most short-lived blocks sent as elided pairs, a third of frees on another
    // thread than the allocation's.
    let elided = p["captures"]["elided_events"].as_u64().unwrap();
    assert!(elided > pa / 4, "{elided} events elided of {}", 2 * pa);
}

/// 300 threads alive together, each churning then losing one block: exact under `leakhunt run`
/// (a ring file each, the busiest made large) and with the preload writing a file, every lost
/// block found definitely lost by the heap scan (the rings of all 300 threads are the tracer's
/// own memory, not roots), and what the tracer keeps resident per thread within 64 KiB.
#[test]
fn three_hundred_threads_exact_and_small() {
    let exe = fixture("many_threads.c");
    let line = line_of("many_threads.c", "MT_LEAK");
    let check = |p: &Value| {
        let lost: Vec<Leak> = records(p)
            .into_iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.2 == line))
            .collect();
        assert_eq!(lost.len(), 1, "{lost:#?}");
        assert_eq!(
            (lost[0].kind.as_str(), lost[0].bytes, lost[0].blocks),
            ("definitely_lost", 300 * 40, 300),
            "{lost:#?}"
        );
        assert_eq!(summary(p, "in_use_at_exit_blocks"), 300, "{:#?}", leaks(p));
        assert_eq!(summary(p, "events_lost"), 0);
        let c = &p["captures"];
        let threads = c["threads"].as_u64().unwrap();
        let resident = c["tracer_resident_bytes"].as_u64().unwrap();
        assert!(threads >= 301, "{c}");
        assert!(resident > 0 && resident / threads <= 64 << 10, "{c}");
    };
    let r = run(&exe, &["300", "3000"], &[]);
    assert_eq!(r.stdout(), "300 threads done\n");
    check(r.main());
    let (stdout, p) = preload_to_file(&exe, &["300", "3000"], "many_threads.trace");
    assert_eq!(stdout, "300 threads done\n");
    check(&p);
}

/// `exe args` with the preload writing a trace file, then `leakhunt report` of it: the
/// program's stdout and the report's first process.
fn preload_to_file(exe: &Path, args: &[&str], name: &str) -> (String, Value) {
    let trace = scratch(name);
    let out = Command::new(exe)
        .args(args)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_CLI", leakhunt())
        .output()
        .unwrap();
    let (_, rep) = report(&[&trace]);
    let _ = std::fs::remove_file(&trace);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        rep["processes"][0].clone(),
    )
}

/// Threads that fall idle give their rings and unwind state back, and are traced exactly when
/// they wake: 8 threads churn, idle 300 ms together, then do 20 rounds each of a sleep around
/// the tracer's idle time (wake-ups racing with give-backs), a churn and a block lost through
/// two frames of their own. Every lost block at its stack, as memcheck finds them, nothing else
/// live, no event lost or unmatched, under `leakhunt run` and with the preload writing a file;
/// and the rings were given back, at least once a thread.
#[test]
fn idle_threads_give_their_rings_back_and_stay_exact() {
    idle_threads_case(8, 20_000, 20, true);
}

/// The same with two threads and longer churns: few enough rings that the writer drains them
/// on a timer while they are busy and goes back to waiting as they fall idle (`ring::POLLING`
/// in the preload), many times a run: as exact.
#[test]
fn few_busy_threads_drained_on_a_timer_stay_exact() {
    idle_threads_case(2, 300_000, 30, false);
}

/// `idle_threads THREADS OPS ROUNDS` under `leakhunt run` and with the preload writing a file
/// (and memcheck, with `valgrind`): every lost block at its stack, nothing else live, no event
/// lost or unmatched, every thread's ring given back at least once.
fn idle_threads_case(threads: u64, ops: u64, rounds: u64, valgrind: bool) {
    let exe = fixture("idle_threads.c");
    let lines = ["IT_LEAK", "IT_OUTER", "IT_WORKER"].map(|m| line_of("idle_threads.c", m));
    let (t, o, n) = (threads.to_string(), ops.to_string(), rounds.to_string());
    let args = [t.as_str(), o.as_str(), n.as_str()];
    let done = format!("{threads} threads done\n");
    let check = |p: &Value| {
        let lost: Vec<Leak> = records(p)
            .into_iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.2 == lines[0]))
            .collect();
        assert_eq!(lost.len(), 1, "{lost:#?}");
        assert_eq!(
            (lost[0].kind.as_str(), lost[0].bytes, lost[0].blocks),
            ("definitely_lost", threads * rounds * 48, threads * rounds),
            "{lost:#?}"
        );
        let frames: Vec<(&str, u32)> = lost[0].frames[..3]
            .iter()
            .map(|f| (f.0.as_str(), f.2))
            .collect();
        assert_eq!(
            frames,
            [
                ("lose_inner", lines[0]),
                ("lose_outer", lines[1]),
                ("worker", lines[2])
            ],
            "{lost:#?}"
        );
        assert_eq!(
            summary(p, "in_use_at_exit_blocks"),
            threads * rounds,
            "{:#?}",
            leaks(p)
        );
        assert_eq!(summary(p, "events_lost"), 0);
        assert_eq!(summary(p, "unmatched_frees"), 0);
        let c = &p["captures"];
        assert!(c["rings_given_back"].as_u64().unwrap() >= threads, "{c}");
    };
    let r = run(&exe, &args, &[]);
    assert_eq!(r.stdout(), done);
    check(r.main());
    let (stdout, p) = preload_to_file(&exe, &args, "idle_threads.trace");
    assert_eq!(stdout, done);
    check(&p);
    if !valgrind {
        return;
    }
    let vg: Vec<Leak> = valgrind_definite(&exe, &args)
        .into_iter()
        .filter(|l| l.frames.first().is_some_and(|f| f.2 == lines[0]))
        .collect();
    assert_eq!(vg.len(), 1, "{vg:#?}");
    assert_eq!(
        (vg[0].bytes, vg[0].blocks),
        (threads * rounds * 48, threads * rounds),
        "{vg:#?}"
    );
}

/// Two threads whose numbers interleave event by event: each thread's own short-lived blocks
/// are still sent as elided pairs (the writer reads every thread's frees before pairing), while
/// a block that comes back to its allocating thread at the same address, after the other thread
/// freed it and allocated again, is never taken for a pair: exact counts, no unmatched free,
/// the kept blocks definitely lost at the other thread's allocation.
#[test]
fn interleaved_threads_pair_their_own_blocks_and_handoffs_stay_exact() {
    let exe = fixture("pingpong.c");
    let line = line_of("pingpong.c", "PP_LEAK");
    let base = run(&exe, &["0"], &[]);
    assert_eq!(base.stdout(), "allocs 0 frees 0 same 0\n");
    let b = base.main();
    let (ba, bf, bb) = totals(b);
    let (bu, bub) = (
        summary(b, "in_use_at_exit_blocks"),
        summary(b, "in_use_at_exit_bytes"),
    );
    let check = |p: &Value, stdout: &str| {
        let w: Vec<&str> = stdout.split_whitespace().collect();
        assert_eq!(&w[..4], ["allocs", "800000", "frees", "799800"], "{stdout}");
        let same: u64 = w[5].parse().unwrap();
        assert!(
            same >= 100_000,
            "the address came back {same} times of 200,000"
        );
        let (la, lf, _) = totals(p);
        assert_eq!((la - ba, lf - bf), (800_000, 799_800));
        assert_eq!(totals(p).2 - bb, 200_000 * (48 + 48 + 24 + 24));
        assert_eq!(summary(p, "unmatched_frees"), 0);
        assert_eq!(summary(p, "events_lost"), 0);
        assert_eq!(summary(p, "in_use_at_exit_blocks") - bu, 200);
        assert_eq!(summary(p, "in_use_at_exit_bytes") - bub, 9600);
        let lost: Vec<Leak> = records(p)
            .into_iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.2 == line))
            .collect();
        assert_eq!(lost.len(), 1, "{:#?}", leaks(p));
        assert_eq!(
            (lost[0].kind.as_str(), lost[0].bytes, lost[0].blocks),
            ("definitely_lost", 9600, 200)
        );
        assert_eq!(lost[0].frames[0].0, "b_main");
        // The threads' own blocks: 400,000 pairs, all but a few at the writer's cuts elided.
        let elided = p["captures"]["elided_events"].as_u64().unwrap();
        assert!(elided >= 600_000, "{elided} of 800,000 events elided");
    };
    let r = run(&exe, &["200000"], &[]);
    check(r.main(), &r.stdout());
    let trace = scratch("pingpong.trace");
    let out = Command::new(&exe)
        .arg("200000")
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_CLI", leakhunt())
        .output()
        .unwrap();
    let (_, rep) = report(&[&trace]);
    check(&rep["processes"][0], &String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_file(&trace);
}
