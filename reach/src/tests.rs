//! The rules of the crate docs, one case each, on a synthetic address space.

use super::*;
use alloc::collections::BTreeMap;

/// A synthetic address space: words by address (unlisted words of a segment are zero), segments
/// readable, mappings for the vtable test.
#[derive(Default)]
struct Mem {
    words: BTreeMap<u64, u64>,
    segments: Vec<(u64, u64)>,
    maps: Vec<Mapping>,
}

impl Mem {
    fn seg(&mut self, start: u64, end: u64) -> &mut Self {
        self.segments.push((start, end));
        self
    }
    fn put(&mut self, addr: u64, w: u64) -> &mut Self {
        self.words.insert(addr, w);
        self
    }
    fn readable(&self, a: u64) -> bool {
        self.segments.iter().any(|&(s, e)| s <= a && a + WORD <= e)
    }
}

impl Memory for Mem {
    fn read(&self, addr: u64, out: &mut [u64]) -> usize {
        for (i, o) in out.iter_mut().enumerate() {
            let a = addr + i as u64 * WORD;
            if !self.readable(a) {
                return i;
            }
            *o = self.words.get(&a).copied().unwrap_or(0);
        }
        out.len()
    }
    fn mapping(&self, addr: u64) -> Option<Mapping> {
        self.maps
            .iter()
            .copied()
            .find(|m| m.start <= addr && addr < m.end)
    }
}

const ROOT: (u64, u64) = (0x1000, 0x2000);
const HEAP: u64 = 0x10_0000;

/// Blocks of these sizes laid out 64 bytes apart from HEAP (sizes up to 64), all readable, with
/// the root segment.
fn heap(sizes: &[u64]) -> (Vec<Block>, Mem) {
    let blocks: Vec<Block> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Block {
            start: HEAP + 64 * i as u64,
            size,
        })
        .collect();
    let mut m = Mem::default();
    m.seg(ROOT.0, ROOT.1)
        .seg(HEAP, HEAP + 64 * sizes.len() as u64);
    (blocks, m)
}

fn b(i: u64) -> u64 {
    HEAP + 64 * i
}

fn run(blocks: &[Block], m: &Mem, h: Heuristics) -> Outcome {
    let mut s = Scan::new(blocks, h).unwrap();
    s.root_range(m, ROOT.0, ROOT.1);
    s.finish(m)
}

use Kind::*;

#[test]
fn a_start_pointer_in_a_root_reaches_and_through_blocks() {
    let (blocks, mut m) = heap(&[16, 16, 16]);
    m.put(ROOT.0 + 8, b(0)).put(b(0) + 8, b(1));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Reachable, Reachable, Definite]);
    assert_eq!(o.via, [Via::Root(ROOT.0 + 8), Via::Block(0), Via::Nothing]);
    assert_eq!(o.indirect_bytes, [0, 0, 0]);
}

#[test]
fn a_leaked_chain_is_one_definite_head_with_the_rest_indirect() {
    let (blocks, mut m) = heap(&[16, 24, 32]);
    // Block 2 -> 1 -> 0: the head is the highest address; it gathers 1 and (through 1) 0.
    m.put(b(2), b(1)).put(b(1) + 8, b(0) + 4);
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Indirect, Indirect, Definite]);
    assert_eq!(o.indirect_bytes, [0, 0, 40]);
    assert_eq!(o.via[0], Via::Block(1));
}

#[test]
fn a_cycle_nothing_points_into_has_its_lowest_address_as_the_definite_one() {
    let (blocks, mut m) = heap(&[16, 16, 16]);
    m.put(b(1), b(2)).put(b(2), b(1));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Definite, Definite, Indirect]);
    assert_eq!(o.indirect_bytes, [0, 16, 0]);
    // A leaked block pointing into the cycle takes all of it, whenever its turn comes.
    m.put(b(0), b(2));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Definite, Indirect, Indirect]);
    assert_eq!(o.indirect_bytes, [32, 0, 0]);
    // A later leader pointing at the cycle's leader takes the cycle; one pointing at a member
    // already taken does not (memcheck ignores pointers to indirectly lost blocks).
    let (blocks, mut m) = heap(&[16, 16, 16, 8]);
    m.put(b(1), b(2)).put(b(2), b(1)).put(b(3), b(1));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Definite, Indirect, Indirect, Definite]);
    assert_eq!(o.indirect_bytes, [0, 0, 0, 32]);
    m.put(b(3), b(2));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Definite, Definite, Indirect, Definite]);
    assert_eq!(o.indirect_bytes, [0, 16, 0, 0]);
}

