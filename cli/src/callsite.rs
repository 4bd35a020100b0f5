//! Callsite identity, computed once per process: every stack id maps to a callsite, and every
//! analysis that asks "same callsite?" (the exit report's records, the growth entries, `diff`,
//! `verify`) looks the answer up here instead of re-deriving it per use.
//!
//! A callsite is the stack's frames as (module, offset in the module's ELF address space), so
//! that stacks of the same code match across module reloads (and, by build-id, across runs); a
//! frame outside any known module is its bare address, and a stack whose record never arrived is
//! a callsite of its own. Modules are interned by (path, build-id), so a key is a compact slice
//! of (module id, offset) pairs, with no string per frame. Frames are symbolized once per
//! (module, offset) and callsites once each; a callsite's frames are then handed out with the
//! runtime addresses of whichever of its stacks the caller names.

use std::hash::BuildHasher;

use leakhunt_symbolizer::{SymFrame, Symbolizer};
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::process::Process;
use crate::report::Frame;

/// The module of a frame outside every known module (its offset is then the bare address).
const NO_MODULE: u32 = u32::MAX;

/// One frame of a callsite: an interned module (or [`NO_MODULE`]) and the offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FrameKey {
    module: u32,
    offset: u64,
}

/// The modules loaded at one generation, for finding the one that holds an address.
enum GenIndex {
    /// Their non-empty ranges `[start, end)` with the module's entry, sorted by start, none
    /// overlapping another: at most one holds an address, found by binary search.
    Sorted(Vec<(u64, u64, u32)>),
    /// Some ranges overlap (a corrupt or unusual trace): [`Process::module_at`]'s scan decides,
    /// as it always did.
    Overlapping,
}

/// A frame as [`Callsites::frames_located`] gives it: the position of its return address in
/// the stack, its module's (path, build-id), and the frame.
pub type LocatedFrame<'p> = (u32, Option<(&'p str, &'p [u8])>, Frame);

/// A callsite's report frames: (index of the frame in its key, its line in `lines`) each.
type SiteLines = Box<[(u32, u32)]>;

/// The callsites of one process.
pub struct Callsites<'p> {
    p: &'p Process,
    /// Interned modules: (path, build-id).
    modules: Vec<(&'p str, &'p [u8])>,
    /// The interned id of each entry of `p.modules` (by index; unused entries too).
    module_of_entry: Vec<u32>,
    /// Module lookup per stack generation, built on first use.
    gens: FxHashMap<u32, GenIndex>,
    /// Stack id -> callsite.
    of_stack: FxHashMap<u32, u32>,
    /// The key being built.
    scratch: Vec<FrameKey>,
    /// Every callsite's frames one after the other: callsite `i`'s are
    /// `keys[starts[i]..starts[i + 1]]`.
    keys: Vec<FrameKey>,
    starts: Vec<usize>,
    /// Callsites by the hash of their frames: the first with that hash, then `chain` onwards.
    by_hash: FxHashMap<u64, u32>,
    chain: Vec<Option<u32>>,
    /// Symbolized frames, each (module, offset) once: a range of `lines`.
    syms: FxHashMap<FrameKey, (u32, u32)>,
    lines: Vec<SymFrame>,
    /// Each callsite's report frames, once symbolized.
    symbolized: Vec<Option<SiteLines>>,
    /// The process's perf map (`/tmp/perf-PID.map`, written by JITs: node
    /// `--perf-basic-prof`, Java's perf agents, Python 3.12's `-X perf`), read on the first frame
    /// outside every module: (start, end, name), sorted.
    perf_map: Option<Vec<(u64, u64, String)>>,
}

/// Reads a perf map: lines of `START SIZE NAME` (hexadecimal), sorted by start.
pub fn parse_perf_map(text: &str) -> Vec<(u64, u64, String)> {
    let mut v: Vec<(u64, u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let start = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            let name = f.next()?.trim();
            (size > 0 && !name.is_empty())
                .then(|| (start, start.saturating_add(size), name.to_string()))
        })
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

