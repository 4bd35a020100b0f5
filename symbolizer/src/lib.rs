//! Turns (module, address) into source frames: function (demangled C++/Rust), file, line and
//! inlined frames from DWARF; the symbol table when there is no DWARF; module+offset when there is
//! neither. Separate debug files are found through `/usr/lib/debug/.build-id/` and
//! `.gnu_debuglink`. Modules are loaded lazily, once, and a module that cannot be read is a
//! warning, never an error: missing debug info never fails a report.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

struct Module {
    /// DWARF source (the module itself, or its separate debug file).
    dwarf: Option<addr2line::Loader>,
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
                .and_then(|d| addr2line::Loader::new(d).ok())
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
        let m = &self.modules[&key];
        let mut out = Vec::new();
        for loader in [m.dwarf.as_ref(), m.symbols.as_ref()].into_iter().flatten() {
            if let Ok(mut frames) = loader.find_frames(vaddr) {
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
            if !out.is_empty() {
                break;
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
