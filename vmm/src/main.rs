//! `vmm`: boots a Linux kernel on KVM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use seccomp::{SeccompLevel, SeccompSettings};
use vmm::api::{
    DriveOverride, MemBackend, MemBackendType, NetworkOverride, SnapshotLoadParams, VsockOverride,
};
use vmm::config::{host_mem_mib, ConsoleTarget, HugePages, VmConfig};
use vmm::runtime::{self, EndReason, RunOutcome, Vmm};

/// Boots a Linux kernel directly on KVM: no firmware, no PCI, no ACPI.
///
/// The VM is described by flags, by a JSON file (--config, the shape of Firecracker's
/// config file: "boot-source", "machine-config"), or both; flags override the file.
/// The guest's serial console (ttyS0) goes to stdout by default.
///
/// The VMM exits when the guest reboots or powers off (status 0), when it gets SIGTERM,
/// SIGINT or SIGHUP (it stops the guest; status 128+signal), or on a KVM or device fault
/// (status 1, with the reason on stderr). guest-init reports its command's exit status on
/// the status port; --exit-with-guest-status makes it the VMM's own status.
///
/// With --api-sock the VMM also serves its control API there (REST over a unix socket,
/// shaped like Firecracker's; see README, "Control API"): pause/resume, metrics, and,
/// without --kernel or --config, the VM's configuration and start.
///
/// With --restore the VM comes from a snapshot (PUT /snapshot/create) instead of a kernel:
/// its vCPUs, memory and devices continue where they were. It stays paused until
/// resumed (--resume, or PATCH /vm over --api-sock).
///
/// Each of the VMM's threads runs under a seccomp filter of its own from before the guest
/// runs (--seccomp-level, default 2).
///
/// Examples:
///   vmm --kernel vmlinux --initrd initramfs.cpio --vcpus 2 --memory-mib 256 \
///       --cmdline "console=ttyS0 reboot=k panic=-1 gi.cmd=\"busybox uname -a\""
///   vmm --api-sock /tmp/vmm.sock --console /tmp/console.log
///   vmm --restore vm1/vmstate --memory vm1/memory --resume \
///       --drive-override rootfs=vm7/rootfs.ext4 --vsock-override /run/vm7/v.sock
#[derive(Parser, Debug)]
#[command(name = "vmm", version, verbatim_doc_comment)]
struct Cli {
    /// Kernel: an ELF vmlinux (booted through its PVH entry when it has one) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initramfs (newc cpio, optionally compressed) loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"]. At most 2047
    /// bytes including what the VMM appends (gi.statusport=0x440).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,

    /// Number of vCPUs, 1 to 254 [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u16>,

    /// Guest RAM in MiB [default: 128]. Above 3072 MiB, RAM continues above the 4 GiB line
    /// (the 3-4 GiB hole holds device MMIO).
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,

    /// Back guest RAM with 2 MiB huge pages (needs pages in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,

    /// Do not advise transparent huge pages (MADV_HUGEPAGE) on guest RAM. By default the
    /// VMM does, as qemu does: the guest boots with far fewer second-level page faults, and
    /// the host grants its memory in 2 MiB steps. Turn it off to pack many small, mostly
    /// idle guests more tightly (on a host whose THP mode is "always" the kernel may still
    /// use huge pages).
    #[arg(long)]
    no_thp: bool,

    /// Serial console output: "stdout", "none", or a file path (appended).
    #[arg(long, value_name = "stdout|none|PATH")]
    console: Option<String>,

    /// A virtio-blk disk backed by a raw image; repeat for more disks. The id is also the
    /// serial the guest reads in /sys/block/vdX/serial (at most 20 bytes). root=true makes
    /// it /dev/vda and appends "root=/dev/vda rw" (or "ro") to the command line.
    #[arg(long, value_name = "path=PATH,id=ID[,readonly=BOOL][,root=BOOL]")]
    drive: Vec<String>,

