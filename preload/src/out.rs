//! The trace output: a file (preload alone) or a Unix socket to `leakhunt run`. All writing
//! happens under `LOCK` by whoever flushes: the writer thread every few milliseconds, a hook whose
//! ring is full, and the exit, `_exit`, fork and fatal-signal paths. Flushing never allocates
//! (records are pre-encoded or built on the stack), so it is safe from a signal handler.
//!
//! If the output fails (CLI gone, disk full), the user is told once on stderr, recording stops and
//! the program runs on.

extern crate alloc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use leakhunt_format::{compact, encode, hello, sealed_header, stat, tag, ExitKind};

use crate::modules::{self, Change};
use crate::ring::{self, FREE, ORPHAN};
use crate::sys::{self, SpinLock};
use crate::{config, fds, tracer};

pub static LOCK: SpinLock = SpinLock::new();

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const FAILED: u8 = 2;
/// Not tracing this process (untraced fork child).
const OFF: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(CLOSED);
pub static EVENTS_LOST: AtomicU64 = AtomicU64::new(0);
pub static RING_WAITS: AtomicU64 = AtomicU64::new(0);
/// Events sent as elided pairs.
pub static ELIDED: AtomicU64 = AtomicU64::new(0);
/// After the library's destructor: every hook flushes its own event at once.
pub static FINAL: AtomicBool = AtomicBool::new(false);

const BUF_LEN: usize = 2 << 20;

/// State behind `LOCK`.
struct Out {
    fd: i32,
    /// What `fd` refers to: checked before every write and close (the program may have closed
    /// it and reused the number).
    id: fds::Ident,
    socket: bool,
    /// Trace bytes handed to the kernel on this stream's connections so far (where a resumed
    /// connection goes on).
    sent: u64,
    /// The trace file's absolute path (NUL-terminated), to re-open it if the program takes its
    /// descriptor; empty for a socket.
    path: [u8; PATH_LEN],
    /// A traced child's parent's trace file (NUL-terminated; empty: none, or a socket): its
    /// heap scan learns the inherited blocks from it.
    parent_path: [u8; PATH_LEN],
    buf: *mut u8,
    len: usize,
    /// Where a ring's slots are compacted before they go out (`PACK_LEN` bytes, or null).
    pack: *mut u8,
    /// Room for finding elided pairs (`PAIR_SCRATCH_LEN` bytes, or null: nothing is elided).
    pairs: *mut u8,
    /// Sequence points of the latest epoch boundaries, ascending (`nbounds` of them), and the
    /// newest one dropped to make room: no pair is elided across a boundary, nor one whose
    /// allocation is numbered below `bound_floor` (its boundaries are no longer known).
    bounds: [u64; MAX_BOUNDS],
    nbounds: usize,
    bound_floor: u64,
    /// Above every sequence number drained so far (the counter's value after the latest drain).
    drained_hi: u64,
    /// The view of every thread's frees a pass of the writer builds (`FOREIGN_ROOM` entries of
    /// `compact::FreeSeen`, or null), and the pass it was last built for.
    foreign: *mut u8,
    foreign_gen: u32,
    /// Entries of `modules::LOG` already written.
    modules_sent: usize,
    /// Entries of `python::LOG` (pseudo frames' names) already written.
    names_sent: usize,
    /// This image is a fork child: the `FORKED` record's body, written right after the header.
    forked: Option<[u8; 12]>,
    /// This image was made without fork handlers (a raw `clone`, `_Fork`) and adopted: its
    /// trace says that what it inherited is unknown.
    adopted: bool,
    /// This image is a traced child (fork or raw clone): a fixed trace name gets `.<pid>`.
    child: bool,
    /// The heap scan's helper started while the program runs (`start_early_helper`): its pid,
    /// our end of its socket and what that end is. `early_tried`: started, or given up.
    early: Option<(libc::pid_t, i32, fds::Ident)>,
    early_tried: bool,
    /// The socket pair for that helper (ours, its), made with the trace file (see
    /// `helper::pair`), and what each end is.
    pair: Option<(i32, fds::Ident, i32, fds::Ident)>,
}

const PATH_LEN: usize = 4200;
const NO_IDENT: fds::Ident = fds::Ident {
    dev: 0,
    ino: 0,
    kind: 0,
};

static mut OUT: Out = Out {
    fd: -1,
    id: NO_IDENT,
    socket: false,
    sent: 0,
    path: [0; PATH_LEN],
    parent_path: [0; PATH_LEN],
    buf: core::ptr::null_mut(),
    len: 0,
    pack: core::ptr::null_mut(),
    pairs: core::ptr::null_mut(),
    bounds: [0; MAX_BOUNDS],
    nbounds: 0,
    bound_floor: 0,
    drained_hi: 0,
    foreign: core::ptr::null_mut(),
    foreign_gen: 0,
    modules_sent: 0,
    names_sent: 0,
    forked: None,
    adopted: false,
    child: false,
    early: None,
    early_tried: false,
    pair: None,
};

const MAX_BOUNDS: usize = 16;

/// The pair finder's scratch: an address table of twice a ring's slots, a mark per slot, groups.
const PAIR_TABLE: usize = 2 * ring::RING_SLOTS as usize;
const PAIR_GROUPS: usize = 1024;
/// Entries of the view of every thread's frees: a pass of up to half as many slots (two busy
/// threads' large rings) gets one; a larger pass elides only pairs no other thread's numbers
/// interleave. Mapped where a second thread records, touched as passes fill it.
const FOREIGN_ROOM: usize = 4 * ring::RING_SLOTS as usize;
const PAIR_SCRATCH_LEN: usize = PAIR_TABLE * 4
    + ring::RING_SLOTS as usize * 2
    + PAIR_GROUPS * core::mem::size_of::<compact::Group>();

/// Room for a whole ring's slots in the compact encoding, whatever they hold.
const PACK_LEN: usize = ring::RING_SLOTS as usize * compact::MAX_SLOT_BYTES;

/// Pre-encoded header record, built by `tracer::init` (needs allocation, done outside flushes).
pub static mut HEADER: Vec<u8> = Vec::new();

fn out() -> &'static mut Out {
    // SAFETY: callers hold LOCK (documented on each caller), which serialises all access.
    unsafe { &mut *core::ptr::addr_of_mut!(OUT) }
}

/// Times the program took the output's descriptor and it was re-opened (`stat::OUTPUT_RETAKEN`).
static RETAKEN: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to the trace, checking before each system call that the descriptor is still
/// ours; when the program has taken it (closed it, or reused its number), the file is re-opened
/// or the socket re-connected and the bytes go on where they stopped: nothing reaches a
/// descriptor of the program's, nothing is lost. Caller holds LOCK.
fn write_all(data: &[u8]) -> Result<(), i32> {
    let o = out();
    if o.socket {
        return write_loop(o, data);
    }
    // A file over RLIMIT_FSIZE raises SIGXFSZ in the writing thread, which would kill the
    // program: block it around our write, and take back the one our write raised.
    // SAFETY: sigset and mask calls on local, initialised sets; sigtimedwait with a zero timeout
    // only dequeues a pending SIGXFSZ, which this write raised while it was blocked.
    unsafe {
        let mut xfsz: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut xfsz);
        libc::sigaddset(&mut xfsz, libc::SIGXFSZ);
        libc::pthread_sigmask(libc::SIG_BLOCK, &xfsz, &mut old);
        let r = write_loop(o, data);
        if r == Err(libc::EFBIG) && libc::sigismember(&old, libc::SIGXFSZ) == 0 {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&xfsz, core::ptr::null_mut(), &zero);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        r
    }
}

