//! `leakhunt run`'s heap scan at exit (memcheck's leak check): the process waits in the
//! tracer's exit path and asks ([`leakhunt_format::reach`]); this side holds the process's other
//! threads still (ptrace: no signal reaches the program, a system call in progress is resumed
//! where it was), tells the process to send what those threads recorded meanwhile, then reads
//! the roots and the live blocks from the process's memory (process_vm_readv), classifies the
//! blocks with [`leakhunt_reach`], lets the threads go, and hands the outcome to the process,
//! which writes it into its trace: a kept trace reports the same kinds as the live run.
//!
//! Roots, as memcheck takes them: every readable and writable mapping, except the allocator's
//! heap (the brk heap, glibc's arenas, any mapping that holds a live block: blocks are scanned
//! when reached, never as roots), the tracer's own memory (the preload library, its rings and
//! buffers, its writer thread), device mappings; each thread's stack from 128 bytes below its
//! stack pointer (the exiting thread's from where the program's frames end) and its registers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use leakhunt_format::reach::{self, reply, Entry, Outcome, Request};
use leakhunt_reach::{Block, Heuristics, Mapping, Memory, Scan};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::process::Process;

/// Where replies to the process go: its current connection (a resumed stream replaces it).
pub type Replies = Arc<Mutex<Option<UnixStream>>>;

/// Bytes below a stack pointer that the ABI lets a function use without moving it (amd64).
const RED_ZONE: u64 = 128;
/// glibc's non-main arenas are heaps of this size, aligned to it (64-bit).
const ARENA_HEAP: u64 = 64 << 20;

/// Answers one process's requests for a heap scan.
pub struct Scanner {
    pid: u32,
    replies: Replies,
    /// Paths whose mappings are the tracer's (the preload library, the ring directory).
    own_paths: Vec<PathBuf>,
    heuristics: Heuristics,
    /// Threads held, with a signal they were stopped with (to deliver on release).
    held: Vec<(Pid, Option<Signal>)>,
    started: Option<Instant>,
    /// Why the scan cannot be made, found while holding.
    failed: Option<String>,
}

impl Scanner {
    pub fn new(
        pid: u32,
        replies: Replies,
        own_paths: Vec<PathBuf>,
        heuristics: Heuristics,
    ) -> Scanner {
        Scanner {
            pid,
            replies,
            own_paths,
            heuristics,
            held: Vec::new(),
            started: None,
            failed: None,
        }
    }

    /// The process's hook ([`Process::on_reach`]).
    pub fn into_hook(mut self) -> crate::process::ReachHook {
        Box::new(move |p: &Process, r: &Request| self.on(p, r))
    }

    fn on(&mut self, p: &Process, r: &Request) {
        if r.phase == reach::ASK {
            self.started = Some(Instant::now());
            self.failed = self.hold(r.tid).err();
            self.send(&[reply::DRAIN]);
            return;
        }
        let outcome = match self.failed.take() {
            Some(why) => Err(why),
            None => self.scan(p, r),
        };
        let threads = self.held.len() as u32;
        self.release();
        let held_us = self
            .started
            .take()
            .map_or(0, |t| t.elapsed().as_micros() as u64);
        let chunks = match outcome {
            Ok(mut o) => {
                o.threads = threads;
                o.held_us = held_us;
                chunks(o)
            }
            Err(why) => vec![Outcome {
                last: true,
                unavailable: true,
                note: why,
                held_us,
                ..Outcome::default()
            }],
        };
        // The process echoes each chunk into its stream while this thread is the stream's only
        // reader: the chunks go out from a thread of their own, or both sides would wait for
        // the other to read once the socket buffers fill.
        let replies = self.replies.clone();
        let sender = std::thread::Builder::new()
            .name("reach-result".into())
            .spawn(move || {
                let mut msgs: Vec<Vec<u8>> = chunks
                    .iter()
                    .map(|c| {
                        let body = reach::outcome_body(c);
                        let mut msg = Vec::with_capacity(body.len() + 5);
                        msg.push(reply::RESULT);
                        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
                        msg.extend_from_slice(&body);
                        msg
                    })
                    .collect();
                msgs.push(vec![reply::CONTINUE]);
                let mut g = replies.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = g.as_mut() {
                    for m in msgs {
                        if s.write_all(&m).is_err() {
                            break;
                        }
                    }
                }
            });
        if sender.is_err() {
            // No thread: the process goes on when the connection ends, without the result.
            self.send(&[reply::CONTINUE]);
        }
    }

