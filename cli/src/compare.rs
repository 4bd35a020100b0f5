//! `leakhunt diff` and `leakhunt verify`: what grew between two points of a run (or between two
//! runs), and whether a fix made the growth stop.
//!
//! Across runs, callsites match by the build-id and offset of every frame when the builds are the
//! same, else by their symbolized frames (function, file, line): the same code rebuilt, or moved
//! to another address, is still the same callsite.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use leakhunt_symbolizer::Symbolizer;

use crate::callsite::Callsites;
use crate::growth::{self, GrowthEntry, Timeline};
use crate::input::open_trace;
use crate::process::Process;
use crate::profile::{self, signed, Builder, Located, Profile, Values};
use crate::report::{render_frame, stack_lines, thousands, Frame};
use rustc_hash::FxHashMap;

type SiteKey = Vec<(Option<String>, Option<String>, Option<u32>, u64)>;

/// A callsite across runs: function, file and line of each frame; a frame without a function
/// name (no symbols) by its module offset instead.
fn site_key(stack: &[Frame]) -> SiteKey {
    stack
        .iter()
        .map(|f| {
            let off = if f.function.is_none() { f.offset } else { 0 };
            (f.function.clone(), f.file.clone(), f.line, off)
        })
        .collect()
}

/// A trace read whole, or the error `leakhunt report` gives for it: a decode error, or no
/// process header (saying why when the trace was cut short).
pub fn checked(
    path: &std::path::Path,
    (p, err): (Process, Option<leakhunt_format::DecodeError>),
) -> Result<Process> {
    if let Some(e) = err {
        bail!("{}: {e}", path.display());
    }
    if p.header.is_none() {
        match &p.truncated {
            Some(why) => bail!("{}: {why}; no process header was recorded", path.display()),
            None => bail!("{}: the trace holds no process header", path.display()),
        }
    }
    Ok(p)
}

fn read(path: &std::path::Path) -> Result<Process> {
    checked(path, Process::read_stream(open_trace(path)?))
}

/// A run's growth report, or an error saying why there is none.
fn growth_of(
    path: &std::path::Path,
    p: &Process,
    warmup_s: Option<f64>,
    sym: &mut Symbolizer,
) -> Result<(Timeline, Vec<GrowthEntry>)> {
    match growth::build(p, warmup_s, sym) {
        Some(g) => Ok(g),
        None => bail!(
            "{}: {} epoch boundaries recorded, too few to judge growth (run longer, or with a shorter --epoch)",
            path.display(),
            p.growth.boundaries.len()
        ),
    }
}

fn first_frame(stack: &[Frame]) -> String {
    stack
        .iter()
        .find(|f| f.file.is_some())
        .or(stack.first())
        .map(render_frame)
        .unwrap_or_else(|| "(no stack)".into())
}

