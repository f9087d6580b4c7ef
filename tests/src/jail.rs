//! Jail mode of the real-guest tests. With `VMM_TEST_JAILER=/path/to/jailer` in the
//! environment (`scripts/test.sh` sets it for its second real-guest pass), every `vmm` a test
//! starts through [`maybe_jailed`] runs under the jailer instead: its own chroot, PID, mount,
//! IPC and UTS namespaces, an unprivileged uid ([`UID`]), no capabilities, NoNewPrivs, and
//! the default seccomp filters.
//!
//! The tests name files by their host paths and expect the VMM's sockets and snapshot files
//! at host paths, so the jail shows those paths unchanged:
//! - the temp directory (`/tmp`, where every test keeps its scratch files) is bind-mounted
//!   read-write at the same path, with the mounts below it (a repository cloned under /tmp),
//!   and each test directory a `vmm` argument points into is handed to the jail's uid
//!   (recursively) before the start, the repository excepted;
//! - the guest artifacts (`target/guest`) are bind-mounted read-only at the same path;
//! - any other existing file named by an argument is linked in read-only at its path;
//! - the test process's umask becomes 0, so sockets and files the test makes later (vsock
//!   listeners, copies of images) are usable by the jail's uid.
//!
//! Without the variable, [`maybe_jailed`] returns the command unchanged.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{lchown, DirBuilderExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable naming the jailer binary.
pub const ENV: &str = "VMM_TEST_JAILER";
/// The uid (and gid) jailed VMMs run as.
pub const UID: u32 = 10123;
/// Where the jails are built (`VMM_TEST_JAIL_BASE` overrides it).
pub const DEFAULT_BASE: &str = "/run/vmm-test-jails";

/// A jailed start: where to find the VMM's own pid.
#[derive(Debug, Clone)]
pub struct JailInfo {
    /// The jailer's pid file of the VMM (a host pid).
    pub pid_file: PathBuf,
    /// The jail's root directory on the host.
    pub root: PathBuf,
}

