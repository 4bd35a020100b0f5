//! The HTML report (`--html FILE`) in headless Chromium, offline: the chart's bytes axis, its
//! stacked areas and the tooltip's exact bytes at an epoch, the callsite table sorted by clicks
//! on its headers, a callsite's whole stack on a click on its row, and the two flame graphs.
//! Events are injected by a script appended to a copy of the page: it dispatches them once the
//! page has loaded and writes what it saw into the DOM, which Chromium dumps.
//!
//! Known figures from `tests/fixtures/html_report.c`: leak_big leaks 300 blocks of 64 bytes
//! (19,200 bytes), leak_many 600 of 16 (9,600 bytes), both called from one_round, inlined into
//! main.

use leakhunt_tests::*;

const SRC: &str = "html_report.c";

/// Runs after the page's own `load` handlers: hovers the chart at two epochs, sorts the table by
/// three columns, opens a stack, looks into the flame graphs, and leaves all it saw as JSON in
/// the body's `data-probe`. `MID` is the epoch to hover first.
const PROBE: &str = r#"<script>
window.addEventListener('load', function () {
  var out = {};
  function cells(r) { return [].map.call(r.cells, function (c) { return c.textContent; }); }
  try {
    var svg = document.getElementById('chart');
    var d = JSON.parse(document.getElementById('chart-data').textContent);
    var tip = document.getElementById('chart-tip');
    out.ticks = [].map.call(svg.querySelectorAll('text.ytick'), function (t) { return t.textContent; });
    out.areas = svg.querySelectorAll('polygon.area').length;
    function hover(i) {
      var p = svg.createSVGPoint();
      p.x = d.xs[i]; p.y = 150;
      p = p.matrixTransform(svg.getScreenCTM());
      var target = document.elementFromPoint(p.x, p.y);
      target.dispatchEvent(new MouseEvent('mousemove', { bubbles: true, clientX: p.x, clientY: p.y }));
      return {
        target: target.getAttribute('class'),
        hidden: tip.hidden,
        index: tip.getAttribute('data-i'),
        time: tip.querySelector('div.t').textContent,
        rows: [].map.call(tip.querySelectorAll('tr'), function (r) { return [r.cells[1].textContent, r.cells[2].textContent]; }),
        cursor: svg.querySelector('.cursor').getAttribute('x1')
      };
    }
    out.mid = hover(MID);
    out.last = hover(d.xs.length - 1);
    svg.dispatchEvent(new MouseEvent('mouseleave'));
    out.hidden_after_leave = tip.hidden;
    var t = document.querySelector('table.sites');
    var heads = t.tHead.rows[0].cells;
    function click(e) { e.dispatchEvent(new MouseEvent('click', { bubbles: true })); }
    function col(i) { return [].map.call(t.tBodies[0].rows, function (r) { return Number(r.cells[i].getAttribute('data-v')); }); }
    out.initial = cells(t.tBodies[0].rows[0]);
    click(heads[4]);
    out.by_bytes = { first: cells(t.tBodies[0].rows[0]), values: col(4), sort: heads[4].getAttribute('aria-sort') };
    click(heads[4]);
    out.by_bytes_up = { first: cells(t.tBodies[0].rows[0]), values: col(4), sort: heads[4].getAttribute('aria-sort') };
    click(heads[5]);
    out.by_blocks = { first: cells(t.tBodies[0].rows[0]), values: col(5), sort: heads[5].getAttribute('aria-sort'), bytes_sort: heads[4].getAttribute('aria-sort') };
    click(t.tBodies[0].rows[0].cells[0]);
    var next = t.tBodies[0].rows[1];
    out.stack = next.classList.contains('stack') ? next.textContent : null;
    out.rows_with_stack = t.tBodies[0].rows.length;
    click(t.tBodies[0].rows[0]);
    out.rows_closed = t.tBodies[0].rows.length;
    out.flames = [].map.call(document.querySelectorAll('figure.flame'), function (f) {
      var doc = f.querySelector('iframe').contentDocument;
      var frames = doc && doc.getElementById('frames');
      return {
        caption: f.querySelector('figcaption').textContent,
        total: frames ? frames.getAttribute('total_samples') : null,
        width: frames ? Math.round(frames.getBoundingClientRect().width) : 0,
        titles: doc ? [].map.call(doc.querySelectorAll('#frames title'), function (x) { return x.textContent; }) : []
      };
    });
    // Shown again for the screenshot.
    hover(MID);
  } catch (e) {
    out.error = String(e) + ' ' + (e.stack || '');
  }
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script></body>"#;

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The growth entry whose first frame with a source line is `function`.
fn growth_of<'a>(p: &'a Value, function: &str) -> &'a Value {
    p["growth"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| {
            g["stack"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["file"].is_string())
                .is_some_and(|f| f["function"] == function)
        })
        .unwrap_or_else(|| panic!("no growth entry for {function}: {}", p["growth"]))
}

