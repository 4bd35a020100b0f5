//! Packed traces (FORMAT.md, "Packed traces"): what `leakhunt run -o` keeps and `leakhunt pack`
//! writes, and reading them back wherever a trace is read.
//!
//! The writer is an [`Observer`] of the reader: it sees the events in the order the reader
//! applied them (sequence order) and writes them as `ORDERED` records of
//! [`leakhunt_format::pack`], every other record as it came, each where it was applied, all
//! through zstd. Reading a packed trace applies the same events, records and end, so every
//! report of it is the report of the trace it was made from.

use std::io::{self, Read, Write};

use leakhunt_format::pack::{self, Packer};
use leakhunt_format::{encode, tag, DecodeError};
use rustc_hash::FxHashMap;

use crate::process::{Observer, Stack};

/// zstd's level for a packed trace's first frame, its first [`FIRST_BYTES`] or so: 6 (a short
/// trace is the smaller for it by a sixth, for a few milliseconds at most).
pub const FIRST_LEVEL: i32 = 6;
pub const FIRST_BYTES: u64 = 256 << 10;
/// zstd's level for the rest: 1, its fastest, so that `leakhunt run -o` of a long run costs
/// little more than `leakhunt run` (the models leave zstd little more to find: level 3 is 2%
/// smaller for a quarter more of the packing's time, 6 7% for four times it).
pub const LEVEL: i32 = 1;

/// An `ORDERED` record is closed at this many bytes (the model goes on across records).
/// (Larger records compress better: zstd sees each stream whole for longer; 4 MiB against 1:
/// 3% smaller.)
const RECORD_BYTES: usize = 4 << 20;

/// A reader of the trace in `src`, unpacking it if it is a packed trace.
pub fn reader<'a, R: Read + 'a>(
    src: R,
) -> Result<leakhunt_format::Reader<io::BufReader<Box<dyn Read + 'a>>>, DecodeError> {
    let (src, packed) = open(src)?;
    let mut r = leakhunt_format::Reader::new(io::BufReader::with_capacity(1 << 20, src));
    r.packed(packed);
    Ok(r)
}

/// The trace in `src`, unpacked if it is a packed trace (else as it is), and whether it was:
/// what [`leakhunt_format::Reader`] reads (told [`leakhunt_format::Reader::packed`]).
pub fn open<'a, R: Read + 'a>(mut src: R) -> Result<(Box<dyn Read + 'a>, bool), DecodeError> {
    let mut first = [0u8; pack::PREAMBLE_LEN];
    let mut got = 0;
    while got < first.len() {
        match src.read(&mut first[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(DecodeError::Io {
                    offset: got as u64,
                    error: e.to_string(),
                })
            }
        }
    }
    if got < 8 || first[..8] != pack::MAGIC {
        return Ok((
            Box::new(io::Cursor::new(first[..got].to_vec()).chain(src)),
            false,
        ));
    }
    if got < pack::PREAMBLE_LEN {
        return Err(DecodeError::Truncated {
            offset: got as u64,
            what: format!(
                "a packed trace's {}-byte preamble, found {got} bytes",
                pack::PREAMBLE_LEN
            ),
        });
    }
    let version = u32::from_le_bytes([first[8], first[9], first[10], first[11]]);
    if version == 0 || version > pack::VERSION {
        return Err(DecodeError::Corrupt {
            offset: 8,
            what: format!(
                "packed trace version {version} is not one this leakhunt reads (1 to {}): upgrade leakhunt",
                pack::VERSION
            ),
        });
    }
    let reserved = u32::from_le_bytes([first[12], first[13], first[14], first[15]]);
    if reserved != 0 {
        return Err(DecodeError::Corrupt {
            offset: 12,
            what: format!("packed trace: the reserved preamble word is {reserved:#x}, not 0"),
        });
    }
    let z = zstd::stream::read::Decoder::new(src).map_err(|e| DecodeError::Io {
        offset: pack::PREAMBLE_LEN as u64,
        error: e.to_string(),
    })?;
    Ok((Box::new(Unzstd { z }), true))
}

