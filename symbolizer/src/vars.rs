//! Data of a module: its global and thread-local variables by address, the types of variables and
//! of their members, and the likely type of a heap block from the function that allocated it.
//!
//! Nothing here is read for symbolization: a module's ELF headers and symbol tables are read on
//! the first data lookup in it, its DWARF on the first lookup that needs it (the separate debug
//! file's sections are shared with symbolization when that has inflated them already), each
//! once. The variable index walks every unit once, reading the attributes of variables only, and
//! answers by binary search after that; types read only the entries they name, parsing (and
//! keeping) one unit at a time. DWARF that does not read as expected answers `None`, never a
//! panic, and loops in it end after [`MAX_HOPS`]. Without DWARF, variables come from the ELF
//! symbol tables, with no file, line or type.
//!
//! Not read: type units (`DW_FORM_ref_sig8`), a dwz supplementary file (`.gnu_debugaltlink`),
//! split DWARF (`.dwo`), Rust enum variants (`DW_TAG_variant_part`), virtual base classes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use gimli::{AttributeValue, DwTag};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::{hex, preferred, read_elf, DebugFile, Reader, Symbolizer, Unread};

/// A global or thread-local variable of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variable {
    /// Demangled for C++ and Rust ("registry::g_cache", "myprog::CACHE").
    pub name: String,
    /// Its address in the module (a global), or its offset in the module's TLS block (a
    /// thread-local).
    pub start: u64,
    pub size: u64,
    /// `DW_AT_decl_file`, as a full path the way addr2line renders files.
    pub file: Option<String>,
    /// `DW_AT_decl_line`.
    pub line: Option<u32>,
    /// Its DWARF type, when there is DWARF.
    pub ty: Option<TypeRef>,
}

/// A DWARF type of one module: a handle that only the [`Symbolizer`] that gave it reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TypeRef {
    /// Index of the module in [`Data::modules`].
    module: usize,
    /// Offset of the type's entry in the module's `.debug_info`.
    die: usize,
}

/// What lies at an offset into an object (see [`Symbolizer::member_at`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The access path from the start of the type to the word at the offset asked, C-style:
    /// `hdr`, `buckets[3]`, `inner.next`, `[5]` for an array element; for a word inside a member
    /// that is not a pointer, the member containing it. Base classes and anonymous members add
    /// no component (their members are named directly).
    pub name: String,
    /// When the word at that offset is a pointer (or reference) member: the type it points to
    /// (`None` for `void *`).
    pub pointee: Option<TypeRef>,
}

/// The data of every module looked at so far, by (path, build-id).
#[derive(Default)]
pub(crate) struct Data {
    by_key: HashMap<(String, Vec<u8>), usize>,
    modules: Vec<DataModule>,
}

/// The most typedefs, qualifiers and nested types followed in one answer: DWARF that loops
/// answers `None` instead of recursing forever.
const MAX_HOPS: usize = 32;

/// The most types one `member_at` answer looks into.
const MAX_DESCENT: u32 = 4096;

/// Items over address ranges, sorted by start, with the greatest end of each prefix: the items
/// covering an address are found by a binary search and a walk back over only those that reach
/// past it.
struct Spans<T> {
    items: Vec<Span<T>>,
}

struct Span<T> {
    start: u64,
    /// Exclusive; `start + 1` for an item of size 0 (it covers its own address only).
    end: u64,
    /// The greatest `end` of this item and all before it.
    max_end: u64,
    item: T,
}

impl<T> Spans<T> {
    fn new(mut v: Vec<(u64, u64, T)>) -> Spans<T> {
        v.sort_by_key(|s| s.0);
        let mut max_end = 0;
        let items = v
            .into_iter()
            .map(|(start, end, item)| {
                let end = end.max(start.saturating_add(1));
                max_end = max_end.max(end);
                Span {
                    start,
                    end,
                    max_end,
                    item,
                }
            })
            .collect();
        Spans { items }
    }

    /// The same items with `more` added.
    fn with(self, more: Vec<(u64, u64, T)>) -> Spans<T> {
        if more.is_empty() {
            return self;
        }
        let mut v: Vec<(u64, u64, T)> = self
            .items
            .into_iter()
            .map(|s| (s.start, s.end, s.item))
            .collect();
        v.extend(more);
        Spans::new(v)
    }

    fn covering(&self, addr: u64) -> impl Iterator<Item = &Span<T>> {
        let i = self.items.partition_point(|s| s.start <= addr);
        self.items[..i]
            .iter()
            .rev()
            .take_while(move |s| s.max_end > addr)
            .filter(move |s| addr < s.end)
    }
}

/// An ELF symbol of a variable.
struct Sym {
    name: String,
    size: u64,
    /// 0: the module's `.symtab`, 1: its separate debug file's, 2: `.dynsym`.
    source: u8,
}

/// A variable found in the DWARF.
struct Var {
    name: String,
    size: u64,
    /// Index into [`Info::files`].
    file: Option<u32>,
    line: Option<u32>,
    ty: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Global,
    Tls,
}

/// What is known of one module's data. Its ELF headers and symbol tables are read on the first
/// data lookup in it; its DWARF on the first that needs it (not [`Symbolizer::tls_segment`]).
#[derive(Default)]
struct DataModule {
    /// Whether the module was read (and its build-id matched): its DWARF may be looked for.
    read: bool,
    /// Whether it has a `.symtab` (when not, its separate debug file's counts).
    has_symtab: bool,
    /// Data symbols (`STT_OBJECT`), by address.
    globals: Option<Spans<Sym>>,
    /// Thread-local symbols (`STT_TLS`), by offset in the TLS block.
    tls: Option<Spans<Sym>>,
    /// `PT_TLS`: (memsz, align).
    tls_segment: Option<(u64, u64)>,
    /// The DWARF, once looked for (`Some(None)`: there is none).
    info: Option<Option<Info>>,
}

/// One unit, parsed.
struct UnitInfo {
    /// Its offset in `.debug_info`.
    start: usize,
    unit: gimli::Unit<Reader>,
    lang: Option<gimli::DwLang>,
    /// Namespaces and classes, in order, for qualified names (built on first need).
    scopes: OnceLock<Vec<Scope>>,
    /// Functions by address: the subprogram entries' offsets (built on first need).
    functions: OnceLock<Spans<usize>>,
}

/// A namespace, class, struct or union of a unit, as offsets in the unit.
struct Scope {
    start: usize,
    end: usize,
    name: Option<String>,
    parent: Option<usize>,
}

type Entry = gimli::DebuggingInformationEntry<Reader>;

/// A module's DWARF and what has been read of it.
struct Info {
    dwarf: gimli::Dwarf<Reader>,
    /// The offsets of the units in `.debug_info`, sorted.
    unit_starts: Vec<usize>,
    /// `.debug_aranges`: (start, end, unit offset), sorted by start.
    aranges: Vec<(u64, u64, usize)>,
    /// The units' own address ranges, for addresses that `.debug_aranges` does not cover
    /// (built on first need).
    unit_ranges: Option<Spans<usize>>,
    /// Parsed units, by offset (`None`: it does not parse).
    units: HashMap<usize, Option<Arc<UnitInfo>>>,
    sizes: HashMap<usize, Option<u64>>,
    names: HashMap<usize, Option<String>>,
    fields: HashMap<usize, Arc<Vec<Field>>>,
    /// Complete structs, classes, unions and enums by (kind, qualified name): what a
    /// declaration (an incomplete type) stands for (built on first need).
    definitions: Option<HashMap<(u8, String), usize>>,
    /// The variables: globals by address, thread-locals by offset (built on first need).
    vars: Option<(Spans<Var>, Spans<Var>)>,
    /// The files that variables are declared in, each once.
    files: Vec<String>,
    file_index: HashMap<String, u32>,
    /// Index into `files` by (unit offset, file index in its line program).
    file_ids: HashMap<(usize, u64), Option<u32>>,
}

fn is_aggregate(t: DwTag) -> bool {
    matches!(
        t,
        gimli::DW_TAG_structure_type
            | gimli::DW_TAG_class_type
            | gimli::DW_TAG_union_type
            | gimli::DW_TAG_interface_type
    )
}