fn series(g: &Value) -> Vec<u64> {
    g["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn no_fetch(html: &str) {
    for pat in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "url(http",
        "url(//",
        "url('",
        "url(\"",
        "@import",
        "<link",
    ] {
        assert!(!html.contains(pat), "the page must fetch nothing: {pat}");
    }
}

#[test]
fn the_html_report_charts_sorts_shows_stacks_and_flame_graphs_offline() {
    let exe = fixture(SRC);
    let page = scratch("report").with_extension("html");
    let run = run(
        &exe,
        &[],
        &[
            "--epoch",
            "100ms",
            "--warmup",
            "100ms",
            "--html",
            page.to_str().unwrap(),
        ],
    );
    assert_eq!(run.out.status.code(), Some(0), "{}", run.stderr());
    let p = run.main();
    let (big_line, many_line) = (line_of(SRC, "big"), line_of(SRC, "many"));
    let big_name = format!("leak_big ({SRC}:{big_line})");
    let many_name = format!("leak_many ({SRC}:{many_line})");
    // The figures the page must show, from the JSON report: the leaks' exact bytes at exit...
    let at = |line: u32| -> (u64, u64) {
        records(p)
            .iter()
            .filter(|l| l.frames.first().is_some_and(|f| f.1 == SRC && f.2 == line))
            .fold((0, 0), |a, l| (a.0 + l.bytes, a.1 + l.blocks))
    };
    assert_eq!(at(big_line), (19_200, 300));
    assert_eq!(at(many_line), (9_600, 600));
    // ...and their series over the epochs.
    let tl = &p["timeline"];
    let times: Vec<f64> = tl["times_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let heap: Vec<u64> = tl["live_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let (big, many) = (
        series(growth_of(p, "leak_big")),
        series(growth_of(p, "leak_many")),
    );
    let n = times.len();
    assert!(n >= 8, "{tl}");
    assert_eq!(
        (big[n - 1], many[n - 1]),
        (19_200, 9_600),
        "{big:?} {many:?}"
    );
    // The epoch to hover first: the one where leak_big had about half its blocks.
    let mid = (0..n).min_by_key(|&i| big[i].abs_diff(9_600)).unwrap();
    assert!(big[mid] > 0 && big[mid] < 19_200, "{big:?}");

    let html = std::fs::read_to_string(&page).unwrap();
    no_fetch(&html);
    assert_eq!(html.matches("<iframe ").count(), 2, "two flame graphs");
    // The flame graph of the end: leak_big's unfreed bytes, in the document its iframe holds.
    assert!(
        html.contains("&lt;title&gt;leak_big (19,200 bytes"),
        "the flame graph at the end"
    );

    // The page as it is: laid out, no errors; then a copy with the probe.
    let (dom, console) = chromium_dom(&page);
    let chart = dom_attr(&dom, "data-chart").unwrap_or_default();
    let (w, h) = chart.split_once('x').unwrap_or(("0", "0"));
    assert!(
        w.parse::<u32>().unwrap_or(0) > 500 && h.parse::<u32>().unwrap_or(0) > 150,
        "chart laid out: {chart}"
    );
    assert_eq!(dom_attr(&dom, "data-errors"), None, "{dom}");
    assert!(console.is_empty(), "console: {console}");

    let probe_page = page.with_file_name(format!(
        "{}-probe.html",
        page.file_stem().unwrap().to_str().unwrap()
    ));
    std::fs::write(
        &probe_page,
        html.replace("</body>", &PROBE.replace("MID", &mid.to_string())),
    )
    .unwrap();
    let (dom, console) = chromium_dom(&probe_page);
    assert!(console.is_empty(), "console: {console}");
    assert_eq!(dom_attr(&dom, "data-errors"), None, "{dom}");
    let probe: Value = serde_json::from_str(
        &dom_attr(&dom, "data-probe").unwrap_or_else(|| panic!("the probe did not run: {dom}")),
    )
    .unwrap();
    assert!(probe["error"].is_null(), "{}", probe["error"]);

    // The bytes axis: round ticks in KiB from 0 past the top of the stack.
    let ticks = strs(&probe["ticks"]);
    assert_eq!(ticks[0], "0", "{ticks:?}");
    assert!(
        ticks.len() >= 3 && ticks[1..].iter().all(|t| t.ends_with(" KiB")),
        "{ticks:?}"
    );
    // Areas: leak_big, leak_many (the callsites that grew most), maybe the cache, and "other".
    assert!(probe["areas"].as_u64().unwrap() >= 3, "{probe}");

    // Hover: the tooltip shows that epoch's time and each area's exact bytes, the heap, the RSS.
    let rows = |h: &Value| -> Vec<(String, String)> {
        h["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
            .collect()
    };
    // As the page's `toFixed(1)`: an exact tie (15,616 B is 15.25 KiB) rounds up, where
    // Rust's `{:.1}` rounds it to even.
    let bytes_text = |v: u64| -> String {
        if v >= 1024 {
            let kib = (v as f64 / 1024.0 * 10.0).round() / 10.0;
            format!("{} B ({kib:.1} KiB)", commas(v))
        } else {
            format!("{v} B")
        }
    };
    for (h, i) in [(&probe["mid"], mid), (&probe["last"], n - 1)] {
        assert_eq!(h["target"], "hit", "the mouse is over the chart: {h}");
        assert_eq!(h["hidden"], false, "{h}");
        assert_eq!(h["index"], i.to_string(), "{h}");
        assert_eq!(
            h["time"],
            format!("{:.2} s (epoch {} of {n})", times[i], i + 1),
            "{h}"
        );
        let r = rows(h);
        assert!(r.contains(&(big_name.clone(), bytes_text(big[i]))), "{r:?}");
        assert!(
            r.contains(&(many_name.clone(), bytes_text(many[i]))),
            "{r:?}"
        );
        assert_eq!(r[r.len() - 2], ("live heap".into(), bytes_text(heap[i])));
        assert_eq!(r[r.len() - 1].0, "RSS");
        assert_eq!(r[0].0, "other", "the top area first: {r:?}");
    }
    assert!(rows(&probe["last"]).contains(&(big_name.clone(), "19,200 B (18.8 KiB)".into())));
    assert!(rows(&probe["last"]).contains(&(many_name.clone(), "9,600 B (9.4 KiB)".into())));
    assert_eq!(probe["hidden_after_leave"], true);

    // Sorting: by unfreed bytes (largest first, then the other way), then by blocks.
    let first = |k: &str| strs(&probe[k]["first"]);
    let values = |k: &str| -> Vec<u64> {
        probe[k]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    assert_eq!(probe["by_bytes"]["sort"], "descending");
    assert_eq!(first("by_bytes")[0], big_name);
    assert_eq!(first("by_bytes")[4..6], ["19,200", "300"]);
    let v = values("by_bytes");
    assert!(v.windows(2).all(|w| w[0] >= w[1]), "{v:?}");
    assert_eq!(probe["by_bytes_up"]["sort"], "ascending");
    let v = values("by_bytes_up");
    assert!(v.windows(2).all(|w| w[0] <= w[1]) && v.len() >= 3, "{v:?}");
    assert_ne!(first("by_bytes_up")[0], big_name);
    assert_eq!(probe["by_blocks"]["sort"], "descending");
    assert!(probe["by_blocks"]["bytes_sort"].is_null());
    assert_eq!(first("by_blocks")[0], many_name);
    assert_eq!(first("by_blocks")[4..6], ["9,600", "600"]);
    let v = values("by_blocks");
    assert!(v.windows(2).all(|w| w[0] >= w[1]), "{v:?}");

    // A click on leak_many's row: its whole stack, with full paths, lines and the inlined frame;
    // a second click closes it.
    let src = fixtures_src().join(SRC);
    let src = src.to_str().unwrap();
    let stack = probe["stack"].as_str().unwrap_or_else(|| panic!("{probe}"));
    for want in [
        format!("leak_many at {src}:{many_line}"),
        format!("one_round at {src}:{} [inlined]", line_of(SRC, "round") + 1),
        format!("main at {src}:{}", line_of(SRC, "main")),
    ] {
        assert!(stack.contains(&want), "{want} in:\n{stack}");
    }
    assert_eq!(
        probe["rows_with_stack"].as_u64().unwrap(),
        probe["rows_closed"].as_u64().unwrap() + 1
    );

    // The flame graphs: the bytes at the end (leak_big's 19,200 of them) and the growth after
    // warm-up (what leak_big gained from the end of warm-up to the last epoch judged), each laid
    // out in its own document.
    let flames = probe["flames"].as_array().unwrap();
    assert_eq!(flames.len(), 2, "{probe}");
    assert_eq!(flames[0]["caption"], "Live bytes at the end");
    assert_eq!(flames[1]["caption"], "Growth after warm-up");
    let w = times
        .iter()
        .position(|&t| t >= tl["warmup_s"].as_f64().unwrap())
        .unwrap();
    let end = (w + tl["evidence"]["points"].as_u64().unwrap() as usize - 1).min(n - 1);
    for (f, bytes) in [(&flames[0], 19_200), (&flames[1], big[end] - big[w])] {
        assert!(f["width"].as_u64().unwrap() > 500, "{f}");
        let titles = strs(&f["titles"]);
        let want = format!("leak_big ({} bytes", commas(bytes));
        assert!(
            titles.iter().any(|t| t.starts_with(&want)),
            "{want} in {titles:?}"
        );
    }
    assert_eq!(
        flames[0]["total"].as_str().unwrap(),
        p["summary"]["in_use_at_exit_bytes"].to_string()
    );

    // A screenshot of the page after the probe (tooltip shown, table sorted, a stack open).
    let shot = workspace().join("target/test-scratch/html-report.png");
    let _ = std::fs::remove_file(&shot);
    chromium_screenshot(&probe_page, &shot);
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a screenshot of the page"
    );
    for f in [&page, &probe_page] {
        let _ = std::fs::remove_file(f);
    }
}

/// A trace without epochs still gives a page: the table and the flame graph of the end, no
/// chart, no errors.
#[test]
fn a_run_shorter_than_an_epoch_gives_the_table_and_one_flame_graph() {
    let exe = fixture(SRC);
    let page = scratch("short").with_extension("html");
    let run = run(
        &exe,
        &[],
        &["--epoch", "1h", "--html", page.to_str().unwrap()],
    );
    assert_eq!(run.out.status.code(), Some(0), "{}", run.stderr());
    let html = std::fs::read_to_string(&page).unwrap();
    no_fetch(&html);
    assert!(!html.contains("<svg id=\"chart\""));
    assert!(html.contains("No epochs were recorded"));
    assert_eq!(html.matches("<iframe ").count(), 1);
    let (dom, console) = chromium_dom(&page);
    assert_eq!(dom_attr(&dom, "data-errors"), None, "{dom}");
    assert!(console.is_empty(), "console: {console}");
    assert!(dom.contains(&format!("leak_big ({SRC}:{})", line_of(SRC, "big"))));
    let _ = std::fs::remove_file(&page);
}
