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
    let mut aliases = [([0u8; PATH_CAP], 0usize, (0u64, 0u64, 0u64)); ALIASES];
    let mut naliases = 0usize;
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let r = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
        if r <= 0 {
            break;
        }
        for &c in &buf[..r as usize] {
            line.feed(c, &mut |m: Mapping| {
                let (s, e) = (m.start, m.end);
                // A file's code mapped where no module is (V8's builtins copied next to its
                // code): perhaps another mapping of a loaded module's file.
                if m.path.first() == Some(&b'/')
                    && m.path.len() <= PATH_CAP
                    && naliases < ALIASES
                    && crate::modules::current().is_some_and(|t| t.find(s).is_none())
                {
                    let a = &mut aliases[naliases];
                    a.0[..m.path.len()].copy_from_slice(m.path);
                    a.1 = m.path.len();
                    a.2 = (s, e, m.offset);
                    naliases += 1;
                }
                // /proc/self/maps is sorted by address; touching ranges merge.
                if n > 0 && RANGES[2 * n - 1].load(Ordering::Relaxed) == s {
                    RANGES[2 * n - 1].store(e, Ordering::Relaxed);
                } else if n < CAP {
                    RANGES[2 * n].store(s, Ordering::Relaxed);
                    RANGES[2 * n + 1].store(e, Ordering::Relaxed);
                    n += 1;
                }
            });
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
    for (path, len, (s, e, off)) in &aliases[..naliases] {
        crate::modules::add_alias(&path[..*len], *s, *e, *off);
    }
}

/// Longest path of an alias.
const PATH_CAP: usize = 128;

/// An executable mapping of `/proc/self/maps`: its range, file offset and path (empty when
/// anonymous).
struct Mapping<'a> {
    start: u64,
    end: u64,
    offset: u64,
    path: &'a [u8],
}

/// Longest line kept (a longer one's path is cut: such a mapping gets no alias).
const LINE_CAP: usize = 320;

/// One `/proc/self/maps` line at a time: `start-end perms offset dev inode path`; at its
/// newline, a readable and executable mapping is handed to `found` (the unwinder may read the
/// code at a return address: an execute-only mapping is left out).
struct LineParser {
    line: [u8; LINE_CAP],
    len: usize,
}

impl Default for LineParser {
    fn default() -> Self {
        LineParser {
            line: [0; LINE_CAP],
            len: 0,
        }
    }
}

fn hex(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 16 {
        return None;
    }
    b.iter().try_fold(0u64, |v, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(v << 4 | d as u64)
    })
}

impl LineParser {
    fn feed(&mut self, c: u8, found: &mut impl FnMut(Mapping)) {
        if c != b'\n' {
            if self.len < LINE_CAP {
                self.line[self.len] = c;
                self.len += 1;
            }
            return;
        }
        let line = &self.line[..self.len];
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let parsed = (|| {
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let (_dev, _inode) = (fields.next()?, fields.next()?);
            let dash = range.iter().position(|&b| b == b'-')?;
            let (start, end) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
            let exec = perms.first() == Some(&b'r') && perms.get(2) == Some(&b'x');
            // The path is the rest of the line after the inode's spaces (it may hold spaces).
            let path = fields.next().map_or(&[][..], |first| {
                let at = first.as_ptr() as usize - line.as_ptr() as usize;
                &line[at..]
            });
            (exec && start < end && self.len < LINE_CAP).then_some(Mapping {
                start,
                end,
                offset: hex(offset)?,
                path,
            })
        })();
        if let Some(m) = parsed {
            found(m);
        }
        self.len = 0;
    }
}

/// File-backed executable mappings that may be aliases of a module, noted while the ranges are
/// being written, registered afterwards.
const ALIASES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<(u64, u64)> {
        parse_all(text).into_iter().map(|m| (m.0, m.1)).collect()
    }

    fn parse_all(text: &str) -> Vec<(u64, u64, u64, String)> {
        let mut p = LineParser::default();
        let mut out = Vec::new();
        for c in text.bytes() {
            p.feed(c, &mut |m: Mapping| {
                out.push((
                    m.start,
                    m.end,
                    m.offset,
                    String::from_utf8_lossy(m.path).into_owned(),
                ))
            });
        }
        out
    }

    #[test]
    fn offsets_and_paths() {
        let maps = "\
7f73b7600000-7f73b7792000 r-xp 014c4000 fe:00 247584                     /usr/bin/node\n\
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n\
7f0000002000-7f0000003000 r-xp 00001000 fe:00 12 /tmp/a file\n";
        assert_eq!(
            parse_all(maps),
            vec![
                (
                    0x7f73b7600000,
                    0x7f73b7792000,
                    0x14c4000,
                    "/usr/bin/node".to_string()
                ),
                (0x7f0000000000, 0x7f0000001000, 0, String::new()),
                (
                    0x7f0000002000,
                    0x7f0000003000,
                    0x1000,
                    "/tmp/a file".to_string()
                ),
            ]
        );
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
