//! Verdict stability: each growth shape, run 10 times under `leakhunt run --epoch 100ms` with a
//! second core kept busy, gets the same verdict at least 9 times, and the right one: a leak, a
//! cache that fills and stays (plateau), a run too short to judge (`insufficient`: "too little
//! evidence"). The table of verdicts is
//! printed (`cargo test --test verdict_stability -- --nocapture`; `scripts/bench/verdicts` puts
//! it in BENCHMARKS.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use leakhunt_tests::*;
use serde_json::Value;

const ROUNDS: usize = 10;

/// A callsite of interest: which growth entries are its own (the largest that matches speaks),
/// and the verdict it must get.
struct Site {
    label: &'static str,
    want: &'static str,
    matches: Box<dyn Fn(&Value) -> bool>,
}

struct Case {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    sites: Vec<Site>,
    /// The process's own verdict, when it is the point (a run too short to judge).
    process_want: Option<&'static str>,
}

/// A frame of `file` (its name's end) at `line`.
fn at(file: &'static str, line: u32) -> Box<dyn Fn(&Value) -> bool> {
    Box::new(move |e: &Value| {
        e["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["file"].as_str().is_some_and(|x| x.ends_with(file)) && f["line"] == line)
    })
}

/// A frame of `file`, and blocks of `size` bytes each (JIT code may inline one JS function
/// into another: the size tells the callsites apart).
fn in_file_of_size(file: &'static str, size: i64) -> Box<dyn Fn(&Value) -> bool> {
    Box::new(move |e: &Value| {
        let (b, n) = (
            e["delta_bytes"].as_i64().unwrap(),
            e["delta_blocks"].as_i64().unwrap(),
        );
        n > 0
            && b == size * n
            && e["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["file"].as_str().is_some_and(|x| x.ends_with(file)))
    })
}

fn cases() -> Vec<Case> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let src = |f: &str| fixtures_src().join(f).to_str().unwrap().to_string();
    vec![
        Case {
            name: "steady (C)",
            program: fixture("../../examples/steady.c"),
            args: s(&["--seconds", "3", "--rate", "3000"]),
            sites: vec![
                Site {
                    label: "steady.c:88 the session leak",
                    want: "leak",
                    matches: at("steady.c", 88),
                },
                Site {
                    label: "steady.c:76 the LRU cache's entries",
                    want: "plateau",
                    matches: at("steady.c", 76),
                },
                Site {
                    label: "steady.c:78 the LRU cache's values",
                    want: "plateau",
                    matches: at("steady.c", 78),
                },
            ],
            process_want: None,
        },
        Case {
            name: "steady_cxx (C++)",
            program: fixture("../../examples/steady_cxx.cpp"),
            args: s(&["--seconds", "3"]),
            sites: vec![
                Site {
                    label: "steady_cxx.cpp:25 the session leak",
                    want: "leak",
                    matches: at("steady_cxx.cpp", 25),
                },
                Site {
                    label: "steady_cxx.cpp:52 the LRU cache's strings",
                    want: "plateau",
                    matches: at("steady_cxx.cpp", 52),
                },
            ],
            process_want: None,
        },
        Case {
            name: "cachefill (C)",
            program: fixture("../../scripts/bench/cachefill.c"),
            args: s(&["3"]),
            sites: vec![
                Site {
                    label: "cachefill.c:23 a cache filled in steps, then churning",
                    want: "plateau",
                    matches: at("cachefill.c", 23),
                },
                Site {
                    label: "cachefill.c:29 a small leak beside it",
                    want: "leak",
                    matches: at("cachefill.c", 29),
                },
            ],
            process_want: None,
        },
        Case {
            name: "verdict_lru.py (CPython 3.11)",
            program: PathBuf::from("/usr/bin/python3.11"),
            args: vec![src("verdict_lru.py"), "3".into()],
            sites: vec![
                Site {
                    label: "functools.lru_cache of 600 values",
                    want: "plateau",
                    matches: at("verdict_lru.py", line_of("verdict_lru.py", "PY_LRU_VALUE")),
                },
                Site {
                    label: "a list kept forever",
                    want: "leak",
                    matches: at("verdict_lru.py", line_of("verdict_lru.py", "PY_LEAKED")),
                },
            ],
            process_want: None,
        },
        Case {
            name: "verdict_cache.js (node)",
            program: PathBuf::from("node"),
            args: vec![
                "--perf-basic-prof".into(),
                src("verdict_cache.js"),
                "3.5".into(),
            ],
            sites: vec![
                Site {
                    label: "a Map of 600 Buffers, filled then read",
                    want: "plateau",
                    matches: in_file_of_size("verdict_cache.js", 800),
                },
                Site {
                    label: "an array of Buffers kept forever",
                    want: "leak",
                    matches: in_file_of_size("verdict_cache.js", 600),
                },
            ],
            process_want: None,
        },
        Case {
            name: "verdict_short (C)",
            program: fixture("verdict_short.c"),
            args: vec![],
            sites: vec![],
            process_want: Some("insufficient"),
        },
    ]
}

/// The verdict of each site (and the process's) in one run.
fn run_once(c: &Case) -> (Vec<String>, String) {
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let r = run(&c.program, &args, &["--epoch", "100ms", "-q"]);
    assert_eq!(r.out.status.code(), Some(0), "{}: {}", c.name, r.stderr());
    let p = r.main();
    remove_jit_files(&p["pid"]);
    let growth = p["growth"].as_array().unwrap();
    let sites = c
        .sites
        .iter()
        .map(|s| {
            growth
                .iter()
                .filter(|e| (s.matches)(e))
                .max_by_key(|e| e["delta_bytes"].as_i64().unwrap())
                .map_or("stable".to_string(), |e| {
                    e["verdict"].as_str().unwrap().to_string()
                })
        })
        .collect();
    let process = p["timeline"]["verdict"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    (sites, process)
}

#[test]
fn every_shape_gets_the_same_right_verdict_nine_times_in_ten_with_a_core_busy() {
    // The second core kept busy for the whole measurement.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        })
    };
    let mut rows: Vec<(String, String, &str, BTreeMap<String, usize>)> = Vec::new();
    for c in cases() {
        let mut per_site: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); c.sites.len()];
        let mut process: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..ROUNDS {
            let (sites, p) = run_once(&c);
            for (i, v) in sites.into_iter().enumerate() {
                *per_site[i].entry(v).or_default() += 1;
            }
            *process.entry(p).or_default() += 1;
        }
        for (s, seen) in c.sites.iter().zip(per_site) {
            rows.push((c.name.to_string(), s.label.to_string(), s.want, seen));
        }
        if let Some(want) = c.process_want {
            rows.push((c.name.to_string(), "the process".into(), want, process));
        }
    }
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();

    let mut table = format!(
        "| program | callsite | expected | verdicts in {ROUNDS} runs (second core busy) | expected seen |\n|---|---|---|---|---:|\n"
    );
    let mut failed = Vec::new();
    for (prog, label, want, seen) in &rows {
        let mut list: Vec<(&String, &usize)> = seen.iter().collect();
        list.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let got = seen.get(*want).copied().unwrap_or(0);
        table += &format!(
            "| {prog} | {label} | {want} | {} | {got}/{ROUNDS} |\n",
            list.iter()
                .map(|(v, n)| format!("{v} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if got * 10 < ROUNDS * 9 {
            failed.push(format!("{prog}: {label}: {want} in {got} of {ROUNDS}"));
        }
    }
    println!("{table}");
    assert!(failed.is_empty(), "{failed:#?}\n{table}");
}
