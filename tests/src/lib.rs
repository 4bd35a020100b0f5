//! Test harness: finds the built `leakhunt` and `libleakhunt.so`, compiles fixture programs once,
//! runs them under leakhunt (and valgrind), and reads the reports.
//!
//! The binaries come from `target/release` (build them first: `scripts/test` does), or from
//! `$LEAKHUNT_BIN_DIR`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub use serde_json::Value;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Directory holding `leakhunt` and `libleakhunt.so`.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("LEAKHUNT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release"));
    for f in ["leakhunt", "libleakhunt.so"] {
        assert!(
            dir.join(f).is_file(),
            "{} is missing: build first with `cargo build --release --workspace` (scripts/test does)",
            dir.join(f).display()
        );
    }
    dir
}

pub fn leakhunt() -> PathBuf {
    bin_dir().join("leakhunt")
}

pub fn preload() -> PathBuf {
    bin_dir().join("libleakhunt.so")
}

pub fn fixtures_src() -> PathBuf {
    workspace().join("tests/fixtures")
}

fn fixtures_out() -> PathBuf {
    let d = workspace().join("target/fixtures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

static BUILD: Mutex<()> = Mutex::new(());

/// C and C++ fixtures: debug info, optimised, no frame pointers, no inlining or tail calls (so
/// every function named in an answer has its own frame), no builtin malloc elision.
pub const CFLAGS: &[&str] = &[
    "-g",
    "-O1",
    "-fomit-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-fno-inline",
    "-fno-builtin",
];

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `tests/fixtures/<src>` (once per test process; rebuilt when the source is newer).
pub fn fixture(src: &str) -> PathBuf {
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let input = fixtures_src().join(src);
    let stem = Path::new(src).file_stem().unwrap().to_str().unwrap();
    let ext = Path::new(src).extension().unwrap().to_str().unwrap();
    let (out, extra): (PathBuf, Vec<&str>) = match (stem, ext) {
        ("plugin", "c") => (
            fixtures_out().join("libplugin.so"),
            vec!["-shared", "-fPIC"],
        ),
        // dladdr names `main` only in the dynamic symbol table.
        ("unwind_ref", "c") => (fixtures_out().join(stem), vec!["-rdynamic"]),
        _ => (fixtures_out().join(stem), vec![]),
    };
    let fresh = |o: &Path| {
        let (Ok(a), Ok(b)) = (std::fs::metadata(o), std::fs::metadata(&input)) else {
            return false;
        };
        a.modified().unwrap() >= b.modified().unwrap()
    };
    if fresh(&out) {
        return out;
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    match ext {
        "c" => run_ok(
            Command::new("gcc")
                .args(CFLAGS)
                .args(&extra)
                .arg("-o")
                .arg(&tmp)
                .arg(&input)
                .arg("-lpthread")
                .arg("-ldl")
                .arg("-lm"),
        ),
        "cpp" => run_ok(
            Command::new("g++")
                .args(CFLAGS)
                .args(&extra)
                .arg("-o")
                .arg(&tmp)
                .arg(&input),
        ),
        "rs" => run_ok(
            Command::new("rustc")
                .args(["--edition", "2021", "-g", "-C", "opt-level=1", "-o"])
                .arg(&tmp)
                .arg(&input),
        ),
        _ => panic!("unknown fixture kind {src}"),
    }
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// The line of `tests/fixtures/<file>` that carries `// @MARKER` (or `/* @MARKER */`).
pub fn line_of(file: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(fixtures_src().join(file)).unwrap();
    let tag = format!("@{marker}");
    let hits: Vec<u32> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.split_whitespace().any(|w| w == tag))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    assert_eq!(hits.len(), 1, "marker {tag} must appear once in {file}");
    hits[0]
}

pub struct Run {
    pub out: Output,
    pub json: Value,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// The only process, or the first (the program itself).
    pub fn main(&self) -> &Value {
        &self.json["processes"][0]
    }
    pub fn processes(&self) -> &Vec<Value> {
        self.json["processes"].as_array().unwrap()
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = workspace().join("target/test-scratch");
    std::fs::create_dir_all(&d).unwrap();
    d.join(
        format!(
            "{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(['(', ')'], ""),
    )
}

/// `leakhunt run [opts] --json F -- program args`.
pub fn run(program: &Path, args: &[&str], opts: &[&str]) -> Run {
    let json = scratch("report.json");
    let out = Command::new(leakhunt())
        .arg("run")
        .args(opts)
        .arg("--json")
        .arg(&json)
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&json);
    Run {
        out,
        json: serde_json::from_str(&text).unwrap(),
    }
}

/// `leakhunt report --json F TRACES...`: its output and the JSON report.
pub fn report(traces: &[&Path]) -> (Output, Value) {
    let json = scratch("report-offline.json");
    let out = Command::new(leakhunt())
        .args(["report", "--json"])
        .arg(&json)
        .args(traces)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let _ = std::fs::remove_file(&json);
    (out, serde_json::from_str(&text).unwrap())
}

/// The program alone, for comparing output and status.
pub fn plain(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

/// A leak record in leakhunt's JSON, flattened for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    pub bytes: u64,
    pub blocks: u64,
    /// (function, file basename, line) per frame, innermost first.
    pub frames: Vec<(String, String, u32)>,
}

fn base(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_string()
}

pub fn leaks(process: &Value) -> Vec<Leak> {
    process["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Leak {
            bytes: l["bytes"].as_u64().unwrap(),
            blocks: l["blocks"].as_u64().unwrap(),
            frames: l["stack"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    (
                        f["function"].as_str().unwrap_or("???").to_string(),
                        f["file"].as_str().map(base).unwrap_or_default(),
                        f["line"].as_u64().unwrap_or(0) as u32,
                    )
                })
                .collect(),
        })
        .collect()
}

/// The leak whose stack contains `function` at `file:line` (exactly one must).
pub fn leak_at(process: &Value, file: &str, line: u32) -> Leak {
    let all = leaks(process);
    let hits: Vec<&Leak> = all
        .iter()
        .filter(|l| l.frames.iter().any(|f| f.1 == file && f.2 == line))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one leak through {file}:{line}, found {}: {all:#?}",
        hits.len()
    );
    hits[0].clone()
}

/// The leak through the line of `file` marked `@marker`, which must be `bytes` in `blocks`.
pub fn expect_leak(process: &Value, file: &str, marker: &str, bytes: u64, blocks: u64) -> Leak {
    let l = leak_at(process, file, line_of(file, marker));
    assert_eq!(
        (l.bytes, l.blocks),
        (bytes, blocks),
        "leak at {file} @{marker}: {l:#?}"
    );
    l
}

pub fn summary(process: &Value, key: &str) -> u64 {
    process["summary"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("summary.{key} missing: {process}"))
}

/// valgrind memcheck's definitely-lost records for a program: (bytes, blocks, frames) with
/// valgrind's own replacement frames (vg_replace_malloc) removed.
pub fn valgrind_definite(program: &Path, args: &[&str]) -> Vec<Leak> {
    let xml = scratch("vg.xml");
    let out = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--xml=yes",
            "--child-silent-after-fork=yes",
        ])
        .arg(format!("--xml-file={}", xml.display()))
        .arg(program)
        .args(args)
        .output()
        .expect("valgrind is installed on every machine here");
    let text = std::fs::read_to_string(&xml).unwrap_or_else(|e| {
        panic!(
            "valgrind wrote no XML ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&xml);
    let doc = roxmltree::Document::parse(&text).unwrap();
    let mut v = Vec::new();
    for e in doc.descendants().filter(|n| n.has_tag_name("error")) {
        let kind = e
            .children()
            .find(|c| c.has_tag_name("kind"))
            .and_then(|k| k.text())
            .unwrap_or("");
        if kind != "Leak_DefinitelyLost" {
            continue;
        }
        let xw = e.children().find(|c| c.has_tag_name("xwhat")).unwrap();
        let num = |tag: &str| -> u64 {
            xw.children()
                .find(|c| c.has_tag_name(tag))
                .and_then(|c| c.text())
                .unwrap()
                .parse()
                .unwrap()
        };
        let stack = e.children().find(|c| c.has_tag_name("stack")).unwrap();
        let frames = stack
            .children()
            .filter(|c| c.has_tag_name("frame"))
            .filter(|f| {
                let obj = f
                    .children()
                    .find(|c| c.has_tag_name("obj"))
                    .and_then(|c| c.text())
                    .unwrap_or("");
                !obj.contains("vgpreload")
            })
            .map(|f| {
                let get = |t: &str| {
                    f.children()
                        .find(|c| c.has_tag_name(t))
                        .and_then(|c| c.text())
                        .unwrap_or("")
                };
                (
                    get("fn").to_string(),
                    get("file").to_string(),
                    get("line").parse().unwrap_or(0),
                )
            })
            .collect();
        // <leakedbytes> counts the blocks this record points to as well ("137 (56 direct, 81
        // indirect) bytes"); leakhunt reports each block under its own stack, so compare direct.
        let text = xw
            .children()
            .find(|c| c.has_tag_name("text"))
            .and_then(|c| c.text())
            .unwrap_or("");
        let direct = text
            .split_once(" (")
            .and_then(|(_, rest)| rest.split_once(" direct"))
            .map(|(n, _)| n.replace(',', "").parse::<u64>().unwrap());
        v.push(Leak {
            bytes: direct.unwrap_or_else(|| num("leakedbytes")),
            blocks: num("leakedblocks"),
            frames,
        });
    }
    v
}
