//! Streaming decoder. Every error names the byte offset where it was found and what was expected;
//! a trace cut short (a killed process) yields [`DecodeError::Truncated`], which callers report as a
//! warning after using everything read before it.

use std::fmt;
use std::io::{self, Read};

use crate::encode::{Header, Module};
use crate::{
    record_crc, tag, ExitKind, CRC_LEN, FLAG_CRC, MAGIC, MAX_RECORD_LEN, PREAMBLE_LEN,
    READ_VERSION, RECORD_HEADER_LEN, VERSION,
};

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The source failed to read.
    Io { offset: u64, error: String },
    /// The first bytes are not the trace magic.
    NotATrace { found: Vec<u8> },
    /// Written by a newer leakhunt.
    UnsupportedVersion { found: u32, supported: u32 },
    /// The data ends inside a record (or inside the preamble).
    Truncated { offset: u64, what: String },
    /// A record's content contradicts the format.
    Corrupt { offset: u64, what: String },
}

impl DecodeError {
    /// Whether everything before the error is trustworthy and the error only cut the tail off.
    pub fn is_truncation(&self) -> bool {
        matches!(self, DecodeError::Truncated { .. })
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Io { offset, error } => write!(f, "read error at byte offset {offset}: {error}"),
            DecodeError::NotATrace { found } => write!(
                f,
                "not a leakhunt trace: expected magic {:?} at byte offset 0, found {:?}",
                String::from_utf8_lossy(&MAGIC),
                String::from_utf8_lossy(found)
            ),
            DecodeError::UnsupportedVersion { found, supported } => write!(
                f,
                "trace format version {found} at byte offset 8 is newer than this leakhunt reads (up to {supported}); upgrade leakhunt"
            ),
            DecodeError::Truncated { offset, what } => {
                write!(f, "trace truncated at byte offset {offset}: {what}")
            }
            DecodeError::Corrupt { offset, what } => {
                write!(f, "corrupt trace at byte offset {offset}: {what}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Header(Header),
    Module(Module),
    ModuleUnload {
        id: u32,
        gen: u32,
    },
    /// Slots of one thread's ring, decoded with [`crate::slot::SlotIter`]; `offset` is where the
    /// slots start in the trace (for error messages).
    Batch {
        tid: u32,
        offset: u64,
        slots: Vec<u8>,
    },
    /// The same in the compact encoding ([`crate::compact`]): `count` slots' worth of events in
    /// `body`, decoded by [`crate::compact::decode`] (or expanded to slots); `offset` is where
    /// `body` starts in the trace.
    Events {
        tid: u32,
        offset: u64,
        count: u32,
        body: Vec<u8>,
    },
    Exit(ExitKind),
    Epoch(crate::Epoch),
    /// The epoch boundary of index `epoch` is the snapshot `name`.
    Snapshot {
        epoch: u32,
        name: String,
    },
    Stats(Vec<(u32, u64)>),
    Warning(String),
    /// The process's command line as it read when the record was written (empty arguments
    /// kept).
    Title(Vec<String>),
    /// The process holds for a heap scan ([`crate::reach`]).
    Reach(crate::reach::Request),
    /// The process is a fork child of `parent`, whose fork point is its event `seq`.
    Forked {
        parent: u32,
        seq: u64,
    },
    /// A chunk of the heap scan's outcome.
    ReachResult(crate::reach::Outcome),
    /// Pseudo frame `addr` is `function` in `file` at `line` (0: unknown).
    FrameName {
        addr: u64,
        line: u32,
        function: String,
        file: String,
    },
    /// Allocator events in sequence order (a packed trace's), decoded by
    /// [`crate::pack::Unpacker`]; `offset` is where `body` starts in the stream.
    Ordered {
        offset: u64,
        body: Vec<u8>,
    },
    /// How the stream a packed trace was made from ended ([`crate::pack::END_TRUNCATED`]: the
    /// message of the reader that met the cut; [`crate::pack::END_CORRUPT`]: the decode error
    /// that stopped it), or [`crate::pack::END_WHOLE`]: the packed trace is whole.
    EndNote {
        kind: u8,
        message: String,
    },
    /// A record this version does not know; skipped.
    Unknown {
        tag: u16,
        len: u32,
    },
}

/// Reads records from a byte stream.
pub struct Reader<R> {
    src: R,
    offset: u64,
    started: bool,
    version: u32,
    /// Keep each record's bytes (but events') for [`Reader::raw`].
    keep_raw: bool,
    /// The stream is a packed trace's inside: version 5 reads ([`Reader::packed`]).
    packed: bool,
    raw: Vec<u8>,
    raw_tag: u16,
}

/// Cursor over one payload, with offset-carrying errors.
struct Payload<'a> {
    data: &'a [u8],
    pos: usize,
    base: u64,
    tag: &'static str,
}

impl<'a> Payload<'a> {
    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError::Corrupt {
            offset: self.base + self.pos as u64,
            what: format!("{} record: {}", self.tag, what.into()),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.data.len() - self.pos < n {
            return Err(self.err(format!(
                "expected {n} bytes of {what}, the record has {} left",
                self.data.len() - self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        Ok(String::from_utf8_lossy(self.bytes(what)?).into_owned())
    }
    /// A count of items of at least `min_item` bytes each, checked against the bytes left.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.data.len() - self.pos {
            self.pos = at;
            return Err(self.err(format!("{what} count {n} exceeds the record")));
        }
        Ok(n)
    }
}

impl<R: Read> Reader<R> {
    pub fn new(src: R) -> Reader<R> {
        Reader {
            src,
            offset: 0,
            started: false,
            version: 0,
            keep_raw: false,
            packed: false,
            raw: Vec::new(),
            raw_tag: 0,
        }
    }

    /// The stream is the inside of a packed trace ([`crate::pack`]), which alone may be of
    /// version 5 (a plain trace claiming it is refused as newer, so that a flipped bit in a
    /// plain trace's version is never read as another version).
    pub fn packed(&mut self, packed: bool) {
        self.packed = packed;
    }

    /// From now on keep the bytes of each record read (frame, body and checksum), except
    /// those of event records (`BATCH`, `EVENTS`, `ORDERED`), for [`Reader::raw`].
    pub fn keep_raw(&mut self, keep: bool) {
        self.keep_raw = keep;
    }

    /// The tag of the last record read.
    pub fn raw_tag(&self) -> u16 {
        self.raw_tag
    }

    /// The last record's bytes as the stream held them (with [`Reader::keep_raw`]; empty for
    /// event records).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Version read from the preamble (0 before the first record).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Whether the stream is a packed trace's inside ([`Reader::packed`]).
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Fills `buf` completely; returns how many bytes were read before EOF if it could not.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, DecodeError> {
        let mut got = 0;
        while got < buf.len() {
            match self.src.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(DecodeError::Io {
                        offset: self.offset + got as u64,
                        error: e.to_string(),
                    })
                }
            }
        }
        self.offset += got as u64;
        Ok(got)
    }

    fn preamble(&mut self) -> Result<(), DecodeError> {
        let mut p = [0u8; PREAMBLE_LEN];
        let got = self.fill(&mut p)?;
        if got < 8 || p[..8] != MAGIC {
            if got < 8 && MAGIC.starts_with(&p[..got]) {
                return Err(DecodeError::Truncated {
                    offset: got as u64,
                    what: format!("expected the {PREAMBLE_LEN}-byte preamble, found {got} bytes"),
                });
            }
            return Err(DecodeError::NotATrace {
                found: p[..got.min(8)].to_vec(),
            });
        }
        if got < PREAMBLE_LEN {
            return Err(DecodeError::Truncated {
                offset: got as u64,
                what: format!("expected the {PREAMBLE_LEN}-byte preamble, found {got} bytes"),
            });
        }
        let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
        let newest = if self.packed { READ_VERSION } else { VERSION };
        if version == 0 || version > newest {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: newest,
            });
        }
        let reserved = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
        if reserved != 0 {
            return Err(DecodeError::Corrupt {
                offset: 12,
                what: format!("expected the reserved preamble word to be 0, found {reserved:#x}"),
            });
        }
        self.version = version;
        Ok(())
    }

