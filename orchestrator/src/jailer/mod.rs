//! The jailer: confines one `vmm` process. It builds a per-VM directory holding a copy of
//! the binary, its files and device nodes (`chroot.rs`), puts it in its own cgroups
//! (`cgroup.rs`), forks into new PID/mount/IPC/UTS namespaces and execs the VMM there as
//! PID 1, unprivileged, with no way to regain privileges (`isolate.rs`).
//!
//! The parent stays behind (unless `--daemonize`): it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT
//! to the VMM, exits with its status and removes the per-VM cgroups; if it is killed, the
//! kernel kills the VMM too (parent-death signal). The jail directory is
//! left for the caller, who may want the sockets, logs or snapshot files in it.

pub mod cgroup;
pub mod chroot;
pub mod isolate;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use cgroup::{CgroupPlan, CgroupSetting, CgroupVersionArg, Cgroups};
use chroot::{FileSpec, Jail, JailSpec};
use isolate::{Confinement, ResourceLimit};

const AFTER_HELP: &str = "\
Steps, in order: close inherited fds above 2 and clear the environment; build the jail
directory <chroot-base-dir>/<exec-file name>/<id>/root with a copy of --exec-file, each
--file (hard link, or a bind mount when on another filesystem), a mount point per --dir
and /dev/kvm, /dev/net/tun, /dev/urandom nodes owned by --uid/--gid; create the cgroups and write the limits; enter
--netns; unshare PID, mount, IPC and UTS namespaces and fork: the child is PID 1 there; make
mounts private, pivot_root into the jail; set rlimits; drop every capability, setgroups([]),
setgid, setuid; set no_new_privs; exec /<exec-file name> VMM_ARGS with an empty environment.
Without --daemonize the jailer waits, passes SIGTERM/SIGINT/SIGHUP/SIGQUIT on, and exits with
the VMM's status (128+N if a signal N killed it); if the jailer itself is killed, so is the
VMM.

VMM_ARGS are seen from inside the jail: name files by their jail path. A socket the VMM
creates at /api.sock is reachable from the host at <chroot-base-dir>/vmm/<id>/root/api.sock.

Example:
  jailer --id vm1 --exec-file /usr/local/bin/vmm --uid 10001 --gid 10001 \\
    --file /srv/img/vmlinux --file /srv/img/rootfs.ext4:rw \\
    --cgroup memory.max=536870912 --cgroup cpu.max='100000 100000' --cgroup pids.max=64 \\
    --resource-limit no-file=1024 --netns /var/run/netns/vm1 \\
    -- --kernel /vmlinux --drive path=/rootfs.ext4,id=rootfs,root=true --api-sock /api.sock";

/// Command line of the `jailer` binary.
#[derive(Debug, Parser)]
#[command(
    name = "jailer",
    version,
    about = "Run one vmm confined: chroot (pivot_root), namespaces, cgroups, rlimits, unprivileged.",
    after_long_help = AFTER_HELP
)]
pub struct JailerArgs {
    /// VM id: 1-64 of [A-Za-z0-9_-]. Names the jail directory, the cgroup and the hostname.
    #[arg(long, value_name = "VMID", value_parser = parse_id)]
    pub id: String,
    /// The VMM binary; it is copied into the jail as /<file name>. It must be static, or
    /// its loader and libraries must be added with --file.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// Uid the VMM runs as (not 0).
    #[arg(long, value_name = "N", value_parser = parse_unprivileged)]
    pub uid: u32,
    /// Gid the VMM runs as (not 0).
    #[arg(long, value_name = "N", value_parser = parse_unprivileged)]
    pub gid: u32,
    /// Where jails live; created if missing. Must be owned by root and not world-writable.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to run the VMM in (e.g. one made by `ip netns add`).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Cgroup interface: 1, 2, or auto (v1 when a v1 controller hierarchy is mounted).
    #[arg(long, value_name = "1|2|auto", default_value = "auto")]
    pub cgroup_version: CgroupVersionArg,
    /// A cgroup limit in v2 names, repeatable: memory.max=BYTES, cpu.max="QUOTA PERIOD"
    /// (microseconds), pids.max=N; translated for v1. Other <controller>.<file>=VALUE are
    /// written as given.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    pub cgroups: Vec<CgroupSetting>,
    /// Cgroup under which <id> is created. Relative: below the jailer's own cgroup;
    /// absolute: from the hierarchy root. Default: the exec file's name.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// An rlimit, repeatable: fsize=BYTES or no-file=N (soft = hard).
    #[arg(long = "resource-limit", value_name = "NAME=N")]
    pub resource_limits: Vec<ResourceLimit>,
    /// A host file to put in the jail, repeatable: SRC[:DEST][:rw]. DEST defaults to
    /// /<file name of SRC>. `rw` files (disks) are chowned to --uid/--gid, which changes the
    /// host file's owner since the jail shares its inode.
    #[arg(long = "file", value_name = "SRC[:DEST][:rw]")]
    pub files: Vec<FileSpec>,
    /// A host directory to bind-mount in the jail, repeatable: SRC[:DEST][:rw]. DEST
    /// defaults to /<name of SRC>; read-only unless `rw`. Unlike --file it is not chowned:
    /// make it writable for --uid/--gid yourself (e.g. a per-VM state directory for
    /// snapshots). Everything below SRC becomes visible to the VMM; a `rw` one includes the
    /// mounts below SRC, a read-only one does not (they would stay writable).
    #[arg(long = "dir", value_name = "SRC[:DEST][:rw]")]
    pub dirs: Vec<FileSpec>,
    /// Mount a fresh /proc (of the new PID namespace) in the jail. vmm runs without one but
    /// then skips its host-memory check (/proc/meminfo) and writes snapshots without
    /// skipping unpopulated pages (/proc/self/pagemap).
    #[arg(long)]
    pub mount_proc: bool,
    /// Detach: the VMM gets its own session and /dev/null as stdio; the jailer exits once
    /// it is started (the cgroups are then the caller's to remove).
    #[arg(long)]
    pub daemonize: bool,
    /// Print the jail's paths and the VMM's pid as one JSON line on stdout instead of a
    /// sentence on stderr.
    #[arg(long)]
    pub json: bool,
    /// Arguments for the VMM, after `--`.
    #[arg(last = true, value_name = "VMM_ARGS")]
    pub vmm_args: Vec<OsString>,
}

