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
    /// Names globals' roots (their symbols group a global's words into one root).
    sym: leakhunt_symbolizer::Symbolizer,
    /// Keep the heap graph for retention paths and retained sizes.
    retention: bool,
}

/// What the retention paths need from a scan once the threads are let go: the graph, and what
/// was read of the threads and their stacks while they were held.
struct Held {
    blocks: Vec<Block>,
    graph: leakhunt_reach::Graph,
    maps: Vec<Map>,
    threads: Vec<ThreadAt>,
    /// Stack root words' frames: the return address into the function whose frame holds the
    /// word (0: not found).
    frames: rustc_hash::FxHashMap<u64, u64>,
}

/// A thread as the scan saw it.
#[derive(Clone, Copy, Debug)]
struct ThreadAt {
    tid: u32,
    /// Its thread pointer (fs base), 0 when not known.
    tp: u64,
    pc: u64,
    /// Its stack and frame pointers (for walking its frames), 0 when not known.
    sp: u64,
    bp: u64,
    /// The part of its stack scanned.
    lo: u64,
    hi: u64,
}

impl Scanner {
    pub fn new(
        pid: u32,
        replies: Replies,
        own_paths: Vec<PathBuf>,
        heuristics: Heuristics,
        retention: bool,
    ) -> Scanner {
        Scanner {
            pid,
            replies,
            own_paths,
            heuristics,
            held: Vec::new(),
            started: None,
            failed: None,
            sym: leakhunt_symbolizer::Symbolizer::new(),
            retention,
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
            Ok((mut o, held)) => {
                o.threads = threads;
                o.held_us = held_us;
                if let Some(h) = held {
                    o.items = self.retention(p, h);
                }
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

    fn scan(&mut self, p: &Process, r: &Request) -> Result<(Outcome, Option<Held>), String> {
        let mut blocks: Vec<Block> = p
            .live
            .iter()
            .map(|(start, l)| Block {
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
        if self.retention {
            scan.record_graph();
        }
        // Threads: the exiting one from where the program's frames end; the others from below
        // their stack pointers, with their registers. The tracer's own threads not at all.
        let mut stacks: Vec<(u64, u64)> = Vec::new();
        let mut own_stacks: Vec<(u64, u64)> = Vec::new();
        let mut threads: Vec<ThreadAt> = Vec::new();
        if let Some(m) = find_map(&maps, r.sp) {
            stacks.push((r.sp, m.end));
            let regs = registers_of_waiting(self.pid, r.tid);
            threads.push(ThreadAt {
                tid: r.tid,
                tp: regs.map_or(0, |g| g.fs_base),
                pc: regs.map_or(0, |g| g.rip),
                sp: regs.map_or(0, |g| g.rsp),
                bp: regs.map_or(0, |g| g.rbp),
                lo: r.sp,
                hi: m.end,
            });
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
            threads.push(ThreadAt {
                tid: t.as_raw() as u32,
                tp: regs.fs_base,
                pc: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
                lo: sp.saturating_sub(RED_ZONE).max(m.start),
                hi: m.end,
            });
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
        let frames = o.graph.as_ref().map_or_else(Default::default, |g| {
            let frames = Frames {
                mem: &mem,
                maps: &maps,
                p,
            };
            frames.of_roots(&mut self.sym, &threads, g.roots.iter().map(|r| r.0))
        });
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
        let out = Outcome {
            last: true,
            blocks: blocks.len() as u64,
            words: o.words_scanned,
            entries,
            ..Outcome::default()
        };
        let held = o.graph.map(|graph| Held {
            blocks,
            graph,
            maps,
            threads,
            frames,
        });
        Ok((out, held))
    }

    /// The retention items of a scan ([`crate::retain::items`]), computed once the threads go.
    fn retention(&mut self, p: &Process, h: Held) -> Vec<leakhunt_format::reach::Item> {
        use leakhunt_format::reach::{root, Item, NONE};
        let (stack, born): (Vec<u32>, Vec<u32>) = h
            .blocks
            .iter()
            .map(|b| p.live.get(b.start).map_or((NONE, 0), |l| (l.stack, l.born)))
            .unzip();
        // Retained sizes per callsite (stack ids of the same code, across module reloads, are
        // one callsite: a block of one dominating a block of the other counts once): each
        // callsite under the first of its stack ids met.
        let mut sites = crate::callsite::Callsites::new(p);
        let mut first_id: rustc_hash::FxHashMap<u32, u32> = Default::default();
        let group: Vec<u32> = stack
            .iter()
            .map(|&id| {
                if id == NONE {
                    return NONE;
                }
                *first_id.entry(sites.site(id)).or_insert(id)
            })
            .collect();
        let threads: Vec<Item> = h
            .threads
            .iter()
            .map(|t| Item::Thread {
                tid: t.tid,
                tp: t.tp,
                pc: t.pc,
                lo: t.lo,
                hi: t.hi,
            })
            .collect();
        // The executable's static TLS block ends at each thread's thread pointer.
        let exe = p.modules.iter().map(|m| &m.module).find(|m| m.id == 0);
        let tls = exe.and_then(|m| {
            let (size, align) = self.sym.tls_segment(&m.path, &m.build_id)?;
            Some((m.id, size.checked_next_multiple_of(align.max(1))?))
        });
        let sym = &mut self.sym;
        let maps = &h.maps;
        // The module of each file-backed mapping, looked up once.
        let mut module_of_map: rustc_hash::FxHashMap<
            usize,
            Option<&leakhunt_format::encode::Module>,
        > = Default::default();
        let mut root_of = |at: u64| -> crate::retain::RootInfo {
            let item = |kind, tid, module, detail| Item::Root {
                kind,
                addr: at,
                tid,
                module,
                detail,
            };
            if at == 0 {
                return crate::retain::RootInfo {
                    item: item(root::REGISTER, 0, NONE, 0),
                    key: (root::REGISTER, 0, 0),
                };
            }
            for t in &h.threads {
                if let Some((module, size)) = tls {
                    let Some(block) = t.tp.checked_sub(size) else {
                        continue;
                    };
                    if t.tp != 0 && at < t.tp && at >= block {
                        let off = at - block;
                        let key = match p.modules.iter().find(|m| m.module.id == module) {
                            Some(m) => sym
                                .tls_symbol_start(&m.module.path, &m.module.build_id, off)
                                .unwrap_or(off),
                            None => off,
                        };
                        return crate::retain::RootInfo {
                            item: item(root::TLS, t.tid, module, off),
                            key: (root::TLS, t.tid as u64, key),
                        };
                    }
                }
            }
            for t in &h.threads {
                if at >= t.lo && at < t.hi {
                    let frame = h.frames.get(&at).copied().unwrap_or(0);
                    return crate::retain::RootInfo {
                        item: item(root::STACK, t.tid, NONE, frame),
                        key: (root::STACK, t.tid as u64, frame),
                    };
                }
            }
            // A module's data: its file-backed writable mappings and the anonymous one right
            // after them (its .bss beyond the file).
            if let Some(i) = maps.partition_point(|m| m.start <= at).checked_sub(1) {
                let m = &maps[i];
                let path = if m.path.starts_with('/') {
                    Some(m.path.as_str())
                } else if m.path.is_empty() && i > 0 && maps[i - 1].end == m.start {
                    Some(maps[i - 1].path.as_str()).filter(|p| p.starts_with('/'))
                } else {
                    None
                };
                let module = *module_of_map.entry(i).or_insert_with(|| {
                    path.and_then(|path| {
                        p.modules
                            .iter()
                            .map(|e| &e.module)
                            .rfind(|md| md.id != u32::MAX && same_file(&md.path, path))
                    })
                });
                if let Some(module) = module {
                    let vaddr = at.wrapping_sub(module.bias);
                    // Grouped by symbol (the symbol tables: no DWARF read while the process
                    // waits); named with DWARF at report time.
                    let start = sym
                        .global_symbol_start(&module.path, &module.build_id, vaddr)
                        .unwrap_or(vaddr);
                    return crate::retain::RootInfo {
                        item: item(root::GLOBAL, 0, module.id, 0),
                        key: (root::GLOBAL, module.id as u64, start),
                    };
                }
                if at < m.end {
                    return crate::retain::RootInfo {
                        item: item(root::OTHER, 0, NONE, 0),
                        key: (root::OTHER, m.start, 0),
                    };
                }
            }
            crate::retain::RootInfo {
                item: item(root::OTHER, 0, NONE, 0),
                key: (root::OTHER, at, 0),
            }
        };
        // Globals and thread-locals first, then live stack frames, then other memory, then the
        // dead words just below a stack pointer, then registers.
        let rank = |at: u64| -> u8 {
            if at == 0 {
                return 4;
            }
            match h.threads.iter().find(|t| at >= t.lo && at < t.hi) {
                Some(t) if t.sp != 0 && at < t.sp => 3,
                Some(_) => 1,
                None => match find_map(&h.maps, at) {
                    Some(m) if m.path.starts_with('/') => 0,
                    _ => 2,
                },
            }
        };
        crate::retain::items(
            &crate::retain::Heap {
                blocks: &h.blocks,
                stack: &stack,
                group: &group,
                born: &born,
            },
            &h.graph,
            threads,
            &mut root_of,
            &rank,
        )
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
    let items = std::mem::take(&mut o.items);
    let mut out: Vec<Outcome> = entries
        .chunks(per.max(1))
        .map(|c| Outcome {
            last: false,
            entries: c.to_vec(),
            ..o.clone()
        })
        .collect();
    // Retention items after the entries, in chunks of their own.
    let per_items = (reach::MAX_CHUNK - 72 - o.note.len()) / reach::ITEM_MAX_LEN;
    out.extend(items.chunks(per_items.max(1)).map(|c| Outcome {
        last: false,
        items: c.to_vec(),
        ..o.clone()
    }));
    if out.is_empty() {
        out.push(o);
    }
    if let Some(l) = out.last_mut() {
        l.last = true;
    }
    out
}

/// The registers of the thread that waits for the scan's result (it is not held: it is stopped
/// a moment to read them, and its wait resumes; a signal that stopped it first is delivered as
/// it goes). `None` when `tid` is not a thread of `pid`, or it cannot be stopped.
fn registers_of_waiting(pid: u32, tid: u32) -> Option<nix::libc::user_regs_struct> {
    if !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
        return None;
    }
    let t = Pid::from_raw(tid as i32);
    ptrace::seize(t, ptrace::Options::empty()).ok()?;
    let mut regs = None;
    let mut pending = None;
    if ptrace::interrupt(t).is_ok() {
        match waitpid(t, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::PtraceSyscall(_)) => {
                regs = ptrace::getregs(t).ok();
            }
            // A signal reached it first: it is delivered on release.
            Ok(WaitStatus::Stopped(_, sig)) => {
                pending = Some(sig);
                regs = ptrace::getregs(t).ok();
            }
            _ => {}
        }
    }
    let _ = ptrace::detach(t, pending);
    regs
}

/// Whether two paths name the same file (`/lib/...` and `/usr/lib/...` through a link).
fn same_file(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Where a held process's frames are: its memory, its mappings and its modules.
struct Frames<'a> {
    mem: &'a Remote<'a>,
    maps: &'a [Map],
    p: &'a Process,
}

/// Frames walked per thread at most.
const MAX_FRAMES: usize = 512;

impl Frames<'_> {
    fn word(&self, addr: u64) -> Option<u64> {
        let mut w = [0u64];
        (addr.is_multiple_of(8) && self.mem.read(addr, &mut w) == 1).then_some(w[0])
    }

    /// The module (path, build-id, bias) whose code holds `pc`.
    fn module(&self, pc: u64) -> Option<(&str, &[u8], u64)> {
        let e = self.p.module_at(pc, u32::MAX)?;
        Some((&e.path, &e.build_id, e.bias))
    }

    /// A thread's frames, innermost first, as (lowest address, CFA, pc): walked by the modules'
    /// call frame information from its registers, as far as that goes.
    fn walk(
        &self,
        sym: &mut leakhunt_symbolizer::Symbolizer,
        t: &ThreadAt,
    ) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let (mut pc, mut sp, mut bp) = (t.pc, t.sp, t.bp);
        if pc == 0 || sp == 0 {
            return out;
        }
        for i in 0..MAX_FRAMES {
            let Some((path, bid, bias)) = self.module(pc) else {
                break;
            };
            // A return address is looked up less one: the call, not what follows it.
            let at = pc.wrapping_sub(bias).wrapping_sub((i > 0) as u64);
            let Some(rule) = sym.frame_rule(path, bid, at) else {
                break;
            };
            let base = match rule.cfa_reg {
                7 => sp,
                6 => bp,
                _ => break,
            };
            let cfa = base.wrapping_add_signed(rule.cfa_offset);
            if cfa <= sp || cfa > t.hi {
                break;
            }
            let Some(ra) = self.word(cfa.wrapping_add_signed(rule.ra_offset)) else {
                break;
            };
            out.push((sp, cfa, pc));
            if let Some(o) = rule.rbp_offset {
                match self.word(cfa.wrapping_add_signed(o)) {
                    Some(v) => bp = v,
                    None => break,
                }
            }
            if ra == 0 {
                break;
            }
            (pc, sp) = (ra, cfa);
        }
        out
    }

    /// Whether `w` is a return address: in a module's code, just after a call instruction.
    fn is_return(&self, w: u64) -> bool {
        if w < 8 || !find_map(self.maps, w).is_some_and(|m| m.exec && m.path.starts_with('/')) {
            return false;
        }
        let a = (w - 8) & !7;
        let mut buf = [0u64; 2];
        if self.mem.read(a, &mut buf) < 2 {
            return false;
        }
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&buf[0].to_le_bytes());
        bytes[8..].copy_from_slice(&buf[1].to_le_bytes());
        let end = (w - a) as usize;
        let before = |k: usize| bytes[end - k];
        // call rel32; call through a register or memory (ff /2), 0-5 bytes after the ModRM.
        before(5) == 0xe8
            || [2usize, 3, 4, 6, 7]
                .iter()
                .any(|&k| before(k) == 0xff && (before(k - 1) >> 3) & 7 == 2)
    }

    /// For each stack root word: the pc of the function whose frame holds it (a return address
    /// into it, or the thread's pc for its innermost frame). Frames are walked by call frame
    /// information; above where that walk stops, the function is the one whose callee's return
    /// address lies nearest below the word (a word just after a call instruction).
    fn of_roots(
        &self,
        sym: &mut leakhunt_symbolizer::Symbolizer,
        threads: &[ThreadAt],
        roots: impl Iterator<Item = u64>,
    ) -> rustc_hash::FxHashMap<u64, u64> {
        let mut out = rustc_hash::FxHashMap::default();
        // Per thread with a root word: its walked frames, and the return-address slots above them.
        type Walked = (Vec<(u64, u64, u64)>, Vec<(u64, u64)>);
        let mut walked: Vec<Option<Walked>> = vec![None; threads.len()];
        for at in roots {
            if out.contains_key(&at) {
                continue;
            }
            let Some(ti) = threads.iter().position(|t| at >= t.lo && at < t.hi) else {
                continue;
            };
            let t = &threads[ti];
            let (frames, slots) = walked[ti].get_or_insert_with(|| {
                let frames = self.walk(sym, t);
                let from = frames
                    .last()
                    .map_or(t.lo, |f| f.1)
                    .max(t.lo)
                    .next_multiple_of(8);
                let mut slots = Vec::new();
                let mut buf = vec![0u64; 4096];
                let mut at = from;
                // In pieces: a stack pointer in a large mapping (a coroutine's stack inside an
                // arena) leaves much above it.
                while at < t.hi {
                    let want = ((t.hi - at) / 8).min(buf.len() as u64) as usize;
                    if want == 0 {
                        break;
                    }
                    let got = self.mem.read(at, &mut buf[..want]);
                    for (k, &w) in buf[..got].iter().enumerate() {
                        if self.is_return(w) {
                            slots.push((at + 8 * k as u64, w));
                        }
                    }
                    if got < want {
                        break;
                    }
                    at += 8 * got as u64;
                }
                (frames, slots)
            });
            let frame = match frames.iter().find(|f| at >= f.0 && at < f.1) {
                Some(f) => f.2,
                None => {
                    let below = slots.partition_point(|s| s.0 < at);
                    match below.checked_sub(1) {
                        Some(i) => slots[i].1,
                        None => frames.last().map_or(t.pc, |f| f.2),
                    }
                }
            };
            out.insert(at, frame);
        }
        out
    }
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
    /// Zeroes the masked words of `words`, read from `addr` on.
    fn mask(&self, addr: u64, words: &mut [u64]) {
        let len = words.len();
        let end = addr + len as u64 * 8;
        let first = self.masked.partition_point(|m| m.1 <= addr);
        for &(ms, me) in self.masked[first..].iter().take_while(|m| m.0 < end) {
            let from = ms.max(addr);
            let to = me.min(end);
            let (i, j) = (
                ((from - addr) / 8) as usize,
                ((to - addr).div_ceil(8)) as usize,
            );
            words[i..j.min(len)].fill(0);
        }
    }

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
        self.mask(addr, &mut out[..done]);
        done
    }

    fn read_once(&self, addr: u64, out: &mut [u64]) -> usize {
        // Straight into `out`, a page's worth at a time, not through the cache: a thread's
        // stack or a data segment is scanned once, and hundreds of threads' stacks would each
        // take a window of the cache (64 KiB) for the rest of the scan.
        let mut done = 0;
        let mut bytes = [0u8; 4096];
        while done < out.len() {
            let n = (out.len() - done).min(bytes.len() / 8);
            let a = addr + done as u64 * 8;
            let mut local = [std::io::IoSliceMut::new(&mut bytes[..n * 8])];
            let remote = [nix::sys::uio::RemoteIoVec {
                base: a as usize,
                len: n * 8,
            }];
            let got = match nix::sys::uio::process_vm_readv(self.pid, &mut local, &remote) {
                Ok(b) => b / 8,
                Err(_) => 0,
            };
            for (o, w) in out[done..done + got].iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                *o = u64::from_le_bytes(b);
            }
            done += got;
            if got < n {
                break;
            }
        }
        self.mask(addr, &mut out[..done]);
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