#[test]
fn a_shared_child_goes_to_the_lower_address_leader() {
    let (blocks, mut m) = heap(&[16, 16, 16]);
    m.put(b(0), b(1)).put(b(2), b(1));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Definite, Indirect, Definite]);
    assert_eq!(o.indirect_bytes, [16, 0, 0]);
}

#[test]
fn interior_pointers_make_possibly_lost_and_so_does_all_below() {
    let (blocks, mut m) = heap(&[32, 16, 16]);
    m.put(ROOT.0, b(0) + 16).put(b(0), b(1)).put(b(1), b(2));
    let o = run(&blocks, &m, Heuristics::NONE);
    assert_eq!(o.kind, [Possible, Possible, Possible]);
    assert_eq!(o.indirect_bytes, [0, 0, 0]);
    // A start pointer on a definite path later upgrades the block and what it reaches.
    m.put(ROOT.0 + 8, b(0));
    let o = run(&blocks, &m, Heuristics::NONE);
    assert_eq!(o.kind, [Reachable, Reachable, Reachable]);
}

#[test]
fn one_past_the_end_points_nowhere_and_a_zero_size_block_is_one_byte() {
    let (blocks, mut m) = heap(&[16, 0, 16]);
    m.put(ROOT.0, b(0) + 16).put(ROOT.0 + 8, b(1));
    let o = run(&blocks, &m, Heuristics::NONE);
    assert_eq!(o.kind, [Definite, Reachable, Definite]);
    let (blocks, mut m) = heap(&[16, 0]);
    m.put(ROOT.0, b(1) + 1);
    assert_eq!(
        run(&blocks, &m, Heuristics::NONE).kind,
        [Definite, Definite]
    );
}

#[test]
fn only_the_requested_size_is_scanned_in_whole_words() {
    // Block 0 is 20 bytes: its words at 0 and 8 are scanned, the one at 16 (bytes 16..24) is not.
    let (blocks, mut m) = heap(&[20, 16, 16]);
    m.put(ROOT.0, b(0)).put(b(0) + 8, b(1)).put(b(0) + 16, b(2));
    let o = run(&blocks, &m, Heuristics::NONE);
    assert_eq!(o.kind, [Reachable, Reachable, Definite]);
    // A root range's partial words at either end are not read either.
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.root_range(&m, ROOT.0 + 1, ROOT.0 + 15);
    assert_eq!(s.finish(&m).kind, [Definite, Indirect, Definite]);
}

#[test]
fn registers_are_roots_and_unreadable_pages_are_skipped() {
    let (blocks, mut m) = heap(&[16, 16]);
    // A root range over a hole: the words after it are still read.
    m.seg(0x4000, 0x5000).put(0x4ff8, b(1));
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.root_range(&m, 0x2000, 0x5000);
    s.root_word(&m, b(0));
    let o = s.finish(&m);
    assert_eq!(o.kind, [Reachable, Reachable]);
    assert_eq!(o.via, [Via::Root(0), Via::Root(0x4ff8)]);
    assert_eq!(o.words_scanned, 512 + 4);
}

#[test]
fn stdstring_accepts_a_cow_string_body_only() {
    // length 5, capacity 8: 24 + 8 + 1 = 33 bytes; pointed at offset 24.
    let (blocks, mut m) = heap(&[33, 34]);
    m.put(b(0), 5).put(b(0) + 8, 8).put(ROOT.0, b(0) + 24);
    m.put(b(1), 5).put(b(1) + 8, 8).put(ROOT.0 + 8, b(1) + 24);
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Reachable, Possible]);
    assert_eq!(o.heuristic, [Some(Heuristic::StdString), None]);
    let o = run(&blocks, &m, Heuristics::NONE.with(Heuristic::Length64));
    assert_eq!(o.kind, [Possible, Possible]);
}

#[test]
fn length64_and_newarray() {
    // Block 0: first word 40 = size - 8 (length64). Block 1: first word 3, 32 = 8 + 3 * 8
    // (newarray: a count that divides what follows). Block 2: first word 5 does not divide 32.
    let (blocks, mut m) = heap(&[48, 32, 40, 40]);
    m.put(b(0), 40).put(ROOT.0, b(0) + 8);
    m.put(b(1), 3).put(ROOT.0 + 8, b(1) + 8);
    m.put(b(2), 5).put(ROOT.0 + 16, b(2) + 8);
    m.put(b(3), 0).put(ROOT.0 + 24, b(3) + 8);
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Reachable, Reachable, Possible, Possible]);
    assert_eq!(
        o.heuristic,
        [
            Some(Heuristic::Length64),
            Some(Heuristic::NewArray),
            None,
            None
        ]
    );
    // length64 is tried before newarray, which would accept block 0 too.
    let o = run(&blocks, &m, Heuristics::NONE.with(Heuristic::NewArray));
    assert_eq!(o.heuristic[0], Some(Heuristic::NewArray));
}

