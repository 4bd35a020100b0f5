//! The real allocator, reached through `dlsym(RTLD_NEXT, …)` so that another interposed
//! allocator (jemalloc, tcmalloc) keeps working. `dlsym` itself allocates: calls that arrive while
//! the symbols are being resolved are served by a small bootstrap bump allocator whose blocks
//! `free`, `realloc` and `malloc_usable_size` recognise and never pass on.

use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type ReallocarrayFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32;
type AlignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;

/// Resolution state: 0 not started, 1 in progress (bootstrap serves), 2 done.
static STATE: AtomicU8 = AtomicU8::new(0);

macro_rules! real_fns {
    ($($slot:ident : $ty:ty = $name:literal;)*) => {
        $(static $slot: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());)*

        fn resolve_all() {
            $(
                // SAFETY: the name is a NUL-terminated literal; RTLD_NEXT is valid in a shared object.
                let p = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!($name, "\0").as_ptr().cast()) };
                $slot.store(p, Ordering::Release);
            )*
        }
    };
}

real_fns! {
    MALLOC: MallocFn = "malloc";
    FREE: FreeFn = "free";
    CALLOC: CallocFn = "calloc";
    REALLOC: ReallocFn = "realloc";
    REALLOCARRAY: ReallocarrayFn = "reallocarray";
    POSIX_MEMALIGN: PosixMemalignFn = "posix_memalign";
    ALIGNED_ALLOC: AlignFn = "aligned_alloc";
    MEMALIGN: AlignFn = "memalign";
    VALLOC: MallocFn = "valloc";
    PVALLOC: MallocFn = "pvalloc";
    USABLE: UsableFn = "malloc_usable_size";
}

/// Resolves the real functions once. Returns false while a resolution is in progress on some
/// thread (the caller must then use the bootstrap allocator).
pub fn ensure() -> bool {
    match STATE.load(Ordering::Acquire) {
        2 => true,
        1 => false,
        _ => {
            if STATE
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return STATE.load(Ordering::Acquire) == 2;
            }
            resolve_all();
            STATE.store(2, Ordering::Release);
            true
        }
    }
}

// ---- bootstrap allocator -------------------------------------------------------------------

const BOOT_LEN: usize = 1 << 20;
const BOOT_ALIGN: usize = 16;

#[repr(C, align(4096))]
struct Arena([u8; BOOT_LEN]);

/// Bump area; blocks carry a 16-byte header holding their size. Never reused.
static mut BOOT: Arena = Arena([0; BOOT_LEN]);
static BOOT_NEXT: AtomicUsize = AtomicUsize::new(0);

fn boot_base() -> usize {
    core::ptr::addr_of_mut!(BOOT) as usize
}

pub fn is_bootstrap(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= boot_base() && a < boot_base() + BOOT_LEN
}

/// The bootstrap arena: `[start, end)`.
pub fn boot_range() -> (usize, usize) {
    (boot_base(), boot_base() + BOOT_LEN)
}

/// The part of the bootstrap arena no block has used yet (zeros: nothing a heap scan must read).
pub fn boot_unused() -> (u64, u64) {
    let used = BOOT_NEXT.load(Ordering::Acquire).min(BOOT_LEN);
    ((boot_base() + used) as u64, (boot_base() + BOOT_LEN) as u64)
}

pub fn bootstrap_bytes() -> u64 {
    BOOT_NEXT.load(Ordering::Relaxed) as u64
}

fn boot_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(BOOT_ALIGN);
    loop {
        let cur = BOOT_NEXT.load(Ordering::Relaxed);
        let start = (boot_base() + cur + 16).next_multiple_of(align);
        let end = start + size;
        if end > boot_base() + BOOT_LEN {
            return core::ptr::null_mut();
        }
        if BOOT_NEXT
            .compare_exchange(cur, end - boot_base(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: `start - 16 .. end` lies inside BOOT and was reserved by this CAS alone.
            unsafe { ((start - 16) as *mut usize).write(size) };
            return start as *mut c_void;
        }
    }
}

fn boot_size(p: *mut c_void) -> usize {
    // SAFETY: `p` is a bootstrap block (checked by callers); its header precedes it.
    unsafe { ((p as usize - 16) as *const usize).read() }
}

// ---- the calls -----------------------------------------------------------------------------

macro_rules! get {
    ($slot:ident, $ty:ty) => {{
        let p = $slot.load(Ordering::Acquire);
        if p.is_null() {
            None
        } else {
            // SAFETY: the pointer came from dlsym for a symbol with exactly this C signature.
            Some(unsafe { core::mem::transmute::<*mut c_void, $ty>(p) })
        }
    }};
}

