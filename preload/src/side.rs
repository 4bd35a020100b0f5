//! A thread of leakhunt's with a descriptor table of its own, for the files leakhunt opens while
//! the program runs: the snapshot mailbox, and the small `/proc` files the writer reads (the
//! resident size at each epoch, the command line).
//!
//! Every `open` takes the lowest free descriptor number, and programs rely on that: a daemon
//! closes 0, 1 and 2 and expects its next three files to land on them. Had the writer opened
//! `/proc/self/statm` between the program's `close(0)` and its `open`, the program would have
//! found its input on 3 (seen: a program that checks exited 6 under the preload alone). So these
//! files are opened by this thread only, after `unshare(CLONE_FILES)` gave it a private copy of
//! the table, emptied at once: nothing it opens is ever seen by the program.
//!
//! One request at a time (a spin lock among requesters, held only while this thread serves, and
//! this thread never waits on anything but the request word). Where the thread is not running (not
//! started yet, a fork child, or it once failed to answer in time), the caller reads the file
//! itself, as before.

use core::cell::UnsafeCell;
use core::ffi::{c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::sys;

const PATH_LEN: usize = 64;
const BUF_LEN: usize = 4096;

/// The request slot: written by the requester holding `LOCK` before `POSTED` moves, read back
/// after `DONE` reaches it.
struct Slot {
    path: UnsafeCell<[u8; PATH_LEN]>,
    buf: UnsafeCell<[u8; BUF_LEN]>,
}

// SAFETY: the slot is handed between one requester (holding LOCK) and the side thread by the
// POSTED/DONE words, with release/acquire ordering: never touched by both at once.
unsafe impl Sync for Slot {}

static SLOT: Slot = Slot {
    path: UnsafeCell::new([0; PATH_LEN]),
    buf: UnsafeCell::new([0; BUF_LEN]),
};
static LEN: AtomicUsize = AtomicUsize::new(0);
static POSTED: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);
static LOCK: sys::SpinLock = sys::SpinLock::new();
/// The side thread's id (0 before it runs): its stack is no root of a heap scan.
pub static TID: AtomicU32 = AtomicU32::new(0);
/// The thread runs with its own table and answers.
static ALIVE: AtomicBool = AtomicBool::new(false);

/// How long a requester waits for an answer before it reads the file itself (and stops asking).
const ANSWER_MS: u64 = 1000;

/// Starts the side thread (the writer's companion). Without it, readers fall back to their own
/// opens.
pub fn start() {
    ALIVE.store(false, Ordering::Release);
    // Its routine touches only the statics above and makes raw system calls.
    sys::spawn_detached(side_main, 64 * 1024);
}

/// In a fork child: the side thread stayed in the parent.
pub fn after_fork_child() {
    ALIVE.store(false, Ordering::Release);
    TID.store(0, Ordering::Relaxed);
    LOCK.reset();
}

extern "C" fn side_main(_: *mut c_void) -> *mut c_void {
    crate::tls::Guard::mark_internal();
    TID.store(sys::gettid(), Ordering::Relaxed);
    // SAFETY: blocking every signal in this thread only, then making its descriptor table a
    // private copy and closing every entry of that copy (the program's own descriptors stay open
    // in the program's table; close_range acts on this thread's table only).
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, core::ptr::null_mut());
        if libc::unshare(libc::CLONE_FILES) != 0 {
            crate::control::open();
            return core::ptr::null_mut();
        }
        if libc::syscall(libc::SYS_close_range, 0u32, !0u32, 0u32) != 0 {
            for fd in 0..sys::fd_limit() {
                libc::syscall(libc::SYS_close, fd);
            }
        }
    }
    // The snapshot mailbox: a file opened, mapped and closed here, never in the program's table.
    crate::control::open();
    DONE.store(POSTED.load(Ordering::Acquire), Ordering::Release);
    ALIVE.store(true, Ordering::Release);
    loop {
        let want = POSTED.load(Ordering::Acquire);
        if want == DONE.load(Ordering::Relaxed) {
            sys::futex_wait(&POSTED, want, 60_000);
            continue;
        }
        // SAFETY: the requester wrote the slot before moving POSTED (released) and waits for DONE
        // before touching it again.
        let n = unsafe {
            let path = &*SLOT.path.get();
            let path = CStr::from_bytes_until_nul(path).unwrap_or(c"");
            if path.is_empty() {
                // The empty path asks for the executable mappings (see `refresh_exec_maps`).
                crate::jit::refresh();
                0
            } else {
                sys::read_small_direct(path, &mut *SLOT.buf.get())
            }
        };
        LEN.store(n, Ordering::Relaxed);
        DONE.store(want, Ordering::Release);
        sys::futex_wake(&DONE);
    }
}

/// Reads up to `buf.len()` bytes of the small file `path` through the side thread; `None` when
/// the thread is not there to ask (the caller reads it itself).
pub fn read_small(path: &CStr, buf: &mut [u8]) -> Option<usize> {
    let p = path.to_bytes_with_nul();
    if p.len() == 1 {
        return None;
    }
    let _l = ask(p)?;
    let n = LEN.load(Ordering::Relaxed).min(buf.len());
    // SAFETY: the side thread finished with the slot (`ask` acquired DONE), and we still hold
    // LOCK.
    unsafe { buf[..n].copy_from_slice(&(&*SLOT.buf.get())[..n]) };
    Some(n)
}

/// Has the side thread re-read the executable mappings (`jit::refresh`, whose `/proc/self/maps`
/// descriptor it then opens in its own table); false when it is not there to ask.
pub fn refresh_exec_maps() -> bool {
    ask(b"\0").is_some()
}

/// Posts the request `path` (NUL-terminated; empty: the executable mappings) and waits for the
/// answer; returns the lock that keeps the slot ours, or `None` when the thread did not answer.
fn ask(p: &[u8]) -> Option<sys::SpinGuard<'static>> {
    if !ALIVE.load(Ordering::Acquire) || p.len() > PATH_LEN {
        return None;
    }
    let l = LOCK.try_lock_for(1000)?;
    if !ALIVE.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: we hold LOCK and the side thread has answered every earlier request (DONE ==
    // POSTED), so nobody else touches the slot.
    unsafe { (&mut *SLOT.path.get())[..p.len()].copy_from_slice(p) };
    let ticket = POSTED.load(Ordering::Relaxed).wrapping_add(1);
    POSTED.store(ticket, Ordering::Release);
    sys::futex_wake(&POSTED);
    let start = sys::monotonic_ns();
    loop {
        let done = DONE.load(Ordering::Acquire);
        if done == ticket {
            return Some(l);
        }
        if sys::monotonic_ns().saturating_sub(start) > ANSWER_MS * 1_000_000 {
            // It may still answer later, into the slot: nobody asks it again.
            ALIVE.store(false, Ordering::Release);
            return None;
        }
        sys::futex_wait(&DONE, done, 50);
    }
}
