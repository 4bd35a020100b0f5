//! Retention as the report shows it: a scan's retention items ([`crate::retain`]) read back into
//! an index, and one callsite's paths named: the root by its symbol and definition (a global, a
//! thread-local), thread and frame (a stack); each heap hop by its allocation stack, the offset
//! of the pointer in it and, where DWARF types say, the member at that offset.

use leakhunt_format::reach::{root, Item, FROM_ROOT, NONE};
use leakhunt_symbolizer::{Symbolizer, TypeRef};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::callsite::Callsites;
use crate::process::Process;
use crate::report::Frame;
use crate::retain::OFF_MIXED;

/// What holds a callsite's blocks, for the report.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Retention {
    /// The most common path: its root, its heap hops, and the share of the callsite's blocks
    /// (of the kind reported) on it.
    pub root: RootName,
    pub path: Vec<Hop>,
    pub share: f64,
    pub blocks: u64,
    pub bytes: u64,
    /// The other distinct paths, most blocks first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_paths: Vec<PathName>,
    /// What the callsite's blocks (of every kind) keep alive: theirs and the blocks only they
    /// reach (the dominator tree of the heap graph), at the scan.
    pub retained_bytes: u64,
    pub retained_blocks: u64,
    /// Which scan this comes from: `exit` or the snapshot's name.
    pub scan: String,
    /// For lost blocks: where their last holder was freed (`--orphans`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orphaned_at: Option<crate::orphans::Orphaned>,
    /// For lost blocks no freed block held (`--orphans`): how the last pointer went, and the
    /// frame that held them when a scan at a snapshot last saw them on a stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_how: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_in: Option<RootName>,
}

/// One path.
#[derive(Serialize, Clone, Debug, Default)]
pub struct PathName {
    pub root: RootName,
    pub path: Vec<Hop>,
    pub share: f64,
    pub blocks: u64,
    pub bytes: u64,
}

/// Where a path begins.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RootName {
    /// `global`, `stack`, `tls`, `register`, `other` or `none` (nothing holds the blocks).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The pointer's offset in the global or thread-local variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The member of the variable at that offset, where DWARF says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<u32>,
    /// A stack root's function (the frame that holds the pointer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<u64>,
}

/// One heap hop: a block of this allocation stack holding the pointer to the next at `offset`.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Hop {
    /// The frame of the hop's allocation stack that names its site (the program's first frame
    /// with source; the whole stack is its callsite's: `callsite`). Shared by every hop of that
    /// stack: a compiler's run names tens of thousands of paths.
    pub stack: std::sync::Arc<Vec<Frame>>,
    /// The hop's callsite id (`leakhunt paths TRACE --callsite ID`).
    pub callsite: u32,
    /// `None` for a run of hops at different offsets (a tree's links).
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// A run of such blocks, each holding the next (a list, a tree).
    pub repeated: bool,
    /// Hops left out just before this one: a path longer than [`MAX_HOPS`] keeps its first and
    /// last hops (a compiler's data structures chain hundreds of blocks of different sites).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Hops a path keeps: the first [`HEAD_HOPS`] (from the root) and the rest from the end.
pub const MAX_HOPS: usize = 12;
const HEAD_HOPS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Node {
    from: u32,
    stack: u32,
    off: u32,
    repeat: bool,
}

/// One scan's retention items, indexed.
#[derive(Default)]
pub struct Index {
    roots: Vec<Item>,
    nodes: Vec<Node>,
    /// Per stack id: (path node, blocks, bytes).
    sites: FxHashMap<u32, Vec<(u32, u64, u64)>>,
    /// Per stack id: (first born, born, bytes, blocks).
    retained: FxHashMap<u32, Vec<(u32, u32, u64, u64)>>,
    /// Per stack id: the size of its blocks when they all have one (a hop's block size).
    sizes: FxHashMap<u32, Option<u64>>,
    /// Which scan: `exit` or a snapshot's name.
    pub scan: String,
}

/// Which of a callsite's paths a record wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Every path (a growth entry).
    All,
    /// Paths from a root (still reachable, possibly lost).
    Held,
    /// Lost heads: nothing points at them (definitely lost).
    Heads,
    /// Lost, held by other lost blocks (indirectly lost).
    Indirect,
}

