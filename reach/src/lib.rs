//! Which heap blocks something still points at: a conservative mark from the roots through the
//! live blocks, sorted into memcheck's four kinds (still reachable, possibly lost, indirectly
//! lost, definitely lost), with memcheck's default heuristics and its cliques.
//!
//! This crate is the graph and nothing else: where the blocks and roots come from (the traced
//! process at exit, a snapshot) and how memory is read are its callers' business, through
//! [`Memory`]. It allocates through `alloc` only (no `std`), so the preload can run it in the
//! traced process.
//!
//! The rules, as memcheck 3.19 applies them (its `mc_leakcheck.c`; the tests below pin each,
//! and the integration tests compare with memcheck itself):
//! - A word of memory points into block B when `B.start <= w < B.start + max(B.size, 1)`: the
//!   requested size, never the allocator's slack; a pointer one past the end points nowhere.
//!   `w == B.start` is a start pointer, anything else an interior pointer.
//! - Words are aligned, pointer-sized (8 bytes); a range's partial words at either end are not
//!   read.
//! - Pass 1, from the roots: a start pointer from a root or from a block that is not possibly
//!   lost makes B reachable; an interior pointer does too when one of the enabled
//!   [`Heuristics`] accepts it, and otherwise makes an unreached B possibly lost. Everything
//!   reached from a possibly lost block is at best possibly lost. A block is (re)scanned each time
//!   its kind improves.
//! - Pass 2, the cliques: in ascending address order, each block still unreached leads a clique:
//!   every unreached block it reaches (start or interior pointers alike, no heuristics) becomes
//!   indirectly lost, and its bytes, with the indirect bytes it had gathered as an earlier leader,
//!   are added to the leader's. So a leaked block is definitely lost exactly when no other leaked
//!   block points at it, except in a cycle nothing else points into, where the member with the
//!   lowest address is the definite one.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

/// Bytes per scanned word.
pub const WORD: u64 = 8;

/// How a block ended up, in memcheck's order (its loss records sort by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A start pointer (or an interior one a heuristic accepted) on a path from a root.
    Reachable = 0,
    /// Reached only through interior pointers, or from a possibly lost block.
    Possible = 1,
    /// Not reached from the roots, but from a definitely lost block.
    Indirect = 2,
    /// Nothing points at it any more (the head of a leaked structure).
    Definite = 3,
}

impl Kind {
    /// memcheck's words for it ("definitely lost" ...).
    pub fn memcheck_words(self) -> &'static str {
        match self {
            Kind::Reachable => "still reachable",
            Kind::Possible => "possibly lost",
            Kind::Indirect => "indirectly lost",
            Kind::Definite => "definitely lost",
        }
    }
}

/// One of memcheck's heuristics: an interior pointer of a known shape counts as a start pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Heuristic {
    /// The old (copy-on-write) libstdc++ string: length, capacity, refcount, then the characters,
    /// pointed at by the string object.
    StdString = 0,
    /// A block whose first word is its size less 8, pointed at just after it (sqlite).
    Length64 = 1,
    /// `new T[n]` of a type with a destructor: the element count, then the array.
    NewArray = 2,
    /// A secondary base class of an object that starts with a vtable pointer.
    MultipleInheritance = 3,
}

impl Heuristic {
    /// memcheck's order of trying them (the first that accepts wins).
    pub const ALL: [Heuristic; 4] = [
        Heuristic::StdString,
        Heuristic::Length64,
        Heuristic::NewArray,
        Heuristic::MultipleInheritance,
    ];