/// `leakhunt verify BEFORE AFTER`: every callsite that was `leak` or `growing` before must be
/// `plateau`, `stable` or `transient` after, over a window at least as long. Returns the text and
/// whether the fix holds.
pub fn verify(
    before: &std::path::Path,
    after: &std::path::Path,
    warmup_s: Option<f64>,
    sym: &mut Symbolizer,
) -> Result<(String, bool)> {
    let (pb, pa) = (read(before)?, read(after)?);
    let (tb, gb) = growth_of(before, &pb, warmup_s, sym)?;
    let (ta, ga) = growth_of(after, &pa, warmup_s, sym)?;
    let window = |t: &Timeline| t.times_s.last().copied().unwrap_or(0.0) - t.warmup_s;
    let mut out = String::new();
    let mut ok = true;
    let after_sites: HashMap<SiteKey, &GrowthEntry> =
        ga.iter().map(|e| (site_key(&e.stack), e)).collect();
    let grew: Vec<&GrowthEntry> = gb.iter().filter(|e| e.verdict.grows()).collect();
    let _ = writeln!(
        out,
        "leakhunt verify: before: {} growing callsite{} over {:.1} s; after: {:.1} s observed",
        grew.len(),
        if grew.len() == 1 { "" } else { "s" },
        window(&tb),
        window(&ta)
    );
    // Runs of the same length differ by a boundary or two (timing, where warm-up ends, a last
    // boundary that just made it or not): allow two and a half epochs or 5%.
    let spacing = |t: &Timeline| {
        let n = t.times_s.len();
        if n > 1 {
            (t.times_s[n - 1] - t.times_s[0]) / (n - 1) as f64
        } else {
            0.0
        }
    };
    let slack = (2.5 * spacing(&ta).max(spacing(&tb))).max(0.05 * window(&tb));
    if window(&ta) + slack < window(&tb) {
        ok = false;
        let _ = writeln!(
            out,
            "  the after run was observed for {:.1} s, less than the {:.1} s that showed the growth: run it at least as long",
            window(&ta),
            window(&tb)
        );
    }
    for e in &grew {
        let now = after_sites.get(&site_key(&e.stack));
        let state = now.map_or("gone", |a| a.verdict.as_str());
        let fixed = now.is_none_or(|a| !a.verdict.grows());
        ok &= fixed;
        let _ = writeln!(
            out,
            "  {} {}: {} before ({:+} bytes in {:+} blocks{}), {} after{}",
            if fixed {
                "FIXED        "
            } else {
                "STILL GROWING"
            },
            first_frame(&e.stack),
            e.verdict.as_str(),
            e.delta_bytes,
            e.delta_blocks,
            exit_kinds(e),
            if state == "gone" { "stable" } else { state },
            now.filter(|a| a.verdict.grows())
                .map(|a| format!(" ({})", exit_kinds(a).trim_start_matches(", ")))
                .filter(|s| s != " ()")
                .unwrap_or_default()
        );
    }
    let before_sites: HashMap<SiteKey, &GrowthEntry> =
        gb.iter().map(|e| (site_key(&e.stack), e)).collect();
    for e in ga.iter().filter(|e| e.verdict.grows()) {
        if !before_sites.contains_key(&site_key(&e.stack)) {
            ok = false;
            let _ = writeln!(
                out,
                "  NEW GROWTH    {}: {} after ({:+} bytes in {:+} blocks{})",
                first_frame(&e.stack),
                e.verdict.as_str(),
                e.delta_bytes,
                e.delta_blocks,
                exit_kinds(e)
            );
        }
    }
    let next = ga
        .iter()
        .filter(|e| e.verdict.grows())
        .max_by_key(|e| e.delta_bytes);
    match (ok, next) {
        (true, _) if grew.is_empty() => {
            let _ = writeln!(out, "nothing grew before: there was no growth to fix");
        }
        (true, _) => {
            let _ = writeln!(out, "fixed: nothing that grew before grows now");
        }
        (false, Some(e)) => {
            let _ = writeln!(
                out,
                "still growing; chase next: {} ({}/s)",
                first_frame(&e.stack),
                thousands(e.slope_bytes_per_s.max(0.0) as u64)
            );
        }
        (false, None) => {}
    }
    Ok((out, ok))
}

/// `, at exit N blocks definitely lost, M still reachable` for an entry with a heap scan
/// (memcheck's kinds of the callsite's blocks live at exit), else nothing.
fn exit_kinds(e: &GrowthEntry) -> String {
    if e.at_exit.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = crate::growth::by_kind(&e.at_exit)
        .map(|(k, (_, n))| format!("{} {}", thousands(n), k.replace('_', " ")))
        .collect();
    format!(", at exit {}", parts.join(", "))
}

/// A point of a run: a snapshot's name, an epoch number (`3`), a time from the start (`2.5s`,
/// `800ms`), `warmup` or `end`; returns its boundary position.
pub fn point(p: &Process, t: &Timeline, spec: &str) -> Result<usize> {
    let b = &p.growth.boundaries;
    match spec {
        "end" => return Ok(b.len() - 1),
        "warmup" => {
            return Ok(t.times_s.iter().position(|&x| x >= t.warmup_s).unwrap_or(0));
        }
        _ => {}
    }
    if let Some((_, index)) = p.snapshots.iter().rev().find(|(name, _)| name == spec) {
        return b
            .iter()
            .position(|e| e.index == *index)
            .with_context(|| format!("snapshot {spec} was taken after the last recorded event"));
    }
    if let Ok(n) = spec.parse::<u32>() {
        return b
            .iter()
            .position(|e| e.index == n)
            .with_context(|| format!("no epoch {n} in this trace (epochs 1 to {})", b.len()));
    }
    let d = crate::parse_duration(spec).map_err(anyhow::Error::msg)?;
    let s = d.as_secs_f64();
    t.times_s
        .iter()
        .position(|&x| x >= s)
        .with_context(|| format!("the trace ends before {spec}"))
}

