//! memcheck's suppression files, for leaks: `{ NAME / Memcheck:Leak / [match-leak-kinds: K,...]
//! / fun:, obj:, src: or ... lines / }`, as memcheck 3.19 reads and matches them, and the entries
//! `--gen-suppressions=all` prints.
//!
//! Matching is by prefix from the innermost frame. memcheck's stacks begin with its allocator
//! replacement (`malloc`, `_Znwm`, ... in vgpreload_memcheck), which leakhunt's do not show: a
//! first location that names an allocator function (or matches valgrind's preload object) is
//! taken as that frame. `fun:` patterns match the linkage (mangled) name, as memcheck's do, or
//! the demangled one; `*` is any run of characters, `?` one character; `...` any number of frames.
//! `fun:clone` also matches `clone3` (glibc starts threads with clone under valgrind only).

use std::path::Path;

use anyhow::{bail, Context, Result};
use leakhunt_format::AllocFn;

use crate::report::{Frame, Kind, Kinds};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loc {
    Fun(String),
    Obj(String),
    /// A source file name, and a line if given.
    Src(String, Option<u32>),
    /// Any number of frames.
    Any,
}

#[derive(Clone, Debug)]
pub struct Suppression {
    pub name: String,
    /// Where it was read: file and line of its name.
    pub origin: String,
    pub kinds: Kinds,
    pub locs: Vec<Loc>,
}

/// Most location lines kept (memcheck's `--num-callers` default).
const MAX_LOCS: usize = 12;

/// Reads one suppression file. Entries for other tools or other memcheck errors than leaks are
/// read and skipped; a malformed entry is an error naming its line.
pub fn read(path: &Path) -> Result<Vec<Suppression>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading suppressions {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, file: &str) -> Result<Vec<Suppression>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let mut out = Vec::new();
    while let Some((n, l)) = lines.next() {
        let bad =
            |n: usize, why: &str| anyhow::anyhow!("suppressions file {file}, line {n}: {why}");
        if l != "{" {
            return Err(bad(n, "expected `{` to open an entry"));
        }
        let (name_line, name) = lines.next().ok_or_else(|| bad(n, "entry without a name"))?;
        let (kn, kind) = lines
            .next()
            .ok_or_else(|| bad(name_line, "entry without a kind (such as Memcheck:Leak)"))?;
        let (tools, what) = kind
            .split_once(':')
            .ok_or_else(|| bad(kn, "expected TOOL:KIND, such as Memcheck:Leak"))?;
        let ours = tools.split(',').any(|t| t.trim() == "Memcheck") && what == "Leak";
        let mut kinds = Kinds::ALL;
        let mut locs = Vec::new();
        let mut closed = false;
        let mut first = true;
        for (ln, l) in lines.by_ref() {
            if l == "}" {
                closed = true;
                break;
            }
            if first && ours {
                if let Some(k) = l.strip_prefix("match-leak-kinds:") {
                    kinds = Kinds::parse(k.trim()).map_err(|e| bad(ln, &e))?;
                    first = false;
                    continue;
                }
            }
            first = false;
            if !ours {
                continue;
            }
            let loc = if l == "..." {
                Loc::Any
            } else if let Some(p) = l.strip_prefix("fun:") {
                Loc::Fun(p.to_string())
            } else if let Some(p) = l.strip_prefix("obj:") {
                Loc::Obj(p.to_string())
            } else if let Some(p) = l.strip_prefix("src:") {
                match p.rsplit_once(':') {
                    Some((f, line)) if line.chars().all(|c| c.is_ascii_digit()) => {
                        let line = line.parse().map_err(|_| bad(ln, "bad line number"))?;
                        Loc::Src(f.to_string(), Some(line))
                    }
                    _ => Loc::Src(p.to_string(), None),
                }
            } else {
                return Err(bad(
                    ln,
                    &format!("expected fun:, obj:, src: or ..., found {l:?}"),
                ));
            };
            if locs.len() < MAX_LOCS {
                locs.push(loc);
            }
        }
        if !closed {
            bail!("suppressions file {file}: the entry at line {n} is not closed with `}}`");
        }
        if !ours {
            continue;
        }
        if locs.iter().all(|l| *l == Loc::Any) {
            return Err(bad(
                n,
                "an entry needs at least one fun:, obj: or src: line",
            ));
        }
        out.push(Suppression {
            name: name.to_string(),
            origin: format!("{file}:{name_line}"),
            kinds,
            locs,
        });
    }
    Ok(out)
}