    fn send(&self, bytes: &[u8]) {
        let mut g = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_mut() {
            let _ = s.write_all(bytes);
        }
    }

    /// Stops every thread of the process but `waiting` (which runs the tracer's exit path),
    /// including threads started meanwhile.
    fn hold(&mut self, waiting: u32) -> Result<(), String> {
        for _ in 0..100 {
            let mut new = 0;
            for tid in tasks(self.pid)? {
                if tid == waiting || self.held.iter().any(|h| h.0.as_raw() as u32 == tid) {
                    continue;
                }
                let t = Pid::from_raw(tid as i32);
                match ptrace::seize(t, ptrace::Options::empty()) {
                    Ok(()) => {}
                    // Gone meanwhile.
                    Err(nix::errno::Errno::ESRCH) => continue,
                    Err(e) => return Err(cannot_hold(e)),
                }
                new += 1;
                if ptrace::interrupt(t).is_err() {
                    let _ = ptrace::detach(t, None);
                    continue;
                }
                match waitpid(t, Some(WaitPidFlag::__WALL)) {
                    Ok(WaitStatus::PtraceEvent(..)) => self.held.push((t, None)),
                    // Stopped as a signal reached it first: the signal is delivered on release.
                    Ok(WaitStatus::Stopped(_, sig)) => self.held.push((t, Some(sig))),
                    Ok(WaitStatus::PtraceSyscall(_)) => self.held.push((t, None)),
                    // Exited meanwhile.
                    _ => {}
                }
            }
            if new == 0 {
                return Ok(());
            }
        }
        Err("its threads kept starting new ones while they were being held".into())
    }

    fn release(&mut self) {
        for (t, sig) in self.held.drain(..) {
            let _ = ptrace::detach(t, sig);
        }
    }

