//! What holds the blocks: from the heap graph of a scan, each block's shortest chain from a root
//! (aggregated per callsite into a few distinct paths) and each callsite's retained size (the
//! bytes its blocks keep alive: theirs and those they dominate). The scanner computes these
//! while it has the graph ([`items`]) and sends them in the scan's outcome; the report reads them
//! back ([`Retention`]) and names roots and hops with the symbolizer ([`crate::paths`]).

use leakhunt_format::reach::{Item, FROM_ROOT, NONE};
use leakhunt_reach::{Block, Graph, Parent};
use rustc_hash::FxHashMap;

/// Distinct paths kept per callsite and class (the most common; the rest are counted, not kept).
pub const PATHS_PER_SITE: usize = 16;
/// A `Site` item's node for the paths of a class not kept (plus the class: 0 from a root, 1 a
/// lost head, 2 held by lost blocks).
pub const REST: u32 = u32::MAX - 3;
/// A run of hops through blocks of one callsite at different offsets (a tree's).
pub const OFF_MIXED: u32 = u32::MAX;

/// A root word as the scanner classified it: the item that describes it and the key of the place
/// it stands for (root words with the same key are one root: a global's words, a frame's).
pub struct RootInfo {
    pub item: Item,
    pub key: (u8, u64, u64),
}

/// A path node while interning: (from, stack, offset, repeat) -> index. A run's offset is not
/// part of its key (its links may differ: a tree's two); see [`Nodes::widen`] for hops at many
/// offsets.
#[derive(Default)]
struct Nodes {
    list: Vec<Item>,
    index: FxHashMap<(u32, u32, u32, bool), u32>,
}

/// Distinct offsets of one hop (same path before it, same callsite) kept apart; more are one
/// hop at [`OFF_MIXED`] (an array's slots).
const MAX_OFFSETS: usize = 4;

impl Nodes {
    /// One more link of offset `off` in node `i` (mixed when offsets differ).
    fn link(&mut self, i: u32, off: u32) {
        if let Item::Node { off: o, .. } = &mut self.list[i as usize] {
            if *o != off {
                *o = OFF_MIXED;
            }
        }
    }

    fn intern(&mut self, from: u32, stack: u32, off: u32, repeat: bool) -> u32 {
        let key = (from, stack, if repeat { 0 } else { off }, repeat);
        if let Some(&i) = self.index.get(&key) {
            self.link(i, off);
            return i;
        }
        let i = self.list.len() as u32;
        self.list.push(Item::Node {
            from,
            stack,
            off,
            repeat,
        });
        self.index.insert(key, i);
        i
    }

    /// The same paths with hops at more than [`MAX_OFFSETS`] offsets after the same path
    /// through the same callsite made one, at [`OFF_MIXED`]: the new nodes, and the new index of
    /// each old node.
    fn widen(&self) -> (Nodes, Vec<u32>) {
        let mut offsets: FxHashMap<(u32, u32), Vec<u32>> = FxHashMap::default();
        for n in &self.list {
            if let Item::Node {
                from,
                stack,
                off,
                repeat: false,
            } = *n
            {
                let v = offsets.entry((from, stack)).or_default();
                if v.len() <= MAX_OFFSETS && !v.contains(&off) {
                    v.push(off);
                }
            }
        }
        let mut out = Nodes::default();
        let mut map = Vec::with_capacity(self.list.len());
        for n in &self.list {
            let Item::Node {
                from,
                stack,
                off,
                repeat,
            } = *n
            else {
                map.push(NONE);
                continue;
            };
            let wide = !repeat
                && offsets
                    .get(&(from, stack))
                    .is_some_and(|v| v.len() > MAX_OFFSETS);
            let new_from = if from == NONE || from & FROM_ROOT != 0 {
                from
            } else {
                map[from as usize]
            };
            let off = if wide { OFF_MIXED } else { off };
            map.push(out.intern(new_from, stack, off, repeat));
        }
        (out, map)
    }
}

/// The scanned blocks, each with its stack id, the stack id its callsite's retained size is
/// kept under (one per callsite), and the epoch boundary index before its allocation.
#[derive(Clone, Copy)]
pub struct Heap<'a> {
    pub blocks: &'a [Block],
    pub stack: &'a [u32],
    pub group: &'a [u32],
    pub born: &'a [u32],
}

