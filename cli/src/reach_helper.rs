//! `leakhunt reach-helper`: the heap scan at exit for a process traced by the preload alone (no
//! `leakhunt run` to ask). The exiting process starts this helper (no SIGCHLD, an empty
//! environment) with one end of a socket pair as its stdin, then holds in its exit path as it does for `run`:
//! its trace file says what is live, the socket carries the scan's replies.
//!
//! The helper reads the trace file as it grows, from its start (the process flushed everything
//! before it started the helper) up to the process's `REACH` records, with the same [`Scanner`]
//! `run` uses: held threads, roots, classification. The process echoes the outcome into its own
//! trace, so `leakhunt report` gives the kinds as `run` does.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leakhunt_format::reach;

use crate::process::{ForkBook, Process};
use crate::scan::Scanner;

/// How long the trace may stay without growing before the helper gives up (the process writes
/// its records within milliseconds of each reply), unless it was started early: then it waits
/// as long as the process lives.
const PATIENCE: Duration = Duration::from_secs(30);

/// Reads a file that another process is still writing: at its end, waits for more until `done`,
/// or until the process closes its end of `sock` (it ended, or took the descriptor). A byte on
/// `sock` says the process wrote a record the helper waits for: it reads on at once.
struct Tail {
    file: std::fs::File,
    done: Arc<AtomicBool>,
    quiet_since: Option<Instant>,
    sock: Option<UnixStream>,
    /// Started early: no patience limit while the process lives.
    early: bool,
    /// Bytes past which it reads no more, and read so far.
    limit: u64,
    read: u64,
}

impl Tail {
    fn new(file: std::fs::File, done: Arc<AtomicBool>) -> Tail {
        Tail {
            file,
            done,
            quiet_since: None,
            sock: None,
            early: false,
            limit: u64::MAX,
            read: 0,
        }
    }

    /// Waits up to `wait` for a word from the process; false when it is gone.
    fn wait(&mut self, wait: Duration) -> bool {
        let Some(sock) = &self.sock else {
            std::thread::sleep(wait);
            return true;
        };
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        let t = Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        if !matches!(poll(&mut fds, Some(&t)), Ok(n) if n > 0) {
            return true;
        }
        let mut b = [0u8; 64];
        match (&*sock).read(&mut b) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.read >= self.limit {
                return Ok(0);
            }
            let n = self.file.read(buf)?;
            if n > 0 {
                self.quiet_since = None;
                self.read += n as u64;
                return Ok(n);
            }
            if self.done.load(Ordering::Acquire) {
                return Ok(0);
            }
            let since = *self.quiet_since.get_or_insert_with(Instant::now);
            let quiet = since.elapsed();
            if quiet > PATIENCE && !self.early {
                return Ok(0);
            }
            // The process writes its next records within microseconds of a reply while it
            // waits in its exit path (and says so on the socket): look again soon at first,
            // then every millisecond, or every 100 ms while a program started early runs.
            let most = if self.early {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(1)
            };
            if !self.wait((quiet / 4).clamp(Duration::from_micros(50), most)) {
                return Ok(0);
            }
        }
    }
}

/// Runs the helper: its stdin is its end of the socket pair, `pid` the process, `answered` the
/// scans its trace asked for before (at snapshots: their records are left alone), `lib` the
/// preload library (its mappings are no roots).
///
/// `parent`: a fork child's parent's trace file: read beside the child's, so that the child's
/// scan knows the blocks it inherited at the fork (the parent's fork point, through a
/// [`ForkBook`] as under `leakhunt run`).
///
/// `early_limit`: started while the program runs (once its trace passed a size): it reads the
/// trace as it grows, answers every scan asked for (snapshots') until the one at exit, and
/// stops past this many bytes, past which the process does not ask at exit.
pub fn run(
    trace: PathBuf,
    pid: u32,
    answered: u32,
    lib: Option<PathBuf>,
    parent: Option<PathBuf>,
    early_limit: Option<u64>,
) -> anyhow::Result<()> {
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    if rustix::net::sockopt::socket_peercred(&sock).is_err() {
        anyhow::bail!("reach-helper: stdin is not the socket a traced process gives its helper");
    }
    let replies = Arc::new(Mutex::new(Some(sock.try_clone()?)));
    let file = std::fs::File::open(&trace)?;
    let done = Arc::new(AtomicBool::new(false));
    let mut p = Process::new();
    if let Some(parent) = parent.and_then(|t| std::fs::File::open(t).ok()) {
        let book = Arc::new(ForkBook::default());
        p.fork_book = Some(book.clone());
        let done = done.clone();
        std::thread::spawn(move || {
            let mut pp = Process::new();
            pp.fork_book = Some(book);
            let _ = Process::read_stream_with(pp, Tail::new(parent, done));
        });
    }
    let mut scanner = Scanner::new(
        pid,
        replies,
        lib.into_iter().collect(),
        leakhunt_reach::Heuristics::ALL,
        true,
    )
    .into_hook();
    let finished = done.clone();
    let mut asks = 0;
    let early = early_limit.is_some();
    if early {
        // Reading beside the running program, it yields to it (and to its writer thread, whose
        // delay would hold the program up) where they compete for a core; at exit the program
        // waits, and what is left to read is the little written since.
        let _ = rustix::process::setpriority_process(None, 10);
    }
    p.on_reach = Some(Box::new(move |p: &Process, r: &reach::Request| {
        if r.phase == reach::ASK {
            asks += 1;
        }
        if asks <= answered {
            return;
        }
        scanner(p, r);
        // Started early, it goes on after a snapshot's scan.
        if r.phase == reach::READY && !(early && r.snapshot) {
            finished.store(true, Ordering::Release);
        }
    }));
    let mut tail = Tail::new(file, done.clone());
    tail.sock = Some(sock.try_clone()?);
    tail.early = early;
    tail.limit = early_limit.unwrap_or(u64::MAX);
    let (_p, _err) = Process::read_stream_with(p, tail);
    // The outcome goes out from a thread of the scanner's: the process closes its end once it
    // has read it all.
    if done.load(Ordering::Acquire) {
        let _ = sock.set_read_timeout(Some(PATIENCE));
        let mut b = [0u8; 64];
        while matches!((&sock).read(&mut b), Ok(n) if n > 0) {}
    }
    Ok(())
}
