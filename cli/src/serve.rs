//! The trace socket of `leakhunt run`: who may connect, and how a process's stream survives the
//! program taking its connection away.
//!
//! Every connection starts with a hello ([`leakhunt_format::hello`]) carrying the run's secret
//! token, the process's pid and start time, and, for a connection that resumes a stream, how many
//! trace bytes went before. A connection is taken only when its hello comes in time, holds the
//! token, names the pid the kernel reports for the peer (SO_PEERCRED) with our uid, and that
//! process is the program or (with children traced) one of its descendants; anything else is
//! refused, closed at once and noted in the report, and never delays the end of the run.
//!
//! A stream is read by one thread from a chain of connections: when the program closes the
//! preload's socket (daemons close every descriptor), the preload connects again and the reader
//! goes on with the new connection exactly where the old one stopped.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use leakhunt_format::hello::{self, Hello};

/// How long a new connection may take to say who it is (the preload sends its hello at once).
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// After the program ended, a connection still silent after this is not a process of ours.
const HELLO_TIMEOUT_AFTER_END: Duration = Duration::from_millis(300);

/// What the run knows about who may connect.
pub struct Gate {
    pub token: [u8; 16],
    /// The program's pid.
    pub program: u32,
    /// Descendants of the program may connect too.
    pub children: bool,
    /// Programs they exec are traced too (and may connect late).
    pub exec_children: bool,
}

/// A stream taken: the hello of its first connection, and the bytes of all its connections.
pub struct Accepted {
    pub hello: Hello,
    pub source: StreamSource,
    /// Set by the reader when the stream's exit record was read: its end needs no waiting.
    pub ended: Arc<AtomicBool>,
}

/// State shared by the acceptor, the handshakes and the main thread.
#[derive(Default)]
pub struct Shared {
    /// The program has exited.
    pub stop: AtomicBool,
    /// Connections whose hello is still awaited.
    pub handshakes: AtomicUsize,
    /// Streams being read.
    pub active: AtomicUsize,
    /// Streams taken so far.
    pub streams: AtomicUsize,
    /// Continuation channels of the streams, by (pid, start time).
    conts: Mutex<HashMap<(u32, u64), Cont>>,
    /// Connections refused, as messages for the report.
    pub refused: Mutex<Vec<String>>,
    /// Set last: the acceptor returns at its next connection.
    quit: AtomicBool,
    last_activity: Mutex<Option<Instant>>,
}

impl Shared {
    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Time since a stream last started or a handshake last ended.
    pub fn quiet_for(&self) -> Duration {
        self.last_activity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::MAX, |t| t.elapsed())
    }

    fn refuse(&self, why: String) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(why);
    }
}

/// A connection that resumes a stream, and the trace bytes its process sent before it.
type Resumed = (UnixStream, u64);

/// The continuation channel of one stream. Each connection's handshake runs on a thread of its
/// own, so a resuming connection can be admitted before the first connection of its stream (the
/// program closed the first one right after it was made): it waits in the channel until the
/// first connection takes the receiving end.
struct Cont {
    tx: Sender<Resumed>,
    /// Still here while the stream's first connection has not been taken.
    rx: Option<Receiver<Resumed>>,
}

impl Cont {
    fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Cont { tx, rx: Some(rx) }
    }
}

/// Reads a process's stream from its first connection, then from each connection that resumes it.
pub struct StreamSource {
    cur: UnixStream,
    rx: Receiver<Resumed>,
    /// Trace bytes read so far (on every connection).
    read: u64,
    /// Bytes of the current connection to drop (already read on an earlier one).
    skip: u64,
    pid: u32,
    ended: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// Bytes a resumed connection said went before but never arrived (cannot happen with a
    /// stream socket; counted, never hidden).
    pub missing: Arc<std::sync::atomic::AtomicU64>,
    /// The current connection, for replies to the process (its heap scan at exit).
    pub replies: leakhunt::scan::Replies,
}

impl StreamSource {
    /// The next connection of this stream, or `None` when the stream is over: its exit record
    /// was read, or its process is gone and nothing more came.
    fn next_conn(&mut self) -> Option<Resumed> {
        loop {
            // The exit record read: no connection follows (a handshake may still be handing
            // one over, which is waited for). Without this the end of every stream waited
            // 10 ms here first.
            if self.ended.load(Ordering::Acquire)
                && self.shared.handshakes.load(Ordering::SeqCst) == 0
            {
                return self.rx.try_recv().ok();
            }
            match self.rx.recv_timeout(Duration::from_millis(10)) {
                Ok(c) => return Some(c),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.ended.load(Ordering::Acquire) || crate_is_dead(self.pid) {
                        // A handshake may still be handing one over.
                        if self.shared.handshakes.load(Ordering::SeqCst) == 0 {
                            return self.rx.try_recv().ok();
                        }
                    }
                }
            }
        }
    }
}

