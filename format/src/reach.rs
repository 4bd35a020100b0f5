//! The heap scan at exit under `leakhunt run`.
//!
//! The process, at exit (after the program's destructors and libc's clean-up), flushes its
//! events, sends a [`tag::REACH`](crate::tag::REACH) record of phase [`ASK`] and waits for bytes
//! from the CLI on its trace socket:
//! - [`reply::DRAIN`]: the CLI has stopped the process's other threads; the process drains the
//!   rings once more (events those threads published meanwhile) and sends phase [`READY`];
//! - [`reply::RESULT`], a `u32` length and that many bytes: the payload of one
//!   [`tag::REACH_RESULT`](crate::tag::REACH_RESULT) record, which the process appends to its
//!   trace as it is (so that a kept trace reports what the live run did);
//! - [`reply::CONTINUE`]: the scan is over (or abandoned); the process goes on with its exit.
//!
//! The process also goes on when the connection closes.

use crate::encode::RecordBuf;

/// Phase of a `REACH` record: the process asks for a scan.
pub const ASK: u8 = 0;
/// Phase of a `REACH` record: the rings are drained, the process waits for the result.
pub const READY: u8 = 1;

/// Bytes the CLI sends the waiting process.
pub mod reply {
    pub const DRAIN: u8 = b'D';
    pub const RESULT: u8 = b'R';
    pub const CONTINUE: u8 = b'C';
}

/// Largest `REACH_RESULT` payload the CLI sends in one piece.
pub const MAX_CHUNK: usize = 1 << 20;

/// A `REACH` record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub phase: u8,
    /// A scan at a snapshot of the running process (its writer thread waits), not at its exit.
    pub snapshot: bool,
    /// The scan a thread asks for as the program starts to exit, before its exit handlers and
    /// destructors run (`pre-exit`; a snapshot scan without a snapshot of its own).
    pub pre_exit: bool,
    /// The thread that waits (it runs the exit; its stack is scanned from `sp`).
    pub tid: u32,
    /// Its stack pointer where the program's part of its stack ends (the tracer's own frames
    /// lie below).
    pub sp: u64,
    /// Threads of the tracer's own: neither their stacks nor their registers are roots.
    pub skip_tids: Vec<u32>,
    /// The tracer's own memory (rings, buffers, tables): never roots.
    pub skip_ranges: Vec<(u64, u64)>,
}

/// Most threads and ranges a request names.
pub const MAX_SKIPS: usize = 64;

/// Bytes of a request's body with `tids` threads and `ranges` ranges.
pub const fn request_len(tids: usize, ranges: usize) -> usize {
    24 + 4 * tids + 16 * ranges
}

/// Writes a `REACH` body into `buf` (no allocation: the process builds it at exit); `None` when
/// it does not fit.
pub fn request_body(r: &RequestRef, buf: &mut [u8]) -> Option<usize> {
    let n = request_len(r.skip_tids.len(), r.skip_ranges.len());
    let b = buf.get_mut(..n)?;
    b[0] = r.phase;
    b[1..4].fill(0);
    b[1] = r.snapshot as u8;
    b[2] = r.pre_exit as u8;
    b[4..8].copy_from_slice(&r.tid.to_le_bytes());
    b[8..16].copy_from_slice(&r.sp.to_le_bytes());
    b[16..20].copy_from_slice(&(r.skip_tids.len() as u32).to_le_bytes());
    b[20..24].copy_from_slice(&(r.skip_ranges.len() as u32).to_le_bytes());
    let mut at = 24;
    for t in r.skip_tids {
        b[at..at + 4].copy_from_slice(&t.to_le_bytes());
        at += 4;
    }
    for (s, e) in r.skip_ranges {
        b[at..at + 8].copy_from_slice(&s.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&e.to_le_bytes());
        at += 16;
    }
    Some(n)
}

/// A request by reference (what the process has at hand).
pub struct RequestRef<'a> {
    pub phase: u8,
    pub snapshot: bool,
    pub pre_exit: bool,
    pub tid: u32,
    pub sp: u64,
    pub skip_tids: &'a [u32],
    pub skip_ranges: &'a [(u64, u64)],
}

/// How one block came out of the scan (memcheck's numbering: 0 still reachable, 1 possibly
/// lost, 2 indirectly lost, 3 definitely lost).
pub type KindCode = u8;
/// No heuristic accepted a pointer to the block.
pub const NO_HEURISTIC: u8 = 0xff;

/// One block of a result: every scanned block that is not plainly reachable is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub kind: KindCode,
    /// The heuristic (0 stdstring, 1 length64, 2 newarray, 3 multipleinheritance) that last
    /// accepted an interior pointer to it, or [`NO_HEURISTIC`].
    pub heuristic: u8,
    /// For a definitely lost block: the bytes of the blocks it alone reaches.
    pub indirect: u64,
}

