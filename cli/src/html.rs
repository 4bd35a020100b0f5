//! The report as one self-contained, offline HTML file (`--html FILE`): per process, the chart
//! of the live heap over time (stacked areas of the callsites that grew most, and the rest, on
//! an axis of bytes; a tooltip with each area's bytes at the epoch under the mouse), the four
//! parts of the growth report, a table of the callsites that sorts on a click on a column's
//! header and shows a callsite's whole stack on a click on its row, the blocks unfreed at exit,
//! and flame graphs (inferno's, as `--flamegraph` draws them) of the bytes live at the end and of
//! the growth after warm-up.
//!
//! Everything is inline: the SVG is drawn here, the data the script needs is JSON in the page,
//! the script and the styles are a few lines of plain JS and CSS, and each flame graph is its
//! own document in an `<iframe srcdoc>` (its script and ids then cannot meet the page's). The
//! page fetches nothing; without script it still shows the chart, the tables and the stacks of
//! the loss records.

use std::fmt::Write as _;

use serde_json::json;

use crate::growth::{human, GrowthEntry, Timeline};
use crate::report::{stack_lines, thousands, Frame, ProcReport, Report};
use crate::verdict::Verdict;

/// `s` as HTML text or attribute value: markup characters as entities, control characters as
/// escapes ([`crate::report::escape_control`]; a page has no use for them, and some are not
/// allowed in HTML at all).
fn esc(s: &str) -> String {
    crate::report::escape_control(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A whole document as an attribute value (`srcdoc`): markup characters as entities, line
/// breaks and tabs kept (the document's script needs them), other control characters replaced.
fn esc_doc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// JSON for a `<script type="application/json">`: `<` escaped (it can only stand in strings), so
/// that no name can close the script element.
fn script_json(v: &serde_json::Value) -> String {
    v.to_string().replace('<', "\\u003c")
}

/// The areas' colours, the callsite that grew most first; "other" is grey.
const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2",
];
const OTHER: &str = "#c7c7c7";

/// How many callsites get an area of their own in the chart (by growth after warm-up); the rest
/// of the heap is "other".
pub const TOP_AREAS: usize = 5;

/// How many callsites the table lists (the most unfreed and grown bytes first).
pub const TABLE_ROWS: usize = 1000;

/// The ticks of an axis of bytes from 0 to at least `max`: 4 to 10 of them, a step of 1, 2 or 5
/// times a power of ten of bytes, KiB, MiB, GiB (and on; or 1024 of one: the next unit).
pub fn byte_ticks(max: u64) -> Vec<u64> {
    let max = max.max(1);
    let raw = max.div_ceil(5);
    let unit = [1u64 << 60, 1 << 50, 1 << 40, 1 << 30, 1 << 20, 1 << 10, 1]
        .into_iter()
        .find(|&u| raw >= u)
        .unwrap_or(1);
    let m = raw.div_ceil(unit);
    let nice = [1u64, 2, 5, 10, 20, 50, 100, 200, 500, 1024]
        .into_iter()
        .find(|&n| n >= m)
        .unwrap_or(1024);
    let step = nice.saturating_mul(unit);
    let n = max.div_ceil(step);
    (0..=n).map(|i| i.saturating_mul(step)).collect()
}

/// A tick's label: `0`, `512 B`, `64 KiB`, `1.5 MiB`, `2 GiB`.
pub fn byte_label(v: u64) -> String {
    if v == 0 {
        return "0".into();
    }
    for (u, name) in [
        (1u64 << 60, "EiB"),
        (1 << 50, "PiB"),
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if v >= u {
            let x = v as f64 / u as f64;
            let s = format!("{x:.1}");
            return format!("{} {name}", s.trim_end_matches(".0"));
        }
    }
    format!("{v} B")
}

/// One stacked area: its name, colour and bytes at every boundary.
struct Area {
    name: String,
    color: &'static str,
    v: Vec<u64>,
}

/// A callsite's short name: the function of its first frame with a source line, where.
fn site_label(stack: &[Frame]) -> String {
    let f = crate::growth::first_source(stack).or(stack.first());
    match f {
        None => "(no stack)".into(),
        Some(f) => {
            let func = f.function.as_deref().unwrap_or("???");
            match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    format!(
                        "{func} ({}:{line})",
                        file.rsplit('/').next().unwrap_or(file)
                    )
                }
                _ => func.to_string(),
            }
        }
    }
}

