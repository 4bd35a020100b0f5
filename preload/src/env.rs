//! The environment: keeps programs started by the traced one untraced (the default), or, with
//! `--trace-children`, gives an exec'd image what it needs to be traced.

extern crate alloc;
use alloc::vec::Vec;
use core::ffi::{c_char, CStr};

pub fn own_path() -> Option<&'static CStr> {
    // SAFETY: dladdr fills `info` for an address inside this library; dli_fname points to the
    // loader's copy of its path, valid while the library is loaded (for ever).
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(crate::tracer::constructor as *const libc::c_void, &mut info) == 0
            || info.dli_fname.is_null()
        {
            return None;
        }
        Some(CStr::from_ptr(info.dli_fname))
    }
}

fn basename(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[i + 1..],
        None => p,
    }
}

/// Takes leakhunt out of the environment the program passes on (children untraced, the
/// default): this library's entry in `LD_PRELOAD` (the variable goes when nothing else is left
/// in it) and every `LEAKHUNT_*` variable, so that the programs it starts run as they would
/// without leakhunt, and a program that prints its environment prints its own.
///
/// The array is edited in place rather than through `unsetenv`/`setenv`: a program may export
/// its own versions of those (bash does, keeping its own table, so libc's `environ` never
/// changed and every child was traced), and the array is what the program's `main` receives as
/// `envp` and what libc's functions read. Called before `main` (the constructor, and again
/// on `main`'s `envp` should another library have replaced `environ` first).
///
/// # Safety
/// `env` is null or a null-terminated, writable array of NUL-terminated strings that no other
/// thread touches (before `main`, only the loading thread runs).
pub unsafe fn strip_from(env: *mut *mut c_char) {
    if env.is_null() {
        return;
    }
    let Some(own) = own_path() else { return };
    let own = own.to_bytes();
    let (mut r, mut w) = (0usize, 0usize);
    loop {
        // SAFETY: `r` stays within the array up to and including its terminating null.
        let p = unsafe { *env.add(r) };
        if p.is_null() {
            break;
        }
        // SAFETY: entries are NUL-terminated strings (the caller's contract).
        let entry = unsafe { CStr::from_ptr(p) }.to_bytes();
        let keep = if let Some(list) = entry.strip_prefix(b"LD_PRELOAD=") {
            without_own(list, own).map(|v| {
                // The program may keep pointers into its environment: the new string lives
                // as long as the process.
                let mut s = b"LD_PRELOAD=".to_vec();
                s.extend_from_slice(&v);
                s.push(0);
                let s = alloc::boxed::Box::leak(s.into_boxed_slice());
                s.as_mut_ptr() as *mut c_char
            })
        } else if entry.starts_with(b"LEAKHUNT_") {
            None
        } else {
            Some(p)
        };
        if let Some(k) = keep {
            // SAFETY: `w <= r`, inside the array.
            unsafe { *env.add(w) = k };
            w += 1;
        }
        r += 1;
    }
    // SAFETY: `w <= r`, and `r` indexes the terminating null.
    unsafe { *env.add(w) = core::ptr::null_mut() };
}

/// Whether the environment `envp` (null-terminated) preloads this library: a program started
/// with it is traced.
pub fn preloads_us(envp: *const *const c_char) -> bool {
    if envp.is_null() {
        return false;
    }
    let Some(own) = own_path() else { return false };
    let own = own.to_bytes();
    let mut i = 0;
    loop {
        // SAFETY: a null-terminated array of NUL-terminated strings (exec's contract).
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            return false;
        }
        // SAFETY: as above.
        let entry = unsafe { CStr::from_ptr(p) }.to_bytes();
        if let Some(list) = entry.strip_prefix(b"LD_PRELOAD=") {
            return list
                .split(|&b| b == b':' || b == b' ')
                .any(|e| !e.is_empty() && (e == own || basename(e) == basename(own)));
        }
        i += 1;
    }
}

/// `LD_PRELOAD`'s value without this library; `None` when nothing else is left.
fn without_own(list: &[u8], own: &[u8]) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = list
        .split(|&b| b == b':' || b == b' ')
        .filter(|e| !e.is_empty() && *e != own && basename(e) != basename(own))
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b':'))
}

