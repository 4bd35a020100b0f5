//! Dominators of the heap graph, and the bytes each block (or each group of blocks, a callsite's)
//! keeps alive: what freeing it, and dropping every pointer to it, would release.
//!
//! The graph has one virtual root whose successors are the scan's roots; block `d` dominates
//! block `v` when every path from the virtual root to `v` passes through `d`. The immediate
//! dominators form a tree, and a block's retained size is the size of its subtree.
//!
//! Everything here is iterative and works in a few `u32` arrays of the node count: heap graphs
//! hold linked lists of millions of blocks, deeper than any call stack.

use alloc::vec;
use alloc::vec::Vec;

/// `idom[v]` of a node that only the virtual root dominates (a root, or a node reached along
/// disjoint paths from two roots).
pub const ROOT: u32 = u32::MAX - 1;
/// `idom[v]` of a node the virtual root does not reach.
pub const UNREACHED: u32 = u32::MAX;

/// No node (empty bucket, unvisited).
const NONE: u32 = u32::MAX;

/// A directed graph in compressed sparse row form over nodes `0..n`: the successors of `v` are
/// `targets[offsets[v]..offsets[v + 1]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Csr {
    /// `n + 1` entries, non-decreasing, `offsets[0] == 0`, `offsets[n] == targets.len()`.
    pub offsets: Vec<u32>,
    /// The successors of every node, node after node; each `< n`.
    pub targets: Vec<u32>,
}

impl Csr {
    /// The graph on nodes `0..n` with the edges `(from, to)`, in any order. Duplicate edges and
    /// self-loops are kept (they change no dominator); each node's successors keep the order of
    /// `edges`.
    ///
    /// # Panics
    /// When an endpoint is `>= n`, when `n >= ROOT`, or when there are `u32::MAX` edges or more.
    pub fn from_edges(n: usize, edges: &[(u32, u32)]) -> Csr {
        assert!(n < ROOT as usize, "too many nodes");
        assert!(edges.len() < u32::MAX as usize, "too many edges");
        // Count each node's edges at its own index, make that the end of its range, then place
        // the edges backwards, moving each start down to where it belongs.
        let mut offsets = vec![0u32; n + 1];
        for &(from, to) in edges {
            assert!(
                (from as usize) < n && (to as usize) < n,
                "edge out of range"
            );
            offsets[from as usize] += 1;
        }
        for i in 1..n {
            offsets[i] += offsets[i - 1];
        }
        offsets[n] = edges.len() as u32;
        let mut targets = vec![0u32; edges.len()];
        for &(from, to) in edges.iter().rev() {
            offsets[from as usize] -= 1;
            targets[offsets[from as usize] as usize] = to;
        }
        Csr { offsets, targets }
    }