/// The chart's areas, bottom first: the [`TOP_AREAS`] callsites that grew most after warm-up
/// (those that grew at all), then the rest of the live heap.
fn areas(t: &Timeline, growth: &[GrowthEntry]) -> Vec<Area> {
    let mut top: Vec<&GrowthEntry> = growth.iter().filter(|e| e.delta_bytes > 0).collect();
    top.sort_by_key(|e| std::cmp::Reverse(e.delta_bytes));
    top.truncate(TOP_AREAS);
    let mut out: Vec<Area> = top
        .iter()
        .enumerate()
        .map(|(i, e)| Area {
            name: site_label(&e.stack),
            color: COLORS[i % COLORS.len()],
            v: e.series.clone(),
        })
        .collect();
    let other = t
        .live_bytes
        .iter()
        .enumerate()
        .map(|(i, &heap)| {
            let mine: u64 = out.iter().map(|a| a.v.get(i).copied().unwrap_or(0)).sum();
            heap.saturating_sub(mine)
        })
        .collect();
    out.push(Area {
        name: "other".into(),
        color: OTHER,
        v: other,
    });
    out
}

const W: f64 = 900.0;
const H: f64 = 340.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 30.0;

/// The chart (SVG) of `t` with its areas stacked, and the JSON its tooltip reads.
fn chart(id: &str, t: &Timeline, areas: &[Area]) -> (String, serde_json::Value) {
    let tmax = t.times_s.last().copied().unwrap_or(1.0).max(1e-9);
    let n = t.times_s.len();
    let stacked_max = (0..n)
        .map(|i| {
            areas
                .iter()
                .map(|a| a.v.get(i).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    let ticks = byte_ticks(stacked_max);
    let ymax = ticks.last().copied().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let xs: Vec<f64> = t
        .times_s
        .iter()
        .map(|&x| ((LEFT + x / tmax * pw) * 10.0).round() / 10.0)
        .collect();
    let y = |v: u64| TOP + ph - v as f64 / ymax * ph;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg id="{id}" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="live heap over time, stacked by callsite" data-data="{id}-data" data-tip="{id}-tip">"##
    );
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>"##
    );
    // Warm-up shaded.
    let wx = LEFT + (t.warmup_s / tmax) * pw;
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{ph}" fill="#ececec"><title>warm-up</title></rect>"##,
        (wx - LEFT).max(0.0)
    );
    // The bytes axis: a grid line and a label at each tick.
    for &v in &ticks {
        let yy = y(v);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text class="ytick" x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            byte_label(v)
        );
    }
    for k in 0..=4 {
        let x = LEFT + k as f64 / 4.0 * pw;
        let _ = write!(
            svg,
            r##"<text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{:.1} s</text>"##,
            H - BOTTOM + 16.0,
            tmax * k as f64 / 4.0
        );
    }
    // The areas, bottom first: each between the running sum below it and that sum plus itself.
    let mut below = vec![0u64; n];
    for a in areas {
        let above: Vec<u64> = (0..n)
            .map(|i| below[i].saturating_add(a.v.get(i).copied().unwrap_or(0)))
            .collect();
        let mut pts: Vec<String> = Vec::with_capacity(2 * n);
        for i in 0..n {
            pts.push(format!("{},{:.1}", xs[i], y(above[i])));
        }
        for i in (0..n).rev() {
            pts.push(format!("{},{:.1}", xs[i], y(below[i])));
        }
        let _ = write!(
            svg,
            r##"<polygon class="area" fill="{}" fill-opacity="0.85" stroke="{}" points="{}"><title>{}</title></polygon>"##,
            a.color,
            a.color,
            pts.join(" "),
            esc(&a.name)
        );
        below = above;
    }
    // What the mouse moves over, and the line at the epoch shown.
    let _ = write!(
        svg,
        r##"<line class="cursor" x1="0" x2="0" y1="{TOP}" y2="{}" stroke="#333" stroke-dasharray="3,3" visibility="hidden"/><rect class="hit" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="transparent"/>"##,
        TOP + ph
    );
    svg.push_str("</svg>");
    let data = json!({
        "xs": xs,
        "times": t.times_s,
        "heap": t.live_bytes,
        "rss": t.rss_bytes,
        "areas": areas.iter().map(|a| json!({"name": a.name, "color": a.color, "v": a.v})).collect::<Vec<_>>(),
    });
    (svg, data)
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Leak => "leak",
        Verdict::Growing => "growing",
        Verdict::Plateau => "plateau",
        _ => "other",
    }
}