    /// memcheck's name (`--leak-check-heuristics`).
    pub fn name(self) -> &'static str {
        match self {
            Heuristic::StdString => "stdstring",
            Heuristic::Length64 => "length64",
            Heuristic::NewArray => "newarray",
            Heuristic::MultipleInheritance => "multipleinheritance",
        }
    }

    /// The heuristic named `name` (memcheck's spelling).
    pub fn from_name(name: &str) -> Option<Heuristic> {
        Heuristic::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// A set of heuristics (memcheck's default is all four).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Heuristics(u8);

impl Heuristics {
    pub const NONE: Heuristics = Heuristics(0);
    pub const ALL: Heuristics = Heuristics(0b1111);

    pub fn with(self, h: Heuristic) -> Heuristics {
        Heuristics(self.0 | 1 << h as u8)
    }

    pub fn contains(self, h: Heuristic) -> bool {
        self.0 & 1 << h as u8 != 0
    }

    /// Parses memcheck's `--leak-check-heuristics` value: `all`, `none`, or a comma-separated
    /// list of names. The error is the word it did not know.
    pub fn parse(s: &str) -> Result<Heuristics, &str> {
        let mut set = Heuristics::NONE;
        for w in s.split(',') {
            match w {
                "all" => set = Heuristics::ALL,
                "none" => {}
                w => set = set.with(Heuristic::from_name(w).ok_or(w)?),
            }
        }
        Ok(set)
    }
}

impl Default for Heuristics {
    fn default() -> Heuristics {
        Heuristics::ALL
    }
}

/// A mapping of the process, as far as the `multipleinheritance` heuristic asks: whether a value
/// looks like a vtable (in a file-backed readable mapping, whose words point into file-backed
/// executable ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub executable: bool,
    /// Backed by a file (a module's image), not anonymous memory.
    pub file: bool,
}

/// The memory the scan reads.
pub trait Memory {
    /// Fills `out` with the aligned words from `addr` on (`addr` is a multiple of [`WORD`]) and
    /// returns how many it could read; fewer than asked when the memory ends or cannot be read
    /// there (the scan then skips to the next page).
    fn read(&self, addr: u64, out: &mut [u64]) -> usize;

    /// As [`Memory::read`], for words read once and never again (a root range, scanned in
    /// order): a reader that caches what it reads may leave these out.
    fn read_once(&self, addr: u64, out: &mut [u64]) -> usize {
        self.read(addr, out)
    }

    /// The mapping that holds `addr`, if the caller knows it (only `multipleinheritance` asks).
    fn mapping(&self, addr: u64) -> Option<Mapping> {
        let _ = addr;
        None
    }
}

/// One live block: its start and its requested size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub start: u64,
    pub size: u64,
}

/// Where a block was first reached from, for retention paths: a root, another block, or nothing
/// (definitely lost blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Nothing,
    /// A root word at this address (a register: address 0).
    Root(u64),
    /// A word of this block (its index).
    Block(u32),
}

/// Word-reading chunk of the scan.
const CHUNK: usize = 512;
const PAGE: u64 = 4096;

/// A scan in progress: give it the roots ([`Scan::root_range`], [`Scan::root_word`]), then
/// [`Scan::finish`].
pub struct Scan<'b> {
    blocks: &'b [Block],
    /// Block starts (a copy, for a compact binary search).
    starts: Vec<u64>,
    /// The lowest start and the highest end of any block: a quick filter.
    low: u64,
    high: u64,
    heuristics: Heuristics,
    kind: Vec<Kind>,
    tag: Vec<Option<Heuristic>>,
    via: Vec<Via>,
    /// On the mark stack now (pushed once until popped).
    pending: Vec<bool>,
    stack: Vec<u32>,
    words: u64,
    /// The offset in a block of a given size where the allocator's own pointers land (see
    /// [`Scan::allocator_offset`]).
    allocator_offset: Option<fn(u64) -> Option<u64>>,
    /// The heap graph, when asked for ([`Scan::record_graph`]).
    graph: Option<Graph>,
}

/// The heap graph a scan saw: every pointer from a root or a block into a block (start or
/// interior pointer alike), each block's out-edges recorded once, when it was first scanned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    /// Per block: where its out-edges begin in `edges` and how many there are.
    pub span: Vec<(u32, u32)>,
    /// Out-edges: the target block and the offset of the pointer in the source block.
    pub edges: Vec<(u32, u32)>,
    /// Root words that point into a block: the word's address (0: a register) and the block,
    /// in the order the roots were given.
    pub roots: Vec<(u64, u32)>,
    /// Per block: its edges are recorded.
    scanned: Vec<bool>,
}