impl Index {
    pub fn new(items: &[Item], scan: &str) -> Option<Index> {
        let mut ix = Index {
            scan: scan.to_string(),
            ..Index::default()
        };
        for it in items {
            match *it {
                Item::Thread { .. } => {}
                Item::Root { .. } => ix.roots.push(*it),
                Item::Node {
                    from,
                    stack,
                    off,
                    repeat,
                } => ix.nodes.push(Node {
                    from,
                    stack,
                    off,
                    repeat,
                }),
                Item::Site {
                    stack,
                    node,
                    blocks,
                    bytes,
                } => ix
                    .sites
                    .entry(stack)
                    .or_default()
                    .push((node, blocks, bytes)),
                Item::Retained {
                    stack,
                    first_born,
                    born,
                    bytes,
                    blocks,
                } => ix
                    .retained
                    .entry(stack)
                    .or_default()
                    .push((first_born, born, bytes, blocks)),
            }
        }
        // Once per scan, not per callsite named (thousands of callsites in a compiler's run).
        ix.sizes = ix
            .sites
            .iter()
            .map(|(&s, v)| {
                let (b, y) = v.iter().fold((0u64, 0u64), |a, x| {
                    (a.0.saturating_add(x.1), a.1.saturating_add(x.2))
                });
                (s, (b > 0 && y % b == 0).then(|| y / b))
            })
            .collect();
        (!ix.sites.is_empty()).then_some(ix)
    }

    /// The stack ids the scan knows.
    pub fn stacks(&self) -> impl Iterator<Item = u32> + '_ {
        self.sites.keys().copied()
    }

    /// What the blocks of these stacks born at or after boundary index `since` retain.
    pub fn retained(&self, ids: &[u32], since: u32) -> (u64, u64) {
        let mut t = (0u64, 0u64);
        for id in ids {
            for &(first, born, bytes, blocks) in self.retained.get(id).into_iter().flatten() {
                if first <= since && since <= born {
                    t.0 = t.0.saturating_add(bytes);
                    t.1 = t.1.saturating_add(blocks);
                }
            }
        }
        t
    }

    /// The path of a node as (root item or none, hops innermost last).
    fn chain(&self, node: u32) -> (Option<Item>, Vec<Node>) {
        let mut hops = Vec::new();
        let mut at = node;
        let mut root = None;
        // Nodes only point back (bounded by their number, whatever a corrupt trace says).
        for _ in 0..=self.nodes.len() {
            let Some(n) = self.nodes.get(at as usize) else {
                break;
            };
            if n.stack != NONE {
                hops.push(*n);
            }
            if n.from == NONE {
                break;
            }
            if n.from & FROM_ROOT != 0 {
                root = self.roots.get((n.from & !FROM_ROOT) as usize).copied();
                break;
            }
            at = n.from;
        }
        hops.reverse();
        (root, hops)
    }

    /// Whether a node's path is one `want` asks for (a `REST` node: its class).
    fn wanted(&self, node: u32, want: Want) -> bool {
        let class = if node >= crate::retain::REST {
            node - crate::retain::REST
        } else {
            let (root, hops) = self.chain(node);
            match (root, hops.is_empty()) {
                (Some(_), _) => 0,
                (None, true) => 1,
                (None, false) => 2,
            }
        };
        match want {
            Want::All => true,
            Want::Held => class == 0,
            Want::Heads => class == 1,
            Want::Indirect => class == 2,
        }
    }

    /// The paths of these stacks' blocks, most blocks first: (node, blocks, bytes); and the
    /// blocks of every path wanted, those not kept included.
    fn paths(&self, ids: &[u32], want: Want) -> (Vec<(u32, u64, u64)>, u64) {
        let mut per: FxHashMap<u32, (u64, u64)> = FxHashMap::default();
        let mut total = 0u64;
        for id in ids {
            for &(node, blocks, bytes) in self.sites.get(id).into_iter().flatten() {
                if !self.wanted(node, want) {
                    continue;
                }
                total = total.saturating_add(blocks);
                if node >= crate::retain::REST {
                    continue;
                }
                let e = per.entry(node).or_default();
                e.0 = e.0.saturating_add(blocks);
                e.1 = e.1.saturating_add(bytes);
            }
        }
        let mut v: Vec<(u32, u64, u64)> = per.into_iter().map(|(n, (b, y))| (n, b, y)).collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        (v, total)
    }
}