/// The retention items of one scan: threads (given), the roots and path nodes that the kept
/// paths use, the kept paths per callsite, and each callsite's retained size.
///
/// `root_of` classifies a root word's address, `rank` orders root words (lowest first) for
/// chains of equal length.
pub fn items(
    heap: &Heap,
    graph: &Graph,
    threads: Vec<Item>,
    root_of: &mut dyn FnMut(u64) -> RootInfo,
    rank: &dyn Fn(u64) -> u8,
) -> Vec<Item> {
    let Heap {
        blocks,
        stack,
        group,
        born,
    } = *heap;
    let n = blocks.len();
    // Shortest chains from the best roots first: at equal length, a global's word wins over a
    // stale word below a stack pointer (stable: otherwise in scan order).
    let mut roots = graph.roots.clone();
    roots.sort_by_key(|r| rank(r.0));
    let (parent, order) = graph.parents_from(&roots);
    // Path of each block, in an order where parents come first.
    let mut roots: Vec<Item> = Vec::new();
    let mut root_index: FxHashMap<(u8, u64, u64), u32> = FxHashMap::default();
    let mut root_node: FxHashMap<u64, u32> = FxHashMap::default();
    let mut nodes = Nodes::default();
    let mut path = vec![NONE; n];
    for &b in &order {
        let bu = b as usize;
        path[bu] = match parent[bu] {
            Parent::Unset | Parent::Nothing => nodes.intern(NONE, NONE, 0, false),
            Parent::Root(at) => match root_node.get(&at) {
                Some(&node) => node,
                None => {
                    let info = root_of(at);
                    let r = *root_index.entry(info.key).or_insert_with(|| {
                        roots.push(info.item);
                        roots.len() as u32 - 1
                    });
                    let node = nodes.intern(FROM_ROOT | r, NONE, 0, false);
                    root_node.insert(at, node);
                    node
                }
            },
            Parent::Block(p, off) => {
                let pp = path[p as usize];
                let ps = stack[p as usize];
                if stack[bu] == ps {
                    // The block continues a structure of its parent's callsite (a list, a
                    // tree): one run of such hops, whatever its length.
                    match nodes.list[pp as usize] {
                        Item::Node {
                            stack: s,
                            repeat: true,
                            ..
                        } if s == ps => {
                            nodes.link(pp, off);
                            pp
                        }
                        _ => nodes.intern(pp, ps, off, true),
                    }
                } else {
                    nodes.intern(pp, ps, off, false)
                }
            }
        };
    }
    let (nodes, map) = nodes.widen();
    for p in path.iter_mut() {
        *p = map[*p as usize];
    }
    // Blocks and bytes per (callsite, path).
    let mut per: FxHashMap<(u32, u32), (u64, u64)> = FxHashMap::default();
    for i in 0..n {
        let e = per.entry((stack[i], path[i])).or_default();
        e.0 += 1;
        e.1 += blocks[i].size;
    }
    let mut sites: FxHashMap<u32, Vec<(u32, u64, u64)>> = FxHashMap::default();
    for ((s, node), (count, bytes)) in per {
        sites.entry(s).or_default().push((node, count, bytes));
    }
    // Each path's class (from a root; a lost head; held by lost blocks), from its first node.
    let mut class = vec![0u8; nodes.list.len()];
    for (i, item) in nodes.list.iter().enumerate() {
        if let Item::Node {
            from, stack: st, ..
        } = *item
        {
            class[i] = if from == NONE {
                if st == NONE {
                    1
                } else {
                    2
                }
            } else if from & FROM_ROOT != 0 || class[from as usize] == 0 {
                0
            } else {
                2
            };
        }
    }
    // The most common paths of each callsite in each class, the rest of the class counted; the
    // nodes they use.
    let mut keep = vec![false; nodes.list.len()];
    let mut kept: Vec<(u32, u32, u64, u64)> = Vec::new();
    let mut site_ids: Vec<u32> = sites.keys().copied().collect();
    site_ids.sort_unstable();
    for s in site_ids {
        let mut v = sites.remove(&s).unwrap_or_default();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut taken = [0usize; 3];
        let mut rest = [(0u64, 0u64); 3];
        for (node, count, bytes) in v {
            let c = class[node as usize] as usize;
            if taken[c] == PATHS_PER_SITE {
                rest[c].0 += count;
                rest[c].1 += bytes;
                continue;
            }
            taken[c] += 1;
            let mut at = node;
            while at != NONE && !keep[at as usize] {
                keep[at as usize] = true;
                at = match nodes.list[at as usize] {
                    Item::Node { from, .. } if from & FROM_ROOT == 0 => from,
                    _ => NONE,
                };
            }
            kept.push((s, node, count, bytes));
        }
        for (c, &(count, bytes)) in rest.iter().enumerate() {
            if count > 0 {
                kept.push((s, REST + c as u32, count, bytes));
            }
        }
    }
    // Renumber the kept nodes (a node's `from` stays before it) and the roots they use.
    let mut new_node = vec![NONE; nodes.list.len()];
    let mut new_root = vec![NONE; roots.len()];
    let mut out_roots: Vec<Item> = Vec::new();
    let mut out_nodes: Vec<Item> = Vec::new();
    for (i, item) in nodes.list.iter().enumerate() {
        if !keep[i] {
            continue;
        }
        let Item::Node {
            from,
            stack,
            off,
            repeat,
        } = *item
        else {
            continue;
        };
        let from = if from == NONE {
            NONE
        } else if from & FROM_ROOT != 0 {
            let r = (from & !FROM_ROOT) as usize;
            if new_root[r] == NONE {
                new_root[r] = out_roots.len() as u32;
                out_roots.push(roots[r]);
            }
            FROM_ROOT | new_root[r]
        } else {
            new_node[from as usize]
        };
        new_node[i] = out_nodes.len() as u32;
        out_nodes.push(Item::Node {
            from,
            stack,
            off,
            repeat,
        });
    }
    let mut out = threads;
    out.extend(out_roots);
    out.extend(out_nodes);
    out.extend(kept.into_iter().map(|(s, node, blocks, bytes)| Item::Site {
        stack: s,
        node: if node >= REST {
            node
        } else {
            new_node[node as usize]
        },
        blocks,
        bytes,
    }));
    out.extend(retained(blocks, group, born, graph, &parent));
    out
}

