//! Raw system calls and the diagnostics channel. Nothing here allocates or takes a lock.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Writes `leakhunt: <msg>\n` with one `write(2)` to the stderr the program started with, if it
/// still has it (see [`crate::fds::write_stderr`]).
pub fn diag(msg: &str) {
    let mut buf = [0u8; 512];
    let mut n = 0;
    for part in [b"leakhunt: ".as_slice(), msg.as_bytes(), b"\n"] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    crate::fds::write_stderr(&buf[..n]);
}

/// Mappings of the tracer's own (rings, buffers, tables), which a heap scan must not take for
/// the program's roots: (start, end) pairs, appended once each, never removed (none is unmapped
/// while the process runs, and a fork child re-maps the same ranges).
/// Room for every ring of a program with thousands of threads (two mappings a ring, one more for
/// a ring made large): 256 KiB of zeros, touched only as it fills.
pub const MAX_OWN: usize = 16384;
const PAGE: usize = 4096;
static OWN: [[AtomicU64; 2]; MAX_OWN] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAX_OWN];
static OWN_LEN: AtomicU32 = AtomicU32::new(0);

/// Records `[addr, addr + len)` as the tracer's own memory.
pub fn note_own(addr: *const u8, len: usize) {
    let i = OWN_LEN.fetch_add(1, Ordering::AcqRel) as usize;
    if let Some(slot) = OWN.get(i) {
        slot[0].store(addr as u64, Ordering::Relaxed);
        slot[1].store(addr as u64 + len as u64, Ordering::Release);
    }
}

/// Records this library's zero-initialised statics (its `.bss` past the last file-backed page:
/// an anonymous mapping the heap scan would otherwise read as the program's roots, 2 MiB of
/// tables and arenas) as the tracer's own, except `keep` (the bootstrap arena, whose blocks are
/// the program's: the scan leaves out only its unused tail, at exit). Read from this library's
/// own program headers, mapped at its load base; called once at initialisation.
pub fn note_own_statics(keep: (usize, usize)) {
    // SAFETY: dladdr fills `info` for an address inside this library; `dli_fbase` is the address
    // its ELF header is mapped at, followed by its program headers (the first PT_LOAD maps both).
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(note_own_statics as *const libc::c_void, &mut info) == 0
            || info.dli_fbase.is_null()
        {
            return;
        }
        let base = info.dli_fbase as usize;
        let eh = &*(base as *const libc::Elf64_Ehdr);
        if eh.e_ident[..4] != *b"\x7fELF"
            || eh.e_phentsize as usize != core::mem::size_of::<libc::Elf64_Phdr>()
        {
            return;
        }
        let phdrs = core::slice::from_raw_parts(
            (base + eh.e_phoff as usize) as *const libc::Elf64_Phdr,
            eh.e_phnum as usize,
        );
        let loads = || phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
        let Some(first) = loads().map(|p| p.p_vaddr as usize & !(PAGE - 1)).min() else {
            return;
        };
        let bias = base - first;
        for p in loads().filter(|p| p.p_flags & libc::PF_W != 0) {
            let lo = (bias + (p.p_vaddr + p.p_filesz) as usize).next_multiple_of(PAGE);
            let hi = (bias + (p.p_vaddr + p.p_memsz) as usize).next_multiple_of(PAGE);
            for (s, e) in [(lo, hi.min(keep.0).max(lo)), (keep.1.max(lo), hi)] {
                if s < e {
                    note_own(s as *const u8, e - s);
                }
            }
        }
    }
}