    fn scan(&mut self, p: &Process, r: &Request) -> Result<Outcome, String> {
        let mut blocks: Vec<Block> = p
            .live
            .iter()
            .map(|(&start, l)| Block {
                start,
                size: l.size,
            })
            .collect();
        blocks.sort_unstable();
        let maps = read_maps(self.pid)?;
        let mut masked = r.skip_ranges.clone();
        masked.sort_unstable();
        let mem = Remote {
            pid: Pid::from_raw(self.pid as i32),
            maps: &maps,
            cache: Mutex::new(Cache::default()),
            masked,
        };
        let mut scan = Scan::new(&blocks, self.heuristics).map_err(|u| {
            format!(
                "the trace's live blocks overlap at {:#x}: the trace is inconsistent",
                blocks[u.at].start
            )
        })?;
        scan.allocator_offset(glibc_next_chunk);
        // Threads: the exiting one from where the program's frames end; the others from below
        // their stack pointers, with their registers. The tracer's own threads not at all.
        let mut stacks: Vec<(u64, u64)> = Vec::new();
        let mut own_stacks: Vec<(u64, u64)> = Vec::new();
        if let Some(m) = find_map(&maps, r.sp) {
            stacks.push((r.sp, m.end));
        }
        let mut regs_roots = Vec::new();
        for (t, _) in &self.held {
            let Ok(regs) = ptrace::getregs(*t) else {
                continue;
            };
            let sp = regs.rsp;
            let own = r.skip_tids.contains(&(t.as_raw() as u32));
            let Some(m) = find_map(&maps, sp) else {
                continue;
            };
            if own {
                own_stacks.push((m.start, m.end));
                continue;
            }
            stacks.push((sp.saturating_sub(RED_ZONE).max(m.start), m.end));
            regs_roots.extend([
                regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp,
                regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ]);
        }
        let stack_maps: Vec<(u64, u64)> = stacks
            .iter()
            .chain(&own_stacks)
            .filter_map(|&(s, _)| find_map(&maps, s).map(|m| (m.start, m.end)))
            .collect();
        let mut skip: Vec<(u64, u64)> = r.skip_ranges.clone();
        skip.extend(&stack_maps);
        for (i, m) in maps.iter().enumerate() {
            if !(m.read && m.write)
                || self.is_own(m)
                || (m.path.starts_with("/dev/") && m.path != "/dev/zero")
            {
                continue;
            }
            for part in outside_heap(&maps, i, &blocks) {
                for (s, e) in subtract(part, &skip) {
                    scan.root_range(&mem, s, e);
                }
            }
        }
        for (s, e) in stacks {
            for (s, e) in subtract((s, e), &r.skip_ranges) {
                scan.root_range(&mem, s, e);
            }
        }
        for w in regs_roots {
            scan.root_word(&mem, w);
        }
        let o = scan.finish(&mem);
        if std::env::var_os("LEAKHUNT_DEBUG_REACH").is_some() {
            for (i, b) in blocks.iter().enumerate() {
                let via = o.via[i];
                let place = match via {
                    leakhunt_reach::Via::Root(a) => find_map(&maps, a)
                        .map(|m| format!("{:#x}-{:#x} {}", m.start, m.end, m.path))
                        .unwrap_or_default(),
                    leakhunt_reach::Via::Block(j) => {
                        let p = blocks[j as usize];
                        let mut words = vec![0u64; (p.size / 8) as usize];
                        let n = mem.read(p.start, &mut words);
                        let hits: Vec<String> = words[..n]
                            .iter()
                            .enumerate()
                            .filter(|(_, &w)| w >= b.start && w < b.start + b.size.max(1))
                            .map(|(k, &w)| format!("[{}]={:#x}(+{})", k * 8, w, w - b.start))
                            .collect();
                        format!("from {:#x}+{}: {}", p.start, p.size, hits.join(" "))
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "reach: {:#x}+{} {:?} via {:?} {place} (exit sp {:#x})",
                    b.start,
                    b.size,
                    o.kind[i],
                    via,
                    r.sp
                );
            }
        }
        let entries = blocks
            .iter()
            .enumerate()
            .filter(|&(i, _)| {
                o.kind[i] != leakhunt_reach::Kind::Reachable || o.heuristic[i].is_some()
            })
            .map(|(i, b)| Entry {
                addr: b.start,
                kind: o.kind[i] as u8,
                heuristic: o.heuristic[i].map_or(reach::NO_HEURISTIC, |h| h as u8),
                indirect: o.indirect_bytes[i],
            })
            .collect();
        Ok(Outcome {
            last: true,
            blocks: blocks.len() as u64,
            words: o.words_scanned,
            entries,
            ..Outcome::default()
        })
    }

    fn is_own(&self, m: &Map) -> bool {
        !m.path.is_empty()
            && self
                .own_paths
                .iter()
                .any(|o| Path::new(&m.path).starts_with(o))
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.release();
    }
}

/// Splits an outcome into records that fit [`reach::MAX_CHUNK`].
fn chunks(mut o: Outcome) -> Vec<Outcome> {
    let per = (reach::MAX_CHUNK - 64 - o.note.len()) / reach::ENTRY_LEN;
    // The rest of the outcome without its entries, for each chunk (cloning the whole outcome per
    // chunk copied every entry once a chunk: seconds for 5 M entries).
    let entries = std::mem::take(&mut o.entries);
    let mut out: Vec<Outcome> = entries
        .chunks(per.max(1))
        .map(|c| Outcome {
            last: false,
            entries: c.to_vec(),
            ..o.clone()
        })
        .collect();
    if out.is_empty() {
        out.push(o);
    }
    if let Some(l) = out.last_mut() {
        l.last = true;
    }
    out
}

fn cannot_hold(e: nix::errno::Errno) -> String {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| format!(" (kernel.yama.ptrace_scope is {})", s.trim()))
        .unwrap_or_default();
    format!("its threads could not be held still: ptrace: {e}{scope}")
}