fn write_loop(o: &mut Out, mut data: &[u8]) -> Result<(), i32> {
    // Failures in a row; a program that keeps taking the descriptor (or made it unwritable) is
    // left alone after a few.
    let mut strikes = 0;
    while !data.is_empty() {
        if strikes > 8 {
            return Err(libc::EBADF);
        }
        if !fds::is(o.fd, o.id) {
            strikes += 1;
            retake(o)?;
            continue;
        }
        // SAFETY: `data` is a valid readable slice; MSG_NOSIGNAL keeps a dead peer from raising
        // SIGPIPE in the program.
        let n = unsafe {
            if o.socket {
                libc::send(o.fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL)
            } else {
                libc::write(o.fd, data.as_ptr().cast(), data.len())
            }
        };
        if n < 0 {
            // SAFETY: errno is thread-local.
            let e = unsafe { *libc::__errno_location() };
            match e {
                libc::EINTR => continue,
                // The program made our descriptor non-blocking: wait until it takes more.
                libc::EAGAIN => {
                    let mut p = libc::pollfd {
                        fd: o.fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one pollfd of ours.
                    unsafe { libc::poll(&mut p, 1, 100) };
                    continue;
                }
                // Taken between the check and the call: checked (and re-opened) again.
                libc::EBADF | libc::ENOTSOCK => {
                    strikes += 1;
                    continue;
                }
                _ => return Err(e),
            }
        }
        strikes = 0;
        o.sent += n as u64;
        data = &data[n as usize..];
    }
    Ok(())
}

/// The program took the output's descriptor: open the trace file again (the same file: device
/// and inode checked, never through a symbolic link) or connect to `leakhunt run` again (the
/// connection's hello says where the stream goes on). The new descriptor goes high again.
fn retake(o: &mut Out) -> Result<(), i32> {
    let fd = if o.socket {
        let sock = config::get().socket().ok_or(libc::EBADF)?;
        connect(sock, hello::RESUME, o.sent)?
    } else {
        // SAFETY: `path` is NUL-terminated (set when the file was created).
        let fd = unsafe {
            libc::open(
                o.path.as_ptr().cast(),
                libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            // SAFETY: errno is thread-local.
            return Err(unsafe { *libc::__errno_location() });
        }
        let fd = fds::place_high(fd);
        if fds::ident(fd) != Some(o.id) {
            // Another file now has the trace's name: ours is gone.
            // SAFETY: our own descriptor, opened just above.
            unsafe { libc::close(fd) };
            return Err(libc::ESTALE);
        }
        fd
    };
    o.id = fds::ident(fd).ok_or(libc::EBADF)?;
    o.fd = fd;
    RETAKEN.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Connects to `leakhunt run` at `sock` and sends the connection's hello (`kind`, with the trace
/// bytes already delivered). Returns the descriptor, placed high.
fn connect(sock: &core::ffi::CStr, kind: u32, offset: u64) -> Result<i32, i32> {
    // SAFETY: plain socket syscalls on a sockaddr_un we fill completely.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(*libc::__errno_location());
        }
        let fd = fds::place_high(fd);
        let mut addr: libc::sockaddr_un = core::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let p = sock.to_bytes();
        let n = p.len().min(addr.sun_path.len() - 1);
        for (d, s) in addr.sun_path.iter_mut().zip(&p[..n]) {
            *d = *s as libc::c_char;
        }
        let len = core::mem::size_of::<libc::sa_family_t>() + n + 1;
        let fail = |fd: i32| {
            let e = *libc::__errno_location();
            libc::close(fd);
            Err(e)
        };
        if libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        ) != 0
        {
            return fail(fd);
        }
        // A deep socket buffer lets the writer run ahead of the CLI through bursts instead
        // of the two taking turns (unix sockets count in-flight bytes on the sender).
        let buf: libc::c_int = 8 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&buf as *const libc::c_int).cast(),
            core::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let h = hello::encode(&hello::Hello {
            kind,
            token: config::get().token,
            pid: tracer::PID.load(Ordering::Relaxed),
            start_ns: tracer::START_NS.load(Ordering::Relaxed),
            offset,
        });
        let mut at = 0;
        while at < h.len() {
            let n = libc::send(
                fd,
                h[at..].as_ptr().cast(),
                h.len() - at,
                libc::MSG_NOSIGNAL,
            );
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                return fail(fd);
            }
            at += n as usize;
        }
        Ok(fd)
    }
}

fn fail(errno: i32, what: &str) {
    if STATE.swap(FAILED, Ordering::AcqRel) != FAILED {
        let mut msg = [0u8; 200];
        let s = fmt_err(&mut msg, what, errno);
        sys::diag(s);
    }
    tracer::disable();
    // What was drained for the failed write is lost with the stream: a ring file read after the
    // process ends must not offer it (a stretch from the middle of the run, with everything
    // after it missing, would read as the process's end: the CLI counted the numbers before it
    // as the only ones lost).
    ring::for_each(|r| r.delivered());
    let o = out();
    fds::close_own(o.fd, o.id);
    o.fd = -1;
}

/// strerror without the allocation and locale machinery, for the errors output can meet: the
/// symbol and what it means.
fn errno_text(errno: i32) -> (&'static str, &'static str) {
    match errno {
        libc::ENOSPC => ("ENOSPC", "no space left on device"),
        libc::EDQUOT => ("EDQUOT", "disk quota exceeded"),
        libc::EFBIG => ("EFBIG", "file too large"),
        libc::EIO => ("EIO", "input/output error"),
        libc::EPIPE => ("EPIPE", "the leakhunt CLI went away"),
        libc::ECONNRESET => ("ECONNRESET", "the leakhunt CLI went away"),
        libc::ECONNREFUSED => ("ECONNREFUSED", "the leakhunt CLI is not listening"),
        libc::ENOENT => ("ENOENT", "no such file or directory"),
        libc::EACCES => ("EACCES", "permission denied"),
        libc::EPERM => ("EPERM", "operation not permitted"),
        libc::EEXIST => ("EEXIST", "file exists"),
        libc::EROFS => ("EROFS", "read-only file system"),
        libc::EMFILE => ("EMFILE", "too many open files in the process"),
        libc::ENFILE => ("ENFILE", "too many open files in the system"),
        libc::EBADF => ("EBADF", "the program keeps closing leakhunt's descriptor"),
        libc::ENOTSOCK => ("ENOTSOCK", "the program replaced leakhunt's socket"),
        libc::ESTALE => ("ESTALE", "the trace file was removed or replaced"),
        libc::ELOOP => ("ELOOP", "the name is a symbolic link"),
        libc::ENOTDIR => ("ENOTDIR", "a component of the path is not a directory"),
        libc::ENAMETOOLONG => ("ENAMETOOLONG", "the name is too long"),
        libc::ENOMEM => ("ENOMEM", "out of memory"),
        libc::EINVAL => ("EINVAL", "invalid argument"),
        libc::ENOTCONN => ("ENOTCONN", "not connected"),
        libc::ETIMEDOUT => ("ETIMEDOUT", "timed out"),
        libc::EAGAIN => ("EAGAIN", "resource temporarily unavailable"),
        libc::EISDIR => ("EISDIR", "is a directory"),
        libc::ENXIO => ("ENXIO", "no such device or address"),
        _ => ("", "error"),
    }
}

