//! The jail directory `<base>/<exec-name>/<id>/root`: checks the base, copies the VMM binary
//! in, links each `--file`, makes the device nodes the VMM needs and hands ownership of what
//! the VMM writes to the unprivileged ids. Everything here happens on the host, before any
//! namespace exists; bind mounts that replace a failed hard link are only recorded here and
//! made inside the jail's mount namespace (`isolate.rs`), so they never leak to the host.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{chown, DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use nix::sys::stat::{mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};

/// Errors building the jail directory.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// The chroot base directory is unsafe to build jails in.
    #[error("bad chroot base {path}: {why}")]
    BadBase {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The jail root is already in use.
    #[error(
        "jail root {0} already exists and is not empty: another jail with this id ran or runs \
         here; remove the directory or pick another --id"
    )]
    NotEmpty(PathBuf),
    /// The binary to jail is missing or not a file.
    #[error("exec file {path}: {why}")]
    BadExecFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A `--file` source is missing or unusable.
    #[error("file to link into the jail {path}: {why}")]
    BadFile {
        /// The source path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// `--file` was malformed.
    #[error("bad --file `{0}`: {1}")]
    BadFileSpec(String, &'static str),
    /// /dev/kvm is missing on the host.
    #[error(
        "/dev/kvm is not available on this host ({0}): load the kvm module (kvm_intel, \
         kvm_amd) or run where KVM exists"
    )]
    NoKvm(String),
    /// A device node the VMM needs is missing on the host.
    #[error("host device {path} is missing or not a character device")]
    NoDevice {
        /// The host device path.
        path: PathBuf,
    },
    /// The exec file needs a dynamic loader that is not in the jail.
    #[error(
        "exec file {path} is dynamically linked (interpreter {interp}) and the jail has no \
         {interp}: build it static (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
         --target x86_64-unknown-linux-gnu) or add the loader and libraries with --file"
    )]
    Dynamic {
        /// The exec file.
        path: PathBuf,
        /// Its PT_INTERP.
        interp: String,
    },
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ChrootError + 'a {
    move |source| ChrootError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One `--file SRC[:DEST][:rw]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    /// The host file.
    pub src: PathBuf,
    /// Where it appears in the jail (absolute, no `..`).
    pub dest: PathBuf,
    /// Whether the VMM may write it (it is then chowned to the jail's ids).
    pub rw: bool,
}

impl FromStr for FileSpec {
    type Err = ChrootError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ChrootError::BadFileSpec(s.to_string(), why);
        let mut parts: Vec<&str> = s.split(':').collect();
        let rw = match parts.last() {
            Some(&"rw") if parts.len() > 1 => {
                parts.pop();
                true
            }
            Some(&"ro") if parts.len() > 1 => {
                parts.pop();
                false
            }
            _ => false,
        };
        let (src, dest) = match parts[..] {
            [src] => (src, None),
            [src, dest] => (src, Some(dest)),
            _ => return Err(bad("expected SRC[:DEST][:rw] (paths cannot contain ':')")),
        };
        if src.is_empty() {
            return Err(bad("empty source path"));
        }
        let src = PathBuf::from(src);
        let dest = match dest {
            Some(d) => PathBuf::from(d),
            None => Path::new("/").join(
                src.file_name()
                    .ok_or_else(|| bad("source has no file name"))?,
            ),
        };
        let mut comps = dest.components();
        if comps.next() != Some(Component::RootDir) {
            return Err(bad("DEST must be an absolute path inside the jail"));
        }
        let rest: Vec<Component> = comps.collect();
        if rest.is_empty() || rest.iter().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(bad("DEST must name a file below / without `.` or `..`"));
        }
        if matches!(rest[0], Component::Normal(n) if n == "dev" || n == "proc") {
            return Err(bad(
                "DEST cannot be under /dev or /proc (the jailer owns those)",
            ));
        }
        Ok(FileSpec { src, dest, rw })
    }
}

/// A `--file` that could not be hard-linked (another filesystem): bind-mount it inside the
/// jail's mount namespace.
#[derive(Clone, Debug)]
pub struct BindMount {
    /// The host file.
    pub src: PathBuf,
    /// The (empty) file in the jail directory it is mounted on, as a host path.
    pub target: PathBuf,
    /// Whether the mount stays writable.
    pub rw: bool,
    /// Whether mounts below `src` come along (read-write `--dir`s only: a read-only one
    /// would leave its submounts writable).
    pub recursive: bool,
}

/// What the jail is built from.
#[derive(Debug)]
pub struct JailSpec<'a> {
    /// `--chroot-base-dir`.
    pub base: &'a Path,
    /// `--exec-file`.
    pub exec_file: &'a Path,
    /// `--id`.
    pub id: &'a str,
    /// The unprivileged ids the VMM runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// `--file`s.
    pub files: &'a [FileSpec],
    /// `--dir`s: host directories bind-mounted into the jail.
    pub dirs: &'a [FileSpec],
    /// Make `/proc` for a procfs mount.
    pub mount_proc: bool,
}

/// A built jail directory.
#[derive(Debug)]
pub struct Jail {
    /// `<base>/<exec-name>/<id>`: holds the pid file, not visible in the jail.
    pub dir: PathBuf,
    /// `<dir>/root`: becomes `/` of the jail.
    pub root: PathBuf,
    /// The exec file's name: the binary is `/<exec_name>` in the jail.
    pub exec_name: String,
    /// Files to bind-mount inside the jail's mount namespace.
    pub binds: Vec<BindMount>,
}

impl Jail {
    /// Removes the jail root, the pid file and the id directory (after a failed start).
    pub fn remove(&self) {
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_file(self.dir.join(format!("{}.pid", self.exec_name)));
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Host devices made in the jail: (path, required).
const DEVICES: [(&str, bool); 3] = [
    ("/dev/kvm", true),
    ("/dev/net/tun", false),
    ("/dev/urandom", true),
];

/// The exec file's name, which names the jail's middle directory and the binary in it.
pub fn exec_name(exec_file: &Path) -> Result<String, ChrootError> {
    exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .map(String::from)
        .ok_or_else(|| ChrootError::BadExecFile {
            path: exec_file.into(),
            why: "has no UTF-8 file name".into(),
        })
}

/// Checks everything that can be checked without writing, then builds the jail. On error
/// nothing of the jail root is left behind.
pub fn build(spec: &JailSpec) -> Result<Jail, ChrootError> {
    let name = exec_name(spec.exec_file)?;
    check_exec(spec.exec_file)?;
    for f in spec.files {
        check_source(&f.src)?;
        if f.dest == Path::new("/").join(&name) {
            return Err(ChrootError::BadFileSpec(
                f.src.display().to_string(),
                "DEST clashes with the jailed binary",
            ));
        }
    }
    for d in spec.dirs {
        check_dir_source(&d.src)?;
        if d.dest == Path::new("/").join(&name) {
            return Err(ChrootError::BadFileSpec(
                d.src.display().to_string(),
                "DEST clashes with the jailed binary",
            ));
        }
    }
    let all: Vec<&FileSpec> = spec.files.iter().chain(spec.dirs).collect();
    for (i, f) in all.iter().enumerate() {
        if all[..i]
            .iter()
            .any(|g| f.dest.starts_with(&g.dest) || g.dest.starts_with(&f.dest))
        {
            return Err(ChrootError::BadFileSpec(
                f.dest.display().to_string(),
                "two --file/--dir entries share this DEST (or one is inside the other)",
            ));
        }
    }
    let devices = host_devices()?;

    let dirb = {
        let mut d = DirBuilder::new();
        d.mode(0o755);
        d
    };
    if !spec.base.exists() {
        let mut d = DirBuilder::new();
        d.mode(0o755).recursive(true);
        d.create(spec.base).map_err(io_err("create", spec.base))?;
    }
    check_safe_dir(spec.base)?;
    let nodev = statvfs(spec.base)
        .map_err(|e| io_err("statvfs", spec.base)(e.into()))?
        .flags()
        .contains(FsFlags::ST_NODEV);
    if nodev {
        return Err(ChrootError::BadBase {
            path: spec.base.into(),
            why: "its filesystem is mounted nodev, so /dev/kvm would not work in the jail".into(),
        });
    }
    let mut dir = spec.base.to_path_buf();
    for part in [name.as_str(), spec.id] {
        dir.push(part);
        match dirb.create(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("create", &dir)(e))
            }
            _ => {}
        }
        check_safe_dir(&dir)?;
    }
    let root = dir.join("root");
    match fs::read_dir(&root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ChrootError::NotEmpty(root));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            dirb.create(&root).map_err(io_err("create", &root))?;
        }
        Err(e) => return Err(io_err("read", &root)(e)),
    }
    let mut jail = Jail {
        dir,
        root,
        exec_name: name,
        binds: Vec::new(),
    };
    match fill(&mut jail, spec, &devices) {
        Ok(()) => Ok(jail),
        Err(e) => {
            jail.remove();
            Err(e)
        }
    }
}

fn fill(jail: &mut Jail, spec: &JailSpec, devices: &[(PathBuf, u64)]) -> Result<(), ChrootError> {
    let root = jail.root.clone();
    let dirb = {
        let mut d = DirBuilder::new();
        d.mode(0o755).recursive(true);
        d
    };
    // A copy, not a link: the host binary may be replaced or rebuilt while the VM runs, and
    // the jail's uid must not be able to touch the host's inode.
    let exe = root.join(&jail.exec_name);
    fs::copy(spec.exec_file, &exe).map_err(io_err("copy the exec file to", &exe))?;
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &exe))?;

    for f in spec.files {
        let target = root.join(f.dest.strip_prefix("/").unwrap_or(&f.dest));
        if let Some(parent) = target.parent() {
            dirb.create(parent).map_err(io_err("create", parent))?;
        }
        // link(2) does not follow symlinks: resolve them (e.g. /lib64/ld-linux-x86-64.so.2)
        // so the jail gets the file, not a link pointing outside it.
        let src = fs::canonicalize(&f.src).map_err(io_err("resolve", &f.src))?;
        match fs::hard_link(&src, &target) {
            Ok(()) => {}
            // Another filesystem (EXDEV), or a link the kernel refuses (EPERM with
            // fs.protected_hardlinks): mount it instead, read-only unless asked for rw.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::EPERM)) => {
                File::create(&target).map_err(io_err("create", &target))?;
                jail.binds.push(BindMount {
                    src: src.clone(),
                    target: target.clone(),
                    rw: f.rw,
                    recursive: false,
                });
            }
            Err(e) => return Err(io_err("hard-link the file to", &target)(e)),
        }
        if f.rw {
            // A hard link shares the host file's inode: this chowns the host file too,
            // which is what lets the VMM write it.
            chown(&src, Some(spec.uid), Some(spec.gid)).map_err(io_err("chown", &src))?;
        } else {
            warn_if_unreadable(&src, spec.uid, spec.gid);
        }
    }

    for d in spec.dirs {
        // Always a bind mount (a directory cannot be hard-linked); its owner and mode are
        // the caller's business.
        let target = root.join(d.dest.strip_prefix("/").unwrap_or(&d.dest));
        dirb.create(&target).map_err(io_err("create", &target))?;
        let src = fs::canonicalize(&d.src).map_err(io_err("resolve", &d.src))?;
        jail.binds.push(BindMount {
            src,
            target,
            rw: d.rw,
            recursive: d.rw,
        });
    }

    if let Some(interp) = elf_interpreter(spec.exec_file)? {
        let inside = root.join(interp.trim_start_matches('/'));
        if !inside.exists() {
            return Err(ChrootError::Dynamic {
                path: spec.exec_file.into(),
                interp,
            });
        }
    }

    for (host, rdev) in devices {
        let target = root.join(host.strip_prefix("/").unwrap_or(host));
        if let Some(parent) = target.parent() {
            dirb.create(parent).map_err(io_err("create", parent))?;
        }
        mknod(
            &target,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            *rdev,
        )
        .map_err(|e| io_err("mknod", &target)(e.into()))?;
        chown(&target, Some(spec.uid), Some(spec.gid)).map_err(io_err("chown", &target))?;
    }
    if spec.mount_proc {
        let p = root.join("proc");
        DirBuilder::new()
            .mode(0o555)
            .create(&p)
            .map_err(io_err("create", &p))?;
    }
    // The VMM creates its API socket and vsock sockets in the jail's / (e.g. /api.sock).
    chown(&root, Some(spec.uid), Some(spec.gid)).map_err(io_err("chown", &root))?;
    Ok(())
}

/// A jail base (and each directory under it) must be root's and not writable by others:
/// otherwise an unprivileged user could swap a jail's directories under the jailer.
fn check_safe_dir(path: &Path) -> Result<(), ChrootError> {
    let md = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let why = if !md.is_dir() {
        Some("not a directory (symlinks are refused)".to_string())
    } else if md.uid() != 0 {
        Some(format!("owned by uid {}, not root", md.uid()))
    } else if md.mode() & 0o002 != 0 {
        Some(format!("world-writable (mode {:o})", md.mode() & 0o7777))
    } else {
        None
    };
    match why {
        Some(why) => Err(ChrootError::BadBase {
            path: path.into(),
            why,
        }),
        None => Ok(()),
    }
}

fn check_exec(path: &Path) -> Result<(), ChrootError> {
    let bad = |why: String| ChrootError::BadExecFile {
        path: path.into(),
        why,
    };
    let md = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if md.mode() & 0o111 == 0 {
        return Err(bad("not executable".into()));
    }
    Ok(())
}

fn check_source(path: &Path) -> Result<(), ChrootError> {
    let bad = |why: String| ChrootError::BadFile {
        path: path.into(),
        why,
    };
    let md = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !(md.is_file() || md.file_type().is_block_device()) {
        return Err(bad("not a regular file or block device".into()));
    }
    Ok(())
}

fn check_dir_source(path: &Path) -> Result<(), ChrootError> {
    let bad = |why: String| ChrootError::BadFile {
        path: path.into(),
        why,
    };
    let md = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !md.is_dir() {
        return Err(bad("--dir needs a directory".into()));
    }
    Ok(())
}

fn warn_if_unreadable(path: &Path, uid: u32, gid: u32) {
    let Ok(md) = fs::metadata(path) else { return };
    let m = md.mode();
    let readable = m & 0o004 != 0
        || (md.uid() == uid && m & 0o400 != 0)
        || (md.gid() == gid && m & 0o040 != 0);
    if !readable {
        eprintln!(
            "jailer: warning: {} is not readable by uid {uid} gid {gid}; add :rw or chmod it",
            path.display()
        );
    }
}

/// The host's device numbers for the nodes the VMM needs.
fn host_devices() -> Result<Vec<(PathBuf, u64)>, ChrootError> {
    let mut out = Vec::new();
    for (path, required) in DEVICES {
        match fs::metadata(path) {
            Ok(md) if md.file_type().is_char_device() => out.push((PathBuf::from(path), md.rdev())),
            r if path == "/dev/kvm" => {
                let why = match r {
                    Ok(_) => "not a character device".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(ChrootError::NoKvm(why));
            }
            _ if required => return Err(ChrootError::NoDevice { path: path.into() }),
            _ => eprintln!("jailer: warning: {path} missing on this host; the jail has none"),
        }
    }
    Ok(out)
}

/// The PT_INTERP of a 64-bit little-endian ELF file, if it has one. Anything else (a static
/// binary, a script, a 32-bit ELF) gives `None`: the exec then succeeds or fails on its own.
pub fn elf_interpreter(path: &Path) -> Result<Option<String>, ChrootError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let at = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, off).ok().map(|()| b)
    };
    let Some(h) = at(0, 64) else { return Ok(None) };
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&h, 0x20);
    let phentsize = u64::from(u16_at(&h, 0x36));
    let phnum = u64::from(u16_at(&h, 0x38));
    if phentsize < 56 {
        return Ok(None);
    }
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let Some(ph) = at(phoff + i * phentsize, 56) else {
            return Ok(None);
        };
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP {
            continue;
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
        // A loader path longer than PATH_MAX is no loader.
        let len = usize::try_from(size.min(4096)).unwrap_or(4096);
        let Some(s) = at(off, len) else {
            return Ok(None);
        };
        let s = s.split(|b| *b == 0).next().unwrap_or_default();
        return Ok(Some(String::from_utf8_lossy(s).into_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<FileSpec, ChrootError> {
        s.parse()
    }

    #[test]
    fn file_specs() {
        let f = spec("/srv/img/vmlinux").unwrap();
        assert_eq!(
            (f.src.as_path(), f.dest.as_path(), f.rw),
            (Path::new("/srv/img/vmlinux"), Path::new("/vmlinux"), false)
        );
        let f = spec("/srv/disk.ext4:rw").unwrap();
        assert_eq!((f.dest.as_path(), f.rw), (Path::new("/disk.ext4"), true));
        let f = spec("/srv/disk.ext4:/images/root.ext4:rw").unwrap();
        assert_eq!(
            (f.dest.as_path(), f.rw),
            (Path::new("/images/root.ext4"), true)
        );
        let f = spec("/srv/initrd:/initrd:ro").unwrap();
        assert!(!f.rw);
        for bad in [
            "",
            ":rw",
            "/a:relative",
            "/a:/../etc/passwd",
            "/a:/",
            "/a:/dev/kvm",
            "/a:/proc/x",
            "/a:/b:/c",
        ] {
            assert!(spec(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interpreter_of_real_binaries() {
        // Debian's busybox is static, coreutils are not.
        if Path::new("/bin/busybox").exists() {
            assert_eq!(elf_interpreter(Path::new("/bin/busybox")).unwrap(), None);
        }
        let interp = elf_interpreter(Path::new("/bin/true")).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        let script = std::env::temp_dir().join(format!("jailer-script-{}", std::process::id()));
        fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(elf_interpreter(&script).unwrap(), None);
        fs::remove_file(script).unwrap();
    }
}