#[test]
fn multipleinheritance_wants_two_vtables() {
    const TEXT: u64 = 0x40_0000;
    const RODATA: u64 = 0x50_0000;
    let (blocks, mut m) = heap(&[32, 32]);
    m.maps.push(Mapping {
        start: TEXT,
        end: TEXT + 0x1000,
        readable: true,
        executable: true,
        file: true,
    });
    m.maps.push(Mapping {
        start: RODATA,
        end: RODATA + 0x1000,
        readable: true,
        executable: false,
        file: true,
    });
    m.seg(RODATA, RODATA + 0x1000);
    // Two vtables: two function pointers each (a zero between is skipped).
    m.put(RODATA, TEXT + 0x10).put(RODATA + 16, TEXT + 0x20);
    m.put(RODATA + 0x100, TEXT + 0x30)
        .put(RODATA + 0x108, TEXT + 0x40);
    // Block 0: vtable at 0, a second base with its vtable at 16, pointed at.
    m.put(b(0), RODATA)
        .put(b(0) + 16, RODATA + 0x100)
        .put(ROOT.0, b(0) + 16);
    // Block 1: the second "vtable" is data (its words point at rodata, not code).
    m.put(b(1), RODATA)
        .put(b(1) + 16, RODATA + 0x200)
        .put(RODATA + 0x200, RODATA);
    m.put(ROOT.0 + 8, b(1) + 16);
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Reachable, Possible]);
    assert_eq!(o.heuristic[0], Some(Heuristic::MultipleInheritance));
}

#[test]
fn a_heuristic_tag_is_cleared_by_a_start_pointer_and_kept_on_possible_paths() {
    let (blocks, mut m) = heap(&[48, 48, 48]);
    // Block 0 is possibly lost (an interior pointer no heuristic accepts); block 1 is reached
    // from it through a length64 pointer: possibly lost too, with its tag.
    m.put(ROOT.0, b(0) + 4)
        .put(b(0) + 16, b(1) + 8)
        .put(b(1), 40);
    // Block 2: a length64 pointer, then a start pointer, from the roots: reachable, untagged.
    m.put(b(2), 40)
        .put(ROOT.0 + 8, b(2) + 8)
        .put(ROOT.0 + 16, b(2));
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.kind, [Possible, Possible, Reachable]);
    assert_eq!(o.heuristic, [None, Some(Heuristic::Length64), None]);
    // Without the start pointer, block 2 keeps its tag.
    m.put(ROOT.0 + 16, 0);
    let o = run(&blocks, &m, Heuristics::ALL);
    assert_eq!(o.heuristic[2], Some(Heuristic::Length64));
}

#[test]
fn blocks_must_be_sorted_and_apart() {
    let bl = [
        Block {
            start: 32,
            size: 16,
        },
        Block { start: 16, size: 8 },
    ];
    assert_eq!(
        Scan::new(&bl, Heuristics::ALL).err(),
        Some(Unsorted { at: 1 })
    );
    let bl = [
        Block {
            start: 16,
            size: 24,
        },
        Block { start: 32, size: 8 },
    ];
    assert_eq!(
        Scan::new(&bl, Heuristics::ALL).err(),
        Some(Unsorted { at: 1 })
    );
    let bl = [Block { start: 16, size: 0 }, Block { start: 17, size: 8 }];
    assert!(Scan::new(&bl, Heuristics::ALL).is_ok());
}

#[test]
fn heuristics_parse_like_memcheck() {
    assert_eq!(Heuristics::parse("all"), Ok(Heuristics::ALL));
    assert_eq!(Heuristics::parse("none"), Ok(Heuristics::NONE));
    assert_eq!(
        Heuristics::parse("stdstring,newarray"),
        Ok(Heuristics::NONE
            .with(Heuristic::StdString)
            .with(Heuristic::NewArray))
    );
    assert_eq!(Heuristics::parse("stdstring,bogus"), Err("bogus"));
}

