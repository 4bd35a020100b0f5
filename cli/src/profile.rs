//! Profiles: what the exports read by other tools (pprof's profile.proto, folded stacks, flame
//! graphs) show of one process, as plain data built once. Per callsite: its symbolized frames,
//! each with the return address it belongs to (a function inlined there shares its caller's) and
//! the module it lies in, and four values: allocations made and their bytes, blocks live and
//! their bytes. A profile of a process's end ([`at_exit`]) counts every allocation of the run
//! and every block unfreed at exit, whatever its kind; a growth profile (`leakhunt diff`) counts
//! what changed between two points, negative where a callsite shrank. The renderers
//! (`pprof`, `flame`) only format it.

use leakhunt_symbolizer::Symbolizer;
use rustc_hash::FxHashMap;

use crate::callsite::{Callsites, LocatedFrame};
use crate::process::Process;
use crate::report::Frame;

/// A callsite's four values, in pprof's order for heap profiles (Go's): the last is the one
/// shown by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub alloc_objects: i64,
    pub alloc_space: i64,
    pub inuse_objects: i64,
    pub inuse_space: i64,
}

impl Values {
    /// The sample types, (type, unit), in the order of [`Values::as_array`].
    pub const TYPES: [(&'static str, &'static str); 4] = [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ];

    pub fn as_array(&self) -> [i64; 4] {
        [
            self.alloc_objects,
            self.alloc_space,
            self.inuse_objects,
            self.inuse_space,
        ]
    }

    pub fn is_zero(&self) -> bool {
        self.as_array() == [0; 4]
    }

    fn add(&mut self, o: Values) {
        self.alloc_objects = self.alloc_objects.saturating_add(o.alloc_objects);
        self.alloc_space = self.alloc_space.saturating_add(o.alloc_space);
        self.inuse_objects = self.inuse_objects.saturating_add(o.inuse_objects);
        self.inuse_space = self.inuse_space.saturating_add(o.inuse_space);
    }

    /// `self` scaled by `sign` (1 or -1).
    pub fn times(self, sign: i64) -> Values {
        Values {
            alloc_objects: self.alloc_objects.saturating_mul(sign),
            alloc_space: self.alloc_space.saturating_mul(sign),
            inuse_objects: self.inuse_objects.saturating_mul(sign),
            inuse_space: self.inuse_space.saturating_mul(sign),
        }
    }
}

/// Saturating u64 -> i64 for the values (no real count reaches 2^63).
pub fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A module as the profile maps it: where it was loaded (its first load in the process that
/// named it first), and its build-id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub path: String,
    pub build_id: Vec<u8>,
    /// The runtime range of its executable segments, `[start, limit)`.
    pub start: u64,
    pub limit: u64,
    /// The ELF address of `start` (for the usual layouts, where segments are mapped at their
    /// file offsets, also its offset in the file).
    pub file_offset: u64,
    /// Runtime address minus ELF address.
    pub bias: u64,
}

/// One frame of a callsite, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The position of its return address in the stack: frames with the same position are one
    /// address, the inlined functions first.
    pub pos: u32,
    /// Its module, an index in [`Profile::mappings`]; `None` outside every module.
    pub mapping: Option<u32>,
    pub frame: Frame,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Innermost first.
    pub frames: Vec<Located>,
    pub values: Values,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub pid: u32,
    pub argv: Vec<String>,
    /// What the values are, in a line ("blocks unfreed at exit", "growth from A to B").
    pub what: String,
    /// When the process started (ns since the Unix epoch; 0: unknown).
    pub time_nanos: i64,
    pub mappings: Vec<Mapping>,
    /// Every callsite with a value that is not zero, in the order found.
    pub sites: Vec<Site>,
}