    /// A virtio-net device on an existing host tap (opened with IFF_VNET_HDR; checksum and
    /// TSO offloads negotiated with the guest); repeat for more NICs. Without mac= a random
    /// locally administered MAC is used. Configure the guest's address with the kernel's
    /// ip= parameter, e.g. ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,mtu=N][,id=ID]")]
    net: Vec<String>,

    /// A virtio-vsock device with guest context id N. Host side (Firecracker-compatible):
    /// connect to PATH and write "CONNECT <port>\n" to reach a guest listener (answer
    /// "OK <host_port>\n"); guest connections to CID 2 port P go to the unix socket PATH_P.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,

    /// Do not attach the virtio-rng device (attached by default so the guest never waits
    /// for entropy).
    #[arg(long)]
    no_rng: bool,

    /// JSON file describing the whole VM (see README, "vmm config file").
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the time from VMM start to guest-init's ready mark on stderr.
    #[arg(long)]
    boot_timer: bool,

    /// Exit with the guest command's exit status (reported by guest-init on the status
    /// port) instead of 0 when the guest ends normally.
    #[arg(long)]
    exit_with_guest_status: bool,

    /// Serve the control API on this unix socket (created mode 0600, removed at exit) for
    /// the VMM's whole life. With --kernel or --config the VM boots at once and the API
    /// controls it (pause/resume, metrics); without, the VMM waits: configure the VM with
    /// PUT /boot-source, /machine-config, /drives/ID, /network-interfaces/ID, /vsock,
    /// /entropy, then PUT /actions {"action_type": "InstanceStart"}. Other flags given set
    /// the starting configuration (e.g. --console). A stale socket file is replaced; one a
    /// live process listens on is refused.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Restore the VM from this snapshot vmstate file (written by PUT /snapshot/create)
    /// instead of booting a kernel; needs --memory. The file is checked (magic, version,
    /// checksum) and the memory file's size matched before anything runs. The VM stays
    /// paused until resumed: --resume, or PATCH /vm {"state": "Resumed"} over --api-sock.
    /// Devices reopen their backends at the saved paths (drive files, taps, vsock socket)
    /// unless overridden below. Only --console, --boot-timer, --api-sock and
    /// --exit-with-guest-status combine with it; the machine and devices are the snapshot's.
    #[arg(
        long,
        value_name = "VMSTATE",
        requires = "memory",
        conflicts_with_all = [
            "kernel", "initrd", "cmdline", "vcpus", "memory_mib", "hugepages", "no_thp", "drive",
            "net", "vsock", "no_rng", "config",
        ],
    )]
    restore: Option<PathBuf>,

    /// The snapshot's guest memory file, for --restore. It is mapped copy-on-write: guest
    /// RAM loads lazily, the file never changes, and VMs restored from one file share its
    /// page cache.
    #[arg(long, value_name = "MEMFILE", requires = "restore")]
    memory: Option<PathBuf>,

    /// Resume the restored VM at once (otherwise it waits, paused, for PATCH /vm).
    #[arg(long, requires = "restore")]
    resume: bool,

    /// With --restore: reopen the snapshot's drive ID on PATH instead of its saved file (the
    /// size must be the same); repeat for more drives.
    #[arg(long, value_name = "ID=PATH", requires = "restore")]
    drive_override: Vec<String>,

    /// With --restore: attach the snapshot's network interface ID to host tap TAP instead of
    /// its saved tap; repeat for more interfaces.
    #[arg(long, value_name = "ID=TAP", requires = "restore")]
    net_override: Vec<String>,

    /// With --restore: the vsock device listens on this unix socket instead of its saved
    /// path (which must not exist). Guest connections to the host go to PATH_<port>.
    #[arg(long, value_name = "PATH", requires = "restore")]
    vsock_override: Option<PathBuf>,

    /// Seccomp filtering of the VMM's own threads (see README, "Seccomp"). 2: each thread
    /// (event loop, vCPUs, API) may only make the syscalls its policy lists, with their
    /// arguments checked (ioctl request numbers, socket kinds, open flags). 1: syscall
    /// numbers only, arguments unchecked. 0: no filter. Levels 0 and 1 weaken the VMM's
    /// isolation from a compromised guest: use them only for debugging. A forbidden
    /// syscall kills the VMM by SIGSYS, naming the thread and the syscall on stderr.
    #[arg(
        long,
        value_name = "0|1|2",
        default_value_t = 2,
        value_parser = clap::value_parser!(u8).range(0..=2),
    )]
    seccomp_level: u8,

    /// Print how many syscalls each thread kind's seccomp filter allows, and which, then
    /// exit.
    #[arg(long)]
    print_seccomp_summary: bool,

    /// Test hook, debug builds only: vCPU 0 makes a syscall its seccomp filter forbids
    /// (socket) right after installing the filter, so the VMM dies by SIGSYS.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    debug_forbidden_syscall_on_vcpu: bool,
}

