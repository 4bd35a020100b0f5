//! Stack capture with DWARF CFI (`.eh_frame_hdr` / `.eh_frame`), which works where frame pointers
//! do not (Debian's libc, libstdc++ and most binaries have none).
//!
//! Each return address's rule (how to find the caller's CFA, return address and saved rbp) is
//! computed once with gimli and kept in a per-thread direct-mapped cache; the cache is cleared when
//! the module generation changes. A walk only reads memory inside `[sp, stack_hi)` of the calling
//! thread, so garbage on the stack can end a walk early but never crash it.
//!
//! Frames are return addresses, innermost first, starting at the program's call into the
//! allocator: the library's own frames are dropped.

extern crate alloc;
use alloc::boxed::Box;

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Pointer, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use leakhunt_format::StopReason;

use crate::modules::{self, ModuleInfo};

pub const MAX_FRAMES_CAP: usize = 256;
const CACHE_SIZE: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Empty cache entry.
    Empty = 0,
    Ok = 1,
    /// Return address undefined: the outermost frame.
    End = 2,
    NoInfo = 3,
    Unknown = 4,
    Unsupported = 5,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Rule {
    kind: Kind,
    /// CFA is rbp + off (else rsp + off).
    cfa_rbp: bool,
    /// The address lies in this library.
    own: bool,
    cfa_off: i32,
    ra_off: i32,
    /// Where the caller's rbp was saved, relative to the CFA; 0 = not saved (unchanged).
    rbp_off: i32,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    addr: u64,
    rule: Rule,
}

/// Per-thread unwind state, living in the thread's ring mapping (all-zero is valid).
#[repr(C)]
pub struct Scratch {
    /// `modules::GEN + 1` when the cache was last valid (0: never).
    cache_gen: u32,
    cache: [Entry; CACHE_SIZE],
    ctx: Option<Box<UnwindContext<usize>>>,
    /// The previous stack of this thread and its id, for the one-entry dedup cache.
    pub prev_len: u32,
    pub prev_id: u32,
    pub prev_meta: u64,
    pub prev: [u64; MAX_FRAMES_CAP],
    /// Where the current capture writes its frames.
    pub frames: [u64; MAX_FRAMES_CAP],
}

impl Scratch {
    pub fn reset_for_new_thread(&mut self) {
        self.prev_len = 0;
        self.prev_id = 0;
        self.prev_meta = 0;
    }

    fn ensure_fresh(&mut self) {
        let g = modules::GEN
            .load(core::sync::atomic::Ordering::Acquire)
            .wrapping_add(1);
        if self.cache_gen != g {
            for e in self.cache.iter_mut() {
                e.rule.kind = Kind::Empty;
            }
            self.cache_gen = g;
            self.prev_len = 0;
            self.prev_id = 0;
        }
    }

    #[inline]
    fn rule(&mut self, addr: u64) -> Rule {
        let slot = ((addr ^ (addr >> 12)) as usize) & (CACHE_SIZE - 1);
        let e = self.cache[slot];
        if e.addr == addr && e.rule.kind != Kind::Empty {
            return e.rule;
        }
        let r = self.compute(addr);
        self.cache[slot] = Entry { addr, rule: r };
        r
    }

    #[cold]
    fn compute(&mut self, addr: u64) -> Rule {
        let none = |kind| Rule {
            kind,
            cfa_rbp: false,
            own: false,
            cfa_off: 0,
            ra_off: 0,
            rbp_off: 0,
        };
        let mut table = modules::current();
        let mut m = table.and_then(|t| t.find(addr));
        if m.is_none() && modules::rescan() {
            table = modules::current();
            m = table.and_then(|t| t.find(addr));
            self.cache_gen = modules::GEN
                .load(core::sync::atomic::Ordering::Acquire)
                .wrapping_add(1);
        }
        let Some(m) = m else {
            return none(Kind::Unknown);
        };
        let ctx = self
            .ctx
            .get_or_insert_with(|| Box::new(UnwindContext::new()));
        let mut r = match cfi_rule(m, addr, ctx) {
            Some(r) => r,
            None if in_loader_entry(addr) => none(Kind::End),
            None => none(Kind::NoInfo),
        };
        r.own = m.own;
        r
    }
}

/// The dynamic loader's entry code (`_start` / `_dl_start_user`) has no CFI: it is the outermost
/// frame of constructors and of allocations made before `main`'s own `_start` runs, so a walk that
/// reaches it is complete. Bytes past the entry point that count as that stub.
const LOADER_ENTRY_STUB: u64 = 256;

fn in_loader_entry(addr: u64) -> bool {
    // SAFETY: getauxval only reads the auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_BASE) };
    if base == 0 {
        return false;
    }
    // SAFETY: AT_BASE is where the loader's ELF header is mapped; e_entry is the u64 at offset 24
    // of an Elf64_Ehdr, inside its first page.
    let entry = base + unsafe { ((base + 24) as *const u64).read_unaligned() };
    addr >= entry && addr < entry + LOADER_ENTRY_STUB
}