fn parse_id(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err("an id is 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'".into())
    }
}

fn parse_unprivileged(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is root: the jailed VMM must run as an unprivileged user".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// What a started jail reports.
#[derive(Debug, serde::Serialize)]
struct Started<'a> {
    id: &'a str,
    jail_dir: &'a Path,
    jail_root: &'a Path,
    exec: &'a Path,
    pid: i32,
    pid_file: &'a Path,
    cgroups: &'a [PathBuf],
}

/// Runs the jailer; returns the exit status to use (the VMM's, when not daemonized).
pub fn run(args: JailerArgs) -> anyhow::Result<i32> {
    isolate::close_inherited_fds().context("close inherited fds")?;
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    umask(Mode::from_bits_truncate(0o022));
    if !nix::unistd::geteuid().is_root() {
        bail!("the jailer must run as root (it mounts, makes device nodes and changes ids)");
    }

    let name = chroot::exec_name(&args.exec_file)?;
    let plan = if args.cgroups.is_empty() {
        None
    } else {
        let parent = args.parent_cgroup.clone().unwrap_or_else(|| name.clone());
        Some(
            CgroupPlan::new(&args.cgroups, args.cgroup_version, &parent, &args.id)
                .context("cgroups")?,
        )
    };
    let netns = match &args.netns {
        Some(p) => Some(isolate::open_netns(p)?),
        None => None,
    };
    let jail = chroot::build(&JailSpec {
        base: &args.chroot_base_dir,
        exec_file: &args.exec_file,
        id: &args.id,
        uid: args.uid,
        gid: args.gid,
        files: &args.files,
        dirs: &args.dirs,
        mount_proc: args.mount_proc,
    })?;
    let cgroups = match plan.as_ref().map(CgroupPlan::create).transpose() {
        Ok(c) => c,
        Err(e) => {
            jail.remove();
            return Err(anyhow::Error::new(e).context("cgroups"));
        }
    };
    let started = start(&args, &jail, cgroups.as_ref(), netns);
    if started.is_err() {
        if let Some(c) = &cgroups {
            c.remove();
        }
        jail.remove();
    }
    let child = started?;
    if args.daemonize {
        return Ok(0);
    }
    let code = wait_forwarding(child);
    if let Some(c) = &cgroups {
        // A VMM over its memory limit dies by SIGKILL with nothing of its own on stderr:
        // say why, naming the limit.
        if let Some(why) = c.oom_report() {
            eprintln!("jailer: error: vm {}: {why}", args.id);
        }
        c.remove();
    }
    code
}

/// Signals the parent passes on to the VMM; SIGCHLD tells it the VMM is gone.
fn parent_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        s.add(sig);
    }
    s
}

