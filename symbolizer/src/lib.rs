//! Turns (module, address) into source frames: function (demangled C++/Rust), file, line and
//! inlined frames from DWARF; the symbol table when there is no DWARF; module+offset when there is
//! neither. Separate debug files are found through `/usr/lib/debug/.build-id/` and
//! `.gnu_debuglink`. Modules are loaded lazily, once, and a module that cannot be read is a
//! warning, never an error: missing debug info never fails a report.
//!
//! Module paths come from the trace, which can name anything: only regular ELF files of at most
//! [`MAX_FILE_BYTES`] are read (see [`open_elf`]); a FIFO, a device, a directory or a huge file is
//! a warning that names it, never a hang or a read until memory runs out.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::{Object, ObjectSection};

mod cache;
mod cfi;
mod vars;
pub use cfi::FrameRule;
pub use vars::{Member, TypeRef, Variable};

/// One source-level frame. A return address can expand to several: the inlined calls first,
/// then the function that contains them (`inlined == false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SymFrame {
    pub function: Option<String>,
    /// The function's linkage (mangled) name, when it differs from `function`: what memcheck's
    /// suppressions match `fun:` against.
    pub mangled: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

type Reader = gimli::EndianArcSlice<gimli::RunTimeEndian>;

/// The largest module or separate debug file read (4 GiB): symbolization reads the parts it
/// needs, variables and frame rules a file whole into memory, and a larger one is refused with
/// a warning rather than read.
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// Why a file was not read (see [`open_elf`]).
#[derive(Debug)]
enum Unread {
    /// It could not be opened or read: missing, not permitted, an I/O error.
    Io(std::io::Error),
    /// It is not a regular ELF file of a size that is read: what it is instead, as the words
    /// after its path ("is a FIFO, not an ELF file").
    Refused(String),
}

/// What a file that is not a regular file is, with its article ("a FIFO"): for messages that
/// refuse it (the CLI names a trace that is not a file the same way).
pub fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Opens `path` if it is a regular ELF file of at most [`MAX_FILE_BYTES`]. It is opened with
/// `O_NONBLOCK` (opening a FIFO never blocks) and checked on the open descriptor (a rename in
/// between cannot swap it), and its first four bytes must be the ELF magic. Returns the open file
/// and its length.
fn open_elf(path: &Path) -> Result<(File, u64), Unread> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            // A socket cannot be opened at all (ENXIO): say what it is.
            Ok(m) if !m.is_file() => {
                Unread::Refused(format!("is {}, not an ELF file", file_kind(m.file_type())))
            }
            _ => Unread::Io(e),
        })?;
    let meta = file.metadata().map_err(Unread::Io)?;
    if !meta.is_file() {
        return Err(Unread::Refused(format!(
            "is {}, not an ELF file",
            file_kind(meta.file_type())
        )));
    }
    let len = meta.len();
    if len > MAX_FILE_BYTES {
        return Err(Unread::Refused(format!(
            "is {len} bytes, more than the {} GiB leakhunt reads of one file",
            MAX_FILE_BYTES >> 30
        )));
    }
    // Files of /proc that show a size of 0 (/proc/self/mem) are not read at all.
    if len < 4 {
        return Err(Unread::Refused(format!(
            "is {len} bytes long, not an ELF file"
        )));
    }
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).map_err(Unread::Io)?;
    if &magic != b"\x7fELF" {
        return Err(Unread::Refused(
            "is not an ELF file (it does not start with the ELF magic)".into(),
        ));
    }
    Ok((file, len))
}

/// Reads `path` whole if [`open_elf`] opens it (the magic is checked before the rest is read: a
/// huge sparse file of zeros fails at once). Returns the data and the open file.
fn read_elf(path: &Path) -> Result<(Vec<u8>, File), Unread> {
    use std::io::Read;
    let (file, len) = open_elf(path)?;
    let mut data = Vec::new();
    if data.try_reserve_exact(len as usize).is_err() {
        return Err(Unread::Refused(format!(
            "is {len} bytes, more than this machine's memory holds"
        )));
    }
    (&file)
        .take(len)
        .read_to_end(&mut data)
        .map_err(Unread::Io)?;
    Ok((data, file))
}

