//! The heap scan at exit without `leakhunt run`: the exiting process starts `leakhunt
//! reach-helper`, which reads its trace file and holds and reads its memory as `run` would, and
//! talks to it over a socket pair exactly as `run` talks over the trace socket.
//!
//! The helper is started so that the program cannot tell. A `clone` with no exit signal starts
//! a go-between that shares our memory (CLONE_VM, CLONE_VFORK: no fork handlers run, nothing is
//! copied) and starts the helper the same way, notes its pid and exits; the process reaps the
//! go-between (`__WALL`), and the helper, an orphan, is reparented: its end is never the
//! program's SIGCHLD nor a child its `waitpid(-1)` could reap (an exec resets a process's exit
//! signal to SIGCHLD, so the helper must not be our child). Raw system calls only in both
//! children; an empty environment (the helper is never traced itself), its end of the socket as
//! its stdin, /dev/null as stdout and stderr, none of the program's descriptors. Where the
//! kernel's Yama allows only ancestors to trace, the process lets its helper attach
//! (`PR_SET_PTRACER`).
//!
//! Its path: `LEAKHUNT_CLI`, else `leakhunt` next to this library (as built, and as installed by
//! the README's steps). Both are made absolute at start, before the program can change its
//! directory.

use core::ffi::{c_char, c_int, c_void};

const PATH_LEN: usize = 4096;

/// The helper's path and this library's (absolute, NUL-terminated; empty: unknown).
static mut HELPER: [u8; PATH_LEN] = [0; PATH_LEN];
static mut LIB: [u8; PATH_LEN] = [0; PATH_LEN];

/// Writes `dir/name` or `name` made absolute against the current directory into `out`.
fn absolute(path: &[u8], out: &mut [u8; PATH_LEN]) -> bool {
    let mut n = 0;
    if path.first() != Some(&b'/') {
        // SAFETY: getcwd writes at most PATH_LEN bytes, NUL-terminated, into `out`.
        if unsafe { libc::getcwd(out.as_mut_ptr().cast(), PATH_LEN) }.is_null() {
            return false;
        }
        n = out.iter().position(|&b| b == 0).unwrap_or(PATH_LEN);
        if n + 1 >= PATH_LEN {
            return false;
        }
        out[n] = b'/';
        n += 1;
    }
    if n + path.len() + 1 > PATH_LEN {
        return false;
    }
    out[n..n + path.len()].copy_from_slice(path);
    out[n + path.len()] = 0;
    true
}

/// Finds the helper and this library's path (at initialisation: one thread, the directory the
/// program started in).
pub fn note_paths(cli: Option<&core::ffi::CStr>) {
    // SAFETY: written once here, before any exit path reads them.
    let (helper, lib) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(HELPER),
            &mut *core::ptr::addr_of_mut!(LIB),
        )
    };
    let Some(own) = crate::env::own_path() else {
        return;
    };
    if !absolute(own.to_bytes(), lib) {
        lib[0] = 0;
        return;
    }
    match cli {
        Some(c) => {
            if !absolute(c.to_bytes(), helper) {
                helper[0] = 0;
            }
        }
        None => {
            let len = lib.iter().position(|&b| b == 0).unwrap_or(0);
            let dir = lib[..len].iter().rposition(|&b| b == b'/').unwrap_or(0);
            let name = b"/leakhunt\0";
            if dir + name.len() <= PATH_LEN {
                helper[..dir].copy_from_slice(&lib[..dir]);
                helper[dir..dir + name.len()].copy_from_slice(name);
            }
        }
    }
}

/// What the children need, prepared by the parent (they only make system calls).
struct Exec {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    sock: c_int,
    /// The helper's stack (its top), and where the go-between leaves its pid.
    stack: *mut c_void,
    helper_pid: c_int,
}

