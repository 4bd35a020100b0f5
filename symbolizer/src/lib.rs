//! Turns (module, address) into source frames: function (demangled C++/Rust), file, line and
//! inlined frames from DWARF; the symbol table when there is no DWARF; module+offset when there is
//! neither. Separate debug files are found through `/usr/lib/debug/.build-id/` and
//! `.gnu_debuglink`. Modules are loaded lazily, once, and a module that cannot be read is a
//! warning, never an error: missing debug info never fails a report.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::{Object, ObjectSection};

/// One source-level frame. A return address can expand to several: the inlined calls first,
/// then the function that contains them (`inlined == false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SymFrame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

type Reader = gimli::EndianArcSlice<gimli::RunTimeEndian>;

/// A separate debug file's DWARF (see [`DebugFile::load`]).
struct DebugFile {
    /// The sections symbolization reads, inflated.
    sections: HashMap<gimli::SectionId, Reader>,
    endian: gimli::RunTimeEndian,
    /// `.debug_aranges`: (start, end, offset of the compilation unit), sorted by start.
    aranges: Vec<(u64, u64, usize)>,
    /// A context over one compilation unit each, by unit offset (`None`: the unit refers to
    /// others, so only the whole file's context reads it right).
    units: HashMap<usize, Option<addr2line::Context<Reader>>>,
    /// The whole file's context, built on first need.
    whole: Option<Option<addr2line::Context<Reader>>>,
}

/// Attribute forms that refer into another unit or another file: a unit using any is read only
/// through the whole file's context.
fn refers_outside(form: u64) -> bool {
    matches!(
        form,
        0x10 /* ref_addr */ | 0x16 /* indirect */ | 0x1c | 0x24 /* ref_sup4, ref_sup8 */
            | 0x1d /* strp_sup */ | 0x1f20 | 0x1f21 /* GNU_ref_alt, GNU_strp_alt */
    )
}

/// Whether the abbreviation table at `offset` uses a form that [`refers_outside`].
fn abbrevs_refer_outside(abbrev: &Reader, offset: usize) -> gimli::Result<bool> {
    use gimli::Reader as _;
    let mut r = abbrev.clone();
    r.skip(offset)?;
    loop {
        if r.read_uleb128()? == 0 {
            return Ok(false);
        }
        r.read_uleb128()?; // tag
        r.read_u8()?; // children
        loop {
            let (name, form) = (r.read_uleb128()?, r.read_uleb128()?);
            if name == 0 && form == 0 {
                break;
            }
            if refers_outside(form) {
                return Ok(true);
            }
            if form == 0x21 {
                r.read_sleb128()?; // implicit_const's value
            }
        }
    }
}

