//! The jailed child's last steps, run after the fork as PID 1 of the new PID namespace:
//! enter the network namespace, unshare mount/IPC/UTS, pivot into the jail root, set
//! rlimits, drop to the unprivileged ids with no way back, and exec the VMM. The parent's
//! part (cgroups, waiting) is in `mod.rs`.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{
    chdir, execve, pivot_root, setgroups, sethostname, setresgid, setresuid, Gid, Uid,
};

use super::chroot::BindMount;

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    /// A system call failed.
    #[error("{0}")]
    Sys(String, #[source] Errno),
    /// `--resource-limit` was malformed.
    #[error("bad --resource-limit `{0}`: expected fsize=N or no-file=N")]
    BadLimit(String),
    /// A file operation failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// `--netns` is not a network namespace.
    #[error("--netns {0}: {1}")]
    NotNetns(PathBuf, &'static str),
    /// An argument had a NUL byte.
    #[error("argument {0:?} contains a NUL byte")]
    Nul(OsString),
}

fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> IsolateError {
    let what = what.into();
    move |e| IsolateError::Sys(what, e)
}

/// One `--resource-limit NAME=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimit {
    /// Which limit.
    pub resource: LimitKind,
    /// Soft and hard value.
    pub value: u64,
}

/// The rlimits the jailer sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// RLIMIT_FSIZE: the largest file the VMM may write, in bytes.
    Fsize,
    /// RLIMIT_NOFILE: one more than the highest fd the VMM may open.
    NoFile,
}

impl FromStr for ResourceLimit {
    type Err = IsolateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IsolateError::BadLimit(s.to_string());
        let (k, v) = s.split_once('=').ok_or_else(bad)?;
        let resource = match k {
            "fsize" => LimitKind::Fsize,
            "no-file" | "nofile" => LimitKind::NoFile,
            _ => return Err(bad()),
        };
        let value = v.parse().map_err(|_| bad())?;
        Ok(ResourceLimit { resource, value })
    }
}

/// Everything the child needs to enter the jail and exec.
#[derive(Debug)]
pub struct Confinement {
    /// The jail root (host path).
    pub root: PathBuf,
    /// Hostname in the new UTS namespace.
    pub hostname: String,
    /// The unprivileged ids.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// An open network namespace to join.
    pub netns: Option<File>,
    /// Files to bind-mount (hard-link fallbacks).
    pub binds: Vec<BindMount>,
    /// Mount a fresh procfs at /proc.
    pub mount_proc: bool,
    /// Rlimits to set.
    pub limits: Vec<ResourceLimit>,
    /// The binary inside the jail (`/vmm`).
    pub exec: PathBuf,
    /// Its arguments (after argv[0]).
    pub args: Vec<OsString>,
    /// The signal mask to restore before exec.
    pub sigmask: SigSet,
    /// SIGKILL the VMM when the jailer (its parent) dies, so killing a non-daemonized
    /// jailer never leaves its VMM running unsupervised.
    pub die_with_parent: bool,
}

fn cstring(s: &std::ffi::OsStr) -> Result<CString, IsolateError> {
    CString::new(s.as_bytes()).map_err(|_| IsolateError::Nul(s.to_owned()))
}

const NONE: Option<&str> = None;