#[test]
fn the_allocators_own_pointers_point_nowhere() {
    // glibc: a 40-byte block's chunk is 48 bytes; the next chunk's header is 32 bytes in.
    fn glibc(size: u64) -> Option<u64> {
        Some(((size + 8 + 15) & !15).max(32) - 16)
    }
    let (blocks, mut m) = heap(&[40, 16]);
    m.put(ROOT.0, b(0) + 32).put(ROOT.0 + 8, b(1) + 8);
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.allocator_offset(glibc);
    s.root_range(&m, ROOT.0, ROOT.1);
    // Block 1 is 16 bytes: its chunk header offset (16) lies past its end anyway.
    assert_eq!(s.finish(&m).kind, [Definite, Possible]);
    let o = run(&blocks, &m, Heuristics::NONE);
    assert_eq!(o.kind, [Possible, Possible]);
}

#[test]
fn the_graph_has_every_edge_once_and_parents_are_shortest_chains() {
    // Root -> 0 -> 1 -> 2 -> 3 and root -> 2 directly (at a later root word): 3's shortest chain
    // is root, 2, 3. Block 4 is lost and points at 5 (interior) and at itself.
    let (blocks, mut m) = heap(&[32, 32, 32, 32, 16, 16]);
    m.put(ROOT.0 + 8, b(0))
        .put(ROOT.0 + 24, b(2))
        .put(b(0) + 16, b(1))
        .put(b(1), b(2))
        .put(b(2) + 8, b(3))
        .put(b(2) + 24, b(1) + 8)
        .put(b(4), b(4))
        .put(b(4) + 8, b(5) + 4);
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.record_graph();
    s.root_range(&m, ROOT.0, ROOT.1);
    let o = s.finish(&m);
    assert_eq!(
        o.kind,
        [Reachable, Reachable, Reachable, Reachable, Definite, Indirect]
    );
    let g = o.graph.unwrap();
    assert_eq!(g.roots, [(ROOT.0 + 8, 0), (ROOT.0 + 24, 2)]);
    assert_eq!(g.out(0), [(1, 16)]);
    assert_eq!(g.out(1), [(2, 0)]);
    assert_eq!(g.out(2), [(3, 8), (1, 24)]);
    assert_eq!(g.out(3), []);
    assert_eq!(g.out(4), [(4, 0), (5, 8)]);
    assert_eq!(g.out(5), []);
    let (parent, order) = g.parents();
    assert_eq!(
        parent,
        [
            Parent::Root(ROOT.0 + 8),
            Parent::Block(0, 16),
            Parent::Root(ROOT.0 + 24),
            Parent::Block(2, 8),
            Parent::Nothing,
            Parent::Block(4, 8),
        ]
    );
    assert_eq!(order, [0, 2, 1, 3, 4, 5]);
    let (offsets, targets) = g.csr();
    assert_eq!(offsets, [0, 1, 2, 4, 4, 6, 6]);
    assert_eq!(targets, [1, 2, 3, 1, 4, 5]);
}

#[test]
fn a_block_rescanned_as_its_kind_improves_keeps_one_set_of_edges() {
    // 0 is first reached by an interior pointer (possibly lost, scanned), then by a start
    // pointer (reachable, scanned again): its edge to 1 is recorded once.
    let (blocks, mut m) = heap(&[32, 16]);
    m.put(ROOT.0, b(0) + 8)
        .put(ROOT.0 + 8, b(0))
        .put(b(0) + 16, b(1));
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.record_graph();
    s.root_range(&m, ROOT.0, ROOT.0 + 8);
    s.flood(&m);
    s.root_range(&m, ROOT.0 + 8, ROOT.0 + 16);
    let o = s.finish(&m);
    assert_eq!(o.kind, [Reachable, Reachable]);
    let g = o.graph.unwrap();
    assert_eq!(g.out(0), [(1, 16)]);
    assert_eq!(g.edges.len(), 1);
}

#[test]
fn a_lost_structure_is_walked_from_its_head_whatever_the_addresses() {
    // Block 1 (higher address) is the head of a lost structure and points at block 0: 0's chain
    // comes from 1, not from nothing. Blocks 2 and 3 point at each other (a cycle nothing else
    // points into): the lower address leads.
    let (blocks, mut m) = heap(&[16, 16, 16, 16]);
    m.put(b(1), b(0)).put(b(2), b(3)).put(b(3), b(2));
    let mut s = Scan::new(&blocks, Heuristics::NONE).unwrap();
    s.record_graph();
    s.root_range(&m, ROOT.0, ROOT.1);
    let g = s.finish(&m).graph.unwrap();
    let (parent, order) = g.parents();
    assert_eq!(
        parent,
        [
            Parent::Block(1, 0),
            Parent::Nothing,
            Parent::Nothing,
            Parent::Block(2, 0)
        ]
    );
    assert_eq!(order, [1, 0, 2, 3]);
}
