//! Every symbol this library exports, and nothing else: thin shims that forward to the real
//! function and hand the outcome to one tracer call. Marked `no_mangle` only outside unit tests,
//! so the crate's own tests do not trace themselves.
//!
//! Exported: malloc free calloc realloc reallocarray posix_memalign aligned_alloc memalign
//! valloc pvalloc malloc_usable_size; jemalloc's mallocx rallocx xallocx dallocx sdallocx, C23's
//! free_sized free_aligned_sized, tcmalloc's tc_* and mimalloc's mi_* allocation functions (see
//! the section at the end); C++ operator new/new[]/delete/delete[] (plain, nothrow,
//! sized, aligned); dlopen dlclose; exit _exit _Exit; fork; execve execv execvp execvpe fexecve execl
//! execlp execle; __libc_start_main (to learn main's return value); sigaction signal;
//! leakhunt_version (for `leakhunt` to check the library it preloads).

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::AtomicPtr;

use leakhunt_format::{AllocFn, FreeFn};

use crate::{modules, real, signals, tracer};

#[inline(always)]
unsafe fn alloc_shim(f: AllocFn, size: usize, call: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let g = tracer::enter();
    let p = call();
    if let Some(g) = &g {
        if !p.is_null() {
            tracer::on_alloc(g, f, p, size);
        }
    }
    p
}

#[inline(always)]
unsafe fn free_shim(f: FreeFn, p: *mut c_void, call: impl FnOnce()) {
    // SAFETY: forwarding the caller's contract; `free`'s blocks are the real allocator's.
    unsafe { free_shim_of(f, p, true, call) }
}

