//! The leakhunt trace format, version 4. The normative description is `FORMAT.md` beside this
//! crate; this module is its implementation, shared by the writer (the preload library) and the
//! reader (the CLI).
//!
//! A trace is `MAGIC`, a little-endian `u32` version and a `u32` of zero, then framed records:
//! `u16 tag, u16 flags, u32 len, payload[len]`, each sealed by a CRC-32 (flag [`FLAG_CRC`]).
//! Readers skip tags they do not know. Allocation
//! events travel inside `Events` records (the compact encoding of [`compact`]) or `Batch` records
//! (fixed 32-byte slots, see [`slot`]); both read as [`Record::Batch`].
#![forbid(unsafe_code)]

pub mod compact;
pub mod decode;
pub mod encode;
pub mod pack;
pub mod reach;
pub mod slot;

pub use decode::{validate, DecodeError, Reader, Record};

/// First eight bytes of every trace.
pub const MAGIC: [u8; 8] = *b"LKHUNTTR";
/// The version this crate writes and the newest it reads. Version 2 added `EVENTS` records,
/// version 3 `PAIRS` slots and runs of `NOP`s in `EVENTS` (elided pairs), version 4 `CONTENT`
/// records (what a freed block pointed to, `LEAKHUNT_ORPHANS=1`); older traces read as before.
pub const VERSION: u32 = 4;
/// The newest version this crate reads: version 5 streams are the insides of packed traces
/// ([`pack`]), with `ORDERED` and `END_NOTE` records.
pub const READ_VERSION: u32 = pack::STREAM_VERSION;
/// Most slots one `EVENTS` record may announce (a reader allocates no more for one record).
pub const MAX_EVENTS_SLOTS: u32 = 1 << 20;
/// Size of the file preamble: magic, version, reserved word.
pub const PREAMBLE_LEN: usize = 16;
/// Size of a record's frame header: tag, flags, payload length.
pub const RECORD_HEADER_LEN: usize = 8;
/// Record flag: the record's last 4 bytes are the CRC-32 (IEEE) of its frame header and of the
/// bytes before them; `len` counts them. Every record this version writes carries it.
pub const FLAG_CRC: u16 = 1;
/// Bytes of a record checksum.
pub const CRC_LEN: usize = 4;

/// CRC-32 of a record's parts: the 8-byte frame header first, then the body before the checksum.
pub fn record_crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// The arguments of a command line as `/proc/PID/cmdline` gives it: NUL-terminated strings,
/// empty ones kept (`printf '[%s]' a '' b` has five). A last argument without its NUL (a
/// retitled process) counts too.
pub fn split_cmdline(b: &[u8]) -> Vec<String> {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|&c| c == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Frame header of a checksummed record whose body (without the checksum) is `body_len` bytes.
pub fn sealed_header(tag: u16, body_len: usize) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..2].copy_from_slice(&tag.to_le_bytes());
    h[2..4].copy_from_slice(&FLAG_CRC.to_le_bytes());
    h[4..8].copy_from_slice(&((body_len + CRC_LEN) as u32).to_le_bytes());
    h
}

/// Largest payload a reader accepts; larger lengths are corruption.
pub const MAX_RECORD_LEN: u32 = 64 << 20;

