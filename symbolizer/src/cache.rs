//! Inflated debug sections kept between runs. Distributions compress their separate debug files:
//! libc's `.debug_info` inflates from 2.3 to 5.8 MB, 20-30 ms of a core each time a report
//! names a thread's first frames (`start_thread`, `clone3`) from it. A section inflated once is
//! kept in the user's cache directory and read back the next time, checked against the zlib
//! stream's own checksum (adler32 of the inflated bytes) and size; anything else is inflated
//! again.
//!
//! The directory: `LEAKHUNT_CACHE_DIR`, else `$XDG_CACHE_HOME/leakhunt`, else
//! `$HOME/.cache/leakhunt` (made 0700 if missing); `LEAKHUNT_CACHE=0` keeps nothing. It is used
//! only if it is a directory, not a link, owned by this user and writable by no one else, and
//! everything in it is reached relative to it: a file is read only if it is a regular file of
//! this user's (never through a link), and written under a fresh name of its own (exclusive
//! creation) then renamed into place, so that no name someone else planted is written through
//! and a reader never sees half a file. Failing to keep a section is never an error.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{FileType, Mode, OFlags};

/// Sections compressed to less than this are inflated each time (in well under a millisecond).
pub const MIN_COMPRESSED: usize = 64 << 10;

static DIR: OnceLock<Option<OwnedFd>> = OnceLock::new();

/// The cache directory, opened once.
fn dir() -> Option<&'static OwnedFd> {
    DIR.get_or_init(|| open_dir(&location()?)).as_ref()
}

fn location() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if var("LEAKHUNT_CACHE").is_some_and(|v| v == "0") {
        return None;
    }
    if let Some(d) = var("LEAKHUNT_CACHE_DIR") {
        return Some(d.into());
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("leakhunt"))
}

/// Opens the directory at `path` (made, 0700, if missing) if it is one fit for the cache.
pub fn open_dir(path: &Path) -> Option<OwnedFd> {
    use std::os::unix::fs::DirBuilderExt;
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path);
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let ours = st.st_uid == rustix::process::geteuid().as_raw();
    (ours && st.st_mode & 0o022 == 0).then_some(fd)
}

/// The name a section is kept under: the debug file's build id, the section, its inflated size
/// and checksum.
pub fn key(build_id: &[u8], section: &str, size: usize, adler: u32) -> String {
    let id: String = build_id.iter().map(|b| format!("{b:02x}")).collect();
    let id = if id.is_empty() { "none".into() } else { id };
    let section = section.trim_start_matches('.').replace('/', "_");
    format!("{id}-{section}-{size}-{adler:08x}")
}

/// The kept section `key`, if it is there whole.
pub fn load(key: &str, size: usize, adler: u32) -> Option<Arc<[u8]>> {
    load_in(dir()?, key, size, adler)
}

/// Whether the kept section `key` is there, ours and of `size` bytes (its checksum is checked
/// when it is loaded).
pub fn present(key: &str, size: usize) -> bool {
    dir().is_some_and(|d| {
        rustix::fs::statat(d, key, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| fits(&st, size))
    })
}

/// A kept file that may be read: a regular file of ours, of `size` bytes.
fn fits(st: &rustix::fs::Stat, size: usize) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && st.st_uid == rustix::process::geteuid().as_raw()
        && u64::try_from(st.st_size).is_ok_and(|s| s == size as u64)
}

/// Keeps `data` under `key` (quietly not, if it cannot).
pub fn store(key: &str, data: &[u8]) {
    if let Some(d) = dir() {
        store_in(d, key, data);
    }
}

pub fn load_in(dir: &OwnedFd, key: &str, size: usize, adler: u32) -> Option<Arc<[u8]>> {
    let fd = rustix::fs::openat(
        dir,
        key,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    if !fits(&rustix::fs::fstat(&fd).ok()?, size) {
        return None;
    }
    let mut out: Arc<[u8]> = std::iter::repeat_n(0u8, size).collect();
    let buf = Arc::get_mut(&mut out)?;
    std::fs::File::from(fd).read_exact(buf).ok()?;
    (adler2::adler32_slice(buf) == adler).then_some(out)
}

pub fn store_in(dir: &OwnedFd, key: &str, data: &[u8]) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let tmp = format!(
        ".{key}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let Ok(fd) = rustix::fs::openat(
        dir,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return;
    };
    let written = std::fs::File::from(fd).write_all(data).is_ok();
    if !written || rustix::fs::renameat(dir, &tmp, dir, key).is_err() {
        let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lh-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_kept_section_reads_back_only_whole_and_unchanged() {
        let path = scratch("whole");
        let dir = open_dir(&path).expect("made 0700");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let adler = adler2::adler32_slice(&data);
        let k = key(&[0xab, 0x01], ".debug_info", data.len(), adler);
        assert_eq!(k, format!("ab01-debug_info-200000-{adler:08x}"));
        assert!(
            load_in(&dir, &k, data.len(), adler).is_none(),
            "nothing kept yet"
        );
        store_in(&dir, &k, &data);
        assert_eq!(
            load_in(&dir, &k, data.len(), adler).as_deref(),
            Some(&data[..])
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 1);
        // Another size, another checksum: not this section.
        assert!(load_in(&dir, &k, data.len() - 1, adler).is_none());
        assert!(load_in(&dir, &k, data.len(), adler ^ 1).is_none());
        // A byte changed in the file: refused (and kept again whole by the next store).
        let mut bad = data.clone();
        bad[1000] ^= 0xff;
        std::fs::write(path.join(&k), &bad).unwrap();
        assert!(load_in(&dir, &k, data.len(), adler).is_none());
        store_in(&dir, &k, &data);
        assert_eq!(
            load_in(&dir, &k, data.len(), adler).as_deref(),
            Some(&data[..])
        );
        let _ = std::fs::remove_dir_all(&path);
    }

    #[test]
    fn planted_links_are_neither_read_nor_written_through() {
        use std::os::unix::fs::PermissionsExt;
        let path = scratch("links");
        let dir = open_dir(&path).unwrap();
        let victim = scratch("victim");
        std::fs::write(&victim, b"someone else's").unwrap();
        let data = vec![7u8; 1000];
        let adler = adler2::adler32_slice(&data);
        let k = key(&[1], ".debug_line", data.len(), adler);
        std::os::unix::fs::symlink(&victim, path.join(&k)).unwrap();
        assert!(load_in(&dir, &k, 14, adler2::adler32_slice(b"someone else's")).is_none());
        store_in(&dir, &k, &data);
        assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's");
        assert_eq!(
            load_in(&dir, &k, data.len(), adler).as_deref(),
            Some(&data[..])
        );
        // A directory that is a link, or that others may write, is not used.
        let link = scratch("dirlink");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_dir(&link).is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(open_dir(&path).is_none());
        for p in [&path, &link, &victim] {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