fn is_pointer(t: DwTag) -> bool {
    matches!(
        t,
        gimli::DW_TAG_pointer_type
            | gimli::DW_TAG_reference_type
            | gimli::DW_TAG_rvalue_reference_type
    )
}

/// Entries that name a scope for the names inside them.
fn is_scope(t: DwTag) -> bool {
    t == gimli::DW_TAG_namespace || is_aggregate(t)
}

/// Whether names in units of this language are unqualified (C has no namespaces).
fn is_c(lang: Option<gimli::DwLang>) -> bool {
    matches!(
        lang,
        Some(
            gimli::DW_LANG_C
                | gimli::DW_LANG_C89
                | gimli::DW_LANG_C99
                | gimli::DW_LANG_C11
                | gimli::DW_LANG_C17
        )
    )
}

/// The key of a complete type for [`Info::definitions`]: a class may be declared as a struct.
fn kind_key(t: DwTag) -> u8 {
    match t {
        gimli::DW_TAG_union_type => 1,
        gimli::DW_TAG_enumeration_type => 2,
        _ => 0,
    }
}

/// The entry a reference attribute names, as an offset in `.debug_info`.
fn reference(ui: &UnitInfo, v: AttributeValue<Reader>) -> Option<usize> {
    match v {
        AttributeValue::UnitRef(o) => ui.start.checked_add(o.0),
        AttributeValue::DebugInfoRef(o) => Some(o.0),
        _ => None,
    }
}

fn attr_ref(ui: &UnitInfo, e: &Entry, at: gimli::DwAt) -> Option<usize> {
    reference(ui, e.attr_value(at)?)
}

fn udata(v: AttributeValue<Reader>) -> Option<u64> {
    match v {
        AttributeValue::FileIndex(i) => Some(i),
        v => v.udata_value(),
    }
}

fn string(
    dwarf: &gimli::Dwarf<Reader>,
    unit: &gimli::Unit<Reader>,
    v: AttributeValue<Reader>,
) -> Option<String> {
    use gimli::Reader as _;
    let r = dwarf.attr_string(unit, v).ok()?;
    let s = r.to_string_lossy().ok()?.into_owned();
    Some(s)
}

/// Appends a path component the way addr2line does (an absolute one replaces the path).
fn path_push(path: &mut String, p: &str) {
    if p.starts_with('/') || path.is_empty() {
        *path = p.to_string();
    } else {
        if !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(p);
    }
}

/// The member offset of a `DW_AT_data_member_location`: a constant, or the expression
/// `DW_OP_plus_uconst N` of older DWARF.
fn member_location(ui: &UnitInfo, e: &Entry) -> Option<u64> {
    match e.attr_value(gimli::DW_AT_data_member_location)? {
        AttributeValue::Exprloc(expr) => {
            let mut ops = expr.operations(ui.unit.encoding());
            match (ops.next(), ops.next()) {
                (Ok(Some(gimli::Operation::PlusConstant { value })), Ok(None)) => Some(value),
                _ => None,
            }
        }
        v => udata(v),
    }
}

/// Where a variable lives, from its `DW_AT_location`: a global at an address (`DW_OP_addr`),
/// or a thread-local at an offset in its module's TLS block (a constant or address, then
/// `DW_OP_form_tls_address` or `DW_OP_GNU_push_tls_address`).
fn location(
    dwarf: &gimli::Dwarf<Reader>,
    unit: &gimli::Unit<Reader>,
    expr: gimli::Expression<Reader>,
) -> Option<(Kind, u64)> {
    use gimli::Operation as Op;
    let mut ops = expr.operations(unit.encoding());
    let first = ops.next().ok()??;
    let second = ops.next().ok()?;
    let value = match first {
        Op::Address { address } => address,
        Op::AddressIndex { index } | Op::ConstantIndex { index } => {
            dwarf.address(unit, index).ok()?
        }
        Op::UnsignedConstant { value } => value,
        _ => return None,
    };
    match second {
        None if matches!(first, Op::Address { .. } | Op::AddressIndex { .. }) => {
            // 0 and the tombstones: a variable the linker discarded.
            (value != 0 && !unit.header.is_tombstone_address(value))
                .then_some((Kind::Global, value))
        }
        Some(Op::TLS) if matches!(ops.next(), Ok(None)) => Some((Kind::Tls, value)),
        _ => None,
    }
}

/// The names of the scopes on `stack`, joined with `::` (`None` when there are none).
fn qualifier(stack: &[(isize, Option<String>)]) -> Option<String> {
    let names: Vec<&str> = stack.iter().filter_map(|s| s.1.as_deref()).collect();
    (!names.is_empty()).then(|| names.join("::"))
}

/// Walks the entries of one unit, reading the attributes only of those that `want` picks (and of
/// the scopes that qualify names), and calls `f` with each picked entry's tag, offset in
/// `.debug_info`, attributes and the qualified name of its enclosing namespaces and classes
/// (always `None` in C). Stops at the first entry that does not read.
fn walk(
    dwarf: &gimli::Dwarf<Reader>,
    ui: &UnitInfo,
    want: impl Fn(&gimli::Abbreviation) -> bool,
    mut f: impl FnMut(DwTag, usize, &[gimli::Attribute<Reader>], Option<String>),
) {
    let qualify = !is_c(ui.lang);
    let Ok(mut raw) = ui.unit.entries_raw(None) else {
        return;
    };
    let mut stack: Vec<(isize, Option<String>)> = Vec::new();
    let mut attrs = Vec::new();
    while !raw.is_empty() {
        let depth = raw.next_depth();
        let offset = raw.next_offset().0;
        let abbrev = match raw.read_abbreviation() {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(_) => return,
        };
        while stack.last().is_some_and(|s| s.0 >= depth) {
            stack.pop();
        }
        let tag = abbrev.tag();
        let scope = qualify && abbrev.has_children() && is_scope(tag);
        let picked = want(abbrev);
        if !scope && !picked {
            if raw.skip_attributes(abbrev.attributes()).is_err() {
                return;
            }
            continue;
        }
        attrs.clear();
        for spec in abbrev.attributes() {
            match raw.read_attribute(*spec) {
                Ok(a) => attrs.push(a),
                Err(_) => return,
            }
        }
        if picked {
            f(tag, ui.start + offset, &attrs, qualifier(&stack));
        }
        if scope {
            let name = attrs
                .iter()
                .find(|a| a.name() == gimli::DW_AT_name)
                .and_then(|a| string(dwarf, &ui.unit, a.value()))
                .or_else(|| {
                    (tag == gimli::DW_TAG_namespace).then(|| "(anonymous namespace)".into())
                });
            stack.push((depth, name));
        }
    }
}

/// The namespaces and classes of a unit, in order, each with its end and enclosing scope.
fn scope_index(dwarf: &gimli::Dwarf<Reader>, ui: &UnitInfo) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = Vec::new();
    let Ok(mut raw) = ui.unit.entries_raw(None) else {
        return scopes;
    };
    let mut open: Vec<(isize, usize)> = Vec::new();
    while !raw.is_empty() {
        let depth = raw.next_depth();
        let offset = raw.next_offset().0;
        let abbrev = match raw.read_abbreviation() {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(_) => break,
        };
        while let Some(&(d, i)) = open.last() {
            if d < depth {
                break;
            }
            scopes[i].end = offset;
            open.pop();
        }
        if !(abbrev.has_children() && is_scope(abbrev.tag())) {
            if raw.skip_attributes(abbrev.attributes()).is_err() {
                break;
            }
            continue;
        }
        let mut name = None;
        for spec in abbrev.attributes() {
            let Ok(a) = raw.read_attribute(*spec) else {
                return scopes;
            };
            if a.name() == gimli::DW_AT_name {
                name = string(dwarf, &ui.unit, a.value());
            }
        }
        if name.is_none() && abbrev.tag() == gimli::DW_TAG_namespace {
            name = Some("(anonymous namespace)".into());
        }
        scopes.push(Scope {
            start: offset,
            end: usize::MAX,
            name,
            parent: open.last().map(|o| o.1),
        });
        open.push((depth, scopes.len() - 1));
    }
    scopes
}