/// Names roots and hops: the process's modules, its callsites, the symbolizer.
pub struct Namer<'a, 'p> {
    pub p: &'p Process,
    pub sites: &'a mut Callsites<'p>,
    pub sym: &'a mut Symbolizer,
    /// Hops' stacks by stack id, made once: a compiler's run names tens of thousands of paths
    /// through the same few thousand blocks' sites.
    pub hop_stacks: FxHashMap<u32, std::sync::Arc<Vec<Frame>>>,
}

impl Namer<'_, '_> {
    fn module(&self, id: u32) -> Option<&leakhunt_format::encode::Module> {
        self.p
            .modules
            .iter()
            .map(|m| &m.module)
            .rfind(|m| m.id == id)
    }

    fn build_id(&self, path: &str) -> Vec<u8> {
        self.p
            .modules
            .iter()
            .map(|m| &m.module)
            .find(|m| m.path == path)
            .map_or_else(Vec::new, |m| m.build_id.clone())
    }

    /// A root's name, and the type of what its pointer points at (when DWARF says).
    fn root(&mut self, item: Option<Item>) -> (RootName, Option<TypeRef>) {
        let Some(Item::Root {
            kind,
            addr,
            tid,
            module,
            detail,
        }) = item
        else {
            return (
                RootName {
                    kind: "none",
                    ..RootName::default()
                },
                None,
            );
        };
        match kind {
            root::GLOBAL | root::TLS => {
                let m = self.module(module).cloned();
                let mut name = RootName {
                    kind: if kind == root::GLOBAL {
                        "global"
                    } else {
                        "tls"
                    },
                    module: m.as_ref().map(|m| m.path.clone()),
                    thread: (kind == root::TLS).then_some(tid),
                    address: Some(addr),
                    ..RootName::default()
                };
                let Some(m) = m else {
                    return (name, None);
                };
                let found = if kind == root::GLOBAL {
                    self.sym
                        .global_at(&m.path, &m.build_id, addr.wrapping_sub(m.bias))
                } else {
                    self.sym.tls_at(&m.path, &m.build_id, detail)
                };
                let Some((var, off)) = found else {
                    return (name, None);
                };
                name.symbol = Some(var.name.clone());
                name.file = var.file.clone();
                name.line = var.line;
                name.offset = Some(off);
                let mut pointee = None;
                if let Some(ty) = &var.ty {
                    match self.sym.member_at(ty, off).filter(|m| !m.name.is_empty()) {
                        Some(mb) => {
                            // The root stands for every word of the variable: an array's index
                            // is the first word's only.
                            name.member = Some(any_index(&mb.name));
                            pointee = mb.pointee;
                        }
                        // The variable is itself a pointer.
                        None if off == 0 => pointee = self.sym.pointee(ty),
                        None => {}
                    }
                    if pointee.is_none() && off == 0 {
                        pointee = self.sym.pointee(ty);
                    }
                }
                (name, pointee)
            }
            root::STACK => {
                let mut name = RootName {
                    kind: "stack",
                    thread: Some(tid),
                    address: Some(addr),
                    ..RootName::default()
                };
                if let Some(m) = self.p.module_at(detail, u32::MAX) {
                    let (path, bid, bias) = (m.path.clone(), m.build_id.clone(), m.bias);
                    let frames =
                        self.sym
                            .symbolize(&path, &bid, detail.wrapping_sub(bias).wrapping_sub(1));
                    if let Some(f) = frames.last() {
                        name.function = f.function.clone();
                    }
                    name.module = Some(path);
                }
                (name, None)
            }
            root::REGISTER => (
                RootName {
                    kind: "register",
                    thread: (tid != 0).then_some(tid),
                    ..RootName::default()
                },
                None,
            ),
            _ => (
                RootName {
                    kind: "other",
                    address: Some(addr),
                    ..RootName::default()
                },
                None,
            ),
        }
    }