/// What `leakhunt diff` found: its text, and (when asked for) the growth as a profile.
pub struct Diff {
    pub text: String,
    /// Per callsite, the change between the two points: live blocks and bytes
    /// (`inuse_*`), and the allocations made in between (`alloc_*`); for two traces, the second's
    /// end less the first's.
    pub profile: Option<Profile>,
}

/// `leakhunt diff TRACE --from A --to B`: per callsite, what changed between the two points,
/// sorted by the change in live bytes; with `profile`, also as a growth profile.
pub fn diff_one(
    path: &std::path::Path,
    from: &str,
    to: &str,
    warmup_s: Option<f64>,
    profile: bool,
    sym: &mut Symbolizer,
) -> Result<Diff> {
    let f = open_trace(path)?;
    if f.is_pipe() {
        bail!(
            "{}: a diff of one trace reads it twice: give a file, not a pipe",
            path.display()
        );
    }
    let p = checked(path, Process::read_stream(f))?;
    let (t, _) = growth_of(path, &p, warmup_s, sym)?;
    let (a, b) = (point(&p, &t, from)?, point(&p, &t, to)?);
    if a >= b {
        bail!("--from ({from}) must come before --to ({to})");
    }
    // Second pass for the blocks born after A and still live at B.
    let bs = &p.growth.boundaries;
    let (probe, err) = Process::read_stream_probe(open_trace(path)?, bs[a].index, bs[b].index);
    if let Some(e) = err {
        bail!("{}: {e}", path.display());
    }
    // Per callsite (shown with the addresses of its first stack): (callsite, stack, bytes,
    // blocks, born).
    let mut sites = Callsites::new(&p);
    let mut ids: Vec<u32> = p.growth.stacks().collect();
    ids.sort_unstable();
    let mut slot: HashMap<u32, usize> = HashMap::new();
    let mut rows: Vec<(u32, u32, i64, i64, u64)> = Vec::new();
    for id in ids {
        let site = sites.site(id);
        let i = *slot.entry(site).or_insert_with(|| {
            rows.push((site, id, 0, 0, 0));
            rows.len() - 1
        });
        let (from, to) = (p.growth.at(id, a), p.growth.at(id, b));
        let r = &mut rows[i];
        r.2 += to.0 as i64 - from.0 as i64;
        r.3 += to.1 as i64 - from.1 as i64;
        r.4 += probe.probe_born.get(&id).copied().unwrap_or(0);
    }
    rows.retain(|r| r.2 != 0 || r.3 != 0 || r.4 != 0);
    // Retained growth: what the blocks born after A keep alive, at the first heap scan made at or
    // after B (a snapshot's, else the one at exit).
    let scan = retained_scan(&p, bs[b].index);
    let mut retained: HashMap<u32, (u64, u64)> = HashMap::new();
    if let Some(ix) = &scan {
        for id in ix.stacks() {
            let site = sites.site(id);
            let (bytes, blocks) = ix.retained(&[id], bs[a].index);
            let e = retained.entry(site).or_default();
            e.0 = e.0.saturating_add(bytes);
            e.1 = e.1.saturating_add(blocks);
        }
    }
    let grown = |r: &(u32, u32, i64, i64, u64)| retained.get(&r.0).map_or(0, |x| x.0);
    rows.sort_by(|x, y| {
        grown(y)
            .cmp(&grown(x))
            .then(y.2.cmp(&x.2))
            .then(y.4.cmp(&x.4))
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leakhunt diff {}: epoch {} ({:.1} s) -> epoch {} ({:.1} s): heap {:+} bytes in {:+} blocks",
        path.display(),
        p.growth.boundaries[a].index,
        t.times_s[a],
        p.growth.boundaries[b].index,
        t.times_s[b],
        t.live_bytes[b] as i64 - t.live_bytes[a] as i64,
        t.live_blocks[b] as i64 - t.live_blocks[a] as i64
    );
    if let Some(ix) = &scan {
        let _ = writeln!(
            out,
            "sorted by retained growth: what the blocks born since the start point keep alive (theirs and what only they reach) at the {}",
            crate::paths::scan_words(&ix.scan)
        );
    }
    for r in rows.iter().take(30) {
        let &(site, id, bytes, blocks, born) = r;
        let kept = match retained.get(&site) {
            Some(&(rb, rn)) => format!(
                "; they keep alive {} bytes in {} blocks",
                thousands(rb),
                thousands(rn)
            ),
            None if scan.is_some() => "; they keep alive 0 bytes".into(),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{bytes:+} bytes in {blocks:+} blocks, {} born since and live at the end point{kept}",
            thousands(born)
        );
        for l in stack_lines(&sites.frames(site, id, sym), 8) {
            let _ = writeln!(out, "   {l}");
        }
    }
    if rows.is_empty() {
        let _ = writeln!(out, "no callsite changed");
    }
    let profile = profile.then(|| {
        // Every stack whose live memory changed or that allocated in between.
        let mut per: FxHashMap<u32, Values> = FxHashMap::default();
        for id in p.growth.stacks() {
            let (from, to) = (p.growth.at(id, a), p.growth.at(id, b));
            let v = per.entry(id).or_default();
            v.inuse_space = signed(to.0).saturating_sub(signed(from.0));
            v.inuse_objects = signed(to.1).saturating_sub(signed(from.1));
        }
        for (&id, &(n, bytes)) in &probe.probe_allocs {
            let v = per.entry(id).or_default();
            v.alloc_objects = signed(n);
            v.alloc_space = signed(bytes);
        }
        let mut builder = Builder::new();
        profile::by_callsite(&p, per, sym, &mut builder);
        builder.finish(
            &p,
            format!(
                "growth from {from} (epoch {}, {:.1} s) to {to} (epoch {}, {:.1} s): live blocks and bytes gained, allocations made in between",
                bs[a].index, t.times_s[a], bs[b].index, t.times_s[b]
            ),
        )
    });
    Ok(Diff { text: out, profile })
}

/// The retention index of the first heap scan at or after boundary index `at`: a snapshot's,
/// else the one at exit.
fn retained_scan(p: &Process, at: u32) -> Option<crate::paths::Index> {
    p.snapshot_scans
        .iter()
        .filter(|s| s.epoch >= at && s.unavailable.is_none())
        .find_map(|s| {
            crate::paths::Index::new(&s.items, s.snapshot.as_deref().unwrap_or("(unnamed)"))
        })
        .or_else(|| {
            p.reach
                .as_ref()
                .filter(|r| r.unavailable.is_none())
                .and_then(|r| crate::paths::Index::new(&r.items, "exit"))
        })
}

/// `leakhunt diff TRACE_A TRACE_B`: live memory per callsite at the end of each run, B minus A;
/// with `profile`, also as a growth profile (with the allocations of each run, B minus A).
pub fn diff_two(
    a: &std::path::Path,
    b: &std::path::Path,
    profile: bool,
    sym: &mut Symbolizer,
) -> Result<Diff> {
    let (pa, pb) = (read(a)?, read(b)?);
    // Callsites match by (module build-id, offset) of every frame when the builds are the same;
    // when they differ (or a module has no build-id), by their symbolized frames: a stack joins
    // the first row made with its exact key, else the first made with its names.
    type Exact = Vec<(Vec<u8>, u64)>;
    /// (frames, bytes, blocks, retained bytes at exit, allocations and their bytes, the frames
    /// located for the profile)
    type Row = (Vec<Frame>, i64, i64, i64, (i64, i64), Vec<Located>);
    let mut table: Vec<Row> = Vec::new();
    let mut by_exact: HashMap<Exact, usize> = HashMap::new();
    let mut by_names: HashMap<SiteKey, usize> = HashMap::new();
    let mut builder = Builder::new();
    let both_scanned = [&pa, &pb]
        .iter()
        .all(|p| retained_scan(p, u32::MAX).is_some());
    for (p, sign) in [(&pa, -1i64), (&pb, 1)] {
        let mut sites = Callsites::new(p);
        let scan = retained_scan(p, u32::MAX).filter(|_| both_scanned);
        let mut by_stack: HashMap<u32, (i64, i64)> = HashMap::new();
        for l in p.live.values() {
            let e = by_stack.entry(l.stack).or_default();
            e.0 += l.size as i64;
            e.1 += 1;
        }
        let mut ids: Vec<_> = by_stack.into_iter().collect();
        ids.sort_unstable_by_key(|(id, _)| *id);
        // For the profile, the stacks that allocated, after those with live blocks (so that the
        // rows of the text come in the same order either way).
        let mut allocs: Vec<(u32, u64, u64)> = if profile {
            p.growth.alloc_totals().collect()
        } else {
            Vec::new()
        };
        allocs.sort_unstable_by_key(|e| e.0);
        let alloc_of: HashMap<u32, (i64, i64)> = allocs
            .iter()
            .map(|&(id, n, bytes)| (id, (signed(n), signed(bytes))))
            .collect();
        let live_ids: std::collections::HashSet<u32> = ids.iter().map(|e| e.0).collect();
        ids.extend(
            allocs
                .iter()
                .filter(|e| !live_ids.contains(&e.0))
                .map(|e| (e.0, (0, 0))),
        );
        for (id, (bytes, blocks)) in ids {
            let site = sites.site(id);
            let exact = sites.exact(site);
            let (frames, located) = if profile {
                let located = sites.frames_located(site, id, sym);
                let frames = located.iter().map(|l| l.2.clone()).collect();
                (frames, builder.locate(p, located))
            } else {
                (sites.frames(site, id, sym), Vec::new())
            };
            let names = site_key(&frames);
            let hit = exact
                .as_ref()
                .and_then(|e| by_exact.get(e))
                .or_else(|| by_names.get(&names))
                .copied();
            let kept = scan.as_ref().map_or(0, |ix| {
                i64::try_from(ix.retained(&[id], 0).0).unwrap_or(i64::MAX)
            });
            let (n, nbytes) = alloc_of.get(&id).copied().unwrap_or_default();
            match hit {
                Some(i) => {
                    let r = &mut table[i];
                    r.1 += sign * bytes;
                    r.2 += sign * blocks;
                    r.3 = r.3.saturating_add(sign * kept);
                    r.4 .0 = r.4 .0.saturating_add(sign * n);
                    r.4 .1 = r.4 .1.saturating_add(sign * nbytes);
                }
                None => {
                    let i = table.len();
                    if let Some(e) = exact {
                        by_exact.entry(e).or_insert(i);
                    }
                    by_names.entry(names).or_insert(i);
                    table.push((
                        frames,
                        sign * bytes,
                        sign * blocks,
                        sign * kept,
                        (sign * n, sign * nbytes),
                        located,
                    ));
                }
            }
        }
    }
    let profile = profile.then(|| {
        for r in &table {
            let v = Values {
                alloc_objects: r.4 .0,
                alloc_space: r.4 .1,
                inuse_objects: r.2,
                inuse_space: r.1,
            };
            builder.push(r.5.clone(), v);
        }
        std::mem::take(&mut builder).finish(
            &pb,
            format!(
                "growth from the end of {} to the end of {}: live blocks and bytes gained, allocations made (the second run's less the first's)",
                a.display(),
                b.display()
            ),
        )
    });
    let mut rows: Vec<_> = table
        .into_iter()
        .filter(|r| r.1 != 0 || r.2 != 0 || r.3 != 0)
        .collect();
    rows.sort_by_key(|y| (std::cmp::Reverse(y.3), std::cmp::Reverse(y.1)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leakhunt diff {} -> {}: live memory at the end of each run, by callsite",
        a.display(),
        b.display()
    );
    if both_scanned {
        let _ = writeln!(
            out,
            "sorted by the change in retained bytes (what each callsite's blocks keep alive at exit)"
        );
    }
    for (frames, bytes, blocks, kept, _, _) in rows.iter().take(30) {
        if both_scanned {
            let _ = writeln!(
                out,
                "{bytes:+} bytes in {blocks:+} blocks; retained {kept:+} bytes"
            );
        } else {
            let _ = writeln!(out, "{bytes:+} bytes in {blocks:+} blocks");
        }
        for l in stack_lines(frames, 8) {
            let _ = writeln!(out, "   {l}");
        }
    }
    if rows.is_empty() {
        let _ = writeln!(out, "no callsite differs");
    }
    Ok(Diff { text: out, profile })
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakhunt_format::encode::{self, Header};
    use leakhunt_format::{slot, AllocFn, Epoch};
    use std::path::PathBuf;

    /// A trace of `epochs` epochs of 100 ms; in each, stack `s` gets `grow(s, epoch)` new
    /// 64-byte blocks that are never freed (frames are bare addresses: no modules).
    fn trace(name: &str, epochs: u32, stacks: &[u32], grow: impl Fn(u32, u32) -> u32) -> PathBuf {
        let mut out = encode::preamble().to_vec();
        encode::header(
            &Header {
                arch: "x86_64".into(),
                pointer_size: 8,
                little_endian: true,
                pid: 1,
                ppid: 0,
                start_realtime_ns: 0,
                start_monotonic_ns: 0,
                exe: "synthetic".into(),
                argv: vec!["synthetic".into()],
                max_frames: 64,
            },
            &mut out,
        );
        let mut slots = Vec::new();
        for &s in stacks {
            slots.extend_from_slice(&slot::stack_header(
                s,
                0,
                leakhunt_format::StopReason::End,
                1,
            ));
            slots.extend_from_slice(&slot::frames(&[0x1000 * s as u64]));
        }
        let (mut seq, mut addr) = (0u64, 0x10_0000u64);
        for e in 1..=epochs {
            for &s in stacks {
                for _ in 0..grow(s, e) {
                    slots.extend_from_slice(&slot::alloc(AllocFn::Malloc, s, seq, addr, 64));
                    seq += 1;
                    addr += 64;
                }
            }
            encode::batch(1, &slots, &mut out);
            slots.clear();
            let ep = Epoch {
                index: e,
                time_ns: e as u64 * 100_000_000,
                seq,
                rss: 1 << 20,
            };
            encode::epoch(&ep, &mut out);
        }
        let p = std::env::temp_dir().join(format!("leakhunt-verify-{}-{name}", std::process::id()));
        std::fs::write(&p, out).unwrap();
        p
    }

    #[test]
    fn a_block_or_two_caught_live_is_no_finding_but_a_block_an_epoch_is() {
        let mut sym = Symbolizer::new();
        // Stack 1: two 64-byte blocks, at epochs 5 and 6, never freed (+128 bytes, 2 blocks);
        // stack 2: one 64-byte block every epoch (+704 bytes, 11 blocks after warm-up).
        let path = trace("effect", 12, &[1, 2], |s, e| match s {
            1 => u32::from(e == 5 || e == 6),
            _ => 1,
        });
        let p = read(&path).unwrap();
        let (_, entries) = growth::build(&p, Some(0.0), &mut sym).unwrap();
        let at: Vec<u64> = entries.iter().map(|e| e.stack[0].address).collect();
        assert_eq!(at, [0x2000], "{entries:#?}");
        assert_eq!(entries[0].delta_blocks, 11);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn verify_passes_a_fix_and_fails_what_still_grows_a_new_growth_or_a_short_run() {
        let mut sym = Symbolizer::new();
        // Stack 1 leaks steadily before; stack 2 is a cache that fills in three epochs.
        let before = trace("before", 30, &[1, 2], |s, e| {
            if s == 1 {
                3
            } else {
                (e <= 3) as u32 * 50
            }
        });
        let fixed = trace("fixed", 30, &[1, 2], |s, e| {
            if s == 1 {
                (e <= 2) as u32
            } else {
                (e <= 3) as u32 * 50
            }
        });
        let (text, ok) = verify(&before, &fixed, None, &mut sym).unwrap();
        assert!(ok, "{text}");
        assert!(
            text.contains("FIXED") && text.contains("fixed: nothing that grew before grows now"),
            "{text}"
        );
        let (text, ok) = verify(&before, &before, None, &mut sym).unwrap();
        assert!(
            !ok && text.contains("STILL GROWING") && text.contains("chase next"),
            "{text}"
        );
        // The fix, but another callsite starts to grow.
        let other = trace("other", 30, &[1, 3], |s, e| {
            if s == 3 {
                4
            } else {
                (e <= 2) as u32
            }
        });
        let (text, ok) = verify(&before, &other, None, &mut sym).unwrap();
        assert!(!ok && text.contains("NEW GROWTH"), "{text}");
        // A fixed run observed for a third of the time proves nothing.
        let short = trace("short", 10, &[1, 2], |s, e| {
            if s == 1 {
                (e <= 2) as u32
            } else {
                (e <= 3) as u32 * 50
            }
        });
        let (text, ok) = verify(&before, &short, None, &mut sym).unwrap();
        assert!(!ok && text.contains("run it at least as long"), "{text}");
        // Too few epochs to judge at all: an error that says so.
        let tiny = trace("tiny", 2, &[1], |_, _| 1);
        let e = verify(&before, &tiny, None, &mut sym)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too few to judge growth"), "{e}");
        for p in [before, fixed, other, short, tiny] {
            let _ = std::fs::remove_file(p);
        }
    }
}
