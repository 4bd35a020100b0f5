//! The growth report: memory over time per callsite and for the process, the verdict on each
//! (leak, growing, plateau, transient, stable), what grew between two points, and what to do
//! about it. Built from the epoch series of a [`Process`]; rendered as the four-part text report
//! (confirmation evidence, the leaking callsites, root-cause guidance, verification) and as the
//! JSON report's `"growth"` and `"timeline"`.

use leakhunt_format::StopReason;
use leakhunt_symbolizer::Symbolizer;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::callsite::Callsites;
use crate::process::Process;
use crate::report::{render_frame, stack_lines, thousands, Frame};
use crate::verdict::{classify, Evidence, Verdict};

/// The process over the run.
#[derive(Serialize, Clone, Debug)]
pub struct Timeline {
    /// Epoch boundaries recorded.
    pub epochs: usize,
    /// Seconds from the start of the run of each boundary.
    pub times_s: Vec<f64>,
    /// Live heap bytes and blocks, and RSS bytes, at each boundary.
    pub live_bytes: Vec<u64>,
    pub live_blocks: Vec<u64>,
    pub rss_bytes: Vec<u64>,
    /// The end of warm-up: boundaries before it are not judged.
    pub warmup_s: f64,
    /// The verdict on the process's live heap.
    pub verdict: Verdict,
    pub evidence: Evidence,
}

/// One callsite's growth.
#[derive(Serialize, Clone, Debug)]
pub struct GrowthEntry {
    pub verdict: Verdict,
    /// Live bytes and blocks at the last boundary judged (before any teardown at exit) minus at
    /// the end of warm-up.
    pub delta_bytes: i64,
    pub delta_blocks: i64,
    /// Blocks allocated after warm-up and still live at the end.
    pub born_after_warmup_live: u64,
    pub slope_bytes_per_s: f64,
    pub evidence: Evidence,
    pub stack: Vec<Frame>,
    /// Live bytes at each boundary (all of them, warm-up included).
    pub series: Vec<u64>,
    /// Live blocks at each boundary.
    pub blocks_series: Vec<u64>,
    /// The callsite's blocks still live at exit by memcheck's kind (`definitely_lost` ...:
    /// bytes and blocks), when the trace has a heap scan: whether anything still holds them.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub at_exit: std::collections::BTreeMap<&'static str, (u64, u64)>,
    /// What holds the callsite's blocks, from the latest heap scan that saw them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::paths::Retention>,
    /// What the blocks born after warm-up keep alive at that scan (theirs and what only they
    /// reach): the growth of the callsite's retained size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_retained_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_retained_blocks: Option<u64>,
    /// The callsite (for finding its stacks again).
    #[serde(skip)]
    pub site: u32,
    /// The boundary index warm-up ended at.
    #[serde(skip)]
    pub since: u32,
    /// The callsite's id in this trace (its first stack's): `leakhunt paths TRACE --callsite ID`.
    pub callsite: u32,
    /// Why this stack's unwind stopped, when it did not reach the outermost frame (the stack is
    /// cut short: what called the last frame shown is not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind: Option<&'static str>,
}

/// Growing callsites that share their innermost functions (a compiler's thousands of callsites
/// under a few allocation paths), summed: where the memory goes, by function.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct GrowthGroup {
    /// The innermost [`GROUP_FRAMES`] functions of the callsites' stacks, innermost first
    /// (unnamed frames as `module+offset`).
    pub functions: Vec<String>,
    /// Of the callsites' growth after warm-up.
    pub delta_bytes: i64,
    pub delta_blocks: i64,
    pub callsites: u64,
    /// How many of them grow (`leak` or `growing`), the rest having reached a plateau.
    pub growing: u64,
}

/// Functions a growth group is keyed by.
pub const GROUP_FRAMES: usize = 3;
/// Growing callsites from which the text shows the groups first.
const GROUPS_FROM: usize = 20;