fn fmt_err<'a>(buf: &'a mut [u8; 200], what: &str, errno: i32) -> &'a str {
    let mut n = 0;
    let mut push = |b: &[u8]| {
        let k = b.len().min(200 - n);
        buf[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    let (name, text) = errno_text(errno);
    push(what.as_bytes());
    push(b": ");
    push(text.as_bytes());
    push(b" (");
    let mut d = [0u8; 20];
    if name.is_empty() {
        push(b"errno ");
        push(sys::fmt_u64(&mut d, errno.unsigned_abs() as u64));
    } else {
        push(name.as_bytes());
    }
    push(b"); recording stopped, the program continues untraced");
    core::str::from_utf8(&buf[..n]).unwrap_or("trace output failed")
}

/// Opens the output if it is not open yet. Caller holds LOCK.
fn ensure_open() -> bool {
    match STATE.load(Ordering::Acquire) {
        OPEN => return true,
        FAILED | OFF => return false,
        _ => {}
    }
    let o = out();
    if o.buf.is_null() {
        o.buf = sys::mmap_anon(BUF_LEN);
        if o.buf.is_null() {
            fail(libc::ENOMEM, "cannot map the trace buffer");
            return false;
        }
        // Without it, batches go out as plain slots.
        o.pack = sys::mmap_anon(PACK_LEN);
        if config::get().elide {
            o.pairs = sys::mmap_anon(PAIR_SCRATCH_LEN);
        }
    }
    let cfg = config::get();
    o.sent = 0;
    let fd = if let Some(sock) = cfg.socket() {
        match connect(sock, hello::NEW, 0) {
            Ok(fd) => {
                o.socket = true;
                fd
            }
            Err(e) => {
                fail(e, "cannot connect to the leakhunt CLI");
                return false;
            }
        }
    } else {
        let fd = open_trace_file(&mut o.path, cfg, o.child);
        if fd < 0 {
            // SAFETY: errno is thread-local.
            fail(
                unsafe { *libc::__errno_location() },
                "cannot create the trace file",
            );
            return false;
        }
        // Its absolute name, to open it again if the program takes the descriptor.
        absolute_name(fd, &mut o.path);
        let fd = fds::place_high(fd);
        // The heap scan's helper may start while the program runs: its socket pair is made
        // now, the one moment leakhunt takes the lowest free numbers anyway.
        if !o.child && cfg.reach && cfg.helper_early != u64::MAX && o.pair.is_none() {
            o.pair =
                crate::helper::pair().and_then(|(a, b)| match (fds::ident(a), fds::ident(b)) {
                    (Some(ia), Some(ib)) => Some((a, ia, b, ib)),
                    _ => {
                        crate::helper::close_pair(Some((a, b)));
                        None
                    }
                });
        }
        fd
    };
    match fds::ident(fd) {
        Some(id) => o.id = id,
        None => {
            fail(libc::EBADF, "cannot keep the trace's descriptor");
            return false;
        }
    }
    o.fd = fd;
    o.len = 0;
    o.modules_sent = 0;
    o.names_sent = 0;
    EPOCHS.store(0, Ordering::Relaxed);
    STATE.store(OPEN, Ordering::Release);
    push(&encode::preamble());
    // SAFETY: HEADER is written once by init before any flush and read-only afterwards.
    let header = unsafe { &*core::ptr::addr_of!(HEADER) };
    push(header);
    if let Some(f) = o.forked {
        push_sealed(tag::FORKED, &[&f]);
    }
    if o.adopted {
        push_warning(ADOPTED_NOTE.as_bytes());
    }
    true
}

const ADOPTED_NOTE: &str = "this process was made without fork handlers (a raw clone or _Fork): \
the blocks it inherited from its parent are unknown to leakhunt, and only its own are reported";

/// The file `fd` names, as the kernel sees it (`/proc/self/fd/N`), into `path` (NUL-terminated);
/// left as it is when the link cannot be read (the name given, relative to where we are).
fn absolute_name(fd: i32, path: &mut [u8; PATH_LEN]) {
    let mut link = [0u8; 40];
    let mut digits = [0u8; 20];
    let d = sys::fmt_u64(&mut digits, fd as u64);
    link[..14].copy_from_slice(b"/proc/self/fd/");
    link[14..14 + d.len()].copy_from_slice(d);
    let mut buf = [0u8; PATH_LEN];
    // SAFETY: `link` is NUL-terminated (zeroed beyond the digits); readlink writes at most
    // `buf.len() - 1` bytes into our buffer.
    let n = unsafe { libc::readlink(link.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len() - 1) };
    if n > 0 && buf[0] == b'/' && !buf[..n as usize].ends_with(b" (deleted)") {
        path[..n as usize].copy_from_slice(&buf[..n as usize]);
        path[n as usize] = 0;
    }
}

/// `path` (NUL-terminated) is a regular file of this user's (not a link, not another's).
fn own_file(path: &[u8; PATH_LEN]) -> bool {
    // SAFETY: `st` is written by lstat; `path` is NUL-terminated.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        libc::lstat(path.as_ptr().cast(), &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_uid == libc::geteuid()
    }
}

/// Creates `LEAKHUNT_OUT` (with `%p` replaced by the pid) or `leakhunt.<pid>.trace`, O_EXCL and
/// mode 0600, never through a symbolic link; if the name exists, `<name>.2`, `<name>.3`, ... are
/// tried, and the user is told which one was taken (unless the name holds the pid: then it is an
/// earlier image of this process, before an exec).
fn open_trace_file(path: &mut [u8; PATH_LEN], cfg: &config::Config, child: bool) -> i32 {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    let mut n = 0;
    fn put(path: &mut [u8; PATH_LEN], b: &[u8], n: &mut usize) {
        let k = b.len().min(path.len() - 1 - *n);
        path[*n..*n + k].copy_from_slice(&b[..k]);
        *n += k;
    }
    let mut digits = [0u8; 20];
    let pid_s = sys::fmt_u64(&mut digits, pid as u64);
    // The name holds the pid: a name taken is an earlier image of this process (before an
    // exec), whose trace keeps it; the new image's `.2` is no news to tell.
    let mut by_pid = true;
    match cfg.out_path() {
        Some(p) => {
            let b = p.to_bytes();
            let mut i = 0;
            let mut has_pid = false;
            while i < b.len() {
                if b[i] == b'%' && b.get(i + 1) == Some(&b'p') {
                    put(path, pid_s, &mut n);
                    has_pid = true;
                    i += 2;
                } else {
                    put(path, &b[i..i + 1], &mut n);
                    i += 1;
                }
            }
            // A child of a process with a fixed name: `TRACE.<pid>`, as `leakhunt run -o` names
            // them (its parent has TRACE).
            if child && !has_pid {
                put(path, b".", &mut n);
                put(path, pid_s, &mut n);
            }
            by_pid = has_pid || child;
        }
        None => {
            put(path, b"leakhunt.", &mut n);
            put(path, pid_s, &mut n);
            put(path, b".trace", &mut n);
        }
    }
    let open = |p: &[u8; PATH_LEN]| {
        // SAFETY: `p` is NUL-terminated (the byte after the name is still zero).
        unsafe {
            libc::open(
                p.as_ptr().cast(),
                libc::O_WRONLY
                    | libc::O_APPEND
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC,
                0o600,
            )
        }
    };
    path[n] = 0;
    let mut fd = open(path);
    // SAFETY: errno is thread-local.
    let taken = || unsafe { *libc::__errno_location() } == libc::EEXIST;
    if fd < 0 && taken() && !by_pid && !cfg.strip_env && !cfg.trace_children && own_file(path) {
        // A fixed name, inherited as the user set it: the programs the first process starts
        // are traced too and find it taken (by a trace of the user's); each writes
        // `<name>.<pid>`, as forked children do. (Anything else there is news: below.)
        put(path, b".", &mut n);
        put(path, pid_s, &mut n);
        path[n] = 0;
        by_pid = true;
        fd = open(path);
    }
    // The name is taken (an earlier image of this pid before exec, or a fixed LEAKHUNT_OUT):
    // try `<name>.2`, `<name>.3`, ...
    let base = n;
    let mut k = 2u32;
    // SAFETY: errno is thread-local.
    while fd < 0 && taken() && k < 1000 {
        n = base;
        put(path, b".", &mut n);
        put(path, sys::fmt_u64(&mut digits, k as u64), &mut n);
        path[n] = 0;
        fd = open(path);
        k += 1;
    }
    if fd >= 0 && k > 2 && !by_pid {
        let mut msg = [0u8; 300];
        let mut m = 0;
        for part in [
            &path[..base],
            b" exists: the trace goes to ".as_slice(),
            &path[..n],
        ] {
            let take = part.len().min(msg.len() - m);
            msg[m..m + take].copy_from_slice(&part[..take]);
            m += take;
        }
        sys::diag(core::str::from_utf8(&msg[..m]).unwrap_or("the trace's name exists"));
    }
    fd
}

