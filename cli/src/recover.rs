//! After a traced process died without saying how (SIGKILL, a crash its handlers could not
//! report), the events that reached its per-thread rings but not the socket are still in the
//! ring files `leakhunt run` had it map (`LEAKHUNT_RING_DIR`): read them back.

use std::path::Path;

use leakhunt_format::ringfile;
use leakhunt_format::slot::SLOT_LEN;

use crate::process::Process;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The undelivered slots of one ring file, as (thread id, slots) — `Err` when the file does not
/// hold a whole, consistent ring, or when the ring wrapped past what the CLI received (then a
/// record may start before the oldest slot left, and nothing there can be trusted).
pub fn undelivered(data: &[u8]) -> Result<(u32, Vec<u8>), String> {
    if data.len() < ringfile::HEADER_LEN || data[..8] != ringfile::MAGIC {
        return Err("not a ring file".into());
    }
    let slots = u64_at(data, ringfile::SLOTS);
    let (head, tail) = (u64_at(data, ringfile::HEAD), u64_at(data, ringfile::TAIL));
    if slots == 0
        || !slots.is_power_of_two()
        || data.len() as u64 != ringfile::HEADER_LEN as u64 + slots * SLOT_LEN as u64
    {
        return Err(format!(
            "ring of {slots} slots in a file of {} bytes",
            data.len()
        ));
    }
    if tail > head || head - tail > slots {
        return Err(format!(
            "ring indices {tail}..{head} exceed its {slots} slots"
        ));
    }
    let body = &data[ringfile::HEADER_LEN..];
    let mut out = Vec::with_capacity(((head - tail) as usize) * SLOT_LEN);
    for i in tail..head {
        let at = (i % slots) as usize * SLOT_LEN;
        out.extend_from_slice(&body[at..at + SLOT_LEN]);
    }
    Ok((u32_at(data, ringfile::TID), out))
}

/// What the ring files of a dead process gave back.
#[derive(Default)]
pub struct Recovered {
    /// Events the stream had not delivered.
    pub events: u64,
    /// Their batches, to append to a kept trace.
    pub batches: Vec<(u32, Vec<u8>)>,
    /// Ring files that could not be read back (each also a warning on the process).
    pub failed: usize,
}

/// Feeds `p` what its ring files in `dir` hold beyond what its stream delivered. Problems
/// become warnings on `p`.
pub fn from_ring_files(p: &mut Process, dir: &Path) -> Recovered {
    let mut got = Recovered::default();
    let Some(h) = &p.header else {
        got.failed = 1;
        return got;
    };
    let prefix = format!("{}-{}-", h.pid, h.start_monotonic_ns);
    let Ok(entries) = std::fs::read_dir(dir) else {
        got.failed = 1;
        return got;
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".ring"))
        })
        .collect();
    files.sort();
    for f in files {
        let one = std::fs::read(&f)
            .map_err(|e| e.to_string())
            .and_then(|d| undelivered(&d))
            .and_then(|(tid, slots)| Ok((tid, p.recover(tid, &slots)?, slots)));
        match one {
            Ok((tid, n, slots)) => {
                got.events += n;
                if n > 0 {
                    got.batches.push((tid, slots));
                }
            }
            Err(e) => {
                got.failed += 1;
                p.warnings.push(format!(
                    "ring file {} could not be recovered: {e}",
                    f.display()
                ))
            }
        }
    }
    got
}

/// Whether the process `pid` is gone (or a zombie): its ring files no longer change.
pub fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name, which may itself hold ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(slots: u64, tail: u64, head: u64) -> Vec<u8> {
        let mut d = vec![0u8; ringfile::HEADER_LEN + slots as usize * SLOT_LEN];
        d[..8].copy_from_slice(&ringfile::MAGIC);
        d[ringfile::TID..ringfile::TID + 4].copy_from_slice(&77u32.to_le_bytes());
        d[ringfile::SLOTS..ringfile::SLOTS + 8].copy_from_slice(&slots.to_le_bytes());
        d[ringfile::HEAD..ringfile::HEAD + 8].copy_from_slice(&head.to_le_bytes());
        d[ringfile::TAIL..ringfile::TAIL + 8].copy_from_slice(&tail.to_le_bytes());
        for i in 0..slots as usize {
            d[ringfile::HEADER_LEN + i * SLOT_LEN] = i as u8;
        }
        d
    }

    #[test]
    fn undelivered_slots_wrap_around_in_order() {
        let (tid, s) = undelivered(&ring(4, 6, 9)).unwrap();
        assert_eq!(tid, 77);
        let firsts: Vec<u8> = s.chunks(SLOT_LEN).map(|c| c[0]).collect();
        assert_eq!(firsts, [2, 3, 0]);
        assert!(
            undelivered(&ring(4, 1, 6)).is_err(),
            "wrapped past the tail"
        );
        assert!(undelivered(&ring(4, 5, 3)).is_err());
        assert!(undelivered(b"short").is_err());
        assert_eq!(undelivered(&ring(4, 3, 3)).unwrap().1.len(), 0);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(!is_dead(std::process::id()));
    }
}
