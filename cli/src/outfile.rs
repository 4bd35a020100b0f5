//! Files leakhunt writes at names the user gives (`--json`, `--html`): never through a symbolic
//! link someone else planted at the name (in a shared directory such as /tmp, another user can
//! create one pointing at a file of yours), never replacing what is not a regular file.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Creates (or truncates) `path` for writing. A symbolic link at `path` is followed only when it
/// belongs to the user running leakhunt (or to root, like /dev/stdout); a link of anyone else is
/// refused with an error naming its owner. Character devices and FIFOs (`/dev/null`, a pipe) are
/// opened as they are. New files get `mode` (less the umask).
pub fn create(path: &Path, mode: u32) -> io::Result<File> {
    let me = rustix::process::geteuid().as_raw();
    let follow = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            if m.uid() != me && m.uid() != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is a symbolic link that belongs to uid {}, not to you: not writing through it",
                        path.display(),
                        m.uid()
                    ),
                ));
            }
            true
        }
        _ => false,
    };
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(mode);
    if !follow {
        // A link planted between the check and the open is refused by the kernel (ELOOP).
        o.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    match o.open(path) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} became a symbolic link while leakhunt opened it: not writing through it",
                    path.display()
                ),
            ))
        }
        r => r,
    }
}

/// Writes `data` to `path` as [`create`] does.
pub fn write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    create(path, mode)?.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_of_someone_else_is_refused_and_ours_is_followed() {
        let d = std::env::temp_dir().join(format!("lh-outfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("target");
        std::fs::write(&target, "precious").unwrap();
        let link = d.join("report.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // Ours: followed.
        write(&link, b"ours", 0o644).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"ours");
        std::fs::write(&target, "precious").unwrap();
        // Someone else's (where we may change owners: as root).
        if rustix::process::geteuid().is_root() {
            rustix::fs::chownat(
                rustix::fs::CWD,
                &link,
                Some(rustix::process::Uid::from_raw(65534)),
                Some(rustix::process::Gid::from_raw(65534)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let e = write(&link, b"theirs", 0o644).unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
            assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        }
        // A plain file is replaced; /dev/null takes writes.
        let plain = d.join("plain");
        write(&plain, b"x", 0o600).unwrap();
        assert_eq!(std::fs::read(&plain).unwrap(), b"x");
        write(Path::new("/dev/null"), b"x", 0o600).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