/// Bytes of one entry.
pub const ENTRY_LEN: usize = 18;

/// One `REACH_RESULT` record: a chunk of the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The last chunk.
    pub last: bool,
    /// The scan could not be made (`note` says why); nothing is classified.
    pub unavailable: bool,
    /// Blocks scanned (the live blocks when it ran), words read, threads held, for how long.
    pub blocks: u64,
    pub words: u64,
    pub threads: u32,
    pub held_us: u64,
    /// What the reader should know (why unavailable; what was approximate).
    pub note: String,
    pub entries: Vec<Entry>,
    /// What holds the blocks (retention paths, retained sizes), after the entries: a chunk may
    /// carry entries, items or both. A reader of an older trace sees none.
    pub items: Vec<Item>,
}

/// No node, root or stack.
pub const NONE: u32 = u32::MAX;
/// [`Item::Node`]'s `from` names a root (this bit and the root's index), not a node.
pub const FROM_ROOT: u32 = 1 << 31;

/// Where a root word lies ([`Item::Root`]).
pub mod root {
    /// A module's data (its writable segments, .bss included).
    pub const GLOBAL: u8 = 0;
    /// A thread's stack.
    pub const STACK: u8 = 1;
    /// A thread's static thread-local storage.
    pub const TLS: u8 = 2;
    /// A thread's registers.
    pub const REGISTER: u8 = 3;
    /// Other memory: an anonymous mapping of the program's.
    pub const OTHER: u8 = 4;
}

/// One piece of what holds the blocks, from the heap graph of the scan. Roots and nodes are
/// numbered in the order they come (over every chunk of one outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A thread held during the scan: its thread pointer, program counter and stack.
    Thread {
        tid: u32,
        tp: u64,
        pc: u64,
        lo: u64,
        hi: u64,
    },
    /// A root that paths begin at: one word's address standing for all the root words of the
    /// same place (a global's, a frame's). `tid`: the thread of a stack, TLS or register root;
    /// `module`: the module (its id in the trace) of a global or TLS root, or [`NONE`];
    /// `detail`: for a stack word, the return address into the function whose frame holds it
    /// (or the thread's pc for its innermost frame); for a TLS word, its offset in the module's
    /// TLS block.
    Root {
        kind: u8,
        addr: u64,
        tid: u32,
        module: u32,
        detail: u64,
    },
    /// A path so far: `from` (a node, or [`FROM_ROOT`] and a root, or [`NONE`]: nothing holds
    /// it), then, unless `stack` is [`NONE`], a pointer at `off` in a block allocated at stack
    /// `stack`; `repeat`: a run of such blocks, each holding the next (a list).
    Node {
        from: u32,
        stack: u32,
        off: u32,
        repeat: bool,
    },
    /// `blocks` blocks (`bytes` bytes) of callsite `stack` are held by the path of `node`.
    Site {
        stack: u32,
        node: u32,
        blocks: u64,
        bytes: u64,
    },
    /// What callsite `stack`'s blocks keep alive (theirs and those they dominate in the heap
    /// graph), as a sum over blocks: each of its blocks born at an epoch boundary index in
    /// `first_born..=born` (the boundary index before its allocation, as the live set keeps it)
    /// that no other block of the callsite born since `first_born` dominates. The callsite's
    /// blocks born at or after boundary index W retain the sum of the items with
    /// `first_born <= W <= born`; all of them (W = 0), those with `first_born == 0`.
    Retained {
        stack: u32,
        first_born: u32,
        born: u32,
        bytes: u64,
        blocks: u64,
    },
}

/// Bytes of the largest item.
pub const ITEM_MAX_LEN: usize = 37;
/// Bytes of the smallest item.
pub const ITEM_MIN_LEN: usize = 14;

impl Item {
    /// Appends the item's encoding.
    pub fn encode(&self, r: &mut RecordBuf) {
        match *self {
            Item::Thread {
                tid,
                tp,
                pc,
                lo,
                hi,
            } => {
                r.u8(1).u32(tid).u64(tp).u64(pc).u64(lo).u64(hi);
            }
            Item::Root {
                kind,
                addr,
                tid,
                module,
                detail,
            } => {
                r.u8(2).u8(kind).u64(addr).u32(tid).u32(module).u64(detail);
            }
            Item::Node {
                from,
                stack,
                off,
                repeat,
            } => {
                r.u8(3).u32(from).u32(stack).u32(off).u8(repeat as u8);
            }
            Item::Site {
                stack,
                node,
                blocks,
                bytes,
            } => {
                r.u8(4).u32(stack).u32(node).u64(blocks).u64(bytes);
            }
            Item::Retained {
                stack,
                first_born,
                born,
                bytes,
                blocks,
            } => {
                r.u8(5)
                    .u32(stack)
                    .u32(first_born)
                    .u32(born)
                    .u64(bytes)
                    .u64(blocks);
            }
        }
    }
}