fn tasks(pid: u32) -> Result<Vec<u32>, String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot list its threads: {e}"))?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Map {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// The file or pseudo-name (`[heap]`, `[stack]`), empty for anonymous memory.
    pub path: String,
}

pub fn parse_maps(text: &str) -> Vec<Map> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let (range, perms) = (f.next()?, f.next()?);
            let (_off, _dev, _ino) = (f.next()?, f.next()?, f.next()?);
            let path = f.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            let p = perms.as_bytes();
            Some(Map {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                read: p.first() == Some(&b'r'),
                write: p.get(1) == Some(&b'w'),
                exec: p.get(2) == Some(&b'x'),
                path,
            })
        })
        .collect()
}

fn read_maps(pid: u32) -> Result<Vec<Map>, String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|t| parse_maps(&t))
        .map_err(|e| format!("cannot read its memory map: {e}"))
}

fn find_map(maps: &[Map], addr: u64) -> Option<&Map> {
    let i = maps.partition_point(|m| m.start <= addr).checked_sub(1)?;
    let m = &maps[i];
    (addr < m.end).then_some(m)
}

/// Where glibc malloc's own pointers land in a block of `size` bytes (64-bit): the header of
/// the next chunk, which starts 16 bytes before the next block, at the chunk's size (the
/// request plus its 8-byte header, rounded up to 16, at least 32) less 16.
fn glibc_next_chunk(size: u64) -> Option<u64> {
    Some((size.checked_add(8 + 15)? & !15).max(32) - 16)
}

/// The allocator's memory, never a root: the brk heap, a mapping holding a live block, and
/// glibc's non-main arenas (anonymous, aligned to their 64 MiB size, the rest of which is
/// reserved without access).
fn is_heap(maps: &[Map], i: usize, blocks: &[Block]) -> bool {
    let m = &maps[i];
    if m.path == "[heap]" {
        return true;
    }
    let first = blocks.partition_point(|b| b.start < m.start);
    if blocks.get(first).is_some_and(|b| b.start < m.end) {
        return true;
    }
    m.path.is_empty()
        && m.start.is_multiple_of(ARENA_HEAP)
        && (m.end - m.start == ARENA_HEAP
            || maps.get(i + 1).is_some_and(|n| {
                n.start == m.end
                    && !n.read
                    && !n.write
                    && n.path.is_empty()
                    && n.end == m.start + ARENA_HEAP
            }))
}