/// Bytes of the tracer's own mappings resident now (`mincore`, page by page).
pub fn own_resident() -> u64 {
    let n = (OWN_LEN.load(Ordering::Acquire) as usize).min(MAX_OWN);
    let mut pages = 0u64;
    // 16 MiB of pages a call: the dedup arena alone reserves 1 GiB.
    let mut vec = [0u8; 4096];
    let arena = crate::dedup::arena_used();
    for slot in &OWN[..n] {
        let (start, mut end) = (
            slot[0].load(Ordering::Relaxed),
            slot[1].load(Ordering::Acquire),
        );
        // The stack arena's pages past what it used were never touched: 1 GiB of page tables
        // not to walk.
        if let Some((a, used)) = arena {
            if a == start {
                end = end.min(used.next_multiple_of(4096));
            }
        }
        let mut at = start & !4095;
        while at < end {
            let len = (end - at).min(vec.len() as u64 * 4096);
            // SAFETY: `vec` has room for one byte per page of `[at, at + len)`; mincore only
            // writes it (a range no longer mapped fails, and counts nothing).
            let r =
                unsafe { libc::mincore(at as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
            if r == 0 {
                let k = len.div_ceil(4096) as usize;
                pages += vec[..k].iter().filter(|&&b| b & 1 != 0).count() as u64;
            }
            at += len;
        }
    }
    pages * 4096
}

/// Copies the tracer's own ranges into `out`; returns how many.
pub fn own_ranges(out: &mut [(u64, u64)]) -> usize {
    let n = (OWN_LEN.load(Ordering::Acquire) as usize).min(MAX_OWN);
    let mut k = 0;
    for slot in &OWN[..n] {
        let end = slot[1].load(Ordering::Acquire);
        let Some(o) = out.get_mut(k) else { break };
        if end != 0 {
            *o = (slot[0].load(Ordering::Relaxed), end);
            k += 1;
        }
    }
    k
}

/// Anonymous private mapping of `len` bytes, zero-filled, recorded as the tracer's own; null on
/// failure.
pub fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: an anonymous mapping with no address hint touches no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        core::ptr::null_mut()
    } else {
        note_own(p.cast(), len);
        p.cast()
    }
}

/// The calling thread's stack pointer, here.
#[inline(always)]
pub fn stack_pointer() -> u64 {
    let sp: u64;
    // SAFETY: reads the stack pointer register; touches no memory.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

/// The parent's pid (a fork child's, for its `FORKED` record).
pub fn getppid() -> u32 {
    // SAFETY: getppid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) as u32 }
}

/// The calling process's pid from the kernel (libc's getpid may be stale in a vfork child).
pub fn getpid() -> u32 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as u32 }
}

pub fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `word` is woken or no longer `expected`, at most `timeout_ms`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ms: u64) {
    futex_wait_ns(word, expected, timeout_ms.saturating_mul(1_000_000));
}

/// As [`futex_wait`], at most `timeout_ns`.
pub fn futex_wait_ns(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; `ts` is valid.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE only reads its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

/// Starts a detached thread of the tracer's on `routine` with a `stack`-byte stack; false when
/// it cannot be started.
pub fn spawn_detached(
    routine: extern "C" fn(*mut core::ffi::c_void) -> *mut core::ffi::c_void,
    stack: usize,
) -> bool {
    // SAFETY: a zeroed attribute object initialised before use and destroyed after; the routine
    // is ours and takes no argument.
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_attr_setstacksize(&mut attr, stack);
        let mut t: libc::pthread_t = 0;
        let ok = libc::pthread_create(&mut t, &attr, routine, core::ptr::null_mut()) == 0;
        libc::pthread_attr_destroy(&mut attr);
        ok
    }
}

pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// A spin lock for tracer-internal state. Holders never call into a hooked function while
/// holding it (they hold the reentrancy guard), so a hook can never wait on itself; `owner` lets a
/// signal handler see that its own thread already holds it.
pub struct SpinLock {
    owner: AtomicU32,
}

impl SpinLock {
    pub const fn new() -> SpinLock {
        SpinLock {
            owner: AtomicU32::new(0),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_> {
        let me = gettid();
        let mut spins = 0u32;
        while self
            .owner
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins > 64 {
                yield_now();
            } else {
                core::hint::spin_loop();
            }
        }
        SpinGuard { lock: self }
    }

    /// Takes the lock if it is free right now (one attempt, no yield).
    pub fn try_lock(&self) -> Option<SpinGuard<'_>> {
        self.owner
            .compare_exchange(0, gettid(), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinGuard { lock: self })
    }

    /// Like `lock`, but gives up when this thread already holds it or after `tries` yields.
    pub fn try_lock_for(&self, tries: u32) -> Option<SpinGuard<'_>> {
        let me = gettid();
        for _ in 0..tries {
            match self
                .owner
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Some(SpinGuard { lock: self }),
                Err(o) if o == me => return None,
                Err(_) => yield_now(),
            }
        }
        None
    }

    /// Forcibly releases the lock (after fork, in the child, where the owner no longer exists).
    pub fn reset(&self) {
        self.owner.store(0, Ordering::Release);
    }

    /// Takes the lock without a guard object (fork prepare); pair with `reset`.
    pub fn acquire_raw(&self) {
        core::mem::forget(self.lock());
    }
}

pub struct SpinGuard<'a> {
    lock: &'a SpinLock,
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.lock.owner.store(0, Ordering::Release);
    }
}

/// Opens a file read-only with the raw syscall (no libc wrapper that a program could hook);
/// negative on failure. The caller closes it with `SYS_close`.
pub fn open_raw(path: &core::ffi::CStr) -> i32 {
    // SAFETY: `path` is NUL-terminated; the returned descriptor is the caller's to close.
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        ) as i32
    }
}