/// Appends bytes to the output buffer, writing it out when full. Caller holds LOCK.
fn push(data: &[u8]) {
    let o = out();
    if STATE.load(Ordering::Relaxed) != OPEN {
        return;
    }
    if o.len + data.len() > BUF_LEN {
        write_buf();
        if data.len() > BUF_LEN {
            if let Err(e) = write_all(data) {
                fail(e, "cannot write the trace");
            }
            return;
        }
    }
    // SAFETY: `o.buf` maps BUF_LEN bytes and `o.len + data.len() <= BUF_LEN`.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), o.buf.add(o.len), data.len()) };
    o.len += data.len();
}

fn write_buf() {
    let o = out();
    if o.len == 0 || STATE.load(Ordering::Relaxed) != OPEN {
        o.len = 0;
        return;
    }
    // SAFETY: the first `o.len` bytes of the buffer are initialised.
    let data = unsafe { core::slice::from_raw_parts(o.buf, o.len) };
    let r = write_all(data);
    o.len = 0;
    match r {
        Ok(()) => {
            ring::for_each(|r| r.delivered());
            start_early_helper(o);
        }
        Err(e) => fail(e, "cannot write the trace"),
    }
}

/// Writes module changes not yet sent. Caller holds LOCK. Gives up (to be retried by the next
/// flush) when this thread holds the modules lock, i.e. was interrupted inside a rescan.
fn send_modules() {
    let Some(_m) = modules::LOCK.try_lock_for(100) else {
        return;
    };
    // SAFETY: LOG is guarded by modules::LOCK, which we hold.
    let log = unsafe { &*core::ptr::addr_of!(modules::LOG) };
    let o = out();
    while o.modules_sent < log.len() {
        match &log[o.modules_sent] {
            Change::Load(m) => push(&m.record),
            Change::Unload { id, gen } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&id.to_le_bytes());
                body[4..].copy_from_slice(&gen.to_le_bytes());
                push_sealed(tag::MODULE_UNLOAD, &[&body]);
            }
        }
        o.modules_sent += 1;
    }
}

/// Writes the pseudo frames' names not yet sent (as `send_modules`).
fn send_frame_names() {
    let Some(_m) = crate::python::LOCK.try_lock_for(100) else {
        return;
    };
    // SAFETY: LOG is guarded by python::LOCK, which we hold.
    let log = unsafe { &*core::ptr::addr_of!(crate::python::LOG) };
    let o = out();
    while o.names_sent < log.len() {
        push(&log[o.names_sent]);
        o.names_sent += 1;
    }
}

/// Slots the last pass over every ring found (see [`ring::POLLING`]).
pub static LAST_PASS_SLOTS: AtomicU64 = AtomicU64::new(0);

/// Drains every ring into the output. Caller holds LOCK.
fn drain_all() {
    let open = STATE.load(Ordering::Relaxed) == OPEN;
    // Every ring's batch is cut first; then, where more than one thread has events waiting,
    // every thread's frees published by now are read into a view: with it, a pair whose
    // numbers interleave with other threads' is elided unless one of them freed its address in
    // between (`compact::Foreign`). Without it only pairs no other thread's number falls
    // between are.
    let (mut busy, mut total) = (0u32, 0u64);
    ring::for_each(|r| {
        let n = r.cut();
        if n > 0 {
            busy += 1;
            total += n;
        }
    });
    LAST_PASS_SLOTS.store(total, Ordering::Relaxed);
    // Every event cut was published, so numbered, before this read.
    let cut_seq = tracer::seq_next();
    let o = out();
    let floor = o.drained_hi;
    let mut view = None;
    if open && busy > 1 && !o.pairs.is_null() && total <= FOREIGN_ROOM as u64 / 2 {
        if o.foreign.is_null() {
            o.foreign = sys::mmap_anon(FOREIGN_ROOM * core::mem::size_of::<compact::FreeSeen>());
        }
        if !o.foreign.is_null() {
            o.foreign_gen = o.foreign_gen.wrapping_add(1).max(1);
            // SAFETY: `foreign` maps FOREIGN_ROOM zero-initialised `FreeSeen`s (plain integers,
            // page-aligned) that only the LOCK holder (we) touches.
            let room = unsafe {
                core::slice::from_raw_parts_mut(o.foreign.cast::<compact::FreeSeen>(), FOREIGN_ROOM)
            };
            // As many entries as slots cut: frees numbered from the cut on cannot fall inside a
            // pair cut here and are left out, and a view that fills up is not used. Numbers
            // count from well below the floor: a thread may publish an event numbered below it
            // (it took the number before an earlier drain, and was descheduled).
            let base = floor.saturating_sub(1 << 31);
            view = compact::Foreign::new(room, total as usize, base, cut_seq, o.foreign_gen);
            let mut whole = view.is_some();
            ring::for_each(|r| {
                if let (true, Some(v)) = (whole, view.as_mut()) {
                    let tid = r.tid.load(Ordering::Relaxed);
                    r.peek(|a, b| whole = v.add(tid, &[a, b]));
                }
            });
            if !whole {
                view = None;
            }
        }
    }
    let pass = view.as_ref().map(|v| (v, floor));
    ring::for_each(|r| drain_ring(r, open, pass));
    if pass.is_some() {
        out().drained_hi = cut_seq;
    }
}

/// A small ring passed half full: its own thread drains it into the output if the output lock
/// is free at once, instead of waking the writer. With more busy threads than large rings (a pool
/// of 64 workers on 2 cores), waking the writer every 128 events of each cost more in system
/// calls and context switches than the encoding itself. With a trace file the buffer is written
/// at the writer's next wake-up (20 ms at most) or once a quarter full; under `leakhunt run` at
/// once, with the ring still held: what a ring file offers after a kill must be what was not
/// yet written, so draining and writing stay together.
pub fn drain_own(r: &ring::Ring) -> bool {
    let Some(_l) = LOCK.try_lock() else {
        return false;
    };
    if STATE.load(Ordering::Relaxed) != OPEN {
        return false;
    }
    drain_ring(r, true, None);
    // Many threads draining themselves between two wake-ups of the writer would otherwise fill
    // the whole buffer, all of it then resident.
    if out().socket || out().len >= BUF_LEN / 4 {
        write_buf();
    }
    true
}