/// The flagged growth entries grouped by their innermost functions, most bytes first.
pub fn groups(entries: &[GrowthEntry]) -> Vec<GrowthGroup> {
    let mut m: FxHashMap<Vec<String>, GrowthGroup> = FxHashMap::default();
    for e in entries.iter().filter(|e| e.verdict.flagged()) {
        let mut key: Vec<String> = Vec::with_capacity(GROUP_FRAMES);
        for f in &e.stack {
            let name = match (&f.function, &f.module) {
                (Some(func), _) => func.clone(),
                (None, Some(m)) => format!("{}+{:#x}", m.rsplit('/').next().unwrap_or(m), f.offset),
                (None, None) => format!("{:#x}", f.address),
            };
            // Inlined frames of one function, or recursion, count once.
            if key.last() != Some(&name) {
                key.push(name);
            }
            if key.len() == GROUP_FRAMES {
                break;
            }
        }
        let g = m.entry(key.clone()).or_insert_with(|| GrowthGroup {
            functions: key,
            delta_bytes: 0,
            delta_blocks: 0,
            callsites: 0,
            growing: 0,
        });
        g.delta_bytes = g.delta_bytes.saturating_add(e.delta_bytes);
        g.delta_blocks = g.delta_blocks.saturating_add(e.delta_blocks);
        g.callsites += 1;
        g.growing += u64::from(e.verdict.grows());
    }
    let mut v: Vec<GrowthGroup> = m.into_values().collect();
    v.sort_by(|a, b| {
        b.delta_bytes
            .cmp(&a.delta_bytes)
            .then(b.callsites.cmp(&a.callsites))
            .then_with(|| a.functions.cmp(&b.functions))
    });
    v
}

/// The smallest growth of a callsite after warm-up that is a finding, in bytes or in blocks
/// (either will do): less is a block or two caught live (a `leak` verdict on +256 bytes in 2
/// blocks says nothing; one small block an epoch for 8 epochs is a trend).
pub const MIN_EFFECT_BYTES: i64 = 1024;
pub const MIN_EFFECT_BLOCKS: i64 = 8;

/// Builds the growth report, or `None` when the trace holds too few epoch boundaries to say
/// anything. `warmup_s`: seconds from the start to leave out of the verdicts (default: detected,
/// see [`detect_warmup`]).
pub fn build(
    p: &Process,
    warmup_s: Option<f64>,
    sym: &mut Symbolizer,
) -> Option<(Timeline, Vec<GrowthEntry>)> {
    build_in(p, &mut Callsites::new(p), warmup_s, sym)
}