fn crate_is_dead(pid: u32) -> bool {
    leakhunt::recover::is_dead(pid)
}

impl Read for StreamSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = match self.cur.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A reset connection ends like a closed one.
                Err(_) => 0,
            };
            if n == 0 {
                let Some((conn, offset)) = self.next_conn() else {
                    return Ok(0);
                };
                *self.replies.lock().unwrap_or_else(|e| e.into_inner()) = conn.try_clone().ok();
                self.cur = conn;
                if offset > self.read {
                    self.missing
                        .fetch_add(offset - self.read, Ordering::Relaxed);
                    self.read = offset;
                }
                self.skip = self.read - offset;
                continue;
            }
            if self.skip > 0 {
                let drop = (n as u64).min(self.skip) as usize;
                self.skip -= drop as u64;
                if drop == n {
                    continue;
                }
                buf.copy_within(drop..n, 0);
                self.read += (n - drop) as u64;
                return Ok(n - drop);
            }
            self.read += n as u64;
            return Ok(n);
        }
    }
}

/// Whether `pid` is `ancestor` or descends from it (following parent pids through /proc).
/// `None` when the chain cannot be read: the process is gone, or a zombie (it exited, and its
/// parent, if it exited too, is no longer its parent).
fn descends_from(pid: u32, ancestor: u32) -> Option<bool> {
    let mut p = pid;
    for _ in 0..64 {
        if p == ancestor {
            return Some(true);
        }
        if p <= 1 {
            return Some(false);
        }
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(") ")?;
        let mut fields = rest.split_whitespace();
        if p == pid && matches!(fields.next(), Some("Z" | "X")) {
            return None;
        }
        p = rest.split_whitespace().nth(1)?.parse().ok()?;
    }
    Some(false)
}

fn command_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| leakhunt_format::split_cmdline(&b))
        .filter(|a| !a.is_empty())
        .map(|a| format!(" ({})", leakhunt::report::shell_words(&a)))
        .unwrap_or_default()
}

/// Reads the hello of a new connection within its time, or says why not.
fn read_hello(conn: &mut UnixStream, shared: &Shared) -> Result<Hello, String> {
    let start = Instant::now();
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut b = [0u8; hello::LEN];
    let mut got = 0;
    while got < b.len() {
        let limit = if shared.stop.load(Ordering::SeqCst) {
            HELLO_TIMEOUT_AFTER_END
        } else {
            HELLO_TIMEOUT
        };
        if start.elapsed() > limit {
            return Err(format!(
                "it sent {got} bytes in {:.1} s, not a leakhunt hello",
                start.elapsed().as_secs_f64()
            ));
        }
        match conn.read(&mut b[got..]) {
            Ok(0) => return Err(format!("it closed the connection after {got} bytes")),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("reading its hello: {e}")),
        }
    }
    let _ = conn.set_read_timeout(None);
    hello::decode(&b).map_err(str::to_string)
}

/// Checks a connection and its hello against the gate; `Err` says why it is refused.
fn admit(conn: &UnixStream, h: &Hello, gate: &Gate) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(conn)
        .map_err(|e| format!("its credentials cannot be read: {e}"))?;
    let (pid, uid) = (cred.pid.as_raw_nonzero().get() as u32, cred.uid.as_raw());
    if uid != rustix::process::geteuid().as_raw() {
        return Err(format!("it runs as uid {uid}, not as this run's user"));
    }
    if h.token != gate.token {
        return Err("it does not hold this run's token".into());
    }
    if h.pid != pid {
        return Err(format!("it claims pid {} but is pid {pid}", h.pid));
    }
    match descends_from(pid, gate.program) {
        Some(true) if pid == gate.program || gate.children => Ok(()),
        Some(true) => Err("it is a child of the program, and children are not traced".into()),
        // Not (or no longer: a daemon's grandchild is reparented when its parent exits) below
        // the program: it must have been started with this run's environment.
        Some(false) if gate.children && started_with_token(pid, &gate.token) => Ok(()),
        Some(false) => Err("it was not started by this run".into()),
        // Gone already (it said all it had to say and exited, its parent reaped it): the token
        // is its proof.
        None => Ok(()),
    }
}