/// Each callsite's retained size: the dominator tree of the heap graph below one virtual root
/// that points at every root's blocks and at every block nothing points at; per callsite, the
/// subtrees of its blocks that no other of its blocks (born since) dominates, by birth (see
/// [`Item::Retained`]).
fn retained(
    blocks: &[Block],
    stack: &[u32],
    born: &[u32],
    graph: &Graph,
    parent: &[Parent],
) -> Vec<Item> {
    use leakhunt_reach::dominators::{self, ROOT};
    let n = blocks.len();
    let (offsets, targets) = graph.csr();
    let csr = dominators::Csr { offsets, targets };
    let mut heads: Vec<u32> = graph.roots.iter().map(|r| r.1).collect();
    heads.extend(
        parent
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Parent::Nothing))
            .map(|(i, _)| i as u32),
    );
    heads.sort_unstable();
    heads.dedup();
    let idom = dominators::dominators(&csr, &heads);
    // Children lists of the dominator tree (the virtual root's children: index n).
    let mut first = vec![0u32; n + 2];
    for &d in &idom {
        match d {
            d if (d as usize) < n => first[d as usize + 1] += 1,
            ROOT => first[n + 1] += 1,
            _ => {}
        }
    }
    for i in 1..first.len() {
        first[i] += first[i - 1];
    }
    let mut fill = first.clone();
    let mut kids = vec![0u32; first[n + 1] as usize];
    for (v, &d) in idom.iter().enumerate() {
        let slot = match d {
            d if (d as usize) < n => d as usize,
            ROOT => n,
            _ => continue,
        };
        kids[fill[slot] as usize] = v as u32;
        fill[slot] += 1;
    }
    // Callsites as dense groups; per group, the births of its blocks on the walk's path (each
    // the largest so far).
    let mut group_of: FxHashMap<u32, u32> = FxHashMap::default();
    let mut ids: Vec<u32> = Vec::new();
    let group: Vec<u32> = stack
        .iter()
        .map(|&s| {
            *group_of.entry(s).or_insert_with(|| {
                ids.push(s);
                ids.len() as u32 - 1
            })
        })
        .collect();
    let mut path_born: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
    let mut sub: Vec<(u64, u64)> = blocks.iter().map(|b| (b.size, 1)).collect();
    let mut out: FxHashMap<(u32, u32, u32), (u64, u64)> = FxHashMap::default();
    // Iterative walk: (node, next child index); the virtual root is n.
    let mut walk: Vec<(u32, u32)> = vec![(n as u32, first[n])];
    // First born of each entered node (the largest birth of its group's nodes above it, plus 1).
    let mut first_born = vec![0u32; n];
    while let Some(&mut (v, ref mut next)) = walk.last_mut() {
        let vu = v as usize;
        let end = first[vu + 1];
        if *next < end {
            let c = kids[*next as usize];
            *next += 1;
            let cu = c as usize;
            let g = group[cu] as usize;
            let above = path_born[g].last().copied();
            first_born[cu] = above.map_or(0, |b| b.saturating_add(1));
            path_born[g].push(above.map_or(born[cu], |b| b.max(born[cu])));
            walk.push((c, first[cu]));
            continue;
        }
        walk.pop();
        if vu == n {
            break;
        }
        let g = group[vu] as usize;
        path_born[g].pop();
        if first_born[vu] <= born[vu] {
            let e = out.entry((g as u32, first_born[vu], born[vu])).or_default();
            e.0 += sub[vu].0;
            e.1 += sub[vu].1;
        }
        let d = idom[vu];
        if (d as usize) < n {
            sub[d as usize].0 += sub[vu].0;
            sub[d as usize].1 += sub[vu].1;
        }
    }
    let mut items: Vec<Item> = out
        .into_iter()
        .map(|((g, first_born, born), (bytes, blocks))| Item::Retained {
            stack: ids[g as usize],
            first_born,
            born,
            bytes,
            blocks,
        })
        .collect();
    items.sort_unstable_by_key(|i| match *i {
        Item::Retained {
            stack,
            first_born,
            born,
            ..
        } => (stack, first_born, born),
        _ => (0, 0, 0),
    });
    items
}
