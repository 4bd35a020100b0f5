//! Settings from the environment, read once at initialisation with `getenv` (which does not
//! allocate). `leakhunt run` sets them; with the preload alone they are optional.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `LEAKHUNT_SOCKET` | Unix socket of a `leakhunt run` to stream to | unset: write a file |
//! | `LEAKHUNT_OUT` | trace file path (`%p` = pid) | `leakhunt.<pid>.trace` |
//! | `LEAKHUNT_MAX_FRAMES` | frames kept per stack, 1-256 | 64 |
//! | `LEAKHUNT_TRACE_CHILDREN` | `1`: trace exec'd programs too, also those given an environment without leakhunt's variables (fork children are followed anyway); `0`: take leakhunt out of the environment the program passes on, so that the programs it starts run untraced | under `leakhunt run`: `0`; the preload alone: unset, and programs started with the environment the user set (`LD_PRELOAD` and any `LEAKHUNT_*` variables) are traced as every `LD_PRELOAD` library is inherited, each writing its own trace |
//! | `LEAKHUNT_FOLLOW_FORKS` | `0`: do not trace fork children (memcheck follows them without being asked) | `1` |
//! | `LEAKHUNT_FREERES` | `0`: do not ask libc/libstdc++ to free their internal buffers at exit | `1` |
//! | `LEAKHUNT_RING_DIR` | directory (private to `leakhunt run`) where rings are shared files, so the CLI keeps what reached them if the process is killed | unset: anonymous memory |
//! | `LEAKHUNT_ELIDE` | `0`: send every event, also allocations freed again before the next epoch boundary, which are otherwise counted per stack instead (FORMAT.md, "Elided pairs"; none is elided across a fork) | `1` |
//! | `LEAKHUNT_UNWIND_REUSE` | `0`: walk every frame of every stack (the reference the fast path is tested against) | `1` |
//! | `LEAKHUNT_SNAPSHOT_MS` | milliseconds between automatic snapshots (`auto-1`, `auto-2`, ...); `0`: none | `0` |
//! | `LEAKHUNT_TOKEN` | the run's secret (32 hex digits), sent first on every connection to `LEAKHUNT_SOCKET` so that `leakhunt run` knows its own processes | unset: zeros |
//! | `LEAKHUNT_REACH` | `0`: no heap scan at exit; `1`: with the preload alone, scan even when the trace is over `LEAKHUNT_REACH_LIMIT_MB` (the helper reads it all before the scan, while the program waits to exit) | scan (preload alone: up to the limit) |
//! | `LEAKHUNT_PRE_EXIT_SCAN` | `1`: also scan the heap as the program starts to exit (main returned, or `exit` was called), before its exit handlers and destructors free what they free, as the scan `pre-exit`: what held the blocks that grew, seen while the program's structures are whole; `0`: not | `1` under `leakhunt run` once three epoch boundaries were written, else `0` |
//! | `LEAKHUNT_REACH_LIMIT_MB` | with the preload alone, the largest trace the scan at exit reads unasked | `256` |
//! | `LEAKHUNT_CLI` | the `leakhunt` binary that makes the heap scan at exit for the preload alone | `leakhunt` next to the library |
//! | `LEAKHUNT_ORPHANS` | `1`: at each free, capture the free's stack (an unwind per free) and send which heap blocks the freed block still pointed to (a `CONTENT` record before its `FREE`: the orphan sites of lost blocks, FORMAT.md "Orphan sites"); turns elided pairs off, since the CLI needs the allocation of every freed block | `0` |
//! | `LEAKHUNT_PYTHON` | `0`: leave CPython 3.11's own frames out of stacks (they are otherwise spliced in where the interpreter's evaluation loop is: function, file and line of the Python code running) | `1` |
//! | `LEAKHUNT_EPOCH_MS` | milliseconds between epoch boundaries (with the RSS) in the trace, 10-3,600,000; `0`: none | `1000` |

extern crate alloc;
use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, Ordering};