/// Drains one ring into the output: with `pass` (a view of every thread's frees and the
/// counter's value at the previous drain), the batch its `cut` left, pairing across other
/// threads' numbers (`drain_all`); else all of it. Caller holds LOCK.
fn drain_ring(r: &ring::Ring, open: bool, pass: Option<(&compact::Foreign, u64)>) {
    {
        let tid = r.tid.load(Ordering::Relaxed);
        let sink = |a: &[u8], b: &[u8]| {
            if !open {
                return;
            }
            let mut head = [0u8; 8];
            head[..4].copy_from_slice(&tid.to_le_bytes());
            // Compact records (6 bytes an event instead of 32) with elided pairs, except, when
            // nothing is elided, to `leakhunt run` from a program with a single thread: there
            // the CLI and this writer share the other core, and encoding plus decoding cost it
            // more than copying plain slots through the socket (measured, BENCHMARKS.md).
            let o = out();
            let (pack, socket) = (o.pack, o.socket);
            let plain =
                o.pairs.is_null() && socket && ring::RING_COUNT.load(Ordering::Relaxed) <= 1;
            if !pack.is_null() && !plain {
                // SAFETY: `pack` maps PACK_LEN bytes that only the LOCK holder (we) touches.
                let pack = unsafe { core::slice::from_raw_parts_mut(pack, PACK_LEN) };
                let mut scratch = pair_scratch(o);
                let bounds = &o.bounds[..o.nbounds];
                let (floor, foreign) = match pass {
                    Some((v, drained)) => (o.bound_floor.max(drained), Some((v, tid))),
                    None => (o.bound_floor, None),
                };
                let found = scratch
                    .as_mut()
                    .and_then(|sc| compact::find_pairs(&[a, b], bounds, floor, sc, foreign));
                let encoded = match found {
                    Some((pairs, n)) => {
                        ELIDED.fetch_add(n as u64, Ordering::Relaxed);
                        compact::encode_elided(&[a, b], pack, &pairs)
                    }
                    None => compact::encode(&[a, b], pack),
                };
                if let Some(len) = encoded {
                    let slots = ((a.len() + b.len()) / leakhunt_format::slot::SLOT_LEN) as u32;
                    head[4..].copy_from_slice(&slots.to_le_bytes());
                    push_sealed(tag::EVENTS, &[&head, &pack[..len]]);
                    return;
                }
            }
            push_sealed(tag::BATCH, &[&head, a, b]);
        };
        let n = if pass.is_some() {
            r.drain_cut(sink)
        } else {
            r.drain(sink)
        };
        if pass.is_none() {
            // Every event drained was published, so numbered, before this read.
            out().drained_hi = tracer::seq_next();
        }
        if !open && n > 0 {
            EVENTS_LOST.fetch_add(n, Ordering::Relaxed);
            // Dropped, not pending: a ring file read after a kill must not offer them.
            r.delivered();
        }
        if r.state.load(Ordering::Acquire) == ORPHAN && r.space() == r.cap() {
            r.state.store(FREE, Ordering::Release);
        }
    }
}

/// The pair finder's scratch, carved from its mapping. Caller holds LOCK.
fn pair_scratch(o: &Out) -> Option<compact::PairScratch<'static>> {
    if o.pairs.is_null() {
        return None;
    }
    let groups = PAIR_GROUPS * core::mem::size_of::<compact::Group>();
    // SAFETY: `pairs` maps PAIR_SCRATCH_LEN zero-initialised bytes that only the LOCK holder
    // touches, laid out as the groups (first: 8-byte alignment, page-aligned mapping), the table
    // and the marks, disjoint; every bit pattern is a valid `u16` and `Group` (plain integers).
    unsafe {
        let g = o.pairs.cast::<compact::Group>();
        let t = o.pairs.add(groups).cast::<u32>();
        let m = t.add(PAIR_TABLE).cast::<u16>();
        Some(compact::PairScratch {
            groups: core::slice::from_raw_parts_mut(g, PAIR_GROUPS),
            table: core::slice::from_raw_parts_mut(t, PAIR_TABLE),
            marks: core::slice::from_raw_parts_mut(m, ring::RING_SLOTS as usize),
        })
    }
}

/// Flushes everything recorded so far. Blocks on LOCK.
pub fn flush() {
    let _l = LOCK.lock();
    flush_locked();
}

/// The writer's pass: drains every ring, then gives back the pages of rings idle for a while
/// (see [`ring::Ring::ask_give_back`]), up to 64 a pass, their system calls after the lock.
pub fn flush_and_give_back(now: u64) {
    let mut asked: [Option<&'static ring::Ring>; 64] = [None; 64];
    let mut n = 0;
    {
        let _l = LOCK.lock();
        flush_locked();
        if STATE.load(Ordering::Acquire) == OPEN {
            ring::for_each(|r| {
                if n < asked.len() && r.ask_give_back(now) {
                    asked[n] = Some(r);
                    n += 1;
                }
            });
        }
    }
    for r in asked[..n].iter().flatten() {
        r.give_back();
    }
}

fn flush_locked() {
    if STATE.load(Ordering::Acquire) == OFF {
        return;
    }
    ensure_open();
    send_modules();
    send_frame_names();
    drain_all();
    write_buf();
}

/// The calling thread's small ring filled fast: make it large (see `ring`) once a flush has
/// emptied it. False, leaving it small, when the output lock is busy or nothing was flushed.
pub fn grow_ring(r: &ring::Ring) -> bool {
    let Some(_l) = LOCK.try_lock_for(1) else {
        return false;
    };
    flush_locked();
    r.grow_locked()
}

/// Called by a hook whose ring `r` lacks space: flush if the lock is free, else let the holder
/// work. With more rings than may be large (threads that share the cores), the hook drains its
/// own ring alone: the lock is then held for one ring's encoding instead of every thread's, by
/// a thread that may be preempted holding it. Not with few: a lone ring's batch is paired
/// without the view of the other threads' frees, and every drain raises the number below which
/// the next batches elide nothing, so with two busy threads it would elide a third fewer.
pub fn make_room(r: &ring::Ring) {
    RING_WAITS.fetch_add(1, Ordering::Relaxed);
    if ring::RING_COUNT.load(Ordering::Relaxed) > ring::big_max() && drain_own(r) {
        return;
    }
    match LOCK.try_lock_for(1) {
        Some(_l) => flush_locked(),
        None => {
            ring::wake_writer();
            sys::yield_now();
        }
    }
}

/// Appends one checksummed record whose body is the concatenation of `parts`.
fn push_sealed(tag: u16, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let h = sealed_header(tag, len);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    push(&h);
    for p in parts {
        crc.update(p);
        push(p);
    }
    push(&crc.finalize().to_le_bytes());
}

fn push_stats() {
    let (mut reused, mut walked, mut repeated) = (0, 0, 0);
    ring::for_each(|r| {
        // SAFETY: counters read while their threads may be running: torn values are impossible
        // for aligned u64 on x86_64, and a stale one only understates a statistic.
        let s = unsafe { &*r.scratch };
        reused += s.reused;
        walked += s.walked;
        repeated += s.repeated;
    });
    const N: usize = 13;
    let pairs: [(u32, u64); N] = [
        (stat::EVENTS_LOST, EVENTS_LOST.load(Ordering::Relaxed)),
        (stat::RING_WAITS, RING_WAITS.load(Ordering::Relaxed)),
        (stat::UNTRACKED_ALLOCS, tracer::untracked()),
        (stat::BOOTSTRAP_BYTES, crate::real::bootstrap_bytes()),
        (
            stat::THREADS,
            ring::RING_COUNT.load(Ordering::Relaxed) as u64,
        ),
        (stat::UNWIND_REUSED, reused),
        (stat::UNWIND_WALKED, walked),
        (stat::UNWIND_REPEATED, repeated),
        (stat::ELIDED, ELIDED.load(Ordering::Relaxed)),
        (stat::OUTPUT_RETAKEN, RETAKEN.load(Ordering::Relaxed)),
        (stat::ORPHANS, config::get().orphans as u64),
        (stat::TRACER_RESIDENT, sys::own_resident()),
        (
            stat::RINGS_GIVEN_BACK,
            ring::GIVEN_BACK.load(Ordering::Relaxed),
        ),
    ];
    let mut body = [0u8; 4 + N * 12];
    body[..4].copy_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let at = 4 + i * 12;
        body[at..at + 4].copy_from_slice(&k.to_le_bytes());
        body[at + 4..at + 12].copy_from_slice(&v.to_le_bytes());
    }
    push_sealed(tag::STATS, &[&body]);
}

fn push_exit(kind: ExitKind) {
    let (k, v) = match kind {
        ExitKind::Code(c) => (0u8, c),
        ExitKind::Signal(s) => (1u8, s),
        ExitKind::Exec => (2u8, 0),
    };
    let mut body = [0u8; 5];
    body[0] = k;
    body[1..].copy_from_slice(&v.to_le_bytes());
    push_sealed(tag::EXIT, &[&body]);
}

static EPOCHS: AtomicU64 = AtomicU64::new(0);

/// Epoch boundaries written so far (snapshots included).
pub fn epochs() -> u64 {
    EPOCHS.load(Ordering::Relaxed)
}

/// A hash of the command line last sent (the header's, then `TITLE` records').
static TITLE_HASH: AtomicU64 = AtomicU64::new(0);