impl Profile {
    /// The address of a located frame in the profile's address space: the byte before the
    /// return address (inside the call instruction, where its line was looked up), in its
    /// mapping's range; outside every module, the runtime address less one.
    pub fn address(&self, l: &Located) -> u64 {
        match l.mapping.and_then(|m| self.mappings.get(m as usize)) {
            Some(m) => m.bias.wrapping_add(l.frame.offset).wrapping_sub(1),
            None => l.frame.address.saturating_sub(1),
        }
    }
}

/// Collects a profile's callsites and interns their modules.
#[derive(Default)]
pub struct Builder {
    mappings: Vec<Mapping>,
    index: FxHashMap<(String, Vec<u8>), u32>,
    sites: Vec<Site>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Located frames from [`Callsites::frames_located`] of a stack of `p`.
    pub fn locate(&mut self, p: &Process, frames: Vec<LocatedFrame<'_>>) -> Vec<Located> {
        frames
            .into_iter()
            .map(|(pos, module, frame)| Located {
                pos,
                mapping: module.map(|(path, bid)| self.mapping(p, path, bid)),
                frame,
            })
            .collect()
    }

    fn mapping(&mut self, p: &Process, path: &str, build_id: &[u8]) -> u32 {
        if let Some(&i) = self.index.get(&(path.to_string(), build_id.to_vec())) {
            return i;
        }
        let entry = p
            .modules
            .iter()
            .map(|m| &m.module)
            .find(|m| m.path == path && m.build_id == build_id);
        let (start, limit, bias) = entry.map_or((0, 0, 0), |m| {
            let start = m.ranges.iter().map(|r| r.0).min().unwrap_or(0);
            let limit = m.ranges.iter().map(|r| r.1).max().unwrap_or(0);
            (start, limit, m.bias)
        });
        let i = self.mappings.len() as u32;
        self.mappings.push(Mapping {
            path: path.to_string(),
            build_id: build_id.to_vec(),
            start,
            limit,
            file_offset: start.wrapping_sub(bias),
            bias,
        });
        self.index.insert((path.to_string(), build_id.to_vec()), i);
        i
    }

    /// A callsite (frames from [`Builder::locate`]); one whose values are all zero is left out.
    pub fn push(&mut self, frames: Vec<Located>, values: Values) {
        if !values.is_zero() {
            self.sites.push(Site { frames, values });
        }
    }

    pub fn finish(self, p: &Process, what: String) -> Profile {
        let h = p.header.as_ref();
        Profile {
            pid: p.pid(),
            argv: h.map_or_else(Vec::new, |h| h.argv.clone()),
            what,
            time_nanos: h.map_or(0, |h| signed(h.start_realtime_ns)),
            mappings: self.mappings,
            sites: self.sites,
        }
    }
}

/// Values per callsite of `p`, from values per stack: each callsite's frames are those of its
/// first stack (by id), as the report shows them.
pub fn by_callsite(
    p: &Process,
    per_stack: FxHashMap<u32, Values>,
    sym: &mut Symbolizer,
    b: &mut Builder,
) {
    let mut sites = Callsites::new(p);
    let mut ids: Vec<(u32, Values)> = per_stack.into_iter().collect();
    ids.sort_unstable_by_key(|e| e.0);
    let mut slot: FxHashMap<u32, usize> = FxHashMap::default();
    let mut rows: Vec<(u32, u32, Values)> = Vec::new();
    for (id, v) in ids {
        let site = sites.site(id);
        let i = *slot.entry(site).or_insert_with(|| {
            rows.push((site, id, Values::default()));
            rows.len() - 1
        });
        rows[i].2.add(v);
    }
    for (site, id, v) in rows {
        if v.is_zero() {
            continue;
        }
        let frames = sites.frames_located(site, id, sym);
        let frames = b.locate(p, frames);
        b.push(frames, v);
    }
}