impl Cli {
    /// The seccomp filters the flags ask for.
    fn seccomp(&self) -> SeccompSettings {
        SeccompSettings {
            // The parser only lets 0 to 2 through.
            level: SeccompLevel::from_number(self.seccomp_level).unwrap_or_default(),
            #[cfg(debug_assertions)]
            forbidden_syscall_on_vcpu0: self.debug_forbidden_syscall_on_vcpu,
            #[cfg(not(debug_assertions))]
            forbidden_syscall_on_vcpu0: false,
        }
    }
}

/// Splits `ID=VALUE` of `flag`.
fn id_value<'a>(flag: &str, text: &'a str, what: &str) -> anyhow::Result<(&'a str, &'a str)> {
    match text.split_once('=') {
        Some((id, value)) if !id.is_empty() && !value.is_empty() => Ok((id, value)),
        _ => anyhow::bail!("{flag} {text:?}: expected ID={what}"),
    }
}

/// The snapshot load the --restore flags ask for.
fn restore_params(cli: &Cli, vmstate: &Path) -> anyhow::Result<SnapshotLoadParams> {
    let Some(memory) = &cli.memory else {
        anyhow::bail!("--restore needs --memory MEMFILE");
    };
    let mut p = SnapshotLoadParams {
        snapshot_path: vmstate.to_path_buf(),
        mem_backend: MemBackend {
            backend_type: MemBackendType::File,
            backend_path: memory.clone(),
        },
        resume_vm: cli.resume,
        network_overrides: Vec::new(),
        drive_overrides: Vec::new(),
        vsock_override: cli
            .vsock_override
            .clone()
            .map(|uds_path| VsockOverride { uds_path }),
    };
    for d in &cli.drive_override {
        let (id, path) = id_value("--drive-override", d, "PATH")?;
        p.drive_overrides.push(DriveOverride {
            drive_id: id.into(),
            path_on_host: path.into(),
        });
    }
    for n in &cli.net_override {
        let (id, tap) = id_value("--net-override", n, "TAP")?;
        p.network_overrides.push(NetworkOverride {
            iface_id: id.into(),
            host_dev_name: tap.into(),
        });
    }
    Ok(p)
}

/// Restores the snapshot the flags name and runs it to its end.
fn run_restored(cli: &Cli, vmstate: &Path, start: Instant) -> anyhow::Result<RunOutcome> {
    if !cli.resume && cli.api_sock.is_none() {
        anyhow::bail!(
            "--restore without --resume needs --api-sock: the VM stays paused until resumed, \
             and only the API can resume it"
        );
    }
    let params = restore_params(cli, vmstate)?;
    let cfg = build_config(cli)?;
    let context = format!("snapshot {}", vmstate.display());
    let mut vmm = Vmm::with_seccomp(cfg, start, cli.api_sock.as_deref(), cli.seccomp())?;
    vmm.restore_snapshot(&params)
        .with_context(|| format!("restoring {context}"))?;
    vmm.serve()
        .with_context(|| format!("VM restored from {context}"))
}