fn hash(b: &[u8]) -> u64 {
    // FNV-1a: a changed title, not an adversary, is what it must notice.
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The command line the header carries.
pub fn note_title(cmdline: &[u8]) {
    TITLE_HASH.store(hash(cmdline), Ordering::Relaxed);
}

/// Sends the process's command line if it changed since it was last sent: a process that names
/// itself (`setproctitle`, an nginx worker, a forked child that rewrites its argv) is reported
/// under its own name. Caller holds LOCK. Raw reads, a stack buffer: safe in a signal handler.
fn send_title() {
    let mut cmdline = [0u8; 4096];
    let n = sys::read_small(c"/proc/self/cmdline", &mut cmdline);
    if n == 0 {
        return;
    }
    let h = hash(&cmdline[..n]);
    if TITLE_HASH.swap(h, Ordering::Relaxed) == h {
        return;
    }
    let mut body = [0u8; 4100];
    let len = encode::title_body(&cmdline[..n], &mut body);
    push_sealed(tag::TITLE, &[&body[..len]]);
}

/// Closes an epoch: writes the boundary (the events numbered below `seq` belong to it or earlier
/// ones) with the time and the process's RSS, then flushes what was recorded. With a name, the
/// boundary is also a snapshot. Allocation-free (names are cut at 255 bytes).
///
/// This process is a fork child of `parent`, whose fork point is `seq`: the `FORKED` record.
pub fn forked(parent: u32, seq: u64) {
    let _l = LOCK.lock();
    let body = encode::forked_body(parent, seq);
    let o = out();
    o.forked = Some(body);
    // Right after the header when the stream opens; at once if it already did (the writer
    // thread may have been first).
    if STATE.load(Ordering::Relaxed) == OPEN {
        push_sealed(tag::FORKED, &[&body]);
    }
}

/// A fork child about to exec without `--trace-children`: its image ends untraced, and if it
/// never opened a stream, it opens none (memcheck says nothing about such an image). Returns
/// whether the output is off now.
pub fn end_fork_image_quietly() -> bool {
    let _l = LOCK.lock();
    if out().forked.is_none() || STATE.load(Ordering::Relaxed) != CLOSED {
        return false;
    }
    STATE.store(OFF, Ordering::Release);
    true
}

/// A fork point: its sequence number (taken by `take_seq` under the lock) becomes a boundary
/// that no elided pair crosses, so a block allocated before the fork and freed after it in the
/// parent is sent, and the child's inherited heap is exact. Returns the number.
pub fn fork_point(take_seq: impl Fn() -> u64) -> u64 {
    let _l = LOCK.lock();
    let seq = take_seq();
    push_bound(out(), seq);
    seq
}

/// Adds a boundary no elided pair crosses (the oldest makes room). Caller holds LOCK.
fn push_bound(o: &mut Out, seq: u64) {
    if o.nbounds == MAX_BOUNDS {
        o.bound_floor = o.bounds[0];
        o.bounds.copy_within(1.., 0);
        o.nbounds -= 1;
    }
    o.bounds[o.nbounds] = seq;
    o.nbounds += 1;
}

/// `seq_now` reads the next sequence number: read under the lock, so that every batch the pair
/// finder sees afterwards knows this boundary, and every batch it saw before held only numbers
/// below it.
pub fn epoch(seq_now: impl Fn() -> u64, name: Option<&[u8]>) {
    let _l = LOCK.lock();
    let seq = seq_now();
    push_bound(out(), seq);
    ensure_open();
    if STATE.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let e = leakhunt_format::Epoch {
        index: EPOCHS.fetch_add(1, Ordering::Relaxed) as u32 + 1,
        time_ns: sys::monotonic_ns(),
        seq,
        rss: sys::rss_bytes(),
    };
    push_sealed(tag::EPOCH, &[&encode::epoch_body(&e)]);
    send_title();
    if let Some(name) = name {
        let mut buf = [0u8; 8 + 255];
        let name = &name[..name.len().min(255)];
        if let Some(n) = encode::snapshot_body(e.index, name, &mut buf) {
            push_sealed(tag::SNAPSHOT, &[&buf[..n]]);
        }
    }
    // The events still in the rings go out after the boundary: numbered on both sides of it,
    // they are put in order by the reader, which applies the boundary when every number below
    // `seq` has been applied (had they gone first, it would see numbers past `seq` before it
    // knew the boundary, and apply it late).
    flush_locked();
}

/// At exit: holds this thread here while `leakhunt run` (or, with the preload alone, the helper
/// it starts) scans the heap, as [`leakhunt_format::reach`] describes (ask, drain when told, echo
/// the result into the trace, go on when told or when the other side is gone). `sp` is where the
/// program's part of this thread's stack ends. At a snapshot (`snapshot`), the writer thread
/// waits instead, with no stack of the program's (`sp` 0), while the program's threads are held.
/// `pre_exit`: the exiting thread asks as the program starts to exit (a snapshot scan of its own,
/// see `tracer::pre_exit_scan`).
pub fn reach_scan(sp: u64, snapshot: bool, pre_exit: bool) {
    use leakhunt_format::reach::{self, reply};
    // A program thread waits here while its other threads are held: a signal sent to the process
    // meanwhile would run its handler on this thread, inside the lock (a handler that calls
    // `exit` would wait for it forever). Asynchronous signals wait, blocked, until the scan is
    // over (the writer thread blocks them all anyway).
    let _mask = SignalsHeld::new();
    let _l = LOCK.lock();
    let o = out();
    if !ensure_open() {
        return;
    }
    // The replies come on the trace socket from `leakhunt run`, or, with the preload alone, on
    // a socket pair from a helper that reads the trace file (`helper`).
    let (fd, id, helper) = if o.socket {
        allow_cli_to_trace(o.fd);
        (o.fd, o.id, None)
    } else {
        flush_locked();
        write_buf();
        let let_go = |early: Option<(libc::pid_t, i32, fds::Ident)>| {
            if let Some((child, fd, _)) = early {
                crate::helper::finish(child, fd);
            }
        };
        // The helper started while the program ran, unless the program took its socket (it is
        // gone then: its end closed with ours) or it ended (it stopped reading past the limit,
        // or died: a new one is started).
        let mut early = o.early.take().filter(|&(_, fd, id)| fds::is(fd, id));
        if early.is_some_and(|(_, fd, _)| crate::helper::gone(fd)) {
            let_go(early.take());
        }
        // The helper reads the whole trace before it can scan, while the program waits to end:
        // past a size, only when asked for (a daemon's stop must not take minutes).
        // SAFETY: stat is plain data; fstat fills it.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: fstat on our own descriptor into a local.
        let size = if unsafe { libc::fstat(o.fd, &mut st) } == 0 {
            st.st_size as u64
        } else {
            0
        };
        if size > config::get().reach_limit && !config::get().reach_forced {
            push_warning(
                b"no heap scan at exit: the trace is over LEAKHUNT_REACH_LIMIT_MB (256 MiB \
unless set), which the scan would read before the program could end (LEAKHUNT_REACH=1 asks \
for it anyway)",
            );
            let_go(early);
            write_buf();
            return;
        }
        if let Some(why) = helper_denied(o) {
            push_warning(why);
            let_go(early);
            write_buf();
            return;
        }
        match early {
            Some((child, fd, id)) => (fd, id, Some((child, true))),
            None => {
                let made = take_pair(o);
                let asked = REACH_ASKS.load(Ordering::Relaxed);
                let parent =
                    (o.forked.is_some() && o.parent_path[0] != 0).then_some(&o.parent_path[..]);
                let Some((child, fd)) =
                    crate::helper::spawn(&o.path, sys::getpid(), asked, parent, None, false, made)
                else {
                    push_warning(
                        b"no heap scan at exit: its helper (leakhunt reach-helper, next to the \
library or LEAKHUNT_CLI) could not be started",
                    );
                    write_buf();
                    return;
                };
                let Some(id) = fds::ident(fd) else {
                    crate::helper::finish(child, fd);
                    return;
                };
                (fd, id, Some((child, false)))
            }
        }
    };
    // Every mapping of the tracer's own (two a thread's ring), sorted and merged, and the
    // request: in memory mapped once for every scan (a program's thousands of threads do not fit
    // a stack buffer; a range left out would be scanned as the program's roots).
    let Some((skip_ranges, body)) = reach_buffers() else {
        if let Some((child, _)) = helper {
            crate::helper::finish(child, fd);
        }
        return;
    };
    let mut n = sys::own_ranges(&mut skip_ranges[1..REACH_RANGES - 1]);
    // The bootstrap arena's unused tail (its blocks are the program's; the rest is zeros).
    n += 1;
    skip_ranges[n] = crate::real::boot_unused();
    skip_ranges[1..=n].sort_unstable();
    n = merge_ranges(&mut skip_ranges[1..=n]);
    // This thread's alternate signal stack (a handler's frames, long gone, perhaps in a heap
    // block): memcheck knows those words went dead when the handler returned, so none of them
    // is read.
    // SAFETY: stack_t is plain data; all zeros is a valid value.
    let mut ss: libc::stack_t = unsafe { core::mem::zeroed() };
    // SAFETY: sigaltstack with a null new stack only reads the current one into `ss`.
    let got = unsafe { libc::sigaltstack(core::ptr::null(), &mut ss) };
    if got == 0 && ss.ss_flags & (libc::SS_DISABLE | libc::SS_ONSTACK) == 0 && !ss.ss_sp.is_null() {
        skip_ranges[0] = (ss.ss_sp as u64, ss.ss_sp as u64 + ss.ss_size as u64);
        n += 1;
    } else {
        skip_ranges.copy_within(1..=n, 0);
    }
    // leakhunt's own threads: their stacks hold none of the program's pointers.
    let mut tids = [0u32; 2];
    let mut ntids = 0;
    for t in [
        tracer::WRITER_TID.load(Ordering::Relaxed),
        crate::side::TID.load(Ordering::Relaxed),
    ] {
        if t != 0 {
            tids[ntids] = t;
            ntids += 1;
        }
    }
    let request = |phase| reach::RequestRef {
        phase,
        snapshot: snapshot || pre_exit,
        pre_exit,
        tid: sys::gettid(),
        sp,
        skip_tids: &tids[..ntids],
        skip_ranges: &skip_ranges[..n],
    };
    flush_locked();
    let Some(len) = reach::request_body(&request(reach::ASK), body) else {
        if let Some((child, _)) = helper {
            crate::helper::finish(child, fd);
        }
        return;
    };
    push_sealed(tag::REACH, &[&body[..len]]);
    REACH_ASKS.fetch_add(1, Ordering::Relaxed);
    write_buf();
    // A helper reads the trace file: told at once that the records it waits for are there.
    let wake = || {
        if helper.is_some() {
            crate::helper::wake(fd);
        }
    };
    wake();
    let mut chunk: *mut u8 = core::ptr::null_mut();
    let mut answered = false;
    loop {
        if STATE.load(Ordering::Relaxed) != OPEN {
            break;
        }
        let mut b = [0u8; 1];
        if !recv_exact(fd, id, &mut b) {
            break;
        }
        match b[0] {
            reply::DRAIN => {
                flush_locked();
                if let Some(len) = reach::request_body(&request(reach::READY), body) {
                    push_sealed(tag::REACH, &[&body[..len]]);
                }
                write_buf();
                wake();
            }
            reply::RESULT => {
                let mut l = [0u8; 4];
                if !recv_exact(fd, id, &mut l) {
                    break;
                }
                let len = u32::from_le_bytes(l) as usize;
                if len > reach::MAX_CHUNK {
                    break;
                }
                if chunk.is_null() {
                    // One buffer for every scan (snapshots may ask many times).
                    chunk = REACH_CHUNK.load(Ordering::Acquire);
                    if chunk.is_null() {
                        chunk = sys::mmap_anon(reach::MAX_CHUNK);
                        if chunk.is_null() {
                            break;
                        }
                        REACH_CHUNK.store(chunk, Ordering::Release);
                    }
                }
                // SAFETY: `chunk` maps MAX_CHUNK bytes, `len` is at most that, and nothing else
                // uses the mapping.
                let data = unsafe { core::slice::from_raw_parts_mut(chunk, len) };
                if !recv_exact(fd, id, data) {
                    break;
                }
                push_sealed(tag::REACH_RESULT, &[data]);
                write_buf();
            }
            reply::CONTINUE => {
                answered = true;
                break;
            }
            _ => break,
        }
    }
    match helper {
        // The helper started early stays for the scans to come, the one at exit last.
        Some((child, true)) if answered && (snapshot || pre_exit) => {
            o.early = Some((child, fd, id));
        }
        Some((child, _)) => crate::helper::finish(child, fd),
        None => {}
    }
}

/// The helper's socket pair made with the trace file, if the program left both ends alone
/// (an end it took is its own now, and stays open).
fn take_pair(o: &mut Out) -> Option<(i32, i32)> {
    let (a, ia, b, ib) = o.pair.take()?;
    if fds::is(a, ia) && fds::is(b, ib) {
        return Some((a, b));
    }
    fds::close_own(a, ia);
    fds::close_own(b, ib);
    None
}

/// Why the process may not have its heap scanned by a helper now, if it may not: the helper
/// runs as the user the process runs as now, and must be let read the trace and this process's
/// memory (a worker that dropped root for `nobody` is not dumpable, and its trace is root's).
fn helper_denied(o: &Out) -> Option<&'static [u8]> {
    // SAFETY: PR_GET_DUMPABLE takes no pointer; faccessat reads a NUL-terminated path.
    let (dumpable, readable) = unsafe {
        (
            // (root's helper may read any process's memory)
            libc::prctl(libc::PR_GET_DUMPABLE) == 1 || libc::geteuid() == 0,
            libc::faccessat(
                libc::AT_FDCWD,
                o.path.as_ptr().cast(),
                libc::R_OK,
                libc::AT_EACCESS,
            ) == 0,
        )
    };
    if !dumpable {
        Some(
            b"no heap scan at exit: the process is not dumpable (it changed its user or \
group, as a daemon's worker dropping root does, or asked not to be), so its helper may not read \
its memory",
        )
    } else if !readable {
        Some(
            b"no heap scan at exit: the user the process runs as now cannot read its trace \
(it changed its user), which the helper must read",
        )
    } else {
        None
    }
}