/// Whether any live process of ours was started with this run's token in its environment.
fn any_started_with_token(token: &[u8; 16]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id()
            && e.metadata().is_ok_and(|m| m.uid() == me)
            && started_with_token(pid, token)
    })
}

/// Whether process `pid` was started with this run's token in its environment (as the
/// program's descendants are: forks share the initial environment, and exec'd images get it
/// with children traced). `/proc/PID/environ` shows the environment a process started with.
fn started_with_token(pid: u32, token: &[u8; 16]) -> bool {
    let want = format!("LEAKHUNT_TOKEN={}", hex(token));
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == want.as_bytes()))
}

/// Accepts connections until [`finish`] is called; each is checked on a thread of its own, and
/// each stream taken is handed to `on_stream` (on that thread, which then reads it).
pub fn accept_loop(
    listener: UnixListener,
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    on_stream: Arc<dyn Fn(Accepted) + Send + Sync>,
) {
    let me = std::process::id();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if shared.quit.load(Ordering::SeqCst) {
            // Connections made before our wake-up one are handled; the wake-up ends the loop.
            let peer = rustix::net::sockopt::socket_peercred(&conn)
                .map(|c| c.pid.as_raw_nonzero().get() as u32)
                .unwrap_or(0);
            if peer == me {
                return;
            }
        }
        shared.handshakes.fetch_add(1, Ordering::SeqCst);
        let (gate, shared, on_stream) = (gate.clone(), shared.clone(), on_stream.clone());
        std::thread::spawn(move || {
            let peer = rustix::net::sockopt::socket_peercred(&conn)
                .map(|c| c.pid.as_raw_nonzero().get() as u32)
                .unwrap_or(0);
            let checked = read_hello(&mut conn, &shared).and_then(|h| {
                admit(&conn, &h, &gate)?;
                Ok(h)
            });
            let h = match checked {
                Ok(h) => h,
                Err(why) => {
                    // Our own wake-up connection says nothing and needs no note.
                    if peer != me {
                        shared.refuse(format!(
                            "refused a trace connection from pid {peer}{}: {why}",
                            command_of(peer)
                        ));
                    }
                    drop(conn);
                    shared.touch();
                    shared.handshakes.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            };
            let key = (h.pid, h.start_ns);
            if h.kind == hello::RESUME {
                let tx = shared
                    .conts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_insert_with(Cont::new)
                    .tx
                    .clone();
                if tx.send((conn, h.offset)).is_err() {
                    shared.refuse(format!(
                        "refused a trace connection from pid {}{}: its stream was already over",
                        h.pid,
                        command_of(h.pid)
                    ));
                }
                shared.touch();
                shared.handshakes.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let rx = {
                let mut conts = shared.conts.lock().unwrap_or_else(|e| e.into_inner());
                let cont = conts.entry(key).or_insert_with(Cont::new);
                match cont.rx.take() {
                    Some(rx) => rx,
                    None => {
                        // A second first connection of one process: a new stream.
                        *cont = Cont::new();
                        cont.rx.take().expect("a new channel has its receiver")
                    }
                }
            };
            let ended = Arc::new(AtomicBool::new(false));
            let replies = Arc::new(std::sync::Mutex::new(conn.try_clone().ok()));
            let source = StreamSource {
                replies,
                cur: conn,
                rx,
                read: 0,
                skip: 0,
                pid: h.pid,
                ended: ended.clone(),
                shared: shared.clone(),
                missing: Default::default(),
            };
            shared.active.fetch_add(1, Ordering::SeqCst);
            shared.streams.fetch_add(1, Ordering::SeqCst);
            shared.touch();
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            // The stream counts as read when this thread is done with it, even if reading it
            // panicked: `run` must never wait for a reader that is gone.
            struct Done(Arc<Shared>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.touch();
                    self.0.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _done = Done(shared.clone());
            on_stream(Accepted {
                hello: h,
                source,
                ended,
            });
        });
    }
}

/// After the program ended: waits until every stream has been read and no handshake is pending
/// (with children traced, also `grace` without any connection, for children that connect late,
/// and as long as traced descendants live on), then stops the acceptor once it has taken every
/// connection made before that point. `give_up` (the user's Ctrl-C) ends the wait at once;
/// returns how many streams were still being read then.
pub fn finish(
    shared: &Shared,
    sock: &Path,
    gate: &Gate,
    acceptor: std::thread::JoinHandle<()>,
    give_up: &dyn Fn() -> bool,
) -> usize {
    shared.stop.store(true, Ordering::SeqCst);
    let started = Instant::now();
    // With children traced: a little while for one that connects late, and as long as a
    // process started with this run's environment lives (a daemon's grandchild included).
    let grace = Duration::from_millis(if gate.exec_children { 200 } else { 0 });
    let mut holders_checked: Option<(Instant, bool)> = None;
    let mut descendants_alive = || {
        if !gate.children {
            return false;
        }
        match holders_checked {
            Some((at, alive)) if at.elapsed() < Duration::from_millis(50) => alive,
            _ => {
                let alive = any_started_with_token(&gate.token);
                holders_checked = Some((Instant::now(), alive));
                alive
            }
        }
    };
    let mut wait_idle = |grace: Duration| loop {
        let idle = shared.active.load(Ordering::SeqCst) == 0
            && shared.handshakes.load(Ordering::SeqCst) == 0;
        if idle && (grace.is_zero() || shared.quiet_for() >= grace) && !descendants_alive() {
            return true;
        }
        if give_up() {
            return false;
        }
        // Promptly at first; a long-lived traced daemon is waited for without spinning.
        let nap = if started.elapsed() < Duration::from_millis(500) {
            1
        } else {
            20
        };
        std::thread::sleep(Duration::from_millis(nap));
    };
    if !wait_idle(grace) {
        return shared.active.load(Ordering::SeqCst);
    }
    shared.quit.store(true, Ordering::SeqCst);
    // Queued behind every connection made before it: the acceptor hands those on, then returns.
    let _ = UnixStream::connect(sock);
    let _ = acceptor.join();
    if !wait_idle(Duration::ZERO) {
        return shared.active.load(Ordering::SeqCst);
    }
    // Resuming connections whose stream never began: said, never read.
    let orphans: Vec<u32> = shared
        .conts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, c)| c.rx.as_ref().is_some_and(|rx| !rx.is_empty()))
        .map(|(&(pid, _), _)| pid)
        .collect();
    for pid in orphans {
        shared.refuse(format!(
            "refused a trace connection from pid {pid}{}: it resumes a stream this run never had",
            command_of(pid)
        ));
    }
    0
}

