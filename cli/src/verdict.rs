//! Leak or plateau? A verdict from a memory time series (live bytes at each epoch boundary after
//! warm-up), with the statistics behind it.
//!
//! - `leak`: grows steadily and never comes back: a strong monotonic trend (Mann-Kendall), the
//!   end at its peak, the last third of the window still growing at the pace of the first
//!   two thirds (not decelerating).
//! - `growing`: grows, but the evidence is weaker (a decelerating curve, such as a cache growing
//!   logarithmically, or a short or noisy series).
//! - `plateau`: grew, then flat over the last third: a cache or a pool that filled up, warm-up.
//! - `transient`: rose and came back to near where it started: a burst that drained.
//! - `stable`: no significant change.
//! - `insufficient`: too few epoch boundaries after warm-up to say anything (run longer, or with
//!   a shorter `--epoch`).

use serde::Serialize;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Leak,
    Growing,
    Plateau,
    Transient,
    Stable,
    /// Too little evidence: too few points after warm-up.
    Insufficient,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Leak => "leak",
            Verdict::Growing => "growing",
            Verdict::Plateau => "plateau",
            Verdict::Transient => "transient",
            Verdict::Stable => "stable",
            Verdict::Insufficient => "too little evidence",
        }
    }

    /// Worth showing as a finding: it grew (a leak, a grower, or a plateau to check the bound of).
    pub fn flagged(self) -> bool {
        matches!(self, Verdict::Leak | Verdict::Growing | Verdict::Plateau)
    }

    /// Still growing: what `verify` and `--fail-on-growth` care about.
    pub fn grows(self) -> bool {
        matches!(self, Verdict::Leak | Verdict::Growing)
    }
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Evidence {
    /// Least-squares slope over the window, bytes per second.
    pub slope_bytes_per_s: f64,
    /// Mann-Kendall trend statistic (normal approximation): above 3, a strong monotonic trend.
    pub trend_z: f64,
    /// Share of epoch-to-epoch steps that grew.
    pub grew_share: f64,
    /// Growth in the second half of the window relative to the first (1: steady, below 1:
    /// decelerating).
    pub pace_ratio: f64,
    /// Seconds from the start of the run where the series reached its final level, for a
    /// plateau.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plateau_from_s: Option<f64>,
    /// Points the verdict was drawn from.
    pub points: usize,
}

/// Fewest points after warm-up for any verdict but `stable`.
pub const MIN_POINTS: usize = 6;

