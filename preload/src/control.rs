//! The control channel of a traced process: a Unix datagram socket at
//! `/tmp/leakhunt-<uid>/<pid>.sock`, in a directory only its user can enter (created 0700,
//! refused if it belongs to someone else or others can enter it), read by the writer thread
//! between flushes. `leakhunt snapshot PID --name NAME` sends `snapshot NAME` there.
//!
//! The socket never disturbs the program: it is close-on-exec and non-blocking, and before each
//! read the descriptor is checked to still be our socket (a program that closes descriptors it
//! does not own may reuse the number for a socket of its own, whose messages must not be taken).

use core::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::sys;

static FD: AtomicI32 = AtomicI32::new(-1);
/// Device and inode of our socket, to recognise the descriptor.
static DEV: AtomicU64 = AtomicU64::new(0);
static INO: AtomicU64 = AtomicU64::new(0);
static mut PATH: [u8; 108] = [0; 108];

/// The message prefix of a snapshot request.
const SNAPSHOT: &[u8] = b"snapshot ";

/// Writes `/tmp/leakhunt-<uid>` (and with `pid`, `/<pid>.sock`) NUL-terminated into `out`.
fn path(out: &mut [u8; 108], pid: Option<u32>) -> usize {
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(out.len() - 1 - n);
        out[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    let mut digits = [0u8; 20];
    put(b"/tmp/leakhunt-");
    // SAFETY: getuid cannot fail.
    put(sys::fmt_u64(&mut digits, unsafe { libc::getuid() } as u64));
    if let Some(pid) = pid {
        put(b"/");
        put(sys::fmt_u64(&mut digits, pid as u64));
        put(b".sock");
    }
    out[n] = 0;
    n
}

/// Creates this process's control socket (in the writer thread, at its start). Failing is not
/// an error: snapshots by PID are then unavailable, and the program runs on.
pub fn open() {
    let mut dir = [0u8; 108];
    path(&mut dir, None);
    // SAFETY: plain syscalls on NUL-terminated paths in our buffers and a zeroed stat.
    unsafe {
        libc::mkdir(dir.as_ptr().cast(), 0o700);
        let mut st: libc::stat = core::mem::zeroed();
        if libc::lstat(dir.as_ptr().cast(), &mut st) != 0
            || st.st_mode & libc::S_IFMT != libc::S_IFDIR
            || st.st_uid != libc::getuid()
            || st.st_mode & 0o077 != 0
        {
            return;
        }
    }
    sweep(&dir);
    // SAFETY: PATH is written here, by the writer thread alone, before FD is published.
    let p = unsafe { &mut *core::ptr::addr_of_mut!(PATH) };
    path(p, Some(sys::getpid()));
    // SAFETY: socket/bind/chmod/fstat on our own descriptor and buffers; `addr` is a zeroed
    // sockaddr_un whose path fits (108 bytes with the NUL).
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return;
        }
        let fd = crate::fds::place_high(fd);
        libc::unlink(p.as_ptr().cast());
        let mut addr: libc::sockaddr_un = core::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(p.iter()) {
            *d = *s as libc::c_char;
        }
        let len = core::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let mut st: libc::stat = core::mem::zeroed();
        if libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
            || libc::fstat(fd, &mut st) != 0
        {
            libc::close(fd);
            return;
        }
        libc::chmod(p.as_ptr().cast(), 0o600);
        DEV.store(st.st_dev, Ordering::Relaxed);
        INO.store(st.st_ino, Ordering::Relaxed);
        fd
    };
    FD.store(fd, Ordering::Release);
}

/// Removes the sockets of processes that are gone (killed before they could remove their own).
/// Runs in the writer thread, whose allocations (opendir's) are not traced.
fn sweep(dir: &[u8; 108]) {
    // SAFETY: opendir/readdir/closedir on our NUL-terminated path; entries are read before the
    // next readdir; unlinkat by name relative to the directory's descriptor.
    unsafe {
        let d = libc::opendir(dir.as_ptr().cast());
        if d.is_null() {
            return;
        }
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = core::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_bytes();
            let Some(pid) = name.strip_suffix(b".sock") else {
                continue;
            };
            let pid = pid.iter().try_fold(0i32, |v, &c| {
                c.is_ascii_digit().then(|| v * 10 + (c - b'0') as i32)
            });
            if let Some(pid) = pid {
                if pid > 0 && libc::kill(pid, 0) != 0 && *libc::__errno_location() == libc::ESRCH {
                    libc::unlinkat(libc::dirfd(d), (*e).d_name.as_ptr(), 0);
                }
            }
        }
        libc::closedir(d);
    }
}

fn is_ours(fd: i32, ino: u64) -> bool {
    // SAFETY: fstat into a zeroed local.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        libc::fstat(fd, &mut st) == 0
            && st.st_ino == ino
            && st.st_dev == DEV.load(Ordering::Relaxed)
            && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}

/// A snapshot request, if one is waiting: its name is copied into `name`; returns its length.
pub fn poll(name: &mut [u8; 255]) -> Option<usize> {
    let fd = FD.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    if !is_ours(fd, INO.load(Ordering::Relaxed)) {
        // The program closed it (and may have reused the number, which stays the program's):
        // make a new one at the same name, so that snapshots by pid keep working.
        FD.store(-1, Ordering::Release);
        open();
        return None;
    }
    let mut buf = [0u8; SNAPSHOT.len() + 255];
    // SAFETY: a non-blocking receive into our buffer, on the descriptor checked just above.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n <= 0 {
        return None;
    }
    let msg = &buf[..n as usize];
    let rest = msg.strip_prefix(SNAPSHOT)?;
    let k = rest.len().min(name.len());
    name[..k].copy_from_slice(&rest[..k]);
    Some(k)
}

/// Removes the socket (at exit; in a fork child, forgets the parent's without removing it).
pub fn close(remove: bool) {
    let fd = FD.swap(-1, Ordering::AcqRel);
    if fd < 0 {
        return;
    }
    // SAFETY: our own descriptor (checked by inode) and our own path.
    unsafe {
        if is_ours(fd, INO.load(Ordering::Relaxed)) {
            libc::close(fd);
        }
        if remove {
            libc::unlink(core::ptr::addr_of!(PATH).cast());
        }
    }
}
