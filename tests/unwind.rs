//! The fast unwinder (validated reuse of the previous stack's outer frames) gives exactly the
//! stacks a full walk of every frame gives, on a fixture built to stress it: random-depth
//! recursion through frames with and without frame pointers and with alloca, libc frames in
//! between (qsort's comparator), and signal handlers. And leakhunt's stacks are those of an
//! independent unwinder, libgcc's (glibc's backtrace()), address for address.

use leakhunt_tests::*;

/// A frame as (function, line, module offset).
type Frame = (String, u64, u64);
/// (bytes, blocks, frames).
type Record = (u64, u64, Vec<Frame>);

fn stacks(p: &Value) -> Vec<Record> {
    // Per callsite, whatever the kinds its blocks came out as at exit.
    let mut by: std::collections::BTreeMap<Vec<Frame>, (u64, u64)> = Default::default();
    for l in p["leaks"].as_array().unwrap() {
        let frames = l["stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["function"].as_str().unwrap_or("???").to_string(),
                    f["line"].as_u64().unwrap_or(0),
                    f["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        let e = by.entry(frames).or_default();
        e.0 += l["bytes"].as_u64().unwrap();
        e.1 += l["blocks"].as_u64().unwrap();
    }
    by.into_iter().map(|(f, (b, n))| (b, n, f)).collect()
}

#[test]
fn fast_unwinder_matches_the_full_walk_on_every_stack() {
    let exe = fixture("paths.c");
    let fast = run(&exe, &[], &[]);
    let full = {
        let json = workspace().join(format!(
            "target/test-scratch/full-{}.json",
            std::process::id()
        ));
        let out = std::process::Command::new(leakhunt())
            .env("LEAKHUNT_UNWIND_REUSE", "0")
            .args(["run", "--json"])
            .arg(&json)
            .arg("--")
            .arg(&exe)
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_str::<Value>(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    assert_eq!(fast.stdout(), "7211 allocations\n");
    let (a, b) = (fast.main(), &full["processes"][0]);
    assert_eq!(summary(a, "in_use_at_exit_blocks"), 7211);
    // All three capture methods ran in the fast run (full walks only where no earlier stack of
    // the thread shares a frame: the first, after a signal frame); the reference run only walked.
    let c = &a["captures"];
    assert!(c["walked"].as_u64().unwrap() >= 1, "{c}");
    for method in ["joined", "repeated"] {
        assert!(c[method].as_u64().unwrap() > 1000, "{method}: {c}");
    }
    assert_eq!(
        b["captures"]["walked"].as_u64(),
        Some(summary(b, "allocs")),
        "{}",
        b["captures"]
    );
    assert_eq!(b["captures"]["joined"], 0);
    assert_eq!(b["captures"]["repeated"], 0);
    let (sa, sb) = (stacks(a), stacks(b));
    assert!(sa.len() > 4000, "many distinct stacks: {}", sa.len());
    assert_eq!(sa, sb, "fast and full walks disagree");
    assert_eq!(a["unwind"], b["unwind"]);
    assert_eq!(a["unwind"]["stopped_early"], serde_json::json!({}));
    // The twins: same stack pointer at every allocation, callers told apart two frames up.
    for (twin, n) in [("twin_a", 350), ("twin_b", 350), ("twin_c", 300)] {
        let hits: Vec<_> = sa
            .iter()
            .filter(|(_, _, f)| f.iter().any(|x| x.0 == twin))
            .collect();
        assert_eq!(hits.len(), 1, "{twin}: {hits:#?}");
        let (bytes, blocks, frames) = hits[0];
        assert_eq!((*bytes, *blocks), (n * 10, n), "{twin}");
        let names: Vec<&str> = frames.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["leaf", "twin_mid", twin, "main"], "{twin}");
    }
    // Stacks through the signal handler reach main on the interrupted stack.
    let via_signal: Vec<_> = sa
        .iter()
        .filter(|(_, _, f)| f.iter().any(|x| x.0 == "on_usr1"))
        .collect();
    assert_eq!(via_signal.len(), 1, "{via_signal:#?}");
    let (bytes, blocks, frames) = via_signal[0];
    assert_eq!(
        (*bytes, *blocks),
        (6 * 9, 6),
        "one block per raise(SIGUSR1)"
    );
    let names: Vec<&str> = frames.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names.first(), Some(&"leaf"));
    assert!(
        names.contains(&"raise") && names.last() == Some(&"main"),
        "{names:?}"
    );
}

#[test]
fn stacks_match_libgccs_unwinder_frame_for_frame() {
    // An unwinder independent of leakhunt's: glibc's backtrace() (libgcc's
    // _Unwind_Backtrace), asked by the fixture before each allocation. Its stack from the
    // allocating function's caller down to main must be leakhunt's, address for address, with
    // as many allocations per stack as leakhunt counted.
    let exe = fixture("unwind_ref.c");
    let r = run(&exe, &["3000"], &["--max-frames", "128"]);
    assert_eq!(r.out.status.code(), Some(0));
    let mut reference: std::collections::BTreeMap<Vec<u64>, u64> = Default::default();
    for line in r.stdout().lines() {
        let stack: Vec<u64> = line
            .split_whitespace()
            .map(|w| u64::from_str_radix(w, 16).unwrap())
            .collect();
        *reference.entry(stack).or_default() += 1;
    }
    assert_eq!(reference.values().sum::<u64>(), 3000);
    let mut ours: std::collections::BTreeMap<Vec<u64>, u64> = Default::default();
    for l in r.main()["leaks"].as_array().unwrap() {
        let frames: Vec<&Value> = l["stack"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["inlined"] == false)
            .collect();
        if frames.first().and_then(|f| f["function"].as_str()) != Some("traced") {
            continue; // glibc's and libgcc's own blocks
        }
        let stack = frames[1..]
            .iter()
            .map(|f| f["offset"].as_u64().unwrap())
            .collect();
        *ours.entry(stack).or_default() += l["blocks"].as_u64().unwrap();
    }
    assert!(
        reference.len() > 1000,
        "{} distinct stacks",
        reference.len()
    );
    let missing: Vec<_> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .take(3)
        .collect();
    assert!(
        missing.is_empty(),
        "stacks libgcc saw and leakhunt did not: {missing:x?}"
    );
    assert_eq!(ours, reference);
    // The three kinds of caller all occurred.
    let p = r.main();
    let names: Vec<String> = leaks(p)
        .iter()
        .flat_map(|l| l.frames.iter().map(|f| f.0.clone()))
        .collect();
    for f in [
        "with_fp",
        "without_fp",
        "with_alloca",
        "cmp",
        "on_usr1",
        "raise",
        "br0_2",
        "br3_1",
    ] {
        assert!(names.iter().any(|n| n == f), "no stack through {f}");
    }
}
