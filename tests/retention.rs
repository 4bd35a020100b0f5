//! What holds the leak: retention paths to a named root, retained sizes, on fixtures whose
//! object graphs are known exactly.

use leakhunt_tests::*;
use serde_json::Value;

/// The JSON record (or growth entry) in `list` whose allocation is at `file`'s `marker` line.
fn entry<'a>(list: &'a Value, file: &str, marker: &str) -> &'a Value {
    let line = line_of(file, marker) as u64;
    let found: Vec<&Value> =
        list.as_array()
            .unwrap()
            .iter()
            .filter(|l| {
                l["stack"].as_array().unwrap().iter().any(|f| {
                    f["file"].as_str().is_some_and(|x| x.ends_with(file)) && f["line"] == line
                })
            })
            .collect();
    assert_eq!(found.len(), 1, "one entry at {file}:{line} in {list:#}");
    found[0]
}

/// A hop's allocation site: (function, line) of its first frame with source.
fn hop_site(hop: &Value) -> (String, u64) {
    let f = hop["stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"].is_string())
        .unwrap();
    (
        f["function"].as_str().unwrap().to_string(),
        f["line"].as_u64().unwrap(),
    )
}

/// A hop as (function, line, offset, member, repeated).
type HopView = (String, u64, Option<u64>, Option<String>, bool);