/// The verdict on series `y` sampled at times `t` (seconds), both after warm-up.
pub fn classify(t: &[f64], y: &[f64]) -> (Verdict, Evidence) {
    let mut n = y.len().min(t.len());
    // Teardown: a program that frees what it holds right before it exits drops at its last
    // boundary or two. That says nothing about the run: leave those points out.
    if let Some(d) = (1..n).rev().find(|&i| y[i] < 0.5 * y[i - 1]) {
        if n - d <= (n / 20).max(2) && d >= MIN_POINTS {
            n = d;
        }
    }
    let (t, y) = (&t[..n], &y[..n]);
    let mut ev = Evidence {
        slope_bytes_per_s: slope(t, y),
        trend_z: mann_kendall(y),
        grew_share: if n > 1 {
            y.windows(2).filter(|w| w[1] > w[0]).count() as f64 / (n - 1) as f64
        } else {
            0.0
        },
        pace_ratio: 0.0,
        plateau_from_s: None,
        points: n,
    };
    if n < MIN_POINTS {
        return (Verdict::Insufficient, ev);
    }
    let (start, end) = (y[0], y[n - 1]);
    let peak = y.iter().copied().fold(f64::MIN, f64::max);
    let low = y.iter().copied().fold(f64::MAX, f64::min);
    if peak - low <= 0.0 {
        return (Verdict::Stable, ev);
    }
    let half = n / 2;
    let first = y[half] - y[0];
    let second = y[n - 1] - y[half];
    ev.pace_ratio = if first > 0.0 { second / first } else { 0.0 };
    let rise = peak - start;
    // Rose (well above the noise, for more than one boundary) and came back: a burst that
    // drained, a load that stopped. A short-lived block caught live at a single boundary is not
    // a burst.
    let high = y.iter().filter(|&&v| v >= start + 0.5 * rise).count();
    if rise >= 0.2 * peak && end - start <= 0.25 * rise && peak > end {
        return (
            if high >= 2 {
                Verdict::Transient
            } else {
                Verdict::Stable
            },
            ev,
        );
    }
    let growth = end - start;
    let third = 2 * n / 3;
    let last_gain = y[n - 1] - y[third];
    // A step up that stayed (a cache filled within a boundary or two, then churned at its
    // size): too few rising steps for a trend, but a plateau all the same.
    let stepped = growth >= 0.2 * peak && end >= 0.9 * peak && last_gain.abs() <= 0.1 * growth;
    if growth <= 0.0 || (ev.trend_z < 2.0 && !stepped) {
        return (Verdict::Stable, ev);
    }
    if last_gain <= 0.1 * growth {
        let level = 0.95 * end;
        ev.plateau_from_s = y.iter().position(|&v| v >= level).map(|i| t[i]);
        return (Verdict::Plateau, ev);
    }
    let steady = ev.pace_ratio >= 0.75 && last_gain >= 0.2 * growth;
    // A leak is many small gains; one step that makes most of the growth (a large buffer made
    // late in a compiler's run) is growth to watch, not a trend.
    let largest_step = y.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    if ev.trend_z >= 3.0 && end >= 0.9 * peak && steady && largest_step <= 0.5 * growth {
        return (Verdict::Leak, ev);
    }
    (Verdict::Growing, ev)
}

