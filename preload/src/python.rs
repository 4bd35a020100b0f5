//! CPython 3.11's own frames: when a C extension (or the interpreter itself) allocates, the
//! Python functions running at that moment, with file and line, stand in the stack where the
//! interpreter's evaluation loop (`_PyEval_EvalFrameDefault`) is: a leak in an extension points
//! at the Python code driving it.
//!
//! The current thread's interpreter frames are read from its thread state
//! (`PyGILState_GetThisThreadState`, this thread's own whether or not it holds the GIL), in the
//! layouts of CPython 3.11 (checked by `Py_Version`; another version is left alone). Only this
//! thread's own live frames are read, and only while the interpreter is initialised: the frames
//! are in its frame stack, their code objects referenced by them. Each code object's type is
//! checked before it is read.
//!
//! Each distinct (code object, instruction) becomes a pseudo frame address ([`BASE`] + index,
//! in kernel space: never a return address of a process) whose name, file and line go to the
//! trace once, as a `FRAME_NAME` record.

extern crate alloc;
use alloc::vec::Vec;

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::sys;

/// Pseudo frame addresses start here.
pub const BASE: u64 = leakhunt_format::PSEUDO_FRAME_BASE;
/// Python frames read per capture.
pub const MAX_PY: usize = 64;

/// One interpreter frame: its code object, instruction index, and whether it is the first frame
/// of its evaluation loop call.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct PyFrame {
    code: u64,
    instr: i64,
    entry: bool,
}

// CPython 3.11's layouts (x86_64).
const TSTATE_CFRAME: usize = 56;
const CFRAME_CURRENT: usize = 8;
const FRAME_CODE: usize = 32;
const FRAME_PREVIOUS: usize = 48;
const FRAME_PREV_INSTR: usize = 56;
const FRAME_IS_ENTRY: usize = 68;
const FRAME_OWNER: usize = 69;
const OWNED_BY_GENERATOR: u8 = 1;
const OB_TYPE: usize = 8;
const CODE_FIRSTLINENO: usize = 72;
const CODE_FIRSTTRACEABLE: usize = 168;
const CODE_FILENAME: usize = 112;
const CODE_QUALNAME: usize = 128;
const CODE_LINETABLE: usize = 136;
const CODE_ADAPTIVE: usize = 184;
const BYTES_SIZE: usize = 16;
const BYTES_DATA: usize = 32;
const STR_LENGTH: usize = 16;
const STR_STATE: usize = 32;
const STR_ASCII_DATA: usize = 48;
const STR_COMPACT_DATA: usize = 72;

/// glibc's `dladdr1` flag for the symbol's table entry (<dlfcn.h>).
const RTLD_DL_SYMENT: c_int = 1;

const UNPROBED: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNPROBED);
static GET_TSTATE: AtomicUsize = AtomicUsize::new(0);
static IS_INITIALIZED: AtomicUsize = AtomicUsize::new(0);
static CODE_TYPE: AtomicU64 = AtomicU64::new(0);
static EVAL_START: AtomicU64 = AtomicU64::new(0);
static EVAL_END: AtomicU64 = AtomicU64::new(0);

/// Looks for CPython 3.11 in the process (at start and after each `dlopen`). The caller holds
/// the reentrancy guard (dlsym may allocate).
pub fn probe() {
    if STATE.load(Ordering::Acquire) == PRESENT {
        return;
    }
    if !crate::config::get().python {
        STATE.store(ABSENT, Ordering::Release);
        return;
    }
    let sym = |name: &core::ffi::CStr| {
        // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches every loaded object.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if p.is_null() {
            // SAFETY: reads, then frees, this thread's error state (which dlsym just set), while
            // our guard is held: the program never frees a message it did not see allocated.
            unsafe {
                libc::dlerror();
                libc::dlerror();
            }
        }
        p
    };
    let version = sym(c"Py_Version");
    // SAFETY: `Py_Version` is CPython's `const unsigned long` (3.11 onwards).
    if version.is_null() || unsafe { *(version as *const u64) } >> 16 != 0x030B {
        STATE.store(ABSENT, Ordering::Release);
        return;
    }
    let (tstate, init, code_type, eval) = (
        sym(c"PyGILState_GetThisThreadState"),
        sym(c"Py_IsInitialized"),
        sym(c"PyCode_Type"),
        sym(c"_PyEval_EvalFrameDefault"),
    );
    if tstate.is_null() || init.is_null() || code_type.is_null() || eval.is_null() {
        STATE.store(ABSENT, Ordering::Release);
        return;
    }
    // The evaluation loop's extent, from its symbol's size.
    let mut info = empty_dl_info();
    let mut sym_ent: *const libc::Elf64_Sym = core::ptr::null();
    // SAFETY: dladdr1 fills `info` and points `sym_ent` at the loader's symbol entry.
    let ok = unsafe {
        libc::dladdr1(
            eval,
            &mut info,
            &mut sym_ent as *mut *const libc::Elf64_Sym as *mut *mut c_void,
            RTLD_DL_SYMENT,
        )
    };
    let size = if ok != 0 && !sym_ent.is_null() {
        // SAFETY: a non-null entry from dladdr1 points into the module's symbol table.
        unsafe { (*sym_ent).st_size }
    } else {
        0
    };
    if size == 0 {
        STATE.store(ABSENT, Ordering::Release);
        return;
    }
    GET_TSTATE.store(tstate as usize, Ordering::Relaxed);
    IS_INITIALIZED.store(init as usize, Ordering::Relaxed);
    CODE_TYPE.store(code_type as u64, Ordering::Relaxed);
    EVAL_START.store(eval as u64, Ordering::Relaxed);
    EVAL_END.store(eval as u64 + size, Ordering::Relaxed);
    STATE.store(PRESENT, Ordering::Release);
}