    /// The frames of a stack id.
    pub fn frames(&mut self, id: u32) -> Vec<Frame> {
        let site = self.sites.site(id);
        self.sites.frames(site, id, self.sym)
    }

    /// The type of a block from its allocation stack (the allocating function's pointer
    /// variables of that size), when DWARF says.
    fn block_type(&mut self, frames: &[Frame], size: Option<u64>) -> Option<TypeRef> {
        let size = size?;
        let f = frames.iter().find(|f| !f.inlined || f.module.is_some())?;
        let path = f.module.clone()?;
        let bid = self.build_id(&path);
        self.sym
            .block_type(&path, &bid, f.offset.saturating_sub(1), size)
    }

    /// What lies at `off` in a block of element type `t` (the block is one `t` or an array of
    /// them): the member's name and the type its pointer points at. `None` offset: a run of
    /// slots at different offsets (an array's elements).
    fn member_in_block(
        &mut self,
        t: &TypeRef,
        off: Option<u64>,
    ) -> (Option<String>, Option<TypeRef>) {
        if let Some(pointee) = self.sym.pointee(t) {
            // An array of pointers.
            return (
                Some(off.map_or_else(|| "[]".to_string(), |o| format!("[{}]", o / 8))),
                Some(pointee),
            );
        }
        let Some(off) = off else {
            return (None, None);
        };
        let size = self.sym.type_size(t).unwrap_or(0);
        let (idx, inner) = match off.checked_div(size) {
            Some(i) => (i, off % size),
            None => (0, off),
        };
        match self.sym.member_at(t, inner).filter(|m| !m.name.is_empty()) {
            Some(m) => {
                let name = if idx > 0 {
                    format!("[{idx}].{}", m.name)
                } else {
                    m.name
                };
                (Some(name), m.pointee)
            }
            None => (None, None),
        }
    }

    /// The member at `off` of a block of `size` bytes allocated at `frames`, where DWARF says.
    pub fn member_of(&mut self, frames: &[Frame], size: u64, off: u64) -> Option<String> {
        let t = self.block_type(frames, Some(size))?;
        self.member_in_block(&t, Some(off)).0
    }

    /// A path's name.
    fn path(
        &mut self,
        ix: &Index,
        node: u32,
        sizes: &FxHashMap<u32, Option<u64>>,
    ) -> (RootName, Vec<Hop>) {
        let (root_item, chain) = ix.chain(node);
        let (root, mut ty) = self.root(root_item);
        let mut hops = Vec::new();
        let mut prev: Option<(u32, Option<TypeRef>)> = None;
        let gap = chain.len().saturating_sub(MAX_HOPS);
        let mut skipped = 0u32;
        for (i, n) in chain.into_iter().enumerate() {
            if gap > 0 && (HEAD_HOPS..HEAD_HOPS + gap).contains(&i) {
                // Left out: what the next kept hop's type is comes from its own site.
                skipped += 1;
                ty = None;
                prev = None;
                continue;
            }
            let stack = match self.hop_stacks.get(&n.stack) {
                Some(s) => s.clone(),
                None => {
                    let all = self.frames(n.stack);
                    let site = crate::growth::first_own_source(&all)
                        .and_then(|f| all.iter().position(|g| std::ptr::eq(f, g)))
                        .unwrap_or(0);
                    let s: std::sync::Arc<Vec<Frame>> =
                        std::sync::Arc::new(all.into_iter().skip(site).take(1).collect());
                    self.hop_stacks.insert(n.stack, s.clone());
                    s
                }
            };
            // The block's type: its allocation site's when that has the block's size, else
            // what the pointer to it said (perhaps a base class), else (leaving a run of the
            // same callsite) the run's.
            let size = sizes.get(&n.stack).copied().flatten();
            let own = self
                .block_type(&stack, size)
                .filter(|t| self.sym.type_size(t).is_some() && self.sym.type_size(t) == size);
            let t = match (own, ty.take(), &prev) {
                (Some(t), _, _) => Some(t),
                (None, Some(t), _) => Some(t),
                (None, None, Some((s, t))) if *s == n.stack => t.clone(),
                _ => self.block_type(&stack, size),
            };
            let off = (n.off != OFF_MIXED).then_some(n.off as u64);
            let (member, next) = match &t {
                Some(t) => self.member_in_block(t, off),
                None => (None, None),
            };
            ty = if n.repeat { t.clone() } else { next };
            prev = Some((n.stack, t));
            hops.push(Hop {
                stack,
                callsite: n.stack,
                offset: off,
                member,
                repeated: n.repeat,
                skipped: std::mem::take(&mut skipped),
            });
        }
        (root, hops)
    }

