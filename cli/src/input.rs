//! Opening what the user names as a trace. Regular files and pipes are read (a FIFO, or the
//! pipe of a shell's process substitution `<(cat t)`); anything else (a character or block
//! device, a socket, a directory) is an error that says what it is, at once. A FIFO never blocks
//! the open, and an input that holds nothing is "empty, not a trace".

use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rustix::fs::OFlags;

/// A trace opened for reading: the first bytes (read to see that there is something), then the
/// rest of the file or pipe.
pub struct TraceInput {
    src: std::io::Chain<Cursor<Vec<u8>>, File>,
    /// The size of a regular file; `None` for a pipe, whose size is not known before the end.
    pub size: Option<u64>,
}

impl TraceInput {
    /// Whether the trace comes through a pipe (it can be read only once).
    pub fn is_pipe(&self) -> bool {
        self.size.is_none()
    }
}

impl Read for TraceInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.src.read(buf)
    }
}

/// Opens the trace at `path`: a regular file or a pipe, opened with `O_NONBLOCK` so that a FIFO
/// without a writer does not block the open (the flag is cleared again before reading, so a
/// pipe whose writer is still writing is read to its end). Errors name the path and what it is.
pub fn open_trace(path: &Path) -> Result<TraceInput> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(std::io::Error::from);
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            // A socket cannot be opened (ENXIO): say what it is.
            if let Ok(m) = std::fs::metadata(path) {
                if !m.is_file() && !std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()) {
                    bail!(
                        "{} is {}, not a trace",
                        path.display(),
                        leakhunt_symbolizer::file_kind(m.file_type())
                    );
                }
            }
            return Err(e).with_context(|| format!("cannot open trace {}", path.display()));
        }
    };
    let file = File::from(fd);
    let meta = file
        .metadata()
        .with_context(|| format!("cannot open trace {}", path.display()))?;
    let t = meta.file_type();
    let size = if t.is_file() {
        Some(meta.len())
    } else if std::os::unix::fs::FileTypeExt::is_fifo(&t) {
        let flags = rustix::fs::fcntl_getfl(&file)
            .and_then(|f| rustix::fs::fcntl_setfl(&file, f - OFlags::NONBLOCK))
            .map_err(std::io::Error::from);
        flags.with_context(|| format!("cannot read trace {}", path.display()))?;
        None
    } else {
        bail!(
            "{} is {}, not a trace",
            path.display(),
            leakhunt_symbolizer::file_kind(t)
        );
    };
    let mut first = vec![0u8; leakhunt_format::PREAMBLE_LEN];
    let n = loop {
        match (&file).read(&mut first) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read trace {}", path.display()))
            }
        }
    };
    if n == 0 {
        match size {
            Some(_) => bail!("{}: empty, not a trace", path.display()),
            None => bail!(
                "{}: a pipe or FIFO with no writer, or whose writer sent nothing: empty, not a trace",
                path.display()
            ),
        }
    }
    first.truncate(n);
    Ok(TraceInput {
        src: Cursor::new(first).chain(file),
        size,
    })
}
