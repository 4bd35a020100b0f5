//! memcheck's XML (protocol version 4) for one process's exit report, so that tools that read
//! memcheck's XML (IDEs, CI plugins, scripts) read leakhunt's unchanged: the preamble, pid and
//! ppid, the tool (`memcheck`), the command line, the RUNNING and FINISHED status, then one
//! `<error>` per loss record of a shown kind, in memcheck's order and words, with `<unique>`
//! numbered over every record (shown or not, as memcheck counts), then the (empty) error and
//! suppression counts. Leak errors are never in `<errorcounts>`, as in memcheck.

use std::fmt::Write as _;

use crate::report::{thousands, Kind, Leak, ProcReport};

/// XML text: `&`, `<`, `>`, quotes escaped; control characters other than tab and newline
/// (which XML 1.0 cannot carry) as `\xHH`.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' => out.push(c),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// memcheck's `<kind>` for a record (a block without a heap scan counts as definitely lost,
/// as `--errors-for-leak-kinds` counts it).
pub fn memcheck_kind(k: Kind) -> &'static str {
    match k {
        Kind::Reachable => "Leak_StillReachable",
        Kind::Possible => "Leak_PossiblyLost",
        Kind::Indirect => "Leak_IndirectlyLost",
        Kind::Definite | Kind::NotScanned | Kind::Unfreed => "Leak_DefinitelyLost",
    }
}

/// The record's sentence, as memcheck's text and `<text>` say it.
pub fn record_text(l: &Leak, kind: Kind, number: usize, total: usize) -> String {
    let amount = if l.indirect_bytes > 0 {
        format!(
            "{} ({} direct, {} indirect) bytes",
            thousands(l.bytes + l.indirect_bytes),
            thousands(l.bytes),
            thousands(l.indirect_bytes)
        )
    } else {
        format!("{} bytes", thousands(l.bytes))
    };
    format!(
        "{amount} in {} blocks are {} in loss record {} of {}",
        thousands(l.blocks),
        kind.words(),
        thousands(number as u64),
        thousands(total as u64)
    )
}

