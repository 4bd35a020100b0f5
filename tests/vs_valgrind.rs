//! valgrind memcheck on the same fixtures: every record it reports as definitely lost appears in
//! leakhunt's report with the same bytes (direct and indirect), blocks and top three frames; on
//! the fixtures made for the four kinds, every record of every kind, both ways.

use leakhunt_tests::*;

/// The name a function goes by in both tools: valgrind prints C++ parameter lists (from the
/// mangled symbol) and short names for inlined Rust frames (`new<[u8; 64]>`), leakhunt the DWARF
/// names, qualified (`alloc::boxed::Box<T>::new`). Compare the last path segment with generic
/// arguments and parameters removed.
fn norm(f: &str) -> String {
    let mut out = String::new();
    let mut depth = 0i32;
    for c in f.chars() {
        match c {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.rsplit("::").next().unwrap_or("").trim().to_string()
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn frame_matches(vg: &(String, String, u32), lh: &(String, String, u32)) -> bool {
    if vg.0.is_empty() || vg.0 == "???" {
        // valgrind has no symbol here (it forgets a library at dlclose): nothing to compare.
        return true;
    }
    if vg.0 == "clone" && lh.0 == "clone3" {
        // valgrind makes clone3 fail (ENOSYS), so under it glibc starts threads with clone: the
        // programs really differ there, one frame below the thread's start routine.
        return true;
    }
    norm(&vg.0) == norm(&lh.0) && (vg.1.is_empty() || (base(&vg.1) == lh.1 && vg.2 == lh.2))
}

fn compare(src: &str, args: &[&str], extra: Option<&str>) -> usize {
    let exe = fixture(src);
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if let Some(lib) = extra {
        argv.push(fixture(lib).to_str().unwrap().to_string());
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let vg = valgrind_definite(&exe, &argv);
    let r = run(&exe, &argv, &[]);
    let lh = records(r.main());
    for v in &vg {
        let top: Vec<_> = v.frames.iter().take(3).collect();
        let hit = lh.iter().find(|l| {
            l.kind == v.kind
                && l.bytes == v.bytes
                && l.indirect == v.indirect
                && l.blocks == v.blocks
                && l.frames.len() >= top.len()
                && top.iter().zip(&l.frames).all(|(a, b)| frame_matches(a, b))
        });
        assert!(
            hit.is_some(),
            "{src} {args:?}: valgrind's definitely-lost record {v:#?}\nis not in leakhunt's report {lh:#?}"
        );
    }
    vg.len()
}

#[test]
fn c_fixtures_match_valgrind() {
    assert_eq!(compare("simple.c", &[], None), 2);
    assert_eq!(compare("reallocs.c", &[], None), 4);
    // valgrind sees the posix_memalign and aligned_alloc blocks as still reachable (their
    // pointers linger in registers) and does not track pvalloc at all.
    assert_eq!(compare("aligned.c", &[], None), 2);
    assert_eq!(compare("libc_alloc.c", &[], None), 3);
    assert_eq!(compare("threads.c", &[], None), 1);
    assert_eq!(compare("exits.c", &["exit"], None), 2);
    assert_eq!(
        compare("signals.c", &[], None),
        2,
        "one of them allocated in a signal handler"
    );
}

/// The fixtures of the suite, every kind (not only definitely lost): each of memcheck's loss
/// records of the fixture's own blocks has its twin in leakhunt's (kind, direct and indirect
/// bytes, blocks, top three frames) and the other way round. Left out: aligned.c (memcheck
/// lets posix_memalign's and aligned_alloc's pointers linger in registers, so it calls those
/// blocks still reachable, and it does not track pvalloc) and the dlclosed plugin (memcheck
/// cannot name the unloaded library's frames); both are compared above on what memcheck gives.
#[test]
fn every_fixture_matches_memcheck_in_every_kind() {
    for (src, args) in [
        ("simple.c", &[][..]),
        ("reallocs.c", &[]),
        ("libc_alloc.c", &[]),
        ("threads.c", &[]),
        ("exits.c", &["exit"]),
        ("signals.c", &[]),
        ("many.c", &[]),
        ("cxx.cpp", &[]),
        ("fork.c", &[]),
    ] {
        let lh = compare_kinds_of(src, args, &[], &[]);
        assert!(!lh.is_empty(), "{src}");
    }
}

#[test]
fn dlclosed_library_matches_valgrind() {
    assert_eq!(compare("dlopen_main.c", &[], Some("plugin.c")), 1);
}

#[test]
fn hundred_thousand_leaks_match_valgrind() {
    assert_eq!(compare("many.c", &[], None), 1);
}

#[test]
fn cxx_fixture_matches_valgrind() {
    assert_eq!(compare("cxx.cpp", &[], None), 3);
}

#[test]
fn rust_fixture_matches_valgrind() {
    assert_eq!(compare("rust_leak.rs", &[], None), 2);
}

/// Every record of memcheck's (`--show-leak-kinds=all`) whose allocation is in `src` has its
/// twin in leakhunt's report (kind, direct and indirect bytes, blocks, top three frames), and
/// the other way round. Records of blocks allocated outside the fixture (libc's, the dynamic
/// linker's) are left out: leakhunt's own library changes them (one more module with TLS makes
/// glibc's per-thread table 16 bytes larger).
fn compare_kinds(src: &str, opts: &[&str], vg_flags: &[&str]) -> Vec<Leak> {
    compare_kinds_of(src, &[], opts, vg_flags)
}

/// As [`compare_kinds`], with the program's arguments.
fn compare_kinds_of(src: &str, args: &[&str], opts: &[&str], vg_flags: &[&str]) -> Vec<Leak> {
    let exe = fixture(src);
    // The fixture's blocks: allocated by it, or for it by libc (strdup, getline).
    let ours = |l: &Leak| l.frames.iter().take(3).any(|f| f.1 == src);
    let vg: Vec<Leak> = valgrind_records(&exe, args, vg_flags)
        .into_iter()
        .filter(ours)
        .collect();
    let r = run(&exe, args, opts);
    let lh: Vec<Leak> = records(r.main()).into_iter().filter(ours).collect();
    let same = |v: &Leak, l: &Leak| {
        l.kind == v.kind
            && l.bytes == v.bytes
            && l.indirect == v.indirect
            && l.blocks == v.blocks
            && l.frames.len() >= v.frames.len().min(3)
            && v.frames
                .iter()
                .take(3)
                .zip(&l.frames)
                .all(|(a, b)| frame_matches(a, b))
    };
    for v in &vg {
        assert!(
            lh.iter().any(|l| same(v, l)),
            "{src}: memcheck's record {v:#?}\nhas no twin in leakhunt's {lh:#?}"
        );
    }
    for l in &lh {
        assert!(
            vg.iter().any(|v| same(v, l)),
            "{src}: leakhunt's record {l:#?}\nhas no twin in memcheck's {vg:#?}"
        );
    }
    assert_eq!(lh.len(), vg.len(), "{src}: {lh:#?}\n{vg:#?}");
    lh
}

/// memcheck follows forks without being asked: so does leakhunt. Each process (memcheck's XML
/// per pid, leakhunt's too) has the same loss records of the fixture: the child's heap is the
/// parent's at the fork (the pair that straddles it included, elided pairs left out) plus its own.
#[test]
fn forked_children_are_followed_and_match_memcheck() {
    let exe = fixture("fork_kinds.c");
    let dir = std::env::temp_dir().join(format!("lh-fork-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = memcheck()
        .args(["--leak-check=full", "--show-leak-kinds=all", "--xml=yes"])
        .arg(format!("--xml-file={}/vg.%p.xml", dir.display()))
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = run(
        &exe,
        &[],
        &[
            "--show-leak-kinds=all",
            "--xml-file",
            &format!("{}/lh.%p.xml", dir.display()),
        ],
    );
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    // Per tool, its processes in pid order (the parent first), each one's records of the fixture.
    let per_process = |prefix: &str| -> Vec<Vec<Leak>> {
        let mut files: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let pid = name
                    .strip_prefix(prefix)?
                    .strip_suffix(".xml")?
                    .parse()
                    .ok()?;
                Some((pid, e.path()))
            })
            .collect();
        files.sort();
        files
            .iter()
            .map(|(_, f)| {
                let mut v: Vec<Leak> = parse_memcheck_xml(&std::fs::read_to_string(f).unwrap())
                    .into_iter()
                    .filter(|l| l.frames.first().is_some_and(|f| f.1 == "fork_kinds.c"))
                    .collect();
                v.sort_by_key(|l| (l.kind.clone(), l.bytes, l.frames.first().map(|f| f.2)));
                v
            })
            .collect()
    };
    let (vg, lh) = (per_process("vg."), per_process("lh."));
    assert_eq!(vg.len(), 2, "{vg:#?}");
    assert_eq!(lh.len(), 2, "{lh:#?}\n{}", r.stderr());
    let key = |l: &Leak| {
        (
            l.kind.clone(),
            l.bytes,
            l.indirect,
            l.blocks,
            l.frames.first().map(|f| f.2),
        )
    };
    for (who, (v, l)) in ["parent", "child"].iter().zip(vg.iter().zip(&lh)) {
        assert_eq!(
            v.iter().map(key).collect::<Vec<_>>(),
            l.iter().map(key).collect::<Vec<_>>(),
            "{who}: memcheck {v:#?}\nleakhunt {l:#?}"
        );
    }
    // What the figures are: the child has the tree and what it inherited.
    let line = |m: &str| Some(line_of("fork_kinds.c", m));
    let child: Vec<_> = lh[1].iter().map(key).collect();
    assert!(
        child.contains(&("definitely_lost".into(), 32, 64, 1, line("FKK_ROOT"))),
        "{child:?}"
    );
    let kids: u64 = lh[1]
        .iter()
        .filter(|l| {
            l.kind == "indirectly_lost" && l.frames[0].2 == line_of("fork_kinds.c", "FKK_KID")
        })
        .map(|l| l.bytes)
        .sum();
    assert_eq!(kids, 64, "{child:?}");
    assert!(
        child.contains(&("still_reachable".into(), 64, 0, 1, line("FKK_KEPT"))),
        "{child:?}"
    );
    assert!(
        child.contains(&("still_reachable".into(), 80, 0, 1, line("FKK_PENDING"))),
        "{child:?}"
    );
    assert!(
        child.contains(&("definitely_lost".into(), 48, 0, 1, line("FKK_PARENT_LOST"))),
        "{child:?}"
    );
    let parent: Vec<_> = lh[0].iter().map(key).collect();
    assert!(
        parent.iter().all(|k| k.4 != line("FKK_PENDING")),
        "{parent:?}"
    );
    assert!(
        parent.contains(&("still_reachable".into(), 64, 0, 1, line("FKK_KEPT"))),
        "{parent:?}"
    );
    assert!(
        parent.contains(&("definitely_lost".into(), 96, 0, 1, line("FKK_PARENT_LATE"))),
        "{parent:?}"
    );
    let mut lh_keys: Vec<Vec<_>> = lh.iter().map(|v| v.iter().map(key).collect()).collect();
    for v in &mut lh_keys {
        v.sort();
    }
    // The preload alone: the child's trace is TRACE.<pid>, and its heap scan at exit (the
    // helper, reading the parent's trace beside the child's) gives the same records. Also when
    // the parent's helper started early, before the fork (the parent sleeps until it has): the
    // child leaves it to the parent and starts its own.
    for early in [false, true] {
        let trace = dir.join(format!("p{early}.trace"));
        let mut cmd = std::process::Command::new(&exe);
        if early {
            cmd.arg("1000").env("LEAKHUNT_HELPER_EARLY_KB", "1");
        } else {
            cmd.env("LEAKHUNT_HELPER_EARLY_KB", "0");
        }
        let child = cmd
            .env("LD_PRELOAD", preload())
            .env("LEAKHUNT_OUT", &trace)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if early {
            assert!(wait_for(|| early_helper_of(child.id()).is_some()));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0));
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut traces: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(&format!("p{early}.trace")))
            .collect();
        traces.sort();
        assert_eq!(traces.len(), 2, "{traces:?}");
        let (_, rep) = report(&traces.iter().map(|p| p.as_path()).collect::<Vec<_>>());
        let alone: Vec<Vec<_>> = rep["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let mut v: Vec<_> = records(p)
                    .into_iter()
                    .filter(|l| l.frames.first().is_some_and(|f| f.1 == "fork_kinds.c"))
                    .map(|l| key(&l))
                    .collect();
                v.sort();
                v
            })
            .collect();
        assert_eq!(alone, lh_keys, "early: {early}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_kind_matches_memcheck() {
    let lh = compare_kinds("kinds.c", &[], &[]);
    let count = |k: &str| lh.iter().filter(|l| l.kind == k).count();
    // The tree (a head and two nodes), the cycle (two), the dead frame; the interior pointer,
    // the chain below it; the global, length64, the thread's stack and TLS.
    assert_eq!(count("definitely_lost"), 3);
    assert_eq!(count("indirectly_lost"), 3);
    assert_eq!(count("possibly_lost"), 3);
    assert_eq!(count("still_reachable"), 4);
    let tree = lh
        .iter()
        .find(|l| l.frames[0].2 == line_of("kinds.c", "K_ROOT"))
        .unwrap();
    assert_eq!(
        (tree.bytes, tree.indirect, &*tree.kind),
        (32, 64, "definitely_lost")
    );
}

/// A pool the program mapped itself, merged by the kernel with a large block's own mapping,
/// is a root like any mapping of the program's: the block only it points to is reachable.
#[test]
fn a_pool_merged_with_a_large_blocks_mapping_is_a_root() {
    let exe = fixture("anon_merge.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(
        r.stdout(),
        "merged\n",
        "the case needs the two mappings merged"
    );
    // The blocks of the final try, by kind (earlier tries differ between the two tools: where
    // the mappings fell).
    let at = |records: &[Leak], m: &str| {
        records
            .iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.1 == "anon_merge.c"))
            .filter(|l| l.frames[0].2 == line_of("anon_merge.c", m))
            .map(|l| (l.kind.clone(), l.bytes / l.blocks))
            .collect::<Vec<_>>()
    };
    let lh = records(r.main());
    assert_eq!(at(&lh, "AM_HELD"), [("still_reachable".to_string(), 100)]);
    let vg = valgrind_records(&exe, &[], &[]);
    assert_eq!(at(&vg, "AM_HELD"), at(&lh, "AM_HELD"), "{vg:#?}");
    assert!(
        at(&lh, "AM_BIG").iter().all(|k| k.0 == "still_reachable"),
        "{lh:#?}"
    );
}

/// With the preload alone (no `leakhunt run`), the process starts a helper at exit that makes
/// the same heap scan: its trace reports the same kinds, record for record, as `run` and memcheck.
#[test]
fn the_preload_alone_sorts_blocks_into_the_same_kinds() {
    let exe = fixture("kinds.c");
    let dir = std::env::temp_dir().join(format!("lh-alone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("k.trace");
    let out = std::process::Command::new(&exe)
        .env("LD_PRELOAD", preload())
        .env("LEAKHUNT_OUT", &trace)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, plain(&exe, &[]).stdout);
    let (rep, alone) = report(&[&trace]);
    assert!(
        rep.status.success(),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    let key = |l: &Leak| {
        (
            l.kind.clone(),
            l.bytes,
            l.indirect,
            l.blocks,
            l.frames.first().cloned(),
        )
    };
    let ours = |p: &serde_json::Value| {
        let mut v: Vec<_> = records(p)
            .iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.1 == "kinds.c"))
            .map(key)
            .collect();
        v.sort();
        v
    };
    // No helper to start, or a trace over the limit: the program runs as ever, the report
    // says why there are no kinds (and the user is told once).
    for (var, val, why) in [
        (
            "LEAKHUNT_CLI",
            "/nonexistent/leakhunt",
            "could not be started",
        ),
        (
            "LEAKHUNT_REACH_LIMIT_MB",
            "0",
            "the trace is over LEAKHUNT_REACH_LIMIT_MB",
        ),
    ] {
        let t = dir.join(format!("{var}.trace"));
        let o = std::process::Command::new(&exe)
            .env("LD_PRELOAD", preload())
            .env("LEAKHUNT_OUT", &t)
            .env(var, val)
            .output()
            .unwrap();
        assert_eq!(o.stdout, out.stdout, "{var}");
        assert_eq!(o.status.code(), Some(0), "{var}");
        let (_, rep) = report(&[&t]);
        let p = &rep["processes"][0];
        assert!(
            p["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w.as_str().unwrap().contains(why)),
            "{var}: {:#}",
            p["warnings"]
        );
        assert!(records(p).iter().all(|l| l.kind == "unfreed"), "{var}");
        let told = String::from_utf8_lossy(&o.stderr)
            .matches("no heap scan at exit")
            .count();
        assert_eq!(told, usize::from(var == "LEAKHUNT_CLI"), "{var}");
    }
    let live = run(&exe, &[], &[]);
    let (a, b) = (ours(&alone["processes"][0]), ours(live.main()));
    assert_eq!(a.len(), 13, "{a:#?}");
    assert_eq!(a, b);
    assert!(
        a.iter().any(|k| k.0 == "definitely_lost") && a.iter().any(|k| k.0 == "still_reachable")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Memory leakhunt's library freed before `main` comes back to the program uninitialised: none
/// of leakhunt's words may be left in it to read as the program's pointers (memcheck keeps its
/// own memory apart). Every block the program leaks is definitely lost, as memcheck says.
#[test]
fn leakhunts_freed_memory_holds_no_pointers_for_the_scan() {
    let exe = fixture("stale_own.c");
    let r = run(&exe, &[], &[]);
    assert_eq!(r.stdout(), "0 stale\n");
    let at = |records: &[Leak]| {
        records
            .iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.1 == "stale_own.c"))
            .filter(|l| l.frames[0].2 == line_of("stale_own.c", "SO_LEAK"))
            .map(|l| (l.kind.clone(), l.bytes, l.blocks))
            .collect::<Vec<_>>()
    };
    let lh = at(&records(r.main()));
    assert_eq!(lh, [("definitely_lost".to_string(), 64 * 32, 64)]);
    assert_eq!(at(&valgrind_records(&exe, &[], &[])), lh);
}

#[test]
fn heuristics_match_memcheck() {
    let lh = compare_kinds("heuristics.cpp", &[], &[]);
    assert!(lh.iter().all(|l| l.kind == "still_reachable"), "{lh:#?}");
    assert_eq!(lh.len(), 3);
    // Without them, memcheck and leakhunt both call the three possibly lost.
    let lh = compare_kinds(
        "heuristics.cpp",
        &["--leak-check-heuristics=none"],
        &["--leak-check-heuristics=none"],
    );
    assert!(lh.iter().all(|l| l.kind == "possibly_lost"), "{lh:#?}");
}

/// `--xml-file` reads like memcheck's XML: the same parser (and protocol 4's structural
/// check, which memcheck's own document passes too) finds every record of the JSON report,
/// shown kinds only, with the same kind, bytes and blocks.
#[test]
fn xml_reads_like_memchecks() {
    let exe = fixture("kinds.c");
    let xml = std::env::temp_dir().join(format!("lh-kinds-{}.xml", std::process::id()));
    let r = run(
        &exe,
        &[],
        &[
            "--xml-file",
            xml.to_str().unwrap(),
            "--show-leak-kinds",
            "definite,possible",
        ],
    );
    let text = std::fs::read_to_string(&xml).unwrap();
    let _ = std::fs::remove_file(&xml);
    let from_xml = parse_memcheck_xml(&text);
    let from_json: Vec<Leak> = records(r.main())
        .into_iter()
        .filter(|l| l.kind == "definitely_lost" || l.kind == "possibly_lost")
        .collect();
    assert_eq!(from_xml.len(), from_json.len(), "{from_xml:#?}");
    for (x, j) in from_xml.iter().zip(&from_json) {
        assert_eq!(
            (&x.kind, x.bytes, x.indirect, x.blocks),
            (&j.kind, j.bytes, j.indirect, j.blocks)
        );
        assert!(x
            .frames
            .iter()
            .zip(&j.frames)
            .take(3)
            .all(|(a, b)| a.0 == b.0));
    }
    assert!(text.contains("<protocoltool>memcheck</protocoltool>"));
    // memcheck's own document passes the same structural check.
    assert!(!valgrind_records(&exe, &[], &[]).is_empty());
}

/// A suppression file written by hand and one written by memcheck's `--gen-suppressions=all`
/// both suppress the records they match; the LEAK SUMMARY counts them as suppressed, not in
/// their kinds, and `--error-exitcode` no longer fails on them.
#[test]
fn suppressions_by_hand_and_by_memcheck() {
    let exe = fixture("kinds.c");
    let dir = std::env::temp_dir().join(format!("lh-supp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hand = dir.join("hand.supp");
    std::fs::write(
        &hand,
        format!(
            "# the leaked tree, wherever it is allocated below leak_tree\n{{\n   tree\n   Memcheck:Leak\n   match-leak-kinds: definite,indirect\n   ...\n   fun:leak_tree\n}}\n{{\n   global-by-source\n   Memcheck:Leak\n   match-leak-kinds: reachable\n   ...\n   src:kinds.c:{}\n}}\n",
            line_of("kinds.c", "K_GLOBAL")
        ),
    )
    .unwrap();
    let r = run(
        &exe,
        &[],
        &[
            "--suppressions",
            hand.to_str().unwrap(),
            "--show-leak-kinds=all",
        ],
    );
    let reach = &r.main()["reachability"];
    // The tree (32 + 2 x 32) and the global (100) left their kinds.
    assert_eq!(reach["suppressed"], serde_json::json!([196, 4]), "{reach}");
    assert_eq!(reach["definitely_lost"], serde_json::json!([88, 2]));
    assert_eq!(reach["indirectly_lost"], serde_json::json!([48, 1]));
    let suppressed: Vec<_> = records(r.main())
        .into_iter()
        .zip(r.main()["leaks"].as_array().unwrap())
        .filter(|(_, j)| j.get("suppressed").is_some())
        .map(|(l, j)| {
            (
                l.frames[0].0.clone(),
                j["suppressed"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(suppressed.len(), 4, "{suppressed:?}");
    assert!(
        r.stderr()
            .contains("        suppressed: 196 bytes in 4 blocks"),
        "{}",
        r.stderr()
    );
    assert!(
        !r.stderr().contains("leak_tree (kinds.c"),
        "suppressed records are not shown"
    );
    // `-s`: each suppression used, with what it took, exactly as memcheck says it.
    let used = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| {
                l.split_once("used_suppression:")
                    .map(|(_, u)| u.to_string())
            })
            .collect()
    };
    let r = run(
        &exe,
        &[],
        &[
            "-s",
            "--suppressions",
            hand.to_str().unwrap(),
            "--show-leak-kinds=all",
        ],
    );
    let mc = memcheck()
        .args(["-s", "--leak-check=full", "--show-leak-kinds=all"])
        .arg(format!("--suppressions={}", hand.display()))
        .arg(&exe)
        .output()
        .unwrap();
    let mc = String::from_utf8_lossy(&mc.stderr).to_string();
    assert_eq!(
        used(&r.stderr()),
        vec![
            format!(
                "      1 global-by-source {}:10 suppressed: 100 bytes in 1 blocks",
                hand.display()
            ),
            format!(
                "      3 tree {}:3 suppressed: 160 bytes in 3 blocks",
                hand.display()
            ),
        ],
        "{}",
        r.stderr()
    );
    assert_eq!(used(&r.stderr()), used(&mc), "{mc}");

    // memcheck's own: every record of the fixture it printed a suppression for is suppressed,
    // and what remains fails nothing.
    let out = memcheck()
        .args([
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--gen-suppressions=all",
        ])
        .arg(&exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let gen: String = text
        .lines()
        .filter(|l| !l.starts_with("=="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(gen.matches("Memcheck:Leak").count() >= 13, "{text}");
    let vg = dir.join("memcheck.supp");
    std::fs::write(&vg, &gen).unwrap();
    let r = run(
        &exe,
        &[],
        &[
            "--suppressions",
            vg.to_str().unwrap(),
            "--error-exitcode",
            "9",
            "--show-leak-kinds=all",
        ],
    );
    // The same file, memcheck's own run: the same blocks suppressed.
    let mc = memcheck()
        .args(["--leak-check=full", "--show-leak-kinds=all"])
        .arg(format!("--suppressions={}", vg.display()))
        .arg(&exe)
        .output()
        .unwrap();
    let mc = String::from_utf8_lossy(&mc.stderr).to_string();
    let suppressed_line = |text: &str| {
        text.lines()
            .find_map(|l| l.split_once("suppressed: ").map(|(_, b)| b.to_string()))
    };
    // Every block memcheck's own suppressions took, leakhunt's take too; the bytes differ by the
    // thread's DTV alone (leakhunt's library adds a module with TLS: glibc's table is 16 bytes
    // larger, 304 for memcheck's 288).
    let figures = |text: &str| -> (u64, u64) {
        let l = suppressed_line(text).unwrap_or_else(|| panic!("no suppressed line: {text}"));
        let n: Vec<u64> = l
            .split_whitespace()
            .filter_map(|w| w.replace(',', "").parse().ok())
            .collect();
        (n[0], n[1])
    };
    let (lh_bytes, lh_blocks) = figures(&r.stderr());
    let (mc_bytes, mc_blocks) = figures(&mc);
    assert_eq!(lh_blocks, mc_blocks, "{mc}\n{}", r.stderr());
    assert_eq!(lh_bytes, mc_bytes + 16, "{mc}\n{}", r.stderr());
    let leaks = r.main()["leaks"].as_array().unwrap().clone();
    for l in &leaks {
        let top = l["stack"][0]["file"].as_str().unwrap_or("");
        if top.ends_with("kinds.c") {
            assert!(l.get("suppressed").is_some(), "not suppressed: {l:#}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `leakhunt compare-valgrind`: on cxx.cpp every record agrees (exit 0); on kinds.c it names
/// the one difference, glibc's per-thread TLS table, 16 bytes larger under leakhunt's preload
/// (one more module with TLS), and exits 1.
#[test]
fn compare_valgrind_pairs_the_records() {
    let dir = std::env::temp_dir().join(format!("lh-cmpvg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let both = |src: &str| -> std::process::Output {
        let exe = fixture(src);
        let (vg, lh) = (
            dir.join(format!("{src}.vg.xml")),
            dir.join(format!("{src}.lh.xml")),
        );
        let st = memcheck()
            .args(["--leak-check=full", "--show-leak-kinds=all", "--xml=yes"])
            .arg(format!("--xml-file={}", vg.display()))
            .arg(&exe)
            .output()
            .unwrap();
        assert!(vg.is_file(), "{}", String::from_utf8_lossy(&st.stderr));
        run(
            &exe,
            &[],
            &["--show-leak-kinds=all", "--xml-file", lh.to_str().unwrap()],
        );
        std::process::Command::new(leakhunt())
            .arg("compare-valgrind")
            .args([&vg, &lh])
            .output()
            .unwrap()
    };
    let out = both("cxx.cpp");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("5 loss records agree"), "{text}");
    let out = both("kinds.c");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("13 loss records agree (kind, bytes, blocks, top three frames); 1 only in memcheck's, 1 only in leakhunt's"),
        "{text}"
    );
    assert!(
        text.contains("only in leakhunt's: 304 bytes in 1 blocks are possibly lost"),
        "{text}"
    );
    assert!(text.contains("by allocate_dtv"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stripped program (no `main` to stop at): memcheck's stacks end at "(below main)", the
/// innermost libc start-up frame, and so do leakhunt's, frame for frame; the tracer's own
/// wrapper of main never shows.
#[test]
fn a_stripped_program_ends_below_main() {
    let exe = fixture("simple.c");
    let stripped = exe.with_file_name(format!("simple-stripped-{}", std::process::id()));
    std::fs::copy(&exe, &stripped).unwrap();
    let st = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg(&stripped)
        .status()
        .unwrap();
    assert!(st.success());
    let vg = valgrind_definite(&stripped, &[]);
    let r = run(&stripped, &[], &[]);
    let lh = records(r.main());
    let _ = std::fs::remove_file(&stripped);
    assert_eq!(vg.len(), 2, "{vg:#?}");
    for v in &vg {
        assert_eq!(v.frames.last().unwrap().0, "(below main)", "{v:#?}");
        let twin = lh
            .iter()
            .find(|l| l.kind == v.kind && l.bytes == v.bytes && l.blocks == v.blocks)
            .unwrap_or_else(|| panic!("{v:#?} not in {lh:#?}"));
        let names: Vec<&str> = twin.frames.iter().map(|f| f.0.as_str()).collect();
        // memcheck's XML has no <fn> where the function is unknown; its text says ???.
        let want: Vec<&str> = v
            .frames
            .iter()
            .map(|f| if f.0.is_empty() { "???" } else { f.0.as_str() })
            .collect();
        assert_eq!(names, want);
    }
    assert!(!r.stderr().contains("main_wrapper"), "{}", r.stderr());
}

/// Real programs (python3, perl, git, sqlite3, grep, gawk, jq, xmllint, gzip, and programs that
/// fork) under memcheck and leakhunt, process by process: every kind's bytes and blocks agree
/// (`scripts/real-programs`; grep's records group one callsite differently, its totals agree).
#[test]
fn real_programs_sort_their_blocks_as_memcheck_does() {
    let out = workspace().join(format!("target/test-scratch/real-{}", std::process::id()));
    let r = std::process::Command::new(workspace().join("scripts/real-programs"))
        .arg(bin_dir())
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        r.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("program "))
        .skip(1)
        .filter(|l| !l.trim().is_empty() && !l.contains("skipped"))
        .collect();
    assert!(rows.len() >= 6, "{text}");
    for row in &rows {
        let cells: Vec<&str> = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(cells.len(), 6, "{row}");
        for kind in &cells[1..5] {
            assert!(kind.contains(" = "), "{row}\n{text}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}