/// As [`build`], with the process's callsites already known.
pub fn build_in(
    p: &Process,
    sites: &mut Callsites,
    warmup_s: Option<f64>,
    sym: &mut Symbolizer,
) -> Option<(Timeline, Vec<GrowthEntry>)> {
    let b = &p.growth.boundaries;
    if b.len() < 3 {
        return None;
    }
    let t0 = p
        .header
        .as_ref()
        .map_or(b[0].time_ns, |h| h.start_monotonic_ns);
    let times: Vec<f64> = b
        .iter()
        .map(|x| x.time_ns.saturating_sub(t0) as f64 / 1e9)
        .collect();
    let allocs: Vec<u64> = b.iter().map(|x| x.allocs).collect();
    let warm = warmup_s.unwrap_or_else(|| detect_warmup(&times, &allocs));
    // The first boundary at or after the end of warm-up (leaving enough points to judge).
    let w = times
        .iter()
        .position(|&x| x >= warm)
        .unwrap_or(times.len())
        .min(times.len().saturating_sub(3));
    let live: Vec<u64> = b.iter().map(|x| x.live_bytes).collect();
    let yf = |v: &[u64]| -> Vec<f64> { v[w..].iter().map(|&x| x as f64).collect() };
    let (verdict, evidence) = classify(&times[w..], &yf(&live));
    let timeline = Timeline {
        epochs: b.len(),
        times_s: times.clone(),
        live_bytes: live,
        live_blocks: b.iter().map(|x| x.live_blocks).collect(),
        rss_bytes: b.iter().map(|x| x.rss).collect(),
        warmup_s: times[w],
        verdict,
        evidence,
    };

    // Callsites: stack ids of the same code (module reloads) summed, each callsite shown with
    // the addresses of its first stack. A series is built from the stacks' points (where their
    // value changed): changes summed per boundary, then added up.
    let mut ids: Vec<u32> = p.growth.stacks().collect();
    ids.sort_unstable();
    let mut born: FxHashMap<u32, u64> = FxHashMap::default();
    // Neighbours in the live set often share a stack: a run of them is one entry's update.
    let mut run = (0u32, 0u64);
    for l in p.live.values().filter(|l| l.born >= b[w].index) {
        if run.1 > 0 && run.0 != l.stack {
            *born.entry(run.0).or_default() += run.1;
            run.1 = 0;
        }
        run = (l.stack, run.1 + 1);
    }
    if run.1 > 0 {
        *born.entry(run.0).or_default() += run.1;
    }
    // Kinds at exit per stack, from the heap scan.
    let mut kinds: FxHashMap<u32, std::collections::BTreeMap<&'static str, (u64, u64)>> =
        FxHashMap::default();
    if let Some(r) = p.reach.as_ref().filter(|r| r.unavailable.is_none()) {
        for (addr, l) in p.live.iter() {
            let kind = match r.class(addr).map(|c| c.kind) {
                Some(0) => "still_reachable",
                Some(1) => "possibly_lost",
                Some(2) => "indirectly_lost",
                Some(_) => "definitely_lost",
                None => "not_scanned",
            };
            let e = kinds.entry(l.stack).or_default().entry(kind).or_default();
            e.0 += l.size;
            e.1 += 1;
        }
    }
    struct Site {
        site: u32,
        id: u32,
        bytes: Vec<i64>,
        blocks: Vec<i64>,
        born: u64,
        at_exit: std::collections::BTreeMap<&'static str, (u64, u64)>,
    }
    let mut slot: FxHashMap<u32, usize> = FxHashMap::default();
    let mut acc: Vec<Site> = Vec::new();
    for id in ids {
        let site = sites.site(id);
        let i = *slot.entry(site).or_insert_with(|| {
            acc.push(Site {
                site,
                id,
                bytes: vec![0; b.len()],
                blocks: vec![0; b.len()],
                born: 0,
                at_exit: Default::default(),
            });
            acc.len() - 1
        });
        let a = &mut acc[i];
        let mut prev = (0, 0);
        for &(pos, bytes, blocks) in p.growth.points(id) {
            a.bytes[pos as usize] += bytes as i64 - prev.0 as i64;
            a.blocks[pos as usize] += blocks as i64 - prev.1 as i64;
            prev = (bytes, blocks);
        }
        a.born += born.get(&id).copied().unwrap_or(0);
        for (&k, &(bytes, n)) in kinds.get(&id).into_iter().flatten() {
            let e = a.at_exit.entry(k).or_default();
            e.0 += bytes;
            e.1 += n;
        }
    }
    let sum = |d: Vec<i64>| -> Vec<u64> {
        d.into_iter()
            .scan(0i64, |v, x| {
                *v += x;
                Some(*v as u64)
            })
            .collect()
    };
    let mut entries: Vec<GrowthEntry> = Vec::new();
    for a in acc {
        let (bytes, blocks) = (sum(a.bytes), sum(a.blocks));
        let (verdict, evidence) = classify(&times[w..], &yf(&bytes));
        if matches!(verdict, Verdict::Stable | Verdict::Insufficient) {
            continue;
        }
        // The last point the verdict used (a teardown at exit is left out).
        let last = (w + evidence.points.max(1) - 1).min(bytes.len() - 1);
        // Below the smallest effect worth a finding (a block or two caught live): not listed.
        if verdict.flagged()
            && (bytes[last] as i64 - bytes[w] as i64) < MIN_EFFECT_BYTES
            && (blocks[last] as i64 - blocks[w] as i64) < MIN_EFFECT_BLOCKS
        {
            continue;
        }
        entries.push(GrowthEntry {
            verdict,
            delta_bytes: bytes[last] as i64 - bytes[w] as i64,
            delta_blocks: blocks[last] as i64 - blocks[w] as i64,
            born_after_warmup_live: a.born,
            slope_bytes_per_s: evidence.slope_bytes_per_s,
            evidence,
            stack: sites.frames(a.site, a.id, sym),
            series: bytes,
            blocks_series: blocks,
            at_exit: a.at_exit,
            retention: None,
            delta_retained_bytes: None,
            delta_retained_blocks: None,
            site: a.site,
            since: b[w].index,
            callsite: a.id,
            unwind: p
                .stacks
                .get(&a.id)
                .and_then(|s| (s.reason != StopReason::End).then(|| s.reason.describe())),
        });
    }
    entries.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.delta_bytes.cmp(&a.delta_bytes))
            .then_with(|| {
                a.stack
                    .iter()
                    .map(|f| &f.function)
                    .cmp(b.stack.iter().map(|f| &f.function))
            })
            // Callsites with the same functions (two calls in one function): by source line,
            // then module offset, so that the same trace always gives the same order.
            .then_with(|| {
                fn at(f: &Frame) -> (Option<&str>, Option<u32>, Option<&str>, u64) {
                    (f.file.as_deref(), f.line, f.module.as_deref(), f.offset)
                }
                a.stack.iter().map(at).cmp(b.stack.iter().map(at))
            })
    });
    Some((timeline, entries))
}