/// Record tags.
pub mod tag {
    pub const HEADER: u16 = 1;
    pub const MODULE: u16 = 2;
    pub const MODULE_UNLOAD: u16 = 3;
    pub const BATCH: u16 = 4;
    pub const EXIT: u16 = 5;
    pub const STATS: u16 = 6;
    pub const WARNING: u16 = 7;
    /// A batch's slots in the compact encoding of [`crate::compact`] (version 2).
    pub const EVENTS: u16 = 8;
    /// An epoch boundary: where in the event sequence it falls, when, and the process's RSS.
    pub const EPOCH: u16 = 9;
    /// A name for an epoch boundary (a snapshot asked for by the user or the program).
    pub const SNAPSHOT: u16 = 10;
    /// The process's command line as it reads now (`/proc/self/cmdline`, NUL-separated): a
    /// process that retitles itself (an nginx worker, a forked child) is named by its latest.
    pub const TITLE: u16 = 11;
    /// The process holds at exit for a heap scan by `leakhunt run` ([`crate::reach`]): phase 0
    /// asks (with what the scan must leave out), phase 1 says the rings are drained.
    pub const REACH: u16 = 12;
    /// The heap scan's outcome ([`crate::reach::Outcome`]), echoed into the trace by the
    /// process that was scanned, so that a kept trace reports the same kinds.
    pub const REACH_RESULT: u16 = 13;
    /// The process is a fork child (its image began at `fork`, not at `exec`): its heap starts
    /// as its parent's live blocks at the parent's fork point.
    pub const FORKED: u16 = 14;
    /// What a pseudo frame address (at or above [`crate::PSEUDO_FRAME_BASE`]) stands for: an
    /// interpreter's frame (CPython's function, file and line), written once per address.
    pub const FRAME_NAME: u16 = 15;
    /// Version 5 (packed traces only): allocator events in sequence order, without sequence
    /// numbers ([`crate::pack`]).
    pub const ORDERED: u16 = 16;
    /// Version 5 (packed traces only): how the stream it was packed from ended, when not
    /// cleanly: `u8` kind (0 truncated, 1 corrupt), `string` the reader's message.
    pub const END_NOTE: u16 = 17;
}

/// Frame addresses from here up are pseudo frames named by `FRAME_NAME` records, never return
/// addresses (they lie in the kernel's half of the address space).
pub const PSEUDO_FRAME_BASE: u64 = 0xffff_fe00_0000_0000;

/// An epoch boundary, written by the tracer every epoch interval: the events numbered below
/// `seq` happened before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// 1, 2, ... in the order written.
    pub index: u32,
    /// CLOCK_MONOTONIC, ns (the header's start is on the same clock).
    pub time_ns: u64,
    pub seq: u64,
    /// Resident set size of the process at the boundary, bytes.
    pub rss: u64,
}

/// Keys of the `Stats` record (a list of key/value pairs, so new counters need no new version).
pub mod stat {
    /// Events the tracer could not deliver (output failed, ring abandoned).
    pub const EVENTS_LOST: u32 = 1;
    /// Times a thread waited because its ring was full (back-pressure).
    pub const RING_WAITS: u32 = 2;
    /// Allocations served while the tracer could not record them (reentrant calls from inside
    /// the tracer itself or from a signal handler interrupting a hook).
    pub const UNTRACKED_ALLOCS: u32 = 3;
    /// Bytes handed out by the bootstrap allocator before the real allocator was resolved.
    pub const BOOTSTRAP_BYTES: u32 = 4;
    /// Threads that registered a ring.
    pub const THREADS: u32 = 5;
    /// Stack captures that reused the validated outer part of the thread's previous stack.
    pub const UNWIND_REUSED: u32 = 6;
    /// Stack captures that walked every frame.
    pub const UNWIND_WALKED: u32 = 7;
    /// Stack captures that found every stack word of the thread's previous walk unchanged and
    /// took its frames whole.
    pub const UNWIND_REPEATED: u32 = 8;
    /// Events sent as elided pairs (`PAIRS` slots and `NOP`s) instead of one by one.
    pub const ELIDED: u32 = 9;
    /// Times the program took the trace's descriptor (closed it, or reused its number) and the
    /// tracer re-opened the file or re-connected, losing nothing.
    pub const OUTPUT_RETAKEN: u32 = 10;
    /// 1: the process sent what each freed block still pointed to (`LEAKHUNT_ORPHANS=1`), so a
    /// lost block with no orphan site had no freed holder.
    pub const ORPHANS: u32 = 11;
    /// Bytes of the tracer's own memory (rings, unwind state, tables, buffers) resident in the
    /// process when the statistics were written (at its end: the rings of threads that exited
    /// stay mapped for the next ones).
    pub const TRACER_RESIDENT: u32 = 12;
    /// Times the pages of a ring (its slots and its thread's unwind state) were given back to
    /// the system because its thread had not recorded anything for a while (or had exited).
    pub const RINGS_GIVEN_BACK: u32 = 13;
}

/// How the process ended, as recorded by the tracer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `exit(code)` / return from main / `_exit(code)`.
    Code(i32),
    /// Killed by this signal (the tracer saw it in its fatal-signal handler).
    Signal(i32),
    /// The image is being replaced by exec. Void if records follow it (the exec failed).
    Exec,
}