/// `*` any run of characters, `?` one character, anything else itself.
pub fn wildcard(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Names of the allocator's entry points as memcheck's stacks show them (mangled for C++).
const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "posix_memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
    "operator new(unsigned long)",
    "operator new[](unsigned long)",
];

/// Whether `loc` stands for memcheck's allocator frame (which leakhunt's stacks leave out).
fn allocator_frame(loc: &Loc) -> bool {
    match loc {
        Loc::Fun(p) => ALLOCATORS.iter().any(|a| wildcard(p, a)),
        Loc::Obj(p) => wildcard(p, "/usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so"),
        _ => false,
    }
}

fn frame_matches(loc: &Loc, f: &Frame) -> bool {
    match loc {
        Loc::Fun(p) => {
            let name = f.function.as_deref().unwrap_or("???");
            wildcard(p, f.mangled.as_deref().unwrap_or(name))
                || wildcard(p, name)
                // Under valgrind clone3 fails and glibc starts threads with clone: the
                // suppressions memcheck wrote name the frame below a thread's start so.
                || (name == "clone3" && wildcard(p, "clone"))
                // valgrind names versioned symbols with their version
                // (`pthread_create@@GLIBC_2.34`); the debug information does not.
                || p.split_once('@').is_some_and(|(base, _)| wildcard(base, name))
        }
        Loc::Obj(p) => wildcard(p, f.module.as_deref().unwrap_or("???")),
        Loc::Src(file, line) => {
            let base = f
                .file
                .as_deref()
                .map(|s| s.rsplit('/').next().unwrap_or(s))
                .unwrap_or("???");
            wildcard(file, base) && line.is_none_or(|l| f.line == Some(l))
        }
        Loc::Any => true,
    }
}

/// Whether `locs` matches a prefix of `frames`.
fn matches(locs: &[Loc], frames: &[Frame]) -> bool {
    match locs.split_first() {
        None => true,
        Some((Loc::Any, rest)) => (0..=frames.len()).any(|k| matches(rest, &frames[k..])),
        Some((l, rest)) => frames
            .split_first()
            .is_some_and(|(f, fs)| frame_matches(l, f) && matches(rest, fs)),
    }
}

/// Whether `locs` matches a prefix of memcheck's stack for a block allocated at `frames`: the
/// allocator's own frame first (leakhunt's stacks leave it out), then `frames`. As in memcheck,
/// the first location must match that allocator frame, unless it is `...`.
fn matches_below_allocator(locs: &[Loc], frames: &[Frame]) -> bool {
    match locs.split_first() {
        None => true,
        Some((Loc::Any, rest)) => {
            matches_below_allocator(rest, frames)
                || (0..=frames.len()).any(|k| matches(rest, &frames[k..]))
        }
        Some((l, rest)) => allocator_frame(l) && matches(rest, frames),
    }
}

impl Suppression {
    /// Whether this entry suppresses a record of `kind` allocated at `stack`.
    pub fn suppresses(&self, kind: Kind, stack: &[Frame]) -> bool {
        self.kinds.contains(kind) && matches_below_allocator(&self.locs, stack)
    }
}

/// The name memcheck's stacks give the allocator frame of a block from `f` (its replacement
/// functions; glibc's `posix_memalign` and `aligned_alloc` reach its `memalign`).
pub fn allocator_name(f: Option<AllocFn>) -> &'static str {
    match f {
        None | Some(AllocFn::Malloc) => "malloc",
        Some(AllocFn::Calloc) => "calloc",
        Some(AllocFn::Realloc | AllocFn::Reallocarray) => "realloc",
        Some(AllocFn::Memalign | AllocFn::PosixMemalign | AllocFn::AlignedAlloc) => "memalign",
        Some(AllocFn::Valloc | AllocFn::Pvalloc) => "valloc",
        Some(AllocFn::New) => "_Znwm",
        Some(AllocFn::NewArray) => "_Znam",
    }
}