/// Where warm-up ends, from the allocation rate: the first boundary from which the rate stays
/// near its steady value (the median over the second half of the run) for two epochs running;
/// at most a quarter of the run, and a tenth of it when the rate never settles.
pub fn detect_warmup(times: &[f64], allocs: &[u64]) -> f64 {
    let n = times.len().min(allocs.len());
    let end = times.get(n.wrapping_sub(1)).copied().unwrap_or(0.0);
    if n < 6 {
        return end / 10.0;
    }
    let rates: Vec<f64> = (0..n - 1)
        .map(|i| {
            let dt = (times[i + 1] - times[i]).max(1e-9);
            allocs[i + 1].saturating_sub(allocs[i]) as f64 / dt
        })
        .collect();
    let mut tail: Vec<f64> = rates[rates.len() / 2..].to_vec();
    tail.sort_by(f64::total_cmp);
    let steady = tail[tail.len() / 2];
    let near = |r: f64| (r - steady).abs() <= 0.3 * steady.max(1.0);
    (0..rates.len() - 1)
        .find(|&i| near(rates[i]) && near(rates[i + 1]))
        .map(|i| times[i])
        .filter(|&t| t <= end / 4.0)
        .unwrap_or(end / 10.0)
}

/// A terminal sparkline of `v`, at most `width` characters (averaging neighbours).
pub fn sparkline(v: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if v.is_empty() {
        return String::new();
    }
    let cols = v.len().min(width.max(1));
    let pts: Vec<f64> = (0..cols)
        .map(|c| {
            let (a, b) = (
                c * v.len() / cols,
                ((c + 1) * v.len() / cols).max(c * v.len() / cols + 1),
            );
            v[a..b].iter().map(|&x| x as f64).sum::<f64>() / (b - a) as f64
        })
        .collect();
    let lo = pts.iter().copied().fold(f64::MAX, f64::min);
    let hi = pts.iter().copied().fold(f64::MIN, f64::max);
    pts.iter()
        .map(|&x| {
            if hi <= lo {
                BARS[0]
            } else {
                BARS[(((x - lo) / (hi - lo)) * 7.0).round() as usize]
            }
        })
        .collect()
}