/// Least-squares slope of `y` over `t`.
fn slope(t: &[f64], y: &[f64]) -> f64 {
    let n = y.len() as f64;
    if y.len() < 2 {
        return 0.0;
    }
    let mt = t.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in t.iter().zip(y) {
        num += (a - mt) * (b - my);
        den += (a - mt) * (a - mt);
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Mann-Kendall's S normalised (with the continuity correction): the strength of a monotonic
/// trend, robust to the shape of the growth and to outliers. Long series are thinned to 400
/// points (S counts pairs: the test was quadratic, and its verdicts are those of 400 points).
fn mann_kendall(y: &[f64]) -> f64 {
    let step = y.len().div_ceil(400).max(1);
    let v: Vec<f64> = y.iter().step_by(step).copied().collect();
    let n = v.len();
    if n < 3 {
        return 0.0;
    }
    let s = kendall_s(&v);
    let nf = n as f64;
    let var = nf * (nf - 1.0) * (2.0 * nf + 5.0) / 18.0;
    match s.signum() {
        1 => (s - 1) as f64 / var.sqrt(),
        -1 => (s + 1) as f64 / var.sqrt(),
        _ => 0.0,
    }
}

/// Mann-Kendall's S: over all pairs i < j, +1 where `v[j] > v[i]`, -1 where `v[j] < v[i]`.
/// Counted in O(n log n): S = pairs - tied pairs - 2 × inversions, the inversions counted by a
/// merge sort (an element taken from the right half is below every one left in the left half).
fn kendall_s(v: &[f64]) -> i64 {
    let n = v.len() as i64;
    let mut a = v.to_vec();
    let mut buf = vec![0.0; a.len()];
    let inversions = merge_count(&mut a, &mut buf);
    // `a` is sorted now: runs of equal values are the ties.
    let mut tied = 0i64;
    let mut run = 1i64;
    for i in 1..=a.len() {
        if i < a.len() && a[i] == a[i - 1] {
            run += 1;
        } else {
            tied += run * (run - 1) / 2;
            run = 1;
        }
    }
    n * (n - 1) / 2 - tied - 2 * inversions
}

/// Sorts `a` (stable merge sort, `buf` as scratch of the same length) and returns the number of
/// pairs i < j with `a[i] > a[j]`.
fn merge_count(a: &mut [f64], buf: &mut [f64]) -> i64 {
    let n = a.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut count = {
        let (l, r) = a.split_at_mut(mid);
        let (bl, br) = buf.split_at_mut(mid);
        merge_count(l, bl) + merge_count(r, br)
    };
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if a[i] <= a[j] {
            buf[k] = a[i];
            i += 1;
        } else {
            buf[k] = a[j];
            j += 1;
            count += (mid - i) as i64;
        }
        k += 1;
    }
    buf[k..k + mid - i].copy_from_slice(&a[i..mid]);
    k += mid - i;
    buf[k..k + n - j].copy_from_slice(&a[j..n]);
    a.copy_from_slice(&buf[..n]);
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 points, one per 100 ms.
    fn times() -> Vec<f64> {
        (0..40).map(|i| i as f64 * 0.1).collect()
    }

    fn verdict(f: impl Fn(f64) -> f64) -> Verdict {
        let t = times();
        let y: Vec<f64> = t.iter().map(|&x| f(x).floor()).collect();
        classify(&t, &y).0
    }

    /// Deterministic noise in [-1, 1).
    fn noise(x: f64) -> f64 {
        let mut h = (x * 1000.0) as u64 ^ 0x9E37_79B9_7F4A_7C15;
        h ^= h >> 29;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 32;
        (h % 2000) as f64 / 1000.0 - 1.0
    }

    #[test]
    fn a_steady_leak_is_a_leak_even_with_noise() {
        assert_eq!(verdict(|x| 1000.0 + 480.0 * x), Verdict::Leak);
        assert_eq!(
            verdict(|x| 1000.0 + 480.0 * x + 150.0 * noise(x)),
            Verdict::Leak
        );
        // In whole blocks: 48 bytes, a few per epoch.
        assert_eq!(verdict(|x| 48.0 * (x * 37.0).floor()), Verdict::Leak);
    }

    #[test]
    fn one_late_step_is_growth_not_a_leak() {
        // A few small gains, then one large block made near the end (most of the growth): the
        // trend test alone would call it a leak.
        let t = times();
        let n = t.len();
        let y: Vec<f64> = (0..n)
            .map(|i| {
                let small = 64.0 * (i * 6 / n) as f64;
                small + if i >= n - 2 { 163_840.0 } else { 0.0 }
            })
            .collect();
        assert_eq!(classify(&t, &y).0, Verdict::Growing);
    }

    #[test]
    fn caches_pools_bursts_and_stopped_loads_are_never_a_leak() {
        // A cache growing logarithmically.
        let log = verdict(|x| 10_000.0 * (1.0 + 5.0 * x).ln());
        assert_ne!(log, Verdict::Leak, "log growth: {log:?}");
        // A cache that fills, then stays.
        assert_eq!(verdict(|x| 50_000.0 * (x / 1.5).min(1.0)), Verdict::Plateau);
        // A pool that grows in steps and stops.
        assert_eq!(
            verdict(|x| 4096.0 * ((x / 0.5).floor().min(4.0) + 1.0)),
            Verdict::Plateau
        );
        // A burst that drains.
        assert_eq!(
            verdict(|x| if (1.0..2.0).contains(&x) {
                90_000.0
            } else {
                1_000.0
            }),
            Verdict::Transient
        );
        // A load that stops halfway: memory returns.
        assert_eq!(
            verdict(|x| if x < 2.0 { 1000.0 + 500.0 * x } else { 1000.0 }),
            Verdict::Transient
        );
        // Flat, and flat with noise.
        assert_eq!(verdict(|_| 5000.0), Verdict::Stable);
        assert_eq!(verdict(|x| 5000.0 + 100.0 * noise(x)), Verdict::Stable);
    }

    #[test]
    fn a_teardown_at_the_last_boundary_does_not_change_the_verdict() {
        let t = times();
        let with_teardown = |f: &dyn Fn(f64) -> f64| -> Verdict {
            let mut y: Vec<f64> = t.iter().map(|&x| f(x)).collect();
            *y.last_mut().unwrap() = 0.0;
            classify(&t, &y).0
        };
        assert_eq!(with_teardown(&|x| 1000.0 + 480.0 * x), Verdict::Leak);
        assert_eq!(
            with_teardown(&|x| 50_000.0 * (x / 1.5).min(1.0)),
            Verdict::Plateau
        );
        // A drop halfway is no teardown: memory came back under load.
        assert_eq!(
            verdict(|x| if x < 2.0 { 1000.0 + 500.0 * x } else { 0.0 }),
            Verdict::Transient
        );
    }

    #[test]
    fn a_block_caught_live_at_one_boundary_is_not_a_burst() {
        assert_eq!(
            verdict(|x| if (1.0..1.1).contains(&x) { 256.0 } else { 0.0 }),
            Verdict::Stable
        );
    }

    #[test]
    fn kendall_s_counted_by_merge_sort_is_the_pairwise_count() {
        let pairwise = |v: &[f64]| -> i64 {
            let mut s = 0;
            for i in 0..v.len() {
                for j in i + 1..v.len() {
                    s += (v[j] > v[i]) as i64 - (v[j] < v[i]) as i64;
                }
            }
            s
        };
        let mut series: Vec<Vec<f64>> = vec![
            vec![],
            vec![1.0],
            vec![3.0, 3.0, 3.0],
            (0..400).map(f64::from).collect(),
            (0..400).rev().map(f64::from).collect(),
        ];
        // Noisy, with many ties (values in a few levels) and without.
        for levels in [3.0, 50.0, 1e9] {
            for len in [2, 7, 40, 399] {
                series.push(
                    (0..len)
                        .map(|i| ((noise(i as f64) + 1.0) * levels).floor() + i as f64 % 5.0)
                        .collect(),
                );
            }
        }
        for v in &series {
            assert_eq!(kendall_s(v), pairwise(v), "{v:?}");
        }
    }

    #[test]
    fn too_few_points_say_nothing() {
        let (v, e) = classify(&[0.0, 1.0, 2.0], &[1.0, 2.0, 3.0]);
        assert_eq!((v, e.points), (Verdict::Insufficient, 3));
    }

    #[test]
    fn a_cache_filled_in_one_step_then_churning_is_a_plateau() {
        // 625 KiB, filled to 1.8 MiB within two boundaries, then level with churn's noise.
        let t = times();
        let y: Vec<f64> = t
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let base = if i < 2 {
                    640_000.0 + 600_000.0 * i as f64
                } else {
                    1_880_000.0
                };
                base + 4_000.0 * noise(x)
            })
            .collect();
        assert_eq!(classify(&t, &y).0, Verdict::Plateau);
        // Level from the start: still stable.
        let flat: Vec<f64> = t
            .iter()
            .map(|&x| 1_880_000.0 + 4_000.0 * noise(x))
            .collect();
        assert_eq!(classify(&t, &flat).0, Verdict::Stable);
    }

    #[test]
    fn evidence_figures() {
        let t = times();
        let y: Vec<f64> = t.iter().map(|&x| 100.0 * x).collect();
        let (_, e) = classify(&t, &y);
        assert!((e.slope_bytes_per_s - 100.0).abs() < 1e-6);
        assert_eq!(e.grew_share, 1.0);
        assert!(e.trend_z > 8.0, "{}", e.trend_z);
        assert!((e.pace_ratio - 1.0).abs() < 0.1, "{}", e.pace_ratio);
        let y: Vec<f64> = t.iter().map(|&x| 100.0 * x.min(1.0)).collect();
        let (v, e) = classify(&t, &y);
        assert_eq!(v, Verdict::Plateau);
        assert_eq!(e.plateau_from_s, Some(1.0));
    }
}