/// As [`free_shim`]; `mallocs`: the block is the real malloc's (its words may be read, with
/// `--orphans`), not a C++ runtime's own pool's.
unsafe fn free_shim_of(f: FreeFn, p: *mut c_void, mallocs: bool, call: impl FnOnce()) {
    if !p.is_null() && !real::is_bootstrap(p) {
        if let Some(g) = tracer::enter() {
            tracer::on_free(&g, f, p, mallocs);
            g.forwarding(call);
            return;
        }
    }
    call()
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract.
    unsafe { alloc_shim(AllocFn::Malloc, size, || real::malloc(size)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: forwarding the caller's contract.
    unsafe { free_shim(FreeFn::Free, p, || real::free(p)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract. On overflow calloc fails and nothing is recorded.
    unsafe {
        alloc_shim(AllocFn::Calloc, n.wrapping_mul(size), || {
            real::calloc(n, size)
        })
    }
}

#[inline(always)]
unsafe fn realloc_shim(
    f: AllocFn,
    p: *mut c_void,
    size: usize,
    call: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    if p.is_null() || real::is_bootstrap(p) {
        // SAFETY: forwarding; a bootstrap block was never recorded, so this is a new allocation.
        return unsafe { alloc_shim(f, size, call) };
    }
    let Some(g) = tracer::enter() else {
        return call();
    };
    // The free's number is taken before the real call: once realloc releases `p`, another
    // thread may get it back, and its allocation must sort after this free.
    let (held, seq) = tracer::take_realloc_seq(&g);
    // With orphans on, the words the call may drop are read while the old block is still ours.
    let dropped = tracer::before_realloc(&held, p, size);
    let q = g.forwarding(call);
    tracer::on_realloc(&g, held, seq, p, q, size, f, dropped);
    q
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract.
    unsafe { realloc_shim(AllocFn::Realloc, p, size, || real::realloc(p, size)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        // SAFETY: overflow: libc fails with ENOMEM and leaves `p` alone; nothing to record.
        return unsafe { real::reallocarray(p, n, size) };
    };
    // Without overflow, reallocarray is realloc of the product: glibc's own would call back
    // into our realloc hook (a nested call, counted as one from a signal handler).
    // SAFETY: forwarding the caller's contract.
    unsafe { realloc_shim(AllocFn::Reallocarray, p, total, || real::realloc(p, total)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    let g = tracer::enter();
    // SAFETY: forwarding the caller's contract.
    let rc = unsafe { real::posix_memalign(out, align, size) };
    if let Some(g) = &g {
        if rc == 0 {
            // SAFETY: on success libc wrote the block's address to `out`.
            let p = unsafe { *out };
            if !p.is_null() {
                tracer::on_alloc(g, AllocFn::PosixMemalign, p, size);
            }
        }
    }
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract.
    unsafe {
        alloc_shim(AllocFn::AlignedAlloc, size, || {
            real::aligned_alloc(align, size)
        })
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract.
    unsafe { alloc_shim(AllocFn::Memalign, size, || real::memalign(align, size)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding the caller's contract.
    unsafe { alloc_shim(AllocFn::Valloc, size, || real::valloc(size)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = 4096usize;
    let rounded = if size == 0 {
        page
    } else {
        size.next_multiple_of(page)
    };
    // SAFETY: forwarding the caller's contract; pvalloc hands out whole pages.
    unsafe { alloc_shim(AllocFn::Pvalloc, rounded, || real::pvalloc(size)) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: forwarding the caller's contract.
    unsafe { real::usable_size(p) }
}

// ---- C++ operators -------------------------------------------------------------------------
// They are interposed directly (as valgrind does) so the recorded stack starts at the program's
// `new` expression; the real operator runs with nested malloc/free passed through unrecorded.
// `C-unwind`: std::bad_alloc may propagate through these frames.

macro_rules! cxx_new {
    ($name:ident, $f:expr, ($($arg:ident : $ty:ty),*), $size:ident) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C-unwind" fn $name($($arg: $ty),*) -> *mut c_void {
            static REAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
            // The symbol's name, built at compile time (not on every call).
            const SYM: &CStr = match CStr::from_bytes_with_nul(
                concat!(stringify!($name), "\0").as_bytes(),
            ) {
                Ok(s) => s,
                Err(_) => c"_Znwm",
            };
            let f = real::next_symbol(&REAL, SYM);
            let call = || {
                if f.is_null() {
                    // No C++ runtime below us: behave like a non-throwing new.
                    // SAFETY: plain malloc.
                    return unsafe { real::malloc($size.max(1)) };
                }
                // SAFETY: `f` is the next definition of this very operator, same signature.
                unsafe {
                    core::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn($($ty),*) -> *mut c_void>(f)($($arg),*)
                }
            };
            let g = tracer::enter();
            let p = match &g {
                Some(g) => g.forwarding(call),
                None => call(),
            };
            if let Some(g) = &g {
                if !p.is_null() {
                    tracer::on_alloc(g, $f, p, $size);
                }
            }
            p
        }
    };
}

macro_rules! cxx_delete {
    ($name:ident, $f:expr, ($p:ident : $pty:ty $(, $arg:ident : $ty:ty)*)) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C-unwind" fn $name($p: $pty $(, $arg: $ty)*) {
            static REAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
            // The symbol's name, built at compile time (not on every call).
            const SYM: &CStr = match CStr::from_bytes_with_nul(
                concat!(stringify!($name), "\0").as_bytes(),
            ) {
                Ok(s) => s,
                Err(_) => c"_ZdlPv",
            };
            let f = real::next_symbol(&REAL, SYM);
            let call = || {
                if f.is_null() {
                    // SAFETY: without a C++ runtime the block came from our malloc fallback.
                    return unsafe { real::free($p) };
                }
                // SAFETY: `f` is the next definition of this very operator, same signature.
                unsafe {
                    core::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn($pty $(, $ty)*)>(f)($p $(, $arg)*)
                }
            };
            let mallocs = real::delete_is_malloc_backed(f);
            // SAFETY: forwarding the caller's contract.
            unsafe { free_shim_of($f, $p, mallocs, call) }
        }
    };
}

type Nothrow = *const c_void;

cxx_new!(_Znwm, AllocFn::New, (size: usize), size);
cxx_new!(_Znam, AllocFn::NewArray, (size: usize), size);
cxx_new!(_ZnwmRKSt9nothrow_t, AllocFn::New, (size: usize, nt: Nothrow), size);
cxx_new!(_ZnamRKSt9nothrow_t, AllocFn::NewArray, (size: usize, nt: Nothrow), size);
cxx_new!(_ZnwmSt11align_val_t, AllocFn::New, (size: usize, al: usize), size);
cxx_new!(_ZnamSt11align_val_t, AllocFn::NewArray, (size: usize, al: usize), size);
cxx_new!(_ZnwmSt11align_val_tRKSt9nothrow_t, AllocFn::New, (size: usize, al: usize, nt: Nothrow), size);
cxx_new!(_ZnamSt11align_val_tRKSt9nothrow_t, AllocFn::NewArray, (size: usize, al: usize, nt: Nothrow), size);

cxx_delete!(_ZdlPv, FreeFn::Delete, (p: *mut c_void));
cxx_delete!(_ZdaPv, FreeFn::DeleteArray, (p: *mut c_void));
cxx_delete!(_ZdlPvm, FreeFn::Delete, (p: *mut c_void, size: usize));
cxx_delete!(_ZdaPvm, FreeFn::DeleteArray, (p: *mut c_void, size: usize));
cxx_delete!(_ZdlPvRKSt9nothrow_t, FreeFn::Delete, (p: *mut c_void, nt: Nothrow));
cxx_delete!(_ZdaPvRKSt9nothrow_t, FreeFn::DeleteArray, (p: *mut c_void, nt: Nothrow));
cxx_delete!(_ZdlPvSt11align_val_t, FreeFn::Delete, (p: *mut c_void, al: usize));
cxx_delete!(_ZdaPvSt11align_val_t, FreeFn::DeleteArray, (p: *mut c_void, al: usize));
cxx_delete!(_ZdlPvmSt11align_val_t, FreeFn::Delete, (p: *mut c_void, size: usize, al: usize));
cxx_delete!(_ZdaPvmSt11align_val_t, FreeFn::DeleteArray, (p: *mut c_void, size: usize, al: usize));
cxx_delete!(_ZdlPvSt11align_val_tRKSt9nothrow_t, FreeFn::Delete, (p: *mut c_void, al: usize, nt: Nothrow));
cxx_delete!(_ZdaPvSt11align_val_tRKSt9nothrow_t, FreeFn::DeleteArray, (p: *mut c_void, al: usize, nt: Nothrow));

// ---- modules, exit, signals ----------------------------------------------------------------

static REAL_DLOPEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_DLCLOSE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_EXIT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_UEXIT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_UUEXIT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

fn modules_changed() {
    if let Some(g) = tracer::enter() {
        g.forwarding(|| {
            if modules::rescan() {
                crate::python::probe();
                crate::out::flush();
            }
        });
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    let f = real::next_symbol(&REAL_DLOPEN, c"dlopen");
    if f.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: libc's dlopen, same signature, arguments forwarded.
    let h = unsafe {
        core::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void>(
            f,
        )(file, mode)
    };
    modules_changed();
    h
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn dlclose(h: *mut c_void) -> c_int {
    let f = real::next_symbol(&REAL_DLCLOSE, c"dlclose");
    if f.is_null() {
        return -1;
    }
    // SAFETY: libc's dlclose, same signature.
    let rc = unsafe {
        core::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void) -> c_int>(f)(h)
    };
    modules_changed();
    rc
}

/// `exit`: a naked entry that hands `exit_from` its caller's stack pointer (just above the
/// return address) and jumps there, so that the heap scan at exit reads the program's stack
/// from where the program called, not from inside this hook's frame, whose slots no one wrote
/// yet may hold stale words of earlier calls (a block's address the tracer's own frames once
/// held): memcheck, which knows which words were written, never reads those.
#[cfg_attr(not(test), no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn exit(_code: c_int) -> ! {
    core::arch::naked_asm!(
        "lea rsi, [rsp + 8]",
        "jmp {imp}",
        imp = sym exit_from,
    )
}

/// `exit`'s body: `caller_sp` is the program's stack pointer at its call.
extern "C" fn exit_from(code: c_int, caller_sp: u64) -> ! {
    tracer::pre_exit_scan(caller_sp);
    tracer::note_exit_sp(caller_sp);
    tracer::note_exit_code(code);
    let f = real::next_symbol(&REAL_EXIT, c"exit");
    // SAFETY: libc's exit, same signature; it does not return.
    unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> !>(f)(code) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn _exit(code: c_int) -> ! {
    tracer::on_underscore_exit(code);
    let f = real::next_symbol(&REAL_UEXIT, c"_exit");
    // SAFETY: libc's _exit, same signature; it does not return.
    unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> !>(f)(code) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn _Exit(code: c_int) -> ! {
    tracer::on_underscore_exit(code);
    let f = real::next_symbol(&REAL_UUEXIT, c"_Exit");
    // SAFETY: libc's _Exit, same signature; it does not return.
    unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> !>(f)(code) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // SAFETY: forwarding the caller's contract.
    unsafe { signals::sigaction(sig, act, old) }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, h: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: forwarding the caller's contract.
    unsafe { signals::signal(sig, h) }
}

/// Trace format version this library writes; `leakhunt run` checks it before preloading.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn leakhunt_version() -> u32 {
    leakhunt_format::VERSION
}

/// The program marks a named point of its run (a snapshot, for `leakhunt diff --from NAME`).
/// Declare it weak in the program, so that it runs without leakhunt too:
/// `extern void leakhunt_snapshot(const char *name) __attribute__((weak));`
/// and call it when present: `if (leakhunt_snapshot) leakhunt_snapshot("warm");`.
/// A null name means "snapshot"; names are cut at 255 bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn leakhunt_snapshot(name: *const core::ffi::c_char) {
    let name: &[u8] = if name.is_null() {
        b"snapshot"
    } else {
        // SAFETY: the caller passes a NUL-terminated string (the API's contract).
        unsafe { CStr::from_ptr(name) }.to_bytes()
    };
    let Some(g) = tracer::enter() else { return };
    // Anything allocated while writing the snapshot passes through unrecorded.
    g.forwarding(|| tracer::snapshot(name));
}

// ---- fork: with children traced, mark where the child's inherited heap comes from ----

static REAL_FORK: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    let f = real::next_symbol(&REAL_FORK, c"fork");
    if f.is_null() {
        return no_real();
    }
    let mark = tracer::before_fork();
    // SAFETY: libc's fork, same signature.
    let pid =
        unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> libc::pid_t>(f)() };
    match (mark, pid) {
        (Some(seq), 0) => tracer::after_fork_in_child(seq),
        (Some(seq), _) => tracer::after_fork_in_parent(seq, pid),
        _ => {}
    }
    pid
}

// ---- exec: flush everything recorded before the image is replaced ----

static REAL_EXECVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_EXECV: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_EXECVP: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_EXECVPE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_FEXECVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type Argv = *const *const c_char;

fn no_real() -> c_int {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

/// An exec-family shim: flush and mark the image's end, give the new image tracing's variables
/// when children are traced and the call passes its own environment (`env`), then call libc's.
macro_rules! exec_shim {
    ($name:ident, $cname:literal, $real:ident, ($first:ident: $ft:ty, $argv:ident $(, $envp:ident)?)) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($first: $ft, $argv: Argv $(, $envp: Argv)?) -> c_int {
            #[allow(unused_mut, unused_assignments)]
            let mut env_in: Argv = core::ptr::null();
            $( env_in = $envp; )?
            tracer::before_exec(env_in);
            $(
                let env = tracer::exec_env($envp);
                let $envp = env.as_ref().map_or($envp, |e| e.ptrs.as_ptr());
            )?
            let f = real::next_symbol(&$real, $cname);
            if f.is_null() {
                return no_real();
            }
            type F = unsafe extern "C" fn($ft, Argv $(, exec_shim!(@argv $envp))?) -> c_int;
            // SAFETY: libc's function of the same name and signature; the caller's arguments
            // pass through (with tracing's variables added to the environment, if any).
            unsafe { core::mem::transmute::<*mut c_void, F>(f)($first, $argv $(, $envp)?) }
        }
    };
    (@argv $e:ident) => { Argv };
}

exec_shim!(execve, c"execve", REAL_EXECVE, (path: *const c_char, argv, envp));
exec_shim!(execvpe, c"execvpe", REAL_EXECVPE, (file: *const c_char, argv, envp));
exec_shim!(execv, c"execv", REAL_EXECV, (path: *const c_char, argv));
exec_shim!(execvp, c"execvp", REAL_EXECVP, (file: *const c_char, argv));
exec_shim!(fexecve, c"fexecve", REAL_FEXECVE, (fd: c_int, argv, envp));

// execl, execlp and execle are variadic, which stable Rust cannot define; glibc implements them
// with internal calls that bypass the execve above. These naked entry points spill the five
// register arguments after the first next to each other on the stack and hand a Rust function
// the path, that array, the caller's stack arguments and which variant was called (System V
// x86_64: variadic pointer arguments travel exactly like fixed integer ones). The declared
// parameters only document the ABI; the assembly reads the registers itself.
macro_rules! execl_entry {
    ($name:ident, $which:literal) => {
        #[cfg_attr(not(test), no_mangle)]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name(_path: *const c_char, _arg0: *const c_char) -> c_int {
            core::arch::naked_asm!(
                "push rbp",
                "mov rbp, rsp",
                "push r9",
                "push r8",
                "push rcx",
                "push rdx",
                "push rsi",
                "mov rsi, rsp",
                "lea rdx, [rbp + 16]",
                concat!("mov ecx, ", $which),
                "sub rsp, 8",
                "call {imp}",
                "leave",
                "ret",
                imp = sym execl_family,
            )
        }
    };
}
execl_entry!(execl, 0);
execl_entry!(execlp, 1);
execl_entry!(execle, 2);

/// The body of execl (`which` 0), execlp (1) and execle (2): `regs` holds arguments 1-5 of the
/// call, `stack` the ones after them; the list ends at a null pointer, followed (execle) by envp.
unsafe extern "C" fn execl_family(
    path: *const c_char,
    regs: *const *const c_char,
    stack: *const *const c_char,
    which: c_int,
) -> c_int {
    // SAFETY: argument i of the variadic list is regs[i] for i < 5 and stack[i - 5] after; the
    // caller's list is null-terminated (execl's contract), so no read goes past what it passed.
    let arg = |i: usize| unsafe {
        if i < 5 {
            *regs.add(i)
        } else {
            *stack.add(i - 5)
        }
    };
    let mut argv: Vec<*const c_char> = Vec::new();
    let mut i = 0;
    loop {
        let a = arg(i);
        argv.push(a);
        i += 1;
        if a.is_null() {
            break;
        }
    }
    let environ = crate::env::environ() as Argv;
    // SAFETY: forwarding to the shims above with a null-terminated argv that outlives the call.
    unsafe {
        match which {
            0 => execve(path, argv.as_ptr(), environ),
            1 => execvp(path, argv.as_ptr()),
            _ => execve(path, argv.as_ptr(), arg(i) as Argv),
        }
    }
}

// ---- main's return value, which reaches exit() inside libc where no hook sees it ----

static REAL_START_MAIN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_MAIN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type MainFn = unsafe extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) -> c_int;
type StartMainFn = unsafe extern "C" fn(
    MainFn,
    c_int,
    *mut *mut c_char,
    *mut c_void,
    *mut c_void,
    *mut c_void,
    *mut c_void,
) -> c_int;

unsafe extern "C" fn main_wrapper(
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
) -> c_int {
    let m = REAL_MAIN.load(core::sync::atomic::Ordering::Acquire);
    // SAFETY: the program's own main, stored by __libc_start_main below before this runs.
    let rc = unsafe { core::mem::transmute::<*mut c_void, MainFn>(m)(argc, argv, envp) };
    // main's frame is gone: the scans at exit start above it, as memcheck's does.
    tracer::pre_exit_scan(crate::sys::stack_pointer());
    tracer::note_exit_sp(crate::sys::stack_pointer());
    tracer::note_exit_code(rc);
    rc
}

/// Runs the program's `main` through [`main_wrapper`], so a return from main records its code in
/// the trace even without `leakhunt run` (which also has it from waitpid).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __libc_start_main(
    main: MainFn,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *mut c_void,
    fini: *mut c_void,
    rtld_fini: *mut c_void,
    stack_end: *mut c_void,
) -> c_int {
    let f = real::next_symbol(&REAL_START_MAIN, c"__libc_start_main");
    // SAFETY: main's envp follows argv's terminating null (the process's initial stack); only
    // this thread runs yet.
    unsafe { tracer::before_main(argv.add(argc.max(0) as usize + 1)) };
    REAL_MAIN.store(main as *mut c_void, core::sync::atomic::Ordering::Release);
    // SAFETY: glibc's __libc_start_main with the caller's arguments, main replaced by a wrapper
    // of the same signature that calls it.
    unsafe {
        core::mem::transmute::<*mut c_void, StartMainFn>(f)(
            main_wrapper,
            argc,
            argv,
            init,
            fini,
            rtld_fini,
            stack_end,
        )
    }
}

// ---- allocators' own entry points ----------------------------------------------------------
//
// jemalloc's (`mallocx` ...), tcmalloc's (`tc_*`), mimalloc's (`mi_*`) and C23's sized frees.
// Each forwards to the next definition (the allocator the program uses) and records what it did
// as the glibc family it behaves like. A program may also find these symbols here when no
// allocator of that name is loaded (a weak reference, `dlsym`): then each does its job with the
// libc allocator, so that such a program still runs as it would (`fallback_*`).

/// The next definition of `$name` (after this library), as a function of type `$ty`, if any.
macro_rules! next_fn {
    ($name:ident, $ty:ty) => {{
        static REAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        const SYM: &CStr =
            match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => c"malloc",
            };
        let f = real::next_symbol_if_any(&REAL, SYM);
        if f.is_null() {
            None
        } else {
            // SAFETY: the next definition of this very symbol, whose C signature is `$ty`.
            Some(unsafe { core::mem::transmute::<*mut c_void, $ty>(f) })
        }
    }};
}

/// jemalloc's `MALLOCX_ZERO` flag, and the low bits holding log2 of the alignment.
const MALLOCX_ZERO: c_int = 0x40;
const MALLOCX_LG_ALIGN_MASK: c_int = 0x3f;

/// What `mallocx` would give with the libc allocator: aligned as `flags` says, zeroed if asked.
unsafe fn fallback_mallocx(size: usize, flags: c_int) -> *mut c_void {
    let lg = flags & MALLOCX_LG_ALIGN_MASK;
    let p = if lg > 4 && lg < 64 {
        let mut out = core::ptr::null_mut();
        // SAFETY: `out` is a valid out pointer; the alignment is a power of two above 16.
        match unsafe { real::posix_memalign(&mut out, 1usize << lg, size.max(1)) } {
            0 => out,
            _ => core::ptr::null_mut(),
        }
    } else {
        // SAFETY: plain malloc.
        unsafe { real::malloc(size.max(1)) }
    };
    if !p.is_null() && flags & MALLOCX_ZERO != 0 {
        // SAFETY: a fresh block of at least `size` bytes.
        unsafe { core::ptr::write_bytes(p as *mut u8, 0, size) };
    }
    p
}

/// What `rallocx` would give with the libc allocator (the old block is left alone on failure).
unsafe fn fallback_rallocx(p: *mut c_void, size: usize, flags: c_int) -> *mut c_void {
    // SAFETY: `p` is a live block of this allocator (the caller's contract).
    let old = unsafe { real::usable_size(p) };
    // SAFETY: a fresh block, as mallocx.
    let q = unsafe { fallback_mallocx(size, flags & !MALLOCX_ZERO) };
    if q.is_null() {
        return q;
    }
    let keep = old.min(size);
    // SAFETY: both blocks hold at least `keep` bytes and do not overlap; the old one is freed
    // once copied.
    unsafe {
        core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, keep);
        if flags & MALLOCX_ZERO != 0 && size > keep {
            core::ptr::write_bytes((q as *mut u8).add(keep), 0, size - keep);
        }
        real::free(p);
    }
    q
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mallocx(size: usize, flags: c_int) -> *mut c_void {
    let next = next_fn!(mallocx, unsafe extern "C" fn(usize, c_int) -> *mut c_void);
    let f = if flags & MALLOCX_ZERO != 0 {
        AllocFn::Calloc
    } else {
        AllocFn::Malloc
    };
    // SAFETY: forwarding the caller's contract.
    unsafe {
        alloc_shim(f, size, || match next {
            Some(m) => m(size, flags),
            None => fallback_mallocx(size, flags),
        })
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn rallocx(p: *mut c_void, size: usize, flags: c_int) -> *mut c_void {
    let next = next_fn!(
        rallocx,
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> *mut c_void
    );
    // SAFETY: forwarding the caller's contract (`p` is never null for rallocx).
    unsafe {
        realloc_shim(AllocFn::Realloc, p, size, || match next {
            Some(r) => r(p, size, flags),
            None => fallback_rallocx(p, size, flags),
        })
    }
}

/// jemalloc's in-place resize: the block stays where it is, at least `size` bytes when the
/// returned usable size says so (then recorded as a realloc to `size` at the same address).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn xallocx(p: *mut c_void, size: usize, extra: usize, flags: c_int) -> usize {
    let next = next_fn!(
        xallocx,
        unsafe extern "C" fn(*mut c_void, usize, usize, c_int) -> usize
    );
    let Some(x) = next else {
        // No jemalloc: nothing grows in place; the block's size stays what it was.
        // SAFETY: `p` is a live block (the caller's contract).
        return unsafe { real::usable_size(p) };
    };
    if p.is_null() || real::is_bootstrap(p) {
        // SAFETY: forwarding the caller's contract.
        return unsafe { x(p, size, extra, flags) };
    }
    let Some(g) = tracer::enter() else {
        // SAFETY: forwarding the caller's contract.
        return unsafe { x(p, size, extra, flags) };
    };
    // SAFETY: forwarding the caller's contract.
    let got = g.forwarding(|| unsafe { x(p, size, extra, flags) });
    if got >= size {
        // Resized in place to at least `size`: a realloc that kept the address.
        let (held, seq) = tracer::take_realloc_seq(&g);
        let dropped = tracer::before_realloc(&held, p, size);
        tracer::on_realloc(&g, held, seq, p, p, size, AllocFn::Realloc, dropped);
    }
    got
}

/// Frees: jemalloc's `dallocx`, `sdallocx`; C23's `free_sized`, `free_aligned_sized`.
macro_rules! sized_free {
    ($name:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(p: *mut c_void $(, $arg: $ty)*) {
            let next = next_fn!($name, unsafe extern "C" fn(*mut c_void $(, $ty)*));
            // SAFETY: forwarding the caller's contract; without a definition, libc's free.
            unsafe {
                free_shim(FreeFn::Free, p, || match next {
                    Some(f) => f(p $(, $arg)*),
                    None => real::free(p),
                })
            }
        }
    };
}

sized_free!(dallocx, (flags: c_int));
sized_free!(sdallocx, (size: usize, flags: c_int));
sized_free!(free_sized, (size: usize));
sized_free!(free_aligned_sized, (align: usize, size: usize));

/// As [`alloc_shim`], the real call made with nested allocator calls passed through unrecorded:
/// an allocator's entry point may call its own others through the PLT (mimalloc's `mi_strdup`
/// its `mi_malloc`).
#[inline(always)]
unsafe fn outer_alloc_shim(
    f: AllocFn,
    size: usize,
    call: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    let Some(g) = tracer::enter() else {
        return call();
    };
    let p = g.forwarding(call);
    if !p.is_null() {
        tracer::on_alloc(&g, f, p, size);
    }
    p
}

/// An allocating entry point: `$size` the bytes asked for, `$fallback` what libc does instead.
macro_rules! entry_alloc {
    ($name:ident, $f:expr, ($($arg:ident : $ty:ty),*), $size:expr, $fallback:expr) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> *mut c_void {
            let next = next_fn!($name, unsafe extern "C" fn($($ty),*) -> *mut c_void);
            // SAFETY: the size reads the caller's arguments (a string's length) under its contract.
            #[allow(unused_unsafe)]
            let size: usize = unsafe { $size };
            // SAFETY: forwarding the caller's contract; without a definition, libc's equivalent.
            unsafe {
                outer_alloc_shim($f, size, || match next {
                    Some(f) => f($($arg),*),
                    None => $fallback,
                })
            }
        }
    };
}

/// A resizing entry point (realloc's contract): `$size` the new size.
macro_rules! entry_realloc {
    ($name:ident, ($p:ident $(, $arg:ident : $ty:ty)*), $size:expr, $fallback:expr) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($p: *mut c_void $(, $arg: $ty)*) -> *mut c_void {
            let next = next_fn!($name, unsafe extern "C" fn(*mut c_void $(, $ty)*) -> *mut c_void);
            let size: usize = $size;
            // SAFETY: forwarding the caller's contract; without a definition, libc's realloc.
            unsafe {
                realloc_shim(AllocFn::Realloc, $p, size, || match next {
                    Some(f) => f($p $(, $arg)*),
                    None => $fallback,
                })
            }
        }
    };
}

/// A freeing entry point of family `$f`.
macro_rules! entry_free {
    ($name:ident, $f:expr, ($($arg:ident : $ty:ty),*)) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(p: *mut c_void $(, $arg: $ty)*) {
            let next = next_fn!($name, unsafe extern "C" fn(*mut c_void $(, $ty)*));
            // SAFETY: forwarding the caller's contract; without a definition, libc's free.
            unsafe {
                free_shim($f, p, || match next {
                    Some(f) => f(p $(, $arg)*),
                    None => real::free(p),
                })
            }
        }
    };
}

/// `size` bytes aligned to `align` from libc (its fallback for aligned entry points).
unsafe fn fallback_aligned(align: usize, size: usize) -> *mut c_void {
    let mut out = core::ptr::null_mut();
    let align = align.max(16).next_power_of_two();
    // SAFETY: `out` is a valid out pointer; the alignment is a power of two of at least 16.
    match unsafe { real::posix_memalign(&mut out, align, size.max(1)) } {
        0 => out,
        _ => core::ptr::null_mut(),
    }
}

/// `size` zeroed bytes from libc.
unsafe fn fallback_zalloc(size: usize) -> *mut c_void {
    // SAFETY: plain calloc.
    unsafe { real::calloc(1, size.max(1)) }
}

/// A copy of the first `n` bytes of `s` and a terminating NUL, from libc's malloc.
unsafe fn fallback_strndup(s: *const c_char, n: usize) -> *mut c_void {
    // SAFETY: a fresh block of n + 1 bytes; `s` has at least `n` readable bytes (n is at most
    // its length, the caller's contract).
    unsafe {
        let p = real::malloc(n + 1) as *mut u8;
        if !p.is_null() {
            core::ptr::copy_nonoverlapping(s as *const u8, p, n);
            *p.add(n) = 0;
        }
        p as *mut c_void
    }
}

// tcmalloc (gperftools).
entry_alloc!(tc_malloc, AllocFn::Malloc, (size: usize), size, real::malloc(size));
entry_alloc!(tc_malloc_skip_new_handler, AllocFn::Malloc, (size: usize), size, real::malloc(size));
entry_alloc!(tc_calloc, AllocFn::Calloc, (n: usize, size: usize), n.wrapping_mul(size), real::calloc(n, size));
entry_alloc!(tc_memalign, AllocFn::Memalign, (align: usize, size: usize), size, fallback_aligned(align, size));
entry_alloc!(tc_valloc, AllocFn::Valloc, (size: usize), size, real::valloc(size));
entry_alloc!(tc_new, AllocFn::New, (size: usize), size, real::malloc(size.max(1)));
entry_alloc!(tc_new_nothrow, AllocFn::New, (size: usize, nt: Nothrow), size, real::malloc(size.max(1)));
entry_alloc!(tc_newarray, AllocFn::NewArray, (size: usize), size, real::malloc(size.max(1)));
entry_alloc!(tc_newarray_nothrow, AllocFn::NewArray, (size: usize, nt: Nothrow), size, real::malloc(size.max(1)));
entry_realloc!(tc_realloc, (p, size: usize), size, real::realloc(p, size));
entry_free!(tc_free, FreeFn::Free, ());
entry_free!(tc_cfree, FreeFn::Free, ());
entry_free!(tc_free_sized, FreeFn::Free, (size: usize));
entry_free!(tc_delete, FreeFn::Delete, ());
entry_free!(tc_delete_sized, FreeFn::Delete, (size: usize));
entry_free!(tc_delete_nothrow, FreeFn::Delete, (nt: Nothrow));
entry_free!(tc_deletearray, FreeFn::DeleteArray, ());
entry_free!(tc_deletearray_sized, FreeFn::DeleteArray, (size: usize));
entry_free!(tc_deletearray_nothrow, FreeFn::DeleteArray, (nt: Nothrow));

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn tc_posix_memalign(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    let next = next_fn!(
        tc_posix_memalign,
        unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int
    );
    let Some(g) = tracer::enter() else {
        // SAFETY: forwarding the caller's contract.
        return unsafe {
            match next {
                Some(f) => f(out, align, size),
                None => real::posix_memalign(out, align, size),
            }
        };
    };
    // SAFETY: forwarding the caller's contract.
    let rc = g.forwarding(|| unsafe {
        match next {
            Some(f) => f(out, align, size),
            None => real::posix_memalign(out, align, size),
        }
    });
    if rc == 0 {
        // SAFETY: on success the allocator wrote the block's address to `out`.
        let p = unsafe { *out };
        if !p.is_null() {
            tracer::on_alloc(&g, AllocFn::PosixMemalign, p, size);
        }
    }
    rc
}

// mimalloc.
entry_alloc!(mi_malloc, AllocFn::Malloc, (size: usize), size, real::malloc(size));
entry_alloc!(mi_malloc_small, AllocFn::Malloc, (size: usize), size, real::malloc(size));
entry_alloc!(mi_zalloc, AllocFn::Calloc, (size: usize), size, fallback_zalloc(size));
entry_alloc!(mi_zalloc_small, AllocFn::Calloc, (size: usize), size, fallback_zalloc(size));
entry_alloc!(mi_calloc, AllocFn::Calloc, (n: usize, size: usize), n.wrapping_mul(size), real::calloc(n, size));
entry_alloc!(mi_mallocn, AllocFn::Malloc, (n: usize, size: usize), n.wrapping_mul(size), match n.checked_mul(size) { Some(t) => real::malloc(t), None => core::ptr::null_mut() });
entry_alloc!(mi_malloc_aligned, AllocFn::Memalign, (size: usize, align: usize), size, fallback_aligned(align, size));
entry_alloc!(mi_zalloc_aligned, AllocFn::Memalign, (size: usize, align: usize), size, {
    let p = fallback_aligned(align, size);
    if !p.is_null() {
        core::ptr::write_bytes(p as *mut u8, 0, size);
    }
    p
});
entry_alloc!(mi_calloc_aligned, AllocFn::Memalign, (n: usize, size: usize, align: usize), n.wrapping_mul(size), match n.checked_mul(size) {
    Some(t) => {
        let p = fallback_aligned(align, t);
        if !p.is_null() {
            core::ptr::write_bytes(p as *mut u8, 0, t);
        }
        p
    }
    None => core::ptr::null_mut(),
});
entry_alloc!(mi_strdup, AllocFn::Malloc, (s: *const c_char), if s.is_null() { 0 } else { libc::strlen(s) + 1 }, if s.is_null() { core::ptr::null_mut() } else { fallback_strndup(s, libc::strlen(s)) });
entry_alloc!(mi_strndup, AllocFn::Malloc, (s: *const c_char, n: usize), if s.is_null() { 0 } else { libc::strnlen(s, n) + 1 }, if s.is_null() { core::ptr::null_mut() } else { fallback_strndup(s, libc::strnlen(s, n)) });
entry_alloc!(mi_new, AllocFn::New, (size: usize), size, real::malloc(size.max(1)));
entry_alloc!(mi_new_nothrow, AllocFn::New, (size: usize), size, real::malloc(size.max(1)));
entry_alloc!(mi_new_aligned, AllocFn::New, (size: usize, align: usize), size, fallback_aligned(align, size));
entry_alloc!(mi_new_n, AllocFn::NewArray, (n: usize, size: usize), n.wrapping_mul(size), match n.checked_mul(size) { Some(t) => real::malloc(t.max(1)), None => core::ptr::null_mut() });
entry_realloc!(mi_realloc, (p, size: usize), size, real::realloc(p, size));
entry_realloc!(mi_reallocn, (p, n: usize, size: usize), n.wrapping_mul(size), match n.checked_mul(size) { Some(t) => real::realloc(p, t), None => core::ptr::null_mut() });
entry_realloc!(mi_realloc_aligned, (p, size: usize, align: usize), size, fallback_rallocx(p, size, align.max(1).trailing_zeros() as c_int));
entry_free!(mi_free, FreeFn::Free, ());
entry_free!(mi_free_size, FreeFn::Free, (size: usize));
entry_free!(mi_free_aligned, FreeFn::Free, (align: usize));
entry_free!(mi_free_size_aligned, FreeFn::Free, (size: usize, align: usize));