impl DebugFile {
    /// Loads what symbolization needs of a separate debug file. Distributions compress these
    /// files' sections (libc's `.debug_info` inflates to 5.8 MB); location lists, which
    /// symbolization never reads, are left alone. Units are parsed only when an address in them
    /// is looked up: addr2line's context over the whole of libc's 1,700 units cost 28 ms to build
    /// for the two frames a thread's stack has there (start_thread, clone3).
    fn load(path: &Path) -> Option<DebugFile> {
        let data = std::fs::read(path).ok()?;
        let obj = object::File::parse(&*data).ok()?;
        let endian = if obj.is_little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let inflate = |id: gimli::SectionId| -> Arc<[u8]> {
            match id {
                gimli::SectionId::DebugLoc | gimli::SectionId::DebugLocLists => Arc::new([]),
                _ => obj
                    .section_by_name(id.name())
                    .and_then(|s| s.uncompressed_data().ok())
                    .map_or_else(|| Arc::new([]) as Arc<[u8]>, |d| d.into_owned().into()),
            }
        };
        let mut sections = HashMap::new();
        // The largest section inflates on a second thread while this one does the others.
        let (info, dwarf) = std::thread::scope(|sc| {
            let info = sc.spawn(|| inflate(gimli::SectionId::DebugInfo));
            let dwarf = gimli::Dwarf::load(|id| -> Result<Reader, ()> {
                if id == gimli::SectionId::DebugInfo {
                    return Ok(gimli::EndianArcSlice::new(Arc::new([]), endian));
                }
                let r = gimli::EndianArcSlice::new(inflate(id), endian);
                sections.insert(id, r.clone());
                Ok(r)
            });
            (info.join(), dwarf)
        });
        let (Ok(info), Ok(dwarf)) = (info, dwarf) else {
            return None;
        };
        sections.insert(
            gimli::SectionId::DebugInfo,
            gimli::EndianArcSlice::new(info, endian),
        );
        let mut aranges = Vec::new();
        let mut headers = dwarf.debug_aranges.headers();
        while let Ok(Some(h)) = headers.next() {
            let unit = h.debug_info_offset().0;
            let mut entries = h.entries();
            while let Ok(Some(e)) = entries.next() {
                let r = e.range();
                if r.end > r.begin {
                    aranges.push((r.begin, r.end, unit));
                }
            }
        }
        aranges.sort_unstable();
        Some(DebugFile {
            sections,
            endian,
            aranges,
            units: HashMap::new(),
            whole: None,
        })
    }

    /// The DWARF, with `.debug_info` replaced by `info` (and no `.debug_aranges` then).
    fn dwarf(&self, info: Option<Reader>) -> gimli::Dwarf<Reader> {
        let empty = gimli::EndianArcSlice::new(Arc::new([]), self.endian);
        let cut = info.is_some();
        let Ok(dwarf) = gimli::Dwarf::load(|id| -> Result<Reader, std::convert::Infallible> {
            Ok(match id {
                gimli::SectionId::DebugInfo if cut => info.clone().unwrap_or(empty.clone()),
                gimli::SectionId::DebugAranges if cut => empty.clone(),
                _ => self.sections.get(&id).cloned().unwrap_or(empty.clone()),
            })
        });
        dwarf
    }

    /// The context that reads `vaddr`: its unit's own, or the whole file's.
    fn context(&mut self, vaddr: u64) -> Option<&addr2line::Context<Reader>> {
        let i = self.aranges.partition_point(|r| r.0 <= vaddr);
        let unit = i
            .checked_sub(1)
            .map(|i| self.aranges[i])
            .filter(|r| vaddr < r.1)
            .map(|r| r.2);
        if let Some(unit) = unit {
            if !self.units.contains_key(&unit) {
                let c = self.unit_context(unit);
                self.units.insert(unit, c);
            }
            if self.units.get(&unit).is_some_and(Option::is_some) {
                return self.units.get(&unit).and_then(Option::as_ref);
            }
        }
        if self.whole.is_none() {
            self.whole = Some(addr2line::Context::from_dwarf(self.dwarf(None)).ok());
        }
        self.whole.as_ref().and_then(Option::as_ref)
    }

    /// A context over the unit at `offset` alone: the DWARF with `.debug_info` cut to that unit
    /// (references inside a unit are relative to it; other sections are reached by absolute
    /// offsets, unchanged), or `None` when the unit refers outside itself.
    fn unit_context(&self, offset: usize) -> Option<addr2line::Context<Reader>> {
        use gimli::Reader as _;
        let info = self.sections.get(&gimli::SectionId::DebugInfo)?;
        let abbrev = self.sections.get(&gimli::SectionId::DebugAbbrev)?;
        let header = gimli::DebugInfo::from(info.clone())
            .header_from_offset(gimli::DebugInfoOffset(offset))
            .ok()?;
        if !matches!(header.type_(), gimli::UnitType::Compilation)
            || abbrevs_refer_outside(abbrev, header.debug_abbrev_offset().0).unwrap_or(true)
        {
            return None;
        }
        let mut cut = info.clone();
        cut.skip(offset).ok()?;
        cut.truncate(header.length_including_self()).ok()?;
        addr2line::Context::from_dwarf(self.dwarf(Some(cut))).ok()
    }
}