/// The parts of mapping `i` that are not the allocator's: none of an allocator heap
/// ([`is_heap`]), but all of an anonymous mapping around glibc's mmapped chunks except their
/// pages. The kernel merges a chunk's mapping with an adjacent anonymous one of the program's
/// (CPython's arenas, say), whose words are roots like any other.
fn outside_heap(maps: &[Map], i: usize, blocks: &[Block]) -> Vec<(u64, u64)> {
    let m = &maps[i];
    let first = blocks.partition_point(|b| b.start < m.start);
    let inside = &blocks[first..first + blocks[first..].partition_point(|b| b.start < m.end)];
    if inside.is_empty() {
        return if is_heap(maps, i, blocks) {
            Vec::new()
        } else {
            vec![(m.start, m.end)]
        };
    }
    // Only mmapped chunks (each alone on its pages: its header at a page start) leave the rest
    // of their mapping to the program; anything else there makes it all the allocator's.
    const PAGE: u64 = 4096;
    let mmapped = |b: &Block| b.start.saturating_sub(16).is_multiple_of(PAGE);
    if m.path == "[heap]" || !inside.iter().all(mmapped) || is_heap(maps, i, &[]) {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let mut at = m.start;
    for b in inside {
        let s = b.start.saturating_sub(16);
        let e = (b.start + b.size).next_multiple_of(PAGE).min(m.end);
        if s > at {
            parts.push((at, s));
        }
        at = at.max(e);
    }
    if at < m.end {
        parts.push((at, m.end));
    }
    parts
}

/// `range` less every range of `holes`.
fn subtract(range: (u64, u64), holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut parts = vec![range];
    for &(hs, he) in holes {
        let mut next = Vec::with_capacity(parts.len() + 1);
        for (s, e) in parts {
            if he <= s || hs >= e {
                next.push((s, e));
                continue;
            }
            if hs > s {
                next.push((s, hs));
            }
            if he < e {
                next.push((he, e));
            }
        }
        parts = next;
    }
    parts
}

/// Bytes of one cached window of the process's memory.
const WINDOW: u64 = 64 << 10;
/// Windows cached (direct-mapped by address).
const WINDOWS: usize = 512;

/// A cached window: its start, its bytes, and the part of them read, `[lo, hi)` (a window may
/// begin or end in unreadable memory).
type Window = (u64, Vec<u8>, usize, usize);

#[derive(Default)]
struct Cache {
    slots: Vec<Option<Window>>,
}

/// The traced process's memory, read through a cache of windows.
struct Remote<'m> {
    pid: Pid,
    maps: &'m [Map],
    cache: Mutex<Cache>,
    /// Ranges read as zeros: the tracer's own memory, a thread's alternate signal stack (dead
    /// words, even inside a heap block). Sorted by start.
    masked: Vec<(u64, u64)>,
}

impl Remote<'_> {
    /// Reads `buf[from..]` from the window at `base`: as much as is readable from there on.
    fn fill(&self, base: u64, buf: &mut [u8], from: usize) -> usize {
        let mut got = from;
        while got < buf.len() {
            let mut local = [std::io::IoSliceMut::new(&mut buf[got..])];
            let remote = [nix::sys::uio::RemoteIoVec {
                base: (base + got as u64) as usize,
                len: WINDOW as usize - got,
            }];
            match nix::sys::uio::process_vm_readv(self.pid, &mut local, &remote) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    }
}