fn build_config(cli: &Cli) -> anyhow::Result<VmConfig> {
    let mut cfg = match &cli.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
    };
    if let Some(k) = &cli.kernel {
        cfg.boot_source.kernel_image_path = k.clone();
    }
    if let Some(i) = &cli.initrd {
        cfg.boot_source.initrd_path = Some(i.clone());
    }
    if let Some(c) = &cli.cmdline {
        cfg.boot_source.boot_args = Some(c.clone());
    }
    if let Some(v) = cli.vcpus {
        cfg.machine.vcpu_count = v;
    }
    if let Some(m) = cli.memory_mib {
        cfg.machine.mem_size_mib = m;
    }
    if cli.hugepages {
        cfg.machine.huge_pages = HugePages::Huge2M;
    }
    if cli.no_thp {
        cfg.machine.thp = false;
    }
    if let Some(c) = &cli.console {
        cfg.console = ConsoleTarget::parse(c);
    }
    cfg.boot_timer |= cli.boot_timer;
    for d in &cli.drive {
        cfg.drives.push(vmm::config::DriveConfig::parse_flag(d)?);
    }
    for n in &cli.net {
        cfg.net.push(vmm::config::NetConfig::parse_flag(n)?);
    }
    if let Some(v) = &cli.vsock {
        cfg.vsock = Some(vmm::config::VsockConfig::parse_flag(v)?);
    }
    if cli.no_rng {
        cfg.entropy = false;
    }
    Ok(cfg)
}

fn has_kernel(cfg: &VmConfig) -> bool {
    !cfg.boot_source.kernel_image_path.as_os_str().is_empty()
}

fn vm_context(cfg: &VmConfig) -> String {
    format!(
        "VM with kernel {}",
        cfg.boot_source.kernel_image_path.display()
    )
}

/// Runs the VM the flags describe, to its end.
fn run(cli: &Cli, start: Instant) -> anyhow::Result<RunOutcome> {
    if let Some(vmstate) = &cli.restore {
        return run_restored(cli, vmstate, start);
    }
    let cfg = build_config(cli)?;
    let Some(sock) = &cli.api_sock else {
        if !has_kernel(&cfg) {
            anyhow::bail!("no kernel given: pass --kernel PATH or a --config file with boot-source.kernel_image_path (or --api-sock to configure the VM over the API)");
        }
        cfg.validate(host_mem_mib())?;
        return runtime::run_with_seccomp(&cfg, start, cli.seccomp())
            .with_context(|| vm_context(&cfg));
    };
    let boot_now = has_kernel(&cfg);
    if boot_now {
        cfg.validate(host_mem_mib())?;
    } else {
        // The boot source comes over the API; what was given already must hold.
        cfg.validate_machine(host_mem_mib())?;
        cfg.validate_devices()?;
    }
    let context = vm_context(&cfg);
    let mut vmm = Vmm::with_seccomp(cfg, start, Some(sock), cli.seccomp())?;
    if boot_now {
        vmm.start_vm(start).with_context(|| context.clone())?;
    }
    vmm.serve().with_context(|| context)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    if cli.print_seccomp_summary {
        print!("{}", seccomp::summary());
        return ExitCode::SUCCESS;
    }
    let outcome = match run(&cli, start) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let guest = outcome
        .guest_status
        .map(|s| format!(", guest exit status {s}"))
        .unwrap_or_default();
    match outcome.reason {
        EndReason::GuestReset | EndReason::GuestShutdown => {
            eprintln!("vmm: guest ended{guest}");
            if cli.exit_with_guest_status {
                ExitCode::from(outcome.guest_status.unwrap_or(0))
            } else {
                ExitCode::SUCCESS
            }
        }
        EndReason::GuestCrash => {
            eprintln!("vmm: error: guest kernel crashed{guest}");
            ExitCode::from(1)
        }
        EndReason::Signal(sig) => {
            eprintln!("vmm: stopped by signal {sig}{guest}");
            ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
        }
        EndReason::VcpuFailed(msg) => {
            eprintln!("vmm: error: {msg}");
            ExitCode::from(1)
        }
    }
}
