//! Exact accounting under load: 4 threads x 1M allocator calls of random sizes, a third of the
//! frees on another thread. leakhunt's counts equal the program's own, nothing is live at exit
//! and no event is lost.

use leakhunt_tests::*;

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