/// The zstd decoder, its errors told as a packed trace's.
struct Unzstd<R: io::BufRead> {
    z: zstd::stream::read::Decoder<'static, R>,
}

impl<R: io::BufRead> Read for Unzstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.z.read(buf).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the packed trace's compressed stream is damaged or cut short (zstd: {e})"),
            )
        })
    }
}

type Content = (u64, u32, Vec<(u64, u64)>);

/// What the reader applied, handed to the packing thread.
enum Msg {
    Alloc {
        seq: u64,
        addr: u64,
        size: u64,
        stack: u32,
        func: u8,
    },
    Free {
        seq: u64,
        addr: u64,
    },
    FreeContent {
        seq: u64,
        addr: u64,
        stack: u32,
        pairs: Vec<(u64, u64)>,
    },
    Nops {
        seq: u64,
        count: u64,
    },
    Fork {
        seq: u64,
        child: u32,
    },
    Pairs {
        seq: u64,
        stack: u32,
        count: u64,
        bytes: u64,
    },
    Stack {
        id: u32,
        gen: u32,
        reason: u8,
        frames: Vec<u64>,
    },
    Orphans,
    Record {
        tag: u16,
        raw: Vec<u8>,
    },
    End {
        truncated: Option<String>,
        error: Option<String>,
    },
}

/// Messages handed over at once (one channel operation each).
const BATCH: usize = 8192;
/// Batches the packing thread may have waiting before the reader waits for it.
const QUEUED: usize = 16;

/// Writes a packed trace of what the reader applies: an [`Observer`] that hands what it sees
/// to a thread of its own, which models, encodes and compresses it (the reader's thread, which
/// keeps pace with the traced program, does no more than copy each event once).
pub struct PackWriter {
    batch: Vec<Msg>,
    tx: Option<crossbeam_channel::Sender<Vec<Msg>>>,
    /// Batches the thread has emptied, to be filled again (a fresh one of this size would be
    /// fresh pages, zeroed by the kernel, every time).
    empty: crossbeam_channel::Receiver<Vec<Msg>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    /// `CONTENT` records staged per thread, and attached to their `FREE` by its number: the
    /// reader's own bookkeeping ([`crate::orphans::Orphans`]), mirrored.
    staged: FxHashMap<u32, Content>,
    attached: FxHashMap<u64, Content>,
    orphans: bool,
    /// A run of `NOP`s not yet handed over (first number, count): runs come one number at a
    /// time when threads' events interleave.
    nops: (u64, u64),
}

impl PackWriter {
    /// Starts packing into `w` (its preamble is written at once).
    pub fn new<W: Write + Send + 'static>(w: W) -> io::Result<PackWriter> {
        let mut sink = Sink::new(w)?;
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Msg>>(QUEUED);
        let (give, empty) = crossbeam_channel::bounded::<Vec<Msg>>(QUEUED + 2);
        let thread = std::thread::Builder::new()
            .name("leakhunt-pack".into())
            .spawn(move || {
                for mut batch in rx {
                    for m in batch.drain(..) {
                        if let Msg::End { truncated, error } = m {
                            return sink.end(truncated.as_deref(), error.as_deref());
                        }
                        sink.take(m);
                    }
                    let _ = give.try_send(batch);
                }
                Err(io::Error::other("the packed trace was not ended"))
            })?;
        Ok(PackWriter {
            batch: Vec::with_capacity(BATCH),
            tx: Some(tx),
            empty,
            thread: Some(thread),
            staged: FxHashMap::default(),
            attached: FxHashMap::default(),
            orphans: false,
            nops: (0, 0),
        })
    }

    #[inline]
    fn push(&mut self, m: Msg) {
        if self.nops.1 > 0 {
            let (seq, count) = std::mem::take(&mut self.nops);
            self.batch.push(Msg::Nops { seq, count });
        }
        self.batch.push(m);
        if self.batch.len() >= BATCH {
            self.send();
        }
    }

    fn send(&mut self) {
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let b = std::mem::replace(&mut self.batch, next);
        if let Some(tx) = &self.tx {
            if tx.send(b).is_err() {
                // The thread stopped (it failed to write): its error comes with `end`.
                self.tx = None;
            }
        }
    }
}

