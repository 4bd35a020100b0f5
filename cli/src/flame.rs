//! Folded stacks and flame graphs of a [`Profile`]'s live bytes: at exit, the bytes unfreed
//! (`leakhunt run`, `leakhunt report`); in a growth profile, the bytes a callsite grew by
//! (`leakhunt diff`). Folded stacks are the format every flame graph tool reads: one line per
//! stack, its frames outermost first, separated by `;`, then a space and the bytes. Each
//! function is a frame, an inlined one too (its own frame above the function it was inlined
//! into); a frame without symbols is `module+0xOFFSET` (or its bare address). Callsites whose
//! names are the same (two lines of one function) are one line. A flame graph cannot draw a
//! negative width: callsites that shrank (in a growth profile) are left out of both.
//!
//! The SVG is inferno's, from these lines.

use std::collections::BTreeMap;

use crate::profile::{Located, Profile};

/// A frame's name in folded stacks: `;` separates frames and a line ends the stack, so neither
/// may appear in a name.
fn name(l: &Located) -> String {
    let f = &l.frame;
    let n = match &f.function {
        Some(n) => n.clone(),
        None => match &f.module {
            Some(m) => format!("{}+{:#x}", m.rsplit('/').next().unwrap_or(m), f.offset),
            None => format!("{:#x}", f.address),
        },
    };
    n.replace(';', ":").replace(['\n', '\r'], " ")
}

/// The folded stacks of the profile's live bytes (unfreed at exit, or grown), in order of the
/// stacks' text; only those with more than 0 bytes.
pub fn folded(p: &Profile) -> String {
    let mut lines: BTreeMap<String, i64> = BTreeMap::new();
    for s in &p.sites {
        if s.values.inuse_space <= 0 {
            continue;
        }
        let stack: Vec<String> = s.frames.iter().rev().map(name).collect();
        let stack = if stack.is_empty() {
            "(no stack)".to_string()
        } else {
            stack.join(";")
        };
        let v = lines.entry(stack).or_default();
        *v = v.saturating_add(s.values.inuse_space);
    }
    let mut out = String::new();
    for (stack, bytes) in lines {
        out.push_str(&stack);
        out.push(' ');
        out.push_str(&bytes.to_string());
        out.push('\n');
    }
    out
}

/// The flame graph (SVG) of the profile's folded stacks, with `title` above it.
pub fn svg(p: &Profile, title: &str) -> std::io::Result<Vec<u8>> {
    use inferno::flamegraph::{self, color, Options};
    let text = folded(p);
    let mut o = Options::default();
    o.title = title.to_string();
    o.subtitle = Some(format!("pid {}: {}", p.pid, p.argv.join(" ")));
    o.count_name = "bytes".into();
    o.colors = color::Palette::Basic(color::BasicPalette::Mem);
    o.deterministic = true;
    let mut out = Vec::new();
    if text.is_empty() {
        // inferno refuses an empty profile: say so in a graph of one frame.
        flamegraph::from_lines(&mut o, ["(nothing) 1"], &mut out)?;
    } else {
        flamegraph::from_lines(&mut o, text.lines(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Site, Values};
    use crate::report::Frame;

    fn at(pos: u32, function: Option<&str>, offset: u64) -> Located {
        Located {
            pos,
            mapping: None,
            frame: Frame {
                function: function.map(String::from),
                mangled: None,
                file: None,
                line: None,
                module: Some("/usr/lib/libx.so".into()),
                offset,
                address: 0x7000 + offset,
                inlined: false,
            },
        }
    }

    fn site(frames: Vec<Located>, bytes: i64) -> Site {
        Site {
            frames,
            values: Values {
                inuse_space: bytes,
                ..Values::default()
            },
        }
    }

    #[test]
    fn stacks_fold_outermost_first_merge_by_name_and_drop_what_shrank() {
        let p = Profile {
            sites: vec![
                site(
                    vec![
                        at(0, Some("grow"), 1),
                        at(0, Some("leak"), 1),
                        at(1, Some("main"), 2),
                    ],
                    48,
                ),
                site(
                    vec![
                        at(0, Some("grow"), 3),
                        at(0, Some("leak"), 3),
                        at(1, Some("main"), 2),
                    ],
                    16,
                ),
                site(vec![at(0, None, 0x40), at(1, Some("a;b"), 2)], 8),
                site(vec![at(0, Some("shrank"), 5)], -100),
                site(vec![at(0, Some("zero"), 6)], 0),
            ],
            ..Profile::default()
        };
        assert_eq!(
            folded(&p),
            "a:b;libx.so+0x40 8\nmain;leak;grow 64\n",
            "{p:?}"
        );
        let svg = String::from_utf8(svg(&p, "t").unwrap()).unwrap();
        assert!(svg.contains("<svg") && svg.contains("grow"), "{svg}");
        let empty = String::from_utf8(svg_of_nothing()).unwrap();
        assert!(empty.contains("(nothing)"), "{empty}");
    }

    fn svg_of_nothing() -> Vec<u8> {
        svg(&Profile::default(), "t").unwrap()
    }
}