/// The subprograms of a unit by address.
fn function_index(dwarf: &gimli::Dwarf<Reader>, ui: &UnitInfo) -> Spans<usize> {
    let mut offsets = Vec::new();
    walk(
        dwarf,
        ui,
        |a| {
            a.tag() == gimli::DW_TAG_subprogram
                && a.attributes()
                    .iter()
                    .any(|s| matches!(s.name(), gimli::DW_AT_low_pc | gimli::DW_AT_ranges))
        },
        |_, off, _, _| offsets.push(off),
    );
    let mut spans = Vec::new();
    for off in offsets {
        let Some(e) = gimli::UnitOffset(off - ui.start)
            .to_debug_info_offset(&ui.unit.header)
            .and_then(|_| ui.unit.entry(gimli::UnitOffset(off - ui.start)).ok())
        else {
            continue;
        };
        let Ok(mut ranges) = dwarf.die_ranges(&ui.unit, &e) else {
            continue;
        };
        while let Ok(Some(r)) = ranges.next() {
            if r.end > r.begin {
                spans.push((r.begin, r.end, off));
            }
        }
    }
    Spans::new(spans)
}

/// Whether `vaddr` lies in the address ranges of `e`.
fn die_contains(dwarf: &gimli::Dwarf<Reader>, ui: &UnitInfo, e: &Entry, vaddr: u64) -> bool {
    let Ok(mut ranges) = dwarf.die_ranges(&ui.unit, e) else {
        return false;
    };
    while let Ok(Some(r)) = ranges.next() {
        if r.begin <= vaddr && vaddr < r.end {
            return true;
        }
    }
    false
}

/// What a leaf of [`Info::descend`] is.
enum Leaf {
    /// A pointer, to the type given (`None`: `void *`).
    Pointer(Option<usize>),
    Scalar,
}

/// A data member or base class of an aggregate.
struct Field {
    name: Option<String>,
    start: u64,
    /// Exclusive; `None` for a flexible array member (it runs to the end of the block).
    end: Option<u64>,
    ty: usize,
}

impl Info {
    fn new(dwarf: gimli::Dwarf<Reader>, aranges: Vec<(u64, u64, usize)>) -> Info {
        let mut unit_starts = Vec::new();
        let mut headers = dwarf.units();
        while let Ok(Some(h)) = headers.next() {
            if let Some(o) = h.debug_info_offset() {
                unit_starts.push(o.0);
            }
        }
        unit_starts.sort_unstable();
        Info {
            dwarf,
            unit_starts,
            aranges,
            unit_ranges: None,
            units: HashMap::new(),
            sizes: HashMap::new(),
            names: HashMap::new(),
            fields: HashMap::new(),
            definitions: None,
            vars: None,
            files: Vec::new(),
            file_index: HashMap::new(),
            file_ids: HashMap::new(),
        }
    }

    /// Parses the unit at `start` (not kept: see [`Info::unit`]).
    fn parse_unit(&self, start: usize) -> Option<Arc<UnitInfo>> {
        let header = self.dwarf.unit_header(gimli::DebugInfoOffset(start)).ok()?;
        let unit = self.dwarf.unit(header).ok()?;
        let lang = unit.entry(unit.header.root_offset()).ok().and_then(|root| {
            match root.attr_value(gimli::DW_AT_language) {
                Some(AttributeValue::Language(l)) => Some(l),
                _ => None,
            }
        });
        Some(Arc::new(UnitInfo {
            start,
            unit,
            lang,
            scopes: OnceLock::new(),
            functions: OnceLock::new(),
        }))
    }

    /// The unit at `start`, parsed once.
    fn unit(&mut self, start: usize) -> Option<Arc<UnitInfo>> {
        if let Some(u) = self.units.get(&start) {
            return u.clone();
        }
        let u = self.parse_unit(start);
        self.units.insert(start, u.clone());
        u
    }

    /// The entry at `die` (an offset in `.debug_info`) and its unit.
    fn entry(&mut self, die: usize) -> Option<(Arc<UnitInfo>, Entry)> {
        let i = self
            .unit_starts
            .partition_point(|&s| s <= die)
            .checked_sub(1)?;
        let ui = self.unit(self.unit_starts[i])?;
        let uo = gimli::DebugInfoOffset(die).to_unit_offset(&ui.unit.header)?;
        let e = ui.unit.entry(uo).ok()?;
        Some((ui, e))
    }

    /// The direct children of the entry at `die`.
    fn children(&mut self, die: usize) -> Vec<(Arc<UnitInfo>, Entry)> {
        let mut out = Vec::new();
        let Some((ui, _)) = self.entry(die) else {
            return out;
        };
        let uo = gimli::UnitOffset(die - ui.start);
        let Ok(mut tree) = ui.unit.entries_tree(Some(uo)) else {
            return out;
        };
        let Ok(root) = tree.root() else {
            return out;
        };
        let mut children = root.children();
        while let Ok(Some(c)) = children.next() {
            out.push((ui.clone(), c.entry().clone()));
        }
        out
    }

    /// The index into [`Info::files`] of file `index` of a unit's line program.
    fn file_id(&mut self, ui: &UnitInfo, index: u64) -> Option<u32> {
        if let Some(&id) = self.file_ids.get(&(ui.start, index)) {
            return id;
        }
        let name = self.file_name(ui, index);
        let id = name.map(|n| match self.file_index.get(&n) {
            Some(&i) => i,
            None => {
                let i = self.files.len() as u32;
                self.files.push(n.clone());
                self.file_index.insert(n, i);
                i
            }
        });
        self.file_ids.insert((ui.start, index), id);
        id
    }

    /// File `index` of a unit's line program, as addr2line renders it: the unit's directory,
    /// the file's directory, then its name, each replacing what came before when absolute.
    fn file_name(&self, ui: &UnitInfo, index: u64) -> Option<String> {
        use gimli::Reader as _;
        let header = ui.unit.line_program.as_ref()?.header();
        let file = header.file(index)?;
        let mut path = match &ui.unit.comp_dir {
            Some(d) => d.to_string_lossy().ok()?.into_owned(),
            None => String::new(),
        };
        if file.directory_index() != 0 {
            if let Some(dir) = file.directory(header) {
                path_push(&mut path, &string(&self.dwarf, &ui.unit, dir)?);
            }
        }
        path_push(&mut path, &string(&self.dwarf, &ui.unit, file.path_name())?);
        Some(path)
    }

    // --- Variables --------------------------------------------------------------------------

    /// Walks every unit once for the variables with a static or thread-local location.
    fn index_vars(&mut self, symbols: Option<&Spans<Sym>>, tls_symbols: Option<&Spans<Sym>>) {
        let mut found: Vec<(Kind, u64, usize, Option<String>)> = Vec::new();
        let mut vars: [Vec<(u64, u64, Var)>; 2] = [Vec::new(), Vec::new()];
        for start in self.unit_starts.clone() {
            // A unit is parsed for the walk and kept only if it was already (libc has 1,700).
            let kept = self.units.contains_key(&start);
            let Some(ui) = self.unit(start) else {
                continue;
            };
            found.clear();
            walk(
                &self.dwarf,
                &ui,
                |a| {
                    a.tag() == gimli::DW_TAG_variable
                        && a.attributes()
                            .iter()
                            .any(|s| s.name() == gimli::DW_AT_location)
                },
                |_, die, attrs, qual| {
                    let loc = attrs
                        .iter()
                        .find(|a| a.name() == gimli::DW_AT_location)
                        .and_then(|a| a.exprloc_value())
                        .and_then(|e| location(&self.dwarf, &ui.unit, e));
                    if let Some((kind, at)) = loc {
                        found.push((kind, at, die, qual));
                    }
                },
            );
            for (kind, at, die, qual) in found.drain(..) {
                let syms = if kind == Kind::Global {
                    symbols
                } else {
                    tls_symbols
                };
                let sym = syms.and_then(|s| s.covering(at).find(|s| s.start == at));
                let Some(mut v) = self.describe(die, qual).or_else(|| {
                    sym.map(|s| Var {
                        name: s.item.name.clone(),
                        size: 0,
                        file: None,
                        line: None,
                        ty: None,
                    })
                }) else {
                    continue;
                };
                v.size =
                    v.ty.and_then(|t| self.size_of(t))
                        .or(sym.map(|s| s.item.size))
                        .unwrap_or(0);
                vars[(kind == Kind::Tls) as usize].push((at, at.saturating_add(v.size), v));
            }
            if !kept {
                self.units.remove(&start);
            }
        }
        let [globals, tls] = vars.map(|mut v| {
            // The same variable from several units (C++ inline variables, templates): once.
            v.sort_by(|a, b| {
                (a.0, &a.2.name, a.2.ty.is_none(), a.2.file.is_none()).cmp(&(
                    b.0,
                    &b.2.name,
                    b.2.ty.is_none(),
                    b.2.file.is_none(),
                ))
            });
            v.dedup_by(|b, a| a.0 == b.0 && a.2.name == b.2.name);
            Spans::new(v)
        });
        self.vars = Some((globals, tls));
    }

