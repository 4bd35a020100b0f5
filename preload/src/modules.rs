//! The loaded modules, from `dl_iterate_phdr`: at start, after every `dlopen`/`dlclose` through
//! our hooks, and when an unwind meets an address no module covers (libraries that libc loads
//! itself, e.g. NSS). Tables are immutable snapshots published through an atomic pointer and never
//! freed (a few hundred bytes per change), so an unwinding thread never waits for a rescan.

extern crate alloc;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::sys::SpinLock;

pub struct ModuleInfo {
    pub id: u32,
    pub bias: u64,
    pub path: String,
    /// Executable segments, runtime addresses.
    pub ranges: Vec<(u64, u64)>,
    /// Runtime address of `.eh_frame_hdr`, 0 if none.
    pub eh_frame_hdr: usize,
    /// The mapped segment holding the unwind tables (bounds every read of them).
    pub eh_segment_start: usize,
    pub eh_segment_end: usize,
    /// This library itself: its frames are dropped from stacks.
    pub own: bool,
    /// Its `Module` trace record, encoded in advance so that flushing never allocates.
    pub record: Vec<u8>,
    /// Executable PT_LOAD segments: (file offset, ELF address, file size).
    pub segments: Vec<(u64, u64, u64)>,
    pub build_id: Vec<u8>,
    /// Another mapping of a module's file, made by the program (V8 maps its embedded builtins
    /// again near its code): no loader entry, kept until the end.
    pub alias: bool,
}

pub struct Table {
    /// Sorted by start; non-overlapping.
    pub ranges: Vec<(u64, u64, &'static ModuleInfo)>,
    pub modules: Vec<&'static ModuleInfo>,
}

impl Table {
    #[inline]
    pub fn find(&self, addr: u64) -> Option<&'static ModuleInfo> {
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        if i == 0 {
            return None;
        }
        let (s, e, m) = self.ranges[i - 1];
        (addr >= s && addr < e).then_some(m)
    }
}

/// A change to report in the trace.
pub enum Change {
    Load(&'static ModuleInfo),
    Unload { id: u32, gen: u32 },
}

static CURRENT: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
/// Bumped on every load or unload.
pub static GEN: AtomicU32 = AtomicU32::new(0);
/// Bumped on every unload: addresses may change meaning, so stacks and rule caches from before
/// are not reused after it.
pub static UNLOAD_GEN: AtomicU32 = AtomicU32::new(0);
static NEXT_ID: AtomicU32 = AtomicU32::new(0);
pub static LOCK: SpinLock = SpinLock::new();
/// Every change since start, in order; the output emits those it has not yet written.
/// Guarded by `LOCK`.
pub static mut LOG: Vec<Change> = Vec::new();

pub fn current() -> Option<&'static Table> {
    let p = CURRENT.load(Ordering::Acquire);
    // SAFETY: published tables are leaked, hence valid forever.
    (!p.is_null()).then(|| unsafe { &*p })
}

struct Found {
    path: String,
    bias: u64,
    phdr: *const libc::Elf64_Phdr,
    phnum: usize,
}

unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: dl_iterate_phdr passes a valid info and our own `Vec<Found>` as `data`.
    let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<Found>)) };
    let path = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
        String::from_utf8_lossy(unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()).into_owned()
    };
    out.push(Found {
        path,
        bias: info.dlpi_addr,
        phdr: info.dlpi_phdr,
        phnum: info.dlpi_phnum as usize,
    });
    0
}

fn exe_path() -> String {
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is writable for its length; readlink does not NUL-terminate, we use the count.
    let n = unsafe {
        libc::readlink(
            c"/proc/self/exe".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return String::from("[main]");
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

fn build_id(bias: u64, phdrs: &[libc::Elf64_Phdr]) -> Vec<u8> {
    for ph in phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
        let mut p = (bias + ph.p_vaddr) as usize;
        let end = p + ph.p_memsz as usize;
        while p + 12 <= end {
            // SAFETY: the PT_NOTE segment is mapped (it lies in a loaded PT_LOAD) and we stay
            // within its `p_memsz` bytes.
            let (namesz, descsz, ty) = unsafe {
                let w = p as *const u32;
                (
                    w.read_unaligned() as usize,
                    w.add(1).read_unaligned() as usize,
                    w.add(2).read_unaligned(),
                )
            };
            let name_at = p + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let next = desc_at + descsz.next_multiple_of(4);
            if next > end {
                break;
            }
            // SAFETY: both ranges were bounds-checked against the note segment above.
            let name = unsafe { core::slice::from_raw_parts(name_at as *const u8, namesz) };
            if ty == 3 && name == b"GNU\0" {
                // SAFETY: as above.
                return unsafe { core::slice::from_raw_parts(desc_at as *const u8, descsz) }
                    .to_vec();
            }
            p = next;
        }
    }
    Vec::new()
}

fn describe(f: &Found, id: u32, gen: u32) -> ModuleInfo {
    // SAFETY: the loader's program headers stay valid while the module is loaded, and we hold
    // the information only while scanning under LOCK.
    let phdrs = unsafe { core::slice::from_raw_parts(f.phdr, f.phnum) };
    let mut ranges = Vec::new();
    let mut segments = Vec::new();
    let mut eh_frame_hdr = 0usize;
    let mut eh_segment_end = 0usize;
    let mut eh_segment_start = 0usize;
    for ph in phdrs {
        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
            ranges.push((f.bias + ph.p_vaddr, f.bias + ph.p_vaddr + ph.p_memsz));
            segments.push((ph.p_offset, ph.p_vaddr, ph.p_filesz));
        }
        if ph.p_type == libc::PT_GNU_EH_FRAME {
            eh_frame_hdr = (f.bias + ph.p_vaddr) as usize;
        }
    }
    if eh_frame_hdr != 0 {
        for ph in phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD) {
            let s = (f.bias + ph.p_vaddr) as usize;
            let e = s + ph.p_memsz as usize;
            if eh_frame_hdr >= s && eh_frame_hdr < e {
                eh_segment_start = s;
                eh_segment_end = e;
            }
        }
        if eh_segment_end == 0 {
            eh_frame_hdr = 0;
        }
    }
    let own_addr = describe as *const () as usize as u64;
    let own = ranges.iter().any(|&(s, e)| own_addr >= s && own_addr < e);
    let path = f.path.clone();
    let build_id = build_id(f.bias, phdrs);
    let mut record = Vec::new();
    let segments_kept = segments.clone();
    let build_id_kept = build_id.clone();
    leakhunt_format::encode::module(
        &leakhunt_format::encode::Module {
            id,
            gen,
            bias: f.bias,
            path: path.clone(),
            build_id,
            ranges: ranges.clone(),
        },
        &mut record,
    );
    ModuleInfo {
        id,
        bias: f.bias,
        path,
        ranges,
        eh_frame_hdr,
        eh_segment_start,
        eh_segment_end,
        own,
        record,
        segments: segments_kept,
        build_id: build_id_kept,
        alias: false,
    }
}