/// A frame in full, for a callsite's stack: the function, its whole file path and line, whether
/// it was inlined, and where its address lies.
fn frame_full(f: &Frame) -> String {
    let mut s = format!(
        "{:#x}: {}",
        f.address,
        f.function.as_deref().unwrap_or("???")
    );
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(s, " at {file}:{line}");
    } else if let Some(file) = &f.file {
        let _ = write!(s, " at {file}");
    }
    if f.inlined {
        s.push_str(" [inlined]");
    }
    if let Some(m) = &f.module {
        let _ = write!(s, "  ({m}+{:#x})", f.offset);
    }
    s
}

/// One row of the callsite table: a callsite's growth after warm-up and its blocks unfreed at
/// exit (every loss record of it, of every kind).
struct Row<'a> {
    callsite: u32,
    stack: &'a [Frame],
    verdict: Option<Verdict>,
    growth: i64,
    slope: f64,
    bytes: u64,
    blocks: u64,
    kinds: Vec<&'static str>,
}

fn rows(p: &ProcReport) -> Vec<Row<'_>> {
    let mut slot: rustc_hash::FxHashMap<u32, usize> = Default::default();
    let mut out: Vec<Row> = Vec::new();
    // The row of callsite `site`, made empty at its first mention.
    fn row<'a>(
        out: &mut Vec<Row<'a>>,
        slot: &mut rustc_hash::FxHashMap<u32, usize>,
        site: u32,
        callsite: u32,
        stack: &'a [Frame],
    ) -> usize {
        *slot.entry(site).or_insert_with(|| {
            out.push(Row {
                callsite,
                stack,
                verdict: None,
                growth: 0,
                slope: 0.0,
                bytes: 0,
                blocks: 0,
                kinds: Vec::new(),
            });
            out.len() - 1
        })
    }
    for e in &p.growth {
        let i = row(&mut out, &mut slot, e.site, e.callsite, &e.stack);
        let r = &mut out[i];
        r.verdict = Some(e.verdict);
        r.growth = r.growth.saturating_add(e.delta_bytes);
        r.slope += e.slope_bytes_per_s;
    }
    for l in &p.leaks {
        let i = row(&mut out, &mut slot, l.site, l.callsite, &l.stack);
        let r = &mut out[i];
        r.bytes = r.bytes.saturating_add(l.bytes);
        r.blocks = r.blocks.saturating_add(l.blocks);
        let kind = if l.suppressed.is_some() {
            "suppressed"
        } else {
            l.kind
        };
        if !r.kinds.contains(&kind) {
            r.kinds.push(kind);
        }
    }
    // The most grown and unfreed bytes first, then by name (the same trace, the same page).
    out.sort_by(|a, b| {
        (b.growth.max(0) as u64)
            .saturating_add(b.bytes)
            .cmp(&(a.growth.max(0) as u64).saturating_add(a.bytes))
            .then_with(|| site_label(a.stack).cmp(&site_label(b.stack)))
            .then(a.callsite.cmp(&b.callsite))
    });
    out
}

