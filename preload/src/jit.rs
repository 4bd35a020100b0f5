//! Executable memory that no loaded module covers: the code a JIT made (V8's code space,
//! HotSpot's code cache, CPython 3.12's perf trampolines), from `/proc/self/maps`.
//!
//! The unwinder walks such frames by frame pointer (JITs keep rbp as one in the code they make),
//! and only ever trusts a return address it finds that way when it lies in executable memory:
//! a module's text or a range of this table. The table is re-read when an unwind meets an
//! address outside both, at most once per [`MIN_INTERVAL_NS`], by the side thread where it runs
//! (its descriptor table is its own), else by the unwinding thread with raw system calls.
//!
//! Readers never wait: the ranges are atomics under a sequence counter, and a reader that sees
//! a write in progress answers "not in the table" (the frame ends the walk, as it did before).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::sys;

/// Ranges kept; a process with more executable mappings keeps the first (lowest) ones.
const CAP: usize = 1024;
/// Re-reads at most this often: a walk that meets garbage does not read the maps every time.
const MIN_INTERVAL_NS: u64 = 20_000_000;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
/// `[start, end)` pairs, sorted by start.
static RANGES: [AtomicU64; 2 * CAP] = [ZERO; 2 * CAP];
static LEN: AtomicUsize = AtomicUsize::new(0);
/// Odd while a writer changes the ranges.
static SEQ: AtomicU32 = AtomicU32::new(0);
/// Bumped whenever a re-read changed the ranges: unwind rules cached before are stale.
pub static GEN: AtomicU32 = AtomicU32::new(0);
/// When the ranges were last read (monotonic ns; 0: never).
static LAST_NS: AtomicU64 = AtomicU64::new(0);
static LOCK: sys::SpinLock = sys::SpinLock::new();
/// A hash of the ranges last published.
static HASH: AtomicU64 = AtomicU64::new(0);

/// `addr` lies in an executable mapping of the table.
pub fn contains(addr: u64) -> bool {
    let s0 = SEQ.load(Ordering::Acquire);
    if s0 & 1 == 1 {
        return false;
    }
    let n = LEN.load(Ordering::Relaxed).min(CAP);
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if RANGES[2 * mid].load(Ordering::Relaxed) <= addr {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let hit = lo > 0 && addr < RANGES[2 * (lo - 1) + 1].load(Ordering::Relaxed);
    core::sync::atomic::fence(Ordering::Acquire);
    hit && SEQ.load(Ordering::Relaxed) == s0
}

/// In a fork child: a re-read another thread of the parent was making is gone with it.
pub fn after_fork_child() {
    LOCK.reset();
    if SEQ.load(Ordering::Relaxed) & 1 == 1 {
        LEN.store(0, Ordering::Relaxed);
        SEQ.fetch_add(1, Ordering::Release);
    }
}

/// Claims the next re-read of the executable mappings: false when one ran less than
/// [`MIN_INTERVAL_NS`] ago or another thread just claimed it.
pub fn claim_refresh() -> bool {
    let now = sys::monotonic_ns().max(1);
    let last = LAST_NS.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < MIN_INTERVAL_NS {
        return false;
    }
    LAST_NS
        .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Re-reads the executable mappings (through the side thread where it runs); returns whether
/// they changed.
pub fn refresh_now() -> bool {
    let gen = GEN.load(Ordering::Acquire);
    if !crate::side::refresh_exec_maps() {
        refresh();
    }
    GEN.load(Ordering::Acquire) != gen
}

/// Reads `/proc/self/maps` and publishes its executable ranges (bumping [`GEN`] if they
/// changed). Raw system calls and a stack buffer: no allocation.
pub fn refresh() {
    let Some(_l) = LOCK.try_lock_for(1000) else {
        return;
    };
    let fd = sys::open_raw(c"/proc/self/maps");
    if fd < 0 {
        return;
    }
    SEQ.fetch_add(1, Ordering::AcqRel);
    let mut line = LineParser::default();
    let mut n = 0usize;
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let r = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
        if r <= 0 {
            break;
        }
        for &c in &buf[..r as usize] {
            let Some((s, e)) = line.feed(c) else {
                continue;
            };
            // /proc/self/maps is sorted by address; touching ranges merge.
            if n > 0 && RANGES[2 * n - 1].load(Ordering::Relaxed) == s {
                RANGES[2 * n - 1].store(e, Ordering::Relaxed);
            } else if n < CAP {
                RANGES[2 * n].store(s, Ordering::Relaxed);
                RANGES[2 * n + 1].store(e, Ordering::Relaxed);
                n += 1;
            }
        }
    }
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    LEN.store(n, Ordering::Relaxed);
    SEQ.fetch_add(1, Ordering::AcqRel);
    // FNV-1a over the ranges: a changed table voids the rules cached from the old one.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ n as u64;
    for r in RANGES.iter().take(2 * n) {
        h = (h ^ r.load(Ordering::Relaxed)).wrapping_mul(0x100_0000_01b3);
    }
    let changed = HASH.swap(h, Ordering::AcqRel) != h;
    if changed {
        GEN.fetch_add(1, Ordering::AcqRel);
    }
}

/// One `/proc/self/maps` line at a time: `start-end perms ...`; yields the range of a readable
/// and executable one at its newline (the unwinder may read the code at a return address: an
/// execute-only mapping is left out).
#[derive(Default)]
struct LineParser {
    field: u8,
    start: u64,
    end: u64,
    /// Position in the permissions field.
    perm: u8,
    read: bool,
    exec: bool,
}

impl LineParser {
    fn feed(&mut self, c: u8) -> Option<(u64, u64)> {
        if c == b'\n' {
            let out =
                (self.read && self.exec && self.start < self.end).then_some((self.start, self.end));
            *self = LineParser::default();
            return out;
        }
        match self.field {
            0 | 1 => {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    b'-' if self.field == 0 => {
                        self.field = 1;
                        return None;
                    }
                    b' ' if self.field == 1 => {
                        self.field = 2;
                        return None;
                    }
                    _ => {
                        self.field = 3;
                        return None;
                    }
                } as u64;
                let v = if self.field == 0 {
                    &mut self.start
                } else {
                    &mut self.end
                };
                *v = v.wrapping_shl(4) | d;
            }
            2 => {
                match (self.perm, c) {
                    (0, b'r') => self.read = true,
                    (2, b'x') => self.exec = true,
                    _ => {}
                }
                self.perm += 1;
                if c == b' ' {
                    self.field = 3;
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<(u64, u64)> {
        let mut p = LineParser::default();
        text.bytes().filter_map(|c| p.feed(c)).collect()
    }

    #[test]
    fn executable_lines_only() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234 /usr/bin/node\n\
55d0c0001000-55d0c0100000 r-xp 00001000 08:01 1234 /usr/bin/node\n\
7f0000000000-7f0000040000 rwxp 00000000 00:00 0 \n\
7f0000040000-7f0000080000 ---p 00000000 00:00 0 \n\
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";
        assert_eq!(
            parse(maps),
            vec![
                (0x55d0c0001000, 0x55d0c0100000),
                (0x7f0000000000, 0x7f0000040000),
            ]
        );
    }

    #[test]
    fn the_table_holds_this_process_code() {
        refresh();
        let here = the_table_holds_this_process_code as fn() as usize as u64;
        assert!(contains(here));
        let stack = &here as *const u64 as u64;
        assert!(!contains(stack));
    }
}