/// `days:hh:mm:ss.mmm ` (with memcheck's trailing space).
fn elapsed(secs: f64) -> String {
    let ms = (secs.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}:{:02}.{:03} ",
        ms / 86_400_000,
        ms / 3_600_000 % 24,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// The XML document of process `r`; `tool_argv` is leakhunt's own command line.
pub fn render(r: &ProcReport, tool_argv: &[String]) -> String {
    let mut o = String::new();
    let mut line = |indent: usize, s: &str| {
        let _ = writeln!(o, "{:indent$}{s}", "");
    };
    line(0, "<?xml version=\"1.0\"?>");
    line(0, "");
    line(0, "<valgrindoutput>");
    line(0, "");
    line(0, "<protocolversion>4</protocolversion>");
    line(0, "<protocoltool>memcheck</protocoltool>");
    line(0, "");
    line(0, "<preamble>");
    line(
        2,
        "<line>leakhunt, a memory leak hunter (memcheck's XML)</line>",
    );
    line(
        2,
        &format!(
            "<line>Command: {}</line>",
            esc(&crate::report::shell_words(&r.argv))
        ),
    );
    line(0, "</preamble>");
    line(0, "");
    line(0, &format!("<pid>{}</pid>", r.pid));
    line(0, &format!("<ppid>{}</ppid>", r.ppid));
    line(0, "<tool>memcheck</tool>");
    line(0, "");
    line(0, "<args>");
    line(2, "<vargv>");
    let mut tool = tool_argv.iter();
    if let Some(exe) = tool.next() {
        line(4, &format!("<exe>{}</exe>", esc(exe)));
    }
    for a in tool {
        line(4, &format!("<arg>{}</arg>", esc(a)));
    }
    line(2, "</vargv>");
    line(2, "<argv>");
    let mut prog = r.argv.iter();
    line(
        4,
        &format!(
            "<exe>{}</exe>",
            esc(prog.next().map_or(r.exe.as_str(), |s| s.as_str()))
        ),
    );
    for a in prog {
        line(4, &format!("<arg>{}</arg>", esc(a)));
    }
    line(2, "</argv>");
    line(0, "</args>");
    line(0, "");
    let status = |o: &mut dyn FnMut(usize, &str), state: &str, secs: f64| {
        o(0, "<status>");
        o(2, &format!("<state>{state}</state>"));
        o(2, &format!("<time>{}</time>", elapsed(secs)));
        o(0, "</status>");
        o(0, "");
    };
    status(&mut line, "RUNNING", 0.0);
    let secs = r
        .timeline
        .as_ref()
        .and_then(|t| t.times_s.last().copied())
        .unwrap_or(0.0);
    status(&mut line, "FINISHED", secs);
    let total = r.leaks.len();
    for (i, l) in r.leaks.iter().enumerate() {
        let kind = Kind::from_name(l.kind).unwrap_or(Kind::Unfreed);
        if !r.show_kinds.contains(kind) || l.suppressed.is_some() {
            continue;
        }
        line(0, "<error>");
        line(2, &format!("<unique>{i:#x}</unique>"));
        line(2, "<tid>1</tid>");
        line(2, &format!("<kind>{}</kind>", memcheck_kind(kind)));
        line(2, "<xwhat>");
        line(
            4,
            &format!("<text>{}</text>", esc(&record_text(l, kind, i + 1, total))),
        );
        line(
            4,
            &format!("<leakedbytes>{}</leakedbytes>", l.bytes + l.indirect_bytes),
        );
        line(4, &format!("<leakedblocks>{}</leakedblocks>", l.blocks));
        line(2, "</xwhat>");
        line(2, "<stack>");
        for f in &l.stack {
            line(4, "<frame>");
            line(6, &format!("<ip>0x{:X}</ip>", f.address));
            if let Some(m) = &f.module {
                line(6, &format!("<obj>{}</obj>", esc(m)));
            }
            if let Some(func) = &f.function {
                line(6, &format!("<fn>{}</fn>", esc(func)));
            }
            if let (Some(file), Some(n)) = (&f.file, f.line) {
                if let Some((dir, name)) = file.rsplit_once('/') {
                    if !dir.is_empty() {
                        line(6, &format!("<dir>{}</dir>", esc(dir)));
                    }
                    line(6, &format!("<file>{}</file>", esc(name)));
                } else {
                    line(6, &format!("<file>{}</file>", esc(file)));
                }
                line(6, &format!("<line>{n}</line>"));
            }
            line(4, "</frame>");
        }
        line(2, "</stack>");
        if r.gen_suppressions {
            suppression(
                &mut line,
                &crate::supp::generate(kind, l.alloc_fn, &l.stack),
            );
        }
        line(0, "</error>");
        line(0, "");
    }
    line(0, "<errorcounts>");
    line(0, "</errorcounts>");
    line(0, "");
    line(0, "<suppcounts>");
    let mut used: Vec<(&str, usize)> = Vec::new();
    for name in r.leaks.iter().filter_map(|l| l.suppressed.as_deref()) {
        match used.iter_mut().find(|u| u.0 == name) {
            Some(u) => u.1 += 1,
            None => used.push((name, 1)),
        }
    }
    for (name, count) in used {
        line(2, "<pair>");
        line(4, &format!("<count>{count}</count>"));
        line(4, &format!("<name>{}</name>", esc(name)));
        line(2, "</pair>");
    }
    line(0, "</suppcounts>");
    line(0, "");
    line(0, "</valgrindoutput>");
    line(0, "");
    o
}

/// A record's ready suppression (`--gen-suppressions=all`) as memcheck writes it inside the
/// `<error>`: its parts, then the entry itself as `<rawtext>`.
fn suppression(line: &mut dyn FnMut(usize, &str), entry: &str) {
    line(2, "<suppression>");
    let mut lines = entry.lines().map(str::trim);
    for l in lines.by_ref() {
        if let Some(name) = l.strip_prefix('<').and_then(|n| n.strip_suffix('>')) {
            line(4, &format!("<sname>{}</sname>", esc(name)));
        } else if l == "Memcheck:Leak" {
            line(4, &format!("<skind>{l}</skind>"));
        } else if l.starts_with("match-leak-kinds:") {
            line(4, &format!("<skaux>{}</skaux>", esc(l)));
        } else if let Some(f) = l.strip_prefix("fun:") {
            line(4, &format!("<sframe> <fun>{}</fun> </sframe>", esc(f)));
        } else if let Some(o) = l.strip_prefix("obj:") {
            line(4, &format!("<sframe> <obj>{}</obj> </sframe>", esc(o)));
        }
    }
    line(4, "<rawtext>");
    // CDATA ends at the first "]]>": split one that the entry holds.
    line(
        0,
        &format!("<![CDATA[\n{}]]>", entry.replace("]]>", "]]]]><![CDATA[>")),
    );
    line(4, "</rawtext>");
    line(2, "</suppression>");
}

/// Where process `pid`'s XML goes: `%p` in `path` is its pid; without it, the first process
/// writes `path` and every other `path.<pid>` (memcheck would write them all into one file).
pub fn path_for(path: &std::path::Path, pid: u32, first: bool) -> std::path::PathBuf {
    let s = path.to_string_lossy();
    if s.contains("%p") {
        std::path::PathBuf::from(s.replace("%p", &pid.to_string()))
    } else if first {
        path.to_path_buf()
    } else {
        std::path::PathBuf::from(format!("{s}.{pid}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_times_and_escapes() {
        let p = std::path::Path::new("/tmp/out.xml");
        assert_eq!(path_for(p, 42, true), p);
        assert_eq!(path_for(p, 42, false).to_str(), Some("/tmp/out.xml.42"));
        assert_eq!(
            path_for(std::path::Path::new("/tmp/vg.%p.xml"), 7, false).to_str(),
            Some("/tmp/vg.7.xml")
        );
        assert_eq!(elapsed(3723.0456), "00:01:02:03.046 ");
        assert_eq!(esc("a<b & \"c\"\u{1b}"), "a&lt;b &amp; &quot;c&quot;\\x1b");
    }
}
