//! Encoding of top-level records. Used by the preload's writer thread (never by a hook), so it
//! may allocate.

use crate::{record_crc, sealed_header, tag, ExitKind, MAGIC, VERSION};

/// The 16-byte file preamble.
pub fn preamble() -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p
}

/// Builds one record's payload, then frames it.
#[derive(Default)]
pub struct RecordBuf {
    buf: Vec<u8>,
}

impl RecordBuf {
    pub fn new() -> RecordBuf {
        RecordBuf { buf: Vec::new() }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Length-prefixed (`u32`) bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// The payload built so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// Appends the framed, checksummed record to `out` and clears self.
    pub fn finish_into(&mut self, tag: u16, out: &mut Vec<u8>) {
        sealed(tag, &[&self.buf], out);
        self.buf.clear();
    }
}

/// Appends a checksummed record whose body is the concatenation of `parts`.
pub fn sealed(tag: u16, parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let h = sealed_header(tag, len);
    let mut all: Vec<&[u8]> = vec![&h];
    all.extend_from_slice(parts);
    let crc = record_crc(&all);
    for p in all {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Process description written first in every trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub arch: String,
    pub pointer_size: u8,
    pub little_endian: bool,
    pub pid: u32,
    pub ppid: u32,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub start_realtime_ns: u64,
    /// CLOCK_MONOTONIC at start, nanoseconds; later time stamps use this clock.
    pub start_monotonic_ns: u64,
    pub exe: String,
    pub argv: Vec<String>,
    pub max_frames: u32,
}

pub fn header(h: &Header, out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.u8(h.pointer_size)
        .u8(h.little_endian as u8)
        .bytes(h.arch.as_bytes())
        .u32(h.pid)
        .u32(h.ppid)
        .u64(h.start_realtime_ns)
        .u64(h.start_monotonic_ns)
        .bytes(h.exe.as_bytes())
        .u32(h.argv.len() as u32);
    for a in &h.argv {
        r.bytes(a.as_bytes());
    }
    r.u32(h.max_frames);
    r.finish_into(tag::HEADER, out);
}

/// One loaded module (executable, shared library, vDSO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Index, unique within the trace.
    pub id: u32,
    /// Module generation at which it was loaded.
    pub gen: u32,
    /// Load bias: runtime address minus ELF virtual address.
    pub bias: u64,
    pub path: String,
    pub build_id: Vec<u8>,
    /// Runtime address ranges `[start, end)` of its executable PT_LOAD segments.
    pub ranges: Vec<(u64, u64)>,
}

pub fn module(m: &Module, out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.u32(m.id)
        .u32(m.gen)
        .u64(m.bias)
        .bytes(m.path.as_bytes())
        .bytes(&m.build_id)
        .u32(m.ranges.len() as u32);
    for (s, e) in &m.ranges {
        r.u64(*s).u64(*e);
    }
    r.finish_into(tag::MODULE, out);
}

pub fn module_unload(id: u32, gen: u32, out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.u32(id).u32(gen).finish_into(tag::MODULE_UNLOAD, out);
}

/// A batch record: the thread id, then `slots` (whole 32-byte slots).
pub fn batch(tid: u32, slots: &[u8], out: &mut Vec<u8>) {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&tid.to_le_bytes());
    sealed(tag::BATCH, &[&head, slots], out);
}

/// The same slots as an events record in the compact encoding; a batch record if they hold
/// something that encoding does not carry.
pub fn events(tid: u32, slots: &[u8], out: &mut Vec<u8>) {
    let count = slots.len() / crate::slot::SLOT_LEN;
    let mut packed = vec![0u8; count * crate::compact::MAX_SLOT_BYTES];
    match crate::compact::encode(&[slots], &mut packed) {
        Some(n) => {
            let mut head = [0u8; 8];
            head[..4].copy_from_slice(&tid.to_le_bytes());
            head[4..].copy_from_slice(&(count as u32).to_le_bytes());
            sealed(tag::EVENTS, &[&head, &packed[..n]], out);
        }
        None => batch(tid, slots, out),
    }
}