impl Observer for PackWriter {
    fn record(&mut self, tag: u16, raw: &[u8]) {
        self.push(Msg::Record {
            tag,
            raw: raw.to_vec(),
        });
    }

    #[inline]
    fn alloc(&mut self, seq: u64, addr: u64, size: u64, stack: u32, func: u8) {
        self.push(Msg::Alloc {
            seq,
            addr,
            size,
            stack,
            func,
        });
    }

    #[inline]
    fn free(&mut self, seq: u64, addr: u64) {
        if self.orphans {
            if let Some((a, stack, pairs)) = self.attached.remove(&seq) {
                if a == addr {
                    self.push(Msg::FreeContent {
                        seq,
                        addr,
                        stack,
                        pairs,
                    });
                    return;
                }
            }
        }
        self.push(Msg::Free { seq, addr });
    }

    #[inline]
    fn nops(&mut self, seq: u64, count: u64) {
        let (first, n) = self.nops;
        if n > 0 && first.wrapping_add(n) == seq {
            self.nops.1 += count;
        } else {
            if n > 0 {
                self.batch.push(Msg::Nops {
                    seq: first,
                    count: n,
                });
            }
            self.nops = (seq, count);
        }
    }

    fn fork(&mut self, seq: u64, child: u32) {
        self.push(Msg::Fork { seq, child });
    }

    fn pairs(&mut self, seq: u64, stack: u32, count: u64, bytes: u64) {
        self.push(Msg::Pairs {
            seq,
            stack,
            count,
            bytes,
        });
    }

    fn stack(&mut self, id: u32, s: &Stack) {
        self.push(Msg::Stack {
            id,
            gen: s.gen,
            reason: s.reason as u8,
            frames: s.frames.clone(),
        });
    }

    fn content(&mut self, tid: u32, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) {
        if !self.orphans {
            // The reader keeps what frees held from its first CONTENT on.
            self.orphans = true;
            self.push(Msg::Orphans);
        }
        self.staged.insert(tid, (addr, free_stack, pairs.to_vec()));
    }

    #[inline]
    fn attach(&mut self, tid: u32, seq: u64, addr: u64) {
        if !self.orphans {
            return;
        }
        if let Some(c) = self.staged.remove(&tid) {
            if c.0 == addr {
                self.attached.insert(seq, c);
            }
        }
    }

    fn end(&mut self, truncated: Option<&str>, error: Option<&str>) -> io::Result<()> {
        self.push(Msg::End {
            truncated: truncated.map(str::to_string),
            error: error.map(str::to_string),
        });
        self.send();
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the packing thread panicked"))),
            None => Err(io::Error::other("the packed trace was already ended")),
        }
    }
}

/// The packing thread's side: the model, the encoder and zstd.
struct Sink<W: Write> {
    packer: Packer,
    z: Option<zstd::stream::write::Encoder<'static, W>>,
    out: Vec<u8>,
    /// An `EXIT` record not yet written: events the reader applies after it (at the end, past
    /// lost numbers) belong before it (after it they would say an exec failed).
    held_exit: Option<Vec<u8>>,
    failed: Option<io::Error>,
    /// Bytes handed to zstd so far (its level drops past [`FIRST_BYTES`]).
    fed: u64,
}

/// A zstd frame of `level` with its checksum, written into `w`.
fn new_frame<W: Write>(w: W, level: i32) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut z = zstd::stream::write::Encoder::new(w, level)?;
    z.include_checksum(true)?;
    Ok(z)
}

impl<W: Write> Sink<W> {
    fn new(mut w: W) -> io::Result<Sink<W>> {
        w.write_all(&pack::preamble())?;
        let z = new_frame(w, FIRST_LEVEL)?;
        let mut out = Vec::with_capacity(FIRST_BYTES as usize + (64 << 10));
        out.extend_from_slice(&pack::stream_preamble());
        Ok(Sink {
            packer: Packer::new(),
            z: Some(z),
            out,
            held_exit: None,
            failed: None,
            fed: 0,
        })
    }

