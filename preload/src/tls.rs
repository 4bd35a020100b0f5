//! Per-thread state in one initial-exec TLS block, reached in two instructions with no call.
//!
//! A `thread_local!` in a cdylib is general-dynamic TLS: every access calls `__tls_get_addr`, and
//! after a `dlopen` the first access can allocate (`_dl_update_slotinfo → malloc`), re-entering a
//! hook before its guard is set. A hidden `.tbss` symbol read through its `@GOTTPOFF` slot is
//! static TLS (the library gets `DF_STATIC_TLS`, which LD_PRELOAD supports) and never allocates.
//! glibc zero-fills `.tbss` for every new thread, so all-zero is the valid initial state.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::ring::Ring;

/// Allocator calls that arrived while their thread was inside the tracer core (a signal handler
/// allocating in the middle of a hook) and so could not be recorded.
pub static UNTRACKED: AtomicU64 = AtomicU64::new(0);

/// Thread life-cycle, as seen by the hooks.
pub const LIFE_NEW: u32 = 0;
pub const LIFE_ACTIVE: u32 = 1;
/// The pthread key destructor ran: the thread is exiting; late events still get recorded.
pub const LIFE_EXITING: u32 = 2;
/// The tracer's own writer thread: never traced.
pub const LIFE_INTERNAL: u32 = 3;

/// Invariants: only the owning thread reads or writes these fields (signal handlers on the same
/// thread included, which is why hooks test `depth` first).
#[repr(C)]
pub struct ThreadState {
    /// Reentrancy depth: non-zero means the thread is inside the tracer; hooks then forward
    /// straight to the real allocator.
    pub depth: u32,
    pub life: u32,
    /// The thread's ring (with its unwind cache), null until its first recorded event.
    pub ring: *mut Ring,
    /// The thread's stack mapping `[stack_lo, stack_hi)` as last looked up (the main thread's
    /// grows down: `stack_lo` follows it); 0 until looked up.
    pub stack_lo: usize,
    pub stack_hi: usize,
    pub tid: u32,
    _pad: [u32; 7],
}

const _: () = assert!(core::mem::size_of::<ThreadState>() <= 64);

core::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".balign 64",
    ".type leakhunt_tls_block,@object",
    ".size leakhunt_tls_block,64",
    ".globl leakhunt_tls_block",
    ".hidden leakhunt_tls_block",
    "leakhunt_tls_block:",
    ".skip 64",
    ".popsection",
);

/// The calling thread's state.
#[inline(always)]
pub fn state() -> *mut ThreadState {
    let p: usize;
    // SAFETY: reads the GOT slot holding the block's offset from the thread pointer, then adds
    // the thread pointer (fs:0 holds its own address on x86_64). No memory is written.
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr [rip + leakhunt_tls_block@GOTTPOFF]",
            "add {p}, qword ptr fs:[0]",
            p = out(reg) p,
            options(nostack, readonly, pure),
        );
    }
    p as *mut ThreadState
}

/// Proof that this thread is inside the tracer; dropping it leaves. While one is alive, nested
/// hook calls on this thread (the tracer's own allocations, a signal handler) are forwarded to the
/// real allocator without recording. It is the only way into tracer state that touches the ring.
pub struct Guard {
    ts: *mut ThreadState,
}

impl Guard {
    /// Enters the tracer unless this thread is already inside it or is internal.
    #[inline(always)]
    pub fn enter() -> Option<Guard> {
        let ts = state();
        // SAFETY: `ts` is this thread's own TLS block, valid for the thread's lifetime; only this
        // thread touches it.
        unsafe {
            if (*ts).depth != 0 || (*ts).life == LIFE_INTERNAL {
                // Depth 1: the tracer core itself was interrupted (a signal handler allocating
                // mid-hook); such an event cannot be recorded and is counted. Depth 2: a shim is
                // forwarding to a real function whose inner calls it records itself.
                if (*ts).depth == 1 && (*ts).life != LIFE_INTERNAL {
                    UNTRACKED.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            (*ts).depth = 1;
        }
        Some(Guard { ts })
    }

    /// Marks the calling thread as the tracer's own (never traced, permanently guarded).
    pub fn mark_internal() {
        let ts = state();
        // SAFETY: this thread's own TLS block.
        unsafe {
            (*ts).life = LIFE_INTERNAL;
            (*ts).depth = 1;
        }
    }

    /// Runs `f` (a call into a real allocator function) with nested hook calls passed through
    /// silently: the shim records the outer call itself.
    #[inline(always)]
    pub fn forwarding<T>(&self, f: impl FnOnce() -> T) -> T {
        // SAFETY: see `ts`.
        unsafe { (*self.ts).depth = 2 };
        let r = f();
        // SAFETY: see `ts`.
        unsafe { (*self.ts).depth = 1 };
        r
    }

    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // the state is per thread, reached only through this guard
    pub fn ts(&self) -> &mut ThreadState {
        // SAFETY: the guard lives on the owning thread (it is !Send) and is the only Rust-level
        // accessor while alive: nested hooks bail out on `depth` before forming a reference.
        unsafe { &mut *self.ts }
    }
}

impl Drop for Guard {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: see `ts`.
        unsafe { (*self.ts).depth = 0 };
    }
}