/// The callsite table and the JSON of its stacks.
fn table(id: &str, p: &ProcReport, out: &mut String) -> serde_json::Value {
    let all = rows(p);
    let shown = &all[..all.len().min(TABLE_ROWS)];
    let _ = write!(
        out,
        "<h3>Callsites</h3><p class=\"hint\">{} callsite{}{}. Click a column's header to sort by it (again: the other way), a row for its whole stack.</p>",
        thousands(all.len() as u64),
        if all.len() == 1 { "" } else { "s" },
        if all.len() > shown.len() {
            format!(
                " (the {} with the most bytes grown and unfreed are listed)",
                thousands(shown.len() as u64)
            )
        } else {
            String::new()
        }
    );
    let _ = write!(
        out,
        "<table class=\"sites\" id=\"{id}\" data-data=\"{id}-data\"><thead><tr>\
         <th data-type=\"text\" tabindex=\"0\">callsite</th>\
         <th data-type=\"text\" tabindex=\"0\">verdict</th>\
         <th data-type=\"num\" tabindex=\"0\">growth after warm-up (bytes)</th>\
         <th data-type=\"num\" tabindex=\"0\">slope (bytes/s)</th>\
         <th data-type=\"num\" tabindex=\"0\">unfreed at exit (bytes)</th>\
         <th data-type=\"num\" tabindex=\"0\">blocks</th>\
         <th data-type=\"text\" tabindex=\"0\">kind at exit</th></tr></thead><tbody>"
    );
    let mut stacks = Vec::with_capacity(shown.len());
    for (i, r) in shown.iter().enumerate() {
        let label = site_label(r.stack);
        let verdict = r.verdict.map_or("", |v| v.as_str());
        let _ = write!(
            out,
            "<tr data-i=\"{i}\" tabindex=\"0\"><td data-v=\"{}\">{}</td><td data-v=\"{verdict}\" class=\"{}\">{verdict}</td>\
             <td data-v=\"{}\">{}</td><td data-v=\"{:.0}\">{}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td></tr>",
            esc(&label),
            esc(&label),
            r.verdict.map_or("other", verdict_class),
            r.growth,
            if r.verdict.is_some() {
                format!("{:+}", r.growth)
            } else {
                String::new()
            },
            r.slope,
            if r.verdict.is_some() {
                format!("{}/s", human(r.slope))
            } else {
                String::new()
            },
            r.bytes,
            thousands(r.bytes),
            r.blocks,
            thousands(r.blocks),
            r.kinds.join(", "),
            r.kinds.join(", ")
        );
        stacks.push(json!({
            "callsite": r.callsite,
            "frames": r.stack.iter().map(frame_full).collect::<Vec<_>>(),
        }));
    }
    out.push_str("</tbody></table>");
    serde_json::Value::Array(stacks)
}

/// A flame graph (inferno's SVG) as a document of its own in the page.
fn flame(title: &str, svg: &[u8], out: &mut String) {
    let svg = String::from_utf8_lossy(svg);
    // Its own prologue and DOCTYPE are XML's; the element itself is what HTML embeds.
    let body = svg.find("<svg").map_or(&svg[..], |i| &svg[i..]);
    let height = body
        .split('>')
        .next()
        .and_then(|tag| tag.split(" height=\"").nth(1))
        .and_then(|h| h.split('"').next())
        .and_then(|h| h.parse::<u32>().ok())
        .unwrap_or(400);
    // inferno's script keeps the zoom in the address (history.replaceState), which a document
    // made from srcdoc may not change: there the zoom simply is not kept.
    let doc = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>html,body{{margin:0}}svg{{display:block;width:100%}}</style>\
         <script>(function(){{var r=history.replaceState;history.replaceState=function(){{try{{return r.apply(history,arguments)}}catch(e){{}}}}}})();</script>\
         </head><body>{body}</body></html>"
    );
    let _ = write!(
        out,
        "<figure class=\"flame\"><figcaption>{}</figcaption><iframe title=\"{}\" srcdoc=\"{}\" height=\"{}\" loading=\"eager\"></iframe></figure>",
        esc(title),
        esc(title),
        esc_doc(&doc),
        height + 4
    );
}