/// Bounds `[start, end)` of the mapping in `/proc/self/maps` that contains `addr`, or (0, 0)
/// when none does or the file cannot be read. Raw system calls and a stack buffer only: no
/// allocation and no lock, so it is safe where `pthread_getattr_np` is not (that function holds
/// the thread's lock while it calls malloc, and our hook may be the one it calls).
pub fn mapping_bounds(addr: usize) -> (usize, usize) {
    let fd = open_raw(c"/proc/self/maps");
    if fd < 0 {
        return (0, 0);
    }
    let mut parser = MapsParser::default();
    let mut buf = [0u8; 2048];
    let mut found = (0, 0);
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        if let Some(bounds) = parser.feed(&buf[..n as usize], addr) {
            found = bounds;
            break;
        }
    }
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    found
}

/// Zeroes this thread's stack below the caller, as far down as it is mapped (at most 64 KiB),
/// once: at the end of the library's constructor. The tracer's start-up runs deep on the main
/// thread's stack before `main` (module tables, call-frame rules, the trace's header) and
/// leaves words there, the address of a block its own allocations had and freed among them;
/// the program's frames later come to lie over that memory, and a heap scan reading an
/// uninitialised local of theirs would find a block of the program's, one that chunk became,
/// reachable where memcheck finds it lost. Zeroed in frames of a page each, below the stack
/// pointer as the ABI allows (a signal arriving meanwhile finds its frame below them).
pub fn scrub_stack() {
    // Only the main thread's stack: the library loaded by `dlopen` on another thread, whose
    // stack may lie in a mapping shared with live memory, leaves it alone.
    if gettid() != getpid() {
        return;
    }
    let sp = stack_pointer() as usize;
    let (lo, hi) = mapping_bounds(sp);
    if lo == 0 || sp < lo || sp >= hi {
        return;
    }
    // Two pages of the mapping kept unwritten: the deepest frame's own saved words and a signal
    // frame's room stay inside it.
    let room = ((sp - lo) / 4096).saturating_sub(2).min(MAX_SCRUB);
    // Frames down to the deepest resident page: only resident pages can hold words the
    // start-up left (a page never touched reads as zeros when it is), and zeroing the pages
    // below them would only make them resident. Each frame zeroes `SCRUB_FRAME` bytes and takes
    // a little more; one more frame covers the rounding.
    let depth = deepest_resident(sp, room).map_or(0, |at| sp - at);
    scrub_pages((depth.div_ceil(SCRUB_FRAME) + 1).min(room));
}

/// Frames (of a little over a page each) the stack scrub makes at most.
const MAX_SCRUB: usize = 16;

/// The bytes each frame of [`scrub_pages`] zeroes.
const SCRUB_FRAME: usize = 500 * 8;

/// The start of the lowest resident page among the `max` pages right below the page of `sp`
/// (`None`: none is).
fn deepest_resident(sp: usize, max: usize) -> Option<usize> {
    let top = sp & !4095;
    let max = max.min(MAX_SCRUB);
    if max == 0 || top < max * 4096 {
        return None;
    }
    let from = top - max * 4096;
    let mut vec = [0u8; MAX_SCRUB];
    // SAFETY: mincore writes one byte per page of `[from, from + max * 4096)` into `vec`, which
    // has `MAX_SCRUB >= max` bytes; on a range not wholly mapped it fails (ENOMEM) and the
    // result is not used.
    let r = unsafe { libc::mincore(from as *mut libc::c_void, max * 4096, vec.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    let i = vec[..max].iter().position(|&b| b & 1 != 0)?;
    Some(from + i * 4096)
}

#[inline(never)]
fn scrub_pages(n: usize) {
    if n == 0 {
        return;
    }
    let mut page = [0u64; SCRUB_FRAME / 8];
    core::hint::black_box(&mut page);
    scrub_pages(n - 1);
    core::hint::black_box(&page);
}

/// Reads up to `buf.len()` bytes of a small file (under /proc); returns how many. Through the
/// side thread where it runs (its opens never take a number the program expects), else here.
pub fn read_small(path: &core::ffi::CStr, buf: &mut [u8]) -> usize {
    crate::side::read_small(path, buf).unwrap_or_else(|| read_small_direct(path, buf))
}

/// Reads up to `buf.len()` bytes of a small file with raw system calls, in this thread.
pub fn read_small_direct(path: &core::ffi::CStr, buf: &mut [u8]) -> usize {
    let fd = open_raw(path);
    if fd < 0 {
        return 0;
    }
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: the rest of `buf` is writable.
        let r = unsafe { libc::syscall(libc::SYS_read, fd, buf[n..].as_mut_ptr(), buf.len() - n) };
        if r <= 0 {
            break;
        }
        n += r as usize;
    }
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    n
}

/// The soft limit on descriptors (1024 when it cannot be read; capped at 1 << 20).
pub fn fd_limit() -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(1 << 20) as i32
    } else {
        1024
    }
}