    /// The number of nodes.
    pub fn nodes(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The successors of `v`.
    pub fn successors(&self, v: u32) -> &[u32] {
        let v = v as usize;
        &self.targets[self.offsets[v] as usize..self.offsets[v + 1] as usize]
    }
}

/// The immediate dominator of every node of `g`, from a virtual root whose successors are
/// `roots` (duplicates allowed): `idom[v]` is a node, [`ROOT`] when only the virtual root
/// dominates `v`, [`UNREACHED`] when the virtual root does not reach `v`.
///
/// Lengauer and Tarjan's algorithm, its simple version (path compression without balancing):
/// O(m log n) time for m edges. Memory, in `u32` words: 1 a node and 8 a reached node, 2 an
/// edge (its target's search number, then the reversed edges), and the search's path, 3 a node
/// on it. No recursion: the depth-first search and path compression keep their paths in `Vec`s.
///
/// # Panics
/// When a root is `>= g.nodes()`, or `g` is malformed.
pub fn dominators(g: &Csr, roots: &[u32]) -> Vec<u32> {
    let n = g.nodes();
    assert!(n < ROOT as usize, "too many nodes");
    assert!(roots.len() < u32::MAX as usize, "too many roots");

    // Depth-first search from the virtual root, numbered 0; the others are numbered 1.. in
    // preorder, and everything below works in those numbers. `dfnum` maps a node to its number,
    // `vertex` back; `parent` is the search tree. The search's path is on `path`: each node's
    // number and its unexplored edges, indices into `g.targets`. Each edge the search examines
    // leaves its target's number in `tpre`, at the edge's index; the edges of nodes it misses
    // are never examined, nor needed.
    let mut dfnum = vec![NONE; n];
    let mut vertex: Vec<u32> = Vec::with_capacity(n + 1);
    let mut parent: Vec<u32> = Vec::with_capacity(n + 1);
    let mut tpre = vec![0u32; g.targets.len()];
    let mut path: Vec<(u32, u32, u32)> = Vec::new();
    vertex.push(NONE);
    parent.push(0);
    for &r in roots {
        if dfnum[r as usize] != NONE {
            continue;
        }
        let mut next = r;
        let mut from = 0;
        loop {
            let num = vertex.len() as u32;
            dfnum[next as usize] = num;
            vertex.push(next);
            parent.push(from);
            path.push((num, g.offsets[next as usize], g.offsets[next as usize + 1]));
            // Back up the path to a node with an edge to an unvisited node.
            while let Some(&mut (num, ref mut e, end)) = path.last_mut() {
                next = NONE;
                while *e < end {
                    let t = g.targets[*e as usize];
                    let d = dfnum[t as usize];
                    if d == NONE {
                        // The number it gets, above.
                        tpre[*e as usize] = vertex.len() as u32;
                        *e += 1;
                        next = t;
                        break;
                    }
                    tpre[*e as usize] = d;
                    *e += 1;
                }
                if next != NONE {
                    from = num;
                    break;
                }
                path.pop();
            }
            if next == NONE {
                break;
            }
        }
    }
    drop(path);
    let nn = vertex.len();

    // The reached nodes' predecessors, in search numbers: each node's count made the end of its
    // range, then the edges placed backwards.
    let mut pred_off = vec![0u32; nn + 1];
    for (v, &s) in dfnum.iter().enumerate() {
        if s != NONE {
            for &j in &tpre[g.offsets[v] as usize..g.offsets[v + 1] as usize] {
                pred_off[j as usize] += 1;
            }
        }
    }
    for i in 1..nn {
        pred_off[i] += pred_off[i - 1];
    }
    pred_off[nn] = pred_off[nn - 1];
    let mut preds = vec![0u32; pred_off[nn] as usize];
    for (v, &s) in dfnum.iter().enumerate() {
        if s == NONE {
            continue;
        }
        let edges = g.offsets[v] as usize..g.offsets[v + 1] as usize;
        for &j in &tpre[edges] {
            pred_off[j as usize] -= 1;
            preds[pred_off[j as usize] as usize] = s;
        }
    }
    drop(tpre);

    // Semidominators, in decreasing preorder. A node is linked into the forest of `eval` once
    // processed, to its search parent: so a node is linked exactly when its number is at least
    // the bound `eval` is given, and the parent can start as its ancestor there. `lab`: the
    // label (node of least semidominator on the compressed forest path) and its semidominator.
    let mut ancestor = parent;
    let mut lab: Vec<(u32, u32)> = (0..nn as u32).map(|i| (i, i)).collect();
    let mut semi: Vec<u32> = (0..nn as u32).collect();
    // The virtual root's edges: it is every root's semidominator (and no node's pred list holds
    // it). `eval` reads only processed nodes' `lab`, and the loop below reads an unprocessed
    // predecessor's number, not its `semi`: so setting them early is safe.
    for &r in roots {
        let d = dfnum[r as usize] as usize;
        semi[d] = 0;
        lab[d].1 = 0;
    }
    // Each processed node waits in the bucket of its semidominator until that node's tree child
    // on its path is processed; the bucket's chain link and the result share one array, since a
    // node leaves its bucket exactly when its (provisional) dominator is set.
    let mut bucket = vec![NONE; nn];
    let mut idom = vec![NONE; nn];
    let mut stack = Vec::new();
    for w in (1..nn).rev() {
        let w32 = w as u32;
        let mut s = semi[w];
        for &v in &preds[pred_off[w] as usize..pred_off[w + 1] as usize] {
            // An unprocessed predecessor (an ancestor, or a node of an earlier branch) offers
            // its own number; a processed one the least semidominator on its forest path.
            let c = if v <= w32 {
                v
            } else {
                eval(v, w32 + 1, &mut ancestor, &mut lab, &mut stack).1
            };
            s = s.min(c);
        }
        semi[w] = s;
        lab[w].1 = s;
        let p = ancestor[w];
        if s == p {
            // The common case, a parent that is the semidominator: it is the dominator too
            // (what the bucket would say at once, below).
            idom[w] = p;
        } else {
            idom[w] = bucket[s as usize];
            bucket[s as usize] = w32;
        }
        // link(parent(w), w) is implicit: the ancestor already is the parent, and w now counts
        // as linked.
        let mut v = bucket[p as usize];
        bucket[p as usize] = NONE;
        while v != NONE {
            let next = idom[v as usize];
            let (u, best) = eval(v, w32, &mut ancestor, &mut lab, &mut stack);
            idom[v as usize] = if best < semi[v as usize] { u } else { p };
            v = next;
        }
    }
    drop(preds);
    drop(pred_off);
    for w in 1..nn {
        if idom[w] != semi[w] {
            idom[w] = idom[idom[w] as usize];
        }
    }

    // Back to node ids; `dfnum` already says UNREACHED of every node the search missed.
    let mut out = dfnum;
    for w in 1..nn {
        let d = idom[w];
        out[vertex[w] as usize] = if d == 0 { ROOT } else { vertex[d as usize] };
    }
    out
}

/// Lengauer–Tarjan's `eval`: the node of least semidominator on the forest path from `v` up to,
/// excluding, its tree's root, with that semidominator; compressing that path. Nodes numbered
/// `>= linked` are in the forest; the others are roots of it.
fn eval(
    v: u32,
    linked: u32,
    ancestor: &mut [u32],
    lab: &mut [(u32, u32)],
    stack: &mut Vec<u32>,
) -> (u32, u32) {
    if v < linked {
        return lab[v as usize];
    }
    // compress(v), with the recursion's path on `stack`: every node whose ancestor is itself
    // linked; then from the top down, each takes its ancestor's label when that is smaller, and
    // skips to its ancestor's (already compressed) ancestor.
    let mut x = v;
    loop {
        let a = ancestor[x as usize];
        if a < linked {
            break;
        }
        stack.push(x);
        x = a;
    }
    while let Some(y) = stack.pop() {
        let a = ancestor[y as usize] as usize;
        let up = lab[a];
        if up.1 < lab[y as usize].1 {
            lab[y as usize] = up;
        }
        ancestor[y as usize] = ancestor[a];
    }
    lab[v as usize]
}

/// The dominator tree of `idom` as first-child and next-sibling links, the virtual root at index
/// `n`, and a depth-first walk of it calling `visit(v, true)` on entering `v` and
/// `visit(v, false)` on leaving it, parents around children. Nodes that are UNREACHED, or under
/// one, are not visited.
fn walk(idom: &[u32], mut visit: impl FnMut(u32, bool)) {
    let n = idom.len();
    assert!(n < ROOT as usize, "too many nodes");
    let mut first = vec![NONE; n + 1];
    let mut sibling = vec![NONE; n];
    for v in (0..n).rev() {
        let p = match idom[v] {
            UNREACHED => continue,
            ROOT => n,
            d => d as usize,
        };
        sibling[v] = first[p];
        first[p] = v as u32;
    }
    let mut v = first[n];
    'down: while v != NONE {
        visit(v, true);
        if first[v as usize] != NONE {
            v = first[v as usize];
            continue;
        }
        loop {
            visit(v, false);
            if sibling[v as usize] != NONE {
                v = sibling[v as usize];
                continue 'down;
            }
            match idom[v as usize] {
                ROOT => break 'down,
                d => v = d,
            }
        }
    }
}