impl Graph {
    /// The out-edges of block `i` (target, offset).
    pub fn out(&self, i: u32) -> &[(u32, u32)] {
        let (s, n) = self.span[i as usize];
        let s = s as usize;
        &self.edges[s..(s + n as usize).min(self.edges.len())]
    }

    /// Compressed rows by source block (for the dominator tree): offsets and targets.
    pub fn csr(&self) -> (Vec<u32>, Vec<u32>) {
        let mut offsets = Vec::with_capacity(self.span.len() + 1);
        let mut targets = Vec::with_capacity(self.edges.len());
        offsets.push(0);
        for i in 0..self.span.len() {
            targets.extend(self.out(i as u32).iter().map(|e| e.0));
            offsets.push(targets.len() as u32);
        }
        (offsets, targets)
    }

    /// The shortest chain to each block: a breadth-first walk from the roots (in the order
    /// given), then from each block nothing reached (in address order: memcheck's clique
    /// leaders), which have no parent. Returns each block's parent and the order blocks were
    /// reached in (every parent before its children).
    pub fn parents(&self) -> (Vec<Parent>, Vec<u32>) {
        self.parents_from(&self.roots)
    }

    /// As [`Graph::parents`], from the root words in the order given (the caller's preference:
    /// a global's word before a stale one below a stack pointer, say).
    pub fn parents_from(&self, roots: &[(u64, u32)]) -> (Vec<Parent>, Vec<u32>) {
        let n = self.span.len();
        let mut parent = vec![Parent::Unset; n];
        let mut order: Vec<u32> = Vec::with_capacity(n);
        for &(at, b) in roots {
            if parent[b as usize] == Parent::Unset {
                parent[b as usize] = Parent::Root(at);
                order.push(b);
            }
        }
        let mut head = 0;
        self.walk(&mut parent, &mut order, &mut head);
        // What the roots do not reach: first the blocks no other block points at (the heads of
        // lost structures), then, for cycles nothing else points into, the lowest address.
        let mut pointed = vec![false; n];
        for (i, &(s, len)) in self.span.iter().enumerate() {
            for &(t, _) in
                &self.edges[s as usize..(s as usize + len as usize).min(self.edges.len())]
            {
                if t as usize != i {
                    pointed[t as usize] = true;
                }
            }
        }
        for pass in [false, true] {
            for i in 0..n {
                if parent[i] != Parent::Unset || (!pass && pointed[i]) {
                    continue;
                }
                parent[i] = Parent::Nothing;
                order.push(i as u32);
                self.walk(&mut parent, &mut order, &mut head);
            }
        }
        (parent, order)
    }

    /// The breadth-first walk from `order[*head..]` on.
    fn walk(&self, parent: &mut [Parent], order: &mut Vec<u32>, head: &mut usize) {
        while *head < order.len() {
            let i = order[*head];
            *head += 1;
            for &(t, off) in self.out(i) {
                if parent[t as usize] == Parent::Unset {
                    parent[t as usize] = Parent::Block(i, off);
                    order.push(t);
                }
            }
        }
    }
}

/// What a block's shortest chain comes from ([`Graph::parents`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parent {
    /// Not walked yet (never in a finished answer).
    Unset,
    /// Nothing points at it: the head of a lost structure.
    Nothing,
    /// A root word at this address (0: a register).
    Root(u64),
    /// The block of this index, by a pointer at this offset in it.
    Block(u32, u32),
}

/// A finished scan: per block (in the order given), its kind, the heuristic that last accepted
/// an interior pointer to it, what reached it first, and (definitely lost blocks) the bytes of
/// the blocks it alone reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: Vec<Kind>,
    pub heuristic: Vec<Option<Heuristic>>,
    pub via: Vec<Via>,
    pub indirect_bytes: Vec<u64>,
    /// Words read (roots and blocks).
    pub words_scanned: u64,
    /// The heap graph, when [`Scan::record_graph`] asked for it.
    pub graph: Option<Graph>,
}

