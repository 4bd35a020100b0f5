//! leakhunt's own descriptors in the traced process, and the program's stderr.
//!
//! The program owns its descriptor table: daemons close every descriptor (a loop to the limit,
//! `close_range`), reopen 0-2 onto files of their own, and get the freed numbers back at once.
//! So a descriptor of ours is kept out of the way (a high number, close-on-exec), and is known by
//! the identity of what it refers to (device and inode: a file's, or a socket's own), checked
//! before every write, read or close: a number that now names something else is the program's,
//! and leakhunt never touches it. Raw system calls, no allocation, no lock.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What an open descriptor refers to: (device, inode, file type bits).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ident {
    pub dev: u64,
    pub ino: u64,
    pub kind: u32,
}

/// The identity of what `fd` refers to, or `None` when it is not open.
pub fn ident(fd: i32) -> Option<Ident> {
    if fd < 0 {
        return None;
    }
    // SAFETY: fstat into a zeroed local that the kernel fills.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        (libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) == 0).then_some(Ident {
            dev: st.st_dev,
            ino: st.st_ino,
            kind: st.st_mode & libc::S_IFMT,
        })
    }
}

/// Whether `fd` still refers to `id`.
pub fn is(fd: i32, id: Ident) -> bool {
    ident(fd) == Some(id)
}

/// Closes `fd` if it still refers to `id` (else it is the program's now, and stays open).
pub fn close_own(fd: i32, id: Ident) {
    if is(fd, id) {
        // SAFETY: the descriptor refers to our own file or socket, checked just above.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }
}

/// The first number to try for our descriptors: just under the soft descriptor limit (capped,
/// so that a huge limit does not make the kernel grow this process's table to it), where a
/// program that opens files gets last. A program that lowers its limit later keeps our numbers
/// valid; a program that closes them is handled by the identity checks.
fn high_base() -> i32 {
    (crate::sys::fd_limit().min(1024) - 16).max(3)
}

/// Moves our freshly opened `fd` to a high number, close-on-exec; returns the new number (or
/// `fd` itself when no higher one is free). The original number is closed.
pub fn place_high(fd: i32) -> i32 {
    if fd < 0 {
        return fd;
    }
    // SAFETY: fcntl on a descriptor we just opened; F_DUPFD_CLOEXEC makes a new one.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high_base()) };
    if high < 0 {
        return fd;
    }
    // SAFETY: closing our original, now duplicated.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    high
}

static STDERR_DEV: AtomicU64 = AtomicU64::new(0);
static STDERR_INO: AtomicU64 = AtomicU64::new(0);
static STDERR_OPEN: AtomicBool = AtomicBool::new(false);

/// Remembers the stderr the program started with (once, at initialisation, before `main`).
pub fn note_stderr() {
    if let Some(id) = ident(2) {
        STDERR_DEV.store(id.dev, Ordering::Relaxed);
        STDERR_INO.store(id.ino, Ordering::Relaxed);
        STDERR_OPEN.store(true, Ordering::Release);
    }
}

/// Writes `msg` to fd 2 only if it is still the stderr the program started with: a daemon that
/// reopened fd 2 onto a data file must not find leakhunt's words in it. Returns whether it wrote.
pub fn write_stderr(msg: &[u8]) -> bool {
    if !STDERR_OPEN.load(Ordering::Acquire) {
        return false;
    }
    match ident(2) {
        Some(id)
            if id.dev == STDERR_DEV.load(Ordering::Relaxed)
                && id.ino == STDERR_INO.load(Ordering::Relaxed) => {}
        _ => return false,
    }
    // SAFETY: `msg` is initialised memory we own; write(2) only reads it.
    unsafe { libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len()) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_number_is_not_ours() {
        // SAFETY: test-local descriptors.
        unsafe {
            let a = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            let a = place_high(a);
            assert!(a >= 3);
            let id = ident(a).unwrap();
            assert!(is(a, id));
            libc::close(a);
            assert!(!is(a, id), "closed");
            // The program gets the number back for a file of its own.
            let b = libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY);
            let b2 = libc::dup2(b, a);
            assert_eq!(b2, a);
            assert!(!is(a, id), "reused for another file");
            close_own(a, id);
            assert!(ident(a).is_some(), "the program's descriptor stays open");
            libc::close(a);
            libc::close(b);
        }
    }
}