impl JailInfo {
    /// The VMM's host pid, once the jailer has written it (at most 30 s).
    pub fn vmm_pid(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the jailer wrote no {}",
                self.pid_file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The jailer binary, when jail mode is on.
pub fn jailer() -> Option<PathBuf> {
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The uid a test must give host resources the VMM opens (e.g. `ip tuntap add ... user
/// UID`), when jail mode is on.
pub fn jail_uid() -> Option<u32> {
    jailer().map(|_| UID)
}

/// How a process that was killed by `signal` shows to its parent: the signal itself, or,
/// under the jailer (which exits with the VMM's status as a shell would), 128 + signal.
pub fn killed_by(status: std::process::ExitStatus, signal: i32) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal) || (jailer().is_some() && status.code() == Some(128 + signal))
}

/// `cmd` (a `vmm` command with all its arguments, stdio not yet set) unchanged, or, in jail
/// mode, the jailer command that runs it confined, with where the VMM's pid will be.
pub fn maybe_jailed(cmd: Command) -> (Command, Option<JailInfo>) {
    let Some(jailer) = jailer() else {
        return (cmd, None);
    };
    static UMASK: OnceLock<()> = OnceLock::new();
    UMASK.get_or_init(|| {
        // SAFETY: umask only changes this process's file-creation mask.
        unsafe { libc::umask(0) };
    });
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var_os("VMM_TEST_JAIL_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_BASE.into());
    let mut d = fs::DirBuilder::new();
    d.recursive(true).mode(0o755);
    d.create(&base)
        .unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    let exe = staged_binary(Path::new(cmd.get_program()));
    let id = format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let args: Vec<OsString> = cmd.get_args().map(OsStr::to_os_string).collect();

    let tmp = std::env::temp_dir();
    let guest = crate::repo_root().join("target/guest");
    // Read-only directories shown at their own paths: the guest artifacts, and where the
    // symlinks among them point (the kernel cache).
    // (When the repository itself is under the temp directory, as a CI clone in /tmp is,
    // the temp directory's recursive bind shows the artifacts already.)
    let repo = crate::repo_root();
    let mut ro_dirs = Vec::new();
    if guest.is_dir() {
        ro_dirs.push(guest.clone());
        ro_dirs.extend(symlink_target_dirs(&guest));
    }
    ro_dirs.retain(|d| !d.starts_with(&tmp));
    let mut files = Vec::new();
    let mut owned = Vec::new();
    for p in args.iter().flat_map(|a| paths_in(a)) {
        if p.starts_with(&repo) || ro_dirs.iter().any(|d| p.starts_with(d)) {
            // Visible through the binds; never handed over (it is the build tree).
            continue;
        }
        if let Some(top) = top_dir_under(&p, &tmp) {
            if !owned.contains(&top) && !repo.starts_with(&top) {
                owned.push(top);
            }
        } else if p.is_file() && !files.contains(&p) {
            files.push(p);
        }
    }
    for dir in &owned {
        chown_tree(dir);
    }
    for lib in shared_libraries(&exe) {
        if !files.contains(&lib) {
            files.push(lib);
        }
    }

    let mut j = Command::new(jailer);
    j.arg("--id")
        .arg(&id)
        .arg("--exec-file")
        .arg(&exe)
        .args(["--uid", &UID.to_string(), "--gid", &UID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base)
        .arg("--mount-proc")
        .arg("--dir")
        .arg(format!("{}:{}:rw", tmp.display(), tmp.display()));
    for dir in &ro_dirs {
        j.arg("--dir")
            .arg(format!("{}:{}", dir.display(), dir.display()));
    }
    for f in &files {
        j.arg("--file")
            .arg(format!("{}:{}", f.display(), f.display()));
    }
    j.arg("--").args(&args);
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    let dir = base.join(&*name).join(&id);
    let info = JailInfo {
        pid_file: dir.join(format!("{name}.pid")),
        root: dir.join("root"),
    };
    (j, Some(info))
}

/// A stripped copy of the VMM binary on a local filesystem, made once per test process: the
/// jailer copies it into every jail (the unstripped test build is ~60 MiB of debug info,
/// and the test host reads the build tree over 9p).
fn staged_binary(program: &Path) -> PathBuf {
    static STAGED: OnceLock<PathBuf> = OnceLock::new();
    STAGED
        .get_or_init(|| {
            let dir = PathBuf::from(format!("/run/vmm-test-bin-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            let name = program.file_name().unwrap_or(OsStr::new("vmm"));
            let dst = dir.join(name);
            let stripped = Command::new("strip")
                .arg("-o")
                .arg(&dst)
                .arg(program)
                .status()
                .is_ok_and(|s| s.success());
            if !stripped {
                fs::copy(program, &dst).unwrap_or_else(|e| {
                    panic!("copy {} to {}: {e}", program.display(), dst.display())
                });
            }
            dst
        })
        .clone()
}

/// Absolute paths in one argument: the argument itself, or the values of its `key=value`
/// comma-separated parts (`--drive path=/x,id=y`, `--vsock cid=3,uds=/s`), plus, for a small
/// JSON file (a `--config`), every absolute path string inside it.
fn paths_in(arg: &OsStr) -> Vec<PathBuf> {
    let Some(s) = arg.to_str() else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = s
        .split(',')
        .map(|part| part.split_once('=').map_or(part, |(_, v)| v))
        .filter(|v| v.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    let mut nested = Vec::new();
    for p in &out {
        let small = fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() < 1 << 20);
        if small && p.extension() == Some(OsStr::new("json")) {
            if let Ok(text) = fs::read_to_string(p) {
                nested.extend(json_paths(&text));
            }
        }
    }
    out.extend(nested);
    out
}

/// Every string of the form `"/..."` in a JSON text (good enough for config files).
fn json_paths(text: &str) -> Vec<PathBuf> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/') && !s.contains('\\'))
        .map(PathBuf::from)
        .collect()
}

/// `root/<first component of p below root>`, when `p` lies strictly below `root`.
fn top_dir_under(p: &Path, root: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix(root).ok()?;
    match rest.components().next()? {
        Component::Normal(first) if rest.components().count() > 1 || p.is_dir() => {
            Some(root.join(first))
        }
        _ => None,
    }
}

/// The directories the symlinks in `dir` point into (outside `dir`), each once.
fn symlink_target_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
        let target = fs::canonicalize(e.path()).ok();
        if let (true, Some(parent)) = (is_link, target.as_deref().and_then(Path::parent)) {
            if !parent.starts_with(dir) && !out.iter().any(|d| d == parent) {
                out.push(parent.to_path_buf());
            }
        }
    }
    out
}

/// Hands a test directory and everything in it to the jail's uid.
fn chown_tree(p: &Path) {
    let Ok(md) = fs::symlink_metadata(p) else {
        return;
    };
    let _ = lchown(p, Some(UID), Some(UID));
    if md.is_dir() {
        if let Ok(entries) = fs::read_dir(p) {
            for e in entries.flatten() {
                chown_tree(&e.path());
            }
        }
    }
}

/// The loader and libraries a dynamic binary needs (from `ldd`).
fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect();
    libs.dedup();
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_found_in_flag_values() {
        let got = paths_in(OsStr::new("path=/tmp/a/disk.img,id=root,readonly=false"));
        assert_eq!(got, [PathBuf::from("/tmp/a/disk.img")]);
        assert_eq!(paths_in(OsStr::new("/x/y")), [PathBuf::from("/x/y")]);
        assert!(paths_in(OsStr::new("--vcpus")).is_empty());
        assert_eq!(
            json_paths(r#"{"kernel_image_path": "/k", "x": "rel", "uds_path": "/tmp/s"}"#),
            [PathBuf::from("/k"), PathBuf::from("/tmp/s")]
        );
    }

    #[test]
    fn the_test_directory_under_tmp_is_the_one_handed_over() {
        let tmp = Path::new("/tmp");
        assert_eq!(
            top_dir_under(Path::new("/tmp/vmm-test-1/a/b.sock"), tmp),
            Some(PathBuf::from("/tmp/vmm-test-1"))
        );
        assert_eq!(top_dir_under(Path::new("/tmp"), tmp), None);
        assert_eq!(top_dir_under(Path::new("/var/x"), tmp), None);
        // A file directly in /tmp is not a test directory.
        assert_eq!(top_dir_under(Path::new("/tmp/nonexistent.sock"), tmp), None);
    }
}