fn hops(r: &Value) -> Vec<HopView> {
    r["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let (f, l) = hop_site(h);
            (
                f,
                l,
                h["offset"].as_u64(),
                h["member"].as_str().map(str::to_string),
                h["repeated"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_unbounded_cache_is_held_by_its_global_through_the_bucket_array() {
    let exe = fixture("retain_cache.c");
    let r = run(
        &exe,
        &["3000", "40"],
        &["--epoch", "100ms", "--show-leak-kinds", "all"],
    );
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    let p = r.main();
    let src = "retain_cache.c";
    let global_line = line_of(src, "CACHE_GLOBAL") as u64;
    let buckets_line = line_of(src, "CACHE_BUCKETS") as u64;
    let entry_line = line_of(src, "CACHE_ENTRY") as u64;

    // The values: 3,000 blocks of 32 bytes, still reachable; 2,936 through a bucket's chain of
    // entries (each entry's `value` member), the 64 at the chains' heads straight from a slot.
    let values = entry(&p["leaks"], src, "CACHE_VALUE");
    assert_eq!(values["kind"], "still_reachable");
    assert_eq!(
        (values["bytes"].as_u64(), values["blocks"].as_u64()),
        (Some(96_000), Some(3000))
    );
    let ret = &values["retention"];
    assert_eq!(ret["root"]["kind"], "global");
    assert_eq!(ret["root"]["symbol"], "g_cache");
    assert!(ret["root"]["file"].as_str().unwrap().ends_with(src));
    assert_eq!(ret["root"]["line"], global_line);
    assert_eq!(ret["root"]["offset"], 8);
    assert_eq!(ret["root"]["member"], "buckets");
    assert_eq!(ret["blocks"], 2936);
    assert!((ret["share"].as_f64().unwrap() - 2936.0 / 3000.0).abs() < 1e-9);
    assert_eq!(
        hops(ret),
        [
            (
                "cache_init".into(),
                buckets_line,
                None,
                Some("[]".into()),
                false
            ),
            (
                "cache_put".into(),
                entry_line,
                Some(0),
                Some("next".into()),
                true
            ),
            (
                "cache_put".into(),
                entry_line,
                Some(16),
                Some("value".into()),
                false
            ),
        ]
    );
    let other = &ret["other_paths"].as_array().unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0]["blocks"], 64);
    assert_eq!(
        hops(&other[0]),
        [
            (
                "cache_init".into(),
                buckets_line,
                None,
                Some("[]".into()),
                false
            ),
            (
                "cache_put".into(),
                entry_line,
                Some(16),
                Some("value".into()),
                false
            ),
        ]
    );
    // Retained: the values keep only themselves; the entries keep every entry and value (the
    // newest entry of a chain heads it); the bucket array all of that and itself.
    assert_eq!(
        (
            ret["retained_bytes"].as_u64(),
            ret["retained_blocks"].as_u64()
        ),
        (Some(96_000), Some(3000))
    );
    let entries = entry(&p["leaks"], src, "CACHE_ENTRY");
    assert_eq!(
        (
            entries["retention"]["retained_bytes"].as_u64(),
            entries["retention"]["retained_blocks"].as_u64()
        ),
        (Some(3000 * (24 + 32)), Some(6000))
    );
    let buckets = entry(&p["leaks"], src, "CACHE_BUCKETS");
    assert_eq!(buckets["retention"]["path"], serde_json::json!([]));
    assert_eq!(buckets["retention"]["share"], 1.0);
    assert_eq!(buckets["retention"]["retained_bytes"], 512 + 3000 * 56);
    assert_eq!(buckets["retention"]["retained_blocks"], 6001);

    // The growth entry of the values carries the same retention, and the guidance names the
    // global to bound.
    let g = entry(&p["growth"], src, "CACHE_VALUE");
    assert!(g["verdict"] == "leak" || g["verdict"] == "growing", "{g:#}");
    assert_eq!(g["retention"]["root"]["symbol"], "g_cache");
    assert_eq!(g["retention"]["blocks"], 2936);
    let born = g["born_after_warmup_live"].as_u64().unwrap();
    assert_eq!(g["delta_retained_bytes"].as_u64(), Some(born * 32));
    assert!(
        r.stderr()
            .contains("from global `g_cache` (retain_cache.c:")
            && r.stderr().contains("a container that only grows"),
        "{}",
        r.stderr()
    );

    // Every path of one callsite, offline.
    let trace = scratch("cache.trace");
    let out = std::process::Command::new(leakhunt())
        .args(["run", "-q", "--epoch", "100ms", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(&exe)
        .args(["3000", "40"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let id = values["callsite"].as_u64().unwrap().to_string();
    let out = std::process::Command::new(leakhunt())
        .arg("paths")
        .arg(&trace)
        .args(["--callsite", &id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Heap scan at exit: 3,000 blocks on 2 distinct paths")
            && text.contains("1. 2,936 of these blocks (98%) are held via global `g_cache`")
            && text.contains("2. 64 of these blocks (2%) are held via global `g_cache`"),
        "{text}"
    );
    // The diff from warm-up to the end, by retained growth: the entries (each new one heads its
    // chain, so the new ones keep every entry and value alive) before the values.
    let out = std::process::Command::new(leakhunt())
        .arg("diff")
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let after = |row: &str| text.lines().skip_while(|l| *l != row).nth(1).unwrap_or("");
    // (The bucket array is born before warm-up ends, unless the machine was so slow that the
    // program's start came after the first boundaries: then it heads the list, keeping all.)
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('+') && l.contains(" born since "))
        .filter(|l| !after(l).contains("cache_init"))
        .collect();
    assert!(text.contains("sorted by retained growth"), "{text}");
    assert!(
        rows[0].ends_with("they keep alive 168,000 bytes in 6,000 blocks"),
        "{text}"
    );
    assert!(
        after(rows[0]).contains(&format!("retain_cache.c:{entry_line}")),
        "{text}"
    );
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn a_list_held_only_in_thread_local_storage_names_the_variable() {
    let exe = fixture("retain_tls.c");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let p = r.main();
    let nodes = entry(&p["leaks"], "retain_tls.c", "TLS_NODE");
    assert_eq!(
        (nodes["kind"].as_str(), nodes["blocks"].as_u64()),
        (Some("still_reachable"), Some(300))
    );
    let ret = &nodes["retention"];
    assert_eq!(ret["root"]["kind"], "tls", "{ret:#}");
    assert_eq!(ret["root"]["symbol"], "t_history");
    assert_eq!(
        ret["root"]["line"],
        line_of("retain_tls.c", "TLS_HEAD") as u64
    );
    assert_eq!(ret["root"]["thread"], p["pid"]);
    // The head from the variable, the other 299 through the list's links.
    assert_eq!(ret["blocks"], 299);
    assert_eq!(
        hops(ret),
        [(
            "remember".into(),
            line_of("retain_tls.c", "TLS_NODE") as u64,
            Some(0),
            Some("next".into()),
            true
        )]
    );
    assert_eq!(ret["other_paths"][0]["blocks"], 1);
    assert_eq!(ret["other_paths"][0]["path"], serde_json::json!([]));
    assert_eq!(ret["retained_bytes"], 300 * 48);

    // The preload alone: the helper's scan at exit keeps the same retention in the trace.
    let trace = scratch("tls.trace");
    let out = std::process::Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .env("LEAKHUNT_CLI", leakhunt())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (_, offline) = report(&[&trace]);
    let q = &offline["processes"][0];
    let alone = &entry(&q["leaks"], "retain_tls.c", "TLS_NODE")["retention"];
    assert_eq!(alone["root"]["symbol"], "t_history", "{alone:#}");
    assert_eq!(alone["root"]["thread"], q["pid"]);
    assert_eq!(
        (alone["blocks"].as_u64(), alone["retained_bytes"].as_u64()),
        (Some(299), Some(300 * 48))
    );
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn a_list_held_only_by_a_running_threads_stack_names_the_frame() {
    let exe = fixture("retain_stack.c");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let p = r.main();
    let items = entry(&p["leaks"], "retain_stack.c", "STACK_ITEM");
    assert_eq!(
        (items["kind"].as_str(), items["blocks"].as_u64()),
        (Some("still_reachable"), Some(200))
    );
    let ret = &items["retention"];
    assert_eq!(ret["root"]["kind"], "stack", "{ret:#}");
    assert_eq!(ret["root"]["function"], "collector");
    assert_ne!(
        ret["root"]["thread"], p["pid"],
        "the collector thread, not main"
    );
    assert_eq!(ret["blocks"], 199);
    assert_eq!(ret["retained_bytes"], 200 * 32);
}

#[test]
fn retained_sizes_follow_the_dominator_tree() {
    let exe = fixture("retain_tree.c");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let p = r.main();
    let src = "retain_tree.c";
    let retained = |marker: &str| {
        let e = entry(&p["leaks"], src, marker);
        (
            e["retention"]["retained_bytes"].as_u64().unwrap(),
            e["retention"]["retained_blocks"].as_u64().unwrap(),
        )
    };
    // d has two parents (b and c): a, not either of them, dominates it.
    assert_eq!(retained("TREE_A"), (160, 5));
    assert_eq!(retained("TREE_B"), (32, 1));
    assert_eq!(retained("TREE_C"), (32, 1));
    assert_eq!(retained("TREE_D"), (32, 2));
    assert_eq!(retained("TREE_E"), (16, 1));
    // A list's nodes (one callsite) count once, however they nest: nodes and payloads.
    assert_eq!(retained("TREE_LIST"), (10 * 124, 20));
    assert_eq!(retained("TREE_PAYLOAD"), (1000, 10));
    // The text shows the 3 records with the most bytes, then what it left out.
    let top = run(&exe, &[], &["--show-leak-kinds", "all", "--top", "3"]);
    let text = top.stderr();
    let shown: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" in loss record "))
        .collect();
    assert_eq!(shown.len(), 3, "{text}");
    assert!(
        shown[2].contains("1,000 bytes in 10 blocks are still reachable in loss record 7 of 7"),
        "{text}"
    );
    assert!(
        text.contains("... and 4 more loss records (96 bytes in 4 blocks) not shown"),
        "{text}"
    );
    assert!(
        text.contains("   from retain_tree: 4 loss records, 96 bytes"),
        "{text}"
    );
    assert_eq!(records(top.main()).len(), 7, "JSON keeps every record");

    // d's shortest chain: g_tree -> a (`left`) -> b (`left`) -> d.
    let d = &entry(&p["leaks"], src, "TREE_D")["retention"];
    assert_eq!(d["root"]["symbol"], "g_tree");
    let h = hops(d);
    assert_eq!(h.len(), 2, "{d:#}");
    assert_eq!((h[0].2, h[0].3.as_deref()), (Some(0), Some("left")));
    assert_eq!((h[1].2, h[1].3.as_deref()), (Some(0), Some("left")));
}

#[test]
fn a_rust_static_mutex_vec_holds_its_records_through_the_buffer() {
    let exe = fixture("retain_rust.rs");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let p = r.main();
    let recs = entry(&p["leaks"], "retain_rust.rs", "RUST_RECORD");
    assert_eq!(
        (
            recs["kind"].as_str(),
            recs["bytes"].as_u64(),
            recs["blocks"].as_u64()
        ),
        (Some("still_reachable"), Some(64_000), Some(1000))
    );
    let ret = &recs["retention"];
    assert_eq!(ret["root"]["kind"], "global", "{ret:#}");
    assert_eq!(ret["root"]["symbol"], "retain_rust::REGISTRY");
    assert_eq!(
        ret["root"]["line"],
        line_of("retain_rust.rs", "RUST_STATIC") as u64
    );
    assert!(
        ret["root"]["member"].as_str().unwrap().starts_with("data."),
        "{ret:#}"
    );
    assert_eq!(ret["share"], 1.0);
    // One hop: the vector's buffer, grown by `push` in `register`.
    let path = ret["path"].as_array().unwrap();
    assert_eq!(path.len(), 1, "{ret:#}");
    assert!(path[0]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["function"] == "retain_rust::register"));
    assert_eq!(ret["retained_bytes"], 64_000);
}

/// The pid of `leakhunt run`'s program (its child).
fn child_of(pid: u32) -> u32 {
    for _ in 0..500 {
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            if let Some(k) = c.split_whitespace().next() {
                return k.parse().unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("leakhunt run {pid} started no program");
}

/// `leakhunt paths TRACE --at who_points.c:LINE --json -`: the named scan's retention.
fn paths_at(trace: &std::path::Path, marker: &str, scan: &str) -> Value {
    let at = format!("who_points.c:{}", line_of("who_points.c", marker));
    let out = run_ok(
        std::process::Command::new(leakhunt())
            .arg("paths")
            .arg(trace)
            .args(["--at", &at, "--json", "-"]),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let scans = v[0]["scans"].as_array().unwrap();
    scans
        .iter()
        .find(|s| s["scan"] == scan)
        .unwrap_or_else(|| panic!("no scan {scan} in {v:#}"))
        .clone()
}

#[test]
fn the_first_hop_agrees_with_memchecks_who_points_at() {
    use leakhunt_tests::vgdb::{who_points_at, Holder};
    use std::io::{BufRead, Write};
    let exe = fixture("who_points.c");
    let answers = who_points_at(&exe, &[]);
    assert_eq!(answers.len(), 3, "{answers:#?}");

    // The same program under leakhunt, a heap scan at a snapshot while it waits at the first
    // question (the same heap memcheck was asked about).
    let trace = scratch("who_points.trace");
    let mut run = std::process::Command::new(leakhunt())
        .args(["run", "-q", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(&exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(run.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("WHO_POINTS_AT 0x"), "{first}");
    let pid = child_of(run.id());
    run_ok(std::process::Command::new(leakhunt()).args([
        "snapshot",
        &pid.to_string(),
        "--reachability",
        "--name",
        "asked",
    ]));
    let mut stdin = run.stdin.take().unwrap();
    stdin.write_all(b"\n\n\n").unwrap();
    drop(stdin);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l == "who_points done"), "{rest:?}");
    assert!(run.wait().unwrap().success());

    // (a) The bucket array: memcheck's holder is g_registry at offset 8; leakhunt's root is that
    // global, at that offset, with nothing between.
    let Holder::Global { symbol, offset } = &answers[0].1[0] else {
        panic!("{answers:#?}")
    };
    let a = paths_at(&trace, "WP_BUCKETS", "asked");
    assert_eq!(a["root"]["kind"], "global");
    assert_eq!(a["root"]["symbol"].as_str(), Some(symbol.as_str()));
    assert_eq!(a["root"]["offset"].as_u64(), Some(*offset));
    assert_eq!(a["path"], serde_json::json!([]));
    assert_eq!(a["share"], 1.0);

    // (b) An entry: memcheck's holder is the bucket array (a 64-byte block); leakhunt's first
    // hop is a block from the bucket array's callsite, every entry through it.
    let Holder::Block { start, size, .. } = &answers[1].1[0] else {
        panic!("{answers:#?}")
    };
    assert_eq!((*start, *size), (answers[0].0, 64));
    let b = paths_at(&trace, "WP_ENTRY", "asked");
    assert_eq!(b["root"]["symbol"].as_str(), Some(symbol.as_str()));
    assert_eq!(b["share"], 1.0);
    let hop = &b["path"].as_array().unwrap()[0];
    assert_eq!(b["path"].as_array().unwrap().len(), 1);
    assert!(
        hop["stack"].as_array().unwrap().iter().any(|f| f["line"]
            == line_of("who_points.c", "WP_BUCKETS") as u64
            && f["function"] == "fill"),
        "{b:#}"
    );

    // (c) The block only main's local holds: both say main's frame on the main thread's stack.
    let Holder::Stack { function, .. } = &answers[2].1[0] else {
        panic!("{answers:#?}")
    };
    let c = paths_at(&trace, "WP_LOCAL", "asked");
    assert_eq!(c["root"]["kind"], "stack");
    assert_eq!(c["root"]["function"].as_str(), function.as_deref());
    assert_eq!(c["root"]["thread"].as_u64(), Some(pid as u64));
    let _ = std::fs::remove_file(&trace);
}

/// A copy of a fixture's source in a fresh directory, compiled there (so that its DWARF names the
/// copy): (the program, the source).
fn private_copy(src: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(&format!("{src}.d"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(src);
    std::fs::copy(fixtures_src().join(src), &copy).unwrap();
    let exe = dir.join("prog");
    compile(&copy, &exe);
    (exe, copy)
}

fn compile(src: &std::path::Path, exe: &std::path::Path) {
    run_ok(
        std::process::Command::new("gcc")
            .args(CFLAGS)
            .arg("-o")
            .arg(exe)
            .arg(src),
    );
}

#[test]
fn a_member_never_freed_gets_a_patch_that_fixes_the_leak() {
    let (exe, src) = private_copy("orphan_member.c");
    let r = run(&exe, &[], &["--orphans"]);
    let p = r.main();
    let recs = records(p);
    assert_eq!(
        recs.iter()
            .map(|l| (&*l.kind, l.bytes, l.blocks))
            .collect::<Vec<_>>(),
        [("definitely_lost", 1800, 100)]
    );
    let o = &p["leaks"][0]["retention"]["orphaned_at"];
    assert_eq!(o["blocks"], 100, "{o:#}");
    assert_eq!(o["share"], 1.0);
    assert_eq!(o["offset"], 0x18);
    assert_eq!(o["member"], "hdr");
    assert_eq!(o["holders_orphaning"], 100);
    assert_eq!(o["member_freed_before"], serde_json::Value::Null);
    let frame0 = |v: &Value| {
        let f = v
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["file"].is_string())
            .unwrap()
            .clone();
        (
            f["function"].as_str().unwrap().to_string(),
            f["line"].as_u64().unwrap(),
        )
    };
    assert_eq!(frame0(&o["parent"]).0, "req_new");
    assert_eq!(
        frame0(&o["freed_at"]),
        (
            "req_free".to_string(),
            line_of("orphan_member.c", "OM_FREE_REQ") as u64
        )
    );
    // The patch: `free(r->hdr);` before the request's free. It applies, and the fixed program
    // leaks nothing, under leakhunt and under memcheck.
    let patch = o["patch"].as_str().unwrap();
    assert!(patch.contains("\n+    free(r->hdr);\n"), "{patch}");
    let mut cmd = std::process::Command::new("patch");
    cmd.args(["-d", "/", "-p1", "--silent"])
        .stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(patch.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "patch did not apply:\n{patch}"
    );
    compile(&src, &exe);
    let fixed = run(&exe, &[], &["--orphans"]);
    assert_eq!(records(fixed.main()), [], "{}", fixed.stderr());
    let vg = memcheck()
        .args(["--leak-check=full", "--error-exitcode=9"])
        .arg(&exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&vg.stderr);
    assert_eq!(vg.status.code(), Some(0), "{text}");
    assert!(
        text.contains("All heap blocks were freed -- no leaks are possible"),
        "{text}"
    );
    assert!(text.contains("ERROR SUMMARY: 0 errors"), "{text}");
}

#[test]
fn a_member_freed_on_some_paths_names_that_free_and_offers_no_second_one() {
    let exe = fixture("orphan_partial.c");
    let r = run(&exe, &[], &["--orphans"]);
    let p = r.main();
    let body = entry(&p["leaks"], "orphan_partial.c", "PARTIAL_BODY");
    assert_eq!(
        (body["kind"].as_str(), body["blocks"].as_u64()),
        (Some("definitely_lost"), Some(100))
    );
    let o = &body["retention"]["orphaned_at"];
    assert_eq!(
        (
            o["blocks"].as_u64(),
            o["offset"].as_u64(),
            o["member"].as_str()
        ),
        (Some(100), Some(8), Some("body"))
    );
    assert_eq!(o["holders_orphaning"], 100);
    assert_eq!(
        o["patch"],
        Value::Null,
        "no patch that would free the body twice"
    );
    let before = o["member_freed_before"].as_array().unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0]["holders"], 200);
    let line = |m| line_of("orphan_partial.c", m) as u64;
    assert!(before[0]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"] == line("PARTIAL_BODY_FREE")));
    assert!(o["freed_at"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"] == line("PARTIAL_FREE")));
    assert!(
        r.stderr().contains("(for 200 other holders freed there, the member at offset 0x8 (`body`) was freed before, at msg_release (orphan_partial.c:")
            && !r.stderr().contains("Suggested fix"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_pointer_overwritten_in_place_has_no_holder() {
    let exe = fixture("orphan_overwrite.c");
    let r = run(&exe, &[], &["--orphans"]);
    let p = r.main();
    let lost = p["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "definitely_lost")
        .unwrap();
    assert!(lost["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"] == line_of("orphan_overwrite.c", "OVW_COPY") as u64));
    assert_eq!(
        (lost["bytes"].as_u64(), lost["blocks"].as_u64()),
        (Some(49 * 32), Some(49))
    );
    let ret = &lost["retention"];
    assert_eq!(ret["root"]["kind"], "none");
    assert_eq!(ret["path"], serde_json::json!([]));
    assert_eq!(ret["orphaned_at"], Value::Null);
    assert_eq!(
        ret["lost_how"],
        "the last pointer to each was overwritten, or went out of scope"
    );
}

#[test]
fn a_std_map_member_of_a_global_object_is_seen_before_its_destructor() {
    let exe = fixture("retain_map.cpp");
    let r = run(&exe, &["80"], &["--epoch", "100ms"]);
    let p = r.main();
    let src = "retain_map.cpp";
    // At exit the global's destructor has freed the map's nodes: the sessions are lost...
    let lost = entry(&p["leaks"], src, "MAP_SESSION");
    assert_eq!(
        (
            lost["kind"].as_str(),
            lost["bytes"].as_u64(),
            lost["blocks"].as_u64()
        ),
        (Some("definitely_lost"), Some(500 * 96), Some(500))
    );
    // ...but the growth entry says what held them while the program ran: the scan made as main
    // returned, through the map member of the global object and its tree of nodes.
    let g = entry(&p["growth"], src, "MAP_SESSION");
    assert!(g["verdict"] == "leak" || g["verdict"] == "growing", "{g:#}");
    let ret = &g["retention"];
    assert_eq!(ret["scan"], "pre-exit", "{ret:#}");
    assert_eq!(ret["root"]["kind"], "global");
    assert_eq!(ret["root"]["symbol"], "g_sessions");
    assert_eq!(ret["root"]["line"], line_of(src, "MAP_GLOBAL") as u64);
    assert!(
        ret["root"]["member"]
            .as_str()
            .unwrap()
            .starts_with("by_id."),
        "{ret:#}"
    );
    let all: u64 = std::iter::once(ret)
        .chain(ret["other_paths"].as_array().into_iter().flatten())
        .map(|p| p["blocks"].as_u64().unwrap())
        .sum();
    assert_eq!(all, 500);
    let insert = line_of(src, "MAP_INSERT") as u64;
    for path in std::iter::once(ret).chain(ret["other_paths"].as_array().into_iter().flatten()) {
        assert_eq!(path["root"]["symbol"], "g_sessions", "{path:#}");
        let hops = path["path"].as_array().unwrap();
        // Every hop is a map node made at the insert; the last holds the session at 0x28 (the
        // node's value: the key at 0x20, the Session pointer after it).
        assert!(!hops.is_empty(), "{path:#}");
        for h in hops {
            assert!(
                h["stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["line"] == insert),
                "{h:#}"
            );
        }
        assert_eq!(hops.last().unwrap()["offset"], 0x28, "{path:#}");
    }
    assert!(
        r.stderr()
            .contains("What holds them (heap scan as the program began to exit):"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_long_path_keeps_its_first_and_last_hops_and_counts_the_rest() {
    let exe = fixture("retain_chain.c");
    let r = run(&exe, &[], &["--show-leak-kinds", "all"]);
    let p = r.main();
    let payload = entry(&p["leaks"], "retain_chain.c", "PAYLOAD");
    assert_eq!(payload["kind"], "still_reachable");
    let ret = &payload["retention"];
    assert_eq!(ret["root"]["symbol"], "g_chain", "{ret:#}");
    // The 40 links are its hops (each holds the pointer to the next): the first 4 and the last
    // 8 are kept.
    let path = ret["path"].as_array().unwrap();
    assert_eq!(path.len(), 12, "{ret:#}");
    let skipped: Vec<u64> = path
        .iter()
        .map(|h| h["skipped"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(skipped, [0, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0]);
    // Each hop names its site by one frame, with its callsite for the whole stack; links
    // alternate B (made first, next to the root: the 40th link is a B), A, ...
    let site = |h: &Value| h["stack"][0]["line"].as_u64().unwrap();
    let (a, b) = (
        line_of("retain_chain.c", "LINK_A") as u64,
        line_of("retain_chain.c", "LINK_B") as u64,
    );
    assert_eq!(path.iter().map(site).collect::<Vec<_>>()[..4], [a, b, a, b]);
    assert_eq!(path[0]["stack"].as_array().unwrap().len(), 1);
    assert!(path[0]["callsite"].as_u64().is_some());
    assert_eq!(
        site(&path[11]),
        b,
        "the payload's holder, the first link made"
    );
    assert!(
        r.stderr().contains("-> ... 28 more hops ..."),
        "{}",
        r.stderr()
    );
}
