//! Fatal signals: so that a program dying from SIGSEGV, abort() or SIGTERM still delivers its
//! events, a handler is installed for each default-action fatal signal whose disposition is
//! `SIG_DFL` at start. It flushes, restores `SIG_DFL` and re-raises, so the process dies exactly
//! as it would have. The interposed `sigaction`/`signal` hide these handlers: the program reads
//! `SIG_DFL` where it would have, and a handler it installs simply replaces ours.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::real;

const FATAL: [c_int; 9] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
];

static OURS: [AtomicBool; 65] = [const { AtomicBool::new(false) }; 65];
static REAL_SIGACTION: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_SIGNAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;

/// # Safety
/// As C `sigaction`.
pub unsafe fn real_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let p = real::next_symbol(&REAL_SIGACTION, c"sigaction");
    if p.is_null() {
        return -1;
    }
    // SAFETY: `p` is libc's sigaction, whose signature this is; arguments forwarded unchanged.
    unsafe { core::mem::transmute::<*mut c_void, SigactionFn>(p)(sig, act, old) }
}

/// # Safety
/// As C `signal`.
pub unsafe fn real_signal(sig: c_int, h: libc::sighandler_t) -> libc::sighandler_t {
    let p = real::next_symbol(&REAL_SIGNAL, c"signal");
    if p.is_null() {
        return libc::SIG_ERR;
    }
    // SAFETY: `p` is libc's signal, whose signature this is.
    unsafe { core::mem::transmute::<*mut c_void, SignalFn>(p)(sig, h) }
}

fn ours(sig: c_int) -> bool {
    (0..65).contains(&sig) && OURS[sig as usize].load(Ordering::Acquire)
}

extern "C" fn on_signal(sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: errno is thread-local; saved and restored around our work.
    let saved = unsafe { *libc::__errno_location() };
    if ours(sig) {
        crate::tracer::on_fatal_signal(sig);
        OURS[sig as usize].store(false, Ordering::Release);
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            real_sigaction(sig, &sa, core::ptr::null_mut());
            // Pending until this handler returns; a synchronous fault simply recurs.
            libc::raise(sig);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

pub fn install() {
    for &sig in &FATAL {
        // SAFETY: querying and setting dispositions with valid sigaction structures.
        unsafe {
            let mut old: libc::sigaction = core::mem::zeroed();
            if real_sigaction(sig, core::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                continue;
            }
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            OURS[sig as usize].store(true, Ordering::Release);
            if real_sigaction(sig, &sa, core::ptr::null_mut()) != 0 {
                OURS[sig as usize].store(false, Ordering::Release);
            }
        }
    }
}

/// The interposed `sigaction`: as libc's, but our handlers read as `SIG_DFL` and are forgotten
/// once the program installs its own.
///
/// # Safety
/// As C `sigaction`.
pub unsafe fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let was_ours = ours(sig);
    // SAFETY: forwarding the caller's contract.
    let rc = unsafe { real_sigaction(sig, act, old) };
    if rc == 0 {
        if !act.is_null() && was_ours {
            OURS[sig as usize].store(false, Ordering::Release);
        }
        if was_ours && !old.is_null() {
            // SAFETY: `old` was just filled by libc and is writable.
            unsafe {
                (*old).sa_sigaction = libc::SIG_DFL;
                (*old).sa_flags = 0;
                libc::sigemptyset(&mut (*old).sa_mask);
            }
        }
    }
    rc
}

/// The interposed `signal`.
///
/// # Safety
/// As C `signal`.
pub unsafe fn signal(sig: c_int, h: libc::sighandler_t) -> libc::sighandler_t {
    let was_ours = ours(sig);
    // SAFETY: forwarding the caller's contract.
    let r = unsafe { real_signal(sig, h) };
    if was_ours && r != libc::SIG_ERR {
        OURS[sig as usize].store(false, Ordering::Release);
        return libc::SIG_DFL;
    }
    r
}