pub fn exit(kind: ExitKind, out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    match kind {
        ExitKind::Code(c) => r.u8(0).i32(c),
        ExitKind::Signal(s) => r.u8(1).i32(s),
        ExitKind::Exec => r.u8(2).i32(0),
    };
    r.finish_into(tag::EXIT, out);
}

/// An epoch record's body (the preload seals it without allocating).
pub fn epoch_body(e: &crate::Epoch) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..4].copy_from_slice(&e.index.to_le_bytes());
    b[4..12].copy_from_slice(&e.time_ns.to_le_bytes());
    b[12..20].copy_from_slice(&e.seq.to_le_bytes());
    b[20..28].copy_from_slice(&e.rss.to_le_bytes());
    b
}

pub fn epoch(e: &crate::Epoch, out: &mut Vec<u8>) {
    sealed(tag::EPOCH, &[&epoch_body(e)], out);
}

/// A snapshot record's body: the boundary's index, then its name as a `string`; `buf` must
/// hold 8 bytes more than the name. Returns the body's length (no allocation, for the preload).
pub fn snapshot_body(epoch: u32, name: &[u8], buf: &mut [u8]) -> Option<usize> {
    let n = 8 + name.len();
    let b = buf.get_mut(..n)?;
    b[..4].copy_from_slice(&epoch.to_le_bytes());
    b[4..8].copy_from_slice(&(name.len() as u32).to_le_bytes());
    b[8..].copy_from_slice(name);
    Some(n)
}

pub fn snapshot(epoch: u32, name: &str, out: &mut Vec<u8>) {
    let mut buf = vec![0u8; 8 + name.len()];
    if let Some(n) = snapshot_body(epoch, name.as_bytes(), &mut buf) {
        sealed(tag::SNAPSHOT, &[&buf[..n]], out);
    }
}

pub fn stats(pairs: &[(u32, u64)], out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.u32(pairs.len() as u32);
    for (k, v) in pairs {
        r.u32(*k).u64(*v);
    }
    r.finish_into(tag::STATS, out);
}

/// The body of a `FORKED` record: the parent's pid and the sequence number of its fork point.
pub fn forked_body(parent: u32, seq: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&parent.to_le_bytes());
    b[4..].copy_from_slice(&seq.to_le_bytes());
    b
}

pub fn warning(text: &str, out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.bytes(text.as_bytes()).finish_into(tag::WARNING, out);
}

/// The body of a `TITLE` record: the command line's bytes as `/proc/self/cmdline` gives them.
/// Returns the body's length in `buf` (the command line is cut to fit).
pub fn title_body(cmdline: &[u8], buf: &mut [u8]) -> usize {
    let n = cmdline.len().min(buf.len().saturating_sub(4));
    buf[..4].copy_from_slice(&(n as u32).to_le_bytes());
    buf[4..4 + n].copy_from_slice(&cmdline[..n]);
    4 + n
}

/// A `FRAME_NAME` record: pseudo frame `addr` is `function` in `file` at `line` (0: unknown).
pub fn frame_name(addr: u64, line: u32, function: &[u8], file: &[u8], out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.u64(addr)
        .u32(line)
        .bytes(function)
        .bytes(file)
        .finish_into(tag::FRAME_NAME, out);
}

pub fn title(cmdline: &[u8], out: &mut Vec<u8>) {
    let mut r = RecordBuf::new();
    r.bytes(cmdline).finish_into(tag::TITLE, out);
}

/// An `END_NOTE` record (version 5, packed traces) of `kind` ([`crate::pack::END_TRUNCATED`],
/// [`crate::pack::END_CORRUPT`], [`crate::pack::END_WHOLE`]) with the reader's message.
pub fn end_note(kind: u8, message: &str, out: &mut Vec<u8>) {
    RecordBuf::new()
        .u8(kind)
        .bytes(message.as_bytes())
        .finish_into(tag::END_NOTE, out);
}