    /// What holds the blocks of these stack ids (one callsite), `want`ed paths only; `None`
    /// when the scan saw none of them.
    pub fn retention(&mut self, ix: &Index, ids: &[u32], want: Want) -> Option<Retention> {
        let (paths, total) = ix.paths(ids, want);
        if paths.is_empty() || total == 0 {
            return None;
        }
        let mut named: Vec<PathName> = Vec::new();
        for &(node, blocks, bytes) in &paths {
            let (root, path) = self.path(ix, node, &ix.sizes);
            named.push(PathName {
                root,
                path,
                share: blocks as f64 / total as f64,
                blocks,
                bytes,
            });
        }
        let first = named.remove(0);
        let (retained_bytes, retained_blocks) = ix.retained(ids, 0);
        Some(Retention {
            root: first.root,
            path: first.path,
            share: first.share,
            blocks: first.blocks,
            bytes: first.bytes,
            other_paths: named,
            retained_bytes,
            retained_blocks,
            scan: ix.scan.clone(),
            orphaned_at: None,
            lost_how: None,
            last_seen_in: None,
        })
    }
}

/// A root as words: "global `g_registry` (registry.c:31), at offset 0x10 (`.buckets`)".
pub fn root_words(r: &RootName) -> String {
    let at = match (&r.file, r.line) {
        (Some(f), Some(l)) => format!(" ({}:{l})", short(f)),
        _ => String::new(),
    };
    let member = match (&r.member, r.offset) {
        (Some(m), _) => format!(", member `{m}`"),
        (None, Some(o)) if o > 0 => format!(", at offset {o:#x}"),
        _ => String::new(),
    };
    match r.kind {
        "global" => match &r.symbol {
            Some(s) => format!("global `{s}`{at}{member}"),
            None => format!(
                "a global of {}",
                r.module.as_deref().map_or("an unknown module", short)
            ),
        },
        "tls" => match &r.symbol {
            Some(s) => format!(
                "thread-local `{s}`{at}{member} of thread {}",
                r.thread.unwrap_or(0)
            ),
            None => format!("thread-local storage of thread {}", r.thread.unwrap_or(0)),
        },
        "stack" => format!(
            "the stack of thread {}, in the frame of {}",
            r.thread.unwrap_or(0),
            r.function.as_deref().unwrap_or("an unknown function")
        ),
        "register" => "a register of a thread".into(),
        "none" => "nothing (lost)".into(),
        _ => format!("memory outside the heap at {:#x}", r.address.unwrap_or(0)),
    }
}