/// Paths are copied out of the environment: the program may change it later.
pub struct Config {
    socket: [u8; 256],
    ring_dir: [u8; 256],
    out: [u8; 4096],
    pub token: [u8; 16],
    pub max_frames: usize,
    pub trace_children: bool,
    /// Take leakhunt out of the environment the program passes on (`LEAKHUNT_TRACE_CHILDREN=0`,
    /// and under `leakhunt run` without `--trace-children`). Neither this nor
    /// `trace_children`: the environment is the user's, inherited as it is.
    pub strip_env: bool,
    /// Fork children are traced as processes of their own.
    pub follow_forks: bool,
    pub freeres: bool,
    pub unwind_reuse: bool,
    /// Splice CPython's frames into stacks.
    pub python: bool,
    pub elide: bool,
    /// At each free, send its stack and the heap pointers the block still held (`CONTENT`).
    pub orphans: bool,
    /// Hold at exit for `leakhunt run`'s heap scan (`LEAKHUNT_REACH=0`: no scan).
    pub reach: bool,
    /// `LEAKHUNT_REACH=1`: with the preload alone, scan whatever the trace's size.
    pub reach_forced: bool,
    /// Scan as the program starts to exit, before its handlers and destructors run.
    pub pre_exit_scan: bool,
    /// With the preload alone, the largest trace (bytes) the scan at exit reads unasked.
    pub reach_limit: u64,
    /// With the preload alone, the trace size (bytes) at which the scan's helper starts, to read
    /// the trace as it grows rather than all of it at exit (`u64::MAX`, unless
    /// `LEAKHUNT_HELPER_EARLY_KB` is set: only at exit; starting it early costs two more
    /// descriptors of leakhunt's in the program from the start, its socket pair).
    pub helper_early: u64,
    /// Nanoseconds between epoch boundaries (0: none).
    pub epoch_ns: u64,
    /// Nanoseconds between automatic snapshots (0: none).
    pub snapshot_ns: u64,
}

static mut CONFIG: Config = Config {
    socket: [0; 256],
    ring_dir: [0; 256],
    out: [0; 4096],
    token: [0; 16],
    max_frames: 64,
    trace_children: false,
    strip_env: false,
    follow_forks: true,
    freeres: true,
    unwind_reuse: true,
    python: true,
    elide: true,
    orphans: false,
    reach: true,
    reach_forced: false,
    pre_exit_scan: false,
    reach_limit: 256 << 20,
    helper_early: u64::MAX,
    epoch_ns: 1_000_000_000,
    snapshot_ns: 0,
};

fn copy_into(dst: &mut [u8], src: Option<&CStr>) {
    if let Some(s) = src {
        let b = s.to_bytes();
        let n = b.len().min(dst.len() - 1);
        dst[..n].copy_from_slice(&b[..n]);
        dst[n] = 0;
    }
}

fn as_cstr(b: &[u8]) -> Option<&CStr> {
    CStr::from_bytes_until_nul(b).ok().filter(|s| !s.is_empty())
}
static LOADED: AtomicBool = AtomicBool::new(false);

fn env(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv with a NUL-terminated name; the result is read at once, before the program's
    // main runs.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    (!p.is_null())
        .then(|| unsafe { CStr::from_ptr(p) })
        .filter(|s| !s.is_empty())
}