fn process(n: usize, p: &ProcReport, out: &mut String) {
    let _ = write!(
        out,
        "<section><h2>Process {} <code>{}</code></h2>",
        p.pid,
        esc(&crate::report::shell_words(&p.argv))
    );
    let mut data = serde_json::Map::new();
    if let Some(t) = &p.timeline {
        let flagged: Vec<&GrowthEntry> = p.growth.iter().filter(|e| e.verdict.flagged()).collect();
        // 1. Confirmation evidence.
        let _ = write!(
            out,
            "<h3>1. Confirmation: memory over time</h3><p>{} epochs over {:.1} s; warm-up until {:.1} s (shaded). \
             The live heap is <b class=\"{}\">{}</b> ({}/s); it went from {} to {}, the RSS from {} to {}. \
             Move the mouse over the chart for each area's bytes at an epoch.</p>",
            t.epochs,
            t.times_s.last().copied().unwrap_or(0.0),
            t.warmup_s,
            verdict_class(t.verdict),
            t.verdict.as_str(),
            human(t.evidence.slope_bytes_per_s),
            human(t.live_bytes.first().copied().unwrap_or(0) as f64),
            human(t.live_bytes.last().copied().unwrap_or(0) as f64),
            human(t.rss_bytes.first().copied().unwrap_or(0) as f64),
            human(t.rss_bytes.last().copied().unwrap_or(0) as f64),
        );
        // The first chart keeps the id it always had.
        let id = if n == 0 {
            "chart".to_string()
        } else {
            format!("chart-{n}")
        };
        let areas = areas(t, &p.growth);
        let (svg, chart_data) = chart(&id, t, &areas);
        let _ = write!(
            out,
            "<div class=\"chart-wrap\">{svg}<div class=\"tip\" id=\"{id}-tip\" hidden></div></div>"
        );
        let _ = write!(
            out,
            "<script type=\"application/json\" id=\"{id}-data\">{}</script>",
            script_json(&chart_data)
        );
        data.insert("chart".into(), chart_data);
        out.push_str("<ul class=\"legend\">");
        for a in areas.iter().rev() {
            let _ = write!(
                out,
                "<li><span style=\"background:{}\"></span>{} (peak {})</li>",
                a.color,
                esc(&a.name),
                human(a.v.iter().copied().max().unwrap_or(0) as f64)
            );
        }
        out.push_str("</ul>");
        // 2. The leaking callsites. 3. Root cause.
        out.push_str("<h3>2. What grew after warm-up</h3>");
        if flagged.is_empty() {
            out.push_str("<p>No callsite grows: no leak under this load.</p>");
        }
        for e in &flagged {
            let _ = write!(
                out,
                "<div class=\"site\"><p><b class=\"{}\">{}</b> {:+} bytes in {:+} blocks, {} born since warm-up and still live</p><pre>",
                verdict_class(e.verdict),
                e.verdict.as_str().to_uppercase(),
                e.delta_bytes,
                e.delta_blocks,
                thousands(e.born_after_warmup_live)
            );
            for l in stack_lines(&e.stack, 12) {
                let _ = writeln!(out, "{}", esc(&l));
            }
            out.push_str("</pre></div>");
        }
        out.push_str("<h3>3. Root cause</h3><ul>");
        for e in &flagged {
            let _ = write!(
                out,
                "<li><b>{}</b>: {}</li>",
                esc(&site_label(&e.stack)),
                esc(&crate::growth::guidance(e))
            );
        }
        out.push_str("</ul>");
        // 4. Verification.
        let growing = flagged.iter().filter(|e| e.verdict.grows()).count();
        let _ = write!(
            out,
            "<h3>4. Verify</h3><p>{}</p>",
            if growing == 0 {
                "Nothing grows under this load.".to_string()
            } else {
                format!(
                    "{growing} callsite{} still grow{}: after the fix, run the same load and \
                     <code>leakhunt verify BEFORE.trace AFTER.trace</code> (exit 0 once nothing grows).",
                    if growing == 1 { "" } else { "s" },
                    if growing == 1 { "s" } else { "" }
                )
            }
        );
    } else {
        out.push_str("<p>No epochs were recorded (the run was shorter than one epoch): only the exit report follows.</p>");
    }
    let table_id = format!("sites-{n}");
    let stacks = table(&table_id, p, out);
    let _ = write!(
        out,
        "<script type=\"application/json\" id=\"{table_id}-data\">{}</script>",
        script_json(&stacks)
    );
    let s = &p.summary;
    let _ = write!(
        out,
        "<h3>Unfreed at exit</h3><p>{} bytes in {} blocks; {} allocs, {} frees.</p>",
        thousands(s.in_use_at_exit_bytes),
        thousands(s.in_use_at_exit_blocks),
        thousands(s.allocs),
        thousands(s.frees)
    );
    for l in p.leaks.iter().take(20) {
        let _ = write!(
            out,
            "<details><summary>{} bytes in {} blocks ({})</summary><pre>",
            thousands(l.bytes),
            thousands(l.blocks),
            l.kind
        );
        for l in stack_lines(&l.stack, usize::MAX) {
            let _ = writeln!(out, "{}", esc(&l));
        }
        out.push_str("</pre></details>");
    }
    // Flame graphs, at the end: what was live then, and what grew after warm-up.
    if p.profile.is_some() || p.growth_profile.is_some() {
        out.push_str("<h3>Flame graphs</h3>");
    }
    for (prof, title) in [
        (&p.profile, "Live bytes at the end"),
        (&p.growth_profile, "Growth after warm-up"),
    ] {
        let Some(prof) = prof else { continue };
        match crate::flame::svg(prof, title) {
            Ok(svg) => flame(title, &svg, out),
            Err(e) => {
                let _ = write!(
                    out,
                    "<p>{}: no flame graph ({})</p>",
                    esc(title),
                    esc(&e.to_string())
                );
            }
        }
    }
    out.push_str("</section>");
}

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
code,pre{font-family:ui-monospace,monospace;font-size:12px}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.leak{color:#c00;font-weight:bold}.growing{color:#d60}.plateau{color:#070}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1em}
.legend span,.tip .sw{display:inline-block;width:1em;height:.7em;margin-right:.3em}
.chart-wrap{position:relative}
.tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #999;border-radius:4px;padding:4px 8px;font-size:12px;box-shadow:0 2px 6px rgba(0,0,0,.2);white-space:nowrap}
.tip table{margin:0}.tip td{border:0;padding:0 4px}.tip td.b{text-align:right;font-variant-numeric:tabular-nums}
table.sites th{cursor:pointer;user-select:none;background:#f3f3f3}
table.sites th[aria-sort=ascending]::after{content:" \25B2"}table.sites th[aria-sort=descending]::after{content:" \25BC"}
table.sites tbody tr{cursor:pointer}table.sites tbody tr:hover{background:#f6f9ff}
table.sites td[data-v]:nth-child(n+3):nth-child(-n+6){text-align:right;font-variant-numeric:tabular-nums}
table.sites tr.stack{cursor:auto;background:#fff}table.sites tr.stack pre{margin:0}
.hint{color:#666;font-size:90%}
figure.flame{margin:1em 0}figure.flame iframe{width:100%;border:1px solid #ddd}
"#;

/// The page's script: the chart's tooltip, the table's sorting and stacks. Plain DOM, no library.
const SCRIPT: &str = r#"
(function(){
function th(n){return String(n).replace(/\B(?=(\d{3})+(?!\d))/g,',');}
function hb(n){var a=Math.abs(n),u=[[1073741824,'GiB'],[1048576,'MiB'],[1024,'KiB']];
 for(var i=0;i<u.length;i++){if(a>=u[i][0])return (n/u[i][0]).toFixed(1)+' '+u[i][1];}return n+' B';}
function bytes(n){return th(n)+' B'+(Math.abs(n)>=1024?' ('+hb(n)+')':'');}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=text;return e;}
function chart(svg){
 var d=JSON.parse(document.getElementById(svg.getAttribute('data-data')).textContent);
 var tip=document.getElementById(svg.getAttribute('data-tip'));
 var cur=svg.querySelector('.cursor'),wrap=svg.parentNode;
 function near(x){var lo=0,hi=d.xs.length-1;while(lo<hi){var m=(lo+hi)>>1;if(d.xs[m]<x)lo=m+1;else hi=m;}
  if(lo>0&&x-d.xs[lo-1]<=d.xs[lo]-x)lo--;return lo;}
 function row(t,sw,name,v){var r=el('tr');var c=r.insertCell();if(sw){var s=el('span','sw');s.style.background=sw;c.appendChild(s);}
  r.appendChild(el('td','n',name));r.appendChild(el('td','b',bytes(v)));t.appendChild(r);}
 function show(i,cx,cy){
  cur.setAttribute('x1',d.xs[i]);cur.setAttribute('x2',d.xs[i]);cur.setAttribute('visibility','visible');
  tip.textContent='';tip.setAttribute('data-i',i);
  tip.appendChild(el('div','t',d.times[i].toFixed(2)+' s (epoch '+(i+1)+' of '+d.times.length+')'));
  var t=el('table');
  for(var k=d.areas.length-1;k>=0;k--){row(t,d.areas[k].color,d.areas[k].name,d.areas[k].v[i]);}
  row(t,null,'live heap',d.heap[i]);row(t,null,'RSS',d.rss[i]);
  tip.appendChild(t);tip.hidden=false;
  var w=wrap.getBoundingClientRect(),x=cx-w.left+14,y=cy-w.top+14;
  if(x+tip.offsetWidth>w.width)x=Math.max(0,cx-w.left-14-tip.offsetWidth);
  tip.style.left=x+'px';tip.style.top=y+'px';}
 svg.addEventListener('mousemove',function(e){var m=svg.getScreenCTM();if(!m||!d.xs.length)return;
  var p=svg.createSVGPoint();p.x=e.clientX;p.y=e.clientY;p=p.matrixTransform(m.inverse());show(near(p.x),e.clientX,e.clientY);});
 svg.addEventListener('mouseleave',function(){tip.hidden=true;cur.setAttribute('visibility','hidden');});
}
function table(t){
 var stacks=JSON.parse(document.getElementById(t.getAttribute('data-data')).textContent);
 var body=t.tBodies[0];
 [].forEach.call(body.rows,function(r,i){r.setAttribute('data-order',i);});
 function close(){[].slice.call(body.querySelectorAll('tr.stack')).forEach(function(s){s.parentNode.removeChild(s);});
  [].forEach.call(body.querySelectorAll('tr.open'),function(r){r.classList.remove('open');});}
 function sort(h){
  var col=h.cellIndex,num=h.getAttribute('data-type')==='num',was=h.getAttribute('aria-sort');
  var dir=was==='descending'?'ascending':was==='ascending'?'descending':num?'descending':'ascending';
  [].forEach.call(t.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
  h.setAttribute('aria-sort',dir);close();
  var rows=[].slice.call(body.rows);
  rows.sort(function(a,b){var x=a.cells[col].getAttribute('data-v'),y=b.cells[col].getAttribute('data-v');
   var c=num?Number(x)-Number(y):(x<y?-1:x>y?1:0);if(dir==='descending')c=-c;
   return c||Number(a.getAttribute('data-order'))-Number(b.getAttribute('data-order'));});
  rows.forEach(function(r){body.appendChild(r);});}
 t.tHead.addEventListener('click',function(e){var h=e.target.closest('th');if(h)sort(h);});
 t.tHead.addEventListener('keydown',function(e){var h=e.target.closest('th');if(h&&(e.key==='Enter'||e.key===' ')){e.preventDefault();sort(h);}});
 function toggle(r){var n=r.nextElementSibling;
  if(n&&n.classList.contains('stack')){n.parentNode.removeChild(n);r.classList.remove('open');return;}
  var s=stacks[Number(r.getAttribute('data-i'))],x=el('tr','stack'),c=x.insertCell();c.colSpan=r.cells.length;
  c.appendChild(el('div','hint','callsite '+s.callsite+' (leakhunt paths TRACE --callsite '+s.callsite+'): '+s.frames.length+' frames, innermost first'));
  c.appendChild(el('pre',null,s.frames.join('\n')));
  body.insertBefore(x,r.nextSibling);r.classList.add('open');}
 body.addEventListener('click',function(e){var r=e.target.closest('tr');if(r&&!r.classList.contains('stack'))toggle(r);});
 body.addEventListener('keydown',function(e){var r=e.target.closest('tr');if(r&&!r.classList.contains('stack')&&e.key==='Enter')toggle(r);});
}
[].forEach.call(document.querySelectorAll('svg.chart'),chart);
[].forEach.call(document.querySelectorAll('table.sites'),table);
})();
"#;

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>leakhunt report</title><style>{STYLE}</style></head><body><h1>leakhunt report</h1>\n"
    );
    // Errors first: the page's own script is then covered too. With the chart's laid-out size,
    // they let a headless browser check the page (body's data-chart and data-errors).
    out.push_str(
        "<script>window.addEventListener('error',function(e){document.body.dataset.errors=\
         (document.body.dataset.errors||'')+e.message+';'});window.addEventListener('load',\
         function(){var c=document.getElementById('chart');if(c){var r=c.getBoundingClientRect();\
         document.body.dataset.chart=Math.round(r.width)+'x'+Math.round(r.height);}});</script>",
    );
    for (n, p) in r.processes.iter().enumerate() {
        process(n, p, &mut out);
    }
    out.push_str("<script>");
    out.push_str(SCRIPT);
    out.push_str("</script></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ticks_are_round_in_binary_units_and_cover_the_maximum() {
        assert_eq!(byte_ticks(0), [0, 1]);
        assert_eq!(byte_ticks(900), [0, 200, 400, 600, 800, 1000]);
        // 177,254 bytes: steps of 50 KiB up to 200 KiB.
        assert_eq!(byte_ticks(177_254), [0, 51_200, 102_400, 153_600, 204_800]);
        assert_eq!(
            byte_ticks(3 << 20),
            [0, 1 << 20, 2 << 20, 3 << 20],
            "a MiB a tick"
        );
        assert_eq!(byte_ticks(5 << 30).last(), Some(&(5u64 << 30)));
        for max in [
            1u64,
            7,
            1023,
            1025,
            70_000,
            123_456_789,
            9 << 30,
            u64::MAX / 4,
        ] {
            let t = byte_ticks(max);
            assert!(t.len() >= 2 && t.len() <= 11, "{max}: {t:?}");
            assert!(*t.last().unwrap() >= max, "{max}: {t:?}");
            assert!(t[t.len() - 2] < max, "{max}: {t:?}");
        }
        let labels: Vec<String> = byte_ticks(177_254).into_iter().map(byte_label).collect();
        assert_eq!(labels, ["0", "50 KiB", "100 KiB", "150 KiB", "200 KiB"]);
        assert_eq!(byte_label(512), "512 B");
        assert_eq!(byte_label(3 << 19), "1.5 MiB");
        assert_eq!(byte_label(2 << 30), "2 GiB");
    }

    #[test]
    fn json_in_a_script_cannot_close_it_and_a_document_in_srcdoc_keeps_its_lines() {
        let v = json!({"name": "</script><b>"});
        let s = script_json(&v);
        assert!(!s.contains('<'), "{s}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&s).unwrap(),
            v,
            "still the same JSON"
        );
        assert_eq!(
            esc_doc("<a href=\"x\">'&'\n\x1b</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;\n\u{fffd}&lt;/a&gt;"
        );
    }
}