/// The process's resident set size in bytes, from `/proc/self/statm` (0 if it cannot be read).
/// Raw syscalls and a stack buffer: no allocation, no stdio.
pub fn rss_bytes() -> u64 {
    let mut buf = [0u8; 128];
    let n = read_small(c"/proc/self/statm", &mut buf);
    if n == 0 {
        return 0;
    }
    // "size resident shared text lib data dt", in pages: the second field.
    let resident = buf[..n]
        .split(|&c| c == b' ')
        .nth(1)
        .map(|f| {
            f.iter()
                .take_while(|c| c.is_ascii_digit())
                .fold(0u64, |v, &c| v * 10 + (c - b'0') as u64)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    resident * if page > 0 { page as u64 } else { 4096 }
}

/// Streaming parser of the `start-end` prefix of each `/proc/self/maps` line; the rest of a line
/// is skipped. Chunks may split lines anywhere.
#[derive(Default)]
struct MapsParser {
    field: u8,
    start: usize,
    end: usize,
}

impl MapsParser {
    fn feed(&mut self, chunk: &[u8], addr: usize) -> Option<(usize, usize)> {
        for &c in chunk {
            match (self.field, c) {
                (_, b'\n') => {
                    self.field = 0;
                    self.start = 0;
                    self.end = 0;
                }
                (0, b'-') => self.field = 1,
                (1, b' ') => {
                    self.field = 2;
                    if self.start <= addr && addr < self.end {
                        return Some((self.start, self.end));
                    }
                }
                (0 | 1, _) => {
                    let d = match c {
                        b'0'..=b'9' => c - b'0',
                        b'a'..=b'f' => c - b'a' + 10,
                        _ => {
                            self.field = 2;
                            continue;
                        }
                    } as usize;
                    let v = if self.field == 0 {
                        &mut self.start
                    } else {
                        &mut self.end
                    };
                    *v = v.wrapping_shl(4) | d;
                }
                _ => {}
            }
        }
        None
    }
}

/// Decimal digits of `v` in `buf`, for building paths without allocating.
pub fn fmt_u64(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parser_finds_the_mapping_across_chunk_splits() {
        let text =
            b"55d0a000-55d0b000 r--p 0 08:01 1 /bin/x\n7ffd1000-7ffd3000 rw-p 0 00:00 0 [stack]\n";
        for split in 0..text.len() {
            let mut p = MapsParser::default();
            let r = p
                .feed(&text[..split], 0x7ffd2000)
                .or_else(|| p.feed(&text[split..], 0x7ffd2000));
            assert_eq!(r, Some((0x7ffd1000, 0x7ffd3000)), "split at {split}");
        }
        let mut p = MapsParser::default();
        assert_eq!(p.feed(text, 0x1000), None);
    }

    #[test]
    fn own_statics_cover_the_bss_except_the_kept_range() {
        // A zero-initialised static past the first page of .bss, and one to keep.
        static BIG: [AtomicU64; 4096] = [const { AtomicU64::new(0) }; 4096];
        static KEEP: [AtomicU64; 4096] = [const { AtomicU64::new(0) }; 4096];
        BIG[4095].store(1, Ordering::Relaxed);
        let (big, keep) = (&BIG[4095] as *const _ as u64, &KEEP as *const _ as usize);
        let keep = (keep, keep + core::mem::size_of_val(&KEEP));
        note_own_statics(keep);
        let mut out = [(0u64, 0u64); MAX_OWN];
        let n = own_ranges(&mut out);
        let covered = |a: u64| out[..n].iter().any(|&(s, e)| s <= a && a < e);
        assert!(covered(big), "{big:#x} not in {:x?}", &out[..n]);
        assert!(!covered(keep.0 as u64 + 4096));
        // Nothing of the executable's code or file-backed data.
        assert!(!covered(
            own_statics_cover_the_bss_except_the_kept_range as fn() as usize as u64
        ));
    }

    #[test]
    fn mapping_bounds_cover_this_threads_stack() {
        let local = 0u8;
        let a = &local as *const u8 as usize;
        let (lo, hi) = mapping_bounds(a);
        assert!(lo <= a && a < hi);
    }
}
