//! The report as one self-contained, offline HTML file (`--html FILE`): the four parts of the
//! growth report with a chart of the live heap, the RSS and the top callsites over time (inline
//! SVG, drawn here: the page needs no script and no network), then the blocks unfreed at exit.

use std::fmt::Write as _;

use crate::growth::{human, GrowthEntry, Timeline};
use crate::report::{stack_lines, thousands, ProcReport, Report};
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

const COLORS: [&str; 7] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
];

/// An SVG chart: one polyline per series over the timeline's times, each scaled to its own
/// maximum (a legend gives the real range), so small callsites stay visible beside the heap.
fn chart(t: &Timeline, series: &[(String, Vec<u64>)]) -> String {
    let (w, h, pad) = (900.0, 320.0, 40.0);
    let tmax = t.times_s.last().copied().unwrap_or(1.0).max(1e-9);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg id="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="memory over time">"##
    );
    let _ = write!(
        svg,
        r##"<rect x="{pad}" y="10" width="{}" height="{}" fill="#fafafa" stroke="#ccc"/>"##,
        w - 2.0 * pad,
        h - pad - 10.0
    );
    // Warm-up shaded.
    let wx = pad + (t.warmup_s / tmax) * (w - 2.0 * pad);
    let _ = write!(
        svg,
        r##"<rect x="{pad}" y="10" width="{:.1}" height="{}" fill="#eee"><title>warm-up</title></rect>"##,
        (wx - pad).max(0.0),
        h - pad - 10.0
    );
    for k in 0..=4 {
        let x = pad + k as f64 / 4.0 * (w - 2.0 * pad);
        let _ = write!(
            svg,
            r##"<text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{:.1} s</text>"##,
            h - pad + 15.0,
            tmax * k as f64 / 4.0
        );
    }
    for (i, (name, v)) in series.iter().enumerate() {
        let max = v.iter().copied().max().unwrap_or(0).max(1) as f64;
        let pts: Vec<String> = t
            .times_s
            .iter()
            .zip(v)
            .map(|(&x, &y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + x / tmax * (w - 2.0 * pad),
                    h - pad - y as f64 / max * (h - pad - 20.0)
                )
            })
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"##,
            COLORS[i % COLORS.len()],
            pts.join(" "),
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn callsite_name(e: &GrowthEntry) -> String {
    e.stack
        .iter()
        .find(|f| f.file.is_some())
        .or(e.stack.first())
        .and_then(|f| f.function.clone())
        .unwrap_or_else(|| "?".into())
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Leak => "leak",
        Verdict::Growing => "growing",
        Verdict::Plateau => "plateau",
        _ => "other",
    }
}

fn process(p: &ProcReport, out: &mut String) {
    let _ = write!(
        out,
        "<section><h2>Process {} <code>{}</code></h2>",
        p.pid,
        esc(&crate::report::shell_words(&p.argv))
    );
    if let Some(t) = &p.timeline {
        let flagged: Vec<&GrowthEntry> = p.growth.iter().filter(|e| e.verdict.flagged()).collect();
        // 1. Confirmation evidence.
        let _ = write!(
            out,
            "<h3>1. Confirmation: memory over time</h3><p>{} epochs over {:.1} s; warm-up until {:.1} s (shaded). \
             The live heap is <b class=\"{}\">{}</b> ({}/s).</p>",
            t.epochs,
            t.times_s.last().copied().unwrap_or(0.0),
            t.warmup_s,
            verdict_class(t.verdict),
            t.verdict.as_str(),
            human(t.evidence.slope_bytes_per_s)
        );
        let mut series = vec![
            ("live heap".to_string(), t.live_bytes.clone()),
            ("RSS".to_string(), t.rss_bytes.clone()),
        ];
        for e in flagged.iter().take(5) {
            series.push((
                format!("{} ({})", callsite_name(e), e.verdict.as_str()),
                e.series.clone(),
            ));
        }
        out.push_str(&chart(t, &series));
        out.push_str("<ul class=\"legend\">");
        for (i, (name, v)) in series.iter().enumerate() {
            let _ = write!(
                out,
                "<li><span style=\"background:{}\"></span>{} (peak {})</li>",
                COLORS[i % COLORS.len()],
                esc(name),
                human(v.iter().copied().max().unwrap_or(0) as f64)
            );
        }
        out.push_str("</ul><table><tr><th>callsite</th><th>verdict</th><th>slope</th><th>trend z</th><th>grew in</th><th>plateau from</th></tr>");
        for e in &p.growth {
            let ev = &e.evidence;
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}/s</td><td>{:.1}</td><td>{:.0}%</td><td>{}</td></tr>",
                esc(&callsite_name(e)),
                verdict_class(e.verdict),
                e.verdict.as_str(),
                human(e.slope_bytes_per_s),
                ev.trend_z,
                ev.grew_share * 100.0,
                ev.plateau_from_s
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_default()
            );
        }
        out.push_str("</table>");
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
                esc(&callsite_name(e)),
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
            "<details><summary>{} bytes in {} blocks</summary><pre>",
            thousands(l.bytes),
            thousands(l.blocks)
        );
        for l in stack_lines(&l.stack, usize::MAX) {
            let _ = writeln!(out, "{}", esc(&l));
        }
        out.push_str("</pre></details>");
    }
    out.push_str("</section>");
}

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut out = String::from(
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>leakhunt report</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}
code,pre{font-family:ui-monospace,monospace;font-size:12px}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.leak{color:#c00;font-weight:bold}.growing{color:#d60}.plateau{color:#070}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1em}
.legend span{display:inline-block;width:1em;height:.6em;margin-right:.3em}
</style></head><body><h1>leakhunt report</h1>
"##,
    );
    for p in &r.processes {
        process(p, &mut out);
    }
    // The page works without it; it lets a headless browser check that the chart laid out
    // (its size lands in the body's data-chart attribute) and that nothing failed.
    out.push_str(
        "<script>window.addEventListener('error',function(e){document.body.dataset.errors=\
         (document.body.dataset.errors||'')+e.message+';'});window.addEventListener('load',\
         function(){var c=document.getElementById('chart');if(c){var r=c.getBoundingClientRect();\
         document.body.dataset.chart=Math.round(r.width)+'x'+Math.round(r.height);}});</script>",
    );
    out.push_str("</body></html>\n");
    out
}