/// With the preload alone, once the trace passes `LEAKHUNT_HELPER_EARLY_KB` (256 KiB): starts
/// the heap scan's helper now, so that it reads the trace as it grows, and at exit only the scan
/// is left to wait for (reading a trace of millions of events at exit took longer than the
/// scan). Only from the writer thread (every signal blocked; no program thread is held up),
/// once, in a process that is no fork child (those start theirs at exit, with their parent's
/// trace), and silently: the exit path says why there is no scan if there is none. Caller
/// holds LOCK.
fn start_early_helper(o: &mut Out) {
    let cfg = config::get();
    // (`child` covers fork children and adopted raw clones alike.)
    if o.early_tried
        || o.socket
        || o.child
        || !cfg.reach
        || o.sent < cfg.helper_early
        || sys::gettid() != tracer::WRITER_TID.load(Ordering::Relaxed)
    {
        return;
    }
    o.early_tried = true;
    if helper_denied(o).is_some() {
        return;
    }
    let limit = if cfg.reach_forced {
        u64::MAX
    } else {
        cfg.reach_limit
    };
    // Without the pair made with the trace file (the program took a descriptor of it), no
    // helper now: making one would take the lowest free numbers while the program runs.
    let Some(made) = take_pair(o) else {
        return;
    };
    let asked = REACH_ASKS.load(Ordering::Relaxed);
    let Some((child, fd)) = crate::helper::spawn(
        &o.path,
        sys::getpid(),
        asked,
        None,
        Some(limit),
        true,
        Some(made),
    ) else {
        return;
    };
    match fds::ident(fd) {
        Some(id) => o.early = Some((child, fd, id)),
        None => crate::helper::finish(child, fd),
    }
}