    fn write_out(&mut self) {
        if let Some(z) = &mut self.z {
            let before = self.fed;
            self.fed += self.out.len() as u64;
            let mut r = z.write_all(&self.out);
            if r.is_ok() && before < FIRST_BYTES && self.fed >= FIRST_BYTES {
                // The rest in a frame of the faster level (zstd keeps a frame's level).
                r = match self.z.take().map(|z| z.finish()) {
                    Some(Ok(w)) => new_frame(w, LEVEL).map(|z| self.z = Some(z)),
                    Some(Err(e)) => Err(e),
                    None => Ok(()),
                };
            }
            if let Err(e) = r {
                self.failed = Some(e);
                self.z = None;
            }
        }
        self.out.clear();
    }

    /// Closes the record of events being built.
    fn flush_events(&mut self) {
        self.packer.flush(&mut self.out);
        if let Some(exit) = self.held_exit.take() {
            self.out.extend_from_slice(&exit);
        }
        self.write_out();
    }

    #[inline]
    fn check_size(&mut self) {
        // The first frame's records end at its size.
        let limit = if self.fed < FIRST_BYTES {
            FIRST_BYTES as usize
        } else {
            RECORD_BYTES
        };
        if self.packer.pending_bytes() >= limit {
            self.packer.flush(&mut self.out);
            self.write_out();
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Alloc {
                seq,
                addr,
                size,
                stack,
                func,
            } => self.packer.alloc(seq, addr, size, stack, func),
            Msg::Free { seq, addr } => self.packer.free(seq, addr, None),
            Msg::FreeContent {
                seq,
                addr,
                stack,
                pairs,
            } => self.packer.free(seq, addr, Some((stack, &pairs))),
            Msg::Nops { seq, count } => self.packer.nops(seq, count),
            Msg::Fork { seq, child } => self.packer.fork(seq, child),
            Msg::Pairs {
                seq,
                stack,
                count,
                bytes,
            } => self.packer.pairs(seq, stack, count, bytes),
            Msg::Stack {
                id,
                gen,
                reason,
                frames,
            } => self.packer.stack(id, gen, reason, &frames),
            Msg::Orphans => self.packer.orphans(),
            Msg::Record { tag: t, raw } => self.record(t, raw),
            Msg::End { .. } => {}
        }
        self.check_size();
    }

    fn record(&mut self, t: u16, raw: Vec<u8>) {
        match t {
            tag::BATCH | tag::EVENTS | tag::ORDERED | tag::END_NOTE => {
                // Events are told as the reader applies them; an end note is this writer's.
                if self.held_exit.is_some() {
                    // More events after an exec's EXIT: the exec failed, as the reader will see.
                    self.flush_events();
                }
            }
            _ => {
                self.flush_events();
                if t == tag::EXIT {
                    self.held_exit = Some(raw);
                } else {
                    self.out.extend_from_slice(&raw);
                    self.write_out();
                }
            }
        }
    }

    /// Ends the packed trace: the stream it was made from was cut short (`truncated`, the
    /// reader's message) or stopped at a decode error (`error`).
    fn end(&mut self, truncated: Option<&str>, error: Option<&str>) -> io::Result<()> {
        self.flush_events();
        if let Some(t) = truncated {
            encode::end_note(pack::END_TRUNCATED, t, &mut self.out);
        }
        if let Some(e) = error {
            encode::end_note(pack::END_CORRUPT, e, &mut self.out);
        }
        // The last record: a trace without it was cut short (between zstd's frames, say).
        encode::end_note(pack::END_WHOLE, "", &mut self.out);
        self.write_out();
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.z.take() {
            Some(z) => z.finish().and_then(|mut w| w.flush()),
            None => Err(io::Error::other("the packed trace was already ended")),
        }
    }
}