/// Why an unwind stopped. Stored in each stack record; the report counts allocations per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StopReason {
    /// Reached the outermost frame (return address undefined, or zero).
    End = 0,
    /// Hit the `--max-frames` limit: the stack is truncated.
    MaxDepth = 1,
    /// The return address lies in a module without unwind information for it.
    NoUnwindInfo = 2,
    /// The return address lies in no known module.
    UnknownAddress = 3,
    /// The computed frame was outside the thread's stack or did not move up.
    BadFrame = 4,
    /// The unwind rule for this address is one the unwinder does not evaluate.
    UnsupportedRule = 5,
}

impl StopReason {
    pub fn from_u8(v: u8) -> Option<StopReason> {
        Some(match v {
            0 => StopReason::End,
            1 => StopReason::MaxDepth,
            2 => StopReason::NoUnwindInfo,
            3 => StopReason::UnknownAddress,
            4 => StopReason::BadFrame,
            5 => StopReason::UnsupportedRule,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            StopReason::End => "complete",
            StopReason::MaxDepth => "truncated at the frame limit",
            StopReason::NoUnwindInfo => "stopped: no unwind info for an address",
            StopReason::UnknownAddress => "stopped: address in no known module",
            StopReason::BadFrame => "stopped: frame outside the thread stack",
            StopReason::UnsupportedRule => "stopped: unsupported unwind rule",
        }
    }
}

/// The allocation entry point that produced a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AllocFn {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Memalign = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Valloc = 6,
    Pvalloc = 7,
    New = 8,
    NewArray = 9,
    Reallocarray = 10,
}

impl AllocFn {
    pub fn from_u8(v: u8) -> Option<AllocFn> {
        use AllocFn::*;
        Some(match v {
            0 => Malloc,
            1 => Calloc,
            2 => Realloc,
            3 => Memalign,
            4 => PosixMemalign,
            5 => AlignedAlloc,
            6 => Valloc,
            7 => Pvalloc,
            8 => New,
            9 => NewArray,
            10 => Reallocarray,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use AllocFn::*;
        match self {
            Malloc => "malloc",
            Calloc => "calloc",
            Realloc => "realloc",
            Memalign => "memalign",
            PosixMemalign => "posix_memalign",
            AlignedAlloc => "aligned_alloc",
            Valloc => "valloc",
            Pvalloc => "pvalloc",
            New => "operator new",
            NewArray => "operator new[]",
            Reallocarray => "reallocarray",
        }
    }
}

/// The deallocation entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FreeFn {
    Free = 0,
    Delete = 1,
    DeleteArray = 2,
    Realloc = 3,
}

impl FreeFn {
    pub fn from_u8(v: u8) -> Option<FreeFn> {
        Some(match v {
            0 => FreeFn::Free,
            1 => FreeFn::Delete,
            2 => FreeFn::DeleteArray,
            3 => FreeFn::Realloc,
            _ => return None,
        })
    }
}

/// The first bytes `leakhunt run`'s socket receives on every connection, before any trace byte
/// (not part of a trace file: preload and CLI of one build share it). A process's first
/// connection says `NEW`; if the program later takes the connection's descriptor away (closes it,
/// or closes every descriptor as daemons do), the tracer connects again and says `RESUME` with
/// how many trace bytes it delivered before, and the stream goes on where it stopped. The token
/// is the run's secret (`LEAKHUNT_TOKEN`), so that the CLI takes streams only from the processes
/// it started. Layout, little-endian: magic (8), version `u32`, kind `u32`, token (16), pid `u32`,
/// 0 `u32`, the header's monotonic start `u64` (with the pid, the stream's identity), offset
/// `u64`.
pub mod hello {
    pub const MAGIC: [u8; 8] = *b"LKHUNTHI";
    pub const VERSION: u32 = 1;
    pub const LEN: usize = 56;
    pub const NEW: u32 = 0;
    pub const RESUME: u32 = 1;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Hello {
        pub kind: u32,
        pub token: [u8; 16],
        pub pid: u32,
        pub start_ns: u64,
        /// Trace bytes delivered on earlier connections (0 for `NEW`).
        pub offset: u64,
    }