/// Asynchronous signals blocked in this thread until dropped (the synchronous ones, a fault's,
/// stay deliverable).
struct SignalsHeld(libc::sigset_t);

impl SignalsHeld {
    fn new() -> SignalsHeld {
        // SAFETY: sigset_t is plain data, filled by sigfillset/sigdelset; pthread_sigmask changes
        // this thread's mask only and stores the old one in `old`.
        unsafe {
            let mut set: libc::sigset_t = core::mem::zeroed();
            let mut old: libc::sigset_t = core::mem::zeroed();
            libc::sigfillset(&mut set);
            for s in [
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGTRAP,
                libc::SIGSYS,
            ] {
                libc::sigdelset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            SignalsHeld(old)
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores this thread's mask as it was.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, core::ptr::null_mut());
        }
    }
}

/// A `WARNING` record with `text`. Caller holds LOCK.
fn push_warning(text: &[u8]) {
    push_sealed(tag::WARNING, &[&(text.len() as u32).to_le_bytes(), text]);
}

/// Lets the CLI at the other end of `sock` attach to this process for the heap scan where Yama
/// (`kernel.yama.ptrace_scope = 1`) allows only ancestors: a daemon that detached from `leakhunt
/// run` is no longer its descendant. Only that one process (by the kernel's word on the peer, not
/// ours) is allowed; without Yama the call fails and changes nothing.
fn allow_cli_to_trace(sock: i32) {
    // SAFETY: ucred is plain data; getsockopt fills it and its length.
    let mut cred: libc::ucred = unsafe { core::mem::zeroed() };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let got = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if got == 0 && cred.pid > 0 {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PTRACER, cred.pid as libc::c_ulong, 0, 0, 0) };
    }
}

/// Reads exactly `buf.len()` bytes from the CLI on the trace socket, checking before each call
/// that the descriptor is still ours; false when the connection ended, the descriptor was taken,
/// or nothing came for a long while (the CLI is stuck: the program must not be).
fn recv_exact(fd: i32, id: fds::Ident, buf: &mut [u8]) -> bool {
    let mut at = 0;
    let mut quiet_ms = 0;
    while at < buf.len() {
        if !fds::is(fd, id) {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours.
        let r = unsafe { libc::poll(&mut p, 1, 1000) };
        if r == 0 {
            quiet_ms += 1000;
            if quiet_ms >= REACH_PATIENCE_MS {
                sys::diag("the heap scan at exit got no answer from leakhunt; going on");
                return false;
            }
            continue;
        }
        if r < 0 {
            continue;
        }
        // SAFETY: `buf[at..]` is writable; MSG_DONTWAIT since poll said there is something.
        let n = unsafe {
            libc::recv(
                fd,
                buf[at..].as_mut_ptr().cast(),
                buf.len() - at,
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return false;
        }
        if n < 0 {
            // SAFETY: errno is thread-local.
            match unsafe { *libc::__errno_location() } {
                libc::EINTR | libc::EAGAIN => continue,
                _ => return false,
            }
        }
        quiet_ms = 0;
        at += n as usize;
    }
    true
}

/// Heap scans this trace has asked for (a helper started for the next one must leave the
/// earlier ones, answered already, alone).
static REACH_ASKS: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Where a heap scan's result chunks are received (mapped at the first scan; LOCK's holder).
/// Room for every own range of the tracer and the alternate signal stack.
const REACH_RANGES: usize = sys::MAX_OWN + 2;
const REACH_BODY: usize = leakhunt_format::reach::request_len(2, REACH_RANGES);
static REACH_BUFFERS: core::sync::atomic::AtomicPtr<u8> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// The heap scan's ranges and its request's body.
type ReachBuffers = (&'static mut [(u64, u64)], &'static mut [u8]);

/// The heap scan's buffers (mapped at the first scan, kept for the next). Caller holds LOCK.
fn reach_buffers() -> Option<ReachBuffers> {
    let ranges_len = REACH_RANGES * 16;
    let mut p = REACH_BUFFERS.load(Ordering::Acquire);
    if p.is_null() {
        p = sys::mmap_anon(ranges_len + REACH_BODY);
        if p.is_null() {
            return None;
        }
        REACH_BUFFERS.store(p, Ordering::Release);
    }
    // SAFETY: the mapping holds `ranges_len + REACH_BODY` zero-initialised bytes, page-aligned,
    // used only by the LOCK holder: the ranges first (8-byte aligned pairs of u64, any bit
    // pattern valid), then the body, disjoint.
    unsafe {
        Some((
            core::slice::from_raw_parts_mut(p.cast::<(u64, u64)>(), REACH_RANGES),
            core::slice::from_raw_parts_mut(p.add(ranges_len), REACH_BODY),
        ))
    }
}

/// Merges sorted ranges that overlap or touch, in place; returns how many are left.
fn merge_ranges(r: &mut [(u64, u64)]) -> usize {
    let mut n = 0;
    for i in 0..r.len() {
        let (s, e) = r[i];
        if n > 0 && s <= r[n - 1].1 {
            r[n - 1].1 = r[n - 1].1.max(e);
        } else {
            r[n] = (s, e);
            n += 1;
        }
    }
    n
}

static REACH_CHUNK: core::sync::atomic::AtomicPtr<u8> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// How long the process waits at exit for a word from the CLI during a heap scan.
const REACH_PATIENCE_MS: u32 = 120_000;

/// Flushes everything and appends the statistics and, if known, how the process ends. From a
/// signal handler (`in_signal`), gives up rather than wait on a lock this thread may hold.
pub fn finish(exit: Option<ExitKind>, in_signal: bool) {
    let guard = if in_signal {
        LOCK.try_lock_for(2000)
    } else {
        Some(LOCK.lock())
    };
    let Some(_l) = guard else { return };
    flush_locked();
    send_title();
    push_stats();
    if let Some(k) = exit {
        push_exit(k);
    }
    write_buf();
}

/// In a fork child: forget the parent's output and unsent events; open a new trace lazily if
/// children are traced, else stop for good. The child has one thread; LOCK was taken by the
/// prepare handler in the parent and is reset here.
pub fn after_fork_child(trace: bool, adopted: bool) {
    let o = out();
    // The inherited copy of our descriptor, if the child has not taken the number for itself.
    fds::close_own(o.fd, o.id);
    // And of the parent's helper's socket: that helper answers the parent only (the child
    // starts its own at exit).
    if let Some((_, fd, id)) = o.early.take() {
        fds::close_own(fd, id);
    }
    if let Some((a, ia, b, ib)) = o.pair.take() {
        fds::close_own(a, ia);
        fds::close_own(b, ib);
    }
    // The parent's trace file, still named in our copy of its state.
    if trace && !o.socket {
        o.parent_path = o.path;
    } else {
        o.parent_path[0] = 0;
    }
    o.fd = -1;
    o.forked = None;
    // Made without fork handlers: its trace will say so (see `ADOPTED_NOTE`).
    o.adopted = adopted && trace;
    o.child = trace;
    REACH_ASKS.store(0, Ordering::Relaxed);
    o.sent = 0;
    o.len = 0;
    o.modules_sent = 0;
    o.names_sent = 0;
    EPOCHS.store(0, Ordering::Relaxed);
    ring::for_each(|r| {
        r.clear();
        if r.state.load(Ordering::Relaxed) != FREE {
            r.state.store(ORPHAN, Ordering::Relaxed);
        }
    });
    STATE.store(if trace { CLOSED } else { OFF }, Ordering::Release);
    LOCK.reset();
}

pub fn is_off() -> bool {
    STATE.load(Ordering::Relaxed) >= FAILED
}