fn empty_dl_info() -> libc::Dl_info {
    libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    }
}

/// Whether CPython 3.11 runs in this process.
#[inline]
pub fn present() -> bool {
    STATE.load(Ordering::Relaxed) == PRESENT
}

/// A return address inside the evaluation loop.
#[inline]
pub fn in_eval(ra: u64) -> bool {
    let at = ra.wrapping_sub(1);
    at >= EVAL_START.load(Ordering::Relaxed) && at < EVAL_END.load(Ordering::Relaxed)
}

/// Reads a word of interpreter memory.
///
/// # Safety
/// `addr` must be readable: a field of this thread's live thread state, frame or of an object
/// those reference.
#[inline]
unsafe fn word(addr: u64) -> u64 {
    // SAFETY: the caller's promise.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// This thread's interpreter frames, innermost first, into `out`; how many. Without CPython
/// in the process, a load and a branch in the hook (no call).
#[inline]
pub fn frames(out: &mut [PyFrame; MAX_PY]) -> usize {
    if !present() {
        return 0;
    }
    interpreter_frames(out)
}

#[inline(never)]
fn interpreter_frames(out: &mut [PyFrame; MAX_PY]) -> usize {
    // SAFETY: both are CPython's exported functions of these signatures (probed above); they
    // take no lock and allocate nothing.
    let tstate = unsafe {
        let init: extern "C" fn() -> c_int =
            core::mem::transmute(IS_INITIALIZED.load(Ordering::Relaxed));
        if init() == 0 {
            return 0;
        }
        let get: extern "C" fn() -> *const c_void =
            core::mem::transmute(GET_TSTATE.load(Ordering::Relaxed));
        get() as u64
    };
    if tstate == 0 {
        return 0;
    }
    let code_type = CODE_TYPE.load(Ordering::Relaxed);
    // SAFETY: this thread's own thread state; its C frame and interpreter frames stay alive
    // while the code that allocates runs under them.
    let mut f = unsafe {
        let cframe = word(tstate + TSTATE_CFRAME as u64);
        if cframe == 0 {
            return 0;
        }
        word(cframe + CFRAME_CURRENT as u64)
    };
    let mut n = 0;
    while f != 0 && n < MAX_PY {
        // SAFETY: a live interpreter frame of this thread; its code object is alive while the
        // frame is, and checked to be one before its fields are read.
        unsafe {
            let code = word(f + FRAME_CODE as u64);
            if code == 0 || word(code + OB_TYPE as u64) != code_type {
                break;
            }
            let prev_instr = word(f + FRAME_PREV_INSTR as u64);
            let first = code + CODE_ADAPTIVE as u64;
            let instr = (prev_instr as i64 - first as i64) / 2;
            let owner = *((f + FRAME_OWNER as u64) as *const u8);
            let traceable = *((code + CODE_FIRSTTRACEABLE as u64) as *const i32) as i64;
            // A frame still being set up (not yet at its first traceable instruction) is not
            // one of the program's yet.
            let complete = owner == OWNED_BY_GENERATOR || instr >= traceable;
            let entry = *((f + FRAME_IS_ENTRY as u64) as *const u8) != 0;
            if complete {
                out[n] = PyFrame {
                    code,
                    instr: instr.max(0),
                    entry,
                };
                n += 1;
            } else if entry && n > 0 {
                out[n - 1].entry = true;
            }
            f = word(f + FRAME_PREVIOUS as u64);
        }
    }
    n
}

/// A hash of interpreter frames (0 for none, never 0 for some): what a repeated native walk must
/// also match to stand for a stack with them spliced in.
#[inline]
pub fn hash(py: &[PyFrame]) -> u64 {
    if py.is_empty() {
        return 0;
    }
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for f in py {
        h = (h ^ f.code).wrapping_mul(0x100_0000_01b3);
        h = (h ^ (f.instr as u64) << 1 ^ f.entry as u64).wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// Replaces each evaluation-loop frame of `native` with the Python frames it was running (up to
/// and including the entry frame of that call) as pseudo addresses, into `out`; returns the
/// frame count. Evaluation frames left without Python frames stay as they are.
pub fn splice(native: &[u64], py: &[PyFrame], out: &mut [u64]) -> usize {
    let mut n = 0;
    let mut k = 0;
    for &ra in native {
        if in_eval(ra) && k < py.len() {
            while k < py.len() && n < out.len() {
                out[n] = pseudo(&py[k]);
                n += 1;
                k += 1;
                if py[k - 1].entry {
                    break;
                }
            }
        } else if n < out.len() {
            out[n] = ra;
            n += 1;
        }
    }
    n
}

// ---- pseudo addresses -----------------------------------------------------------------------

const TABLE_BITS: u32 = 16;
const TABLE: usize = 1 << TABLE_BITS;
/// (key, index + 1) per slot; key 0: empty. Insert-only; a full table gives the overflow
/// frame.
static KEYS: [AtomicU64; TABLE] = [const { AtomicU64::new(0) }; TABLE];
static IDS: [AtomicU32; TABLE] = [const { AtomicU32::new(0) }; TABLE];
static NEXT: AtomicU32 = AtomicU32::new(1);
/// The pseudo frame for any Python frame past the table's capacity.
const OVERFLOW: u64 = BASE;

/// Encoded `FRAME_NAME` records not yet written, and how many are; guarded by [`LOCK`].
pub static LOCK: sys::SpinLock = sys::SpinLock::new();
pub static mut LOG: Vec<Vec<u8>> = Vec::new();

fn pseudo(f: &PyFrame) -> u64 {
    // SAFETY: (as in `frames`) the code object is alive and checked.
    let (name_obj, file_obj, first) = unsafe {
        (
            word(f.code + CODE_QUALNAME as u64),
            word(f.code + CODE_FILENAME as u64),
            *((f.code + CODE_FIRSTLINENO as u64) as *const i32),
        )
    };
    // The same code object address may later hold another function: its names and first line
    // are part of the key.
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    for w in [f.code, f.instr as u64, name_obj, file_obj, first as u64] {
        key = (key ^ w).wrapping_mul(0x100_0000_01b3);
    }
    let key = key | 1;
    let mut i = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TABLE_BITS)) as usize;
    for _ in 0..64 {
        let k = KEYS[i].load(Ordering::Acquire);
        if k == key {
            // Published by its inserter; spin the few instructions until it is.
            for _ in 0..1 << 20 {
                let id = IDS[i].load(Ordering::Acquire);
                if id != 0 {
                    return BASE + id as u64;
                }
                core::hint::spin_loop();
            }
            return OVERFLOW;
        }
        if k == 0 {
            if KEYS[i]
                .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue; // another thread took it: look at it again
            }
            let id = NEXT.fetch_add(1, Ordering::Relaxed);
            describe(f, BASE + id as u64, name_obj, file_obj, first);
            IDS[i].store(id, Ordering::Release);
            return BASE + id as u64;
        }
        i = (i + 1) & (TABLE - 1);
    }
    OVERFLOW
}