/// A file [`open_elf`] opened, read where the parser asks (the ELF headers, the sections it
/// reads) rather than whole: a separate debug file's compressed sections that are kept inflated
/// (`cache`) need only their last four bytes. (Not for symbol tables: each name is a read.)
type Lazy = object::ReadCache<File>;

/// The `.gnu_debuglink` name of an ELF file, if it has one.
fn debuglink<'d, R: object::ReadRef<'d>>(obj: &object::File<'d, R>) -> Option<Vec<u8>> {
    obj.gnu_debuglink()
        .ok()
        .flatten()
        .map(|(n, _crc)| n.to_vec())
}

/// Whether an error opening a candidate path only says that nothing is there.
fn absent(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

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

/// How a section's bytes are had: a large zlib-compressed one through the inflated copy kept
/// between runs (`cache`), under the debug file's build-id, when there is one; else inflated
/// from the file; else as the file holds them.
enum Source {
    Zlib {
        /// Where the compressed stream lies in the file, and its inflated size.
        offset: u64,
        size: u64,
        n: usize,
        /// The cache's key and the stream's adler32 (a large section only).
        kept: Option<(String, u32)>,
    },
    Plain(Arc<[u8]>),
}

impl Source {
    /// Reads of the file only what deciding takes: a compressed section's last four bytes (the
    /// zlib stream ends with the adler32 of the inflated bytes, big-endian).
    fn of<'d, R: object::ReadRef<'d>>(
        data: R,
        s: &object::Section<'d, '_, R>,
        build_id: &[u8],
    ) -> Option<Source> {
        let r = s.compressed_file_range().ok()?;
        if r.format != object::CompressionFormat::Zlib {
            return s
                .uncompressed_data()
                .ok()
                .map(|d| Source::Plain(d.into_owned().into()));
        }
        let n = usize::try_from(r.uncompressed_size).ok()?;
        let kept = (r.compressed_size >= cache::MIN_COMPRESSED as u64)
            .then(|| {
                // (A corrupt header's offset may not add up: no kept copy then.)
                let last = r.offset.checked_add(r.compressed_size - 4)?;
                let t = data.read_bytes_at(last, 4).ok()?;
                let adler = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
                Some((cache::key(build_id, s.name().ok()?, n, adler), adler))
            })
            .flatten();
        Some(Source::Zlib {
            offset: r.offset,
            size: r.compressed_size,
            n,
            kept,
        })
    }

    /// The inflated copy kept between runs, if it is there whole.
    fn kept(&self) -> Option<Arc<[u8]>> {
        match self {
            Source::Zlib {
                n,
                kept: Some((key, adler)),
                ..
            } => cache::load(key, *n, *adler),
            _ => None,
        }
    }

    /// The section's bytes from the stream `compressed` (the file's bytes at `offset`, `size`
    /// long), inflated straight into an `Arc` of their own and kept (inflated into a `Vec` and
    /// then copied, both were held at once: libc's 5.8 MB `.debug_info` twice at the CLI's
    /// peak); a plain section's as they are.
    fn inflated(self, compressed: Option<&[u8]>) -> Option<Arc<[u8]>> {
        match self {
            Source::Plain(d) => Some(d),
            Source::Zlib { n, kept, .. } => {
                let mut out: Arc<[u8]> = std::iter::repeat_n(0u8, n).collect();
                let buf = Arc::get_mut(&mut out)?;
                let mut z = flate2::Decompress::new(true);
                let done = z.decompress(compressed?, buf, flate2::FlushDecompress::Finish);
                // (Inflating to the stream's end checks its adler32.)
                if !(matches!(done, Ok(flate2::Status::StreamEnd)) && z.total_out() == n as u64) {
                    return None;
                }
                if let Some((key, _)) = kept {
                    cache::store(&key, &out);
                }
                Some(out)
            }
        }
    }

    /// The section's bytes: the kept copy, else read from the file and inflated.
    fn load<'d, R: object::ReadRef<'d>>(self, data: R) -> Option<Arc<[u8]>> {
        if let Some(d) = self.kept() {
            return Some(d);
        }
        let c = self.compressed(data);
        self.inflated(c)
    }

    /// The compressed stream, read from the file (nothing for a plain section).
    fn compressed<'d, R: object::ReadRef<'d>>(&self, data: R) -> Option<&'d [u8]> {
        match *self {
            Source::Zlib { offset, size, .. } => data.read_bytes_at(offset, size).ok(),
            Source::Plain(_) => None,
        }
    }
}