    /// The next record; `Ok(None)` at a clean end of the stream.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        if !self.started {
            self.started = true;
            self.preamble()?;
        }
        let start = self.offset;
        let mut h = [0u8; RECORD_HEADER_LEN];
        let got = self.fill(&mut h)?;
        if got == 0 {
            return Ok(None);
        }
        if got < RECORD_HEADER_LEN {
            return Err(DecodeError::Truncated {
                offset: start,
                what: format!(
                    "expected an {RECORD_HEADER_LEN}-byte record header, found {got} bytes"
                ),
            });
        }
        let tag = u16::from_le_bytes([h[0], h[1]]);
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len > MAX_RECORD_LEN {
            return Err(DecodeError::Corrupt {
                offset: start,
                what: format!(
                    "record tag {tag} claims {len} bytes, more than the {MAX_RECORD_LEN} allowed"
                ),
            });
        }
        // A batch's 8-byte head is read apart from its slots, so that the slots need no move.
        let split = if tag == tag::BATCH && len as usize >= 8 + CRC_LEN {
            8
        } else {
            0
        };
        let mut head = [0u8; 8];
        let got = self.fill(&mut head[..split])?;
        let mut payload = vec![0u8; len as usize - split];
        let got = got + self.fill(&mut payload)?;
        if got < len as usize {
            return Err(DecodeError::Truncated {
                offset: start,
                what: format!("record tag {tag} needs {len} payload bytes, only {got} present"),
            });
        }
        let base = start + RECORD_HEADER_LEN as u64;
        let flags = u16::from_le_bytes([h[2], h[3]]);
        if flags != FLAG_CRC {
            return Err(DecodeError::Corrupt {
                offset: start,
                what: format!(
                    "record tag {tag} has flags {flags:#x}; version {VERSION} records carry exactly the checksum flag ({FLAG_CRC:#x})"
                ),
            });
        }
        if payload.len() < CRC_LEN {
            return Err(DecodeError::Corrupt {
                offset: start,
                what: format!("record tag {tag} of {len} bytes is too short for its checksum"),
            });
        }
        let body = payload.len() - CRC_LEN;
        let stored = u32::from_le_bytes(payload[body..].try_into().unwrap());
        let computed = record_crc(&[&h, &head[..split], &payload[..body]]);
        if stored != computed {
            return Err(DecodeError::Corrupt {
                offset: start,
                what: format!(
                    "record tag {tag} ({len} bytes) fails its checksum: stored {stored:08x}, computed {computed:08x}"
                ),
            });
        }
        self.raw_tag = tag;
        self.raw.clear();
        if self.keep_raw && tag != tag::BATCH && tag != tag::EVENTS && tag != tag::ORDERED {
            self.raw.extend_from_slice(&h);
            self.raw.extend_from_slice(&payload);
        }
        payload.truncate(body);
        if split == 8 {
            return batch(head, payload, base).map(Some);
        }
        if self.version < crate::pack::STREAM_VERSION
            && (tag == tag::ORDERED || tag == tag::END_NOTE)
        {
            // Tags of version 5: unknown to the versions before, skipped there.
            return Ok(Some(Record::Unknown {
                tag,
                len: payload.len() as u32,
            }));
        }
        decode_payload(tag, payload, base).map(Some)
    }
}