struct Module {
    /// DWARF of the module's separate debug file, if it has one.
    dwarf: Option<DebugFile>,
    /// Symbol-table source (the module itself).
    symbols: Option<addr2line::Loader>,
    /// Function symbols (symtab and dynsym) sorted by address, aliases included, for choosing
    /// the public name of a C function the way valgrind does.
    functions: Vec<(u64, u64, String)>,
}

/// Function symbols of an ELF file: (address, size, name), sorted by address.
fn function_symbols(obj: &object::File) -> Vec<(u64, u64, String)> {
    use object::{ObjectSymbol, SymbolKind};
    let mut v: Vec<(u64, u64, String)> = obj
        .symbols()
        .chain(obj.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
        .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Of several names for one address, the one valgrind shows: unversioned, fewest leading
/// underscores, then shortest, then alphabetical (`asprintf` over `___asprintf` and `_IO_asprintf`).
fn preferred<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names.min_by_key(|n| {
        (
            n.contains('@'),
            n.len() - n.trim_start_matches('_').len(),
            n.len(),
            n.to_string(),
        )
    })
}

impl Module {
    /// The public alias of the C function that `dwarf_name` names at `vaddr`, if it has one.
    fn public_name(&self, dwarf_name: &str, vaddr: u64) -> Option<&str> {
        if dwarf_name.starts_with("_Z") || dwarf_name.starts_with("_R") {
            return None;
        }
        let f = &self.functions;
        let i = f.partition_point(|s| s.0 <= vaddr).checked_sub(1)?;
        let start = f[i].0;
        let at: Vec<&(u64, u64, String)> = f.iter().filter(|s| s.0 == start).collect();
        if !at.iter().any(|s| vaddr < s.0 + s.1.max(1)) {
            return None;
        }
        let bare = |n: &str| {
            n.trim_start_matches("__GI_")
                .trim_start_matches('_')
                .to_string()
        };
        if !at
            .iter()
            .any(|s| s.2 == dwarf_name || bare(&s.2) == bare(dwarf_name))
        {
            return None;
        }
        preferred(at.iter().map(|s| s.2.as_str()))
    }
}

/// Appends the source frames of one address, innermost first.
fn push_frames<R: gimli::Reader>(mut frames: addr2line::FrameIter<'_, R>, out: &mut Vec<SymFrame>) {
    while let Ok(Some(f)) = frames.next() {
        let function = f
            .function
            .as_ref()
            .and_then(|n| n.demangle().ok())
            .map(Cow::into_owned);
        let (file, line) = match &f.location {
            Some(l) => (l.file.map(str::to_string), l.line),
            None => (None, None),
        };
        out.push(SymFrame {
            function,
            file,
            line,
            inlined: true,
        });
    }
}

/// Symbolizer with a per-module cache.
#[derive(Default)]
pub struct Symbolizer {
    modules: HashMap<(String, Vec<u8>), Module>,
    warnings: Vec<String>,
    /// Extra root for debug files (tests); `/usr/lib/debug` is always searched.
    debug_roots: Vec<PathBuf>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Symbolizer {
    pub fn new() -> Symbolizer {
        Symbolizer {
            debug_roots: vec![PathBuf::from("/usr/lib/debug")],
            ..Default::default()
        }
    }

    /// Problems met so far (unreadable modules, build-id mismatches), each once.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    /// The separate debug file for a module, if one is installed.
    fn debug_file(&self, path: &Path, build_id: &[u8], data: &[u8]) -> Option<PathBuf> {
        if build_id.len() >= 2 {
            let h = hex(build_id);
            for root in &self.debug_roots {
                let p = root
                    .join(".build-id")
                    .join(&h[..2])
                    .join(format!("{}.debug", &h[2..]));
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        let obj = object::File::parse(data).ok()?;
        let (name, _crc) = obj.gnu_debuglink().ok().flatten()?;
        let name = String::from_utf8_lossy(name).into_owned();
        let dir = path.parent()?;
        let mut candidates = vec![dir.join(&name), dir.join(".debug").join(&name)];
        for root in &self.debug_roots {
            candidates.push(root.join(dir.strip_prefix("/").unwrap_or(dir)).join(&name));
        }
        candidates.into_iter().find(|p| p.is_file() && p != path)
    }

    fn load(&mut self, path: &str, build_id: &[u8]) -> Module {
        let p = Path::new(path);
        let data = match std::fs::read(p) {
            Ok(d) => d,
            Err(e) => {
                if !path.starts_with('[') && !path.starts_with("linux-vdso") {
                    self.warn(format!(
                        "cannot read module {path}: {e}; its frames show as module+offset"
                    ));
                }
                return Module {
                    dwarf: None,
                    symbols: None,
                    functions: vec![],
                };
            }
        };
        let obj = match object::File::parse(&*data) {
            Ok(o) => o,
            Err(e) => {
                self.warn(format!(
                    "{path} is not a readable ELF file ({e}); its frames show as module+offset"
                ));
                return Module {
                    dwarf: None,
                    symbols: None,
                    functions: vec![],
                };
            }
        };
        if !build_id.is_empty() {
            match obj.build_id().ok().flatten().map(<[u8]>::to_vec) {
                Some(found) if found != build_id => {
                    self.warn(format!(
                        "build-id mismatch for {path}: expected {}, found {}; the file changed since the run, its frames show as module+offset",
                        hex(build_id),
                        hex(&found)
                    ));
                    return Module {
                        dwarf: None,
                        symbols: None,
                        functions: vec![],
                    };
                }
                _ => {}
            }
        }
        let functions = function_symbols(&obj);
        let has_dwarf = obj
            .section_by_name(".debug_info")
            .is_some_and(|s| s.size() > 0);
        drop(obj);
        let symbols = addr2line::Loader::new(p).ok();
        let dwarf = if has_dwarf {
            None
        } else {
            self.debug_file(p, build_id, &data)
                .and_then(|d| DebugFile::load(&d))
        };
        Module {
            dwarf,
            symbols,
            functions,
        }
    }

    /// Frames for the instruction at `vaddr` (an address in the module's ELF address space, i.e.
    /// runtime address minus load bias). For a return address pass the address minus one.
    pub fn symbolize(&mut self, path: &str, build_id: &[u8], vaddr: u64) -> Vec<SymFrame> {
        let key = (path.to_string(), build_id.to_vec());
        if !self.modules.contains_key(&key) {
            let m = self.load(path, build_id);
            self.modules.insert(key.clone(), m);
        }
        let mut out = Vec::new();
        if let Some(m) = self.modules.get_mut(&key) {
            if let Some(ctx) = m.dwarf.as_mut().and_then(|d| d.context(vaddr)) {
                if let Ok(frames) = ctx.find_frames(vaddr).skip_all_loads() {
                    push_frames(frames, &mut out);
                }
            }
        }
        let m = &self.modules[&key];
        if out.is_empty() {
            if let Some(Ok(frames)) = m.symbols.as_ref().map(|l| l.find_frames(vaddr)) {
                push_frames(frames, &mut out);
            }
        }
        if let Some(last) = out.last_mut() {
            last.inlined = false;
            // glibc's DWARF names internal aliases (`__GI___strdup`, `___asprintf`); the exported
            // symbol at the same address is the name users know (`strdup`, `asprintf`), and the
            // one valgrind shows.
            if let Some(name) = last
                .function
                .as_deref()
                .and_then(|f| m.public_name(f, vaddr))
            {
                last.function = Some(name.to_string());
            }
        }
        if out.iter().all(|f| f.function.is_none()) {
            let name = m
                .symbols
                .as_ref()
                .and_then(|l| l.find_symbol(vaddr))
                .map(|n| addr2line::demangle_auto(Cow::Borrowed(n), None).into_owned());
            if let Some(name) = name {
                match out.last_mut() {
                    Some(f) => f.function = Some(name),
                    None => out.push(SymFrame {
                        function: Some(name),
                        ..Default::default()
                    }),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of `vaddr` as addr2line's own loader gives them over the whole debug file (what
    /// the symbolizer used before it read units one at a time).
    fn reference(l: &addr2line::Loader, vaddr: u64) -> Vec<SymFrame> {
        let mut out = Vec::new();
        if let Ok(frames) = l.find_frames(vaddr) {
            push_frames(frames, &mut out);
        }
        out
    }

    #[test]
    fn one_unit_at_a_time_reads_libc_as_the_whole_file_does() {
        // libc's separate debug file (libc6-dbg, which CI installs): compressed sections, 1,700
        // units. Addresses across the library, at and inside functions, inlined frames included.
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let data = std::fs::read(libc).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let build_id = obj.build_id().unwrap().unwrap().to_vec();
        let s = Symbolizer::new();
        let debug = s
            .debug_file(libc, &build_id, &data)
            .expect("libc's debug information (libc6-dbg) is installed");
        let mut file = DebugFile::load(&debug).unwrap();
        let whole = addr2line::Loader::new(&debug).unwrap();
        let functions = function_symbols(&obj);
        let (mut compared, mut inlined) = (0, 0);
        for f in functions.iter().step_by(11) {
            for off in [0, f.1 / 3, f.1 / 2] {
                let vaddr = f.0 + off;
                let mut ours = Vec::new();
                if let Some(ctx) = file.context(vaddr) {
                    if let Ok(frames) = ctx.find_frames(vaddr).skip_all_loads() {
                        push_frames(frames, &mut ours);
                    }
                }
                assert_eq!(ours, reference(&whole, vaddr), "{} + {off:#x}", f.2);
                compared += 1;
                inlined += (ours.len() > 1) as usize;
            }
        }
        assert!(
            compared > 500 && inlined > 20,
            "{compared} addresses, {inlined} inlined"
        );
        assert!(
            file.units.values().filter(|u| u.is_some()).count() > 100,
            "read one unit at a time"
        );
    }

    #[test]
    fn missing_module_is_a_warning_not_an_error() {
        let mut s = Symbolizer::new();
        assert!(s
            .symbolize("/nonexistent/libx.so", &[1, 2], 0x1000)
            .is_empty());
        assert!(s
            .symbolize("/nonexistent/libx.so", &[1, 2], 0x2000)
            .is_empty());
        assert_eq!(s.warnings().len(), 1, "{:?}", s.warnings());
        assert!(s.warnings()[0].contains("/nonexistent/libx.so"));
    }

    #[test]
    fn build_id_mismatch_names_both_ids() {
        let exe = std::env::current_exe().unwrap();
        let mut s = Symbolizer::new();
        let frames = s.symbolize(exe.to_str().unwrap(), &[0xab, 0xcd], 0x1000);
        assert!(frames.is_empty());
        assert!(
            s.warnings()[0].contains("expected abcd, found "),
            "{:?}",
            s.warnings()
        );
    }
}

#[cfg(test)]
mod alias_tests {
    use super::preferred;

    #[test]
    fn valgrinds_choice_among_aliases() {
        let names = ["___asprintf", "_IO_asprintf", "asprintf", "__asprintf"];
        assert_eq!(preferred(names.into_iter()), Some("asprintf"));
        assert_eq!(
            preferred(["__strdup", "strdup"].into_iter()),
            Some("strdup")
        );
        assert_eq!(
            preferred(["memcpy@GLIBC_2.2.5", "memcpy_x"].into_iter()),
            Some("memcpy_x")
        );
    }
}