/// The environment `libc` reads and passes on.
pub fn environ() -> *mut *mut c_char {
    // SAFETY: libc's `environ`, read once.
    unsafe { *core::ptr::addr_of!(environ_sym::environ) }
}

mod environ_sym {
    extern "C" {
        pub static mut environ: *mut *mut core::ffi::c_char;
    }
}

/// With `--trace-children`, a program that execs with an environment of its own (execve, execle)
/// would drop the variables that trace the new image. Returns that environment with `LD_PRELOAD`
/// naming this library and every `LEAKHUNT_*` variable of ours added where missing; `None` when
/// nothing needs adding. The strings and the array are leaked if the exec succeeds (the image is
/// gone) and freed by the caller's drop if it fails.
fn hex(b: &[u8]) -> Vec<u8> {
    const D: &[u8; 16] = b"0123456789abcdef";
    b.iter()
        .flat_map(|&x| [D[(x >> 4) as usize], D[(x & 15) as usize]])
        .collect()
}

pub struct ChildEnv {
    _strings: Vec<Vec<u8>>,
    pub ptrs: Vec<*const core::ffi::c_char>,
}

pub fn child_env(envp: *const *const core::ffi::c_char) -> Option<ChildEnv> {
    if envp.is_null() {
        return None;
    }
    let own = own_path()?.to_bytes();
    let mut entries: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: envp is a null-terminated array of NUL-terminated strings (execve's contract).
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            break;
        }
        // SAFETY: as above.
        entries.push(unsafe { CStr::from_ptr(p) }.to_bytes());
        i += 1;
    }
    let has = |name: &[u8]| {
        entries
            .iter()
            .position(|e| e.starts_with(name) && e.get(name.len()) == Some(&b'='))
    };
    let mut strings: Vec<Vec<u8>> = Vec::new();
    let mut drop_idx: Option<usize> = None;
    match has(b"LD_PRELOAD") {
        Some(k) => {
            let cur = &entries[k][b"LD_PRELOAD=".len()..];
            if !cur.split(|&b| b == b':' || b == b' ').any(|e| e == own) {
                let mut s = b"LD_PRELOAD=".to_vec();
                s.extend_from_slice(own);
                s.push(b':');
                s.extend_from_slice(cur);
                strings.push(s);
                drop_idx = Some(k);
            }
        }
        None => {
            let mut s = b"LD_PRELOAD=".to_vec();
            s.extend_from_slice(own);
            strings.push(s);
        }
    }
    let cfg = crate::config::get();
    let frames = crate::config::fmt_usize(cfg.max_frames);
    let token = hex(&cfg.token);
    let ours: [(&[u8], Option<&[u8]>); 8] = [
        (b"LEAKHUNT_TOKEN", Some(token.as_slice())),
        (b"LEAKHUNT_SOCKET", cfg.socket().map(CStr::to_bytes)),
        (b"LEAKHUNT_RING_DIR", cfg.ring_dir().map(CStr::to_bytes)),
        (b"LEAKHUNT_OUT", cfg.out_path().map(CStr::to_bytes)),
        (b"LEAKHUNT_MAX_FRAMES", Some(frames.as_slice())),
        (b"LEAKHUNT_TRACE_CHILDREN", Some(b"1")),
        (
            b"LEAKHUNT_FREERES",
            Some(if cfg.freeres { b"1" } else { b"0" }),
        ),
        (b"LEAKHUNT_ORPHANS", cfg.orphans.then_some(b"1".as_slice())),
    ];
    for (name, value) in ours {
        if let (None, Some(v)) = (has(name), value) {
            let mut s = name.to_vec();
            s.push(b'=');
            s.extend_from_slice(v);
            strings.push(s);
        }
    }
    if strings.is_empty() {
        return None;
    }
    for s in strings.iter_mut() {
        s.push(0);
    }
    let mut ptrs: Vec<*const core::ffi::c_char> = Vec::new();
    for (k, _) in entries.iter().enumerate() {
        if Some(k) != drop_idx {
            // SAFETY: k < i, inside the caller's array.
            ptrs.push(unsafe { *envp.add(k) });
        }
    }
    ptrs.extend(strings.iter().map(|s| s.as_ptr().cast()));
    ptrs.push(core::ptr::null());
    Some(ChildEnv {
        _strings: strings,
        ptrs,
    })
}
