//! Why `leakhunt run` may get no trace from a program, as far as the program's file tells: the
//! preload library reaches a program only through the dynamic loader, which honours
//! `LD_PRELOAD` for a dynamically linked program of its own machine that does not run in the
//! loader's secure mode. [`why_no_trace`] says which of these failed, for the warning
//! "the program (pid N) sent no trace: ...".

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::report::escape_control;

/// Why a program cannot be traced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoTrace {
    /// No such program (on `PATH`, for a name without a slash).
    NotFound { program: OsString },
    /// An ELF file without an interpreter (`PT_INTERP`): no dynamic loader runs, so nothing
    /// reads `LD_PRELOAD`.
    Static { path: PathBuf },
    /// An ELF file for another machine or word size than leakhunt's library, which the loader
    /// then skips: what the program is ("a 32-bit i386 program").
    OtherMachine { path: PathBuf, what: String },
    /// The loader runs the program in secure mode (`AT_SECURE`), where `LD_PRELOAD` is ignored
    /// unless the library is in a standard directory, named without a slash and itself
    /// set-user-ID: why ("set-user-ID, owned by uid 0").
    SecureMode { path: PathBuf, why: String },
    /// Neither an ELF file nor a script that starts with `#!`.
    NotElf { path: PathBuf },
    /// A `#!` script whose interpreter cannot be traced, for `cause`.
    Script {
        path: PathBuf,
        interpreter: PathBuf,
        cause: Box<NoTrace>,
    },
}

impl fmt::Display for NoTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |p: &Path| escape_control(&p.to_string_lossy()).into_owned();
        match self {
            NoTrace::NotFound { program } => {
                write!(f, "{} was not found", show(Path::new(program)))
            }
            NoTrace::Static { path } => write!(
                f,
                "{} is statically linked: no dynamic loader runs to load leakhunt's library",
                show(path)
            ),
            NoTrace::OtherMachine { path, what } => write!(
                f,
                "{} is {what}: leakhunt's library is {}, and the loader skips it",
                show(path),
                own_machine()
            ),
            NoTrace::SecureMode { path, why } => write!(
                f,
                "{} is {why}: the loader runs it in secure mode and ignores LD_PRELOAD (unless the \
                 library is in a standard directory, named without a slash, and itself set-user-ID)",
                show(path)
            ),
            NoTrace::NotElf { path } => write!(
                f,
                "{} is neither an ELF executable nor a script starting with #!",
                show(path)
            ),
            NoTrace::Script {
                path,
                interpreter,
                cause,
            } => write!(
                f,
                "{} is a script run by {}; {cause}",
                show(path),
                show(interpreter)
            ),
        }
    }
}

/// The clause after "the program (pid N) sent no trace: " for `program` (as given to
/// `leakhunt run`, resolved through `PATH` like `execvp`): why it cannot be traced, or, when its
/// file shows no reason, that it exited before its first allocation or closed leakhunt's
/// connection.
pub fn why_no_trace(program: &OsStr) -> String {
    match diagnose(program) {
        Some(why) => why.to_string(),
        None => "it exited before its first allocation, or closed leakhunt's connection".into(),
    }
}

/// Why `program` cannot be traced, or `None` when its file shows no reason.
pub fn diagnose(program: &OsStr) -> Option<NoTrace> {
    let Some(path) = resolve(program) else {
        return Some(NoTrace::NotFound {
            program: program.to_owned(),
        });
    };
    diagnose_file(&path, 0)
}

/// Where `execvp` finds `program`: the path itself when it has a slash, else the first
/// executable regular file of that name in the directories of `PATH` (an empty entry is the
/// current directory; `/bin:/usr/bin` when `PATH` is unset).
pub fn resolve(program: &OsStr) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    std::env::split_paths(&path)
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".").join(program)
            } else {
                d.join(program)
            }
        })
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The kernel follows at most this many `#!` interpreters.
const MAX_SCRIPT_DEPTH: u32 = 4;