/// Bytes as B, KiB or MiB, one decimal.
pub fn human(bytes: f64) -> String {
    let a = bytes.abs();
    if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if a >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

/// The first frame in the program's own code with a source line: where to look.
pub fn first_source(stack: &[Frame]) -> Option<&Frame> {
    stack
        .iter()
        .find(|f| f.file.is_some() && f.function.is_some())
}

/// The first frame in the program's own source: not in a system header or a toolchain's library
/// (`/usr/include`, libstdc++'s and Rust's standard library sources), else [`first_source`].
pub fn first_own_source(stack: &[Frame]) -> Option<&Frame> {
    let library = |f: &str| {
        f.starts_with("/usr/include/")
            || f.starts_with("/usr/lib/")
            || f.starts_with("/rustc/")
            || f.contains("/.cargo/registry/")
            || f.contains("/rustlib/src/")
    };
    stack
        .iter()
        .find(|f| f.function.is_some() && f.file.as_deref().is_some_and(|x| !library(x)))
        .or_else(|| first_source(stack))
}

/// A callsite's kinds at exit in memcheck's order (definitely lost first), then not scanned.
pub fn by_kind<'a>(
    at_exit: &'a std::collections::BTreeMap<&'static str, (u64, u64)>,
) -> impl Iterator<Item = (&'static str, (u64, u64))> + 'a {
    [
        "definitely_lost",
        "indirectly_lost",
        "possibly_lost",
        "still_reachable",
        "not_scanned",
    ]
    .into_iter()
    .filter_map(|k| at_exit.get(k).map(|&v| (k, v)))
}

pub fn guidance(e: &GrowthEntry) -> String {
    let at = first_source(&e.stack)
        .map(render_frame)
        .unwrap_or_else(|| "the innermost frame above".into());
    let short_at = first_own_source(&e.stack)
        .map(crate::paths::frame_words)
        .unwrap_or_else(|| "the innermost frame above".into());
    // The heap scan at exit says which of the two it is.
    let held = |k: &str| e.at_exit.get(k).map_or(0, |v| v.1);
    let lost = held("definitely_lost") + held("indirectly_lost");
    let reachable = held("still_reachable");
    let all: u64 = e.at_exit.values().map(|v| v.1).sum();
    if let Some(g) = e
        .retention
        .as_ref()
        .filter(|_| e.verdict.grows())
        .and_then(|r| retention_guidance(r, &short_at))
    {
        return g;
    }
    if e.verdict.grows() && lost + reachable > 0 {
        // Nearly all of them either way (the newest block may still sit in a variable).
        if lost > 9 * reachable {
            return format!(
                "Blocks made at {at} keep accumulating and at exit nothing points at them any more \
                 ({lost} of {all} blocks lost): a missing free. Free each where its owner is done with it."
            );
        }
        if reachable > 9 * lost {
            return format!(
                "Blocks made at {at} keep accumulating and at exit they are still reachable \
                 ({reachable} of {all} blocks): something \
                 keeps them (a registry, a cache, a list that only grows). Bound that container, or \
                 remove entries when they are done."
            );
        }
    }
    match e.verdict {
        Verdict::Leak => format!(
            "Blocks made at {at} keep accumulating and none of the newer ones is freed: nothing releases them. \
             Free them where their owner is done with them, or, if something keeps them on purpose (a registry, \
             a session table), bound that container."
        ),
        Verdict::Growing => format!(
            "Still growing at the end of the run, more slowly: an unbounded cache, or a leak under uneven load. \
             Watch it over a longer run, or bound what keeps the blocks made at {at}."
        ),
        Verdict::Plateau => format!(
            "Grew{}, then stayed flat: a cache or pool that filled up, not a leak. Check that its bound is the one \
             you want.",
            e.evidence
                .plateau_from_s
                .map(|t| format!(" until {t:.1} s"))
                .unwrap_or_default()
        ),
        Verdict::Transient => "Rose and came back down: a burst that drained.".into(),
        Verdict::Stable | Verdict::Insufficient => String::new(),
    }
}

/// The root-cause advice a growing callsite's retention gives: the container to bound (its root
/// and the hop that holds the blocks), or the free to add.
fn retention_guidance(r: &crate::paths::Retention, at: &str) -> Option<String> {
    if r.root.kind == "none" {
        if let Some(o) = &r.orphaned_at {
            return Some(crate::orphans::guidance(o, at));
        }
        return Some(format!(
            "Blocks made at {at} keep accumulating and nothing points at them any more: a missing free \
             (the last pointer to each was overwritten or went out of scope). Free each where its owner is \
             done with it; `leakhunt run --orphans` names the free that let go of its holder, if one did."
        ));
    }
    if r.share < 0.5 {
        return None;
    }
    let through: Vec<String> = r.path.iter().map(crate::paths::hop_words).collect();
    let through = if through.is_empty() {
        String::new()
    } else {
        format!(", through {}", through.join(", then "))
    };
    Some(format!(
        "Blocks made at {at} keep accumulating and stay reachable ({:.0}% of them) from {}{through}: \
         a container that only grows. Bound it (evict, cap, or remove entries when done) where the \
         code at {at} adds to it.",
        r.share * 100.0,
        crate::paths::root_words(&r.root)
    ))
}

/// The four-part growth report, as lines (without the `==pid==` prefix).
pub fn render(t: &Timeline, entries: &[GrowthEntry], top: usize) -> Vec<String> {
    let mut out = Vec::new();
    let end = t.times_s.last().copied().unwrap_or(0.0);
    out.push(format!(
        "MEMORY OVER TIME: {} epochs over {end:.1} s, warm-up until {:.1} s",
        t.epochs, t.warmup_s
    ));
    let first = |v: &[u64]| v.first().copied().unwrap_or(0) as f64;
    let last = |v: &[u64]| v.last().copied().unwrap_or(0) as f64;
    out.push(format!(
        "  heap {}  {} -> {}  {} ({:+}/s)",
        sparkline(&t.live_bytes, 48),
        human(first(&t.live_bytes)),
        human(last(&t.live_bytes)),
        t.verdict.as_str(),
        human(t.evidence.slope_bytes_per_s)
    ));
    out.push(format!(
        "  RSS  {}  {} -> {}",
        sparkline(&t.rss_bytes, 48),
        human(first(&t.rss_bytes)),
        human(last(&t.rss_bytes))
    ));
    let all_flagged: Vec<&GrowthEntry> = entries.iter().filter(|e| e.verdict.flagged()).collect();
    // At most `top` (they are worst first already); the rest by module.
    let cut = if top > 0 {
        top.min(all_flagged.len())
    } else {
        all_flagged.len()
    };
    let (flagged, rest) = all_flagged.split_at(cut);
    out.push(String::new());
    if all_flagged.len() >= GROUPS_FROM {
        // Thousands of callsites (a compiler's arenas): where the memory goes first.
        let groups = groups(entries);
        let shown = groups.len().min(10);
        out.push(format!(
            "GROWTH BY FUNCTION: {} callsites that did not stay stable, in {} groups by their innermost {GROUP_FRAMES} functions{}:",
            thousands(all_flagged.len() as u64),
            thousands(groups.len() as u64),
            if shown < groups.len() {
                format!(" (the {shown} largest)")
            } else {
                String::new()
            }
        ));
        for (i, g) in groups.iter().take(shown).enumerate() {
            out.push(format!(
                "  {}. {:+} bytes in {:+} blocks, {} ({} growing): {}",
                i + 1,
                g.delta_bytes,
                g.delta_blocks,
                if g.callsites == 1 {
                    "1 callsite".to_string()
                } else {
                    format!("{} callsites", thousands(g.callsites))
                },
                thousands(g.growing),
                g.functions.join(" < ")
            ));
        }
        out.push(String::new());
    }
    if t.verdict == Verdict::Insufficient {
        out.push(format!(
            "Too little evidence: {} epoch boundaries after warm-up, {} needed for a verdict. Run longer, or with a shorter --epoch.",
            t.evidence.points,
            crate::verdict::MIN_POINTS
        ));
    } else if flagged.is_empty() {
        out.push("No callsite grows: no leak under this load.".into());
    }
    for (i, e) in flagged.iter().enumerate() {
        let ev = &e.evidence;
        out.push(format!(
            "{}. {}: {:+} bytes in {:+} blocks after warm-up ({} born since then, still live), {}/s",
            i + 1,
            e.verdict.as_str().to_uppercase(),
            e.delta_bytes,
            e.delta_blocks,
            thousands(e.born_after_warmup_live),
            human(e.slope_bytes_per_s)
        ));
        out.push(format!(
            "   {}  trend z={:.1}, grew in {:.0}% of epochs, pace {:.2}{}",
            sparkline(&e.series, 40),
            ev.trend_z,
            ev.grew_share * 100.0,
            ev.pace_ratio,
            ev.plateau_from_s
                .map(|t| format!(", flat from {t:.1} s"))
                .unwrap_or_default()
        ));
        // Down to the frame the root cause names (a JIT's function under the runtime's frames).
        let shown = first_own_source(&e.stack)
            .and_then(|f| e.stack.iter().position(|g| std::ptr::eq(f, g)))
            .map_or(8, |i| (i + 2).max(8));
        out.extend(stack_lines(&e.stack, shown).map(|s| format!("   {s}")));
        if let Some(u) = e.unwind {
            out.push(format!("   (stack {u})"));
        }
        if !e.at_exit.is_empty() {
            let parts: Vec<String> = by_kind(&e.at_exit)
                .map(|(k, (bytes, n))| {
                    format!(
                        "{} bytes in {} blocks {}",
                        thousands(bytes),
                        thousands(n),
                        k.replace('_', " ")
                    )
                })
                .collect();
            out.push(format!("   At exit: {}", parts.join(", ")));
        }
        if let Some(r) = &e.retention {
            out.push(format!(
                "   What holds them ({}):",
                crate::paths::scan_words(&r.scan)
            ));
            out.extend(
                crate::paths::lines(r)
                    .into_iter()
                    .map(|s| format!("     {s}")),
            );
            if let Some(o) = &r.orphaned_at {
                out.extend(
                    crate::orphans::lines(o)
                        .into_iter()
                        .map(|s| format!("     {s}")),
                );
            }
        }
        if let (Some(b), Some(n)) = (e.delta_retained_bytes, e.delta_retained_blocks) {
            out.push(format!(
                "   Retained growth: the blocks born after warm-up keep alive {} bytes in {} blocks",
                thousands(b),
                thousands(n)
            ));
        }
        out.push(format!("   Root cause: {}", guidance(e)));
        out.push(String::new());
    }
    if !rest.is_empty() {
        let bytes = rest
            .iter()
            .fold(0i64, |a, e| a.saturating_add(e.delta_bytes.max(0)));
        out.push(format!(
            "... and {} more callsites that did not stay stable (+{} bytes after warm-up) not shown: `--top 0` shows every one; --json and --html keep them all.",
            thousands(rest.len() as u64),
            thousands(bytes as u64)
        ));
        out.extend(crate::report::by_module(
            rest.iter()
                .map(|e| (&e.stack[..], e.delta_bytes.max(0) as u64)),
            "callsite",
        ));
        out.push(String::new());
    }
    let growing: Vec<&&GrowthEntry> = all_flagged.iter().filter(|e| e.verdict.grows()).collect();
    if t.verdict == Verdict::Insufficient {
        out.push(
            "VERIFY: too short a run to judge; `leakhunt verify` needs one at least as long as the run that showed the growth."
                .into(),
        );
    } else if growing.is_empty() {
        out.push(
            "VERIFY: nothing grows; if this run is the fix of an earlier leak, `leakhunt verify BEFORE AFTER` confirms it."
                .into(),
        );
    } else {
        out.push(format!(
            "VERIFY: after fixing {} above, run the same load again and `leakhunt verify BEFORE.trace AFTER.trace`: it exits 0 once nothing grows.",
            if growing.len() == 1 { "the callsite".to_string() } else { format!("the {} growing callsites", growing.len()) }
        ));
    }
    out
}

/// The live view of `leakhunt run --live`: the process curve and the top growing callsites so
/// far, as a screenful of text (the caller clears the screen).
pub fn live_view(p: &Process, sym: &mut Symbolizer) -> String {
    let mut out = String::new();
    let h = p.header.as_ref();
    let b = &p.growth.boundaries;
    let t0 = h.map_or(0, |h| h.start_monotonic_ns);
    let secs = b
        .last()
        .map_or(0.0, |x| x.time_ns.saturating_sub(t0) as f64 / 1e9);
    out.push_str(&format!(
        "leakhunt live: {} (pid {}): {secs:.1} s, {} epochs\n",
        h.map(|h| crate::report::shell_words(&h.argv))
            .unwrap_or_default(),
        p.pid(),
        b.len()
    ));
    let Some((t, entries)) = build(p, None, sym) else {
        out.push_str("  (waiting for the first epochs)\n");
        return out;
    };
    out.push_str(&format!(
        "  heap {}  {} ({}/s, {})   RSS {}\n",
        sparkline(&t.live_bytes, 40),
        human(t.live_bytes.last().copied().unwrap_or(0) as f64),
        human(t.evidence.slope_bytes_per_s),
        t.verdict.as_str(),
        human(t.rss_bytes.last().copied().unwrap_or(0) as f64)
    ));
    out.push_str("  top callsites:\n");
    for e in entries.iter().take(8) {
        out.push_str(&format!(
            "  {:9} {:>10} {:>+8} blocks  {}  {}\n",
            e.verdict.as_str(),
            human(e.delta_bytes as f64),
            e.delta_blocks,
            sparkline(&e.series, 24),
            first_source(&e.stack)
                .map(render_frame)
                .unwrap_or_else(|| "?".into())
        ));
    }
    if entries.is_empty() {
        out.push_str("  (nothing but stable callsites yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_ends_where_the_allocation_rate_settles() {
        let times: Vec<f64> = (0..20).map(|i| i as f64 * 0.5).collect();
        // Steady from the start: warm-up is the first boundary.
        let steady: Vec<u64> = (0..20).map(|i| 1000 * i).collect();
        assert_eq!(detect_warmup(&times, &steady), 0.0);
        // Start-up without load for 2 s, then steady: warm-up until the load begins.
        let late: Vec<u64> = (0..20u64).map(|i| 1000 * i.saturating_sub(4)).collect();
        assert_eq!(detect_warmup(&times, &late), 2.0);
        // A rate that never settles: a tenth of the run.
        let wild: Vec<u64> = (0..20u64).map(|i| i * i * i * 100).collect();
        assert_eq!(detect_warmup(&times, &wild), 0.95);
    }

    #[test]
    fn sparklines_scale_and_thin() {
        assert_eq!(sparkline(&[0, 7, 14], 10), "▁▅█");
        assert_eq!(sparkline(&[5, 5], 10), "▁▁");
        assert_eq!(
            sparkline(&(0..100).collect::<Vec<_>>(), 10).chars().count(),
            10
        );
        assert_eq!(sparkline(&[], 10), "");
    }
}
