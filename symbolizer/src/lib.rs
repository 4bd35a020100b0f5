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

fn file_build_id(data: &[u8]) -> Option<Vec<u8>> {
    let obj = object::File::parse(data).ok()?;
    obj.build_id().ok().flatten().map(|b| b.to_vec())
}

fn has_dwarf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(obj) = object::File::parse(&*data) else {
        return false;
    };
    obj.section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0)
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
                };
            }
        };
        if !build_id.is_empty() {
            match file_build_id(&data) {
                Some(found) if found != build_id => {
                    self.warn(format!(
                        "build-id mismatch for {path}: expected {}, found {}; the file changed since the run, its frames show as module+offset",
                        hex(build_id),
                        hex(&found)
                    ));
                    return Module {
                        dwarf: None,
                        symbols: None,
                    };
                }
                _ => {}
            }
        }
        let symbols = addr2line::Loader::new(p).ok();
        let dwarf = if has_dwarf(p) {
            None
        } else {
            self.debug_file(p, build_id, &data)
                .and_then(|d| addr2line::Loader::new(d).ok())
        };
        Module { dwarf, symbols }
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
            // glibc's DWARF names its internal aliases (`__GI___strdup`); the exported symbol at
            // the same address is the name users know (`strdup`), and the one valgrind shows.
            if last
                .function
                .as_deref()
                .is_some_and(|f| f.starts_with("__GI_"))
            {
                if let Some(name) = m.symbols.as_ref().and_then(|l| l.find_symbol(vaddr)) {
                    last.function = Some(name.to_string());
                }
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