/// The program mapped part of a loaded module's file again, executable, at `[start, end)` from
/// file offset `off` (V8 copies its embedded builtins next to its code this way): record it as
/// a module of that file with its own bias, so that frames there are named from the file's
/// symbols. Returns whether it was added. The caller holds the reentrancy guard (this
/// allocates through the real allocator).
pub fn add_alias(path: &[u8], start: u64, end: u64, off: u64) -> bool {
    let _l = LOCK.lock();
    let Some(t) = current() else { return false };
    if t.find(start).is_some() {
        return false;
    }
    let Some(m) = t
        .modules
        .iter()
        .find(|m| !m.alias && m.path.as_bytes() == path)
    else {
        return false;
    };
    let Some(&(p_off, p_vaddr, _)) = m
        .segments
        .iter()
        .find(|&&(o, _, sz)| off >= o && off < o + sz)
    else {
        return false;
    };
    let bias = start.wrapping_sub(p_vaddr + (off - p_off));
    let gen = GEN.fetch_add(1, Ordering::AcqRel) + 1;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut record = Vec::new();
    leakhunt_format::encode::module(
        &leakhunt_format::encode::Module {
            id,
            gen,
            bias,
            path: m.path.clone(),
            build_id: m.build_id.clone(),
            ranges: alloc::vec![(start, end)],
        },
        &mut record,
    );
    let a: &'static ModuleInfo = Box::leak(Box::new(ModuleInfo {
        id,
        bias,
        path: m.path.clone(),
        ranges: alloc::vec![(start, end)],
        eh_frame_hdr: 0,
        eh_segment_start: 0,
        eh_segment_end: 0,
        own: false,
        record,
        segments: Vec::new(),
        build_id: m.build_id.clone(),
        alias: true,
    }));
    // SAFETY: LOG is only touched under LOCK, which we hold.
    unsafe { (*core::ptr::addr_of_mut!(LOG)).push(Change::Load(a)) };
    let mut modules = t.modules.clone();
    modules.push(a);
    publish(modules);
    true
}

/// Publishes a table of `modules` (never freed: unwinding threads may hold the old one).
fn publish(modules: Vec<&'static ModuleInfo>) {
    let mut ranges: Vec<(u64, u64, &'static ModuleInfo)> = modules
        .iter()
        .flat_map(|m| m.ranges.iter().map(move |&(s, e)| (s, e, *m)))
        .collect();
    ranges.sort_unstable_by_key(|r| r.0);
    let t = Box::leak(Box::new(Table { ranges, modules }));
    CURRENT.store(t, Ordering::Release);
}

/// Re-reads the loaded modules and publishes a new table if anything changed. Returns whether it
/// did. The caller holds the reentrancy guard (this allocates through the real allocator).
pub fn rescan() -> bool {
    let _l = LOCK.lock();
    let mut found: Vec<Found> = Vec::new();
    // SAFETY: `collect` matches the callback signature and `found` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(collect), &mut found as *mut Vec<Found> as *mut c_void) };
    if found.iter().any(|f| f.path.is_empty()) {
        let exe = exe_path();
        for f in found.iter_mut().filter(|f| f.path.is_empty()) {
            f.path = exe.clone();
        }
    }
    let old: &[&'static ModuleInfo] = match current() {
        Some(t) => &t.modules,
        None => &[],
    };
    let same = |m: &ModuleInfo, f: &Found| m.bias == f.bias && m.path == f.path;
    let mut changed = false;
    let mut modules: Vec<&'static ModuleInfo> = Vec::new();
    // SAFETY: LOG is only touched under LOCK, which we hold.
    let log = unsafe { &mut *core::ptr::addr_of_mut!(LOG) };
    for m in old {
        if m.alias || found.iter().any(|f| same(m, f)) {
            modules.push(m);
        } else {
            let gen = GEN.fetch_add(1, Ordering::AcqRel) + 1;
            UNLOAD_GEN.fetch_add(1, Ordering::AcqRel);
            log.push(Change::Unload { id: m.id, gen });
            changed = true;
        }
    }
    for f in &found {
        if old.iter().any(|m| same(m, f)) {
            continue;
        }
        let gen = if old.is_empty() {
            0
        } else {
            GEN.fetch_add(1, Ordering::AcqRel) + 1
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let m: &'static ModuleInfo = Box::leak(Box::new(describe(f, id, gen)));
        log.push(Change::Load(m));
        modules.push(m);
        changed = true;
    }
    if changed || current().is_none() {
        publish(modules);
    }
    changed
}