impl DebugFile {
    /// Loads what symbolization needs of a separate debug file. Distributions compress these
    /// files' sections (libc's `.debug_info` inflates to 5.8 MB); location lists, which
    /// symbolization never reads, are left alone. Units are parsed only when an address in them
    /// is looked up: addr2line's context over the whole of libc's 1,700 units cost 28 ms to build
    /// for the two frames a thread's stack has there (start_thread, clone3).
    fn parse<'d, R: object::ReadRef<'d>>(data: R) -> Option<DebugFile> {
        let obj = object::File::parse(data).ok()?;
        let endian = if obj.is_little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let build_id = obj.build_id().ok().flatten().unwrap_or(&[]);
        let source = |id: gimli::SectionId| -> Option<Source> {
            match id {
                gimli::SectionId::DebugLoc | gimli::SectionId::DebugLocLists => None,
                _ => Source::of(data, &obj.section_by_name(id.name())?, build_id),
            }
        };
        let inflate = |id: gimli::SectionId| -> Arc<[u8]> {
            source(id)
                .and_then(|s| s.load(data))
                .unwrap_or_else(|| Arc::new([]))
        };
        // The largest section loads (from its kept copy, or inflated) on a second thread while
        // this one does the others. The file is read here (its reader is not shared between
        // threads): only when nothing is kept does the thread get the compressed stream.
        let info = source(gimli::SectionId::DebugInfo);
        let present = info.as_ref().is_some_and(|s| match s {
            Source::Zlib {
                n,
                kept: Some((key, _)),
                ..
            } => cache::present(key, *n),
            _ => false,
        });
        let compressed = match &info {
            Some(s) if !present => s.compressed(data),
            _ => None,
        };
        let mut sections = HashMap::new();
        let (info, dwarf) = std::thread::scope(|sc| {
            let info =
                sc.spawn(move || info.and_then(|s| s.kept().or_else(|| s.inflated(compressed))));
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
        // A kept copy found damaged on the thread: inflated from the file here.
        let info = match info {
            Some(i) => i,
            None if present => inflate(gimli::SectionId::DebugInfo),
            None => Arc::new([]),
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
fn function_symbols<'d, R: object::ReadRef<'d>>(
    obj: &object::File<'d, R>,
) -> Vec<(u64, u64, String)> {
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
        // A C function's name is a bare identifier (a C++ or Rust one is mangled or demangled).
        if dwarf_name.starts_with("_Z")
            || dwarf_name.starts_with("_R")
            || !dwarf_name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
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
        // Either one of the names is the DWARF one (`__GI___strdup` at `strdup`), or the module
        // keeps only its exported names and the one covering the address is the function's
        // (glibc's `__pthread_create_2_1` is exported as `pthread_create@@GLIBC_2.34`): the
        // address lies inside that symbol, so it is the same function under its public name.
        if at
            .iter()
            .any(|s| s.2 == dwarf_name || bare(&s.2) == bare(dwarf_name))
        {
            return preferred(at.iter().map(|s| s.2.as_str()));
        }
        // (Not a C++ name: a static C++ function's DWARF name is bare, its symbol mangled.)
        preferred(
            at.iter()
                .map(|s| s.2.as_str())
                .filter(|n| !n.starts_with("_Z") && !n.starts_with("_R")),
        )
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
        let mangled = f
            .function
            .as_ref()
            .and_then(|n| n.raw_name().ok())
            .filter(|raw| function.as_deref() != Some(raw.as_ref()))
            .map(Cow::into_owned);
        let (file, line) = match &f.location {
            Some(l) => (l.file.map(str::to_string), l.line),
            None => (None, None),
        };
        out.push(SymFrame {
            function,
            mangled,
            file,
            line,
            inlined: true,
        });
    }
}

/// Symbolizer with a per-module cache.
pub struct Symbolizer {
    modules: HashMap<(String, Vec<u8>), Module>,
    warnings: Vec<String>,
    /// Extra root for debug files (tests); `/usr/lib/debug` is always searched.
    debug_roots: Vec<PathBuf>,
    /// Variables and types, loaded per module on its first data lookup (see [`vars`]).
    data: vars::Data,
    /// Call frame information, per module on its first frame rule (see [`cfi`]).
    cfi: HashMap<(String, Vec<u8>), Option<cfi::Cfi>>,
    /// Problems met loading a module ahead of its first lookup ([`Symbolizer::prefetch`]),
    /// reported at that lookup.
    deferred: HashMap<(String, Vec<u8>), Vec<String>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// As [`Symbolizer::new`]: `/usr/lib/debug` is always searched.
impl Default for Symbolizer {
    fn default() -> Symbolizer {
        Symbolizer::new()
    }
}

impl Symbolizer {
    pub fn new() -> Symbolizer {
        Symbolizer {
            modules: HashMap::new(),
            warnings: Vec::new(),
            debug_roots: vec![PathBuf::from("/usr/lib/debug")],
            data: vars::Data::default(),
            cfi: HashMap::new(),
            deferred: HashMap::new(),
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

    /// Where a module's separate debug file may be, in the order searched: by build-id under
    /// each debug root, then by `.gnu_debuglink` beside the module, in its `.debug/` and under
    /// each debug root.
    fn debug_candidates(&self, path: &Path, build_id: &[u8], link: Option<&[u8]>) -> Vec<PathBuf> {
        let mut candidates = Vec::new();
        if build_id.len() >= 2 {
            let h = hex(build_id);
            for root in &self.debug_roots {
                candidates.push(
                    root.join(".build-id")
                        .join(&h[..2])
                        .join(format!("{}.debug", &h[2..])),
                );
            }
        }
        if let (Some(name), Some(dir)) = (link, path.parent()) {
            let name = String::from_utf8_lossy(name).into_owned();
            candidates.push(dir.join(&name));
            candidates.push(dir.join(".debug").join(&name));
            for root in &self.debug_roots {
                candidates.push(root.join(dir.strip_prefix("/").unwrap_or(dir)).join(&name));
            }
        }
        candidates.retain(|c| c != path);
        candidates
    }

    /// The separate debug file for a module (its bytes `data`), read: the first candidate that
    /// is there. One that is there but cannot be read, or is not a regular ELF file, is a
    /// warning, and the search goes on.
    fn debug_file(
        &mut self,
        path: &Path,
        build_id: &[u8],
        data: &[u8],
    ) -> Option<(PathBuf, Vec<u8>)> {
        let link = object::File::parse(data).ok().and_then(|o| debuglink(&o));
        self.find_debug_file(path, build_id, link.as_deref(), |c| {
            read_elf(c).map(|(d, _)| d)
        })
    }

    /// [`Symbolizer::debug_file`], opened (see [`open_elf`]), not read; `link`: the module's
    /// `.gnu_debuglink`.
    fn open_debug_file(
        &mut self,
        path: &Path,
        build_id: &[u8],
        link: Option<&[u8]>,
    ) -> Option<(PathBuf, File)> {
        self.find_debug_file(path, build_id, link, |c| open_elf(c).map(|(f, _)| f))
    }

    fn find_debug_file<T>(
        &mut self,
        path: &Path,
        build_id: &[u8],
        link: Option<&[u8]>,
        read: impl Fn(&Path) -> Result<T, Unread>,
    ) -> Option<(PathBuf, T)> {
        for c in self.debug_candidates(path, build_id, link) {
            match read(&c) {
                Ok(d) => return Some((c, d)),
                Err(Unread::Io(e)) if absent(&e) => {}
                Err(Unread::Io(e)) => self.warn(format!(
                    "cannot read debug file {} of {}: {e}; its frames may show without file:line",
                    c.display(),
                    path.display()
                )),
                Err(Unread::Refused(why)) => self.warn(format!(
                    "debug file {} of {} {why}; its frames may show without file:line",
                    c.display(),
                    path.display()
                )),
            }
        }
        None
    }

    /// The path addr2line's loader opens for the module at `path`, already open and checked as
    /// `file`: that same open file through `/proc/self/fd`, so that a module swapped for a FIFO
    /// since the check cannot block the loader. The module's own path only where a DWARF package
    /// (`PATH.dwp`, which the loader looks for beside the path it is given) is a regular file.
    fn loader_path(&mut self, path: &Path, file: &File) -> PathBuf {
        use std::os::fd::AsRawFd;
        let mut dwp = path.as_os_str().to_owned();
        dwp.push(".dwp");
        match std::fs::metadata(&dwp) {
            Ok(m) if m.is_file() => return path.to_path_buf(),
            Ok(m) => self.warn(format!(
                "{} is {}, not a DWARF package; {} is read without it",
                Path::new(&dwp).display(),
                file_kind(m.file_type()),
                path.display()
            )),
            Err(_) => {}
        }
        let fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if fd.exists() {
            fd
        } else {
            path.to_path_buf()
        }
    }

    fn load(&mut self, path: &str, build_id: &[u8]) -> Module {
        let p = Path::new(path);
        let none = || Module {
            dwarf: None,
            symbols: None,
            functions: vec![],
        };
        // Read whole: its symbol names are read one by one (a read of a lazy file each).
        let (data, file) = match read_elf(p) {
            Ok(d) => d,
            Err(Unread::Io(e)) => {
                if !path.starts_with('[') && !path.starts_with("linux-vdso") {
                    self.warn(format!(
                        "cannot read module {path}: {e}; its frames show as module+offset"
                    ));
                }
                return none();
            }
            Err(Unread::Refused(why)) => {
                self.warn(format!("{path} {why}; its frames show as module+offset"));
                return none();
            }
        };
        let obj = match object::File::parse(&*data) {
            Ok(o) => o,
            Err(e) => {
                self.warn(format!(
                    "{path} is not a readable ELF file ({e}); its frames show as module+offset"
                ));
                return none();
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
                    return none();
                }
                _ => {}
            }
        }
        let functions = function_symbols(&obj);
        let has_dwarf = obj
            .section_by_name(".debug_info")
            .is_some_and(|s| s.size() > 0);
        let link = debuglink(&obj);
        drop(obj);
        drop(data);
        let symbols = addr2line::Loader::new(self.loader_path(p, &file)).ok();
        drop(file);
        let dwarf = if has_dwarf {
            None
        } else {
            self.open_debug_file(p, build_id, link.as_deref())
                .and_then(|(_, f)| DebugFile::parse(&Lazy::new(f)))
        };
        Module {
            dwarf,
            symbols,
            functions,
        }
    }

    /// Loads a module's symbols and debug information ahead of its first lookup (`leakhunt run`
    /// does it while the program runs: inflating a distribution's compressed debug file is most
    /// of a short run's report). What goes wrong is reported at the module's first lookup, as
    /// if it were loaded then, and not at all if it is never looked up.
    pub fn prefetch(&mut self, path: &str, build_id: &[u8]) {
        let key = (path.to_string(), build_id.to_vec());
        if self.modules.contains_key(&key) {
            return;
        }
        let before = self.warnings.len();
        let m = self.load(path, build_id);
        let met: Vec<String> = self.warnings.drain(before..).collect();
        if !met.is_empty() {
            self.deferred.insert(key.clone(), met);
        }
        self.modules.insert(key, m);
    }

    /// Frames for the instruction at `vaddr` (an address in the module's ELF address space, i.e.
    /// runtime address minus load bias). For a return address pass the address minus one.
    pub fn symbolize(&mut self, path: &str, build_id: &[u8], vaddr: u64) -> Vec<SymFrame> {
        let key = (path.to_string(), build_id.to_vec());
        if !self.modules.contains_key(&key) {
            let m = self.load(path, build_id);
            self.modules.insert(key.clone(), m);
        }
        if !self.deferred.is_empty() {
            for w in self.deferred.remove(&key).unwrap_or_default() {
                self.warn(w);
            }
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
                last.mangled = None;
            }
        }
        if out.iter().all(|f| f.function.is_none()) {
            let raw = m.symbols.as_ref().and_then(|l| l.find_symbol(vaddr));
            let name = raw.map(|n| addr2line::demangle_auto(Cow::Borrowed(n), None).into_owned());
            let mangled = raw
                .filter(|r| Some(*r) != name.as_deref())
                .map(str::to_string);
            if let Some(name) = name {
                match out.last_mut() {
                    Some(f) => {
                        f.function = Some(name);
                        f.mangled = mangled;
                    }
                    None => out.push(SymFrame {
                        function: Some(name),
                        mangled,
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
        let mut s = Symbolizer::new();
        let (debug, debug_data) = s
            .debug_file(libc, &build_id, &data)
            .expect("libc's debug information (libc6-dbg) is installed");
        let mut file = DebugFile::parse(&debug_data[..]).unwrap();
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

#[cfg(test)]
mod hostile_tests {
    //! Module and debug-file paths that name what is not a regular ELF file: each is a warning
    //! naming the path and what it is, given at once (a hang fails after 20 s).
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    /// A fresh directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("leakhunt-sym-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(p: &Path) {
        let st = Command::new("mkfifo").arg(p).status().unwrap();
        assert!(st.success(), "mkfifo {}", p.display());
    }

    /// Frames and warnings of one address of module `path` (build-id `bid`), on a thread given
    /// 20 s: a hang fails the test instead of blocking it.
    fn within_20s(
        path: &str,
        bid: &[u8],
        vaddr: u64,
        roots: Option<Vec<PathBuf>>,
    ) -> (Vec<SymFrame>, Vec<String>) {
        let (p, bid) = (path.to_string(), bid.to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Symbolizer::new();
            if let Some(r) = roots {
                s.debug_roots = r;
            }
            let f = s.symbolize(&p, &bid, vaddr);
            let _ = tx.send((f, s.warnings().to_vec()));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("symbolizing in {path} did not finish within 20 s"))
    }

    fn refused(path: &str, why: &str) {
        let (frames, w) = within_20s(path, &[], 0x1000, None);
        assert!(frames.is_empty(), "{frames:?}");
        assert_eq!(
            w,
            [format!("{path} {why}; its frames show as module+offset")]
        );
    }

    #[test]
    fn fifo_device_directory_socket_and_proc_files_are_refused_by_name() {
        let d = scratch("kinds");
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        refused(fifo.to_str().unwrap(), "is a FIFO, not an ELF file");
        refused("/dev/zero", "is a character device, not an ELF file");
        refused(d.to_str().unwrap(), "is a directory, not an ELF file");
        let sock = d.join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        refused(sock.to_str().unwrap(), "is a socket, not an ELF file");
        refused("/proc/self/mem", "is 0 bytes long, not an ELF file");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn huge_and_sparse_files_are_refused_without_reading_them() {
        let d = scratch("huge");
        // Sparse: neither costs disk space, and reading either whole would take seconds and
        // gigabytes.
        let huge = d.join("huge.so");
        File::create(&huge)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        refused(
            huge.to_str().unwrap(),
            "is 4294967297 bytes, more than the 4 GiB leakhunt reads of one file",
        );
        let zeros = d.join("zeros.so");
        File::create(&zeros).unwrap().set_len(1 << 30).unwrap();
        refused(
            zeros.to_str().unwrap(),
            "is not an ELF file (it does not start with the ELF magic)",
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_debug_file_that_is_a_fifo_is_a_warning_and_the_search_goes_on() {
        // /bin/true has a build-id and a .gnu_debuglink and no DWARF of its own, so its debug
        // file is searched for: here a FIFO under the build-id path, then a directory named as
        // its debuglink beside a copy.
        let d = scratch("debug");
        let data = std::fs::read("/bin/true").unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let bid = obj.build_id().unwrap().unwrap().to_vec();
        let link = String::from_utf8(obj.gnu_debuglink().unwrap().unwrap().0.to_vec()).unwrap();
        let h = hex(&bid);
        let by_id = d.join(".build-id").join(&h[..2]);
        std::fs::create_dir_all(&by_id).unwrap();
        let fifo = by_id.join(format!("{}.debug", &h[2..]));
        mkfifo(&fifo);
        let copy = d.join("true");
        std::fs::write(&copy, &data).unwrap();
        std::fs::create_dir(d.join(&link)).unwrap();
        let (_, w) = within_20s(copy.to_str().unwrap(), &bid, 0x1000, Some(vec![d.clone()]));
        let copy = copy.display();
        assert_eq!(
            w,
            [
                format!(
                    "debug file {} of {copy} is a FIFO, not an ELF file; its frames may show without file:line",
                    fifo.display()
                ),
                format!(
                    "debug file {} of {copy} is a directory, not an ELF file; its frames may show without file:line",
                    d.join(&link).display()
                ),
            ]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A function of this test binary to look up by address.
    #[inline(never)]
    fn marker_for_the_dwp_test() -> usize {
        std::hint::black_box(7)
    }

    #[test]
    fn a_dwarf_package_that_is_a_fifo_is_skipped_and_the_module_still_symbolizes() {
        // This test binary has DWARF: copied beside a FIFO named as its DWARF package, it still
        // gives a function its name and source file (addr2line's loader reads the open file
        // through /proc/self/fd and never opens the FIFO).
        assert_eq!(
            std::hint::black_box(marker_for_the_dwp_test as fn() -> usize)(),
            7
        );
        let d = scratch("dwp");
        let exe = std::env::current_exe().unwrap();
        let copy = d.join("exe");
        std::fs::copy(&exe, &copy).unwrap();
        let dwp = d.join("exe.dwp");
        mkfifo(&dwp);
        let data = std::fs::read(&copy).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let f = function_symbols(&obj)
            .into_iter()
            .find(|f| f.2.contains("marker_for_the_dwp_test"))
            .expect("the test binary has the marker's symbol");
        let (frames, w) = within_20s(copy.to_str().unwrap(), &[], f.0, None);
        assert_eq!(
            w,
            [format!(
                "{} is a FIFO, not a DWARF package; {} is read without it",
                dwp.display(),
                copy.display()
            )]
        );
        let last = frames.last().expect("frames");
        assert_eq!(
            last.function.as_deref(),
            Some("leakhunt_symbolizer::hostile_tests::marker_for_the_dwp_test")
        );
        assert!(
            last.file.as_deref().is_some_and(|f| f.ends_with("lib.rs")),
            "{frames:?}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
