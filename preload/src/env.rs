//! Keeps programs started by the traced one untraced (the default): this library's entry is
//! removed from `LD_PRELOAD` in the constructor, before `main`, so exec'd children do not load it.

extern crate alloc;
use alloc::vec::Vec;
use core::ffi::CStr;

fn own_path() -> Option<&'static CStr> {
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

pub fn remove_self_from_ld_preload() {
    let Some(own) = own_path() else { return };
    let own = own.to_bytes();
    // SAFETY: getenv with a literal name; the value is copied before the environment changes.
    let cur = unsafe { libc::getenv(c"LD_PRELOAD".as_ptr()) };
    if cur.is_null() {
        return;
    }
    // SAFETY: non-null getenv results are NUL-terminated.
    let cur = unsafe { CStr::from_ptr(cur) }.to_bytes().to_vec();
    let kept: Vec<&[u8]> = cur
        .split(|&b| b == b':' || b == b' ')
        .filter(|e| !e.is_empty() && *e != own && basename(e) != basename(own))
        .collect();
    if kept.is_empty() {
        // SAFETY: literal name.
        unsafe { libc::unsetenv(c"LD_PRELOAD".as_ptr()) };
        return;
    }
    let mut v: Vec<u8> = kept.join(&b':');
    v.push(0);
    // SAFETY: `v` is NUL-terminated; setenv copies it.
    unsafe { libc::setenv(c"LD_PRELOAD".as_ptr(), v.as_ptr().cast(), 1) };
}

/// With `--trace-children`, a program that execs with an environment of its own (execve, execle)
/// would drop the variables that trace the new image. Returns that environment with `LD_PRELOAD`
/// naming this library and every `LEAKHUNT_*` variable of ours added where missing; `None` when
/// nothing needs adding. The strings and the array are leaked if the exec succeeds (the image is
/// gone) and freed by the caller's drop if it fails.
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
    let ours: [(&[u8], Option<&[u8]>); 6] = [
        (b"LEAKHUNT_SOCKET", cfg.socket().map(CStr::to_bytes)),
        (b"LEAKHUNT_RING_DIR", cfg.ring_dir().map(CStr::to_bytes)),
        (b"LEAKHUNT_OUT", cfg.out_path().map(CStr::to_bytes)),
        (b"LEAKHUNT_MAX_FRAMES", Some(frames.as_slice())),
        (b"LEAKHUNT_TRACE_CHILDREN", Some(b"1")),
        (
            b"LEAKHUNT_FREERES",
            Some(if cfg.freeres { b"1" } else { b"0" }),
        ),
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