/// What each node retains, from its immediate dominators (as [`dominators`] gives them) and the
/// nodes' sizes: the bytes and the number of nodes of its dominator subtree, itself included.
/// UNREACHED nodes retain `(0, 0)`. O(n) time.
///
/// # Panics
/// When the lengths differ, or `idom` names a node `>= idom.len()`.
pub fn retained(idom: &[u32], size: &[u64]) -> Vec<(u64, u64)> {
    assert_eq!(idom.len(), size.len());
    let mut out = vec![(0u64, 0u64); idom.len()];
    walk(idom, |v, enter| {
        let v = v as usize;
        if enter {
            out[v] = (size[v], 1);
        } else if idom[v] < ROOT {
            let (d, (b, c)) = (idom[v], out[v]);
            out[d as usize].0 += b;
            out[d as usize].1 += c;
        }
    });
    out
}

/// What each group retains (groups `0..ngroups`, `group[v]` the group of node `v`, say the
/// callsite that allocated block `v`): the bytes and number of nodes of the union of the
/// dominator subtrees of the group's nodes. A node of the group under another one counts once,
/// inside the outer one's subtree. UNREACHED nodes count nothing. O(n + ngroups) time.
///
/// # Panics
/// When the lengths differ, `idom` names a node `>= idom.len()`, or a reached node's group is
/// `>= ngroups`.
pub fn retained_by_group(
    idom: &[u32],
    size: &[u64],
    group: &[u32],
    ngroups: usize,
) -> Vec<(u64, u64)> {
    assert_eq!(idom.len(), size.len());
    assert_eq!(idom.len(), group.len());
    let mut out = vec![(0u64, 0u64); ngroups];
    // A node's subtree so far; how many nodes of each group are on the walk's path.
    let mut sub = vec![(0u64, 0u64); idom.len()];
    let mut active = vec![0u32; ngroups];
    walk(idom, |v, enter| {
        let v = v as usize;
        let g = group[v] as usize;
        if enter {
            sub[v] = (size[v], 1);
            active[g] += 1;
            return;
        }
        let (b, c) = sub[v];
        let d = idom[v];
        if d < ROOT {
            sub[d as usize].0 += b;
            sub[d as usize].1 += c;
        }
        active[g] -= 1;
        if active[g] == 0 {
            out[g].0 += b;
            out[g].1 += c;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn doms(n: usize, edges: &[(u32, u32)], roots: &[u32]) -> Vec<u32> {
        dominators(&Csr::from_edges(n, edges), roots)
    }

    /// Dominance by its definition: `d` dominates `w` when `w` is reached and, without `d`,
    /// is not (every node dominates itself). `dom[d][w]`.
    fn brute_dom(g: &Csr, roots: &[u32]) -> Vec<Vec<bool>> {
        let n = g.nodes();
        let reach = |removed: usize| {
            let mut seen = vec![false; n];
            let mut stack: Vec<u32> = Vec::new();
            for &r in roots {
                if r as usize != removed && !seen[r as usize] {
                    seen[r as usize] = true;
                    stack.push(r);
                }
            }
            while let Some(v) = stack.pop() {
                for &t in g.successors(v) {
                    if t as usize != removed && !seen[t as usize] {
                        seen[t as usize] = true;
                        stack.push(t);
                    }
                }
            }
            seen
        };
        let all = reach(n);
        (0..n)
            .map(|d| {
                let without = reach(d);
                (0..n).map(|w| all[w] && (w == d || !without[w])).collect()
            })
            .collect()
    }

    /// Immediate dominators by the definition: the strict dominator every other strict
    /// dominator dominates.
    fn brute_idom(dom: &[Vec<bool>]) -> Vec<u32> {
        let n = dom.len();
        (0..n)
            .map(|w| {
                if !dom[w][w] {
                    return UNREACHED;
                }
                let strict: Vec<usize> = (0..n).filter(|&d| d != w && dom[d][w]).collect();
                let idom: Vec<usize> = strict
                    .iter()
                    .copied()
                    .filter(|&d| strict.iter().all(|&e| dom[e][d]))
                    .collect();
                match idom[..] {
                    [] => ROOT,
                    [d] => d as u32,
                    _ => panic!("strict dominators not a chain"),
                }
            })
            .collect()
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn csr_keeps_order_and_duplicates() {
        let g = Csr::from_edges(4, &[(2, 1), (0, 3), (2, 0), (2, 1), (3, 3)]);
        assert_eq!(g.nodes(), 4);
        assert_eq!(g.offsets, [0, 1, 1, 4, 5]);
        assert_eq!(g.successors(0), [3]);
        assert_eq!(g.successors(1), [] as [u32; 0]);
        assert_eq!(g.successors(2), [1, 0, 1]);
        assert_eq!(g.successors(3), [3]);
        assert_eq!(Csr::from_edges(0, &[]).nodes(), 0);
        assert_eq!(dominators(&Csr::from_edges(0, &[]), &[]), [] as [u32; 0]);
    }

    #[test]
    fn lengauer_tarjan_paper_example() {
        // Lengauer and Tarjan (1979), figure 1: R A B C D E F G H I J K L.
        const R: u32 = 0;
        const A: u32 = 1;
        const B: u32 = 2;
        const C: u32 = 3;
        const D: u32 = 4;
        const E: u32 = 5;
        const F: u32 = 6;
        const G: u32 = 7;
        const H: u32 = 8;
        const I: u32 = 9;
        const J: u32 = 10;
        const K: u32 = 11;
        const L: u32 = 12;
        let edges = [
            (R, A),
            (R, B),
            (R, C),
            (A, D),
            (B, A),
            (B, D),
            (B, E),
            (C, F),
            (C, G),
            (D, L),
            (E, H),
            (F, I),
            (G, I),
            (G, J),
            (H, E),
            (H, K),
            (I, K),
            (J, I),
            (K, I),
            (K, R),
            (L, H),
        ];
        let g = Csr::from_edges(13, &edges);
        let idom = dominators(&g, &[R]);
        assert_eq!(idom, [ROOT, R, R, R, R, R, C, C, R, R, G, R, D]);
        assert_eq!(idom, brute_idom(&brute_dom(&g, &[R])));
    }

    #[test]
    fn diamond() {
        let idom = doms(4, &[(0, 1), (0, 2), (1, 3), (2, 3)], &[0]);
        assert_eq!(idom, [ROOT, 0, 0, 0]);
    }

    #[test]
    fn cycle_reachable_from_the_root() {
        let idom = doms(5, &[(0, 1), (1, 2), (2, 3), (3, 1), (3, 4), (4, 4)], &[0]);
        assert_eq!(idom, [ROOT, 0, 1, 2, 3]);
        // Entered from two sides, the cycle's nodes have only the root above them.
        let idom = doms(4, &[(0, 1), (0, 2), (1, 2), (2, 3), (3, 1)], &[0]);
        assert_eq!(idom, [ROOT, 0, 0, 2]);
    }

    #[test]
    fn unreached_nodes() {
        // 4 and 5 are a leaked cycle pointing into the reached part: no effect on it.
        let edges = [(0, 1), (0, 2), (2, 3), (4, 5), (5, 4), (4, 3), (5, 1)];
        let idom = doms(6, &edges, &[0]);
        assert_eq!(idom, [ROOT, 0, 0, 2, UNREACHED, UNREACHED]);
        assert_eq!(doms(3, &[(0, 1)], &[]), [UNREACHED; 3]);
        let sizes = [1, 2, 4, 8, 16, 32];
        assert_eq!(
            retained(&idom, &sizes),
            [(15, 4), (2, 1), (12, 2), (8, 1), (0, 0), (0, 0)]
        );
        assert_eq!(
            retained_by_group(&idom, &sizes, &[0, 1, 1, 0, 2, 2], 4),
            [(15, 4), (14, 3), (0, 0), (0, 0)]
        );
    }

    #[test]
    fn multiple_roots() {
        // Roots 0, 2 and 5 (5 twice, and 2 also under 0); 1 is reached from both 0 and 2.
        let edges = [(0, 1), (2, 1), (1, 3), (0, 2), (5, 6), (6, 7), (4, 6)];
        let idom = doms(8, &edges, &[5, 0, 2, 5]);
        assert_eq!(idom, [ROOT, ROOT, ROOT, 1, UNREACHED, ROOT, 5, 6]);
        // With only 0 as root, 0 dominates all it reaches.
        let idom = doms(8, &edges, &[0]);
        assert_eq!(idom[..4], [ROOT, 0, 0, 1]);
    }

    #[test]
    fn long_linked_list() {
        const N: u32 = 1_000_000;
        let mut edges: Vec<(u32, u32)> = (1..N).map(|i| (i - 1, i)).collect();
        let g = Csr::from_edges(N as usize, &edges);
        let idom = dominators(&g, &[0]);
        assert_eq!(idom[0], ROOT);
        assert!((1..N).all(|i| idom[i as usize] == i - 1));
        let size = vec![16u64; N as usize];
        let ret = retained(&idom, &size);
        assert!((0..N).all(|i| ret[i as usize] == (16 * u64::from(N - i), u64::from(N - i))));
        let all = (16 * u64::from(N), u64::from(N));
        assert_eq!(
            retained_by_group(&idom, &size, &vec![0; N as usize], 1),
            [all]
        );

        // A back edge from the tail to the second node: the first eval walks, and compresses,
        // the whole list. Dominators do not change.
        edges.push((N - 1, 1));
        edges.push((N / 2, 1));
        let idom2 = dominators(&Csr::from_edges(N as usize, &edges), &[0]);
        assert_eq!(idom2, idom);

        // The list numbered backwards, the head last.
        let edges: Vec<(u32, u32)> = (1..N).map(|i| (i, i - 1)).collect();
        let idom = dominators(&Csr::from_edges(N as usize, &edges), &[N - 1]);
        assert_eq!(idom[N as usize - 1], ROOT);
        assert!((0..N - 1).all(|i| idom[i as usize] == i + 1));
    }

    #[test]
    fn shared_subtree_belongs_to_the_common_ancestor() {
        // 0 -> 1; 1 holds 2 and 3, which both hold 4; 4 holds 5 and 6, 6 holds 7. Node 8 is a
        // second root holding 9 and sharing nothing.
        let edges = [
            (0, 1),
            (1, 2),
            (1, 3),
            (2, 4),
            (3, 4),
            (4, 5),
            (4, 6),
            (6, 7),
            (8, 9),
        ];
        let idom = doms(10, &edges, &[0, 8]);
        assert_eq!(idom, [ROOT, 0, 1, 1, 1, 4, 4, 6, ROOT, 8]);
        let size: Vec<u64> = (0..10).map(|v| 1 << v).collect();
        let ret = retained(&idom, &size);
        assert_eq!(
            ret,
            [
                (0b1111_1111, 8),
                (0b1111_1110, 7),
                (0b0000_0100, 1),
                (0b0000_1000, 1),
                (0b1111_0000, 4),
                (0b0010_0000, 1),
                (0b1100_0000, 2),
                (0b1000_0000, 1),
                (0b11_0000_0000, 2),
                (0b10_0000_0000, 1),
            ]
        );
        // The parents, grouped: neither holds the shared subtree.
        let group = [3, 3, 0, 0, 1, 3, 2, 2, 3, 3];
        assert_eq!(
            retained_by_group(&idom, &size, &group, 5),
            [
                (0b0000_1100, 2),
                (0b1111_0000, 4),
                (0b1100_0000, 2),
                (0b11_1111_1111, 10),
                (0, 0)
            ]
        );
    }

    #[test]
    fn retained_by_group_counts_nested_nodes_once() {
        // A list of N nodes of group 0, each holding a payload block of group 1.
        const N: u32 = 100_000;
        let n = 2 * N as usize;
        let mut edges: Vec<(u32, u32)> = (1..N).map(|i| (i - 1, i)).collect();
        edges.extend((0..N).map(|i| (i, N + i)));
        let idom = doms(n, &edges, &[0]);
        let size: Vec<u64> = (0..n)
            .map(|v| if v < N as usize { 16 } else { 100 })
            .collect();
        let group: Vec<u32> = (0..n).map(|v| u32::from(v >= N as usize)).collect();
        let n64 = u64::from(N);
        assert_eq!(
            retained_by_group(&idom, &size, &group, 2),
            [(116 * n64, 2 * n64), (100 * n64, n64)]
        );

        // Groups alternating down a list: 0 1 0 1 0 ... each group counts from its first node.
        let edges: Vec<(u32, u32)> = (1..10).map(|i| (i - 1, i)).collect();
        let idom = doms(10, &edges, &[0]);
        let group: Vec<u32> = (0..10).map(|v| v % 2).collect();
        assert_eq!(
            retained_by_group(&idom, &[1; 10], &group, 3),
            [(10, 10), (9, 9), (0, 0)]
        );
    }

    #[test]
    fn random_graphs_match_brute_force() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..600 {
            let n = 1 + rng.below(14) as usize;
            let m = rng.below(3 * n as u64 + 1) as usize;
            let edges: Vec<(u32, u32)> = (0..m)
                .map(|_| (rng.below(n as u64) as u32, rng.below(n as u64) as u32))
                .collect();
            let nroots = rng.below(4) as usize;
            let roots: Vec<u32> = (0..nroots).map(|_| rng.below(n as u64) as u32).collect();
            let g = Csr::from_edges(n, &edges);
            let idom = dominators(&g, &roots);
            let dom = brute_dom(&g, &roots);
            assert_eq!(
                idom,
                brute_idom(&dom),
                "round {round}: {edges:?} from {roots:?}"
            );

            let size: Vec<u64> = (0..n).map(|_| 1 + rng.below(1000)).collect();
            let ngroups = 1 + rng.below(4) as usize;
            let group: Vec<u32> = (0..n).map(|_| rng.below(ngroups as u64) as u32).collect();
            let want: Vec<(u64, u64)> = (0..n)
                .map(|d| {
                    (0..n)
                        .filter(|&w| dom[d][w])
                        .fold((0, 0), |(b, c), w| (b + size[w], c + 1))
                })
                .collect();
            assert_eq!(retained(&idom, &size), want, "round {round}");
            let want: Vec<(u64, u64)> = (0..ngroups as u32)
                .map(|gr| {
                    (0..n)
                        .filter(|&w| (0..n).any(|d| group[d] == gr && dom[d][w]))
                        .fold((0, 0), |(b, c), w| (b + size[w], c + 1))
                })
                .collect();
            assert_eq!(
                retained_by_group(&idom, &size, &group, ngroups),
                want,
                "round {round}"
            );
        }
    }

    /// Seconds this thread has run, where Linux says (the machine may be busy with others).
    fn cpu_seconds() -> Option<f64> {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        Some(s.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
    }

    /// Builds, times and checks 10 million nodes and 15 million edges: a spanning tree from node
    /// 0, then random edges (some from nodes the tree does not reach, none: it reaches all).
    /// `far` is the share (of 1024) of edges to anywhere; the others point near their source,
    /// as a heap's pointers mostly do in address order.
    fn perf(name: &str, far: u64) {
        use std::time::Instant;
        const N: u32 = 10_000_000;
        const M: u32 = 15_000_000;
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let near = |rng: &mut XorShift, i: u32| -> u32 {
            if rng.below(1024) < far {
                rng.below(u64::from(i)) as u32
            } else {
                i.saturating_sub(1 + rng.below(64) as u32)
            }
        };
        let mut edges: Vec<(u32, u32)> = Vec::with_capacity(M as usize);
        for i in 1..N {
            // Half of the tree is lists: deep paths.
            let p = if rng.below(2) == 0 {
                i - 1
            } else {
                near(&mut rng, i)
            };
            edges.push((p, i));
        }
        for _ in 0..M - (N - 1) {
            let a = rng.below(u64::from(N)) as u32;
            let b = near(&mut rng, a.max(1));
            edges.push((a, b));
        }
        let time = |f: &mut dyn FnMut()| {
            let (t, c) = (Instant::now(), cpu_seconds());
            f();
            let cpu = c.and_then(|c| Some(cpu_seconds()? - c)).unwrap_or(f64::NAN);
            std::format!("{:.2}s ({cpu:.2}s cpu)", t.elapsed().as_secs_f64())
        };
        let mut g = Csr::from_edges(0, &[]);
        let t_csr = time(&mut || g = Csr::from_edges(N as usize, &edges));
        drop(edges);
        let mut idom = Vec::new();
        let t_dom = time(&mut || idom = dominators(&g, &[0]));
        let size = vec![32u64; N as usize];
        let group: Vec<u32> = (0..N).map(|v| v % 1000).collect();
        let mut ret = Vec::new();
        let t_ret = time(&mut || ret = retained(&idom, &size));
        let mut by = Vec::new();
        let t_grp = time(&mut || by = retained_by_group(&idom, &size, &group, 1000));
        std::println!(
            "{name}: from_edges {t_csr}, dominators {t_dom}, retained {t_ret}, \
             retained_by_group {t_grp}"
        );
        assert_eq!(ret[0], (32 * u64::from(N), u64::from(N)));
        assert!(by.iter().all(|&(b, c)| b == 32 * c));
        assert_eq!(by.iter().map(|&(_, c)| c).max(), Some(u64::from(N)));
    }

    /// `cargo test --release -p leakhunt-reach -- --ignored --nocapture`: every pointer to
    /// anywhere, the worst case for caches.
    #[test]
    #[ignore]
    fn perf_ten_million_nodes_random() {
        perf("random", 1024);
    }

    /// The same with 1 pointer in 16 to anywhere, the others near their source.
    #[test]
    #[ignore]
    fn perf_ten_million_nodes_local() {
        perf("local", 64);
    }
}