extern "C" fn go_between(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `Exec` (suspended until this go-between exits); glibc's
    // clone only makes the system call (the helper runs `child` on its own stack), and the pid is
    // written into the parent's memory, which this child shares.
    unsafe {
        let e = arg as *mut Exec;
        let pid = libc::clone(child, (*e).stack, libc::CLONE_VM | libc::CLONE_VFORK, arg);
        (*e).helper_pid = pid;
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `Exec`, alive until this child has exec'd or exited (the
    // parent is suspended meanwhile, CLONE_VFORK); raw system calls only: no libc state, no lock,
    // no allocation, none of this library's hooks.
    unsafe {
        let e = &*(arg as *const Exec);
        // Its own descriptor table (no CLONE_FILES): the socket as stdin, /dev/null as stdout
        // and stderr (nothing of the helper's may reach the program's output), none of the
        // program's other descriptors (a pipe it holds would keep the program's reader waiting).
        let stdin = libc::syscall(libc::SYS_dup3, e.sock, 0, 0);
        // (Opened after: with 0 taken, /dev/null lands on 1 or above.)
        let null = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/dev/null".as_ptr(),
            libc::O_RDWR,
        );
        if stdin == 0
            && null >= 1
            && (null == 1 || libc::syscall(libc::SYS_dup3, null, 1, 0) == 1)
            && (null == 2 || libc::syscall(libc::SYS_dup3, null, 2, 0) == 2)
        {
            libc::syscall(libc::SYS_close_range, 3u32, !0u32, 0u32);
            libc::syscall(libc::SYS_execve, e.path, e.argv, e.envp);
        }
        libc::syscall(libc::SYS_exit, 127);
    }
    127
}

/// A socket pair for a helper: (ours, the helper's), high descriptors, close-on-exec. Making
/// it takes the two lowest free numbers for a moment: made while the program runs, a program
/// that closed 0 and opens a file could find its file on 1 (so the helper started early uses a
/// pair made with the trace file, at the same moment).
pub fn pair() -> Option<(c_int, c_int)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: socketpair fills two descriptors of ours.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return None;
    }
    Some((
        crate::fds::place_high(fds[0]),
        crate::fds::place_high(fds[1]),
    ))
}