/// The blocks were not sorted by start, or two overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsorted {
    /// The index of the first block out of order.
    pub at: usize,
}

impl<'b> Scan<'b> {
    /// A scan of `blocks`, sorted by start and not overlapping (a zero-size block counts as one
    /// byte); every block starts unreached.
    pub fn new(blocks: &'b [Block], heuristics: Heuristics) -> Result<Scan<'b>, Unsorted> {
        for (i, w) in blocks.windows(2).enumerate() {
            if w[1].start < w[0].start.saturating_add(w[0].size.max(1)) {
                return Err(Unsorted { at: i + 1 });
            }
        }
        let n = blocks.len();
        Ok(Scan {
            blocks,
            starts: blocks.iter().map(|b| b.start).collect(),
            low: blocks.first().map_or(u64::MAX, |b| b.start),
            high: blocks
                .last()
                .map_or(0, |b| b.start.saturating_add(b.size.max(1))),
            heuristics,
            kind: vec![Kind::Definite; n],
            tag: vec![None; n],
            via: vec![Via::Nothing; n],
            pending: vec![false; n],
            stack: Vec::new(),
            words: 0,
            allocator_offset: None,
            graph: None,
        })
    }

    /// Records the heap graph ([`Outcome::graph`]): about 8 bytes an edge and 8 a block more.
    pub fn record_graph(&mut self) {
        let n = self.blocks.len();
        self.graph = Some(Graph {
            span: vec![(0, 0); n],
            scanned: vec![false; n],
            ..Graph::default()
        });
    }

    /// Starts recording block `i`'s out-edges, unless they are recorded already: whether to.
    fn begin_edges(&mut self, i: u32) -> bool {
        match &mut self.graph {
            Some(g) if !g.scanned[i as usize] => {
                g.scanned[i as usize] = true;
                g.span[i as usize] = (g.edges.len() as u32, 0);
                true
            }
            _ => false,
        }
    }

    /// One edge of block `i` (being recorded) to block `t`, by the word at `at`. A graph past
    /// `u32` edges is dropped (`Outcome::graph` is then `None`): spans count in `u32`.
    fn edge(&mut self, i: u32, t: u32, at: u64) {
        let Some(g) = &mut self.graph else { return };
        if g.edges.len() >= u32::MAX as usize - 1 {
            self.graph = None;
            return;
        }
        // Offsets past 4 GiB - 2 read as that (u32::MAX is a reader's "several").
        let off = (at - self.blocks[i as usize].start).min(u32::MAX as u64 - 1) as u32;
        g.edges.push((t, off));
        g.span[i as usize].1 += 1;
    }

    /// Words that point at `f(size)` bytes into a block of `size` bytes are the allocator's, not
    /// the program's, and point nowhere. For glibc's malloc that is the header of the chunk
    /// after the block: its bins, its top chunk and the stale links left in reused memory
    /// point there, and it can lie inside the block's last word. memcheck, which replaces the
    /// allocator and knows which bytes were written, never sees such words.
    pub fn allocator_offset(&mut self, f: fn(u64) -> Option<u64>) {
        self.allocator_offset = Some(f);
    }

    /// The block `w` points into, unless it is the allocator's own pointer.
    fn target(&self, w: u64) -> Option<u32> {
        let i = self.find(w)?;
        let b = &self.blocks[i as usize];
        match self.allocator_offset.and_then(|f| f(b.size)) {
            Some(off) if w - b.start == off && off != 0 => None,
            _ => Some(i),
        }
    }

    /// The block `w` points into, if any (its index).
    pub fn block_of(&self, w: u64) -> Option<u32> {
        self.find(w)
    }

    /// The block `w` points into, if any.
    fn find(&self, w: u64) -> Option<u32> {
        if w < self.low || w >= self.high {
            return None;
        }
        let i = self.starts.partition_point(|&s| s <= w).checked_sub(1)?;
        let b = &self.blocks[i];
        (w < b.start + b.size.max(1)).then_some(i as u32)
    }

    /// A root range `[start, end)`: .data, .bss, a thread's live stack, an anonymous mapping.
    pub fn root_range(&mut self, mem: &dyn Memory, start: u64, end: u64) {
        self.scan_range(mem, start, end, true, |s, w, at| {
            s.mark(mem, w, true, Via::Root(at))
        });
    }

    /// A root word (a register's value).
    pub fn root_word(&mut self, mem: &dyn Memory, w: u64) {
        self.mark(mem, w, true, Via::Root(0));
    }

    /// A root word read at `at` by the caller (who filtered the range's words itself).
    pub fn root_word_at(&mut self, mem: &dyn Memory, w: u64, at: u64) {
        self.mark(mem, w, true, Via::Root(at));
    }

    /// Reads the aligned words of `[start, end)` (`once`: a root range, read once) and hands each
    /// to `f` with its address.
    fn scan_range(
        &mut self,
        mem: &dyn Memory,
        start: u64,
        end: u64,
        once: bool,
        mut f: impl FnMut(&mut Self, u64, u64),
    ) {
        let mut at = start.saturating_add(WORD - 1) & !(WORD - 1);
        let end = end & !(WORD - 1);
        let mut buf = [0u64; CHUNK];
        while at < end {
            let want = ((end - at) / WORD).min(CHUNK as u64) as usize;
            let got = if once {
                mem.read_once(at, &mut buf[..want])
            } else {
                mem.read(at, &mut buf[..want])
            }
            .min(want);
            self.words += got as u64;
            for (i, &w) in buf[..got].iter().enumerate() {
                f(self, w, at + i as u64 * WORD);
            }
            at += got as u64 * WORD;
            if got < want {
                // Unreadable here: on to the next page.
                at = (at / PAGE + 1).saturating_mul(PAGE);
            }
        }
    }

    /// Pass 1: the word `w` seen in a root (`definite`) or in a block.
    fn mark(&mut self, mem: &dyn Memory, w: u64, definite: bool, via: Via) {
        let Some(i) = self.target(w) else { return };
        let iu = i as usize;
        if let (Via::Root(at), Some(g)) = (via, &mut self.graph) {
            g.roots.push((at, i));
        }
        let b = self.blocks[iu];
        if self.kind[iu] == Kind::Reachable {
            if w == b.start {
                self.tag[iu] = None;
            }
            return;
        }
        let full = if w == b.start {
            true
        } else if self.heuristics != Heuristics::NONE {
            self.tag[iu] = self.heuristic(mem, b, w);
            self.tag[iu].is_some()
        } else {
            false
        };
        if full && definite {
            self.kind[iu] = Kind::Reachable;
            self.via[iu] = via;
            self.push(i);
        } else if self.kind[iu] == Kind::Definite {
            self.kind[iu] = Kind::Possible;
            self.via[iu] = via;
            self.push(i);
        }
    }

    fn push(&mut self, i: u32) {
        if !self.pending[i as usize] {
            self.pending[i as usize] = true;
            self.stack.push(i);
        }
    }

    fn word_at(mem: &dyn Memory, addr: u64) -> Option<u64> {
        let mut w = [0u64];
        (addr.is_multiple_of(WORD) && mem.read(addr, &mut w) == 1).then_some(w[0])
    }

    /// The first enabled heuristic that accepts interior pointer `w` into `b`.
    fn heuristic(&self, mem: &dyn Memory, b: Block, w: u64) -> Option<Heuristic> {
        let off = w - b.start;
        let first = || Self::word_at(mem, b.start);
        for h in Heuristic::ALL {
            if !self.heuristics.contains(h) {
                continue;
            }
            let ok = match h {
                Heuristic::StdString => {
                    off == 3 * WORD
                        && Self::word_at(mem, b.start + WORD).is_some_and(|cap| {
                            cap.checked_add(3 * WORD + 1) == Some(b.size)
                                && first().is_some_and(|len| len <= cap)
                        })
                }
                Heuristic::Length64 => {
                    off == WORD
                        && first().is_some_and(|n| n > 0 && b.size >= WORD && n == b.size - WORD)
                }
                Heuristic::NewArray => {
                    off == WORD
                        && first().is_some_and(|n| {
                            n > 0 && b.size >= WORD && (b.size - WORD).is_multiple_of(n)
                        })
                }
                Heuristic::MultipleInheritance => {
                    w.is_multiple_of(WORD)
                        && Self::word_at(mem, w)
                            .is_some_and(|inner| Self::looks_like_vtable(mem, inner))
                        && first().is_some_and(|f| Self::looks_like_vtable(mem, f))
                }
            };
            if ok {
                return Some(h);
            }
        }
        None
    }

    /// memcheck's vtable test: `v` is aligned, at least a page, in a file-backed readable
    /// mapping, and of its first 20 words the non-zero ones point into file-backed executable
    /// mappings, at least two of them.
    fn looks_like_vtable(mem: &dyn Memory, v: u64) -> bool {
        if !v.is_multiple_of(WORD) || v < PAGE {
            return false;
        }
        let Some(m) = mem.mapping(v) else {
            return false;
        };
        if !(m.file && m.readable) {
            return false;
        }
        let last = (v + 20 * WORD).min(m.end.saturating_sub(WORD));
        let mut found = 0;
        let mut at = v;
        while at < last {
            let Some(f) = Self::word_at(mem, at) else {
                return false;
            };
            if f != 0 {
                match mem.mapping(f) {
                    Some(c) if c.file && c.executable => found += 1,
                    _ => return false,
                }
                if found >= 2 {
                    return true;
                }
            }
            at += WORD;
        }
        false
    }

    /// Pass 1's flood: scans every pending block.
    fn flood(&mut self, mem: &dyn Memory) {
        while let Some(i) = self.stack.pop() {
            self.pending[i as usize] = false;
            let b = self.blocks[i as usize];
            let definite = self.kind[i as usize] != Kind::Possible;
            let record = self.begin_edges(i);
            self.scan_range(mem, b.start, b.start + b.size, false, |s, w, at| {
                if record {
                    if let Some(t) = s.target(w) {
                        s.edge(i, t, at);
                    }
                }
                s.mark(mem, w, definite, Via::Block(i));
            });
        }
    }

    /// Pass 2 from leader `lead`: every unreached block it reaches joins its clique.
    fn clique(&mut self, mem: &dyn Memory, lead: u32, indirect: &mut [u64]) {
        self.stack.push(lead);
        while let Some(i) = self.stack.pop() {
            let b = self.blocks[i as usize];
            let record = self.begin_edges(i);
            self.scan_range(mem, b.start, b.start + b.size, false, |s, w, at| {
                let Some(x) = s.target(w) else { return };
                if record {
                    s.edge(i, x, at);
                }
                let xu = x as usize;
                if x != lead && s.kind[xu] == Kind::Definite {
                    s.kind[xu] = Kind::Indirect;
                    s.via[xu] = Via::Block(i);
                    indirect[lead as usize] +=
                        s.blocks[xu].size + core::mem::take(&mut indirect[xu]);
                    s.stack.push(x);
                }
            });
        }
    }

    /// Floods from the roots given, then sorts the unreached into cliques.
    pub fn finish(mut self, mem: &dyn Memory) -> Outcome {
        self.flood(mem);
        let mut indirect = vec![0u64; self.blocks.len()];
        for i in 0..self.blocks.len() {
            if self.kind[i] == Kind::Definite {
                self.clique(mem, i as u32, &mut indirect);
            }
        }
        Outcome {
            kind: self.kind,
            heuristic: self.tag,
            via: self.via,
            indirect_bytes: indirect,
            words_scanned: self.words,
            graph: self.graph,
        }
    }
}

#[cfg(test)]
mod tests;

pub mod dominators;
