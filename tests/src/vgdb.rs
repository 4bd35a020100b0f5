//! memcheck's own answer to "who points at this block", asked through vgdb while the program
//! runs, so that a test can cross-check the first hop of leakhunt's retention path.
//!
//! The protocol with the program: whenever it wants a block looked up it prints a line
//! `WHO_POINTS_AT 0x<addr>` to stdout (flushed), then blocks reading its stdin up to a newline
//! (`tests/fixtures/who_points.c` has an `ask()` that does both). The helper waits until every
//! thread of the process sleeps in a system call (`/proc/<pid>/task/*/{stat,syscall}`), so that
//! the answer does not depend on where the program happened to be, then runs
//!
//! ```text
//! vgdb --vgdb-prefix=<private dir>/vgdb --pid=<valgrind pid> who_points_at 0x<addr>
//! ```
//!
//! and writes a newline to the program's stdin to let it go on. When the program's stdout ends,
//! the helper closes its stdin and waits for valgrind, which must exit 0.
//!
//! valgrind runs as [`crate::memcheck`] plus `--vgdb=yes --vgdb-prefix=<dir>/vgdb`: the program
//! runs freely (no `--vgdb-error`); vgdb reaches a valgrind blocked in a system call by ptrace
//! (after its default `--max-invoke-ms=100`), so ptrace must be allowed (root here; Yama's
//! `ptrace_scope` 0 elsewhere). The FIFOs live in a temporary directory of their own, so tests
//! running in parallel never talk to each other's valgrind. Nothing waits longer than
//! [`TIMEOUT`] in all: past it valgrind (and vgdb) are killed and the helper panics with what it
//! saw.
//!
//! The text parsed (memcheck 3.19, `MC_(who_points_at)` and `pp_addrinfo`), one holder per
//! `*0x... points at` or `tid N register R pointing at` line, described by the lines after it:
//!
//! ```text
//! ==1234== Searching for pointers to 0x100a40040
//! ==1234== *0x10c068 points at 0x100a40040
//!  Address 0x10c068 is 8 bytes inside data symbol "g_registry"
//! ==1234== *0x100a40058 points at 0x100a401e0
//!  Address 0x100a40058 is 24 bytes inside a block of size 64 alloc'd
//! ==1234==    at 0x1008465EF: calloc (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
//! ==1234==    by 0x1091B5: fill (who_points.c:29)
//! ==1234== *0x1fff000638 points at 0x100a403c0
//!  Address 0x1fff000638 is on thread 1's stack
//!  in frame #2, created by main (who_points.c:48)
//! ==1234== tid 1 register RBX pointing at 0x100a403c0
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most one [`who_points_at`] call waits, valgrind's start and exit included.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// One answer of memcheck's `who_points_at`: where a pointer to the block lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Inside a global: the data symbol's name and the pointer's offset in it (`Address 0x10c068
    /// is 8 bytes inside data symbol "g_registry"`).
    Global { symbol: String, offset: u64 },
    /// Inside another heap block: that block's start, size, and the pointer's offset in it
    /// (`Address 0x100a40058 is 24 bytes inside a block of size 64 alloc'd`).
    Block { start: u64, size: u64, offset: u64 },
    /// On a thread's stack: the thread as memcheck numbers them (1 is the main thread), and the
    /// function whose frame holds it when memcheck says (`Address 0x1fff000638 is on thread 1's
    /// stack` / `in frame #2, created by main (who_points.c:48)`).
    Stack {
        thread: u32,
        function: Option<String>,
    },
    /// In a register of a thread (`tid 1 register RBX pointing at 0x100a403c0`).
    Register { thread: u32, register: String },
    /// Anything else, as memcheck phrased it: its description lines, trimmed, joined by `\n`
    /// (`Address 0x... is in a rw- anonymous segment`).
    Other(String),
}