/// A batch record from its 8-byte head (thread id, reserved) and its slots.
fn batch(head: [u8; 8], slots: Vec<u8>, base: u64) -> Result<Record, DecodeError> {
    if !slots.len().is_multiple_of(crate::slot::SLOT_LEN) {
        return Err(DecodeError::Corrupt {
            offset: base,
            what: format!(
                "batch record of {} bytes is not an 8-byte head plus whole 32-byte slots",
                slots.len() + 8
            ),
        });
    }
    Ok(Record::Batch {
        tid: u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
        offset: base + 8,
        slots,
    })
}

fn decode_payload(t: u16, payload: Vec<u8>, base: u64) -> Result<Record, DecodeError> {
    let name = match t {
        tag::HEADER => "header",
        tag::MODULE => "module",
        tag::MODULE_UNLOAD => "module-unload",
        tag::BATCH => "batch",
        tag::EXIT => "exit",
        tag::STATS => "stats",
        tag::WARNING => "warning",
        tag::EVENTS => "events",
        tag::EPOCH => "epoch",
        tag::SNAPSHOT => "snapshot",
        tag::TITLE => "title",
        tag::REACH => "reach",
        tag::REACH_RESULT => "reach-result",
        tag::FORKED => "forked",
        tag::FRAME_NAME => "frame-name",
        tag::ORDERED => {
            return Ok(Record::Ordered {
                offset: base,
                body: payload,
            })
        }
        tag::END_NOTE => "end-note",
        _ => {
            return Ok(Record::Unknown {
                tag: t,
                len: payload.len() as u32,
            })
        }
    };
    if t == tag::EVENTS {
        if payload.len() < 8 {
            return Err(DecodeError::Corrupt {
                offset: base,
                what: format!(
                    "events record of {} bytes has no 8-byte head",
                    payload.len()
                ),
            });
        }
        let tid = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let count = u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]);
        if count > crate::MAX_EVENTS_SLOTS {
            return Err(DecodeError::Corrupt {
                offset: base + 4,
                what: format!(
                    "events record announces {count} slots, more than the {} allowed",
                    crate::MAX_EVENTS_SLOTS
                ),
            });
        }
        return Ok(Record::Events {
            tid,
            offset: base + 8,
            count,
            body: payload[8..].to_vec(),
        });
    }
    if t == tag::BATCH {
        if payload.len() < 8 {
            return Err(DecodeError::Corrupt {
                offset: base,
                what: format!("batch record of {} bytes has no 8-byte head", payload.len()),
            });
        }
        let mut head = [0u8; 8];
        head.copy_from_slice(&payload[..8]);
        return batch(head, payload[8..].to_vec(), base);
    }
    let mut p = Payload {
        data: &payload,
        pos: 0,
        base,
        tag: name,
    };
    let rec = match t {
        tag::HEADER => {
            let pointer_size = p.u8("pointer size")?;
            let little_endian = p.u8("endianness")? == 1;
            let arch = p.string("architecture")?;
            let pid = p.u32("pid")?;
            let ppid = p.u32("ppid")?;
            let start_realtime_ns = p.u64("start time")?;
            let start_monotonic_ns = p.u64("monotonic start")?;
            let exe = p.string("executable")?;
            let n = p.count(4, "argv")?;
            let mut argv = Vec::with_capacity(n);
            for _ in 0..n {
                argv.push(p.string("argv entry")?);
            }
            let max_frames = p.u32("max frames")?;
            if pointer_size != 8 || !little_endian {
                return Err(p.err(format!(
                    "pointer size {pointer_size}, {} endian: only 64-bit little-endian traces are supported",
                    if little_endian { "little" } else { "big" }
                )));
            }
            Record::Header(Header {
                arch,
                pointer_size,
                little_endian,
                pid,
                ppid,
                start_realtime_ns,
                start_monotonic_ns,
                exe,
                argv,
                max_frames,
            })
        }
        tag::MODULE => {
            let id = p.u32("id")?;
            let gen = p.u32("generation")?;
            let bias = p.u64("bias")?;
            let path = p.string("path")?;
            let build_id = p.bytes("build id")?.to_vec();
            let n = p.count(16, "range")?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                let s = p.u64("range start")?;
                let e = p.u64("range end")?;
                if e < s {
                    return Err(p.err(format!("range end {e:#x} below start {s:#x}")));
                }
                ranges.push((s, e));
            }
            Record::Module(Module {
                id,
                gen,
                bias,
                path,
                build_id,
                ranges,
            })
        }
        tag::MODULE_UNLOAD => Record::ModuleUnload {
            id: p.u32("id")?,
            gen: p.u32("generation")?,
        },
        tag::EXIT => {
            let kind = p.u8("exit kind")?;
            let v = p.i32("exit value")?;
            match kind {
                0 => Record::Exit(ExitKind::Code(v)),
                1 => Record::Exit(ExitKind::Signal(v)),
                2 => Record::Exit(ExitKind::Exec),
                k => return Err(p.err(format!("unknown exit kind {k}"))),
            }
        }
        tag::EPOCH => Record::Epoch(crate::Epoch {
            index: p.u32("epoch index")?,
            time_ns: p.u64("epoch time")?,
            seq: p.u64("epoch sequence number")?,
            rss: p.u64("epoch RSS")?,
        }),
        tag::SNAPSHOT => Record::Snapshot {
            epoch: p.u32("snapshot epoch")?,
            name: p.string("snapshot name")?,
        },
        tag::STATS => {
            let n = p.count(12, "stat")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push((p.u32("stat key")?, p.u64("stat value")?));
            }
            Record::Stats(v)
        }
        tag::WARNING => Record::Warning(p.string("text")?),
        tag::TITLE => Record::Title(crate::split_cmdline(p.bytes("title")?)),
        tag::FORKED => Record::Forked {
            parent: p.u32("parent pid")?,
            seq: p.u64("fork point")?,
        },
        tag::FRAME_NAME => {
            let addr = p.u64("pseudo frame address")?;
            if addr < crate::PSEUDO_FRAME_BASE {
                return Err(p.err(format!("frame name for {addr:#x}, not a pseudo frame")));
            }
            Record::FrameName {
                addr,
                line: p.u32("line")?,
                function: p.string("function")?,
                file: p.string("file")?,
            }
        }
        tag::END_NOTE => {
            let kind = p.u8("kind")?;
            if kind > crate::pack::END_WHOLE {
                return Err(p.err(format!(
                    "end kind {kind}, not 0 (truncated), 1 (corrupt) or 2 (whole)"
                )));
            }
            Record::EndNote {
                kind,
                message: p.string("message")?,
            }
        }
        tag::REACH => {
            let phase = p.u8("phase")?;
            let snapshot = p.u8("snapshot flag")? != 0;
            let pre_exit = p.u8("pre-exit flag")? != 0;
            p.take(1, "padding")?;
            let tid = p.u32("thread id")?;
            let sp = p.u64("stack pointer")?;
            let nt = p.u32("thread count")? as usize;
            let nr = p.u32("range count")? as usize;
            if nt.saturating_mul(4).saturating_add(nr.saturating_mul(16)) > p.data.len() - p.pos {
                return Err(p.err(format!("{nt} threads and {nr} ranges exceed the record")));
            }
            let skip_tids = (0..nt)
                .map(|_| p.u32("thread id"))
                .collect::<Result<_, _>>()?;
            let mut skip_ranges = Vec::with_capacity(nr);
            for _ in 0..nr {
                let (s, e) = (p.u64("range start")?, p.u64("range end")?);
                if e < s {
                    return Err(p.err(format!("range end {e:#x} below start {s:#x}")));
                }
                skip_ranges.push((s, e));
            }
            if phase > crate::reach::READY {
                return Err(p.err(format!("unknown phase {phase}")));
            }
            Record::Reach(crate::reach::Request {
                phase,
                snapshot,
                pre_exit,
                tid,
                sp,
                skip_tids,
                skip_ranges,
            })
        }
        tag::REACH_RESULT => {
            let flags = p.u32("flags")?;
            let blocks = p.u64("blocks")?;
            let words = p.u64("words")?;
            let threads = p.u32("threads")?;
            let held_us = p.u64("time held")?;
            let note = p.string("note")?;
            let n = p.count(crate::reach::ENTRY_LEN, "entry")?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let addr = p.u64("block address")?;
                let kind = p.u8("kind")?;
                let heuristic = p.u8("heuristic")?;
                let indirect = p.u64("indirect bytes")?;
                if kind > 3 || (heuristic > 3 && heuristic != crate::reach::NO_HEURISTIC) {
                    return Err(p.err(format!(
                        "block {addr:#x}: unknown kind {kind} or heuristic {heuristic}"
                    )));
                }
                entries.push(crate::reach::Entry {
                    addr,
                    kind,
                    heuristic,
                    indirect,
                });
            }
            let mut items = Vec::new();
            if p.pos < p.data.len() {
                // Items: each at least 13 bytes.
                let n = p.count(crate::reach::ITEM_MIN_LEN, "retention item")?;
                items.reserve(n);
                for _ in 0..n {
                    items.push(reach_item(&mut p)?);
                }
            }
            Record::ReachResult(crate::reach::Outcome {
                last: flags & 1 != 0,
                unavailable: flags & 2 != 0,
                blocks,
                words,
                threads,
                held_us,
                note,
                entries,
                items,
            })
        }
        _ => unreachable!("tags filtered above"),
    };
    Ok(rec)
}

