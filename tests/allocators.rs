//! Programs on another allocator's own API (jemalloc's `mallocx` family, tcmalloc's `tc_*`,
//! mimalloc's `mi_*`): every block they allocate and free through it is traced, as with glibc's
//! malloc, and the blocks left at exit are exact per callsite. (Those allocators keep their own
//! free lists inside free blocks, so a block handed out fresh may still hold a link to the next:
//! the kinds of lost blocks may split into definite and indirect where memcheck, whose own
//! allocator replaces theirs, sees none; bytes and blocks per callsite are the same.)

use leakhunt_tests::*;

/// (bytes, blocks) unfreed at exit at the callsite of `marker` in `src`, all kinds together.
fn at(p: &serde_json::Value, src: &str, marker: &str) -> (u64, u64) {
    let line = line_of(src, marker);
    let found: Vec<Leak> = leaks(p)
        .into_iter()
        .filter(|l| l.frames.iter().any(|f| f.1 == src && f.2 == line))
        .collect();
    assert!(found.len() <= 1, "{found:?}");
    // (`leaks` sums each record's own bytes: a definitely lost record's indirect bytes are
    // other records' blocks, counted there.)
    found.first().map_or((0, 0), |l| (l.bytes, l.blocks))
}

fn run_clean(src: &str) -> serde_json::Value {
    let exe = fixture(src);
    let plain = plain(&exe, &[]);
    let r = run(&exe, &[], &[]);
    assert_eq!(
        r.stdout(),
        String::from_utf8_lossy(&plain.stdout),
        "{}",
        r.stderr()
    );
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    let p = r.main().clone();
    assert_eq!(summary(&p, "events_lost"), 0);
    assert_eq!(
        summary(&p, "unmatched_frees"),
        0,
        "every free was of a traced block"
    );
    let w = p["warnings"].to_string();
    assert!(!w.contains("still live"), "{w}");
    p
}

#[test]
fn jemalloc_mallocx_rallocx_dallocx_sdallocx_xallocx() {
    let p = run_clean("je_api.c");
    assert_eq!(at(&p, "je_api.c", "JE_RALLOCX"), (450 * 128, 450));
    assert_eq!(at(&p, "je_api.c", "JE_XALLOCX"), (50 * 128, 50));
    assert_eq!(at(&p, "je_api.c", "JE_MALLOCX"), (100 * 64, 100));
    // mallocx 1,000 + rallocx 500 + xallocx 50 (a realloc is one alloc and one free); frees:
    // 500 + 50 of those, 300 dallocx, 100 sdallocx; and libc's own (stdout's buffer) beside.
    let (allocs, frees) = (summary(&p, "allocs"), summary(&p, "frees"));
    assert!((1550..1560).contains(&allocs), "{allocs}");
    assert_eq!(allocs - frees, 600, "{allocs} {frees}");
}

#[test]
fn tcmalloc_tc_functions() {
    let p = run_clean("tc_api.c");
    assert_eq!(at(&p, "tc_api.c", "TC_REALLOC"), (150 * 96, 150));
    assert_eq!(at(&p, "tc_api.c", "TC_CALLOC"), (100 * 32, 100));
    assert_eq!(at(&p, "tc_api.c", "TC_MEMALIGN"), (100 * 256, 100));
    assert_eq!(
        at(&p, "tc_api.c", "TC_MALLOC"),
        (0, 0),
        "the rest of them were freed"
    );
}

#[test]
fn mimalloc_mi_functions() {
    let p = run_clean("mi_api.c");
    assert_eq!(at(&p, "mi_api.c", "MI_REALLOC"), (100 * 80, 100));
    assert_eq!(at(&p, "mi_api.c", "MI_MALLOC"), (100 * 40, 100));
    assert_eq!(at(&p, "mi_api.c", "MI_ZALLOC"), (25 * 24, 25));
    assert_eq!(at(&p, "mi_api.c", "MI_STRDUP"), (20 * 16, 20));
    assert_eq!(at(&p, "mi_api.c", "MI_ALIGNED"), (10 * 512, 10));
}

#[test]
fn what_a_library_keeps_for_itself_is_one_line_per_library() {
    let exe = fixture("tc_api.c");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let text = r.stderr();
    // tcmalloc's own still reachable block (allocated at its initialisation, no frame of the
    // program's) is summed by library, not listed; `--top 0` lists it.
    assert!(
        text.contains("that libraries allocated for themselves")
            && text.contains("   from libtcmalloc.so."),
        "{text}"
    );
    assert!(!text.contains("still reachable in loss record"), "{text}");
    let all = run(&exe, &[], &["--show-leak-kinds", "all", "--top", "0"]);
    assert!(
        all.stderr().contains("still reachable in loss record"),
        "{}",
        all.stderr()
    );
    assert_eq!(records(r.main()).len(), records(all.main()).len());
}