/// A JIT frame from its perf map name: V8's `JS:*name /app.js:12:5` (also `LazyCompile:` and
/// `Function:`; the tier marker `~ ^ + *` dropped, as the same function changes tiers while it
/// runs) gives function `name`, file and line (where the function starts: perf maps have no
/// line of the call); CPython 3.12's `py::name:/app.py` gives function and file; any other name
/// (Java's `void Cls.method(int)`) is the function. The raw name stays as the linkage name.
pub fn jit_frame(raw: &str) -> SymFrame {
    let mut f = SymFrame {
        function: Some(raw.to_string()),
        mangled: Some(raw.to_string()),
        ..SymFrame::default()
    };
    if let Some(rest) = raw.strip_prefix("py::") {
        if let Some((name, file)) = rest.split_once(':') {
            f.function = Some(name.to_string());
            f.file = (!file.is_empty()).then(|| file.to_string());
        }
        return f;
    }
    let v8 = ["JS:", "LazyCompile:", "Function:", "Script:"]
        .iter()
        .find_map(|p| raw.strip_prefix(p));
    let Some(rest) = v8 else {
        return f;
    };
    let rest = rest.trim_start_matches(['~', '^', '+', '*']);
    let (name, location) = match rest.rsplit_once(' ') {
        Some((n, l)) => (n, Some(l)),
        None if rest.contains(':') && !rest.contains('(') => ("", Some(rest)),
        None => (rest, None),
    };
    f.function = Some(if name.is_empty() {
        "(anonymous)".to_string()
    } else {
        name.to_string()
    });
    if let Some(loc) = location {
        // `file:line:column` or `file:line`; the file may hold colons (`node:internal/x`).
        let numeric = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
        if let Some((head, last)) = loc.rsplit_once(':').filter(|(_, l)| numeric(l)) {
            let (file, line) = match head.rsplit_once(':') {
                Some((file, l)) if numeric(l) => (file, l),
                _ => (head, last),
            };
            f.file = Some(file.to_string());
            f.line = line.parse().ok();
        }
    }
    f
}

/// libc's start-up functions, below `main` (memcheck's list for Linux).
fn below_main(f: &str) -> bool {
    f.starts_with("__libc_start_main")
        || f == "__libc_start_call_main"
        || f.starts_with("generic_start_main")
        || f == "_start"
}