const LAST: u32 = 1;
const UNAVAILABLE: u32 = 2;

/// The payload of a `REACH_RESULT` record.
pub fn outcome_body(o: &Outcome) -> Vec<u8> {
    let mut r = RecordBuf::new();
    r.u32(if o.last { LAST } else { 0 } | if o.unavailable { UNAVAILABLE } else { 0 })
        .u64(o.blocks)
        .u64(o.words)
        .u32(o.threads)
        .u64(o.held_us)
        .bytes(o.note.as_bytes())
        .u32(o.entries.len() as u32);
    for e in &o.entries {
        r.u64(e.addr).u8(e.kind).u8(e.heuristic).u64(e.indirect);
    }
    if !o.items.is_empty() {
        r.u32(o.items.len() as u32);
        for i in &o.items {
            i.encode(&mut r);
        }
    }
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Reader, Record};
    use crate::{encode, tag};

    fn read_back(rec: Vec<u8>) -> Record {
        let mut t = encode::preamble().to_vec();
        t.extend(rec);
        let mut r = Reader::new(&t[..]);
        r.next_record().unwrap().unwrap()
    }

    #[test]
    fn a_request_and_an_outcome_read_back() {
        let mut buf = [0u8; request_len(2, 1)];
        let n = request_body(
            &RequestRef {
                phase: ASK,
                snapshot: true,
                pre_exit: true,
                tid: 7,
                sp: 0x7ffd_0000,
                skip_tids: &[8, 9],
                skip_ranges: &[(0x1000, 0x2000)],
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(n, buf.len());
        let mut rec = Vec::new();
        encode::sealed(tag::REACH, &[&buf[..n]], &mut rec);
        assert_eq!(
            read_back(rec),
            Record::Reach(Request {
                phase: ASK,
                snapshot: true,
                pre_exit: true,
                tid: 7,
                sp: 0x7ffd_0000,
                skip_tids: vec![8, 9],
                skip_ranges: vec![(0x1000, 0x2000)],
            })
        );
        assert!(request_body(
            &RequestRef {
                phase: READY,
                snapshot: false,
                pre_exit: false,
                tid: 1,
                sp: 0,
                skip_tids: &[1],
                skip_ranges: &[]
            },
            &mut [0u8; 27]
        )
        .is_none());

        let o = Outcome {
            last: true,
            unavailable: false,
            blocks: 3,
            words: 100,
            threads: 2,
            held_us: 1500,
            note: "approximate".into(),
            entries: vec![
                Entry {
                    addr: 0x10,
                    kind: 3,
                    heuristic: NO_HEURISTIC,
                    indirect: 48,
                },
                Entry {
                    addr: 0x40,
                    kind: 0,
                    heuristic: 1,
                    indirect: 0,
                },
            ],
            items: vec![
                Item::Thread {
                    tid: 7,
                    tp: 0x7000,
                    pc: 0x401000,
                    lo: 0x6000,
                    hi: 0x8000,
                },
                Item::Root {
                    kind: root::STACK,
                    addr: 0x6ff0,
                    tid: 7,
                    module: NONE,
                    detail: 0x401234,
                },
                Item::Node {
                    from: FROM_ROOT,
                    stack: NONE,
                    off: 0,
                    repeat: false,
                },
                Item::Node {
                    from: 0,
                    stack: 3,
                    off: 16,
                    repeat: true,
                },
                Item::Site {
                    stack: 4,
                    node: 1,
                    blocks: 10,
                    bytes: 640,
                },
                Item::Retained {
                    stack: 4,
                    first_born: 0,
                    born: 3,
                    bytes: 900,
                    blocks: 12,
                },
            ],
        };
        let mut rec = Vec::new();
        encode::sealed(tag::REACH_RESULT, &[&outcome_body(&o)], &mut rec);
        assert_eq!(read_back(rec), Record::ReachResult(o));
    }

    #[test]
    fn bad_kinds_and_counts_are_corruption() {
        let o = Outcome {
            entries: vec![Entry {
                addr: 1,
                kind: 4,
                heuristic: NO_HEURISTIC,
                indirect: 0,
            }],
            ..Outcome::default()
        };
        let mut t = encode::preamble().to_vec();
        encode::sealed(tag::REACH_RESULT, &[&outcome_body(&o)], &mut t);
        let err = Reader::new(&t[..]).next_record().unwrap_err().to_string();
        assert!(err.contains("unknown kind 4"), "{err}");
        let mut body = [0u8; 24];
        body[16..20].copy_from_slice(&1000u32.to_le_bytes());
        let mut t = encode::preamble().to_vec();
        encode::sealed(tag::REACH, &[&body], &mut t);
        let err = Reader::new(&t[..]).next_record().unwrap_err().to_string();
        assert!(
            err.contains("1000 threads and 0 ranges exceed the record"),
            "{err}"
        );
    }
}