/// # Safety
/// As C `malloc`.
pub unsafe fn malloc(size: usize) -> *mut c_void {
    match get!(MALLOC, MallocFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(size) },
        None => boot_alloc(size, BOOT_ALIGN),
    }
}

/// # Safety
/// As C `free`.
pub unsafe fn free(p: *mut c_void) {
    if p.is_null() || is_bootstrap(p) {
        return;
    }
    if let Some(f) = get!(FREE, FreeFn) {
        // SAFETY: forwarding the caller's contract.
        unsafe { f(p) }
    }
}

/// # Safety
/// As C `calloc`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut c_void {
    match get!(CALLOC, CallocFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(n, size) },
        None => match n.checked_mul(size) {
            // Bootstrap memory is zero and never reused, so it is already cleared.
            Some(total) => boot_alloc(total, BOOT_ALIGN),
            None => core::ptr::null_mut(),
        },
    }
}

/// # Safety
/// As C `realloc`.
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if is_bootstrap(p) {
        // SAFETY: a fresh block from the real (or bootstrap) allocator.
        let q = unsafe { malloc(size.max(1)) };
        if !q.is_null() {
            let n = boot_size(p).min(size);
            // SAFETY: both blocks hold at least `n` bytes and do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n) };
        }
        return q;
    }
    match get!(REALLOC, ReallocFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(p, size) },
        None if p.is_null() => boot_alloc(size, BOOT_ALIGN),
        None => core::ptr::null_mut(),
    }
}

/// # Safety
/// As C `reallocarray`.
pub unsafe fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match (get!(REALLOCARRAY, ReallocarrayFn), is_bootstrap(p)) {
        // SAFETY: forwarding the caller's contract.
        (Some(f), false) => unsafe { f(p, n, size) },
        _ => match n.checked_mul(size) {
            // SAFETY: forwarding the caller's contract.
            Some(total) => unsafe { realloc(p, total) },
            None => {
                // SAFETY: errno is thread-local and always writable.
                unsafe { *libc::__errno_location() = libc::ENOMEM };
                core::ptr::null_mut()
            }
        },
    }
}

/// # Safety
/// As C `posix_memalign`.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    match get!(POSIX_MEMALIGN, PosixMemalignFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(out, align, size) },
        None => {
            if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
                return libc::EINVAL;
            }
            let p = boot_alloc(size, align);
            if p.is_null() {
                return libc::ENOMEM;
            }
            // SAFETY: the caller passes a writable out pointer.
            unsafe { *out = p };
            0
        }
    }
}

/// # Safety
/// As C `aligned_alloc`.
pub unsafe fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    match get!(ALIGNED_ALLOC, AlignFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(align, size) },
        None => boot_alloc(size, align),
    }
}

/// # Safety
/// As C `memalign`.
pub unsafe fn memalign(align: usize, size: usize) -> *mut c_void {
    match get!(MEMALIGN, AlignFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(align, size) },
        None => boot_alloc(size, align),
    }
}

/// # Safety
/// As C `valloc`.
pub unsafe fn valloc(size: usize) -> *mut c_void {
    match get!(VALLOC, MallocFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(size) },
        None => boot_alloc(size, 4096),
    }
}

/// # Safety
/// As C `pvalloc`.
pub unsafe fn pvalloc(size: usize) -> *mut c_void {
    match get!(PVALLOC, MallocFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(size) },
        None => boot_alloc(size.next_multiple_of(4096), 4096),
    }
}

/// # Safety
/// As C `malloc_usable_size`.
pub unsafe fn usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if is_bootstrap(p) {
        return boot_size(p);
    }
    match get!(USABLE, UsableFn) {
        // SAFETY: forwarding the caller's contract.
        Some(f) => unsafe { f(p) },
        None => 0,
    }
}

/// Looks up a symbol of the next object lazily (C++ operators: libstdc++ may load later).
pub fn next_symbol(cache: &AtomicPtr<c_void>, name: &core::ffi::CStr) -> *mut c_void {
    let p = cache.load(Ordering::Acquire);
    if !p.is_null() {
        return p;
    }
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT is valid in a shared object.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    cache.store(p, Ordering::Release);
    p
}