/// Forks the jailed child and, once it is placed in its cgroups, reports it and lets it go
/// on. Returns once the child has exec'd the VMM, or fails with the child's error.
fn start(
    args: &JailerArgs,
    jail: &Jail,
    cgroups: Option<&Cgroups>,
    netns: Option<File>,
) -> anyhow::Result<Pid> {
    let exec = isolate::jailed_exec(&jail.exec_name);
    // Blocked before the fork so a signal cannot kill the parent between fork and wait;
    // the child restores the old mask just before exec.
    let mut old = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&parent_signals()),
        Some(&mut old),
    )
    .context("block signals")?;
    let conf = Confinement {
        root: jail.root.clone(),
        hostname: args.id.clone(),
        uid: args.uid,
        gid: args.gid,
        netns,
        binds: jail.binds.clone(),
        mount_proc: args.mount_proc,
        limits: args.resource_limits.clone(),
        exec: exec.clone(),
        args: args.vmm_args.clone(),
        sigmask: old,
        die_with_parent: !args.daemonize,
    };
    // Affects our children only: the first one is PID 1 of the new namespace.
    unshare(CloneFlags::CLONE_NEWPID).context("unshare the PID namespace")?;
    let (wait_rx, go_tx) = pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    // Close-on-exec: EOF without a message means the exec succeeded.
    let (err_rx, err_tx) = pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: the jailer is single-threaded (no thread is ever spawned), so the child may
    // run any code after fork.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(go_tx);
            drop(err_rx);
            child(wait_rx, err_tx, args.daemonize, &conf)
        }
        ForkResult::Parent { child } => {
            drop(wait_rx);
            drop(err_tx);
            let placed = cgroups.map_or(Ok(()), |c| c.join(child.as_raw()));
            let pid_file = jail.dir.join(format!("{}.pid", jail.exec_name));
            let started = Started {
                id: &args.id,
                jail_dir: &jail.dir,
                jail_root: &jail.root,
                exec: &exec,
                pid: child.as_raw(),
                pid_file: &pid_file,
                cgroups: cgroups.map_or(&[], Cgroups::dirs),
            };
            let reported = placed
                .context("cgroups")
                .and_then(|()| {
                    std::fs::write(&pid_file, format!("{child}\n"))
                        .with_context(|| format!("write {}", pid_file.display()))
                })
                // The JSON line goes out before the VMM can write to the same stdout.
                .and_then(|()| match args.json {
                    true => report_json(&started),
                    false => Ok(()),
                });
            if let Err(e) = reported {
                // Its pipe closes unwritten: the child exits without running anything.
                drop(go_tx);
                let _ = waitpid(child, None);
                return Err(e);
            }
            // One byte means "go"; EOF without it means "give up".
            nix::unistd::write(&go_tx, b"g").context("release the jailed child")?;
            drop(go_tx);
            let mut msg = String::new();
            File::from(err_rx)
                .read_to_string(&mut msg)
                .context("read the jailed child's status")?;
            if !msg.is_empty() {
                let _ = waitpid(child, None);
                bail!("in the jail: {msg}");
            }
            if !args.json {
                eprintln!(
                    "jailer: {} runs as pid {} in {}; its /api.sock is {}/api.sock on the host",
                    args.id,
                    child,
                    jail.root.display(),
                    jail.root.display()
                );
            }
            Ok(child)
        }
    }
}

fn report_json(s: &Started) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, s).context("write the report")?;
    writeln!(out)
        .and_then(|()| out.flush())
        .context("write the report")
}

/// The forked child: waits for the parent's go, then enters the jail and execs. Never
/// returns; a failure goes to the parent over `err_tx` (stderr may be /dev/null by then).
fn child(wait_rx: OwnedFd, err_tx: OwnedFd, daemonize: bool, conf: &Confinement) -> ! {
    let mut b = [0u8; 1];
    if !matches!(nix::unistd::read(&wait_rx, &mut b), Ok(1)) {
        // SAFETY: _exit ends this forked child without running the parent's atexit work.
        unsafe { libc::_exit(1) };
    }
    drop(wait_rx);
    let err = if daemonize {
        isolate::daemonize().err()
    } else {
        None
    };
    let err = match err {
        Some(e) => e,
        None => match isolate::enter(conf) {
            Err(e) => e,
            Ok(never) => match never {},
        },
    };
    let msg = format!("{:#}", anyhow::Error::new(err));
    let _ = nix::unistd::write(&err_tx, msg.as_bytes());
    // SAFETY: as above.
    unsafe { libc::_exit(1) }
}

/// Waits for the VMM, passing on termination signals; returns its status as a shell would.
fn wait_forwarding(child: Pid) -> anyhow::Result<i32> {
    let set = parent_signals();
    loop {
        let sig = set.wait().context("sigwait")?;
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            continue;
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)).context("waitpid")? {
            WaitStatus::Exited(_, code) => return Ok(code),
            WaitStatus::Signaled(_, s, _) => return Ok(128 + s as i32),
            _ => continue,
        }
    }
}