fn cfi_rule(m: &ModuleInfo, addr: u64, ctx: &mut UnwindContext<usize>) -> Option<Rule> {
    if m.eh_frame_hdr == 0 {
        return None;
    }
    // SAFETY: `[eh_frame_hdr, eh_segment_end)` lies inside one loaded PT_LOAD segment of a module
    // that is loaded (it is in the current table; a concurrent dlclose of code that is on this
    // thread's stack would already be a bug in the program).
    let hdr = unsafe {
        core::slice::from_raw_parts(
            m.eh_frame_hdr as *const u8,
            m.eh_segment_end - m.eh_frame_hdr,
        )
    };
    let bases = BaseAddresses::default().set_eh_frame_hdr(m.eh_frame_hdr as u64);
    let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
    let Pointer::Direct(eh_frame) = parsed.eh_frame_ptr() else {
        return None;
    };
    let eh_frame = eh_frame as usize;
    if eh_frame < m.eh_segment_start || eh_frame >= m.eh_segment_end {
        return None;
    }
    // SAFETY: checked to lie inside the same mapped segment just above.
    let ehf =
        unsafe { core::slice::from_raw_parts(eh_frame as *const u8, m.eh_segment_end - eh_frame) };
    let ehf = EhFrame::new(ehf, LittleEndian);
    let bases = bases.set_eh_frame(eh_frame as u64);
    let table = parsed.table()?;
    let row = table
        .unwind_info_for_address(&ehf, &bases, ctx, addr, EhFrame::cie_from_offset)
        .ok()?;
    let mut r = Rule {
        kind: Kind::Ok,
        cfa_rbp: false,
        own: false,
        cfa_off: 0,
        ra_off: 0,
        rbp_off: 0,
    };
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset }
            if register == X86_64::RSP || register == X86_64::RBP =>
        {
            r.cfa_rbp = register == X86_64::RBP;
            r.cfa_off = i32::try_from(offset).ok()?;
        }
        _ => r.kind = Kind::Unsupported,
    }
    // No rule is the default rule: for the return address "undefined" (the outermost frame), for
    // rbp "same value".
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(o)) => r.ra_off = i32::try_from(o).ok()?,
        None | Some(RegisterRule::Undefined) => r.kind = Kind::End,
        _ => r.kind = Kind::Unsupported,
    }
    match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(o)) if o != 0 => r.rbp_off = i32::try_from(o).ok()?,
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::SameValue) => {}
        _ => r.kind = Kind::Unsupported,
    }
    Some(r)
}

/// Captures the caller's stack into `s.frames`; returns the frame count and why it stopped.
///
/// `stack_hi` bounds every read: the walk reads only `[sp, stack_hi)` of this thread.
#[inline(never)]
pub fn capture(s: &mut Scratch, max: usize, stack_hi: usize) -> (usize, StopReason) {
    let (mut pc, mut sp, mut bp): (u64, u64, u64);
    // SAFETY: reads the instruction pointer, stack pointer and rbp; writes nothing.
    unsafe {
        core::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nostack, nomem, preserves_flags),
        );
    }
    s.ensure_fresh();
    let lo = sp;
    let hi = stack_hi as u64;
    let max = max.min(MAX_FRAMES_CAP);
    let read = |addr: u64| -> Option<u64> {
        if addr < lo || addr.checked_add(8)? > hi || !addr.is_multiple_of(8) {
            return None;
        }
        // SAFETY: `[lo, hi)` is this thread's mapped stack (lo is our own sp, hi its top), and the
        // 8-byte aligned word lies inside it.
        Some(unsafe { (addr as *const u64).read() })
    };
    let mut n = 0usize;
    let mut leading = true;
    let mut lookup = pc;
    loop {
        let rule = s.rule(lookup);
        match rule.kind {
            Kind::Ok => {}
            Kind::End => return (n, StopReason::End),
            Kind::NoInfo => return (n, StopReason::NoUnwindInfo),
            Kind::Unknown => return (n, StopReason::UnknownAddress),
            Kind::Unsupported | Kind::Empty => return (n, StopReason::UnsupportedRule),
        }
        if !rule.own {
            leading = false;
        }
        let base = if rule.cfa_rbp { bp } else { sp };
        let cfa = base.wrapping_add(rule.cfa_off as i64 as u64);
        if cfa <= sp || cfa > hi {
            return (n, StopReason::BadFrame);
        }
        let Some(ra) = read(cfa.wrapping_add(rule.ra_off as i64 as u64)) else {
            return (n, StopReason::BadFrame);
        };
        if rule.rbp_off != 0 {
            let Some(v) = read(cfa.wrapping_add(rule.rbp_off as i64 as u64)) else {
                return (n, StopReason::BadFrame);
            };
            bp = v;
        }
        if ra == 0 {
            return (n, StopReason::End);
        }
        sp = cfa;
        pc = ra;
        lookup = ra - 1;
        // The caller frame: record it unless it is still inside this library.
        let caller = s.rule(lookup);
        if leading && caller.own {
            continue;
        }
        leading = false;
        if n == max {
            return (n, StopReason::MaxDepth);
        }
        s.frames[n] = pc;
        n += 1;
    }
}