impl<'p> Callsites<'p> {
    /// The callsites of `p`'s stacks, each found when first asked for (numbered in that order).
    pub fn new(p: &'p Process) -> Callsites<'p> {
        let mut interned: FxHashMap<(&str, &[u8]), u32> = FxHashMap::default();
        let mut modules = Vec::new();
        let module_of_entry = p
            .modules
            .iter()
            .map(|m| {
                let key = (m.module.path.as_str(), m.module.build_id.as_slice());
                *interned.entry(key).or_insert_with(|| {
                    modules.push(key);
                    modules.len() as u32 - 1
                })
            })
            .collect();
        Callsites {
            p,
            modules,
            module_of_entry,
            gens: FxHashMap::default(),
            of_stack: FxHashMap::default(),
            scratch: Vec::new(),
            keys: Vec::new(),
            starts: vec![0],
            by_hash: FxHashMap::default(),
            chain: Vec::new(),
            syms: FxHashMap::default(),
            lines: Vec::new(),
            symbolized: Vec::new(),
            perf_map: None,
        }
    }

    /// How many callsites are known.
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The callsite of stack `id` (a stack whose record never arrived is one of its own).
    pub fn site(&mut self, id: u32) -> u32 {
        match self.of_stack.get(&id) {
            Some(&s) => s,
            None => self.intern_stack(id),
        }
    }

    fn intern_stack(&mut self, id: u32) -> u32 {
        let mut key = std::mem::take(&mut self.scratch);
        key.clear();
        let p = self.p;
        match p.stacks.get(&id) {
            Some(s) => {
                for &a in &s.frames {
                    key.push(match self.module_at(a, s.gen) {
                        Some((entry, bias)) => FrameKey {
                            module: self.module_of_entry[entry as usize],
                            offset: a.wrapping_sub(bias),
                        },
                        None => FrameKey {
                            module: NO_MODULE,
                            offset: a,
                        },
                    });
                }
            }
            None => key.push(FrameKey {
                module: NO_MODULE,
                offset: u64::from(id) << 32,
            }),
        }
        let site = self.intern(&key);
        self.scratch = key;
        self.of_stack.insert(id, site);
        site
    }

    fn intern(&mut self, key: &[FrameKey]) -> u32 {
        let h = FxBuildHasher.hash_one(key);
        let mut at = self.by_hash.get(&h).copied();
        while let Some(i) = at {
            if self.key(i) == key {
                return i;
            }
            at = self.chain[i as usize];
        }
        let i = self.len() as u32;
        self.keys.extend_from_slice(key);
        self.starts.push(self.keys.len());
        self.chain.push(self.by_hash.insert(h, i));
        self.symbolized.push(None);
        i
    }

    fn key(&self, site: u32) -> &[FrameKey] {
        &self.keys[self.starts[site as usize]..self.starts[site as usize + 1]]
    }

    /// The entry (index in `p.modules`) and load bias of the module loaded at generation `gen`
    /// that contains `addr`: the same answer as [`Process::module_at`], by binary search.
    fn module_at(&mut self, addr: u64, gen: u32) -> Option<(u32, u64)> {
        let p = self.p;
        let index = self.gens.entry(gen).or_insert_with(|| {
            let mut ranges: Vec<(u64, u64, u32)> = p
                .modules
                .iter()
                .enumerate()
                .filter(|(_, m)| m.module.id != u32::MAX)
                .filter(|(_, m)| m.module.gen <= gen && m.unload_gen.is_none_or(|u| u > gen))
                .flat_map(|(i, m)| {
                    m.module
                        .ranges
                        .iter()
                        .filter(|&&(s, e)| s < e)
                        .map(move |&(s, e)| (s, e, i as u32))
                })
                .collect();
            ranges.sort_unstable();
            if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
                GenIndex::Overlapping
            } else {
                GenIndex::Sorted(ranges)
            }
        });
        let entry = match index {
            GenIndex::Sorted(ranges) => {
                let i = ranges.partition_point(|r| r.0 <= addr);
                let &(_, end, entry) = ranges.get(i.checked_sub(1)?)?;
                (addr < end).then_some(entry)?
            }
            GenIndex::Overlapping => p.module_at(addr, gen)?.id,
        };
        Some((entry, p.modules[entry as usize].module.bias))
    }

    /// The callsite's frames by build-id and offset, when every frame's module has a build-id:
    /// the same code in another run of the same build has the same.
    pub fn exact(&self, site: u32) -> Option<Vec<(Vec<u8>, u64)>> {
        self.key(site)
            .iter()
            .map(|k| {
                let bid = self.modules.get(k.module as usize)?.1;
                (!bid.is_empty()).then(|| (bid.to_vec(), k.offset))
            })
            .collect()
    }

    /// The symbolized frames of `site`, innermost first, cut below `main` (valgrind shows
    /// nothing of libc's start-up code), with the runtime addresses of its stack `id`.
    pub fn frames(&mut self, site: u32, id: u32, sym: &mut Symbolizer) -> Vec<Frame> {
        if self.symbolized[site as usize].is_none() {
            let done = self.symbolize(site, sym);
            self.symbolized[site as usize] = Some(done);
        }
        let stack = self.p.stacks.get(&id);
        let key = self.key(site);
        let lines = self.symbolized[site as usize].as_deref().unwrap_or(&[]);
        lines
            .iter()
            .map(|&(i, l)| {
                let k = key[i as usize];
                let s = &self.lines[l as usize];
                Frame {
                    function: s.function.clone(),
                    mangled: s.mangled.clone(),
                    file: s.file.clone(),
                    line: s.line,
                    module: self.modules.get(k.module as usize).map(|m| m.0.to_string()),
                    offset: k.offset,
                    address: stack.map_or(0, |s| s.frames.get(i as usize).copied().unwrap_or(0)),
                    inlined: s.inlined,
                }
            })
            .collect()
    }

