//! The control channel of a traced process: a one-page mailbox file at
//! `/tmp/leakhunt-<uid>/<pid>.ctl`, in a directory only its user can enter (created 0700,
//! refused if it belongs to someone else or others can enter it), mapped shared and read by the
//! writer thread between flushes. `leakhunt snapshot PID --name NAME` writes the name into it,
//! then a new request number, and waits until the writer acknowledges that number.
//!
//! It holds no descriptor: the file is mapped and closed, so a program that counts, closes or
//! reuses its descriptors never meets it. The mapping is not inherited by fork children
//! (MADV_DONTFORK); a child forgets it before anything reads it and, traced, makes its own.
//!
//! Layout, little-endian `u32`s: magic at 0, request number at 4 (written last by the CLI),
//! acknowledged number at 8 (written by the writer after the snapshot), name length at 12, then
//! the name (at most 255 bytes) at 16, flags at 272 (1: with a heap scan).

use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use leakhunt_format::control::{ACK, FLAGS, LEN, MAGIC, NAME, NAME_LEN, REQUEST};

use crate::sys;

/// The mapped mailbox (null: none).
static BOX: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
/// The last request number seen.
static SEEN: AtomicU32 = AtomicU32::new(0);
static mut PATH: [u8; 108] = [0; 108];

/// Writes `/tmp/leakhunt-<uid>` (and with `pid`, `/<pid>.ctl`) NUL-terminated into `out`.
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
        put(b".ctl");
    }
    out[n] = 0;
    n
}

fn word(b: *mut u8, at: usize) -> &'static AtomicU32 {
    // SAFETY: `b` is the mailbox mapping (LEN bytes, page-aligned, never unmapped while
    // published in BOX) and `at` a 4-aligned offset inside it.
    unsafe { &*(b.add(at) as *const AtomicU32) }
}

/// Creates this process's mailbox (in the side thread, at its start: see `side`). Failing is not an
/// error: snapshots by pid are then unavailable, and the program runs on.
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
    // SAFETY: PATH is written here, by the side thread alone, before BOX is published.
    let p = unsafe { &mut *core::ptr::addr_of_mut!(PATH) };
    path(p, Some(sys::getpid()));
    // SAFETY: open/ftruncate/mmap/close on our own new file; the mapping is LEN bytes.
    let b = unsafe {
        // A mailbox left by an earlier process of this pid is stale.
        libc::unlink(p.as_ptr().cast());
        let fd = libc::open(
            p.as_ptr().cast(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            return;
        }
        let mapped = if libc::ftruncate(fd, LEN as libc::off_t) == 0 {
            libc::mmap(
                core::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        } else {
            libc::MAP_FAILED
        };
        libc::close(fd);
        if mapped == libc::MAP_FAILED {
            libc::unlink(p.as_ptr().cast());
            return;
        }
        libc::madvise(mapped, LEN, libc::MADV_DONTFORK);
        // Ours: no root of the program's for a heap scan.
        sys::note_own(mapped as *const u8, LEN);
        mapped as *mut u8
    };
    word(b, 0).store(MAGIC, Ordering::Relaxed);
    SEEN.store(0, Ordering::Relaxed);
    BOX.store(b, Ordering::Release);
}

/// Removes the mailboxes of processes that are gone (killed before they could remove their own),
/// and sockets of older versions. Runs in the side thread, whose allocations (opendir's) are
/// not traced.
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
            let Some(pid) = name
                .strip_suffix(b".ctl")
                .or_else(|| name.strip_suffix(b".sock"))
            else {
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

/// A snapshot request, if one is waiting: its name is copied into `name`; returns its length,
/// a token for [`done`] and its flags (`control::SCAN`: with a heap scan).
pub fn poll(name: &mut [u8; 255]) -> Option<(usize, u32, u32)> {
    let b = BOX.load(Ordering::Acquire);
    if b.is_null() {
        return None;
    }
    let req = word(b, REQUEST).load(Ordering::Acquire);
    if req == SEEN.load(Ordering::Relaxed) {
        return None;
    }
    SEEN.store(req, Ordering::Relaxed);
    let n = (word(b, NAME_LEN).load(Ordering::Relaxed) as usize).min(name.len());
    // SAFETY: the name field lies inside the mapping (NAME + 255 < LEN).
    let src = unsafe { core::slice::from_raw_parts(b.add(NAME), n) };
    name[..n].copy_from_slice(src);
    Some((n, req, word(b, FLAGS).load(Ordering::Relaxed)))
}

/// The snapshot of request `req` is in the trace: let the asking `leakhunt snapshot` return.
pub fn done(req: u32) {
    let b = BOX.load(Ordering::Acquire);
    if !b.is_null() {
        word(b, ACK).store(req, Ordering::Release);
    }
}

/// Drops the mailbox: at exit, removing its file; in a fork child (whose copy of the parent's
/// mapping does not exist), forgetting it without touching the parent's file.
pub fn close(remove: bool) {
    let b = BOX.swap(core::ptr::null_mut(), Ordering::AcqRel);
    if b.is_null() || !remove {
        return;
    }
    // SAFETY: our own path, written before BOX was published; the mapping stays (the writer
    // may still read it) until the process ends.
    unsafe { libc::unlink(core::ptr::addr_of!(PATH).cast()) };
}