impl Memory for Remote<'_> {
    fn read(&self, addr: u64, out: &mut [u64]) -> usize {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.slots.is_empty() {
            c.slots = vec![None; WINDOWS];
        }
        let mut done = 0;
        while done < out.len() {
            let a = addr + done as u64 * 8;
            let base = a & !(WINDOW - 1);
            let off = (a - base) as usize;
            let slot = ((base / WINDOW) as usize) % WINDOWS;
            let fresh = match &c.slots[slot] {
                Some((b, _, lo, hi)) => *b != base || off < *lo || off + 8 > *hi,
                None => true,
            };
            if fresh {
                // From the page of `a` on: what lies before it may be unmapped.
                let lo = off & !4095;
                let mut bytes = vec![0u8; WINDOW as usize];
                let hi = self.fill(base, &mut bytes, lo);
                c.slots[slot] = Some((base, bytes, lo, hi));
            }
            let Some((_, bytes, lo, hi)) = &c.slots[slot] else {
                break;
            };
            if off < *lo || off + 8 > *hi {
                break;
            }
            let avail = ((*hi - off) / 8).min(out.len() - done);
            for (k, o) in out[done..done + avail].iter_mut().enumerate() {
                let at = off + k * 8;
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[at..at + 8]);
                *o = u64::from_le_bytes(w);
            }
            done += avail;
        }
        drop(c);
        // Masked words read as zeros.
        let end = addr + done as u64 * 8;
        let first = self.masked.partition_point(|m| m.1 <= addr);
        for &(ms, me) in self.masked[first..].iter().take_while(|m| m.0 < end) {
            let from = ms.max(addr);
            let to = me.min(end);
            let (i, j) = (
                ((from - addr) / 8) as usize,
                ((to - addr).div_ceil(8)) as usize,
            );
            out[i..j.min(done)].fill(0);
        }
        done
    }

    fn mapping(&self, addr: u64) -> Option<Mapping> {
        find_map(self.maps, addr).map(|m| Mapping {
            start: m.start,
            end: m.end,
            readable: m.read,
            executable: m.exec,
            file: m.path.starts_with('/'),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_goes_in_chunks_each_with_its_own_entries() {
        let per = (reach::MAX_CHUNK - 64 - 4) / reach::ENTRY_LEN;
        let entries: Vec<Entry> = (0..2 * per as u64 + 1)
            .map(|i| Entry {
                addr: i * 16,
                kind: 3,
                heuristic: reach::NO_HEURISTIC,
                indirect: i,
            })
            .collect();
        let o = Outcome {
            blocks: 7,
            note: "note".into(),
            entries: entries.clone(),
            ..Outcome::default()
        };
        let c = chunks(o);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.iter().map(|c| c.entries.len()).collect::<Vec<_>>(),
            [per, per, 1]
        );
        assert_eq!(
            c.iter().map(|c| c.last).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert!(c.iter().all(|c| c.note == "note" && c.blocks == 7));
        let all: Vec<Entry> = c.into_iter().flat_map(|c| c.entries).collect();
        assert_eq!(all, entries);
        let one = chunks(Outcome::default());
        assert_eq!(one.len(), 1);
        assert!(one[0].last && one[0].entries.is_empty());
    }

    #[test]
    fn maps_parse_and_heaps_are_recognised() {
        let text = "\
555555554000-555555556000 r--p 00000000 08:01 123 /usr/bin/prog
555555756000-555555777000 rw-p 00000000 00:00 0                          [heap]
7ffff0000000-7ffff0021000 rw-p 00000000 00:00 0 
7ffff0021000-7ffff4000000 ---p 00000000 00:00 0 
7ffff7dd0000-7ffff7dd2000 rw-p 00000000 00:00 0 
7ffff7dd2000-7ffff7dd3000 rw-p 00000000 00:00 0 
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0                          [stack]
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].path, "/usr/bin/prog");
        assert!(maps[0].read && !maps[0].write && !maps[0].exec);
        assert_eq!(maps[2].path, "");
        assert_eq!(maps[6].path, "[stack]");
        let blocks = [Block {
            start: 0x7ffff7dd2010,
            size: 32,
        }];
        let heap: Vec<bool> = (0..maps.len())
            .map(|i| is_heap(&maps, i, &blocks))
            .collect();
        assert_eq!(heap, [false, true, true, false, false, true, false]);
        let outside: Vec<_> = (0..maps.len())
            .map(|i| outside_heap(&maps, i, &blocks))
            .collect();
        assert_eq!(outside[1], []);
        assert_eq!(outside[4], [(0x7ffff7dd0000, 0x7ffff7dd2000)]);
        assert_eq!(outside[5], [], "a chunk alone on its mapping");
        // A pool of the program's merged with a large block's own mapping: the pool is a root,
        // the chunk's pages are not.
        let merged = parse_maps("7ffff7a00000-7ffff7b41000 rw-p 00000000 00:00 0 \n");
        let big = [Block {
            start: 0x7ffff7b00010,
            size: 256 << 10,
        }];
        assert_eq!(
            outside_heap(&merged, 0, &big),
            [(0x7ffff7a00000, 0x7ffff7b00000)]
        );
        // Small blocks there (not alone on their pages): the allocator's, all of it.
        let small = [Block {
            start: 0x7ffff7b00100,
            size: 64,
        }];
        assert_eq!(outside_heap(&merged, 0, &small), []);
        assert_eq!(
            find_map(&maps, 0x7ffff0000fff).map(|m| m.start),
            Some(0x7ffff0000000)
        );
        assert_eq!(find_map(&maps, 0x555555556000), None);
    }

    #[test]
    fn subtract_cuts_holes() {
        assert_eq!(
            subtract((0, 100), &[(10, 20), (50, 200)]),
            [(0, 10), (20, 50)]
        );
        assert_eq!(subtract((0, 100), &[(0, 100)]), []);
        assert_eq!(subtract((0, 100), &[(200, 300)]), [(0, 100)]);
    }
}