/// The entry `--gen-suppressions=all` prints for a record, as memcheck writes it (its allocator
/// frame first, then `fun:` with linkage names, `obj:` where no function is known).
pub fn generate(kind: Kind, alloc: Option<AllocFn>, stack: &[Frame]) -> String {
    let word = match kind {
        Kind::Definite | Kind::NotScanned | Kind::Unfreed => "definite",
        Kind::Indirect => "indirect",
        Kind::Possible => "possible",
        Kind::Reachable => "reachable",
    };
    let mut s = format!(
        "{{\n   <insert_a_suppression_name_here>\n   Memcheck:Leak\n   match-leak-kinds: {word}\n   fun:{}\n",
        allocator_name(alloc)
    );
    for f in stack {
        match (&f.mangled, &f.function, &f.module) {
            (Some(m), _, _) => s.push_str(&format!("   fun:{m}\n")),
            (None, Some(n), _) => s.push_str(&format!("   fun:{n}\n")),
            (None, None, Some(o)) => s.push_str(&format!("   obj:{o}\n")),
            _ => s.push_str("   obj:*\n"),
        }
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(f: &str, mangled: Option<&str>, file: &str, line: u32) -> Frame {
        Frame {
            function: Some(f.into()),
            mangled: mangled.map(str::to_string),
            file: Some(format!("/src/{file}")),
            line: Some(line),
            module: Some("/bin/prog".into()),
            offset: 0,
            address: 0,
            inlined: false,
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("ma*", "malloc"));
        assert!(wildcard("*", ""));
        assert!(wildcard("m?lloc", "malloc"));
        assert!(!wildcard("m?lloc", "mlloc"));
        assert!(wildcard("*lib*.so*", "/usr/lib/libc.so.6"));
        assert!(!wildcard("abc", "abcd"));
        assert!(wildcard("a*b*c", "aXXbYYc"));
    }

    #[test]
    fn entries_parse_and_match_like_memcheck() {
        let text = "# a comment\n{\n   hand\n   Memcheck:Leak\n   match-leak-kinds: definite,possible\n   fun:malloc\n   fun:make_*\n   ...\n   fun:main\n}\n{\n  other tool\n  Helgrind:Race\n  fun:x\n}\n{\n   by-source\n   Memcheck:Leak\n   match-leak-kinds: reachable\n   src:keep.c:12\n}\n";
        let s = parse(text, "t.supp").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].origin, "t.supp:3");
        let stack = [
            frame("make_holder()", Some("_ZL11make_holderv"), "a.cpp", 3),
            frame("helper", None, "a.cpp", 9),
            frame("main", None, "a.cpp", 20),
        ];
        // `make_*` matches the mangled name? No: the demangled one does.
        assert!(s[0].suppresses(Kind::Definite, &stack));
        assert!(!s[0].suppresses(Kind::Reachable, &stack));
        assert!(!s[0].suppresses(Kind::Definite, &stack[1..]));
        // As in memcheck, the first line stands for the allocator's frame: `src:keep.c:12` alone
        // is never the allocator (memcheck suppresses nothing with it), `...` before it is.
        let keep = [frame("keep", None, "keep.c", 12)];
        assert!(!s[1].suppresses(Kind::Reachable, &keep));
        let below = parse(
            "{\n   below\n   Memcheck:Leak\n   match-leak-kinds: reachable\n   ...\n   src:keep.c:12\n}\n",
            "u.supp",
        )
        .unwrap();
        assert!(below[0].suppresses(Kind::Reachable, &keep));
        assert!(!below[0].suppresses(Kind::Definite, &keep));
        let star = parse(
            "{\n   star\n   Memcheck:Leak\n   fun:*\n   fun:keep\n}\n",
            "v.supp",
        )
        .unwrap();
        assert!(star[0].suppresses(Kind::Definite, &keep));
        let no_alloc = parse("{\n   x\n   Memcheck:Leak\n   fun:keep\n}\n", "w.supp").unwrap();
        assert!(!no_alloc[0].suppresses(Kind::Definite, &keep));
        let err = parse("{\n x\n Memcheck:Leak\n bogus:1\n}\n", "b.supp").unwrap_err();
        assert!(err.to_string().contains("b.supp, line 4"), "{err}");
        let err = parse("{\n x\n Memcheck:Leak\n ...\n}\n", "c.supp").unwrap_err();
        assert!(err.to_string().contains("at least one"), "{err}");
        assert!(parse("{\n x\n Memcheck:Leak\n fun:a\n", "d.supp").is_err());
        // What --gen-suppressions=all prints suppresses its own record.
        let g = generate(Kind::Indirect, None, &stack);
        assert!(
            g.contains("   fun:_ZL11make_holderv\n   fun:helper\n"),
            "{g}"
        );
        let back = parse(&g, "gen").unwrap();
        assert!(back[0].suppresses(Kind::Indirect, &stack));
        assert!(!back[0].suppresses(Kind::Definite, &stack));
    }
}