fn diagnose_file(path: &Path, depth: u32) -> Option<NoTrace> {
    let (head, meta, file) = read_head(path)?;
    if let Some(rest) = head.strip_prefix(b"#!") {
        if depth >= MAX_SCRIPT_DEPTH {
            return None;
        }
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let mut words = line
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty());
        let interpreter = PathBuf::from(OsStr::from_bytes(words.next()?));
        // `#!/usr/bin/env NAME`: env runs NAME, found through PATH.
        let run = if interpreter.file_name() == Some(OsStr::new("env")) {
            match words.find(|w| !w.starts_with(b"-")) {
                Some(name) => resolve(OsStr::from_bytes(name))?,
                None => interpreter.clone(),
            }
        } else {
            interpreter.clone()
        };
        let cause = diagnose_file(&run, depth + 1)?;
        return Some(NoTrace::Script {
            path: path.to_path_buf(),
            interpreter: run,
            cause: Box::new(cause),
        });
    }
    let Some(elf) = Elf::parse(&file, &head) else {
        return Some(NoTrace::NotElf {
            path: path.to_path_buf(),
        });
    };
    if !elf.has_interp {
        return Some(NoTrace::Static {
            path: path.to_path_buf(),
        });
    }
    if !elf.is_own_machine() {
        return Some(NoTrace::OtherMachine {
            path: path.to_path_buf(),
            what: elf.describe(),
        });
    }
    secure_mode(path, &meta).map(|why| NoTrace::SecureMode {
        path: path.to_path_buf(),
        why,
    })
}

/// The first 256 bytes of the regular file at `path` (what the kernel reads to choose how to
/// run it), its metadata and the open file; `None` when it cannot be read. Opened with
/// `O_NONBLOCK`, so that a FIFO never blocks.
fn read_head(path: &Path) -> Option<(Vec<u8>, std::fs::Metadata, std::fs::File)> {
    use rustix::fs::OFlags;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut head = Vec::new();
    (&file).take(256).read_to_end(&mut head).ok()?;
    Some((head, meta, file))
}

/// Why the loader would run the program at `path` in secure mode, if it would: the set-user-ID
/// bit of a file owned by another user than ours (the real one), the set-group-ID bit of
/// another group, or file capabilities for a user who is not root. None of these counts on a
/// file system mounted `nosuid` or when this process has `no_new_privs`.
fn secure_mode(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    let mode = meta.mode();
    if rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID))
        || no_new_privs()
    {
        return None;
    }
    let (uid, gid) = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    if mode & 0o4000 != 0 && meta.uid() != uid {
        return Some(format!(
            "set-user-ID, owned by uid {} (leakhunt runs as uid {uid})",
            meta.uid()
        ));
    }
    // Set-group-ID without group execute marks mandatory locking, not a change of group.
    if mode & 0o2010 == 0o2010 && meta.gid() != gid {
        return Some(format!(
            "set-group-ID, group gid {} (leakhunt runs as gid {gid})",
            meta.gid()
        ));
    }
    if uid != 0 {
        let mut buf = [0u8; 64];
        if rustix::fs::getxattr(path, "security.capability", &mut buf[..]).is_ok() {
            return Some("given file capabilities (security.capability)".into());
        }
    }
    None
}

/// Whether this process runs with `no_new_privs` (then exec grants no privileges).
fn no_new_privs() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().any(|l| {
            l.strip_prefix("NoNewPrivs:")
                .is_some_and(|v| v.trim() == "1")
        })
    })
}

/// What an ELF file's header and program headers say about how it runs.
struct Elf {
    /// 1: 32-bit, 2: 64-bit.
    class: u8,
    machine: u16,
    has_interp: bool,
}

const EM_386: u16 = 3;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

fn machine_name(m: u16) -> String {
    match m {
        EM_386 => "i386".into(),
        EM_ARM => "ARM".into(),
        EM_X86_64 => "x86-64".into(),
        EM_AARCH64 => "AArch64".into(),
        8 => "MIPS".into(),
        20 => "PowerPC".into(),
        21 => "PowerPC64".into(),
        22 => "S/390".into(),
        243 => "RISC-V".into(),
        m => format!("ELF machine {m}"),
    }
}

/// The machine of leakhunt's own library (the CLI's, built for the same target).
fn own_machine() -> String {
    format!("64-bit {}", machine_name(own_em()))
}

fn own_em() -> u16 {
    if cfg!(target_arch = "aarch64") {
        EM_AARCH64
    } else {
        EM_X86_64
    }
}