    /// A variable's name, declaration and type, following `DW_AT_specification` and
    /// `DW_AT_abstract_origin` for what its own entry leaves out.
    fn describe(&mut self, die: usize, qual: Option<String>) -> Option<Var> {
        let (first, mut e) = self.entry(die)?;
        let mut ui = first.clone();
        let (mut name, mut linkage, mut file, mut line, mut ty) = (None, None, None, None, None);
        for _ in 0..4 {
            let get = |at| e.attr_value(at);
            if name.is_none() {
                name = get(gimli::DW_AT_name).and_then(|v| string(&self.dwarf, &ui.unit, v));
            }
            if linkage.is_none() {
                linkage = get(gimli::DW_AT_linkage_name)
                    .or_else(|| get(gimli::DW_AT_MIPS_linkage_name))
                    .and_then(|v| string(&self.dwarf, &ui.unit, v));
            }
            if line.is_none() {
                line = get(gimli::DW_AT_decl_line)
                    .and_then(udata)
                    .and_then(|l| u32::try_from(l).ok());
            }
            if file.is_none() {
                if let Some(i) = get(gimli::DW_AT_decl_file).and_then(udata) {
                    file = self.file_id(&ui, i);
                }
            }
            if ty.is_none() {
                ty = attr_ref(&ui, &e, gimli::DW_AT_type);
            }
            let next = attr_ref(&ui, &e, gimli::DW_AT_specification)
                .or_else(|| attr_ref(&ui, &e, gimli::DW_AT_abstract_origin));
            match next.and_then(|n| self.entry(n)) {
                Some((u, n)) => (ui, e) = (u, n),
                None => break,
            }
        }
        let demangled = linkage.as_deref().and_then(|l| match first.lang {
            Some(lang) => addr2line::demangle(l, lang),
            None => Some(addr2line::demangle_auto(Cow::Borrowed(l), None).into_owned()),
        });
        let name = match (demangled, name) {
            (Some(d), _) => d,
            (None, Some(n)) => match qual {
                Some(q) => format!("{q}::{n}"),
                None => n,
            },
            (None, None) => linkage?,
        };
        Some(Var {
            name,
            size: 0,
            file,
            line,
            ty,
        })
    }

    // --- Types ------------------------------------------------------------------------------

    /// The type `die` stands for: typedefs and qualifiers looked through, a declaration replaced
    /// by its definition when the module has one. `None` for `void`.
    fn strip(&mut self, mut die: usize) -> Option<(usize, Arc<UnitInfo>, Entry)> {
        for _ in 0..MAX_HOPS {
            let (ui, e) = self.entry(die)?;
            match e.tag() {
                gimli::DW_TAG_typedef
                | gimli::DW_TAG_const_type
                | gimli::DW_TAG_volatile_type
                | gimli::DW_TAG_restrict_type
                | gimli::DW_TAG_atomic_type
                | gimli::DW_TAG_immutable_type
                | gimli::DW_TAG_packed_type
                | gimli::DW_TAG_shared_type => die = attr_ref(&ui, &e, gimli::DW_AT_type)?,
                t if (is_aggregate(t) || t == gimli::DW_TAG_enumeration_type)
                    && e.attr_value(gimli::DW_AT_declaration).is_some() =>
                {
                    match self.definition(die, t) {
                        Some(d) if d != die => die = d,
                        _ => return Some((die, ui, e)),
                    }
                }
                _ => return Some((die, ui, e)),
            }
        }
        None
    }

    /// The complete type that the declaration `die` (of tag `tag`) names, found by its name.
    fn definition(&mut self, die: usize, tag: DwTag) -> Option<usize> {
        let name = self.qualified(die, 0)?;
        if self.definitions.is_none() {
            let mut defs = HashMap::new();
            for start in self.unit_starts.clone() {
                let Some(ui) = self.parse_unit(start) else {
                    continue;
                };
                let c = is_c(ui.lang);
                walk(
                    &self.dwarf,
                    &ui,
                    |a| {
                        (is_aggregate(a.tag()) || a.tag() == gimli::DW_TAG_enumeration_type)
                            && a.attributes()
                                .iter()
                                .all(|s| s.name() != gimli::DW_AT_declaration)
                            && a.attributes().iter().any(|s| s.name() == gimli::DW_AT_name)
                    },
                    |t, off, attrs, qual| {
                        let Some(n) = attrs
                            .iter()
                            .find(|a| a.name() == gimli::DW_AT_name)
                            .and_then(|a| string(&self.dwarf, &ui.unit, a.value()))
                        else {
                            return;
                        };
                        let n = match qual {
                            Some(q) if !c => format!("{q}::{n}"),
                            _ => n,
                        };
                        defs.entry((kind_key(t), n)).or_insert(off);
                    },
                );
            }
            self.definitions = Some(defs);
        }
        self.definitions
            .as_ref()?
            .get(&(kind_key(tag), name))
            .copied()
    }

    /// The name of a named type with the namespaces and classes around it (C: the bare name).
    fn qualified(&mut self, die: usize, depth: usize) -> Option<String> {
        let (ui, e) = self.entry(die)?;
        if depth < 4 {
            if let Some(spec) = attr_ref(&ui, &e, gimli::DW_AT_specification) {
                return self.qualified(spec, depth + 1);
            }
        }
        let name = match e.attr_value(gimli::DW_AT_name) {
            Some(v) => string(&self.dwarf, &ui.unit, v)?,
            None => match e.tag() {
                gimli::DW_TAG_structure_type => "(anonymous struct)".into(),
                gimli::DW_TAG_class_type => "(anonymous class)".into(),
                gimli::DW_TAG_union_type => "(anonymous union)".into(),
                gimli::DW_TAG_enumeration_type => "(anonymous enum)".into(),
                _ => return None,
            },
        };
        if is_c(ui.lang) {
            return Some(name);
        }
        let scopes = ui.scopes.get_or_init(|| scope_index(&self.dwarf, &ui));
        let uo = die - ui.start;
        let mut at = scopes.partition_point(|s| s.start < uo).checked_sub(1);
        let mut names = vec![name];
        while let Some(i) = at {
            let s = &scopes[i];
            if s.start < uo && uo < s.end {
                names.extend(s.name.clone());
            }
            at = s.parent;
        }
        names.reverse();
        Some(names.join("::"))
    }

    /// The byte size of a type.
    fn size_of(&mut self, die: usize) -> Option<u64> {
        if let Some(&s) = self.sizes.get(&die) {
            return s;
        }
        // A type that contains itself reads as unsized instead of recursing.
        self.sizes.insert(die, None);
        let s = self.compute_size(die);
        self.sizes.insert(die, s);
        s
    }

    fn compute_size(&mut self, die: usize) -> Option<u64> {
        let (sd, ui, e) = self.strip(die)?;
        if let Some(s) = e.attr_value(gimli::DW_AT_byte_size).and_then(udata) {
            return Some(s);
        }
        match e.tag() {
            gimli::DW_TAG_array_type => {
                let elem = self.size_of(attr_ref(&ui, &e, gimli::DW_AT_type)?)?;
                self.dims(sd)
                    .into_iter()
                    .try_fold(elem, |acc, d| acc.checked_mul(d?))
            }
            t if is_pointer(t) || t == gimli::DW_TAG_ptr_to_member_type => {
                Some(u64::from(ui.unit.header.address_size()))
            }
            _ => None,
        }
    }