/// As [`next_symbol`], for a symbol that may be defined nowhere else (another allocator's entry
/// point): looked up once; a failed lookup leaves no error behind for the program's `dlerror`
/// (nor its message buffer, which libc frees on the next `dlerror`).
pub fn next_symbol_if_any(cache: &AtomicPtr<c_void>, name: &core::ffi::CStr) -> *mut c_void {
    /// Looked up: there is none.
    const ABSENT: *mut c_void = core::ptr::dangling_mut::<c_void>();
    match cache.load(Ordering::Acquire) {
        p if p == ABSENT => return core::ptr::null_mut(),
        p if !p.is_null() => return p,
        _ => {}
    }
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT is valid in a shared object; dlerror only
    // reads (and frees) this thread's error state.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if p.is_null() {
        // SAFETY: as above.
        unsafe {
            libc::dlerror();
            libc::dlerror();
        }
        cache.store(ABSENT, Ordering::Release);
    } else {
        cache.store(p, Ordering::Release);
    }
    p
}

/// The tracer's own Rust allocations go straight to the real allocator, never through the hooks,
/// so no Rust code inside a hook can recurse into tracing.
pub struct RealAlloc;

// SAFETY: every method forwards to the C allocator, which honours the GlobalAlloc contract for
// alignments up to 16 via malloc and for larger ones via aligned_alloc/posix_memalign.
unsafe impl core::alloc::GlobalAlloc for RealAlloc {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: plain malloc of a non-zero size (GlobalAlloc never asks for zero).
            unsafe { malloc(layout.size()) as *mut u8 }
        } else {
            let mut p = core::ptr::null_mut();
            // SAFETY: `p` is a valid out pointer; the alignment is a power of two ≥ 16.
            let rc = unsafe { posix_memalign(&mut p, layout.align(), layout.size()) };
            if rc == 0 {
                p as *mut u8
            } else {
                core::ptr::null_mut()
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // Cleared first: the program gets this memory back from malloc uninitialised, and our
        // words (paths, pointers between our records) must not read as its pointers to a heap
        // scan (memcheck keeps its own memory apart; seen: a CPython fork child's leaked locks
        // reached through a freed list of ours).
        // SAFETY: `ptr` came from `alloc` with `layout`: `layout.size()` writable bytes, ours
        // until the free below.
        unsafe {
            core::ptr::write_bytes(ptr, 0, layout.size());
            free(ptr.cast())
        }
    }
    unsafe fn alloc_zeroed(&self, layout: core::alloc::Layout) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: plain calloc of a non-zero size.
            unsafe { calloc(1, layout.size()) as *mut u8 }
        } else {
            // SAFETY: as `alloc`; the block is cleared before use.
            let p = unsafe { self.alloc(layout) };
            if !p.is_null() {
                // SAFETY: `p` holds `layout.size()` writable bytes.
                unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
            }
            p
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: core::alloc::Layout, new: usize) -> *mut u8 {
        // Never the C realloc: a block it moves or shrinks leaves our bytes behind in free
        // memory (see `dealloc`). A fresh block, a copy, and the old one cleared and freed.
        let Ok(nl) = core::alloc::Layout::from_size_align(new, layout.align()) else {
            return core::ptr::null_mut();
        };
        // SAFETY: `ptr` came from `alloc` with `layout`; the new block holds `new` bytes.
        unsafe {
            let q = self.alloc(nl);
            if !q.is_null() {
                core::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new));
                self.dealloc(ptr, layout);
            }
            q
        }
    }
}

/// Whether C++ `operator delete` (the next definition, `delete_fn`) gives blocks back to the
/// same allocator as `free`: the C++ runtime's own (libstdc++, libc++), or one defined in the
/// module that defines `malloc` (jemalloc, tcmalloc). A library's own pool is not, and its blocks
/// must not be measured with `malloc_usable_size`. Decided once.
pub fn delete_is_malloc_backed(delete_fn: *mut c_void) -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static KNOWN: AtomicU8 = AtomicU8::new(0);
    match KNOWN.load(Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let module = |addr: *const c_void| -> Option<&'static [u8]> {
        // SAFETY: Dl_info is plain data; dladdr fills it for an address in a loaded module and
        // allocates nothing; its strings live as long as the module.
        unsafe {
            let mut info: libc::Dl_info = core::mem::zeroed();
            if addr.is_null() || libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
                return None;
            }
            Some(core::ffi::CStr::from_ptr(info.dli_fname).to_bytes())
        }
    };
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let ok = match (module(delete_fn), module(MALLOC.load(Ordering::Acquire))) {
        (Some(d), m) => {
            contains(d, b"libstdc++") || contains(d, b"libc++") || m.is_some_and(|m| m == d)
        }
        (None, _) => delete_fn.is_null(),
    };
    KNOWN.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    ok
}
