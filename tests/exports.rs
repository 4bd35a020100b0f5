//! Where users already look (issue 15): pprof profiles read back by `go tool pprof` and decoded
//! here, folded stacks and flame graphs, shell completions and manual pages. Every figure is
//! known in advance from `tests/fixtures/profiled.c`: each round leaks one 48-byte block at
//! `leak_node` and allocates and frees 100 bytes twice at `scratch`, both called from
//! `handle_request`, which is inlined into `main`.
//!
//! `go tool pprof` must be installed (Debian's `golang-go`; `.ci/run` installs it): without it
//! these tests fail, saying so.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use leakhunt_tests::*;
use prost::Message;

/// profile.proto's messages as this test reads them: written here from google/pprof's
/// `proto/profile.proto`, apart from the CLI's own, so that a wrong field number there shows.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

const SRC: &str = "profiled.c";

/// A profile read back: its message, and its samples as (stack of (function, line) per
/// location, leaf first; values).
struct Read_ {
    m: proto::Profile,
}

type Stack = Vec<Vec<(String, i64)>>;

impl Read_ {
    fn open(path: &Path) -> Read_ {
        let gz = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&gz[..2], [0x1f, 0x8b], "{}: not gzipped", path.display());
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        Read_ {
            m: proto::Profile::decode(&raw[..]).unwrap(),
        }
    }

    fn s(&self, i: i64) -> &str {
        &self.m.string_table[usize::try_from(i).unwrap()]
    }

    fn location(&self, id: u64) -> &proto::Location {
        let l = &self.m.location[id as usize - 1];
        assert_eq!(l.id, id, "locations are numbered from 1 in order");
        l
    }

    fn lines(&self, l: &proto::Location) -> Vec<(String, i64)> {
        l.line
            .iter()
            .map(|x| {
                let f = &self.m.function[x.function_id as usize - 1];
                assert_eq!(f.id, x.function_id);
                (self.s(f.name).to_string(), x.line)
            })
            .collect()
    }

    /// Every sample: its stack and values, in the profile's order.
    fn samples(&self) -> Vec<(Stack, Vec<i64>)> {
        self.m
            .sample
            .iter()
            .map(|s| {
                let stack = s
                    .location_id
                    .iter()
                    .map(|&id| self.lines(self.location(id)))
                    .collect();
                (stack, s.value.clone())
            })
            .collect()
    }

    /// The values of the samples whose leaf function is `f`, summed.
    fn values_at(&self, f: &str) -> Vec<i64> {
        let mut sum = vec![0; 4];
        for (stack, v) in self.samples() {
            if stack.first().and_then(|l| l.first()).map(|x| x.0.as_str()) == Some(f) {
                for (a, b) in sum.iter_mut().zip(v) {
                    *a += b;
                }
            }
        }
        sum
    }

    fn types(&self) -> Vec<(String, String)> {
        self.m
            .sample_type
            .iter()
            .map(|t| (self.s(t.r#type).to_string(), self.s(t.unit).to_string()))
            .collect()
    }
}

fn lh(args: &[&std::ffi::OsStr]) -> std::process::Output {
    run_ok(Command::new(leakhunt()).args(args))
}

/// `go tool pprof ARGS`: its stdout. No `go` fails the test, saying what to install.
fn pprof(args: &[&str], profile: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("PPROF_TMPDIR", scratch("pprof-tmp"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `go tool pprof` ({e}): these tests read leakhunt's profiles back with it; \
                 install Go (Debian: apt-get install golang-go; .ci/run installs it)"
            )
        });
    assert!(
        out.status.success(),
        "go tool pprof {args:?} {} failed:\n{}",
        profile.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rows of `go tool pprof -top`: (flat, cum, name), as printed.
fn top_rows(text: &str) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    let mut on = false;
    for l in text.lines() {
        if l.trim_start().starts_with("flat  flat%") {
            on = true;
            continue;
        }
        if !on {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 6, "a -top row: {l:?}\n{text}");
        rows.push((f[0].to_string(), f[3].to_string(), f[5..].join(" ")));
    }
    assert!(on, "no -top table:\n{text}");
    rows
}

/// The build-id of an ELF file, as `readelf -n` shows it.
fn build_id(elf: &Path) -> String {
    let out = run_ok(Command::new("readelf").arg("-n").arg(elf));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no build-id", elf.display()))
}

fn path(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

/// `leakhunt run --epoch 1h -o TRACE [opts] -- profiled ROUNDS [more]` (boundaries only at the
/// program's snapshots): the run and its kept trace.
fn run_profiled(name: &str, rounds: u32, more: &[&str], opts: &[&str]) -> (Run, PathBuf) {
    let exe = fixture(SRC);
    let trace = scratch(&format!("{name}.trace"));
    let r = rounds.to_string();
    let mut args = vec![r.as_str()];
    args.extend(more);
    let mut o = vec!["--epoch", "1h", "-o", trace.to_str().unwrap()];
    o.extend(opts);
    let run = run(&exe, &args, &o);
    assert_eq!(run.out.status.code(), Some(0), "{}", run.stderr());
    (run, trace)
}

fn remove(paths: &[&Path]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_pprof_profile_of_a_known_leak_reads_back_in_go_tool_pprof_and_in_prost() {
    let exe = fixture(SRC);
    let prof = scratch("exit.pb.gz");
    let (run, trace) = run_profiled("exit", 10, &[], &["--pprof", prof.to_str().unwrap()]);
    assert_eq!(summary(run.main(), "in_use_at_exit_bytes"), 480);

    // go tool pprof: the leak on top of inuse_space (the default) with its exact bytes; every
    // allocation of the run under alloc_space and alloc_objects.
    let top = pprof(&["-top"], &prof);
    assert!(top.contains("Type: inuse_space"), "{top}");
    let rows = top_rows(&top);
    assert_eq!(
        rows[0],
        ("480B".into(), "480B".into(), "leak_node".into()),
        "{top}"
    );
    assert!(
        rows.contains(&("0".into(), "480B".into(), "handle_request (inline)".into())),
        "{top}"
    );
    assert!(
        rows.contains(&("0".into(), "480B".into(), "main".into())),
        "{top}"
    );
    let alloc = top_rows(&pprof(&["-sample_index=alloc_space", "-top"], &prof));
    assert_eq!(
        alloc[..2],
        [
            ("2000B".into(), "2000B".into(), "scratch".into()),
            ("480B".into(), "480B".into(), "leak_node".into())
        ]
    );
    let objects = top_rows(&pprof(&["-sample_index=alloc_objects", "-top"], &prof));
    assert_eq!(
        objects[..2],
        [
            ("20".into(), "20".into(), "scratch".into()),
            ("10".into(), "10".into(), "leak_node".into())
        ]
    );
    let tree = pprof(&["-tree"], &prof);
    assert!(
        tree.contains("leak_node") && tree.contains("480B"),
        "{tree}"
    );

    // Decoded here: the four sample types, exact values per callsite, a location per return
    // address with its inlined function first, a mapping with the program's build-id.
    let p = Read_::open(&prof);
    assert_eq!(p.s(0), "");
    assert_eq!(
        p.types(),
        [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(p.s(p.m.default_sample_type), "inuse_space");
    assert_eq!(p.m.period, 1);
    assert!(
        p.m.time_nanos > 1_600_000_000_000_000_000,
        "{}",
        p.m.time_nanos
    );
    let (leak, handle, call, scratch_line) = (
        line_of(SRC, "leak") as i64,
        line_of(SRC, "handle") as i64,
        line_of(SRC, "main") as i64,
        line_of(SRC, "scratch") as i64,
    );
    let samples = p.samples();
    let main_at = |line| {
        vec![
            ("handle_request".to_string(), line),
            ("main".to_string(), call),
        ]
    };
    let want_leak: Stack = vec![vec![("leak_node".to_string(), leak)], main_at(handle)];
    let mut by_stack: BTreeMap<Stack, Vec<i64>> = BTreeMap::new();
    for (stack, v) in &samples {
        assert!(
            by_stack.insert(stack.clone(), v.clone()).is_none(),
            "one sample per callsite: {samples:?}"
        );
    }
    assert_eq!(by_stack[&want_leak], [10, 480, 10, 480], "{samples:?}");
    // scratch is called from two lines of handle_request: two callsites, 10 calls each.
    let scratches: Vec<_> = by_stack
        .iter()
        .filter(|(s, _)| s[0] == [("scratch".to_string(), scratch_line)])
        .collect();
    assert_eq!(scratches.len(), 2, "{samples:?}");
    for (s, v) in &scratches {
        assert_eq!(**v, [10, 1000, 0, 0], "{s:?}");
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1].len(), 2, "{s:?}");
        assert_eq!(s[1][1], ("main".to_string(), call));
    }
    // Nothing else the program did is in the profile.
    assert_eq!(samples.len(), 3, "{samples:?}");
    // main's return address with handle_request inlined there: one location, two lines.
    let two_lines = p.m.location.iter().filter(|l| l.line.len() == 2).count();
    assert_eq!(two_lines, 3, "{:?}", p.m.location);
    // The program's mapping: its path and build-id; every location in it, in its range.
    let id = build_id(&exe);
    let mine: Vec<&proto::Mapping> =
        p.m.mapping
            .iter()
            .filter(|m| p.s(m.filename) == exe.to_str().unwrap())
            .collect();
    assert_eq!(mine.len(), 1, "{:?}", p.m.mapping);
    assert_eq!(p.s(mine[0].build_id), id);
    assert!(mine[0].has_functions && mine[0].has_inline_frames);
    for l in &p.m.location {
        assert_eq!(l.mapping_id, mine[0].id, "{l:?}");
        assert!(
            (mine[0].memory_start..mine[0].memory_limit).contains(&l.address),
            "{l:?} {:?}",
            mine[0]
        );
    }
    assert!(top.contains(&format!("Build ID: {id}")), "{top}");

    // The kept trace, reported offline: the same samples.
    let again = scratch("exit-offline.pb.gz");
    lh(&[
        "report".as_ref(),
        "--pprof".as_ref(),
        path(&again),
        path(&trace),
    ]);
    assert_eq!(Read_::open(&again).samples(), samples);
    remove(&[&prof, &again, &trace]);
}

#[test]
fn a_growth_profile_and_pprof_diff_base_show_only_the_growth() {
    // Between the snapshots after round 3 and at the end (10 rounds): 7 leaked blocks, and 14
    // scratch allocations made and freed.
    let (_, trace) = run_profiled("growth", 10, &[], &[]);
    let g = scratch("growth.pb.gz");
    let folded = scratch("growth.folded");
    let out = lh(&[
        "diff".as_ref(),
        path(&trace),
        "--from".as_ref(),
        "three".as_ref(),
        "--to".as_ref(),
        "done".as_ref(),
        "--pprof".as_ref(),
        path(&g),
        "--collapsed".as_ref(),
        path(&folded),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("heap +336 bytes in +7 blocks"), "{text}");
    let p = Read_::open(&g);
    assert_eq!(p.values_at("leak_node"), [7, 336, 7, 336]);
    assert_eq!(p.values_at("scratch"), [14, 1400, 0, 0]);
    assert_eq!(p.samples().len(), 3, "{:?}", p.samples());
    let rows = top_rows(&pprof(&["-top"], &g));
    assert_eq!(
        rows[0],
        ("336B".into(), "336B".into(), "leak_node".into()),
        "{rows:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&folded).unwrap(),
        "main;handle_request;leak_node 336\n"
    );

    // Two runs, 4 rounds and 10: pprof's own diff of their profiles shows the 6 blocks more
    // that leak_node kept, and nothing else; leakhunt's diff of the two traces says the same.
    let (_, short) = run_profiled("short", 4, &[], &[]);
    let (a, b) = (scratch("short.pb.gz"), scratch("long.pb.gz"));
    lh(&[
        "report".as_ref(),
        "--pprof".as_ref(),
        path(&a),
        path(&short),
    ]);
    lh(&[
        "report".as_ref(),
        "--pprof".as_ref(),
        path(&b),
        path(&trace),
    ]);
    let base = pprof(&["-top", "-diff_base", a.to_str().unwrap()], &b);
    let rows = top_rows(&base);
    assert_eq!(
        rows[0],
        ("288B".into(), "288B".into(), "leak_node".into()),
        "{base}"
    );
    assert!(
        rows[1..].iter().all(|r| r.0 == "0"),
        "only leak_node grew:\n{base}"
    );
    let ab = scratch("runs.pb.gz");
    lh(&[
        "diff".as_ref(),
        path(&short),
        path(&trace),
        "--pprof".as_ref(),
        path(&ab),
    ]);
    let ours = top_rows(&pprof(&["-top"], &ab));
    assert_eq!(ours, rows, "leakhunt diff A B against pprof -diff_base A B");
    let d = Read_::open(&ab);
    assert_eq!(d.values_at("leak_node"), [6, 288, 6, 288]);
    assert_eq!(d.values_at("scratch"), [12, 1200, 0, 0]);
    // The same with the alloc sample types: pprof -diff_base agrees.
    let base = top_rows(&pprof(
        &[
            "-top",
            "-sample_index=alloc_space",
            "-diff_base",
            a.to_str().unwrap(),
        ],
        &b,
    ));
    assert_eq!(
        base[0],
        ("1200B".into(), "1200B".into(), "scratch".into()),
        "{base:?}"
    );
    assert_eq!(
        top_rows(&pprof(&["-top", "-sample_index=alloc_space"], &ab)),
        base
    );
    remove(&[&trace, &short, &g, &folded, &a, &b, &ab]);
}

#[test]
fn folded_stacks_and_the_flame_graph_carry_the_leak_with_its_bytes() {
    let (folded, svg) = (scratch("exit.folded"), scratch("exit.svg"));
    let (run, trace) = run_profiled(
        "flame",
        10,
        &[],
        &[
            "--collapsed",
            folded.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
    );
    // One line per stack, outermost first, the inlined function a frame of its own; the lines
    // add up to what was unfreed at exit.
    let text = std::fs::read_to_string(&folded).unwrap();
    let lines: Vec<(&str, u64)> = text
        .lines()
        .map(|l| {
            let (s, n) = l.rsplit_once(' ').unwrap();
            (s, n.parse().unwrap())
        })
        .collect();
    assert!(
        lines.contains(&("main;handle_request;leak_node", 480)),
        "{text}"
    );
    assert_eq!(
        lines.iter().map(|l| l.1).sum::<u64>(),
        summary(run.main(), "in_use_at_exit_bytes")
    );
    // The SVG is well-formed XML, inferno's, naming the leak with its bytes.
    let doc_text = std::fs::read_to_string(&svg).unwrap();
    let opt = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&doc_text, opt)
        .unwrap_or_else(|e| panic!("{}: not well-formed XML: {e}", svg.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .collect();
    assert!(
        titles.contains(&"leak_node (480 bytes, 100.00%)"),
        "{titles:?}"
    );
    // The same from the kept trace.
    let again = scratch("exit-offline.folded");
    lh(&[
        "report".as_ref(),
        "--collapsed".as_ref(),
        path(&again),
        path(&trace),
    ]);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
    remove(&[&folded, &svg, &trace, &again]);
}

#[test]
fn each_process_gets_its_own_profile_beside_the_first() {
    // A fork child leaks two blocks; the program writes FILE, the child FILE.<pid>; `%p` names
    // each by its pid.
    let prof = scratch("forks.pb.gz");
    let (run, trace) = run_profiled(
        "forks",
        3,
        &["fork"],
        &[
            "--pprof",
            prof.to_str().unwrap(),
            "--collapsed",
            &format!("{}.%p.folded", prof.display()),
        ],
    );
    let procs = run.processes();
    assert_eq!(procs.len(), 2, "{}", run.stderr());
    let child = procs[1]["pid"].as_u64().unwrap();
    let main = procs[0]["pid"].as_u64().unwrap();
    assert_eq!(Read_::open(&prof).values_at("leak_node"), [3, 144, 3, 144]);
    let theirs = PathBuf::from(format!("{}.{child}", prof.display()));
    assert_eq!(Read_::open(&theirs).values_at("leak_node"), [2, 96, 2, 96]);
    for (pid, bytes) in [(main, 144), (child, 96)] {
        let f = PathBuf::from(format!("{}.{pid}.folded", prof.display()));
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.contains(&format!("leak_node {bytes}\n")), "{text}");
        remove(&[&f]);
    }
    remove(&[&prof, &theirs, &trace]);
    let _ = std::fs::remove_file(PathBuf::from(format!("{}.{child}", trace.display())));
}

#[test]
fn a_bad_export_path_is_an_error_not_a_panic() {
    let (_, trace) = run_profiled("bad-path", 2, &[], &[]);
    let out = Command::new(leakhunt())
        .args(["report", "--pprof", "/nonexistent-dir/x.pb.gz"])
        .arg(&trace)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("leakhunt: error: writing /nonexistent-dir/x.pb.gz"),
        "{err}"
    );
    remove(&[&trace]);
}

#[test]
fn bash_completion_from_leakhunt_completions_completes_a_subcommand() {
    let script = scratch("leakhunt.bash");
    let out = lh(&["completions".as_ref(), "bash".as_ref()]);
    std::fs::write(&script, &out.stdout).unwrap();
    // Source it, find the function `complete -p` names, and ask it as bash would on TAB.
    let probe = r#"
        source "$1" || exit 1
        spec=$(complete -p leakhunt) || exit 1
        fn=${spec##*-F }; fn=${fn%% *}
        ask() {
            COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
            COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
            COMPREPLY=()
            "$fn" leakhunt "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            echo "$*: ${COMPREPLY[*]}"
        }
        ask leakhunt rep
        ask leakhunt com
        ask leakhunt report --pp
        ask leakhunt diff --flame
    "#;
    let out = run_ok(
        Command::new("bash")
            .args(["-c", probe, "probe"])
            .arg(&script),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<&str> = text.lines().collect();
    assert_eq!(
        answers,
        [
            "leakhunt rep: report",
            "leakhunt com: compare-valgrind completions",
            "leakhunt report --pp: --pprof",
            "leakhunt diff --flame: --flamegraph",
        ],
        "{text}"
    );
    // zsh and fish get theirs too, naming the same commands.
    for shell in ["zsh", "fish"] {
        let out = lh(&["completions".as_ref(), shell.as_ref()]);
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            s.contains("leakhunt") && s.contains("pprof"),
            "{shell}: {s}"
        );
    }
    remove(&[&script]);
}

#[test]
fn man_pages_name_every_command() {
    let dir = scratch("man");
    let _ = std::fs::remove_dir_all(&dir);
    lh(&["man".as_ref(), path(&dir)]);
    let page = std::fs::read_to_string(dir.join("leakhunt.1")).unwrap();
    assert!(page.contains(".TH leakhunt 1"), "{page}");
    let commands = [
        "run",
        "report",
        "diff",
        "verify",
        "snapshot",
        "compare\\-valgrind",
        "paths",
        "pack",
        "completions",
        "man",
    ];
    for c in commands {
        assert!(
            page.contains(&format!("leakhunt\\-{c}(1)")),
            "leakhunt.1 names {c}:\n{page}"
        );
        let plain = c.replace('\\', "");
        let sub = dir.join(format!("leakhunt-{plain}.1"));
        let text =
            std::fs::read_to_string(&sub).unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(".TH leakhunt-{plain} 1  \"{plain} {version}\"")),
            "{text}"
        );
    }
    let run = std::fs::read_to_string(dir.join("leakhunt-run.1")).unwrap();
    assert!(
        run.contains("\\-\\-pprof") && run.contains("\\-\\-flamegraph"),
        "{run}"
    );
    // Hidden commands have no page.
    assert!(!dir.join("leakhunt-dump.1").exists());
    // Without DIR: the program's page on stdout.
    let out = lh(&["man".as_ref()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), page);
    let _ = std::fs::remove_dir_all(&dir);
}