    /// The dimensions of an array type (`None`: unknown, as in a flexible array member).
    fn dims(&mut self, die: usize) -> Vec<Option<u64>> {
        self.children(die)
            .into_iter()
            .filter(|(_, c)| c.tag() == gimli::DW_TAG_subrange_type)
            .map(|(_, c)| {
                if let Some(n) = c.attr_value(gimli::DW_AT_count) {
                    return udata(n);
                }
                let upper = c.attr_value(gimli::DW_AT_upper_bound)?;
                let lower = c
                    .attr_value(gimli::DW_AT_lower_bound)
                    .and_then(|v| v.sdata_value())
                    .unwrap_or(0);
                let upper = upper.sdata_value()?;
                // `[0]` may read as upper bound -1.
                u64::try_from(upper.checked_sub(lower)?.checked_add(1)?).ok()
            })
            .collect()
    }

    /// The data members and base classes of an aggregate, in order (read once).
    fn fields(&mut self, die: usize) -> Arc<Vec<Field>> {
        if let Some(f) = self.fields.get(&die) {
            return f.clone();
        }
        let f = Arc::new(self.read_fields(die));
        self.fields.insert(die, f.clone());
        f
    }

    fn read_fields(&mut self, die: usize) -> Vec<Field> {
        let children: Vec<(Arc<UnitInfo>, Entry)> = self
            .children(die)
            .into_iter()
            .filter(|(_, c)| matches!(c.tag(), gimli::DW_TAG_member | gimli::DW_TAG_inheritance))
            // Static members (DWARF 4 declares them as members).
            .filter(|(_, c)| {
                c.attr_value(gimli::DW_AT_declaration).is_none()
                    && (c.attr_value(gimli::DW_AT_external).is_none()
                        || c.attr_value(gimli::DW_AT_data_member_location).is_some())
            })
            .collect();
        let last = children.len().saturating_sub(1);
        let mut out = Vec::new();
        for (i, (ui, c)) in children.iter().enumerate() {
            let Some(ty) = attr_ref(ui, c, gimli::DW_AT_type) else {
                continue;
            };
            let name = c
                .attr_value(gimli::DW_AT_name)
                .and_then(|v| string(&self.dwarf, &ui.unit, v));
            if let Some(bits) = c.attr_value(gimli::DW_AT_data_bit_offset).and_then(udata) {
                let width = c
                    .attr_value(gimli::DW_AT_bit_size)
                    .and_then(udata)
                    .unwrap_or(1);
                out.push(Field {
                    name,
                    start: bits / 8,
                    end: Some(bits.saturating_add(width).saturating_add(7) / 8),
                    ty,
                });
                continue;
            }
            // A union's members have no location: they all start at 0.
            let start = match member_location(ui, c) {
                Some(s) => s,
                None if c.attr_value(gimli::DW_AT_data_member_location).is_some() => continue,
                None => 0,
            };
            let size = self.size_of(ty);
            let array = self
                .strip(ty)
                .is_some_and(|(_, _, t)| t.tag() == gimli::DW_TAG_array_type);
            let end = match size {
                Some(0) | None if array && i == last => None,
                Some(s) => Some(start.saturating_add(s)),
                None => continue,
            };
            out.push(Field {
                name,
                start,
                end,
                ty,
            });
        }
        out
    }

    /// Whether an aggregate ends in a flexible array member.
    fn ends_in_flex(&mut self, die: usize) -> bool {
        self.fields(die).last().is_some_and(|f| f.end.is_none())
    }

    /// Appends to `path` the access path to the word at `off` in an object of type `die`.
    fn descend(
        &mut self,
        die: usize,
        off: u64,
        path: &mut String,
        depth: usize,
        budget: &mut u32,
    ) -> Option<Leaf> {
        // Depth alone does not bound the walk: every member covering the offset is tried, and
        // DWARF that nests a type in itself twice would take 2^depth steps.
        if depth > MAX_HOPS || *budget == 0 {
            return None;
        }
        *budget -= 1;
        let (sd, ui, e) = self.strip(die)?;
        let tag = e.tag();
        if is_aggregate(tag) {
            let mut fallback = None;
            for f in self.fields(sd).iter() {
                if off < f.start || f.end.is_some_and(|end| off >= end) {
                    continue;
                }
                let mut p = path.clone();
                if let Some(n) = &f.name {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(n);
                }
                match self.descend(f.ty, off - f.start, &mut p, depth + 1, budget) {
                    // Of a union's members, the pointer: what a retention path goes through.
                    Some(Leaf::Pointer(to)) => {
                        *path = p;
                        return Some(Leaf::Pointer(to));
                    }
                    Some(leaf) if fallback.is_none() => fallback = Some((p, leaf)),
                    _ => {}
                }
            }
            return match fallback {
                Some((p, leaf)) => {
                    *path = p;
                    Some(leaf)
                }
                // Padding, or an empty class, inside a member: that member.
                None if !path.is_empty() && self.size_of(sd).is_some_and(|s| off < s) => {
                    Some(Leaf::Scalar)
                }
                None => None,
            };
        }
        match tag {
            gimli::DW_TAG_array_type => {
                let elem = attr_ref(&ui, &e, gimli::DW_AT_type)?;
                let size = self.size_of(elem).filter(|&s| s > 0)?;
                let dims = self.dims(sd);
                let index = off / size;
                // Every dimension but the first must be known to split the index.
                let inner: Option<Vec<u64>> = dims.iter().skip(1).copied().collect();
                let inner = inner?;
                let total = inner.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
                if let Some(Some(d0)) = dims.first() {
                    if index >= d0.saturating_mul(total) {
                        return None;
                    }
                }
                let (_, _, et) = self.strip(elem)?;
                if !path.is_empty()
                    && !is_aggregate(et.tag())
                    && !is_pointer(et.tag())
                    && et.tag() != gimli::DW_TAG_array_type
                {
                    // A word inside an array of scalars: the array itself.
                    return Some(Leaf::Scalar);
                }
                let mut rest = index;
                let mut indices = Vec::new();
                for &d in inner.iter().rev() {
                    if d == 0 {
                        return None;
                    }
                    indices.push(rest % d);
                    rest /= d;
                }
                indices.push(rest);
                for i in indices.iter().rev() {
                    path.push_str(&format!("[{i}]"));
                }
                self.descend(elem, off % size, path, depth + 1, budget)
            }
            t if is_pointer(t) => {
                let size = self
                    .size_of(sd)
                    .unwrap_or(u64::from(ui.unit.header.address_size()));
                (off < size).then(|| Leaf::Pointer(attr_ref(&ui, &e, gimli::DW_AT_type)))
            }
            gimli::DW_TAG_base_type
            | gimli::DW_TAG_enumeration_type
            | gimli::DW_TAG_ptr_to_member_type
            | gimli::DW_TAG_unspecified_type => {
                let size = self.size_of(sd)?;
                (off < size).then_some(Leaf::Scalar)
            }
            _ => None,
        }
    }

    fn pointee(&mut self, die: usize) -> Option<usize> {
        let (_, ui, e) = self.strip(die)?;
        if !is_pointer(e.tag()) {
            return None;
        }
        attr_ref(&ui, &e, gimli::DW_AT_type)
    }

    /// The type's name as C or C++ writes it.
    fn type_name(&mut self, die: usize, depth: usize) -> Option<String> {
        if let Some(n) = self.names.get(&die) {
            return n.clone();
        }
        if depth > MAX_HOPS {
            return None;
        }
        let n = self.format_type(die, depth);
        self.names.insert(die, n.clone());
        n
    }