/// An access path with each array index made `[]` ("slots[3].next" -> "slots[].next").
fn any_index(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// Which scan, in words: "heap scan at exit", "heap scan as the program began to exit",
/// "heap scan at snapshot NAME".
pub fn scan_words(scan: &str) -> String {
    match scan {
        "exit" => "heap scan at exit".into(),
        "pre-exit" => "heap scan as the program began to exit".into(),
        s => format!("heap scan at snapshot {s}"),
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A frame as words: "map_resize (map.c:88)", or its module and offset.
pub fn frame_words(f: &Frame) -> String {
    match (&f.function, &f.file, f.line) {
        (Some(func), Some(file), Some(l)) => format!("{func} ({}:{l})", short(file)),
        (Some(func), _, _) => func.clone(),
        _ => crate::report::render_frame(f),
    }
}

/// Where a stack's blocks are made, in words: its first frame with source.
pub fn site_words(stack: &[Frame]) -> String {
    crate::growth::first_own_source(stack)
        .or(stack.first())
        .map_or_else(|| "an unknown stack".into(), frame_words)
}

/// A hop as words: "a block from map_resize (map.c:88) at offset 0x10 (`buckets`)".
pub fn hop_words(h: &Hop) -> String {
    let f = site_words(&h.stack);
    let at = match (h.offset, &h.member) {
        (Some(o), Some(m)) => format!(" at offset {o:#x} (`{m}`)"),
        (Some(o), None) => format!(" at offset {o:#x}"),
        (None, Some(m)) if m == "[]" => " in its array's slots".into(),
        (None, Some(m)) => format!(" at various offsets (`{m}`)"),
        (None, None) => " at various offsets".into(),
    };
    if h.repeated {
        format!("a chain of blocks from {f}, each holding the next{at}")
    } else {
        format!("a block from {f}{at}")
    }
}

/// The hops as words, each on a line: a hop out of a chain of the same callsite reads as the
/// chain's last block.
pub fn hops_lines(path: &[Hop]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, h) in path.iter().enumerate() {
        if h.skipped > 0 {
            out.push(format!(
                "  -> ... {} more hop{} ...",
                crate::report::thousands(u64::from(h.skipped)),
                if h.skipped == 1 { "" } else { "s" }
            ));
        }
        let after_run = i > 0
            && h.skipped == 0
            && path[i - 1].repeated
            && !h.repeated
            && site_words(&path[i - 1].stack) == site_words(&h.stack);
        if after_run {
            let at = match (h.offset, &h.member) {
                (Some(o), Some(m)) => format!("at offset {o:#x} (`{m}`)"),
                (Some(o), None) => format!("at offset {o:#x}"),
                (None, _) => "at various offsets".into(),
            };
            out.push(format!("  -> the last of them holding it {at}"));
        } else {
            out.push(format!("  -> {}", hop_words(h)));
        }
    }
    out
}

/// A path's lines, indented: root, each hop, the share.
pub fn path_lines(root: &RootName, path: &[Hop], blocks: u64, share: f64) -> Vec<String> {
    let mut out = vec![format!(
        "{} of these blocks ({:.0}%) are held via {}",
        crate::report::thousands(blocks),
        share * 100.0,
        root_words(root)
    )];
    out.extend(hops_lines(path));
    out
}

/// The retention lines of a record or growth entry.
pub fn lines(r: &Retention) -> Vec<String> {
    let mut out = Vec::new();
    if r.root.kind == "none" && r.path.is_empty() {
        out.push(format!(
            "Nothing points at {} of these blocks any more{}",
            crate::report::thousands(r.blocks),
            if r.scan == "exit" { " (at exit)" } else { "" }
        ));
        if let Some(how) = &r.lost_how {
            out.push(format!("No freed block held them: {how}"));
        }
        if let Some(seen) = &r.last_seen_in {
            out.push(format!("A scan last saw them held by {}", root_words(seen)));
        }
    } else if r.root.kind == "none" {
        out.push(format!(
            "{} of these blocks ({:.0}%) are held only by lost blocks:",
            crate::report::thousands(r.blocks),
            r.share * 100.0
        ));
        out.extend(hops_lines(&r.path));
    } else {
        out.extend(path_lines(&r.root, &r.path, r.blocks, r.share));
    }
    if !r.other_paths.is_empty() {
        out.push(format!(
            "  ({} more path{})",
            r.other_paths.len(),
            if r.other_paths.len() == 1 { "" } else { "s" }
        ));
    }
    out.push(format!(
        "This callsite's blocks keep alive {} bytes in {} blocks (theirs and what only they reach)",
        crate::report::thousands(r.retained_bytes),
        crate::report::thousands(r.retained_blocks)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roots_member_drops_its_array_indexes() {
        assert_eq!(any_index("slots[3].next"), "slots[].next");
        assert_eq!(any_index("[0]"), "[]");
        assert_eq!(any_index("by_id._M_t"), "by_id._M_t");
    }
}