/// Encodes the `FRAME_NAME` record of pseudo address `addr` and queues it.
fn describe(f: &PyFrame, addr: u64, name_obj: u64, file_obj: u64, first: i32) {
    let mut name = [0u8; 256];
    let mut file = [0u8; 512];
    let nl = unicode(name_obj, &mut name);
    let fl = unicode(file_obj, &mut file);
    let line = line_of(f, first);
    let mut rec = Vec::new();
    leakhunt_format::encode::frame_name(addr, line, &name[..nl], &file[..fl], &mut rec);
    let _l = LOCK.lock();
    // SAFETY: LOG is only touched under LOCK, which we hold.
    unsafe { (*core::ptr::addr_of_mut!(LOG)).push(rec) };
}

/// A `str` object's text as UTF-8 (compact ASCII or Latin-1 strings; others give "?"), cut to
/// `out`'s length.
fn unicode(obj: u64, out: &mut [u8]) -> usize {
    if obj == 0 {
        return 0;
    }
    // SAFETY: a `str` the live code object references.
    let (len, state) = unsafe {
        (
            word(obj + STR_LENGTH as u64) as usize,
            *((obj + STR_STATE as u64) as *const u32),
        )
    };
    let (kind, compact, ascii) = ((state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1);
    if compact == 0 || kind != 1 {
        out[0] = b'?';
        return 1;
    }
    let data = obj
        + if ascii == 1 {
            STR_ASCII_DATA
        } else {
            STR_COMPACT_DATA
        } as u64;
    let mut n = 0;
    for i in 0..len {
        // SAFETY: `len` one-byte characters follow the header of a compact string.
        let c = unsafe { *((data + i as u64) as *const u8) };
        let need = if c < 0x80 { 1 } else { 2 };
        if n + need > out.len() {
            break;
        }
        if c < 0x80 {
            out[n] = c;
        } else {
            out[n] = 0xC0 | (c >> 6);
            out[n + 1] = 0x80 | (c & 0x3F);
        }
        n += need;
    }
    n
}

/// The source line of a frame's instruction, from the code object's location table (3.11's
/// format: entries of a start byte `1 code:4 length-1:3` and varints); 0 when it has none.
fn line_of(f: &PyFrame, first: i32) -> u32 {
    // SAFETY: the live code object's `co_linetable` bytes object.
    let table = unsafe {
        let t = word(f.code + CODE_LINETABLE as u64);
        if t == 0 {
            return first.max(0) as u32;
        }
        let len = word(t + BYTES_SIZE as u64) as usize;
        core::slice::from_raw_parts((t + BYTES_DATA as u64) as *const u8, len.min(1 << 24))
    };
    location_line(table, first, f.instr).map_or(0, |l| l.max(0) as u32)
}

/// The line of instruction `instr` (in code units) in a 3.11 location table.
pub fn location_line(table: &[u8], first: i32, instr: i64) -> Option<i32> {
    let mut p = 0usize;
    let mut line = first as i64;
    let mut addr = 0i64;
    let next = |p: &mut usize| -> Option<u8> {
        let b = *table.get(*p)?;
        *p += 1;
        Some(b)
    };
    let varint = |p: &mut usize| -> Option<u64> {
        let mut b = next(p)?;
        let mut v = (b & 63) as u64;
        let mut shift = 6;
        while b & 64 != 0 && shift < 64 {
            b = next(p)?;
            v |= ((b & 63) as u64) << shift;
            shift += 6;
        }
        Some(v)
    };
    let svarint = |p: &mut usize| -> Option<i64> {
        let v = varint(p)?;
        Some(if v & 1 != 0 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        })
    };
    while p < table.len() {
        let head = next(&mut p)?;
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let length = (head & 7) as i64 + 1;
        let mut has_line = true;
        match code {
            15 => has_line = false,
            14 => {
                line += svarint(&mut p)?;
                varint(&mut p)?;
                varint(&mut p)?;
                varint(&mut p)?;
            }
            13 => line += svarint(&mut p)?,
            10..=12 => {
                line += (code - 10) as i64;
                next(&mut p)?;
                next(&mut p)?;
            }
            _ => {
                next(&mut p)?;
            }
        }
        if instr >= addr && instr < addr + length {
            return has_line.then_some(line as i32);
        }
        addr += length;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_tables_give_lines() {
        // def f():       (line 1)
        //     x = 1      (line 2: a short form entry after a no-column one)
        //     return x   (line 3)
        // RESUME: no column, delta 0 (13, length 1): svarint 0
        // LOAD_CONST/STORE_FAST: one-line form delta 1 (11), length 2, columns 8 9
        // LOAD_FAST/RETURN: one-line form delta 1 (11), length 2
        let table = [
            0x80 | 13 << 3,
            0x00,
            0x80 | 11 << 3 | 1,
            8,
            9,
            0x80 | 11 << 3 | 1,
            11,
            12,
            0x80 | 15 << 3,
        ];
        assert_eq!(location_line(&table, 1, 0), Some(1));
        assert_eq!(location_line(&table, 1, 1), Some(2));
        assert_eq!(location_line(&table, 1, 2), Some(2));
        assert_eq!(location_line(&table, 1, 3), Some(3));
        assert_eq!(location_line(&table, 1, 4), Some(3));
        assert_eq!(location_line(&table, 1, 5), None, "no location");
        assert_eq!(location_line(&table, 1, 6), None, "past the table");
        // A long form entry: line delta -2 (svarint 5), end delta, columns.
        let long = [0x80 | 14 << 3, 5, 0, 1, 1];
        assert_eq!(location_line(&long, 10, 0), Some(8));
    }
}
