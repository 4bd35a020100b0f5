//! The CLI's reading side as a library: the trace stream rebuilt into processes, the reports made
//! from them, and recovery from ring files. The `leakhunt` binary drives it; the benches measure
//! it.
#![forbid(unsafe_code)]

pub mod callsite;
pub mod compare;
pub mod exports;
pub mod flame;
pub mod fuzzing;
pub mod growth;
pub mod html;
pub mod input;
pub mod liveset;
pub mod orphans;
pub mod outfile;
pub mod pack;
pub mod paths;
mod pending;
pub mod pprof;
pub mod process;
pub mod profile;
pub mod program;
pub mod reach_helper;
pub mod recover;
pub mod report;
pub mod retain;
pub mod scan;
pub mod series;
pub mod supp;
pub mod verdict;
pub mod vgcompare;
pub mod xml;

/// A duration such as `250ms`, `1s`, `1.5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 100ms, 1s, 2m)"))?;
    let scale = match unit {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{s}' (use ms, s, m or h)"
            ))
        }
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}
