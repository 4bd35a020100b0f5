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
