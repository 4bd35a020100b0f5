//! `leakhunt compare-valgrind MEMCHECK.xml LEAKHUNT.xml`: memcheck's loss records and
//! leakhunt's side by side (both in memcheck's XML, protocol 4). Records agree when kind, bytes
//! (direct and indirect), blocks and the top three frames' functions agree; memcheck's own
//! allocator frames (in its vgpreload object) are left out, as leakhunt's stacks start at the
//! allocator's caller. Exit 0 when every record has its twin.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One loss record of a memcheck-format XML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: String,
    pub text: String,
    /// Direct and indirect bytes together (`<leakedbytes>`).
    pub bytes: u64,
    pub blocks: u64,
    /// (function, file, line), innermost first, allocator frames left out.
    pub frames: Vec<(String, String, u32)>,
}

/// The `Leak_*` errors of a memcheck XML document.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<Record>> {
    let doc = roxmltree::Document::parse(text).context("not well-formed XML")?;
    let root = doc.root_element();
    if root.tag_name().name() != "valgrindoutput" {
        bail!(
            "not valgrind's XML output (its root is <{}>)",
            root.tag_name().name()
        );
    }
    let child = |n: roxmltree::Node, tag: &str| -> Option<String> {
        n.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.text())
            .map(str::to_string)
    };
    let mut out = Vec::new();
    for e in root.children().filter(|c| c.has_tag_name("error")) {
        let kind = child(e, "kind").unwrap_or_default();
        if !kind.starts_with("Leak_") {
            continue;
        }
        let Some(xw) = e.children().find(|c| c.has_tag_name("xwhat")) else {
            bail!("a {kind} error without <xwhat>");
        };
        let num = |tag: &str| -> Result<u64> {
            child(xw, tag)
                .and_then(|t| t.trim().parse().ok())
                .with_context(|| format!("a {kind} error without a number in <{tag}>"))
        };
        let frames = e
            .children()
            .find(|c| c.has_tag_name("stack"))
            .map(|s| {
                s.children()
                    .filter(|f| f.has_tag_name("frame"))
                    .filter(|f| !child(*f, "obj").unwrap_or_default().contains("vgpreload"))
                    .map(|f| {
                        (
                            child(f, "fn").unwrap_or_else(|| "???".into()),
                            child(f, "file").unwrap_or_default(),
                            child(f, "line").and_then(|l| l.parse().ok()).unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            text: child(xw, "text").unwrap_or_default(),
            bytes: num("leakedbytes")?,
            blocks: num("leakedblocks")?,
            kind,
            frames,
        });
    }
    Ok(out)
}

/// A function's name as both tools can agree on it: the last `::` segment without template
/// arguments or parameters (memcheck prints C++ parameter lists), without a symbol version, a
/// compiler clone's suffix (`.part.0`, `.isra.0`, `.constprop.0`, `.cold`) or glibc's internal
/// prefixes (`__GI___strdup` and `__strdup` are `strdup`, as the symbol table has it).
fn norm(f: &str) -> String {
    let f = f.split('@').next().unwrap_or(f);
    let f = f.split_once(".part.").map_or(f, |(a, _)| a);
    let f = f.split_once(".isra.").map_or(f, |(a, _)| a);
    let f = f.split_once(".constprop.").map_or(f, |(a, _)| a);
    let f = f.strip_suffix(".cold").unwrap_or(f);
    let f = f.strip_prefix("__GI_").unwrap_or(f).trim_start_matches('_');
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

fn same(a: &Record, b: &Record) -> bool {
    a.kind == b.kind
        && a.bytes == b.bytes
        && a.blocks == b.blocks
        && a.text.contains("indirect") == b.text.contains("indirect")
        && a.frames
            .iter()
            .zip(&b.frames)
            .take(3)
            .all(|(x, y)| x.0 == "???" || y.0 == "???" || norm(&x.0) == norm(&y.0))
}

fn describe(r: &Record) -> String {
    let at: Vec<String> = r
        .frames
        .iter()
        .take(3)
        .map(|(f, file, line)| {
            if file.is_empty() {
                f.clone()
            } else {
                format!("{f} ({file}:{line})")
            }
        })
        .collect();
    format!("{}\n      at {}", r.text, at.join("\n      by "))
}

/// The comparison as text, and whether every record has its twin.
pub fn compare(memcheck: &[Record], ours: &[Record]) -> (String, bool) {
    // The most pairs there can be (a frame memcheck could not name matches any, so the first
    // record that fits is not always the twin): augmenting paths over the candidates.
    let fits: Vec<Vec<usize>> = memcheck
        .iter()
        .map(|v| (0..ours.len()).filter(|&i| same(v, &ours[i])).collect())
        .collect();
    let mut twin_of: Vec<Option<usize>> = vec![None; ours.len()];
    fn augment(
        v: usize,
        fits: &[Vec<usize>],
        twin_of: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for &i in &fits[v] {
            if seen[i] {
                continue;
            }
            seen[i] = true;
            if twin_of[i].is_none_or(|w| augment(w, fits, twin_of, seen)) {
                twin_of[i] = Some(v);
                return true;
            }
        }
        false
    }
    let mut only_vg = Vec::new();
    let mut agree = 0;
    for (v, rec) in memcheck.iter().enumerate() {
        let mut seen = vec![false; ours.len()];
        if augment(v, &fits, &mut twin_of, &mut seen) {
            agree += 1;
        } else {
            only_vg.push(rec);
        }
    }
    let taken: Vec<bool> = twin_of.iter().map(Option::is_some).collect();
    let only_lh: Vec<&Record> = ours
        .iter()
        .zip(&taken)
        .filter(|(_, t)| !**t)
        .map(|(r, _)| r)
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{agree} loss records agree (kind, bytes, blocks, top three frames); {} only in memcheck's, {} only in leakhunt's",
        only_vg.len(),
        only_lh.len()
    );
    for r in &only_vg {
        let _ = writeln!(s, "  only in memcheck's: {}", describe(r));
    }
    for r in &only_lh {
        let _ = writeln!(s, "  only in leakhunt's: {}", describe(r));
    }
    (s, only_vg.is_empty() && only_lh.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(errors: &str) -> String {
        format!("<?xml version=\"1.0\"?>\n<valgrindoutput>\n<protocolversion>4</protocolversion>\n{errors}</valgrindoutput>\n")
    }

    fn err(kind: &str, text: &str, bytes: u64, frames: &[(&str, &str)]) -> String {
        let fr: String = frames
            .iter()
            .map(|(f, obj)| format!("<frame><ip>0x1</ip><obj>{obj}</obj><fn>{f}</fn></frame>"))
            .collect();
        format!("<error><unique>0x0</unique><tid>1</tid><kind>{kind}</kind><xwhat><text>{text}</text><leakedbytes>{bytes}</leakedbytes><leakedblocks>1</leakedblocks></xwhat><stack>{fr}</stack></error>\n")
    }

    #[test]
    fn records_pair_up_by_kind_size_and_frames() {
        let vg = parse(&doc(&(err(
            "Leak_DefinitelyLost",
            "137 (56 direct, 81 indirect) bytes in 1 blocks are definitely lost in loss record 5 of 5",
            137,
            &[
                ("operator new(unsigned long)", "/usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so"),
                ("make_holder()", "/bin/x"),
                ("main", "/bin/x"),
            ],
        ) + &err("Leak_StillReachable", "4 bytes in 1 blocks", 4, &[("keep", "/bin/x")]))))
        .unwrap();
        assert_eq!(vg[0].frames[0].0, "make_holder()");
        let lh = parse(&doc(&err(
            "Leak_DefinitelyLost",
            "137 (56 direct, 81 indirect) bytes in 1 blocks are definitely lost in loss record 5 of 5",
            137,
            &[("make_holder", "/bin/x"), ("main", "/bin/x")],
        )))
        .unwrap();
        let (text, ok) = compare(&vg, &lh);
        assert!(!ok);
        assert!(text.starts_with("1 loss records agree"), "{text}");
        assert!(
            text.contains("only in memcheck's: 4 bytes in 1 blocks\n      at keep"),
            "{text}"
        );
        assert!(compare(&vg[..1], &lh).1);
        // A record memcheck could not name fits both of leakhunt's; taking the first would leave
        // the named one without its twin.
        let vg = parse(&doc(&(err(
            "Leak_StillReachable",
            "8 bytes",
            8,
            &[("???", "/lib/x.so")],
        ) + &err(
            "Leak_StillReachable",
            "8 bytes",
            8,
            &[("foo", "/bin/x")],
        ))))
        .unwrap();
        let lh = parse(&doc(&(err(
            "Leak_StillReachable",
            "8 bytes",
            8,
            &[("foo", "/bin/x")],
        ) + &err(
            "Leak_StillReachable",
            "8 bytes",
            8,
            &[("bar", "/bin/x")],
        ))))
        .unwrap();
        let (text, ok) = compare(&vg, &lh);
        assert!(ok, "{text}");
        for (a, b) in [
            ("__GI___strdup", "strdup"),
            ("__strdup", "strdup"),
            ("__GI__IO_doallocbuf", "_IO_doallocbuf"),
            ("set_binding_values.part.0", "set_binding_values"),
            ("pthread_create@@GLIBC_2.34", "pthread_create"),
        ] {
            assert_eq!(norm(a), norm(b), "{a} {b}");
        }
        assert_ne!(norm("strdup"), norm("strndup"));
        assert!(parse("<nope/>")
            .unwrap_err()
            .to_string()
            .contains("not valgrind's"));
        assert!(parse(
            "<valgrindoutput><error><kind>Leak_PossiblyLost</kind></error></valgrindoutput>"
        )
        .is_err());
    }
}