/// Runs `program args` under memcheck with vgdb on and answers each `WHO_POINTS_AT 0x<addr>`
/// line the program prints (see the module's documentation for the protocol), in order: each
/// address asked with the holders memcheck found for it (pointers to its first byte only).
/// Panics when valgrind or vgdb fail, when valgrind exits non-zero, or past [`TIMEOUT`].
pub fn who_points_at(program: &Path, args: &[&str]) -> Vec<(u64, Vec<Holder>)> {
    let deadline = Instant::now() + TIMEOUT;
    let dir = private_dir();
    let prefix = dir.join("vgdb");
    let stderr_path = dir.join("valgrind.stderr");
    let child = crate::memcheck()
        .arg("--vgdb=yes")
        .arg(format!("--vgdb-prefix={}", prefix.display()))
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .expect("valgrind is installed on every machine here");
    let mut run = Session {
        child,
        dir,
        stderr_path,
        transcript: Vec::new(),
    };
    let pid = run.child.id();
    let mut stdin: Option<ChildStdin> = run.child.stdin.take();
    let stdout = run.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut answers = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                run.fail("timed out waiting for the program's output", &answers)
            }
        };
        run.transcript.push(line.clone());
        let Some(hex) = line.trim().strip_prefix("WHO_POINTS_AT ") else {
            continue;
        };
        let addr = parse_hex(hex.trim())
            .unwrap_or_else(|| run.fail(&format!("bad address in {line:?}"), &answers));
        if !wait_blocked(pid, deadline) {
            run.fail("timed out waiting for the program to block", &answers);
        }
        let text = match run_vgdb(&prefix, pid, addr, deadline) {
            Ok(text) => text,
            Err(e) => run.fail(&e, &answers),
        };
        if !text
            .lines()
            .any(|l| strip_pid(l).starts_with("Searching for pointers"))
        {
            run.fail(&format!("vgdb gave no answer:\n{text}"), &answers);
        }
        answers.push((addr, parse_who_points_at(&text)));
        let resumed = stdin
            .as_mut()
            .map(|s| s.write_all(b"\n").and_then(|()| s.flush()));
        if let Some(Err(e)) = resumed {
            run.fail(&format!("cannot resume the program: {e}"), &answers);
        }
    }
    drop(stdin);
    let status = run
        .wait(deadline)
        .unwrap_or_else(|| run.fail("timed out waiting for valgrind to exit", &answers));
    if !status.success() {
        run.fail(&format!("valgrind exited with {status}"), &answers);
    }
    answers
}

/// The holders in vgdb's answer to `who_points_at` (memcheck's text; see the module's
/// documentation), in memcheck's order.
pub fn parse_who_points_at(text: &str) -> Vec<Holder> {
    // Each holder: its heading line, then the description lines up to the next heading.
    let mut groups: Vec<(Option<Holder>, Vec<&str>)> = Vec::new();
    for raw in text.lines() {
        let line = strip_pid(raw);
        if line.starts_with('*')
            && (line.contains(" points at ") || line.contains(" interior points at "))
        {
            groups.push((None, Vec::new()));
        } else if let Some(rest) = line.strip_prefix("tid ") {
            // "tid 1 register RBX pointing at 0x..." / "... interior pointing N bytes inside ..."
            let mut w = rest.split_whitespace();
            let thread = w.next().and_then(|t| t.parse().ok());
            let register = (w.next() == Some("register")).then(|| w.next()).flatten();
            match (thread, register) {
                (Some(thread), Some(register)) => groups.push((
                    Some(Holder::Register {
                        thread,
                        register: register.to_string(),
                    }),
                    Vec::new(),
                )),
                _ => groups.push((Some(Holder::Other(line.trim().to_string())), Vec::new())),
            }
        } else if line.starts_with("Searching for pointers") {
            continue;
        } else if let Some((None, lines)) = groups.last_mut() {
            if !line.trim().is_empty() {
                lines.push(line.trim());
            }
        }
    }
    groups
        .into_iter()
        .map(|(h, lines)| h.unwrap_or_else(|| describe(&lines)))
        .collect()
}

/// A holder from memcheck's description of the pointer's address.
fn describe(lines: &[&str]) -> Holder {
    let other = || Holder::Other(lines.join("\n"));
    let Some(first) = lines.first() else {
        return other();
    };
    // "Address 0x... is ..."
    let Some(rest) = first
        .strip_prefix("Address ")
        .and_then(|r| r.split_once(" is "))
    else {
        return other();
    };
    let (addr, what) = (parse_hex(rest.0), rest.1);
    let num = |s: &str| s.replace(',', "").parse::<u64>().ok();
    // "N bytes inside data symbol \"S\""
    if let Some((n, sym)) = what.split_once(" bytes inside data symbol ") {
        if let (Some(offset), Some(symbol)) = (
            num(n),
            sym.strip_prefix('"').and_then(|s| s.strip_suffix('"')),
        ) {
            return Holder::Global {
                symbol: symbol.to_string(),
                offset,
            };
        }
    }
    // "N bytes inside a block of size M alloc'd" (memcheck writes 1,024 for 1024)
    if let Some((n, size)) = what.split_once(" bytes inside a block of size ") {
        if let (Some(addr), Some(offset), Some(size)) =
            (addr, num(n), size.strip_suffix(" alloc'd").and_then(num))
        {
            return Holder::Block {
                start: addr - offset,
                size,
                offset,
            };
        }
    }
    // "on thread 1's stack" (helgrind writes "#1"), then maybe
    // "in frame #2, created by main (who_points.c:48)"
    if let Some(t) = what
        .strip_prefix("on thread ")
        .and_then(|t| t.strip_suffix("'s stack"))
    {
        if let Ok(thread) = t.trim_start_matches('#').parse() {
            let function = lines.get(1).and_then(|l| {
                let (_, f) = l.strip_prefix("in frame #")?.split_once(", created by ")?;
                let f = f.rsplit_once(" (").map_or(f, |(f, _)| f);
                Some(f.to_string())
            });
            return Holder::Stack { thread, function };
        }
    }
    other()
}

