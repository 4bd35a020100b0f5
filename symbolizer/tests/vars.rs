//! Variables and types from DWARF: tiny C, C++ and Rust programs under `tests/fixtures/`,
//! compiled at test time, asked for globals, thread-locals, members and block types. Expected
//! addresses and sizes come from the ELF symbol table; expected lines from a `MARK name` comment
//! in the source.

use std::path::{Path, PathBuf};
use std::process::Command;

use leakhunt_symbolizer::{Symbolizer, TypeRef};
use object::{Object, ObjectSymbol};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("leakhunt-vars-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles fixture `src` with `compiler` and `args` into `dir`, and returns the program's path.
fn build(dir: &Path, compiler: &str, src: &str, args: &[&str]) -> String {
    let out = dir.join(Path::new(src).file_stem().unwrap());
    let st = Command::new(compiler)
        .args(args)
        .arg(fixture(src))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(st.success(), "{compiler} {src} failed");
    out.to_str().unwrap().to_string()
}

/// The line of `src` that carries `MARK name`.
fn marked_line(src: &str, name: &str) -> u32 {
    let text = std::fs::read_to_string(fixture(src)).unwrap();
    let mark = format!("MARK {name} ");
    let i = text
        .lines()
        .position(|l| l.contains(&mark) || l.ends_with(&format!("MARK {name}")))
        .unwrap_or_else(|| panic!("no `MARK {name}` in {src}"));
    i as u32 + 1
}

/// (address, size) of the ELF symbol named `name` (its `.symtab`).
fn symbol(path: &str, name: &str) -> (u64, u64) {
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let s = obj
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name} in {path}"));
    (s.address(), s.size())
}

/// The address of a function halfway through it: a pc inside it.
fn inside(path: &str, function: &str) -> u64 {
    let (a, size) = symbol(path, function);
    a + size / 2
}

struct Fixture {
    s: Symbolizer,
    path: String,
}

impl Fixture {
    fn member(&mut self, ty: &TypeRef, off: u64) -> Option<(String, Option<String>)> {
        let m = self.s.member_at(ty, off)?;
        let to = m.pointee.and_then(|p| self.s.type_name(&p));
        Some((m.name, to))
    }

    fn global_ty(&mut self, name: &str) -> TypeRef {
        let (a, _) = symbol(&self.path, name);
        let (v, _) = self.s.global_at(&self.path, &[], a).unwrap();
        v.ty.unwrap_or_else(|| panic!("{name} has no type"))
    }
}

fn member(name: &str, to: Option<&str>) -> Option<(String, Option<String>)> {
    Some((name.to_string(), to.map(str::to_string)))
}