    fn format_type(&mut self, die: usize, depth: usize) -> Option<String> {
        let (ui, e) = self.entry(die)?;
        let own = e
            .attr_value(gimli::DW_AT_name)
            .and_then(|v| string(&self.dwarf, &ui.unit, v));
        let inner = attr_ref(&ui, &e, gimli::DW_AT_type);
        let tag = e.tag();
        match tag {
            gimli::DW_TAG_base_type | gimli::DW_TAG_unspecified_type => own,
            gimli::DW_TAG_typedef => self.qualified(die, 0),
            t if is_aggregate(t) || t == gimli::DW_TAG_enumeration_type => {
                let q = self.qualified(die, 0)?;
                if !is_c(ui.lang) {
                    return Some(q);
                }
                let kw = match t {
                    gimli::DW_TAG_union_type => "union",
                    gimli::DW_TAG_enumeration_type => "enum",
                    _ => "struct",
                };
                Some(match q.strip_prefix('(') {
                    Some(_) => q,
                    None => format!("{kw} {q}"),
                })
            }
            t if is_pointer(t) => {
                if own.is_some() {
                    // Rust names its pointer types ("&str", "*const u8").
                    return own;
                }
                let suffix = match t {
                    gimli::DW_TAG_pointer_type => "*",
                    gimli::DW_TAG_reference_type => "&",
                    _ => "&&",
                };
                let Some(to) = inner else {
                    return Some(format!("void{suffix}"));
                };
                let (_, te) = self.entry(to)?;
                if te.tag() == gimli::DW_TAG_subroutine_type {
                    let (ret, params) = self.signature(to, depth)?;
                    return Some(format!("{ret} ({suffix})({params})"));
                }
                Some(format!("{}{suffix}", self.type_name(to, depth + 1)?))
            }
            gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type => {
                let kw = if tag == gimli::DW_TAG_const_type {
                    "const"
                } else {
                    "volatile"
                };
                let Some(to) = inner else {
                    return Some(format!("{kw} void"));
                };
                let n = self.type_name(to, depth + 1)?;
                let (_, te) = self.entry(to)?;
                Some(if is_pointer(te.tag()) {
                    format!("{n} {kw}")
                } else {
                    format!("{kw} {n}")
                })
            }
            gimli::DW_TAG_array_type => {
                if own.is_some() {
                    return own;
                }
                let elem = self.type_name(inner?, depth + 1)?;
                let dims: String = self
                    .dims(die)
                    .into_iter()
                    .map(|d| d.map_or("[]".to_string(), |d| format!("[{d}]")))
                    .collect();
                Some(format!("{elem}{dims}"))
            }
            gimli::DW_TAG_subroutine_type => {
                let (ret, params) = self.signature(die, depth)?;
                Some(format!("{ret} ({params})"))
            }
            gimli::DW_TAG_ptr_to_member_type => {
                let to = self.type_name(inner?, depth + 1)?;
                let class = attr_ref(&ui, &e, gimli::DW_AT_containing_type)
                    .and_then(|c| self.type_name(c, depth + 1))?;
                Some(format!("{to} {class}::*"))
            }
            gimli::DW_TAG_restrict_type
            | gimli::DW_TAG_atomic_type
            | gimli::DW_TAG_immutable_type
            | gimli::DW_TAG_packed_type
            | gimli::DW_TAG_shared_type => match inner {
                Some(to) => self.type_name(to, depth + 1),
                None => Some("void".into()),
            },
            _ => own,
        }
    }

    /// A function type's return type and parameter list, as names.
    fn signature(&mut self, die: usize, depth: usize) -> Option<(String, String)> {
        let (ui, e) = self.entry(die)?;
        let ret = match attr_ref(&ui, &e, gimli::DW_AT_type) {
            Some(t) => self.type_name(t, depth + 1)?,
            None => "void".into(),
        };
        let mut params = Vec::new();
        for (ui, c) in self.children(die) {
            match c.tag() {
                gimli::DW_TAG_formal_parameter => {
                    let t = attr_ref(&ui, &c, gimli::DW_AT_type)?;
                    params.push(self.type_name(t, depth + 1)?);
                }
                gimli::DW_TAG_unspecified_parameters => params.push("...".into()),
                _ => {}
            }
        }
        Some((ret, params.join(", ")))
    }

    // --- Heap blocks ------------------------------------------------------------------------

    /// The unit whose code holds `vaddr`.
    fn unit_at(&mut self, vaddr: u64) -> Option<usize> {
        let i = self.aranges.partition_point(|r| r.0 <= vaddr);
        if let Some(r) = i.checked_sub(1).map(|i| self.aranges[i]) {
            if vaddr < r.1 {
                return Some(r.2);
            }
        }
        if self.unit_ranges.is_none() {
            let mut spans = Vec::new();
            for &start in &self.unit_starts {
                let Some(ui) = self.parse_unit(start) else {
                    continue;
                };
                let Ok(mut ranges) = self.dwarf.unit_ranges(&ui.unit) else {
                    continue;
                };
                while let Ok(Some(r)) = ranges.next() {
                    if r.end > r.begin {
                        spans.push((r.begin, r.end, start));
                    }
                }
            }
            self.unit_ranges = Some(Spans::new(spans));
        }
        self.unit_ranges
            .as_ref()?
            .covering(vaddr)
            .next()
            .map(|s| s.item)
    }

    /// The entries whose types say what `vaddr`'s function allocates: for each scope, innermost
    /// first, the function or inlined call at `vaddr` (its return type, its parameters and local
    /// variables, those of lexical blocks included); then those of the inlined calls elsewhere in
    /// the function.
    fn allocating_scopes(&mut self, vaddr: u64) -> Option<Vec<Vec<usize>>> {
        let unit = self.unit_at(vaddr)?;
        let ui = self.unit(unit)?;
        let functions = ui
            .functions
            .get_or_init(|| function_index(&self.dwarf, &ui));
        let f = functions
            .covering(vaddr)
            .min_by_key(|s| s.end - s.start)?
            .item;
        let uo = gimli::UnitOffset(f - ui.start);
        let mut tree = ui.unit.entries_tree(Some(uo)).ok()?;
        let root = tree.root().ok()?;
        let mut chain = vec![vec![f]];
        let mut others = Vec::new();
        scan(&self.dwarf, &ui, root, vaddr, &mut chain, 0, &mut others, 0).ok()?;
        chain.reverse();
        chain.push(others);
        Some(chain)
    }

    /// The type that `die` gives a value: a variable's or parameter's type, a function's return
    /// type (through its declaration or abstract origin when its own entry has none).
    fn type_of(&mut self, die: usize) -> Option<usize> {
        let (mut ui, mut e) = self.entry(die)?;
        for _ in 0..4 {
            if let Some(t) = attr_ref(&ui, &e, gimli::DW_AT_type) {
                return Some(t);
            }
            let next = attr_ref(&ui, &e, gimli::DW_AT_abstract_origin)
                .or_else(|| attr_ref(&ui, &e, gimli::DW_AT_specification))?;
            (ui, e) = self.entry(next)?;
        }
        None
    }

    fn block_type(&mut self, vaddr: u64, size: u64) -> Option<usize> {
        for scope in self.allocating_scopes(vaddr)? {
            let mut found: Vec<usize> = Vec::new();
            for die in scope {
                let Some(to) = self.type_of(die).and_then(|t| self.pointee(t)) else {
                    continue;
                };
                let Some((pd, _, pe)) = self.strip(to) else {
                    continue;
                };
                if !is_aggregate(pe.tag()) || found.contains(&pd) {
                    continue;
                }
                let Some(s) = self.size_of(pd).filter(|&s| s > 0) else {
                    continue;
                };
                if s == size || (s < size && self.ends_in_flex(pd)) {
                    found.push(pd);
                }
            }
            if found.len() > 1 {
                // One type described twice (in two units, or by two inlined copies).
                let names: Vec<Option<String>> =
                    found.iter().map(|&d| self.type_name(d, 0)).collect();
                if names.iter().all(|n| n.is_some() && *n == names[0]) {
                    found.truncate(1);
                }
            }
            match found.len() {
                0 => continue,
                1 => return found.pop(),
                _ => return None,
            }
        }
        None
    }
}