/// A line without valgrind's `==1234== ` prefix.
fn strip_pid(line: &str) -> &str {
    line.strip_prefix("==")
        .and_then(|r| r.split_once("=="))
        .filter(|(pid, _)| pid.bytes().all(|b| b.is_ascii_digit()))
        .map_or(line, |(_, rest)| rest.strip_prefix(' ').unwrap_or(rest))
}

fn parse_hex(s: &str) -> Option<u64> {
    let s = s.trim();
    let h = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    u64::from_str_radix(h, 16).ok()
}

fn private_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "leakhunt-vgdb-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits until every thread of `pid` sleeps in a system call, twice in a row 20 ms apart (the
/// program then sits in its read, not on its way there). Where /proc cannot tell, waits 300 ms.
/// False past the deadline.
fn wait_blocked(pid: u32, deadline: Instant) -> bool {
    let snapshot = || -> Option<Vec<String>> {
        let mut v = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let t = t.ok()?.path();
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            let sys = std::fs::read_to_string(t.join("syscall")).ok()?;
            v.push(format!("{state} {}", sys.trim()));
        }
        v.sort();
        Some(v)
    };
    let blocked = |v: &[String]| {
        v.iter().all(|s| {
            let mut w = s.split_whitespace();
            matches!(w.next(), Some("S" | "D"))
                && w.next().and_then(|n| n.parse::<u32>().ok()).is_some()
        })
    };
    let mut last: Option<Vec<String>> = None;
    while Instant::now() < deadline {
        let Some(now) = snapshot() else {
            std::thread::sleep(Duration::from_millis(300));
            return Instant::now() < deadline;
        };
        if blocked(&now) && last.as_ref() == Some(&now) {
            return true;
        }
        last = blocked(&now).then_some(now);
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `vgdb --vgdb-prefix=P --pid=PID who_points_at 0xADDR`: its standard output.
fn run_vgdb(prefix: &Path, pid: u32, addr: u64, deadline: Instant) -> Result<String, String> {
    let out = prefix.with_file_name(format!("vgdb-{addr:x}.out"));
    let err = prefix.with_file_name(format!("vgdb-{addr:x}.err"));
    let mut cmd = Command::new("vgdb");
    cmd.arg(format!("--vgdb-prefix={}", prefix.display()))
        .arg(format!("--pid={pid}"))
        .arg("who_points_at")
        .arg(format!("{addr:#x}"))
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap());
    let mut vgdb = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let status = wait_until(&mut vgdb, deadline);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let errs = std::fs::read_to_string(&err).unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("{cmd:?} exited with {s}:\n{text}{errs}")),
        None => {
            let _ = vgdb.kill();
            let _ = vgdb.wait();
            Err(format!("{cmd:?} timed out:\n{text}{errs}"))
        }
    }
}

/// The child's exit status, or None past the deadline.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// valgrind running the program: killed, and its directory removed, however the call ends.
struct Session {
    child: Child,
    dir: PathBuf,
    stderr_path: PathBuf,
    transcript: Vec<String>,
}

impl Session {
    fn wait(&mut self, deadline: Instant) -> Option<ExitStatus> {
        wait_until(&mut self.child, deadline)
    }

    fn fail(&mut self, why: &str, answers: &[(u64, Vec<Holder>)]) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        panic!(
            "who_points_at: {why}\nprogram's stdout so far:\n{}\nanswers so far: {answers:#?}\nvalgrind's stderr:\n{stderr}",
            self.transcript.join("\n")
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_holder() {
        let text = "\
==7== Searching for pointers to 0x100a403c0
==7== *0x10c068 points at 0x100a403c0
 Address 0x10c068 is 8 bytes inside data symbol \"g_registry\"
==7== *0x100a40058 points at 0x100a403c0
 Address 0x100a40058 is 1,032 bytes inside a block of size 2,048 alloc'd
==7==    at 0x1008465EF: calloc (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==7==    by 0x1091B5: fill (who_points.c:29)
==7== *0x1fff000638 points at 0x100a403c0
 Address 0x1fff000638 is on thread 1's stack
 in frame #2, created by main (who_points.c:48)
==7== *0x1fff000630 points at 0x100a403c0
 Address 0x1fff000630 is on thread 2's stack
==7== *0x4a5b000 points at 0x100a403c0
 Address 0x4a5b000 is in a rw- anonymous segment
==7== tid 1 register RBX pointing at 0x100a403c0
";
        assert_eq!(
            parse_who_points_at(text),
            [
                Holder::Global {
                    symbol: "g_registry".into(),
                    offset: 8
                },
                Holder::Block {
                    start: 0x100a40058 - 1032,
                    size: 2048,
                    offset: 1032
                },
                Holder::Stack {
                    thread: 1,
                    function: Some("main".into())
                },
                Holder::Stack {
                    thread: 2,
                    function: None
                },
                Holder::Other("Address 0x4a5b000 is in a rw- anonymous segment".into()),
                Holder::Register {
                    thread: 1,
                    register: "RBX".into()
                },
            ]
        );
        assert_eq!(
            parse_who_points_at("==7== Searching for pointers to 0x10\n"),
            []
        );
    }
}