/// One retention item of a `REACH_RESULT` record ([`crate::reach::Item`]).
fn reach_item(p: &mut Payload) -> Result<crate::reach::Item, DecodeError> {
    use crate::reach::Item;
    Ok(match p.u8("item type")? {
        1 => Item::Thread {
            tid: p.u32("thread")?,
            tp: p.u64("thread pointer")?,
            pc: p.u64("program counter")?,
            lo: p.u64("stack start")?,
            hi: p.u64("stack end")?,
        },
        2 => {
            let kind = p.u8("root kind")?;
            if kind > crate::reach::root::OTHER {
                return Err(p.err(format!("unknown root kind {kind}")));
            }
            Item::Root {
                kind,
                addr: p.u64("root address")?,
                tid: p.u32("root thread")?,
                module: p.u32("root module")?,
                detail: p.u64("root detail")?,
            }
        }
        3 => Item::Node {
            from: p.u32("path start")?,
            stack: p.u32("hop stack")?,
            off: p.u32("hop offset")?,
            repeat: p.u8("repeat")? != 0,
        },
        4 => Item::Site {
            stack: p.u32("stack")?,
            node: p.u32("path")?,
            blocks: p.u64("blocks")?,
            bytes: p.u64("bytes")?,
        },
        5 => Item::Retained {
            stack: p.u32("stack")?,
            first_born: p.u32("first born")?,
            born: p.u32("born")?,
            bytes: p.u64("retained bytes")?,
            blocks: p.u64("retained blocks")?,
        },
        t => return Err(p.err(format!("unknown retention item type {t}"))),
    })
}