/// Collects, under the function or inlined call `node`, the entries whose types count for
/// [`Info::block_type`]: into `chain[level]` those of this scope, into a new level those of the
/// inlined call at `vaddr` (when this scope is on the chain of calls at `vaddr`), into `others`
/// those of the other inlined calls.
#[allow(clippy::too_many_arguments)]
fn scan(
    dwarf: &gimli::Dwarf<Reader>,
    ui: &UnitInfo,
    node: gimli::EntriesTreeNode<'_, '_, Reader>,
    vaddr: u64,
    chain: &mut Vec<Vec<usize>>,
    level: usize,
    others: &mut Vec<usize>,
    depth: usize,
) -> gimli::Result<()> {
    if depth > MAX_HOPS {
        return Ok(());
    }
    let mut children = node.children();
    while let Some(child) = children.next()? {
        let e = child.entry();
        let die = ui.start + e.offset().0;
        match e.tag() {
            gimli::DW_TAG_formal_parameter | gimli::DW_TAG_variable => chain[level].push(die),
            gimli::DW_TAG_lexical_block | gimli::DW_TAG_try_block | gimli::DW_TAG_catch_block => {
                scan(dwarf, ui, child, vaddr, chain, level, others, depth + 1)?
            }
            gimli::DW_TAG_inlined_subroutine
                if level + 1 == chain.len() && die_contains(dwarf, ui, e, vaddr) =>
            {
                chain.push(vec![die]);
                scan(dwarf, ui, child, vaddr, chain, level + 1, others, depth + 1)?;
            }
            gimli::DW_TAG_inlined_subroutine => {
                let mut all = vec![vec![die]];
                let mut nested = Vec::new();
                scan(
                    dwarf,
                    ui,
                    child,
                    u64::MAX,
                    &mut all,
                    0,
                    &mut nested,
                    depth + 1,
                )?;
                others.extend(all.into_iter().flatten());
                others.extend(nested);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The `PT_TLS` segment of an ELF file: (memsz, align).
fn tls_segment(obj: &object::File) -> Option<(u64, u64)> {
    use object::read::elf::{FileHeader, ProgramHeader};
    fn find<E: FileHeader>(f: &object::read::elf::ElfFile<'_, E>) -> Option<(u64, u64)> {
        let endian = f.endian();
        f.elf_program_headers()
            .iter()
            .find(|p| p.p_type(endian) == object::elf::PT_TLS)
            .map(|p| (p.p_memsz(endian).into(), p.p_align(endian).into()))
    }
    match obj {
        object::File::Elf32(f) => find(f),
        object::File::Elf64(f) => find(f),
        _ => None,
    }
}

/// Appends the data (`STT_OBJECT`) and thread-local (`STT_TLS`) symbols of `symbols`.
fn data_symbols<'a>(
    symbols: impl Iterator<Item = object::Symbol<'a, 'a>>,
    source: u8,
    globals: &mut Vec<(u64, u64, Sym)>,
    tls: &mut Vec<(u64, u64, Sym)>,
) {
    for s in symbols {
        let out = match s.kind() {
            SymbolKind::Data if s.address() != 0 => &mut *globals,
            SymbolKind::Tls => &mut *tls,
            _ => continue,
        };
        if s.is_undefined() || s.section_index().is_none() {
            continue;
        }
        let Ok(raw) = s.name() else {
            continue;
        };
        let name = addr2line::demangle_auto(Cow::Borrowed(raw), None).into_owned();
        out.push((
            s.address(),
            s.address().saturating_add(s.size()),
            Sym {
                name,
                size: s.size(),
                source,
            },
        ));
    }
}

impl DataModule {
    /// The variable of `kind` covering `at`, and the offset of `at` in it.
    /// The start of the symbol of `kind` covering `at`, from the symbol tables.
    fn symbol_start(&self, kind: Kind, at: u64) -> Option<u64> {
        let syms = if kind == Kind::Global {
            &self.globals
        } else {
            &self.tls
        };
        syms.as_ref()?.covering(at).map(|s| s.start).max()
    }

    fn variable(&mut self, module: usize, kind: Kind, at: u64) -> Option<(Variable, u64)> {
        if let Some(Some(info)) = &mut self.info {
            if info.vars.is_none() {
                info.index_vars(self.globals.as_ref(), self.tls.as_ref());
            }
            let (globals, tls) = info.vars.as_ref()?;
            let vars = if kind == Kind::Global { globals } else { tls };
            // Of overlapping variables, the typed one, then the innermost.
            let best = vars
                .covering(at)
                .min_by_key(|s| (s.item.ty.is_none(), s.end - s.start));
            if let Some(s) = best {
                let v = &s.item;
                return Some((
                    Variable {
                        name: v.name.clone(),
                        start: s.start,
                        size: v.size,
                        file: v.file.and_then(|f| info.files.get(f as usize).cloned()),
                        line: v.line,
                        ty: v.ty.map(|die| TypeRef { module, die }),
                    },
                    at - s.start,
                ));
            }
        }
        let syms = if kind == Kind::Global {
            &self.globals
        } else {
            &self.tls
        };
        let covering: Vec<&Span<Sym>> = syms.as_ref()?.covering(at).collect();
        let source = covering.iter().map(|s| s.item.source).min()?;
        let start = covering
            .iter()
            .filter(|s| s.item.source == source)
            .map(|s| s.start)
            .max()?;
        let at_start = || {
            covering
                .iter()
                .filter(move |s| s.item.source == source && s.start == start)
        };
        let name = preferred(at_start().map(|s| s.item.name.as_str()))?;
        let s = at_start().find(|s| s.item.name == name)?;
        Some((
            Variable {
                name: name.to_string(),
                start,
                size: s.item.size,
                file: None,
                line: None,
                ty: None,
            },
            at - start,
        ))
    }
}

impl Symbolizer {
    /// The index of the data of module (`path`, `build_id`), loaded on first need.
    fn data_module(&mut self, path: &str, build_id: &[u8]) -> usize {
        let key = (path.to_string(), build_id.to_vec());
        if let Some(&i) = self.data.by_key.get(&key) {
            return i;
        }
        let m = self.load_data(path, build_id);
        self.data.modules.push(m);
        let i = self.data.modules.len() - 1;
        self.data.by_key.insert(key, i);
        i
    }

    /// Reads a module's ELF headers and symbol tables.
    fn load_data(&mut self, path: &str, build_id: &[u8]) -> DataModule {
        let Some(data) = self.read_module(path, build_id, true) else {
            return DataModule::default();
        };
        let Ok(obj) = object::File::parse(&*data) else {
            return DataModule::default();
        };
        let (mut globals, mut tls) = (Vec::new(), Vec::new());
        data_symbols(obj.symbols(), 0, &mut globals, &mut tls);
        data_symbols(obj.dynamic_symbols(), 2, &mut globals, &mut tls);
        DataModule {
            read: true,
            has_symtab: obj.symbols().next().is_some(),
            globals: Some(Spans::new(globals)),
            tls: Some(Spans::new(tls)),
            tls_segment: tls_segment(&obj),
            info: None,
        }
    }

    /// The module at `path`, read, if it is an ELF file with build-id `build_id`; with a warning
    /// when not (if `warn`).
    fn read_module(&mut self, path: &str, build_id: &[u8], warn: bool) -> Option<Vec<u8>> {
        let checked = match read_elf(Path::new(path)) {
            Ok((data, _)) => match object::File::parse(&*data) {
                Err(e) => Err(format!("{path} is not a readable ELF file ({e})")),
                Ok(obj) => match obj.build_id().ok().flatten() {
                    Some(found) if !build_id.is_empty() && found != build_id => Err(format!(
                        "build-id mismatch for {path}: expected {}, found {}; the file changed since the run",
                        hex(build_id),
                        hex(found)
                    )),
                    _ => Ok(()),
                },
            }
            .map(|()| data),
            Err(Unread::Io(e)) => Err(format!("cannot read module {path}: {e}")),
            Err(Unread::Refused(why)) => Err(format!("{path} {why}")),
        };
        match checked {
            Ok(data) => Some(data),
            Err(w) => {
                if warn && !path.starts_with('[') && !path.starts_with("linux-vdso") {
                    self.warn(format!("{w}; its variables show unnamed"));
                }
                None
            }
        }
    }

    /// The DWARF of data module `m`, opened on first need: the module's own, or its separate
    /// debug file's (shared with symbolization when that has read it already), whose symbol
    /// table also counts when the module has none.
    fn data_info(&mut self, m: usize, path: &str, build_id: &[u8]) -> Option<&mut Info> {
        if self.data.modules[m].info.is_none() {
            let info = self.load_info(m, path, build_id);
            self.data.modules[m].info = Some(info);
        }
        self.data.modules[m].info.as_mut()?.as_mut()
    }

    fn load_info(&mut self, m: usize, path: &str, build_id: &[u8]) -> Option<Info> {
        if !self.data.modules[m].read {
            return None;
        }
        let data = self.read_module(path, build_id, false)?;
        let obj = object::File::parse(&*data).ok()?;
        if obj
            .section_by_name(".debug_info")
            .is_some_and(|s| s.size() > 0)
        {
            return DebugFile::parse(&data[..]).map(|d| Info::new(d.dwarf(None), d.aranges));
        }
        let debug = self.debug_file(Path::new(path), build_id, &data);
        let module = &mut self.data.modules[m];
        if let Some(dobj) = debug
            .as_ref()
            .filter(|_| !module.has_symtab)
            .and_then(|(_, d)| object::File::parse(&**d).ok())
        {
            let (mut globals, mut tls) = (Vec::new(), Vec::new());
            data_symbols(dobj.symbols(), 1, &mut globals, &mut tls);
            module.globals = module.globals.take().map(|s| s.with(globals));
            module.tls = module.tls.take().map(|s| s.with(tls));
        }
        let key = (path.to_string(), build_id.to_vec());
        match self.modules.get(&key).and_then(|m| m.dwarf.as_ref()) {
            Some(d) => Some(Info::new(d.dwarf(None), d.aranges.clone())),
            None => debug
                .and_then(|(_, d)| DebugFile::parse(&d[..]))
                .map(|d| Info::new(d.dwarf(None), d.aranges)),
        }
    }

    /// The global variable (an `STT_OBJECT` symbol, or a DWARF variable located by `DW_OP_addr`)
    /// covering `vaddr` (an address in the module's ELF address space), and the offset of
    /// `vaddr` in it. DWARF gives the name, declaration and type; without DWARF for it, the
    /// symbol table (`.symtab`, the debug file's, then `.dynsym`) gives name, start and size.
    /// The first data lookup in a module walks its DWARF once; later ones are binary searches.
    pub fn global_at(
        &mut self,
        path: &str,
        build_id: &[u8],
        vaddr: u64,
    ) -> Option<(Variable, u64)> {
        let m = self.data_module(path, build_id);
        self.data_info(m, path, build_id);
        self.data.modules[m].variable(m, Kind::Global, vaddr)
    }

    /// The start of the global symbol (symbol tables only: no DWARF is read) covering `vaddr`:
    /// cheap enough for grouping the words of one variable while a process waits.
    pub fn global_symbol_start(&mut self, path: &str, build_id: &[u8], vaddr: u64) -> Option<u64> {
        let m = self.data_module(path, build_id);
        self.data.modules[m].symbol_start(Kind::Global, vaddr)
    }

    /// As [`Symbolizer::global_symbol_start`], for a thread-local symbol at `offset` in the
    /// module's TLS block.
    pub fn tls_symbol_start(&mut self, path: &str, build_id: &[u8], offset: u64) -> Option<u64> {
        let m = self.data_module(path, build_id);
        self.data.modules[m].symbol_start(Kind::Tls, offset)
    }

    /// The thread-local variable (an `STT_TLS` symbol, or a DWARF variable located by a TLS
    /// operation) covering `offset` in the module's TLS block, and the offset in it.
    pub fn tls_at(&mut self, path: &str, build_id: &[u8], offset: u64) -> Option<(Variable, u64)> {
        let m = self.data_module(path, build_id);
        self.data_info(m, path, build_id);
        self.data.modules[m].variable(m, Kind::Tls, offset)
    }

    /// The module's `PT_TLS` segment: (memsz, align). On x86-64 (TLS variant II) the
    /// executable's block ends at the thread pointer and starts at
    /// `tp - round_up(memsz, align)`.
    pub fn tls_segment(&mut self, path: &str, build_id: &[u8]) -> Option<(u64, u64)> {
        let m = self.data_module(path, build_id);
        self.data.modules[m].tls_segment
    }

    fn info(&mut self, ty: &TypeRef) -> Option<&mut Info> {
        self.data
            .modules
            .get_mut(ty.module)?
            .info
            .as_mut()?
            .as_mut()
    }

    /// What lies at `offset` bytes into an object of type `ty`: the access path to it through
    /// members (of structs, classes and unions, base classes included), array elements, typedefs
    /// and qualifiers, and the pointee when the word there is a pointer. `None` for an offset
    /// past the type, in padding, or in a type that does not read.
    pub fn member_at(&mut self, ty: &TypeRef, offset: u64) -> Option<Member> {
        let info = self.info(ty)?;
        let mut name = String::new();
        let leaf = info.descend(ty.die, offset, &mut name, 0, &mut MAX_DESCENT.clone())?;
        let pointee = match leaf {
            Leaf::Pointer(to) => to.map(|die| TypeRef {
                module: ty.module,
                die,
            }),
            Leaf::Scalar => None,
        };
        Some(Member { name, pointee })
    }

    /// The type that a pointer (or reference) type points to, typedefs looked through; `None`
    /// for a type that is not a pointer, and for `void *`.
    pub fn pointee(&mut self, ty: &TypeRef) -> Option<TypeRef> {
        let die = self.info(ty)?.pointee(ty.die)?;
        Some(TypeRef {
            module: ty.module,
            die,
        })
    }

    /// The type's name as C or C++ writes it ("struct msg", "std::map<int, Entry>", "Node*").
    pub fn type_name(&mut self, ty: &TypeRef) -> Option<String> {
        self.info(ty)?.type_name(ty.die, 0)
    }

    /// The type's byte size.
    pub fn type_size(&mut self, ty: &TypeRef) -> Option<u64> {
        self.info(ty)?.size_of(ty.die)
    }

    /// The likely type of a heap block of `size` bytes allocated by the function containing
    /// `vaddr` (the allocating frame's pc, return address - 1, in the module): of the types of
    /// that function's return value, parameters and local variables (its inlined calls'
    /// included), the pointers to a struct, class or union whose size is `size` (or at most
    /// `size`, for one ending in a flexible array member). Scopes count innermost first: the
    /// inlined call at `vaddr`, then each caller out to the function, then the other inlined
    /// calls; the first scope with a candidate answers, and only when exactly one type matches.
    pub fn block_type(
        &mut self,
        path: &str,
        build_id: &[u8],
        vaddr: u64,
        size: u64,
    ) -> Option<TypeRef> {
        let m = self.data_module(path, build_id);
        let die = self.data_info(m, path, build_id)?.block_type(vaddr, size)?;
        Some(TypeRef { module: m, die })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_symbolizer_still_moves_between_threads() {
        fn send<T: Send>() {}
        send::<Symbolizer>();
    }

    #[test]
    fn spans_find_every_item_covering_an_address() {
        let s = Spans::new(vec![
            (10, 100, 'a'),
            (20, 30, 'b'),
            (40, 40, 'c'), // size 0: its own address only
            (120, 130, 'd'),
        ]);
        let at = |a| s.covering(a).map(|s| s.item).collect::<String>();
        assert_eq!(at(9), "");
        assert_eq!(at(10), "a");
        assert_eq!(at(25), "ba");
        assert_eq!(at(40), "ca");
        assert_eq!(at(41), "a");
        assert_eq!(at(100), "");
        assert_eq!(at(129), "d");
        assert_eq!(at(u64::MAX), "");
    }

    #[test]
    fn only_data_lookups_load_data_and_only_variables_load_dwarf() {
        let exe = "/bin/true";
        let mut s = Symbolizer::new();
        let _ = s.symbolize(exe, &[], 0x1000);
        assert!(s.data.modules.is_empty(), "symbolization reads no data");
        let _ = s.tls_segment(exe, &[]);
        assert_eq!(s.data.modules.len(), 1);
        assert!(s.data.modules[0].read);
        assert!(
            s.data.modules[0].info.is_none(),
            "the TLS segment reads no DWARF"
        );
        let _ = s.global_at(exe, &[], 0x1000);
        assert!(s.data.modules[0].info.is_some());
        let _ = s.tls_at(exe, &[], 0);
        assert_eq!(s.data.modules.len(), 1, "one module, loaded once");
    }
}