/// Reads the environment. Called once by `tracer::init_core` before anything records.
pub fn load() {
    let max_frames = env(c"LEAKHUNT_MAX_FRAMES")
        .and_then(|s| s.to_str().ok()?.parse::<usize>().ok())
        .map(|n| n.clamp(1, crate::unwind::MAX_FRAMES_CAP))
        .unwrap_or(64);
    let trace_children = env(c"LEAKHUNT_TRACE_CHILDREN").is_some_and(|s| s.to_bytes() == b"1");
    // SAFETY: written once before LOADED is set; read-only afterwards.
    unsafe {
        let c = &mut *core::ptr::addr_of_mut!(CONFIG);
        copy_into(&mut c.socket, env(c"LEAKHUNT_SOCKET"));
        copy_into(&mut c.ring_dir, env(c"LEAKHUNT_RING_DIR"));
        copy_into(&mut c.out, env(c"LEAKHUNT_OUT"));
        if let Some(t) = env(c"LEAKHUNT_TOKEN").and_then(|s| parse_token(s.to_bytes())) {
            c.token = t;
        }
        c.max_frames = max_frames;
        c.trace_children = trace_children;
        c.strip_env = match env(c"LEAKHUNT_TRACE_CHILDREN") {
            Some(s) => s.to_bytes() != b"1",
            // `leakhunt run` (a socket to stream to) traces exec'd programs only when asked, as
            // memcheck does; the preload alone is inherited as the user set it.
            None => env(c"LEAKHUNT_SOCKET").is_some(),
        };
        c.follow_forks =
            trace_children || env(c"LEAKHUNT_FOLLOW_FORKS").is_none_or(|s| s.to_bytes() != b"0");
        c.freeres = env(c"LEAKHUNT_FREERES").is_none_or(|s| s.to_bytes() != b"0");
        c.reach = env(c"LEAKHUNT_REACH").is_none_or(|s| s.to_bytes() != b"0");
        c.reach_forced = env(c"LEAKHUNT_REACH").is_some_and(|s| s.to_bytes() == b"1");
        c.pre_exit_scan = c.reach
            && match env(c"LEAKHUNT_PRE_EXIT_SCAN") {
                Some(s) => s.to_bytes() == b"1",
                None => as_cstr(&c.socket).is_some(),
            };
        if let Some(mb) =
            env(c"LEAKHUNT_REACH_LIMIT_MB").and_then(|s| s.to_str().ok()?.parse::<u64>().ok())
        {
            c.reach_limit = mb.saturating_mul(1 << 20);
        }
        if let Some(kb) =
            env(c"LEAKHUNT_HELPER_EARLY_KB").and_then(|s| s.to_str().ok()?.parse::<u64>().ok())
        {
            c.helper_early = if kb == 0 {
                u64::MAX
            } else {
                kb.saturating_mul(1 << 10)
            };
        }
        c.unwind_reuse = env(c"LEAKHUNT_UNWIND_REUSE").is_none_or(|s| s.to_bytes() != b"0");
        c.python = env(c"LEAKHUNT_PYTHON").is_none_or(|s| s.to_bytes() != b"0");
        // A fork point is a boundary no elided pair crosses (`out::fork_point`): the child's
        // heap is exactly the live set the events give there.
        c.elide = env(c"LEAKHUNT_ELIDE").is_none_or(|s| s.to_bytes() != b"0");
        // The CLI names the parent of an orphan by its allocation stack: every freed block's
        // allocation must reach it, so no pair is elided.
        c.orphans = env(c"LEAKHUNT_ORPHANS").is_some_and(|s| s.to_bytes() == b"1");
        c.elide &= !c.orphans;
        if let Some(ms) =
            env(c"LEAKHUNT_SNAPSHOT_MS").and_then(|s| s.to_str().ok()?.parse::<u64>().ok())
        {
            c.snapshot_ns = ms.min(86_400_000) * 1_000_000;
        }
        if let Some(ms) =
            env(c"LEAKHUNT_EPOCH_MS").and_then(|s| s.to_str().ok()?.parse::<u64>().ok())
        {
            c.epoch_ns = if ms == 0 {
                0
            } else {
                ms.clamp(10, 3_600_000) * 1_000_000
            };
        }
    }
    LOADED.store(true, Ordering::Release);
    crate::helper::note_paths(env(c"LEAKHUNT_CLI"));
    crate::sys::note_own_statics(crate::real::boot_range());
}

/// 32 hex digits as 16 bytes.
fn parse_token(hex: &[u8]) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut t = [0u8; 16];
    for (i, b) in t.iter_mut().enumerate() {
        *b = digit(hex[2 * i])? << 4 | digit(hex[2 * i + 1])?;
    }
    Some(t)
}

pub fn get() -> &'static Config {
    // SAFETY: CONFIG is only written by `load`, before LOADED is published.
    unsafe { &*core::ptr::addr_of!(CONFIG) }
}

impl Config {
    pub fn socket(&self) -> Option<&CStr> {
        as_cstr(&self.socket)
    }
    pub fn ring_dir(&self) -> Option<&CStr> {
        as_cstr(&self.ring_dir)
    }
    pub fn out_path(&self) -> Option<&CStr> {
        as_cstr(&self.out)
    }
}

/// Decimal digits of `v`, for building environment strings.
pub fn fmt_usize(mut v: usize) -> alloc::vec::Vec<u8> {
    let mut d = alloc::vec::Vec::new();
    loop {
        d.push(b'0' + (v % 10) as u8);
        v /= 10;
        if v == 0 {
            break;
        }
    }
    d.reverse();
    d
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_32_hex_digits() {
        let t = super::parse_token(b"000102030405060708090a0B0c0d0e0F").unwrap();
        assert_eq!(t, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert!(super::parse_token(b"00").is_none());
        assert!(super::parse_token(b"zz0102030405060708090a0b0c0d0e0f").is_none());
    }
}