    /// As [`Callsites::frames`], each frame with where it comes from: the position of its
    /// return address in the stack (a function inlined there shares its caller's) and its
    /// module's (path, build-id), `None` outside every module. What the profiles (pprof) need
    /// to make one location per return address, its inlined functions as its lines.
    pub fn frames_located(
        &mut self,
        site: u32,
        id: u32,
        sym: &mut Symbolizer,
    ) -> Vec<LocatedFrame<'p>> {
        let frames = self.frames(site, id, sym);
        let key = self.key(site);
        let lines = self.symbolized[site as usize].as_deref().unwrap_or(&[]);
        lines
            .iter()
            .zip(frames)
            .map(|(&(i, _), f)| {
                (
                    i,
                    self.modules.get(key[i as usize].module as usize).copied(),
                    f,
                )
            })
            .collect()
    }

    fn symbolize(&mut self, site: u32, sym: &mut Symbolizer) -> SiteLines {
        let is_main = |s: &SymFrame| s.function.as_deref() == Some("main") && !s.inlined;
        let (from, to) = (self.starts[site as usize], self.starts[site as usize + 1]);
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (i, at) in (from..to).enumerate() {
            // Like valgrind, stop at main: what lies below is libc start-up code, and not looking
            // it up spares loading libc's debug information.
            if out
                .last()
                .is_some_and(|&(_, l)| is_main(&self.lines[l as usize]))
            {
                break;
            }
            // The tracer's own frames (its wrapper of main) are never part of a stack.
            if self.is_tracer(self.keys[at]) {
                continue;
            }
            let (first, n) = self.frame_lines(self.keys[at], sym);
            out.extend((first..first + n).map(|l| (i as u32, l)));
        }
        if let Some(i) = out
            .iter()
            .position(|&(_, l)| is_main(&self.lines[l as usize]))
        {
            out.truncate(i + 1);
        } else if let Some(i) = out.iter().position(|&(_, l)| {
            self.lines[l as usize]
                .function
                .as_deref()
                .is_some_and(below_main)
        }) {
            // No main (a stripped program): as memcheck, cut at the innermost libc start-up
            // function and call it "(below main)".
            let mut f = self.lines[out[i].1 as usize].clone();
            f.function = Some("(below main)".into());
            f.mangled = None;
            self.lines.push(f);
            out[i].1 = self.lines.len() as u32 - 1;
            out.truncate(i + 1);
        }
        out.into_boxed_slice()
    }

    /// The frame of a return address outside every module, from the process's perf map.
    fn perf_name(&mut self, addr: u64) -> Option<SymFrame> {
        let pid = self.p.pid();
        let map = self.perf_map.get_or_insert_with(|| {
            crate::orphans::read_regular(&format!("/tmp/perf-{pid}.map"), 256 << 20)
                .map(|t| parse_perf_map(&t))
                .unwrap_or_default()
        });
        let at = addr.saturating_sub(1);
        let i = map.partition_point(|e| e.0 <= at).checked_sub(1)?;
        let (_, end, name) = &map[i];
        (at < *end).then(|| jit_frame(name))
    }

    /// Whether a frame lies in the preload library itself.
    fn is_tracer(&self, k: FrameKey) -> bool {
        self.modules.get(k.module as usize).is_some_and(|m| {
            m.0.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with("libleakhunt"))
        })
    }

    /// The source frames of one (module, offset), looked up once: at least one (a frame with
    /// no symbols has no function, file or line).
    fn frame_lines(&mut self, k: FrameKey, sym: &mut Symbolizer) -> (u32, u32) {
        if let Some(&r) = self.syms.get(&k) {
            return r;
        }
        let mut found = match self.modules.get(k.module as usize) {
            Some(&(path, bid)) => sym.symbolize(path, bid, k.offset.saturating_sub(1)),
            // An interpreter's frame, named in the trace.
            None if k.offset >= leakhunt_format::PSEUDO_FRAME_BASE => self
                .p
                .frame_names
                .get(&k.offset)
                .map(|(function, file, line)| SymFrame {
                    function: Some(function.clone()),
                    file: (!file.is_empty()).then(|| file.clone()),
                    line: (*line > 0).then_some(*line),
                    ..SymFrame::default()
                })
                .into_iter()
                .collect(),
            // Outside every module: code a JIT made, named by its perf map if it wrote one.
            None => self.perf_name(k.offset).into_iter().collect(),
        };
        if found.is_empty() {
            found.push(SymFrame::default());
        }
        let r = (self.lines.len() as u32, found.len() as u32);
        self.lines.extend(found);
        self.syms.insert(k, r);
        r
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn perf_maps_name_jit_code() {
        let m = parse_perf_map(
            "7f0000001000 40 LazyCompile:*handle /srv/app.js:12\n\
             bad line\n\
             7f0000000000 100 py::main:/srv/x.py\n\
             0x7f0000002000 0x10 Interpreter\n",
        );
        assert_eq!(
            m,
            [
                (
                    0x7f00_0000_0000,
                    0x7f00_0000_0100,
                    "py::main:/srv/x.py".to_string()
                ),
                (
                    0x7f00_0000_1000,
                    0x7f00_0000_1040,
                    "LazyCompile:*handle /srv/app.js:12".to_string()
                ),
                (
                    0x7f00_0000_2000,
                    0x7f00_0000_2010,
                    "Interpreter".to_string()
                ),
            ]
        );
    }

    #[test]
    fn jit_frames_from_perf_map_names() {
        let f = jit_frame("JS:*holdBuffers /srv/app.js:2:21");
        assert_eq!(f.function.as_deref(), Some("holdBuffers"));
        assert_eq!(f.file.as_deref(), Some("/srv/app.js"));
        assert_eq!(f.line, Some(2));
        assert_eq!(
            f.mangled.as_deref(),
            Some("JS:*holdBuffers /srv/app.js:2:21")
        );
        let f = jit_frame("JS:~listOnTimeout node:internal/timers:524:25");
        assert_eq!(f.function.as_deref(), Some("listOnTimeout"));
        assert_eq!(f.file.as_deref(), Some("node:internal/timers"));
        assert_eq!(f.line, Some(524));
        let f = jit_frame("JS:^ /srv/app.js:7:28");
        assert_eq!(f.function.as_deref(), Some("(anonymous)"));
        assert_eq!(f.line, Some(7));
        let f = jit_frame("LazyCompile:*handle /srv/app.js:12");
        assert_eq!(f.function.as_deref(), Some("handle"));
        assert_eq!((f.file.as_deref(), f.line), (Some("/srv/app.js"), Some(12)));
        let f = jit_frame("py::serve:/srv/app.py");
        assert_eq!(f.function.as_deref(), Some("serve"));
        assert_eq!((f.file.as_deref(), f.line), (Some("/srv/app.py"), None));
        let f = jit_frame("void Hold.holdDirect(int)");
        assert_eq!(f.function.as_deref(), Some("void Hold.holdDirect(int)"));
        assert_eq!((f.file, f.line), (None, None));
        let f = jit_frame("Builtin:ArrayPrototypePush");
        assert_eq!(f.function.as_deref(), Some("Builtin:ArrayPrototypePush"));
    }

    use super::*;
    use crate::process::{ModuleEntry, Stack};
    use leakhunt_format::encode::Module;
    use leakhunt_format::StopReason;

    fn module(id: u32, gen: u32, path: &str, ranges: &[(u64, u64)]) -> ModuleEntry {
        ModuleEntry {
            module: Module {
                id,
                gen,
                bias: 0x100 * (u64::from(id) + 1),
                path: path.into(),
                build_id: vec![id as u8 % 2 + 1],
                ranges: ranges.to_vec(),
            },
            unload_gen: None,
        }
    }

    #[test]
    fn module_lookup_by_range_index_is_the_scan_s_answer() {
        let mut p = Process::new();
        p.modules = vec![
            module(0, 0, "/bin/prog", &[(0x1000, 0x2000), (0x2000, 0x2800)]),
            module(1, 0, "/lib/a.so", &[(0x4000, 0x5000)]),
            // Unloaded at generation 3; another loaded at its place at 3.
            module(2, 1, "/lib/b.so", &[(0x6000, 0x7000)]),
            module(3, 3, "/lib/c.so", &[(0x6000, 0x6800), (0x9000, 0x9000)]),
            // Overlaps a.so from generation 5 on: the scan's order decides there.
            module(4, 5, "/lib/d.so", &[(0x4800, 0x5800)]),
        ];
        p.modules[2].unload_gen = Some(3);
        // An unused id.
        p.modules.push(module(u32::MAX, 0, "", &[(0, u64::MAX)]));
        let mut cs = Callsites::new(&p);
        for gen in 0..7 {
            for addr in (0..0xa000)
                .step_by(0x100)
                .flat_map(|a| [a, a + 1, a + 0xff])
            {
                let scan = p.module_at(addr, gen).map(|m| (m.id, m.bias));
                assert_eq!(cs.module_at(addr, gen), scan, "{addr:#x} at {gen}");
            }
        }
    }

    #[test]
    fn stacks_of_the_same_code_are_one_callsite_and_frames_keep_their_addresses() {
        let mut p = Process::new();
        // The same library loaded twice at different places (unloaded in between): same path
        // and build-id, so the same module.
        p.modules = vec![
            module(0, 0, "/lib/a.so", &[(0x1000, 0x2000)]),
            module(1, 2, "/lib/a.so", &[(0x8000, 0x9000)]),
        ];
        p.modules[1].module.id = 1;
        p.modules[1].module.bias = p.modules[0].module.bias + 0x7000;
        p.modules[1].module.build_id = p.modules[0].module.build_id.clone();
        p.modules[0].unload_gen = Some(2);
        let stack = |gen, frames: &[u64]| Stack {
            gen,
            reason: StopReason::End,
            frames: frames.to_vec(),
        };
        p.stacks.insert(7, stack(0, &[0x1010, 0x1020]));
        p.stacks.insert(9, stack(2, &[0x8010, 0x8020]));
        p.stacks.insert(8, stack(0, &[0x1010, 0x1030]));
        p.stacks.insert(3, stack(0, &[0x1010, 0x3000]));
        let mut cs = Callsites::new(&p);
        // Numbered as first asked for; an unknown stack is a callsite of its own.
        assert_eq!([cs.site(3), cs.site(7), cs.site(8)], [0, 1, 2]);
        assert_eq!(cs.site(9), 1);
        assert_eq!(cs.site(1234), 3);
        assert_eq!(cs.site(1234), 3);
        assert_eq!(cs.len(), 4);
        // Only a stack whose every frame has a build-id has an exact key.
        let bid = p.modules[0].module.build_id.clone();
        let off = 0x1010 - p.modules[0].module.bias;
        assert_eq!(
            cs.exact(1),
            Some(vec![(bid.clone(), off), (bid, off + 0x10)])
        );
        assert_eq!(cs.exact(0), None);
        assert_eq!(cs.exact(3), None);
        let mut sym = Symbolizer::new();
        let mut frames = |cs: &mut Callsites, id| {
            let site = cs.site(id);
            cs.frames(site, id, &mut sym)
                .iter()
                .map(|f| (f.module.clone(), f.offset, f.address))
                .collect::<Vec<_>>()
        };
        let a = Some("/lib/a.so".to_string());
        assert_eq!(
            frames(&mut cs, 7),
            [(a.clone(), off, 0x1010), (a.clone(), off + 0x10, 0x1020)]
        );
        assert_eq!(
            frames(&mut cs, 9),
            [(a.clone(), off, 0x8010), (a.clone(), off + 0x10, 0x8020)]
        );
        assert_eq!(
            frames(&mut cs, 3),
            [(a, off, 0x1010), (None, 0x3000, 0x3000)]
        );
        assert_eq!(frames(&mut cs, 1234), [(None, 1234 << 32, 0)]);
    }
}