/// Enters the jail and execs. Returns only on error.
pub fn enter(c: &Confinement) -> Result<Infallible, IsolateError> {
    let exec = cstring(c.exec.as_os_str())?;
    let mut argv = vec![exec.clone()];
    for a in &c.args {
        argv.push(cstring(a)?);
    }

    if let Some(ns) = &c.netns {
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(sys("setns into the --netns namespace"))?;
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(sys("unshare mount, IPC and UTS namespaces"))?;
    sethostname(&c.hostname).map_err(sys("sethostname"))?;

    // Nothing mounted from here on may propagate back to the host.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .map_err(sys("make all mounts private"))?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(&c.root), &c.root, NONE, MsFlags::MS_BIND, NONE)
        .map_err(sys(format!("bind-mount {} onto itself", c.root.display())))?;
    for b in &c.binds {
        bind_file(b)?;
    }
    if c.mount_proc {
        // A fresh procfs: it shows only this PID namespace.
        let p = c.root.join("proc");
        mount(
            Some("proc"),
            &p,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            NONE,
        )
        .map_err(sys(format!("mount proc on {}", p.display())))?;
    }
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // only the jail (pivot_root(2), NOTES), with no old-root directory to create.
    chdir(&c.root).map_err(sys(format!("chdir {}", c.root.display())))?;
    pivot_root(".", ".").map_err(sys("pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?;
    chdir("/").map_err(sys("chdir /"))?;

    for l in &c.limits {
        let (r, name) = match l.resource {
            LimitKind::Fsize => (Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE"),
            LimitKind::NoFile => (Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE"),
        };
        setrlimit(r, l.value, l.value).map_err(sys(format!("setrlimit {name}={}", l.value)))?;
    }
    drop_bounding_set()?;
    // Groups first: after setresuid we could no longer change them.
    setgroups(&[]).map_err(sys("setgroups"))?;
    let (uid, gid) = (Uid::from_raw(c.uid), Gid::from_raw(c.gid));
    setresgid(gid, gid, gid).map_err(sys(format!("setresgid {}", c.gid)))?;
    setresuid(uid, uid, uid).map_err(sys(format!("setresuid {}", c.uid)))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;
    if c.die_with_parent {
        // After the id change, which would clear it (prctl(2)). The parent is alive: it
        // waits for our exec on the error pipe.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(sys("PR_SET_PDEATHSIG"))?;
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&c.sigmask), None)
        .map_err(sys("restore the signal mask"))?;

    let env: [CString; 0] = [];
    let e = execve(&exec, &argv, &env).map_err(sys(format!("exec {}", c.exec.display())));
    match e {
        Err(e) => Err(e),
        Ok(never) => match never {},
    }
}

fn bind_file(b: &BindMount) -> Result<(), IsolateError> {
    let what = || format!("bind-mount {} on {}", b.src.display(), b.target.display());
    let mut bind = MsFlags::MS_BIND;
    if b.recursive {
        bind |= MsFlags::MS_REC;
    }
    mount(Some(&b.src), &b.target, NONE, bind, NONE).map_err(sys(what()))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    if !b.rw {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(NONE, &b.target, NONE, flags, NONE).map_err(sys(format!("remount {}", what())))?;
    Ok(())
}

/// Drops every capability from the bounding set, so nothing exec'd later can regain one
/// even through a file capability (belt and braces with no_new_privs).
fn drop_bounding_set() -> Result<(), IsolateError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            match Errno::last() {
                // Past the kernel's last capability.
                Errno::EINVAL => break,
                e => return Err(IsolateError::Sys(format!("PR_CAPBSET_DROP {cap}"), e)),
            }
        }
    }
    Ok(())
}

/// Closes every fd above 2 the jailer inherited, so none leaks into the jail.
pub fn close_inherited_fds() -> Result<(), IsolateError> {
    // SAFETY: close_range only closes descriptors; nothing in this process holds one above 2
    // yet (this runs first thing in main).
    let r = unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.9: walk /proc/self/fd (collect first, the walk itself uses an fd).
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| IsolateError::Io("read /proc/self/fd".into(), e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fd was open when listed and no Rust object owns it; EBADF (the read_dir
        // fd, already closed) is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Opens `--netns` and checks it is a network namespace, so a wrong path is refused before
/// the jail is built rather than by setns in the child.
pub fn open_netns(path: &Path) -> Result<File, IsolateError> {
    let what = || format!("--netns {}", path.display());
    let f = File::open(path).map_err(|e| IsolateError::Io(what(), e))?;
    let fs = nix::sys::statfs::fstatfs(&f).map_err(sys(what()))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(IsolateError::NotNetns(path.into(), "not a namespace file"));
    }
    // ioctl_ns(2): NS_GET_NSTYPE = _IO(0xb7, 0x3) returns the CLONE_NEW* type.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: f is an open nsfs file; NS_GET_NSTYPE takes no argument and writes no memory.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if t != libc::CLONE_NEWNET {
        return Err(IsolateError::NotNetns(
            path.into(),
            "a namespace, but not a network one",
        ));
    }
    Ok(f)
}

/// Sets the calling (forked) process up as a daemon: own session, stdio on /dev/null.
pub fn daemonize() -> Result<(), IsolateError> {
    nix::unistd::setsid().map_err(sys("setsid"))?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| IsolateError::Io("open /dev/null".into(), e))?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; `null` stays
        // open for the duration of the call.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(IsolateError::Sys("dup2 /dev/null".into(), Errno::last()));
        }
    }
    Ok(())
}

/// The binary's path inside the jail.
pub fn jailed_exec(exec_name: &str) -> PathBuf {
    Path::new("/").join(exec_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_limits_parse() {
        let l: ResourceLimit = "fsize=1048576".parse().unwrap();
        assert_eq!((l.resource, l.value), (LimitKind::Fsize, 1_048_576));
        let l: ResourceLimit = "no-file=128".parse().unwrap();
        assert_eq!(l.resource, LimitKind::NoFile);
        for bad in ["fsize", "fsize=", "stack=1", "no-file=-1", "no-file=1k"] {
            assert!(bad.parse::<ResourceLimit>().is_err(), "{bad}");
        }
    }
}