impl Elf {
    /// Parses the header in `head` (the file's first bytes) and the program headers (read from
    /// `file`): `None` when this is not an ELF file.
    fn parse(file: &std::fs::File, head: &[u8]) -> Option<Elf> {
        if head.len() < 52 || head[..4] != *b"\x7fELF" {
            return None;
        }
        let (class, big) = (head[4], head[5] == 2);
        let u16_at = |b: &[u8], at: usize| -> Option<u64> {
            let v: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
            Some(
                if big {
                    u16::from_be_bytes(v)
                } else {
                    u16::from_le_bytes(v)
                }
                .into(),
            )
        };
        let u32_at = |b: &[u8], at: usize| -> Option<u64> {
            let v: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
            Some(
                if big {
                    u32::from_be_bytes(v)
                } else {
                    u32::from_le_bytes(v)
                }
                .into(),
            )
        };
        let u64_at = |b: &[u8], at: usize| -> Option<u64> {
            let v: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
            Some(if big {
                u64::from_be_bytes(v)
            } else {
                u64::from_le_bytes(v)
            })
        };
        let machine = u16_at(head, 18)? as u16;
        let (phoff, phentsize, phnum) = match class {
            1 => (u32_at(head, 28)?, u16_at(head, 42)?, u16_at(head, 44)?),
            2 => (u64_at(head, 32)?, u16_at(head, 54)?, u16_at(head, 56)?),
            _ => return None,
        };
        // Program headers: read where they are (phnum < 0xffff, so at most ~4 MiB).
        let mut table = Vec::new();
        if phnum > 0 && phentsize >= 4 {
            let mut f = file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(phoff)).ok()?;
            f.take(phentsize * phnum).read_to_end(&mut table).ok()?;
        }
        const PT_INTERP: u64 = 3;
        let has_interp = (0..phnum)
            .filter_map(|i| u32_at(&table, (i * phentsize) as usize))
            .any(|t| t == PT_INTERP);
        Some(Elf {
            class,
            machine,
            has_interp,
        })
    }

    fn is_own_machine(&self) -> bool {
        self.class == 2 && self.machine == own_em()
    }

    /// "a 32-bit i386 program".
    fn describe(&self) -> String {
        let bits = if self.class == 1 { 32 } else { 64 };
        format!("a {bits}-bit {} program", machine_name(self.machine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn scratch(name: &str) -> PathBuf {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("target/test-scratch")
            .join(format!("program-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn run_ok(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_exe(path: &Path, text: &[u8]) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    const NONE: &str = "it exited before its first allocation, or closed leakhunt's connection";

    #[test]
    fn a_dynamically_linked_program_found_through_path_shows_no_reason() {
        let sh = resolve(OsStr::new("sh")).expect("sh is on PATH");
        assert_eq!(
            std::fs::canonicalize(&sh).unwrap(),
            std::fs::canonicalize("/bin/sh").unwrap()
        );
        assert_eq!(diagnose(OsStr::new("sh")), None);
        assert_eq!(why_no_trace(OsStr::new("/bin/sh")), NONE);
        assert_eq!(
            why_no_trace(OsStr::new("no-such-program-here")),
            "no-such-program-here was not found"
        );
    }

    #[test]
    fn a_statically_linked_program_and_a_script_it_runs() {
        let d = scratch("static");
        std::fs::write(d.join("hello.c"), "int main(void) { return 0; }\n").unwrap();
        let mut built = 0;
        for (name, flag) in [("static", "-static"), ("static-pie", "-static-pie")] {
            let exe = d.join(name);
            let out = Command::new("gcc")
                .arg(flag)
                .arg("-o")
                .arg(&exe)
                .arg(d.join("hello.c"))
                .output()
                .unwrap();
            if !out.status.success() {
                // No libc.a (or no static-pie support) on this machine.
                eprintln!("{flag}: {}", String::from_utf8_lossy(&out.stderr));
                continue;
            }
            built += 1;
            assert_eq!(
                why_no_trace(exe.as_os_str()),
                format!(
                    "{} is statically linked: no dynamic loader runs to load leakhunt's library",
                    exe.display()
                )
            );
        }
        let libc_a = Path::new("/usr/lib/x86_64-linux-gnu/libc.a");
        assert!(
            built == 2 || !libc_a.exists(),
            "gcc -static failed with {} present",
            libc_a.display()
        );
        if built == 0 {
            return;
        }
        // A script run by it, directly and through env; a script run by sh shows no reason.
        let exe = d.join("static");
        let script = d.join("script");
        for line in [
            format!("#!{}\n", exe.display()),
            format!("#! {} -x\n", exe.display()),
            format!("#!/usr/bin/env {}\n", exe.display()),
        ] {
            write_exe(&script, line.as_bytes());
            assert_eq!(
                why_no_trace(script.as_os_str()),
                format!(
                    "{} is a script run by {}; {} is statically linked: no dynamic loader runs to load leakhunt's library",
                    script.display(),
                    exe.display(),
                    exe.display()
                ),
                "{line}"
            );
        }
        write_exe(&script, b"#!/bin/sh\necho hi\n");
        assert_eq!(diagnose(script.as_os_str()), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn set_user_and_group_id_programs_of_others_run_in_secure_mode() {
        let d = scratch("setid");
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let other = if uid == 65534 { 65533 } else { 65534 };
        let copy = |name: &str| {
            let p = d.join(name);
            std::fs::copy("/bin/true", &p).unwrap();
            p
        };
        // Set-user-ID to ourselves changes nothing: no secure mode.
        let own = copy("own");
        run_ok(Command::new("chmod").arg("u+s").arg(&own));
        assert_eq!(std::fs::metadata(&own).unwrap().mode() & 0o4000, 0o4000);
        assert_eq!(diagnose(own.as_os_str()), None);
        if rustix::fs::statvfs(&d)
            .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID))
        {
            // Set-ID bits mean nothing on a nosuid mount.
            let theirs = copy("theirs");
            run_ok(Command::new("chmod").arg("ug+s").arg(&theirs));
            assert_eq!(diagnose(theirs.as_os_str()), None);
        } else if uid == 0 {
            // Root can give a copy to another user (chown clears the bit: chmod after).
            let theirs = copy("theirs");
            run_ok(
                Command::new("chown")
                    .arg(format!("{other}:{other}"))
                    .arg(&theirs),
            );
            run_ok(Command::new("chmod").arg("u+s").arg(&theirs));
            assert_eq!(
                why_no_trace(theirs.as_os_str()),
                format!(
                    "{} is set-user-ID, owned by uid {other} (leakhunt runs as uid 0): the loader runs it in secure mode and ignores LD_PRELOAD (unless the library is in a standard directory, named without a slash, and itself set-user-ID)",
                    theirs.display()
                )
            );
            let group = copy("group");
            run_ok(Command::new("chown").arg(format!("0:{other}")).arg(&group));
            run_ok(Command::new("chmod").arg("g+s").arg(&group));
            assert_eq!(
                diagnose(group.as_os_str()),
                Some(NoTrace::SecureMode {
                    path: group.clone(),
                    why: format!("set-group-ID, group gid {other} (leakhunt runs as gid {gid})")
                })
            );
            // Set-group-ID without group execute is a locking mark, not a change of group.
            run_ok(Command::new("chmod").arg("g-x").arg(&group));
            assert_eq!(diagnose(group.as_os_str()), None);
            // Root runs a set-user-ID-root program as root: no secure mode either.
            let su = Path::new("/bin/su");
            if std::fs::metadata(su).is_ok_and(|m| m.mode() & 0o4000 != 0 && m.uid() == 0) {
                assert_eq!(diagnose(su.as_os_str()), None);
            }
        } else {
            // Any set-user-ID-root program of the system is run in secure mode for us.
            let su = ["/bin/su", "/usr/bin/passwd", "/bin/mount"]
                .into_iter()
                .map(Path::new)
                .find(|p| {
                    std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o4000 != 0 && m.uid() == 0)
                })
                .expect("a set-user-ID-root program (su, passwd, mount)");
            assert!(
                matches!(diagnose(su.as_os_str()), Some(NoTrace::SecureMode { .. })),
                "{}",
                su.display()
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A 32-bit little-endian ELF header with one program header of type `ptype`.
    fn elf32(machine: u16, ptype: u32) -> Vec<u8> {
        let mut h = vec![0u8; 52 + 32];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1; // ELFCLASS32
        h[5] = 1; // little-endian
        h[6] = 1;
        h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[28..32].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
        h[42..44].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
        h[44..46].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        h[52..56].copy_from_slice(&ptype.to_le_bytes());
        h
    }

    #[test]
    fn another_machine_not_an_elf_file_and_what_cannot_be_read() {
        let d = scratch("kinds");
        let i386 = d.join("i386");
        write_exe(&i386, &elf32(EM_386, 3));
        assert_eq!(
            why_no_trace(i386.as_os_str()),
            format!(
                "{} is a 32-bit i386 program: leakhunt's library is 64-bit x86-64, and the loader skips it",
                i386.display()
            )
        );
        // The same without PT_INTERP (PT_LOAD only) is static first of all.
        write_exe(&i386, &elf32(EM_386, 1));
        assert_eq!(
            diagnose(i386.as_os_str()),
            Some(NoTrace::Static { path: i386.clone() })
        );
        let text = d.join("text");
        write_exe(&text, b"echo no shebang\n");
        assert_eq!(
            why_no_trace(text.as_os_str()),
            format!(
                "{} is neither an ELF executable nor a script starting with #!",
                text.display()
            )
        );
        // A FIFO never blocks, a directory is no program: nothing shown.
        let fifo = d.join("fifo");
        run_ok(Command::new("mkfifo").arg(&fifo));
        assert_eq!(diagnose(fifo.as_os_str()), None);
        assert_eq!(diagnose(d.as_os_str()), None);
        // A name with a control character is escaped.
        let odd = d.join("odd\nname");
        write_exe(&odd, b"plain text");
        assert_eq!(
            why_no_trace(odd.as_os_str()),
            format!(
                "{}/odd\\nname is neither an ELF executable nor a script starting with #!",
                d.display()
            )
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