/// The helper, started: its pid and our end of the socket pair (a high descriptor,
/// close-on-exec). `None` (and a word on stderr unless `quiet`) when it cannot be.
/// `parent`: a fork child's parent's trace file, where the helper finds the inherited blocks.
/// `early`: started while the program runs (see `out::start_early_helper`): the helper reads the
/// trace as it grows, answers every scan the trace asks for until the one at exit, and stops
/// reading past `limit` bytes of trace. `made`: the socket pair to use ([`pair`], made
/// earlier; else one is made now), both ends ours until this returns, the helper's end closed
/// (here as always) when it does.
pub fn spawn(
    trace: &[u8],
    pid: u32,
    answered: u32,
    parent: Option<&[u8]>,
    early: Option<u64>,
    quiet: bool,
    made: Option<(c_int, c_int)>,
) -> Option<(libc::pid_t, c_int)> {
    // SAFETY: read-only after `note_paths`.
    let (helper, lib) = unsafe { (&*core::ptr::addr_of!(HELPER), &*core::ptr::addr_of!(LIB)) };
    if helper[0] == 0 || trace.first().is_none_or(|&b| b == 0) {
        close_pair(made);
        return None;
    }
    // An orphan is reparented to the nearest subreaper: if that is this process (or it is pid 1),
    // the helper would end as its child after all.
    let mut reaper: c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes an int.
    unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut reaper as *mut c_int) };
    if reaper != 0 || pid == 1 {
        if !quiet {
            crate::sys::diag(
                "no heap scan at exit: this process adopts orphans (a subreaper or pid 1)",
            );
        }
        close_pair(made);
        return None;
    }
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(helper.as_ptr().cast(), libc::X_OK) } != 0 {
        if quiet {
            close_pair(made);
            return None;
        }
        let mut msg = [0u8; 200];
        let path = &helper[..helper.iter().position(|&b| b == 0).unwrap_or(0)];
        let mut n = 0;
        for part in [
            b"no heap scan at exit: cannot run ".as_slice(),
            path,
            b" (LEAKHUNT_CLI names leakhunt)".as_slice(),
        ] {
            let take = part.len().min(msg.len() - n);
            msg[n..n + take].copy_from_slice(&part[..take]);
            n += take;
        }
        crate::sys::diag(core::str::from_utf8(&msg[..n]).unwrap_or("no heap scan at exit"));
        close_pair(made);
        return None;
    }
    let (ours, theirs) = made.or_else(pair)?;
    let mut digits = [0u8; 20];
    let mut pid_arg = [0u8; 21];
    let d = crate::sys::fmt_u64(&mut digits, pid as u64);
    pid_arg[..d.len()].copy_from_slice(d);
    let mut answered_arg = [0u8; 21];
    let d = crate::sys::fmt_u64(&mut digits, answered as u64);
    answered_arg[..d.len()].copy_from_slice(d);
    let null = core::ptr::null();
    let (lib_flag, lib_arg) = if lib[0] != 0 {
        (c"--lib".as_ptr(), lib.as_ptr().cast())
    } else {
        (null, null)
    };
    let (parent_flag, parent_arg) = match parent {
        Some(p) => (c"--parent-trace".as_ptr(), p.as_ptr().cast()),
        None => (null, null),
    };
    let mut limit_digits = [0u8; 21];
    let (early_flag, limit_arg) = match early {
        Some(limit) => {
            let d = crate::sys::fmt_u64(&mut digits, limit);
            limit_digits[..d.len()].copy_from_slice(d);
            (c"--early-limit".as_ptr(), limit_digits.as_ptr().cast())
        }
        None => (null, null),
    };
    // (A null ends the list: the optional pairs go last, the present ones first.)
    let mut argv: [*const c_char; 15] = [
        helper.as_ptr().cast(),
        c"reach-helper".as_ptr(),
        c"--trace".as_ptr(),
        trace.as_ptr().cast(),
        c"--pid".as_ptr(),
        pid_arg.as_ptr().cast(),
        c"--answered".as_ptr(),
        answered_arg.as_ptr().cast(),
        null,
        null,
        null,
        null,
        null,
        null,
        null,
    ];
    let mut at = 8;
    for (flag, arg) in [
        (lib_flag, lib_arg),
        (parent_flag, parent_arg),
        (early_flag, limit_arg),
    ] {
        if !flag.is_null() {
            argv[at] = flag;
            argv[at + 1] = arg;
            at += 2;
        }
    }
    let envp: [*const c_char; 1] = [core::ptr::null()];
    const STACK: usize = 64 * 1024;
    // Not `sys::mmap_anon`: these are unmapped below, and the tracer's own ranges are for ever.
    // SAFETY: a fresh anonymous mapping.
    let stacks = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            2 * STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stacks == libc::MAP_FAILED {
        close(ours);
        close(theirs);
        return None;
    }
    let stacks = stacks.cast::<u8>();
    let mut e = Exec {
        path: helper.as_ptr().cast(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        sock: theirs,
        // SAFETY: inside the mapping just made (its top).
        stack: unsafe { stacks.add(2 * STACK) }.cast(),
        helper_pid: -1,
    };
    // SAFETY: the go-between runs on the lower stack with `e`, which outlives it (CLONE_VFORK:
    // this call returns once it exited); no exit signal, so it is reaped by pid with __WALL.
    let between = unsafe {
        libc::clone(
            go_between,
            stacks.add(STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK,
            &mut e as *mut Exec as *mut c_void,
        )
    };
    if between > 0 {
        let mut status = 0;
        // SAFETY: reaps our own child, by pid (it has exited: CLONE_VFORK).
        unsafe { libc::waitpid(between, &mut status, libc::__WALL) };
    }
    // SAFETY: neither child uses the stacks any more (one exited, the other exec'd or exited).
    unsafe { libc::munmap(stacks.cast(), 2 * STACK) };
    close(theirs);
    // SAFETY: written by the go-between, which has exited.
    let helper_pid = unsafe { core::ptr::read_volatile(&e.helper_pid) };
    if between <= 0 || helper_pid <= 0 {
        close(ours);
        return None;
    }
    // SAFETY: prctl with integer arguments (fails harmlessly without Yama).
    unsafe { libc::prctl(libc::PR_SET_PTRACER, helper_pid as libc::c_ulong, 0, 0, 0) };
    Some((helper_pid, ours))
}

/// Closes our end: the helper, which is not our child, ends when it sees that.
pub fn finish(_helper: libc::pid_t, ours: c_int) {
    close(ours);
}

/// Whether the helper closed its end (it ended).
pub fn gone(ours: c_int) -> bool {
    let mut p = libc::pollfd {
        fd: ours,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd of ours, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Tells the helper that the trace has grown by a record it waits for (a scan's), so that it
/// reads it now rather than at its next look. A full socket or a gone helper is no matter.
pub fn wake(ours: c_int) {
    // SAFETY: one byte from a local into our own socket, non-blocking, with no SIGPIPE.
    unsafe {
        libc::send(
            ours,
            b"w".as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// Closes both ends of a pair of ours ([`pair`]).
pub fn close_pair(p: Option<(c_int, c_int)>) {
    if let Some((a, b)) = p {
        close(a);
        close(b);
    }
}

fn close(fd: c_int) {
    // SAFETY: one of our own descriptors, made in `spawn`.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}