    pub fn encode(h: &Hello) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&h.kind.to_le_bytes());
        b[16..32].copy_from_slice(&h.token);
        b[32..36].copy_from_slice(&h.pid.to_le_bytes());
        b[40..48].copy_from_slice(&h.start_ns.to_le_bytes());
        b[48..56].copy_from_slice(&h.offset.to_le_bytes());
        b
    }

    /// The hello in `b`, or why `b` is not one.
    pub fn decode(b: &[u8; LEN]) -> Result<Hello, &'static str> {
        if b[..8] != MAGIC {
            return Err("not a leakhunt connection");
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(8) != VERSION {
            return Err("a connection from another version of the preload library");
        }
        let kind = u32_at(12);
        if kind != NEW && kind != RESUME {
            return Err("an unknown kind of connection");
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&b[16..32]);
        Ok(Hello {
            kind,
            token,
            pid: u32_at(32),
            start_ns: u64_at(40),
            offset: u64_at(48),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cmdlines_keep_empty_arguments() {
            use crate::split_cmdline;
            assert_eq!(
                split_cmdline(b"printf\0[%s]\0a\0\0b\0"),
                ["printf", "[%s]", "a", "", "b"]
            );
            assert_eq!(split_cmdline(b"x\0\0"), ["x", ""]);
            assert_eq!(
                split_cmdline(b"nginx: worker process"),
                ["nginx: worker process"]
            );
            assert!(split_cmdline(b"").is_empty());
        }

        #[test]
        fn hello_round_trips_and_rejects_strangers() {
            let h = Hello {
                kind: RESUME,
                token: [7; 16],
                pid: 4242,
                start_ns: 1 << 40,
                offset: 123_456,
            };
            assert_eq!(decode(&encode(&h)), Ok(h));
            let mut b = encode(&h);
            b[0] = b'X';
            assert_eq!(decode(&b), Err("not a leakhunt connection"));
            let mut b = encode(&h);
            b[12] = 9;
            assert!(decode(&b).is_err());
        }
    }
}

/// The control mailbox of a traced process, `/tmp/leakhunt-<uid>/<pid>.ctl`: one page the
/// preload maps shared (keeping no descriptor) and its writer thread reads between flushes.
/// `leakhunt snapshot` writes a name, then a new request number; the writer takes the snapshot
/// and writes the number back as acknowledged. Little-endian `u32` fields at these offsets.
pub mod control {
    /// `LKCT` at offset 0: the preload made this file.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"LKCT");
    /// The request number, written last by the asker (never 0).
    pub const REQUEST: usize = 4;
    /// The last request number the preload has done.
    pub const ACK: usize = 8;
    /// The snapshot name's length (at most 255), and its bytes.
    pub const NAME_LEN: usize = 12;
    pub const NAME: usize = 16;
    /// `u32` flags of the request (written before its number): [`SCAN`].
    pub const FLAGS: usize = 272;
    /// With the snapshot, a heap scan (the kinds of the blocks live at that point).
    pub const SCAN: u32 = 1;
    pub const LEN: usize = 4096;
}

/// Shared ring files: with `LEAKHUNT_RING_DIR` set (by `leakhunt run`), each thread's ring lives
/// in a file `<pid>-<start monotonic ns>-<n>.ring` there, so that when the process is killed
/// before it could send them, the CLI still reads the events that reached the ring. Not part of
/// the trace format: preload and CLI of one build share it. Layout: one 4096-byte page of
/// little-endian fields at the offsets below, then the slot array. A thread's ring starts small
/// and may be made large once: a new file then takes over (its head and tail where the old
/// ring's ended, the old one emptied first and removed).
pub mod ringfile {
    pub const MAGIC: [u8; 8] = *b"LKHRING1";
    pub const HEADER_LEN: usize = 4096;
    /// `u32` pid and `u32` thread id of the ring's current owner.
    pub const PID: usize = 8;
    pub const TID: usize = 12;
    /// `u64` slot count (a power of two).
    pub const SLOTS: usize = 16;
    /// `u64` index of the next slot to publish; slots below it are complete.
    pub const HEAD: usize = 64;
    /// `u64` index of the first slot not yet delivered to the CLI.
    pub const TAIL: usize = 128;
}