/// The values per stack of a process's end: every allocation it made (count and bytes) and every
/// block live at its end.
pub fn exit_values(p: &Process) -> FxHashMap<u32, Values> {
    let mut per: FxHashMap<u32, Values> = FxHashMap::default();
    for l in p.live.values() {
        let v = per.entry(l.stack).or_default();
        v.inuse_objects += 1;
        v.inuse_space = v.inuse_space.saturating_add(signed(l.size));
    }
    for (id, n, bytes) in p.growth.alloc_totals() {
        let v = per.entry(id).or_default();
        v.alloc_objects = signed(n);
        v.alloc_space = signed(bytes);
    }
    per
}

/// The profile of a process's end: per callsite, every allocation of the run and the blocks
/// still live at its end (unfreed at exit, of every kind).
pub fn at_exit(p: &Process, sym: &mut Symbolizer) -> Profile {
    let mut b = Builder::new();
    by_callsite(p, exit_values(p), sym, &mut b);
    b.finish(
        p,
        "blocks unfreed at exit, and every allocation of the run".into(),
    )
}

/// The growth profile of a process after warm-up: per callsite, the live blocks and bytes it
/// gained from the end of warm-up to the last boundary the process's verdict judged (a teardown
/// at exit left out, as in the growth report); negative where a callsite shrank. `t` is the
/// process's timeline ([`crate::growth::build`]).
pub fn after_warmup(p: &Process, t: &crate::growth::Timeline, sym: &mut Symbolizer) -> Profile {
    let n = p.growth.boundaries.len();
    let w = t
        .times_s
        .iter()
        .position(|&x| x >= t.warmup_s)
        .unwrap_or(0)
        .min(n.saturating_sub(1));
    let end = (w + t.evidence.points.max(1) - 1).min(n.saturating_sub(1));
    let mut per: FxHashMap<u32, Values> = FxHashMap::default();
    for id in p.growth.stacks() {
        let (from, to) = (p.growth.at(id, w), p.growth.at(id, end));
        let v = Values {
            inuse_space: signed(to.0).saturating_sub(signed(from.0)),
            inuse_objects: signed(to.1).saturating_sub(signed(from.1)),
            ..Values::default()
        };
        if !v.is_zero() {
            per.insert(id, v);
        }
    }
    let mut b = Builder::new();
    by_callsite(p, per, sym, &mut b);
    let at = |i: usize| t.times_s.get(i).copied().unwrap_or(0.0);
    b.finish(
        p,
        format!(
            "growth after warm-up, from {:.1} s to {:.1} s: live blocks and bytes gained",
            at(w),
            at(end)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_add_scale_and_order_as_pprof_lists_them() {
        let mut v = Values {
            alloc_objects: 1,
            alloc_space: 2,
            inuse_objects: 3,
            inuse_space: 4,
        };
        v.add(v);
        assert_eq!(v.as_array(), [2, 4, 6, 8]);
        assert_eq!(v.times(-1).as_array(), [-2, -4, -6, -8]);
        assert!(Values::default().is_zero());
        assert_eq!(Values::TYPES[3], ("inuse_space", "bytes"));
        assert_eq!(signed(u64::MAX), i64::MAX);
    }

    #[test]
    fn an_address_lies_in_its_mapping_or_is_the_runtime_one() {
        let frame = Frame {
            function: Some("f".into()),
            mangled: None,
            file: None,
            line: None,
            module: Some("/bin/x".into()),
            offset: 0x1234,
            address: 0x5555_0000_1234,
            inlined: false,
        };
        let p = Profile {
            mappings: vec![Mapping {
                path: "/bin/x".into(),
                build_id: vec![1, 2],
                start: 0x7000_1000,
                limit: 0x7000_3000,
                file_offset: 0x1000,
                bias: 0x7000_0000,
            }],
            ..Profile::default()
        };
        let mut l = Located {
            pos: 0,
            mapping: Some(0),
            frame,
        };
        assert_eq!(p.address(&l), 0x7000_1233);
        l.mapping = None;
        assert_eq!(p.address(&l), 0x5555_0000_1233);
    }
}