fn c_registry(dwarf: &str) {
    let dir = scratch(&format!("c{dwarf}"));
    let path = build(&dir, "gcc", "registry.c", &["-O0", dwarf]);
    let src = fixture("registry.c").to_str().unwrap().to_string();
    let mut f = Fixture {
        s: Symbolizer::new(),
        path: path.clone(),
    };

    // Inside a global struct: name, start, size, decl file and line, offset.
    let (a, size) = symbol(&path, "g_registry");
    assert_eq!(size, 0xa8);
    let (v, off) = f.s.global_at(&path, &[], a + 0x10).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off),
        ("g_registry", a, 0xa8, 0x10)
    );
    assert_eq!(v.file.as_deref(), Some(src.as_str()));
    assert_eq!(v.line, Some(marked_line("registry.c", "g_registry")));
    let ty = v.ty.unwrap();
    assert_eq!(f.s.type_name(&ty).as_deref(), Some("struct registry"));
    assert_eq!(f.s.type_size(&ty), Some(0xa8));
    assert_eq!(f.s.pointee(&ty), None);
    let after = f.s.global_at(&path, &[], a + 0xa8).map(|(v, _)| v.name);
    assert_ne!(after.as_deref(), Some("g_registry"));

    // Members: pointers, arrays of scalars, arrays of structs, nested anonymous structs,
    // typedef'd pointers, unions (the pointer member), past the end.
    assert_eq!(f.member(&ty, 0), member("count", None));
    assert_eq!(f.member(&ty, 0x10), member("name", None));
    assert_eq!(f.member(&ty, 0x18), member("head", Some("struct entry")));
    assert_eq!(
        f.member(&ty, 0x20),
        member("buckets[0].next", Some("struct entry"))
    );
    assert_eq!(
        f.member(&ty, 0x68),
        member("buckets[3].next", Some("struct entry"))
    );
    assert_eq!(f.member(&ty, 0x70), member("buckets[3].key", Some("char")));
    assert_eq!(f.member(&ty, 0x78), member("buckets[3].value", None));
    assert_eq!(f.member(&ty, 0x88), member("inner.st.misses", None));
    assert_eq!(
        f.member(&ty, 0x90),
        member("inner.cursor", Some("struct entry"))
    );
    assert_eq!(f.member(&ty, 0x98), member("table", Some("entry_p")));
    assert_eq!(f.member(&ty, 0xa0), member("u.owner", Some("struct entry")));
    assert_eq!(f.member(&ty, 0xa8), None);
    let table = f.s.member_at(&ty, 0x98).unwrap().pointee.unwrap();
    let entry = f.s.pointee(&table).expect("entry_p is a pointer");
    assert_eq!(f.s.type_name(&entry).as_deref(), Some("struct entry"));
    assert_eq!(f.s.type_size(&entry), Some(24));

    // A file-local static, and a function-local one.
    let (a, _) = symbol(&path, "s_free_list");
    let (v, off) = f.s.global_at(&path, &[], a + 3).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off),
        ("s_free_list", a, 8, 3)
    );
    assert_eq!(v.line, Some(marked_line("registry.c", "s_free_list")));
    let ty = v.ty.unwrap();
    assert_eq!(f.s.type_name(&ty).as_deref(), Some("struct entry*"));
    let to = f.s.pointee(&ty).unwrap();
    assert_eq!(f.s.type_name(&to).as_deref(), Some("struct entry"));
    assert_eq!(f.member(&ty, 0), member("", Some("struct entry")));
    let (a, _) = symbol(&path, "calls.0");
    let (v, _) = f.s.global_at(&path, &[], a).unwrap();
    assert_eq!(
        (v.name.as_str(), v.line),
        ("calls", Some(marked_line("registry.c", "calls")))
    );

    // Thread-locals by their offset in the TLS block (the symbol's value).
    for name in ["tls_count", "tls_last"] {
        let (at, size) = symbol(&path, name);
        let (v, off) = f.s.tls_at(&path, &[], at + 5).unwrap();
        assert_eq!((v.name.as_str(), v.start, v.size, off), (name, at, size, 5));
        assert_eq!(v.line, Some(marked_line("registry.c", name)));
        assert_eq!(v.file.as_deref(), Some(src.as_str()));
    }
    let (at, _) = symbol(&path, "tls_last");
    let (v, _) = f.s.tls_at(&path, &[], at).unwrap();
    let ty = v.ty.unwrap();
    let to = f.s.pointee(&ty).unwrap();
    assert_eq!(f.s.type_name(&to).as_deref(), Some("struct entry"));
    // Two 8-byte thread-locals.
    assert_eq!(f.s.tls_segment(&path, &[]), Some((16, 8)));
    assert!(f.s.warnings().is_empty(), "{:?}", f.s.warnings());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_globals_statics_thread_locals_and_members() {
    c_registry("-g");
}

#[test]
fn c_globals_statics_thread_locals_and_members_dwarf4() {
    c_registry("-gdwarf-4");
}