/// 16 random bytes for the run's token.
pub fn new_token() -> std::io::Result<[u8; 16]> {
    let mut t = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A file name next to `dest` for a stream's bytes while it is being read.
pub fn partial_name(dest: &Path, n: usize) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(format!(".partial-{}-{n}", std::process::id()));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn hello_of(kind: u32, token: [u8; 16], offset: u64) -> [u8; hello::LEN] {
        hello::encode(&Hello {
            kind,
            token,
            pid: std::process::id(),
            start_ns: 42,
            offset,
        })
    }

    /// The program closes the preload's first connection at once and the preload resumes on a
    /// second one, whose handshake ends first: the stream still reads both, in order.
    #[test]
    fn a_resume_admitted_before_its_first_connection_waits_for_it() {
        let dir = std::env::temp_dir().join(format!("lh-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let token = [7u8; 16];
        let gate = Arc::new(Gate {
            token,
            program: std::process::id(),
            children: false,
            exec_children: false,
        });
        let shared = Arc::new(Shared::default());
        let (got_tx, got_rx) = crossbeam_channel::unbounded();
        let on_stream: Arc<dyn Fn(Accepted) + Send + Sync> = Arc::new(move |mut a: Accepted| {
            a.ended.store(true, Ordering::Release);
            let mut all = Vec::new();
            a.source.read_to_end(&mut all).unwrap();
            got_tx.send(all).unwrap();
        });
        let acceptor = {
            let (gate, shared) = (gate.clone(), shared.clone());
            std::thread::spawn(move || accept_loop(listener, gate, shared, on_stream))
        };
        let mut first = UnixStream::connect(&sock).unwrap();
        let mut second = UnixStream::connect(&sock).unwrap();
        second
            .write_all(&hello_of(hello::RESUME, token, 5))
            .unwrap();
        second.write_all(b"world").unwrap();
        drop(second);
        // The resume is parked by now; then the first connection says who it is.
        std::thread::sleep(Duration::from_millis(200));
        first.write_all(&hello_of(hello::NEW, token, 0)).unwrap();
        first.write_all(b"hello").unwrap();
        drop(first);
        let all = got_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(std::str::from_utf8(&all).unwrap(), "helloworld");
        assert_eq!(finish(&shared, &sock, &gate, acceptor, &|| false), 0);
        let refused = shared.refused.lock().unwrap().clone();
        assert!(refused.is_empty(), "{refused:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