/// Decodes a whole trace held in memory, every slot of every batch included, and returns the
/// number of records. The first problem ends it: truncation, corruption, a newer version. This is
/// what the fuzz target and the random-input test drive; it must never panic.
pub fn validate(data: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader::new(data);
    let mut n = 0;
    while let Some(rec) = r.next_record()? {
        let expanded;
        let (offset, slots) = match &rec {
            Record::Batch { offset, slots, .. } => (*offset, slots),
            Record::Events {
                offset,
                count,
                body,
                ..
            } => {
                let mut v = Vec::new();
                crate::compact::expand(body, *count as usize, &mut v).map_err(|e| {
                    DecodeError::Corrupt {
                        offset: offset + e.at as u64,
                        what: format!("events record: {}", e.what),
                    }
                })?;
                expanded = v;
                (*offset, &expanded)
            }
            _ => {
                n += 1;
                continue;
            }
        };
        // Slot offsets of an expanded body are positions in its slots, not in the trace.
        for s in crate::slot::SlotIter::new(slots) {
            s.map_err(|e| DecodeError::Corrupt {
                offset: offset + e.at as u64,
                what: e.what,
            })?;
        }
        n += 1;
    }
    Ok(n)
}

/// Recomputes the checksum of every whole record in `data`, so that fuzzed or hand-mutated input
/// reaches the record and slot decoders behind the checksum. For fuzzing and tests only.
#[doc(hidden)]
pub fn reseal_for_fuzzing(data: &mut [u8]) {
    let mut at = PREAMBLE_LEN;
    while at + RECORD_HEADER_LEN <= data.len() {
        let len = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let end = at + RECORD_HEADER_LEN + len as usize;
        if (len as usize) < CRC_LEN || end > data.len() {
            return;
        }
        let crc = record_crc(&[
            &data[at..at + RECORD_HEADER_LEN],
            &data[at + RECORD_HEADER_LEN..end - CRC_LEN],
        ]);
        data[end - CRC_LEN..end].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    fn sample() -> Vec<u8> {
        let mut out = encode::preamble().to_vec();
        encode::header(
            &Header {
                arch: "x86_64".into(),
                pointer_size: 8,
                little_endian: true,
                pid: 42,
                ppid: 1,
                start_realtime_ns: 5,
                start_monotonic_ns: 6,
                exe: "/bin/true".into(),
                argv: vec!["true".into(), "x".into()],
                max_frames: 64,
            },
            &mut out,
        );
        encode::module(
            &Module {
                id: 0,
                gen: 1,
                bias: 0x5000,
                path: "/bin/true".into(),
                build_id: vec![1, 2, 3],
                ranges: vec![(0x6000, 0x7000)],
            },
            &mut out,
        );
        let slot = crate::slot::nop(0);
        encode::batch(9, &slot, &mut out);
        encode::exit(ExitKind::Signal(11), &mut out);
        out
    }

    #[test]
    fn epochs_and_snapshots_round_trip() {
        let mut data = sample();
        let e = crate::Epoch {
            index: 7,
            time_ns: 123_456_789,
            seq: 42,
            rss: 3 << 20,
        };
        encode::epoch(&e, &mut data);
        encode::snapshot(7, "after warm-up", &mut data);
        let (recs, err) = all(&data);
        assert_eq!(err, None);
        let n = recs.len();
        assert_eq!(recs[n - 2], Record::Epoch(e));
        assert_eq!(
            recs[n - 1],
            Record::Snapshot {
                epoch: 7,
                name: "after warm-up".into()
            }
        );
        assert_eq!(validate(&data), Ok(n));
    }

    #[test]
    fn frame_names_round_trip_and_refuse_return_addresses() {
        let mut data = sample();
        let addr = crate::PSEUDO_FRAME_BASE + 5;
        encode::frame_name(addr, 8, b"handle_request", b"/srv/app.py", &mut data);
        let (recs, err) = all(&data);
        assert_eq!(err, None);
        assert_eq!(
            recs.last(),
            Some(&Record::FrameName {
                addr,
                line: 8,
                function: "handle_request".into(),
                file: "/srv/app.py".into()
            })
        );
        let mut data = sample();
        encode::frame_name(0x401000, 8, b"main", b"", &mut data);
        let (_, err) = all(&data);
        let e = err.expect("a frame name for a return address is an error");
        assert!(e.to_string().contains("not a pseudo frame"), "{e}");
    }

    fn all(data: &[u8]) -> (Vec<Record>, Option<DecodeError>) {
        let mut r = Reader::new(data);
        let mut v = Vec::new();
        loop {
            match r.next_record() {
                Ok(Some(rec)) => v.push(rec),
                Ok(None) => return (v, None),
                Err(e) => return (v, Some(e)),
            }
        }
    }

    #[test]
    fn roundtrip() {
        let (recs, err) = all(&sample());
        assert_eq!(err, None);
        assert_eq!(recs.len(), 4);
        assert!(matches!(&recs[0], Record::Header(h) if h.pid == 42 && h.argv == ["true", "x"]));
        assert!(matches!(&recs[2], Record::Batch { tid: 9, slots, .. } if slots.len() == 32));
        assert_eq!(recs[3], Record::Exit(ExitKind::Signal(11)));
    }

    #[test]
    fn every_truncation_keeps_the_prefix_and_names_the_offset() {
        let data = sample();
        for cut in 0..data.len() {
            let (recs, err) = all(&data[..cut]);
            if cut == 0 {
                assert!(
                    matches!(err, Some(DecodeError::Truncated { offset: 0, .. })),
                    "{err:?}"
                );
                continue;
            }
            match err {
                None => assert!(recs.len() < 4 || cut == data.len()),
                Some(e) => assert!(e.is_truncation(), "cut {cut}: {e}"),
            }
        }
    }

    #[test]
    fn newer_version_and_bad_magic() {
        let mut data = sample();
        data[8] = 5;
        let (_, err) = all(&data);
        assert_eq!(
            err,
            Some(DecodeError::UnsupportedVersion {
                found: 5,
                supported: 4
            })
        );
        // Version 5 (a packed trace's inside) reads; its tags are unknown to version 4 streams.
        let mut data = sample();
        encode::end_note(crate::pack::END_TRUNCATED, "cut", &mut data);
        let (recs, err) = all(&data);
        assert_eq!(err, None);
        assert!(matches!(recs.last(), Some(Record::Unknown { tag: 17, .. })));
        data[8] = 5;
        let mut r = Reader::new(&data[..]);
        r.packed(true);
        let mut last = None;
        while let Some(rec) = r.next_record().unwrap() {
            last = Some(rec);
        }
        assert!(matches!(last, Some(Record::EndNote { kind: 0, .. })));
        let (_, err) = all(b"ELF\x7f and more bytes here");
        assert!(matches!(err, Some(DecodeError::NotATrace { .. })));
        assert!(err.unwrap().to_string().contains("not a leakhunt trace"));
    }

    #[test]
    fn unknown_records_are_skipped() {
        let mut data = encode::preamble().to_vec();
        encode::sealed(999, &[&[1, 2, 3]], &mut data);
        encode::exit(ExitKind::Code(3), &mut data);
        let (recs, err) = all(&data);
        assert_eq!(err, None);
        assert_eq!(
            recs,
            vec![
                Record::Unknown { tag: 999, len: 3 },
                Record::Exit(ExitKind::Code(3))
            ]
        );
    }

    #[test]
    fn records_without_their_checksum_are_corrupt() {
        let mut data = encode::preamble().to_vec();
        data.extend_from_slice(&[5, 0, 0, 0, 5, 0, 0, 0, 0, 3, 0, 0, 0]);
        let (recs, err) = all(&data);
        assert!(recs.is_empty());
        let e = err.unwrap();
        assert!(matches!(e, DecodeError::Corrupt { offset: 16, .. }), "{e}");
        assert!(e.to_string().contains("checksum flag"), "{e}");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let data = sample();
        for at in 12..data.len() {
            let mut d = data.clone();
            d[at] ^= 0x11;
            let (recs, err) = all(&d);
            assert!(err.is_some(), "flip at {at} went unnoticed: {recs:?}");
        }
    }

    #[test]
    fn huge_counts_are_corruption_not_allocation() {
        let mut data = encode::preamble().to_vec();
        let mut r = encode::RecordBuf::new();
        r.u32(u32::MAX);
        r.finish_into(tag::STATS, &mut data);
        let (_, err) = all(&data);
        assert!(
            matches!(err, Some(DecodeError::Corrupt { offset: 24, .. })),
            "{err:?}"
        );
    }
}