#[test]
fn without_dwarf_the_symbol_table_names_variables() {
    let dir = scratch("nodwarf");
    let path = build(&dir, "gcc", "registry.c", &["-O0"]);
    let mut s = Symbolizer::new();
    let (a, size) = symbol(&path, "g_registry");
    let (v, off) = s.global_at(&path, &[], a + 0x20).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off, v.file, v.line, v.ty),
        ("g_registry", a, size, 0x20, None, None, None)
    );
    let (at, size) = symbol(&path, "tls_last");
    let (v, off) = s.tls_at(&path, &[], at + 1).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off),
        ("tls_last", at, size, 1)
    );
    assert_eq!(s.tls_segment(&path, &[]), Some((16, 8)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpp_namespace_base_class_and_std_map_member() {
    let dir = scratch("cpp");
    let path = build(&dir, "g++", "classes.cpp", &["-g", "-O0"]);
    let mut f = Fixture {
        s: Symbolizer::new(),
        path: path.clone(),
    };
    let (a, size) = symbol(&path, "_ZN8registry7g_cacheE");
    assert_eq!(size, 0x50);
    let (v, off) = f.s.global_at(&path, &[], a + 0x48).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off),
        ("registry::g_cache", a, 0x50, 0x48)
    );
    assert_eq!(v.line, Some(marked_line("classes.cpp", "g_cache")));
    let ty = v.ty.unwrap();
    assert_eq!(f.s.type_name(&ty).as_deref(), Some("Registry"));
    // The base class's members are named directly; the map's internals under its name.
    assert_eq!(f.member(&ty, 0x08), member("refcount", None));
    assert_eq!(f.member(&ty, 0x10), member("first", Some("Entry")));
    assert_eq!(f.member(&ty, 0x48), member("last", Some("Entry")));
    for off in (0x18..0x48).step_by(8) {
        let (name, _) = f.member(&ty, off).unwrap();
        assert!(name.starts_with("entries."), "{off:#x}: {name}");
    }
    assert_eq!(
        f.member(&ty, 0x28),
        member(
            "entries._M_t._M_impl._M_header._M_parent",
            Some("std::_Rb_tree_node_base")
        )
    );
    let vptr = f.s.member_at(&ty, 0).unwrap();
    assert!(vptr.name.starts_with("_vptr"), "{vptr:?}");
    assert!(vptr.pointee.is_some());

    let map = f.global_ty("_ZN8registry5g_mapE");
    let name = f.s.type_name(&map).unwrap();
    assert!(name.starts_with("std::map<int, Entry,"), "{name}");
    assert_eq!(f.s.type_size(&map), Some(0x30));

    // A static member, defined out of the class.
    let (a, _) = symbol(&path, "_ZN8Registry9instancesE");
    let (v, _) = f.s.global_at(&path, &[], a).unwrap();
    assert_eq!(
        (v.name.as_str(), v.line),
        (
            "Registry::instances",
            Some(marked_line("classes.cpp", "instances"))
        )
    );
    // A function returning `Registry *`, and the block it allocates.
    let t =
        f.s.block_type(&path, &[], inside(&path, "_Z13make_registryv"), 0x50)
            .unwrap();
    assert_eq!(f.s.type_name(&t).as_deref(), Some("Registry"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn block_types_from_the_allocating_function() {
    let dir = scratch("blocks");
    let path = build(&dir, "gcc", "blocks.c", &["-g", "-O0"]);
    let mut s = Symbolizer::new();
    let mut block = |f: &str, size: u64| {
        let t = s.block_type(&path, &[], inside(&path, f), size)?;
        Some((s.type_name(&t).unwrap(), t))
    };
    // The return type; a local; a typedef'd pointer local.
    assert_eq!(block("msg_new", 16).unwrap().0, "struct msg");
    assert_eq!(block("msg_fill", 16).unwrap().0, "struct msg");
    assert_eq!(block("typedefd", 16).unwrap().0, "struct msg");
    // No type of that size; two of it.
    assert_eq!(block("msg_fill", 24).map(|b| b.0), None);
    assert_eq!(block("two_kinds", 16).map(|b| b.0), None);
    // A flexible array member takes any size from the struct's up.
    assert_eq!(block("flex_new", 12).unwrap().0, "struct flexmsg");
    assert_eq!(block("flex_new", 4).unwrap().0, "struct flexmsg");
    assert_eq!(block("flex_new", 2).map(|b| b.0), None);
    // The request freed without its header string: the member at 0x18.
    let (name, req) = block("req_new", 40).unwrap();
    assert_eq!(name, "struct request");
    let m = s.member_at(&req, 0x18).unwrap();
    assert_eq!(m.name, "hdr");
    assert_eq!(s.type_name(&m.pointee.unwrap()).as_deref(), Some("char"));
    let flex = s
        .block_type(&path, &[], inside(&path, "flex_new"), 12)
        .unwrap();
    assert_eq!(s.member_at(&flex, 6).unwrap().name, "data");
    assert_eq!(s.type_size(&flex), Some(4));
    // An address in no function.
    assert_eq!(s.block_type(&path, &[], 0, 16), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rust_static_by_its_demangled_name() {
    let dir = scratch("rust");
    let out = dir.join("statics");
    let st = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["-g", "-C", "opt-level=0", "--edition", "2021"])
        .arg(fixture("statics.rs"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let path = out.to_str().unwrap();
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let sym = obj
        .symbols()
        .find(|s| s.name().is_ok_and(|n| n.starts_with("_ZN7statics5CACHE")))
        .expect("CACHE's symbol");
    let mut s = Symbolizer::new();
    let (v, off) = s.global_at(path, &[], sym.address() + 8).unwrap();
    assert_eq!(
        (v.name.as_str(), v.start, v.size, off),
        ("statics::CACHE", sym.address(), sym.size(), 8)
    );
    assert_eq!(v.line, Some(marked_line("statics.rs", "CACHE")));
    assert!(v.file.is_some_and(|f| f.ends_with("statics.rs")));
    let name = s.type_name(&v.ty.unwrap()).unwrap();
    assert!(name.contains("Mutex<"), "{name}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn libc_globals_from_its_separate_debug_file() {
    // libc6-dbg (which CI installs): compressed DWARF in a separate file, 1,700 units; a
    // global of the dynamic symbol table named and typed by the DWARF.
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let data = std::fs::read(libc).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let build_id = obj.build_id().unwrap().unwrap().to_vec();
    let stdout = obj
        .dynamic_symbols()
        .find(|s| s.name() == Ok("_IO_2_1_stdout_"))
        .unwrap();
    let mut s = Symbolizer::new();
    let t = std::time::Instant::now();
    let (v, off) = s.global_at(libc, &build_id, stdout.address() + 8).unwrap();
    let first = t.elapsed();
    assert_eq!((v.name.as_str(), off), ("_IO_2_1_stdout_", 8));
    assert!(v.file.is_some() && v.line.is_some(), "{v:?}");
    let ty = v.ty.unwrap();
    assert_eq!(s.type_name(&ty).as_deref(), Some("struct _IO_FILE_plus"));
    let m = s.member_at(&ty, 8).unwrap();
    assert_eq!(m.name, "file._IO_read_ptr");
    assert_eq!(s.type_name(&m.pointee.unwrap()).as_deref(), Some("char"));
    let t = std::time::Instant::now();
    for _ in 0..1000 {
        assert!(s.global_at(libc, &build_id, stdout.address()).is_some());
    }
    let later = t.elapsed();
    eprintln!("libc: first global_at {first:?}, 1000 more {later:?}");
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
}

#[test]
fn corrupt_dwarf_answers_none_and_never_panics() {
    // Bytes of the fixture's `.debug_info` and `.debug_abbrev` changed at random (seeded):
    // every question still answers, something or `None`.
    use object::ObjectSection;
    let dir = scratch("corrupt");
    let path = build(&dir, "gcc", "registry.c", &["-g", "-O0"]);
    let data = std::fs::read(&path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let ranges: Vec<(u64, u64)> = [".debug_info", ".debug_abbrev"]
        .iter()
        .filter_map(|n| obj.section_by_name(n)?.file_range())
        .collect();
    let symbols: Vec<(u64, u64)> = obj
        .symbols()
        .filter(|s| s.size() > 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let mut bad = data.clone();
        for _ in 0..1 + round % 8 {
            let (start, len) = ranges[(next() % ranges.len() as u64) as usize];
            let at = (start + next() % len) as usize;
            bad[at] ^= (next() % 255 + 1) as u8;
        }
        let p = dir.join(format!("bad{round}"));
        std::fs::write(&p, &bad).unwrap();
        let p = p.to_str().unwrap();
        let mut s = Symbolizer::new();
        for &(a, size) in &symbols {
            let _ = s.block_type(p, &[], a + size / 2, 16);
            let _ = s.tls_at(p, &[], a);
            let Some((v, _)) = s.global_at(p, &[], a) else {
                continue;
            };
            let Some(ty) = v.ty else { continue };
            let _ = (s.type_name(&ty), s.type_size(&ty), s.pointee(&ty));
            for off in (0..0xb0).step_by(4) {
                if let Some(m) = s.member_at(&ty, off) {
                    let _ = m.pointee.map(|p| s.type_name(&p));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn block_type_of_an_allocation_inlined_into_its_caller() {
    // Built with -O2: `user` allocates a `struct pair` itself and a `struct msg` through the
    // inlined `msg_alloc`, both 16 bytes. Each malloc call's pc answers with the type of the
    // innermost scope around it (which one is inlined, the symbolizer's frames say).
    let dir = scratch("inlined");
    let path = build(&dir, "gcc", "inlined.c", &["-g", "-O2"]);
    let dump = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", &path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    let body = text
        .split("<user>:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    let calls: Vec<u64> = body
        .lines()
        .filter(|l| l.contains("call") && l.contains("<malloc@plt>"))
        .map(|l| u64::from_str_radix(l.trim().split(':').next().unwrap(), 16).unwrap())
        .collect();
    assert_eq!(calls.len(), 2, "{body}");
    let mut s = Symbolizer::new();
    let mut seen = Vec::new();
    for pc in calls {
        let frames = s.symbolize(&path, &[], pc);
        let inlined = frames[0].function.as_deref() == Some("msg_alloc");
        let t = s.block_type(&path, &[], pc, 16).unwrap();
        let name = s.type_name(&t).unwrap();
        let want = if inlined { "struct msg" } else { "struct pair" };
        assert_eq!(name, want, "{pc:#x}: {frames:?}");
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["struct msg", "struct pair"]);
    let _ = std::fs::remove_dir_all(&dir);
}
