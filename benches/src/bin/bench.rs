//! `bench`: the side-by-side benchmark harness. See benches/README.md.
//!
//! Runs each measurable workload `--runs` times under our `vmm` and under qemu microvm,
//! alternating the two, then prints a table and writes the results. Where this machine's
//! KVM cannot boot Linux it re-runs itself inside the KVM test host, passing the commit,
//! the machine description and the date in from outside.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::host;
use benches::journal::{Journal, Outcome};
use benches::metrics::{self, MetricDef, Status, CATALOG};
use benches::orch::{self, Orch, OrchInputs, OrchProbe};
use benches::progress::{self, Progress};
use benches::report::{self, MetricResult, Report};
use benches::smaps;
use benches::snapshot::{self as snap, SnapProbe};
use benches::stats::Summary;
use benches::testhost;
use benches::vm::{self, GuestSpec, Inputs, NetSpec, Side};
use clap::Parser;

/// Side-by-side benchmarks: this project's VMM against qemu-system-x86_64 -M microvm.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Runs per workload and side.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Each workload once, only checking that all complete; writes
    /// benches/results/quick.json, never latest.json or RESULTS.md.
    #[arg(long)]
    quick: bool,
    /// Only these metrics (comma-separated names); the results go to
    /// benches/results/partial.json, never latest.json or RESULTS.md.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    only: Vec<String>,
    /// Leave these metrics out (comma-separated names), e.g. a workload known to wedge the
    /// test host. Unlike --only, a full run with --skip still writes latest.json and a
    /// RESULTS.md section; the section shows the command and the metrics as "not run".
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    skip: Vec<String>,
    /// Seconds one VM may take from spawn to exit before it is killed and the run fails.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    vm_timeout: u64,
}

/// Set (to "1") on the harness re-run inside the test host, so it never hops again.
const ENV_IN_TESTHOST: &str = "BENCH_IN_TESTHOST";
/// The commit, gathered outside (git inside the test host sees a 9p mount).
const ENV_COMMIT: &str = "BENCH_COMMIT";
/// The outer machine's CPU description.
const ENV_MACHINE: &str = "BENCH_MACHINE";
/// The run's start time, taken outside.
const ENV_DATE: &str = "BENCH_DATE";
/// Where the inner harness writes its progress events for the outer one to show.
const ENV_PROGRESS: &str = "BENCH_PROGRESS_FILE";
/// Where the inner harness records finished runs, kept across test host sessions.
const ENV_JOURNAL: &str = "BENCH_JOURNAL";
/// Which test host session this is (1 unless an earlier one wedged).
const ENV_SESSION: &str = "BENCH_SESSION";
/// Test host sessions tried before giving up on a wedging test host.
const MAX_SESSIONS: u32 = 3;

/// Guest RAM of every workload so far.
const GUEST_MIB: u32 = 128;

/// What a workload measures once the VM is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Spawn to the ready line, in ms.
    BootReady,
    /// Resident memory that is not guest RAM, 1 s after ready, in MiB.
    RssOverhead,
    /// MiB/s of the guest's timed `dd` on its data disk: the command prints
    /// `DD=<MiB> <uptime before> <uptime after>` (seconds from /proc/uptime).
    DdMibs,
    /// The number the guest printed as `KEY=<number>` (gtool's results).
    GuestValue(&'static str),
    /// Gbit/s of a TCP stream the host serves and the guest reads (`NET=` timing line).
    NetToGuest,
    /// Gbit/s of a TCP stream the guest sends and the host reads (`NET=` timing line).
    NetFromGuest,
    /// MiB/s of a vsock stream the guest sends to a host listener (gtool's SOURCE_MIBS).
    VsockFromGuest,
    /// ms from spawning the VMM to its control socket answering (no guest runs).
    ApiReady,
    /// One snapshot cycle of a guest with this many MiB (benches/src/snapshot.rs).
    Snapshot(SnapProbe, u32),
    /// One run against the orchestrator daemon (benches/src/orch.rs).
    Orch(OrchProbe),
    /// No runs of its own: the p99 of the samples of the named workload, which comes
    /// earlier in the same run (a p50 and a p99 from one set of runs).
    P99Of(&'static str),
}

/// The host end of the benchmark network: a tap with this address, made by the harness.
const BENCH_TAP: &str = "benchtap0";
const BENCH_HOST_IP: &str = "172.30.0.1";
const BENCH_GUEST_IP: &str = "172.30.0.2";
/// TCP port of the host's server for the network workloads.
const NET_PORT: u16 = 5201;
/// MiB each network workload moves.
/// (Full runs; `--quick` moves 16 MiB, enough to check the path works; see `xfer_mib`.)
const NET_MIB: u32 = 128;
/// vsock port of the host's sink, and MiB the guest sends to it.
const VSOCK_PORT: u32 = 5300;
const VSOCK_MIB: u32 = 128;
/// MiB per transfer in `--quick` mode.
const QUICK_MIB: u32 = 16;
/// Set once at start: whether transfers use [`QUICK_MIB`].
static QUICK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// MiB a network or vsock workload moves in this run.
fn xfer_mib(full: u32) -> u32 {
    if QUICK.get().copied().unwrap_or(false) {
        QUICK_MIB
    } else {
        full
    }
}

/// The guest command timing one TCP transfer with gtool (busybox nc's 1 KiB writes would
/// each leave as one small segment, which measures per-packet exits, not throughput).
fn net_command(to_guest: bool) -> String {
    let mib = xfer_mib(NET_MIB);
    let xfer = if to_guest {
        format!("gtool tcp-read {BENCH_HOST_IP} {NET_PORT}")
    } else {
        format!("gtool tcp-source {BENCH_HOST_IP} {NET_PORT} {mib}m")
    };
    format!(
        "busybox sh -c 'a=$(cut -d\\  -f1 /proc/uptime); {xfer}; \
         b=$(cut -d\\  -f1 /proc/uptime); echo NET={mib} $a $b'"
    )
}

/// Size of the data disk each block workload gets.
const DISK_MIB: u64 = 192;
/// MiB the guest's dd moves (O_DIRECT, so the guest page cache is bypassed).
const DD_MIB: u32 = 128;

/// The guest command timing one dd over /dev/vda.
fn dd_command(dd_args: &str) -> String {
    format!(
        "busybox sh -c 'a=$(cut -d\\  -f1 /proc/uptime); dd {dd_args} bs=1048576 count={DD_MIB} 2>/dev/null; \
         b=$(cut -d\\  -f1 /proc/uptime); echo DD={DD_MIB} $a $b'"
    )
}

/// MiB/s from the guest's `DD=<MiB> <t0> <t1>` line.
fn parse_dd(lines: &[String]) -> Result<f64> {
    parse_timed(lines, "DD")
}

/// The last `KEY=...` value the guest printed.
fn guest_value<'a>(lines: &'a [String], key: &str) -> Result<&'a str> {
    let prefix = format!("{key}=");
    lines
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .with_context(|| format!("the guest printed no {key}= line"))
}

/// MiB/s from the guest's `KEY=<MiB> <t0> <t1>` line (times from /proc/uptime).
fn parse_timed(lines: &[String], key: &str) -> Result<f64> {
    let line = guest_value(lines, key)?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("unparsable {key}={line}"))?;
    let [mib, t0, t1] = v[..] else {
        bail!("{key}={line}: expected three numbers");
    };
    let secs = t1 - t0;
    if secs <= 0.0 {
        bail!("{key}={line}: the copy took no measurable time");
    }
    Ok(mib / secs)
}

/// One measurable metric and how it is measured.
struct Workload {
    def: &'static MetricDef,
    spec: GuestSpec,
    probe: Probe,
    method: &'static str,
    /// Whether qemu runs it too; otherwise the peer figure is derived (see `derive_peers`).
    qemu_peer: bool,
}

impl Workload {
    /// Runs of this workload in a full run of `runs` per workload: more for the cold and
    /// templated create latencies, whose p50/p99 issue 8 wants over at least 20 creates;
    /// none for a p99 taken from another workload's runs; at most 3 for the 50-VM idle
    /// memory figure.
    fn full_runs(&self, runs: u32) -> u32 {
        match self.probe {
            Probe::Orch(OrchProbe::CreateExecMs | OrchProbe::TemplateCreateExecMs) => {
                runs.max(orch::COLD_MIN_RUNS)
            }
            Probe::P99Of(_) => 0,
            // 50 VMs a run: a memory figure that varies little, at most 3 times.
            Probe::Orch(OrchProbe::IdleTemplatedHostMib) => runs.min(3),
            _ => runs,
        }
    }

    /// VMs one run of one side boots.
    fn vms_per_run(&self) -> u32 {
        match self.probe {
            Probe::Orch(p) => p.vms_per_run(),
            Probe::P99Of(_) => 0,
            _ => 1,
        }
    }

    /// Whether it needs the orchestrator's template (built by an untimed warm-up).
    fn uses_template(&self) -> bool {
        matches!(self.probe, Probe::Orch(p) if p.uses_template())
    }
}

fn workloads() -> Result<Vec<Workload>> {
    let def =
        |name| metrics::find(name).with_context(|| format!("{name} missing from the catalog"));
    let boot = |vcpus| GuestSpec {
        vcpus,
        mem_mib: GUEST_MIB,
        gi_cmd: None,
        disk: None,
        net: None,
        vsock_uds: None,
        agent_port: None,
    };
    // The disk path is filled in per run (a fresh file for each VM).
    let blk = |dd_args: &str| GuestSpec {
        vcpus: 1,
        mem_mib: GUEST_MIB,
        gi_cmd: Some(dd_command(dd_args)),
        disk: Some(PathBuf::new()),
        net: None,
        vsock_uds: None,
        agent_port: None,
    };
    let net = |cmd: String| GuestSpec {
        vcpus: 1,
        mem_mib: GUEST_MIB,
        gi_cmd: Some(cmd),
        disk: None,
        net: Some(NetSpec {
            tap: BENCH_TAP.into(),
            mac: "06:00:ac:1e:00:02".into(),
            guest_ip: BENCH_GUEST_IP.into(),
            host_ip: BENCH_HOST_IP.into(),
        }),
        vsock_uds: None,
        agent_port: None,
    };
    Ok(vec![
        Workload {
            def: def("boot_ready_ms_1vcpu")?,
            spec: boot(1),
            probe: Probe::BootReady,
            method: "VMM process spawn to the console line `guest-init: ready`; 1 vCPU, 128 MiB, initramfs, quiet",
            qemu_peer: true,
        },
        Workload {
            def: def("boot_ready_ms_2vcpu")?,
            spec: boot(2),
            probe: Probe::BootReady,
            method: "VMM process spawn to the console line `guest-init: ready`; 2 vCPUs, 128 MiB, initramfs, quiet",
            qemu_peer: true,
        },
        Workload {
            def: def("api_ready_ms")?,
            spec: boot(1),
            probe: Probe::ApiReady,
            method: "spawn to the control socket answering: ours `vmm --api-sock S` answering `GET /` with 200; qemu microvm with -S (vCPUs not started) and -qmp unix:S sending its QMP greeting; polled every 1 ms",
            qemu_peer: true,
        },
        Workload {
            def: def("vmm_rss_overhead_mib")?,
            spec: GuestSpec {
                vcpus: 1,
                mem_mib: GUEST_MIB,
                gi_cmd: Some("busybox sleep 5".into()),
                disk: None,
                net: None,
                vsock_uds: None,
                agent_port: None,
            },
            probe: Probe::RssOverhead,
            method: "total Rss minus the Rss of the 128 MiB guest RAM mapping (/proc/PID/smaps), 1 s after `guest-init: ready`; gi.cmd busybox sleep 5",
            qemu_peer: true,
        },
        Workload {
            def: def("blk_seq_read_mibs")?,
            spec: blk("if=/dev/vda of=/dev/null iflag=direct"),
            probe: Probe::DdMibs,
            method: "guest dd of 128 MiB from /dev/vda, bs=1M, O_DIRECT, timed with /proc/uptime; raw 192 MiB file on the test host's tmpfs; 1 vCPU, 128 MiB",
            qemu_peer: true,
        },
        Workload {
            def: def("blk_seq_write_mibs")?,
            spec: blk("if=/dev/zero of=/dev/vda oflag=direct"),
            probe: Probe::DdMibs,
            method: "guest dd of 128 MiB to /dev/vda, bs=1M, O_DIRECT, timed with /proc/uptime; raw 192 MiB file on the test host's tmpfs; 1 vCPU, 128 MiB",
            qemu_peer: true,
        },
        Workload {
            def: def("blk_randread_iops")?,
            spec: GuestSpec {
                gi_cmd: Some("gtool randread /dev/vda 4096 5".into()),
                ..blk("")
            },
            probe: Probe::GuestValue("RANDREAD_IOPS"),
            method: "guest `gtool randread /dev/vda 4096 5`: 4 KiB O_DIRECT reads at random aligned offsets (fixed seed), queue depth 1, for 5 s; raw 192 MiB file on the test host's tmpfs; 1 vCPU, 128 MiB",
            qemu_peer: true,
        },
        Workload {
            def: def("net_tcp_host_to_guest_gbps")?,
            spec: net(net_command(true)),
            probe: Probe::NetToGuest,
            method: "128 MiB over one TCP connection from a host server to `gtool tcp-read` in the guest (64 KiB reads, counted), timed in the guest with /proc/uptime; tap with the host end's address; 1 vCPU, 128 MiB",
            qemu_peer: true,
        },
        Workload {
            def: def("net_tcp_guest_to_host_gbps")?,
            spec: net(net_command(false)),
            probe: Probe::NetFromGuest,
            method: "128 MiB of zeros from `gtool tcp-source` in the guest (256 KiB writes) over one TCP connection to a host server that reads them all, timed in the guest with /proc/uptime; tap; 1 vCPU, 128 MiB",
            qemu_peer: true,
        },
        Workload {
            def: def("vsock_stream_mibs")?,
            spec: GuestSpec {
                gi_cmd: Some(format!(
                    "gtool vsock-source 2 {VSOCK_PORT} {}m",
                    xfer_mib(VSOCK_MIB)
                )),
                vsock_uds: Some(PathBuf::new()),
                ..boot(1)
            },
            probe: Probe::VsockFromGuest,
            method: "guest `gtool vsock-source 2 5300 128m` (256 KiB writes) to a host listener on the hybrid socket's `_5300` path that reads it all; gtool's own timing; 1 vCPU, 128 MiB; peer: our virtio-net guest->host TCP median of this run, in MiB/s",
            qemu_peer: false,
        },
        Workload {
            def: def("snapshot_create_s_per_gib")?,
            spec: boot(1),
            probe: Probe::Snapshot(SnapProbe::CreateSPerGib, 1024),
            method: "1 vCPU, 1 GiB idle guest, paused 1 s after `guest-init: ready`; ours: PUT /snapshot/create (vmstate + sparse memory file); qemu: migrate to exec:cat > FILE until query-migrate says completed; seconds divided by the guest's GiB; files on the test host's tmpfs",
            qemu_peer: true,
        },
        Workload {
            def: def("restore_running_ms_128m")?,
            spec: boot(1),
            probe: Probe::Snapshot(SnapProbe::RestoreRunningMs, 128),
            method: "1 vCPU, 128 MiB idle guest snapshotted 1 s after ready; ours: a fresh `vmm --api-sock`, PUT /snapshot/load with resume_vm until its 204; qemu: -incoming defer, migrate-incoming from exec:cat FILE until query-status says running",
            qemu_peer: true,
        },
        Workload {
            def: def("restore_running_ms_1g")?,
            spec: boot(1),
            probe: Probe::Snapshot(SnapProbe::RestoreRunningMs, 1024),
            method: "as restore_running_ms_128m with a 1 GiB guest; target also: no more than 1.2x the 128 MiB time",
            qemu_peer: true,
        },
        Workload {
            def: def("restore_exec_ms_128m")?,
            spec: boot(1),
            probe: Probe::Snapshot(SnapProbe::RestoreExecMs, 128),
            method: "1 vCPU, 128 MiB guest serving the guest agent on vsock, snapshotted 1 s after ready; a fresh `vmm --api-sock`, PUT /snapshot/load with resume_vm, then a new vsock connection to the agent (hybrid socket CONNECT 1024) running `busybox true`; ms from the load call to the exec's result",
            qemu_peer: false,
        },
        Workload {
            def: def("orch_create_exec_ms_cold_p50")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::CreateExecMs),
            method: "orchestrator serve (jailed vmm, own netns, bridge); manifest: 1 vCPU, 128 MiB, writable ext4 rootfs, network on, workload `busybox sleep`; ms from just before POST /v1/vms (no template) to the end of the first POST /v1/vms/{id}/exec of `/bin/busybox true` returning code 0; one VM per run, destroyed afterwards (untimed); at least 20 runs in a full run; the value is the median, ours_p99 the p99",
            qemu_peer: false,
        },
        Workload {
            def: def("orch_creates_per_s")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::CreatesPerS),
            method: "the same daemon and manifest; 8 threads, each with its own client, POST /v1/vms at once; 8 divided by the seconds from the first POST to the last 201 (each 201 comes once its VM runs its workload); the 8 destroyed afterwards (untimed)",
            qemu_peer: false,
        },
        Workload {
            def: def("orch_create_exec_ms_template_p50")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::TemplateCreateExecMs),
            method: "the same daemon; manifest `bench-tpl`: the cold manifest plus `\"template\": true`, whose template (one boot to the agent, then a snapshot) an untimed create, exec and destroy builds before the first timed run; ms from just before POST /v1/vms (the VM restored from the template) to the end of the first POST /v1/vms/{id}/exec of `/bin/busybox true` returning code 0; one VM per run, destroyed afterwards (untimed); at least 20 runs in a full run; the value is the median, ours_p99 the p99 (reported as orch_create_exec_ms_template_p99)",
            qemu_peer: false,
        },
        Workload {
            def: def("orch_create_exec_ms_template_p99")?,
            spec: boot(1),
            probe: Probe::P99Of("orch_create_exec_ms_template_p50"),
            method: "the p99 of orch_create_exec_ms_template_p50's runs (the same samples, not measured again; linear interpolation between ranks, so with 20 runs it lies between the two slowest)",
            qemu_peer: false,
        },
        Workload {
            def: def("hibernate_s_per_gib")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::HibernateSPerGib),
            method: "the same daemon and cold manifest, guest RAM 128 MiB; create, exec until code 0 (untimed), then POST /v1/vms/{id}/hibernate (pause, snapshot, stop the VMM) timed to its 200 with state `hibernated`: time from the hibernate request to the VMM stopped, scaled per GiB (seconds / 0.125); the same VM then gives one wake_exec_ms sample and is destroyed (untimed)",
            qemu_peer: false,
        },
        Workload {
            def: def("wake_exec_ms")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::WakeExecMs),
            method: "a VM of the cold manifest created, exec'd and hibernated as for hibernate_s_per_gib; ms from just before POST /v1/vms/{id}/exec of `/bin/busybox true` on the hibernated VM (the daemon restores it first) to its 200 with code 0, one call, no retry; the runs report, in order, the samples of this session's hibernate_s_per_gib runs, and make their own VM the same way when none is left; destroyed afterwards (untimed)",
            qemu_peer: false,
        },
        Workload {
            def: def("idle_templated_vm_host_mib")?,
            spec: boot(1),
            probe: Probe::Orch(OrchProbe::IdleTemplatedHostMib),
            method: "50 VMs of the template manifest `bench-tpl` created 8 at a time (untimed), then 3 s idle; the sum of their VMMs' `Pss:` in /proc/PID/smaps_rollup (pids from GET /v1/vms/{id}) divided by 50, in MiB (Pss shares pages mapped by several VMMs, such as the template's memory, among them); all destroyed afterwards (untimed)",
            qemu_peer: false,
        },
    ])
}

/// Copies of the boot inputs on local storage (tmpfs inside the test host), so neither VMM
/// pays for reading the repository's 9p mount; removed on drop.
struct Staged {
    dir: PathBuf,
    inputs: Inputs,
}

impl Staged {
    fn new(repo: &Path) -> Result<Staged> {
        let source = Inputs {
            vmm: repo.join(RELEASE_DIR).join("vmm"),
            kernel: repo.join("target/guest/vmlinux"),
            initrd: repo.join("target/guest/initramfs.cpio"),
        };
        let dir = std::env::temp_dir().join(format!("bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let copy = |from: &Path| -> Result<PathBuf> {
            let name = from.file_name().context("input without a file name")?;
            let to = dir.join(name);
            // fs::copy follows symlinks (target/guest/vmlinux points into the kernel cache)
            // and keeps the mode, so the vmm copy stays executable.
            fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        let inputs = Inputs {
            vmm: copy(&source.vmm)?,
            kernel: copy(&source.kernel)?,
            initrd: copy(&source.initrd)?,
        };
        Ok(Staged { dir, inputs })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Where `cargo build --release` puts the workspace's binaries: the explicit target of
/// `.cargo/config.toml` (static builds).
const RELEASE_DIR: &str = "target/x86_64-unknown-linux-gnu/release";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn check_inputs(repo: &Path, chosen: &[Workload]) -> Result<()> {
    let mut needed = vec![
        (
            format!("{RELEASE_DIR}/vmm"),
            "cargo build --release -p vmm (scripts/bench.sh does)",
        ),
        ("target/guest/vmlinux".into(), "scripts/setup.sh"),
        ("target/guest/initramfs.cpio".into(), "scripts/setup.sh"),
    ];
    if chosen.iter().any(|w| matches!(w.probe, Probe::Orch(_))) {
        let build = "cargo build --release -p orchestrator (scripts/bench.sh does)";
        needed.extend([
            (format!("{RELEASE_DIR}/orchestrator"), build),
            (format!("{RELEASE_DIR}/jailer"), build),
            ("target/guest/rootfs.ext4".into(), "scripts/setup.sh"),
        ]);
    }
    for (path, how) in needed {
        if !repo.join(&path).exists() {
            bail!("{path} is missing: run {how}");
        }
    }
    Ok(())
}

/// Says so when the machine is already busy (another test host, a build): the test host
/// emulates its CPUs in software on these cores, so every figure would be slower and noisier.
fn warn_if_busy() {
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let cores = host::cores() as f64;
    if let Some(load) = load.filter(|&l| l > cores * 0.5) {
        eprintln!(
            "bench: warning: load average {load:.1} on {cores} cores; other work (a running test host, a build) makes the results slow and noisy"
        );
    }
}

/// Re-runs this binary with the same arguments inside the KVM test host. A test host that
/// wedges is replaced by a fresh one, up to [`MAX_SESSIONS`] in all; the runs it finished
/// are kept through the journal.
fn hop_into_testhost(repo: &Path, args: &Args, why: &str) -> Result<ExitCode> {
    let runs = if args.quick { 1 } else { args.runs };
    let boots = selected(args)?
        .iter()
        .map(|w| {
            let runs = if args.quick { runs } else { w.full_runs(runs) };
            2 * u64::from(runs) * u64::from(w.vms_per_run())
        })
        .sum::<u64>()
        + 3;
    // Generous: a qemu boot takes ~10 s in the test host; the test host itself ~5 s.
    let timeout = 600 + boots.saturating_mul(60);
    eprintln!(
        "bench: this machine's KVM cannot boot Linux ({why}); re-running inside the KVM test host (tests/testhost/run, timeout {timeout} s)"
    );
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let id = std::process::id();
    let progress_file = repo.join(format!("target/bench-progress-{id}.log"));
    let journal = repo.join(format!("target/bench-journal-{id}.log"));
    let (commit, machine, date) = (
        host::git_commit(repo),
        host::describe_cpu(),
        host::now_utc(),
    );
    // Every run inside ends within --vm-timeout, and the test host boots in well under a
    // minute: this much silence means it is wedged.
    let stall_limit = Duration::from_secs(args.vm_timeout.saturating_add(180));
    let _ = fs::remove_file(&journal);
    let mut session = 1;
    let relayed = loop {
        let mut cmd = Command::new(repo.join("tests/testhost/run"));
        cmd.args(["--timeout", &timeout.to_string()]);
        // The inner harness prints nothing on the console between its start and its table
        // (progress goes to the progress file), so the runner's console-silence watchdog
        // would stop a long run; the stall watchdog below, on progress events, stands in.
        cmd.env("TESTHOST_IDLE_TIMEOUT", timeout.to_string());
        for var in [
            ENV_IN_TESTHOST,
            ENV_COMMIT,
            ENV_MACHINE,
            ENV_DATE,
            ENV_PROGRESS,
            ENV_JOURNAL,
            ENV_SESSION,
        ] {
            cmd.args(["--env", var]);
        }
        cmd.arg("--")
            .arg(&exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_IN_TESTHOST, "1")
            .env(ENV_COMMIT, &commit)
            .env(ENV_MACHINE, &machine)
            .env(ENV_DATE, &date)
            .env(ENV_PROGRESS, &progress_file)
            .env(ENV_JOURNAL, &journal)
            .env(ENV_SESSION, session.to_string())
            .stdout(Stdio::piped());
        let _ = fs::remove_file(&progress_file);
        let mut child = cmd.spawn().context("running tests/testhost/run")?;
        let relayed = testhost::relay(&mut child, &progress_file, stall_limit);
        let _ = fs::remove_file(&progress_file);
        let relayed = relayed?;
        if !relayed.stalled || session == MAX_SESSIONS {
            break relayed;
        }
        session += 1;
        eprintln!(
            "bench: starting a fresh test host (session {session} of at most {MAX_SESSIONS}); runs already finished are kept"
        );
    };
    let _ = fs::remove_file(&journal);
    if relayed.stalled {
        eprintln!("bench: the test host wedged {MAX_SESSIONS} times; re-run on an idle machine");
    }
    let code = relayed.status.code().unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The workloads `--only` keeps (all without it). Errors on an unknown name.
fn selected(args: &Args) -> Result<Vec<Workload>> {
    for (flag, list) in [("--only", &args.only), ("--skip", &args.skip)] {
        for name in list {
            if metrics::find(name).is_none() {
                let names: Vec<&str> = CATALOG.iter().map(|m| m.name).collect();
                bail!(
                    "unknown metric {name:?} in {flag}; known: {}",
                    names.join(", ")
                );
            }
        }
    }
    let all = workloads()?;
    let listed = |list: &[String], name: &str| list.iter().any(|n| n == name);
    let kept = |name: &str| {
        (args.only.is_empty() || listed(&args.only, name)) && !listed(&args.skip, name)
    };
    // A p99 made from another workload's runs brings that workload along (`--only` of the
    // p99 alone), and goes when that workload is left out (`--skip` of the p50).
    let needed_by_a_kept_p99 = |name: &str| {
        all.iter()
            .any(|w| matches!(w.probe, Probe::P99Of(source) if source == name) && kept(w.def.name))
            && !listed(&args.skip, name)
    };
    let chosen: Vec<&'static str> = all
        .iter()
        .map(|w| w.def.name)
        .filter(|&name| kept(name) || needed_by_a_kept_p99(name))
        .collect();
    Ok(all
        .into_iter()
        .filter(|w| chosen.contains(&w.def.name))
        .filter(|w| match w.probe {
            Probe::P99Of(source) => chosen.contains(&source),
            _ => true,
        })
        .collect())
}

/// One side's samples and failures for a workload.
#[derive(Default)]
struct Samples {
    ours: Vec<f64>,
    peer: Vec<f64>,
    failures: usize,
    first_error: Option<String>,
}

/// A data disk for one run: DISK_MIB of non-zero bytes, so reads are real reads on both
/// sides. Removed on drop.
struct ScratchDisk(PathBuf);

impl ScratchDisk {
    fn new(inputs: &Inputs, side: Side) -> Result<ScratchDisk> {
        let dir = inputs
            .kernel
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("disk-{}.img", side.as_str()));
        let chunk: Vec<u8> = (0..1u32 << 20)
            .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
            .collect();
        let mut f =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for _ in 0..DISK_MIB {
            std::io::Write::write_all(&mut f, &chunk)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(ScratchDisk(path))
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn measure_once(
    side: Side,
    inputs: &Inputs,
    w: &Workload,
    timeout: Duration,
    orch: &mut Orch,
) -> Result<f64> {
    if let Probe::Orch(probe) = w.probe {
        if side == Side::Peer {
            bail!("{} has no peer", w.def.name);
        }
        return orch.measure(probe, timeout);
    }
    if let Probe::P99Of(source) = w.probe {
        bail!(
            "{} has no runs of its own (the p99 of {source})",
            w.def.name
        );
    }
    if w.probe == Probe::ApiReady {
        return api_ready_once(side, inputs, timeout);
    }
    if let Probe::Snapshot(what, mem_mib) = w.probe {
        return snap::measure(side, inputs, mem_mib, what, timeout);
    }
    let mut spec = w.spec.clone();
    let disk = match spec.disk {
        Some(_) => Some(ScratchDisk::new(inputs, side)?),
        None => None,
    };
    spec.disk = disk.as_ref().map(|d| d.0.clone());
    let scratch = inputs
        .kernel
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    if spec.vsock_uds.is_some() {
        spec.vsock_uds = Some(scratch.join(format!("vsock-{}.sock", side.as_str())));
    }
    let cmd = vm::command(side, inputs, &spec)?;
    let mem_mib = u64::from(w.spec.mem_mib);
    // The host end of a transfer workload, started before the VM so the guest finds it.
    let server = match w.probe {
        Probe::NetToGuest => Some(HostServer::tcp(true, timeout)?),
        Probe::NetFromGuest => Some(HostServer::tcp(false, timeout)?),
        Probe::VsockFromGuest => {
            let uds = spec
                .vsock_uds
                .as_deref()
                .context("vsock workload without a socket")?;
            Some(HostServer::vsock(uds, timeout)?)
        }
        _ => None,
    };
    let run = vm::run_vm(cmd, timeout, |pid| match w.probe {
        Probe::RssOverhead => {
            std::thread::sleep(Duration::from_secs(1));
            smaps::overhead_of_pid(pid, mem_mib).map(|o| o.overhead_mib())
        }
        _ => Ok(0.0),
    });
    // The VM is gone: a server still waiting for it gives up now.
    let served = server.map(HostServer::finish);
    let run = run?;
    if let Some(served) = served {
        let want = match w.probe {
            Probe::VsockFromGuest => u64::from(xfer_mib(VSOCK_MIB)) << 20,
            _ => u64::from(xfer_mib(NET_MIB)) << 20,
        };
        let got = served.context("host side of the transfer")?;
        if got != want {
            bail!("the host side moved {got} bytes, expected {want}");
        }
    }
    let lines = &run.console_tail;
    match w.probe {
        Probe::BootReady => Ok(run.ready.as_secs_f64() * 1000.0),
        Probe::RssOverhead => Ok(run.probe),
        Probe::DdMibs => parse_dd(lines),
        Probe::GuestValue(key) => guest_number(lines, key),
        Probe::VsockFromGuest => guest_number(lines, "SOURCE_MIBS"),
        Probe::NetToGuest | Probe::NetFromGuest => Ok(mibs_to_gbps(parse_timed(lines, "NET")?)),
        // Measured before any VM is built (see the top of this function).
        Probe::ApiReady => bail!("api_ready_ms is measured without a guest"),
        Probe::Snapshot(..) => bail!("snapshot workloads run their own VMs"),
        Probe::Orch(_) => bail!("orchestrator workloads run through the daemon"),
        Probe::P99Of(_) => bail!("a p99 of another workload has no runs"),
    }
}

/// Spawns the VMM with only its control socket and times it until the socket answers:
/// our API's `GET /` (200), or qemu's QMP greeting.
fn api_ready_once(side: Side, inputs: &Inputs, timeout: Duration) -> Result<f64> {
    use std::io::{Read, Write};
    let dir = inputs
        .kernel
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let sock = dir.join(format!("api-{}.sock", side.as_str()));
    let _ = fs::remove_file(&sock);
    let mut cmd = match side {
        Side::Ours => {
            let mut c = Command::new(&inputs.vmm);
            c.arg("--api-sock").arg(&sock);
            c
        }
        Side::Peer => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
                .args(["-enable-kvm", "-cpu", "host", "-m", "128", "-S"])
                .args(["-nodefaults", "-no-user-config", "-nographic"])
                .args(["-serial", "none", "-monitor", "none"])
                .arg("-kernel")
                .arg(&inputs.kernel)
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display()));
            c
        }
    };
    let start = std::time::Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let result = (|| -> Result<f64> {
        loop {
            if start.elapsed() > timeout {
                bail!(
                    "the control socket did not answer within {}s",
                    timeout.as_secs()
                );
            }
            if let Some(st) = child.try_wait().context("waiting for the VMM")? {
                bail!("the VMM exited with {st} before its control socket answered");
            }
            let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            s.set_read_timeout(Some(timeout))
                .context("socket timeout")?;
            let want = match side {
                Side::Ours => {
                    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        .context("sending GET /")?;
                    "HTTP/1.1 200"
                }
                Side::Peer => "\"QMP\"",
            };
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !String::from_utf8_lossy(&got).contains(want) {
                let n = s.read(&mut buf).context("reading the control socket")?;
                if n == 0 {
                    bail!(
                        "the control socket closed without {want}: {:?}",
                        String::from_utf8_lossy(&got)
                    );
                }
                got.extend_from_slice(&buf[..n]);
            }
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
    })();
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        if result.is_err() {
            let _ = e.read_to_string(&mut err);
        }
    }
    let _ = child.wait();
    let _ = fs::remove_file(&sock);
    result.with_context(|| format!("stderr: {}", err.trim()))
}

/// The number the guest printed as `KEY=<number>`.
fn guest_number(lines: &[String], key: &str) -> Result<f64> {
    let v = guest_value(lines, key)?;
    v.parse()
        .with_context(|| format!("{key}={v} is not a number"))
}

/// MiB/s to Gbit/s (10^9 bits).
fn mibs_to_gbps(mibs: f64) -> f64 {
    mibs * 1_048_576.0 * 8.0 / 1e9
}

/// Gbit/s to MiB/s.
fn gbps_to_mibs(gbps: f64) -> f64 {
    gbps * 1e9 / 8.0 / 1_048_576.0
}

/// The host's end of one transfer: a thread that accepts one connection (giving up when
/// told the VM has ended, or at the deadline), moves the data, and returns the bytes moved.
struct HostServer {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

/// A listener that can be polled for one connection.
trait Accept: Send + 'static {
    type Stream: std::io::Read + std::io::Write;
    fn nonblocking(&self) -> std::io::Result<()>;
    fn try_accept(&self) -> std::io::Result<Self::Stream>;
}

impl Accept for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn nonblocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(true)
    }
    fn try_accept(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

impl Accept for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn nonblocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(true)
    }
    fn try_accept(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

impl HostServer {
    /// `send`: serve NET_MIB MiB to the guest then close; otherwise read NET_MIB MiB from
    /// it, then close (busybox nc ends when the host closes).
    fn tcp(send: bool, timeout: Duration) -> Result<HostServer> {
        let addr = format!("{BENCH_HOST_IP}:{NET_PORT}");
        let l = std::net::TcpListener::bind(&addr)
            .with_context(|| format!("binding {addr} (is the tap {BENCH_TAP} up?)"))?;
        let bytes = u64::from(xfer_mib(NET_MIB)) << 20;
        HostServer::start(l, timeout, move |s| {
            if send {
                send_bytes(s, bytes)
            } else {
                read_bytes(s, Some(bytes))
            }
        })
    }

    /// Reads a guest-initiated vsock stream to its end on `<uds>_<VSOCK_PORT>`.
    fn vsock(uds: &Path, timeout: Duration) -> Result<HostServer> {
        let path = PathBuf::from(format!("{}_{VSOCK_PORT}", uds.display()));
        let _ = fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        HostServer::start(l, timeout, |s| read_bytes(s, None))
    }

    fn start<L: Accept>(
        l: L,
        timeout: Duration,
        serve: impl FnOnce(&mut L::Stream) -> Result<u64> + Send + 'static,
    ) -> Result<HostServer> {
        l.nonblocking().context("non-blocking listener")?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let deadline = std::time::Instant::now() + timeout;
        let thread = std::thread::spawn(move || loop {
            match l.try_accept() {
                Ok(mut s) => return serve(&mut s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stop.load(std::sync::atomic::Ordering::Acquire)
                        || std::time::Instant::now() > deadline
                    {
                        bail!("the guest never connected");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("accepting the guest's connection"),
            }
        });
        Ok(HostServer { done, thread })
    }

    /// Tells the thread the VM has ended and collects its result.
    fn finish(self) -> Result<u64> {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the host server thread panicked"))?
    }
}

/// Writes `bytes` of a non-zero pattern.
fn send_bytes(s: &mut impl std::io::Write, bytes: u64) -> Result<u64> {
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
        .collect();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        s.write_all(&chunk[..n]).context("sending to the guest")?;
        left -= n as u64;
    }
    Ok(bytes)
}

/// Reads `limit` bytes (or to EOF when `None`); returns how many arrived.
fn read_bytes(s: &mut impl std::io::Read, limit: Option<u64>) -> Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let want = match limit {
            Some(l) if total >= l => return Ok(total),
            Some(l) => usize::try_from(l - total)
                .unwrap_or(buf.len())
                .min(buf.len()),
            None => buf.len(),
        };
        match s.read(&mut buf[..want]) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading from the guest"),
        }
    }
}

/// The benchmark tap, with the host end's address; deleted on drop.
struct BenchTap;

impl BenchTap {
    fn create() -> Result<BenchTap> {
        let _ = Command::new("ip")
            .args(["link", "del", BENCH_TAP])
            .stderr(Stdio::null())
            .status();
        let cidr = format!("{BENCH_HOST_IP}/24");
        for args in [
            vec!["tuntap", "add", "dev", BENCH_TAP, "mode", "tap"],
            vec!["addr", "add", cidr.as_str(), "dev", BENCH_TAP],
            vec!["link", "set", BENCH_TAP, "up"],
        ] {
            let st = Command::new("ip")
                .args(&args)
                .status()
                .context("running ip (iproute2)")?;
            if !st.success() {
                bail!(
                    "ip {} failed: creating the benchmark tap needs root",
                    args.join(" ")
                );
            }
        }
        Ok(BenchTap)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", BENCH_TAP]).status();
    }
}

fn format_value(v: f64, unit: &str) -> String {
    format!("{} {unit}", report::num(Some(v)))
}

fn real_main() -> Result<ExitCode> {
    let args = Args::parse();
    let _ = QUICK.set(args.quick);
    let repo = repo_root();
    let chosen = selected(&args)?;
    check_inputs(&repo, &chosen)?;

    let in_testhost = std::env::var_os(ENV_IN_TESTHOST).is_some();
    if !in_testhost {
        warn_if_busy();
    }
    let kvm = match host::genuine_kvm() {
        Ok(module) => module,
        Err(why) if in_testhost => bail!("inside the test host, but {why}"),
        Err(why) => return hop_into_testhost(&repo, &args, &why),
    };
    for name in &args.only {
        if let Some(MetricDef {
            status: Status::NotYet(why),
            ..
        }) = metrics::find(name)
        {
            eprintln!("bench: {name}: nothing to run ({why})");
        }
    }

    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let commit = std::env::var(ENV_COMMIT).unwrap_or_else(|_| host::git_commit(&repo));
    let date = std::env::var(ENV_DATE).unwrap_or_else(|_| host::now_utc());
    let cpu = std::env::var(ENV_MACHINE).unwrap_or_else(|_| host::describe_cpu());
    let nested = in_testhost || host::is_virtual_machine(&cpuinfo);
    let machine = if in_testhost {
        format!(
            "{cpu}; VMs ran in the KVM test host (QEMU TCG L1 with AMD SVM, {} vCPUs, nested {kvm})",
            host::cores()
        )
    } else {
        format!("{cpu}; VMs ran on this machine's {kvm}")
    };

    let session: u32 = std::env::var(ENV_SESSION)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut journal = match std::env::var_os(ENV_JOURNAL) {
        Some(path) => Journal::open(Path::new(&path))
            .with_context(|| format!("opening the journal {}", path.to_string_lossy()))?,
        None => Journal::in_memory(),
    };

    let staged = Staged::new(&repo)?;
    let _tap = if chosen.iter().any(|w| w.spec.net.is_some()) {
        Some(BenchTap::create()?)
    } else {
        None
    };
    // Started on first use (a run found in the journal needs no daemon); dropping it
    // destroys its VMs, stops it and removes its bridge and directory.
    let mut orch = Orch::new(
        OrchInputs {
            orchestrator: repo.join(RELEASE_DIR).join("orchestrator"),
            jailer: repo.join(RELEASE_DIR).join("jailer"),
            vmm: staged.inputs.vmm.clone(),
            kernel: staged.inputs.kernel.clone(),
            rootfs: repo.join("target/guest/rootfs.ext4"),
        },
        args.quick,
    );
    let plan = Plan {
        runs: if args.quick { 1 } else { args.runs },
        quick: args.quick,
        warmup: !args.quick,
        timeout: Duration::from_secs(args.vm_timeout),
    };
    let total = plan.total(&chosen);
    let mut progress = match std::env::var_os(ENV_PROGRESS) {
        Some(path) => Progress::to_file(total, Path::new(&path))
            .with_context(|| format!("creating the progress file {}", path.to_string_lossy()))?,
        None => Progress::on_stderr(total, progress::stderr_is_fancy()),
    };
    progress.note(&format!("bench: commit {commit}, {machine}"));
    if session > 1 {
        progress.note(&format!(
            "bench: test host session {session}; {} run(s) kept from earlier sessions",
            journal.len()
        ));
    }
    let (measured, failed) = run_all(
        &chosen,
        &plan,
        &staged.inputs,
        &mut orch,
        &mut journal,
        &mut progress,
    );
    progress.finish();
    drop(orch);
    drop(staged);

    let skipped = if args.only.is_empty() {
        "not run: left out with --skip (the command above; see benches/README.md)"
    } else {
        "not run: left out by --only"
    };
    let report = Report::new(commit, date, machine, nested, CATALOG, measured, skipped);
    println!("{}", report.table());
    let mut extra = Vec::new();
    for w in &chosen {
        let runs = plan.runs_for(w);
        if runs != plan.runs && runs > 0 {
            let why = if runs > plan.runs {
                format!("at least {} for its p50/p99", orch::COLD_MIN_RUNS)
            } else {
                "at most 3: 50 VMs a run".to_string()
            };
            extra.push(format!("{}: {runs} runs ({why})", w.def.name));
        }
    }
    if session > 1 {
        extra.push(format!(
            "Test host sessions: {session}: the test host wedged; runs finished before were kept and the rest ran in a fresh one, so ratios mix sessions"
        ));
    }
    write_outputs(&repo, &args, &report, plan.runs, &extra)?;
    if failed > 0 {
        eprintln!("bench: {failed} run(s) FAILED");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("bench: all {total} runs completed");
    Ok(ExitCode::SUCCESS)
}

/// How many times and how long.
struct Plan {
    runs: u32,
    quick: bool,
    warmup: bool,
    timeout: Duration,
}

impl Plan {
    /// Runs of `w` per side: `--quick` runs each once (and a p99 of another workload's
    /// runs none).
    fn runs_for(&self, w: &Workload) -> u32 {
        if self.quick && w.full_runs(1) > 0 {
            self.runs
        } else {
            w.full_runs(self.runs)
        }
    }

    /// Runs in all, warm-ups included.
    fn total(&self, workloads: &[Workload]) -> u64 {
        let runs: u64 = workloads
            .iter()
            .map(|w| u64::from(self.runs_for(w)) * (1 + u64::from(w.qemu_peer)))
            .sum();
        let mut warmups = 0;
        if self.warmup && workloads.iter().any(|w| w.qemu_peer) {
            warmups += 2;
        }
        if self.warmup && workloads.iter().any(|w| matches!(w.probe, Probe::Orch(_))) {
            warmups += 1;
        }
        // The template is built before the first templated run, in `--quick` runs too.
        if workloads.iter().any(Workload::uses_template) {
            warmups += 1;
        }
        runs + warmups
    }
}

/// Runs the warm-up and every workload, alternating the sides; returns each workload's
/// result and the number of failed runs. Runs found in the journal are not done again.
fn run_all(
    chosen: &[Workload],
    plan: &Plan,
    inputs: &Inputs,
    orch: &mut Orch,
    journal: &mut Journal,
    progress: &mut Progress,
) -> (Vec<(String, MetricResult)>, usize) {
    let mut failed = 0usize;
    if let Some(w) = chosen.iter().find(|w| w.qemu_peer).filter(|_| plan.warmup) {
        // One untimed boot per side first, so the page cache holds qemu's libraries and both
        // sides start from the same warm state (in every fresh test host).
        for side in [Side::Ours, Side::Peer] {
            progress.starting(&format!("warm-up {}", side.as_str()));
            match measure_once(side, inputs, w, plan.timeout, orch) {
                Ok(v) => progress.finished(&format!(
                    "warm-up {}: {}",
                    side.as_str(),
                    format_value(v, w.def.unit)
                )),
                Err(e) => {
                    failed += 1;
                    progress.finished(&format!("warm-up {} FAILED: {e:#}", side.as_str()));
                }
            }
        }
    }
    let orch_chosen = chosen.iter().any(|w| matches!(w.probe, Probe::Orch(_)));
    if plan.warmup && orch_chosen {
        // One untimed create-to-exec first: it starts the daemon, and its first create
        // pays for the host's cold caches (nft, ip, cp, the jailer), not a measured run.
        progress.starting("warm-up orchestrator");
        match orch.measure(OrchProbe::CreateExecMs, plan.timeout) {
            Ok(v) => {
                let v = format_value(v, "ms");
                progress.finished(&format!("warm-up orchestrator: {v}"));
            }
            Err(e) => {
                failed += 1;
                progress.finished(&format!("warm-up orchestrator FAILED: {e:#}"));
            }
        }
    }
    if chosen.iter().any(Workload::uses_template) {
        // The template's build (a boot and a snapshot, seconds) is no templated run's time.
        progress.starting("warm-up orchestrator template");
        match orch.build_template(plan.timeout) {
            Ok(v) => {
                let v = format_value(v, "ms");
                progress.finished(&format!("warm-up orchestrator template (build): {v}"));
            }
            Err(e) => {
                failed += 1;
                progress.finished(&format!("warm-up orchestrator template FAILED: {e:#}"));
            }
        }
    }
    let mut measured = Vec::new();
    // Each workload's own samples, for peers derived from another metric of this run.
    let mut measured_samples: Vec<(&str, Vec<f64>)> = Vec::new();
    // Each workload's failures and first error, for a p99 made from its runs.
    let mut measured_failures: Vec<(&str, usize, Option<String>)> = Vec::new();
    for w in chosen {
        if let Probe::P99Of(source) = w.probe {
            let samples = measured_samples.iter().find(|(n, _)| *n == source);
            let fails = measured_failures.iter().find(|(n, ..)| *n == source);
            let result = match (samples, fails) {
                (Some((_, ours)), Some((_, failures, first))) => {
                    let mut r =
                        MetricResult::p99_of(w.def, w.method, ours, *failures, first.as_deref());
                    r.note
                        .push_str(&orch_note(w.def.name, ours, &measured_samples, orch));
                    r
                }
                _ => MetricResult::missing(
                    w.def,
                    &format!("not run: the p99 of {source}'s runs, which this run left out"),
                ),
            };
            measured.push((w.def.name.to_string(), result));
            continue;
        }
        let runs = plan.runs_for(w);
        let mut s = Samples::default();
        for run in 1..=runs {
            // Alternate which side goes first so neither always follows the other.
            let order = if run % 2 == 1 {
                [Side::Ours, Side::Peer]
            } else {
                [Side::Peer, Side::Ours]
            };
            for side in order {
                if side == Side::Peer && !w.qemu_peer {
                    continue;
                }
                let what = format!("{} {} run {run}/{runs}", w.def.name, side.as_str());
                let key = (w.def.name.to_string(), side.as_str().to_string(), run);
                let (outcome, kept) = match journal.get(&key) {
                    Some(o) => (o.clone(), " (kept from an earlier session)"),
                    None => {
                        progress.starting(&what);
                        let o = match measure_once(side, inputs, w, plan.timeout, orch) {
                            Ok(v) => Outcome::Ok(v),
                            Err(e) => Outcome::Failed(format!("{e:#}")),
                        };
                        journal.record(key, o.clone());
                        (o, "")
                    }
                };
                match outcome {
                    Outcome::Ok(v) => {
                        progress
                            .finished(&format!("{what}: {}{kept}", format_value(v, w.def.unit)));
                        match side {
                            Side::Ours => s.ours.push(v),
                            Side::Peer => s.peer.push(v),
                        }
                    }
                    Outcome::Failed(e) => {
                        progress.finished(&format!("{what} FAILED{kept}: {e}"));
                        s.failures += 1;
                        s.first_error.get_or_insert_with(|| {
                            let first = e.lines().next().unwrap_or_default();
                            format!("{} {first}", side.as_str())
                        });
                    }
                }
            }
        }
        failed += s.failures;
        if !w.qemu_peer {
            s.peer = derived_peer(w.def.name, &measured_samples);
        }
        let mut result = MetricResult::measured(
            w.def,
            w.method,
            &s.ours,
            &s.peer,
            s.failures,
            s.first_error.as_deref(),
        );
        if let Probe::Snapshot(..) = w.probe {
            result
                .note
                .push_str(&snapshot_note(w.def.name, &s.ours, &measured_samples));
        }
        if let Probe::Orch(_) = w.probe {
            result
                .note
                .push_str(&orch_note(w.def.name, &s.ours, &measured_samples, orch));
        }
        measured_failures.push((w.def.name, s.failures, s.first_error.clone()));
        measured_samples.push((w.def.name, s.ours.clone()));
        measured.push((w.def.name.to_string(), result));
    }
    (measured, failed)
}

/// What a snapshot metric's note adds from the run itself: for snapshot create, the memory
/// files' allocated size against the guest RAM each VMM had touched (medians; the issue's
/// target is allocated <= touched + 10%); for the 1 GiB restore, its ratio to the 128 MiB
/// one (target <= 1.2x: restore flat in guest size).
fn snapshot_note(name: &str, ours: &[f64], earlier: &[(&str, Vec<f64>)]) -> String {
    let median = |v: &mut Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let sizes = snap::take_file_sizes();
    match name {
        "snapshot_create_s_per_gib" => {
            let mut parts = Vec::new();
            for (side, what) in [(Side::Ours, "ours"), (Side::Peer, "qemu")] {
                let mut alloc: Vec<f64> = sizes
                    .iter()
                    .filter(|f| f.side == side)
                    .map(|f| f.allocated_kib as f64 / 1024.0)
                    .collect();
                let mut touched: Vec<f64> = sizes
                    .iter()
                    .filter(|f| f.side == side)
                    .map(|f| f.touched_kib as f64 / 1024.0)
                    .collect();
                if let (Some(a), Some(t)) = (median(&mut alloc), median(&mut touched)) {
                    let verdict = match side {
                        Side::Ours if a <= t * 1.1 => " (target <= touched + 10%: met)",
                        Side::Ours => " (target <= touched + 10%: NOT met)",
                        Side::Peer => "",
                    };
                    parts.push(format!(
                        "{what}'s memory file {a:.1} MiB allocated for {t:.1} MiB of guest RAM touched{verdict}"
                    ));
                }
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("; {}", parts.join("; "))
            }
        }
        "restore_running_ms_1g" => {
            let small = earlier
                .iter()
                .find(|(n, _)| *n == "restore_running_ms_128m")
                .and_then(|(_, v)| median(&mut v.clone()));
            match (median(&mut ours.to_vec()), small) {
                (Some(big), Some(small)) if small > 0.0 => {
                    let r = big / small;
                    let verdict = if r <= 1.2 { "met" } else { "NOT met" };
                    format!("; ours 1 GiB / 128 MiB = {r:.2}x (target <= 1.2x: {verdict})")
                }
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// What an orchestrator metric's note adds from the run itself: for the templated create
/// latency, its ratio to the cold one of this run (p50 to p50, p99 to p99); for the idle
/// templated VMs, the `MemAvailable` drop per VM and, in `--quick` runs, the VM count.
fn orch_note(name: &str, ours: &[f64], earlier: &[(&str, Vec<f64>)], orch: &mut Orch) -> String {
    let cold = earlier
        .iter()
        .find(|(n, _)| *n == "orch_create_exec_ms_cold_p50")
        .and_then(|(_, v)| Summary::of(v));
    let ours_summary = Summary::of(ours);
    match name {
        "orch_create_exec_ms_template_p50" | "orch_create_exec_ms_template_p99" => {
            let p99 = name.ends_with("p99");
            let pick = |s: Summary| if p99 { s.p99 } else { s.median };
            let which = if p99 { "p99" } else { "p50" };
            match (ours_summary.map(pick), cold.map(pick)) {
                (Some(t), Some(c)) if c > 0.0 => format!(
                    "; ours / orch_create_exec_ms_cold_p50's {which} of this run ({}) = {:.3}x",
                    format_value(c, "ms"),
                    t / c
                ),
                _ => {
                    "; compare with orch_create_exec_ms_cold_p50 (not measured in this run)".into()
                }
            }
        }
        "idle_templated_vm_host_mib" => idle_note(orch.idle_vms(), &orch.take_idle_drops()),
        _ => String::new(),
    }
}

/// The idle templated VMs' note: the VM count when `--quick` changed it, and the median
/// `MemAvailable` drop per VM of the runs.
fn idle_note(vms: u32, drops: &[f64]) -> String {
    let mut note = String::new();
    if vms != orch::IDLE_VMS {
        note.push_str(&format!(
            "; --quick: {vms} VMs instead of {}, so per-VM shares differ",
            orch::IDLE_VMS
        ));
    }
    if let Some(d) = Summary::of(drops) {
        note.push_str(&format!(
            "; host MemAvailable drop per VM (/proc/meminfo before the creates minus after the 3 s wait, divided by the VM count; includes what is not the VMMs', such as each VM's disk copy on the test host's tmpfs): median {} over {} run(s) of this session",
            format_value(d.median, "MiB"),
            d.n
        ));
    }
    note
}

/// The peer samples of a workload qemu cannot run: vsock is compared with our own
/// virtio-net guest->host TCP of the same run (in MiB/s), when that ran before it.
fn derived_peer(name: &str, earlier: &[(&str, Vec<f64>)]) -> Vec<f64> {
    match name {
        "vsock_stream_mibs" => earlier
            .iter()
            .find(|(n, _)| *n == "net_tcp_guest_to_host_gbps")
            .map(|(_, v)| v.iter().copied().map(gbps_to_mibs).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Writes the JSON (`quick.json`, `partial.json` or `latest.json`) and, for a full run, the
/// new RESULTS.md section.
fn write_outputs(
    repo: &Path,
    args: &Args,
    report: &Report,
    runs: u32,
    extra: &[String],
) -> Result<()> {
    let results = repo.join("benches/results");
    fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let json_name = if args.quick {
        "quick.json"
    } else if !args.only.is_empty() {
        "partial.json"
    } else {
        "latest.json"
    };
    let json = results.join(json_name);
    fs::write(&json, report.to_json()).with_context(|| format!("writing {}", json.display()))?;
    eprintln!("bench: wrote {}", json.display());
    if json_name == "latest.json" {
        let md = repo.join("benches/RESULTS.md");
        let existing = fs::read_to_string(&md).ok();
        let command = std::iter::once("bench".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let runs = usize::try_from(runs).unwrap_or(0);
        let section = report::results_section(report, runs, &command, extra);
        fs::write(&md, report::insert_section(existing.as_deref(), &section))
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("bench: added a section to {}", md.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod dd_tests {
    use super::*;

    #[test]
    fn dd_line_parsing() {
        let lines = vec![
            "guest-init: ready".to_string(),
            "DD=128 10.50 11.50".to_string(),
        ];
        assert_eq!(parse_dd(&lines).unwrap(), 128.0);
        assert!(parse_dd(&["DD=128 10.5 10.5".to_string()]).is_err());
        assert!(parse_dd(&["DD=128 x 1".to_string()]).is_err());
        assert!(parse_dd(&["nothing".to_string()]).is_err());
        assert!(!dd_command("if=/dev/vda of=/dev/null").contains('"'));
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    fn plan(runs: u32, quick: bool) -> Plan {
        Plan {
            runs,
            quick,
            warmup: !quick,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_cold_create_runs_at_least_20_times_in_full_runs_and_once_in_quick() {
        let all = workloads().unwrap();
        let by_name = |n: &str| all.iter().find(|w| w.def.name == n).unwrap();
        let cold = by_name("orch_create_exec_ms_cold_p50");
        let rate = by_name("orch_creates_per_s");
        let boot = by_name("boot_ready_ms_1vcpu");
        assert_eq!(plan(10, false).runs_for(cold), 20);
        assert_eq!(plan(30, false).runs_for(cold), 30);
        assert_eq!(plan(1, true).runs_for(cold), 1);
        assert_eq!(plan(10, false).runs_for(rate), 10);
        assert_eq!(plan(10, false).runs_for(boot), 10);
        assert_eq!((cold.vms_per_run(), rate.vms_per_run()), (1, 8));
        assert!(!cold.qemu_peer && !rate.qemu_peer);
    }

    #[test]
    fn the_template_p50_runs_like_the_cold_one_and_its_p99_never_runs() {
        let all = workloads().unwrap();
        let by_name = |n: &str| all.iter().find(|w| w.def.name == n).unwrap();
        let p50 = by_name("orch_create_exec_ms_template_p50");
        let p99 = by_name("orch_create_exec_ms_template_p99");
        assert_eq!(plan(10, false).runs_for(p50), 20);
        assert_eq!(plan(30, false).runs_for(p50), 30);
        assert_eq!(plan(1, true).runs_for(p50), 1);
        assert_eq!(plan(10, false).runs_for(p99), 0);
        assert_eq!(plan(1, true).runs_for(p99), 0);
        assert_eq!(p99.vms_per_run(), 0);
        assert_eq!(p99.probe, Probe::P99Of("orch_create_exec_ms_template_p50"));
        // The p99 comes after the workload it takes its samples from.
        let at = |n: &str| all.iter().position(|w| w.def.name == n).unwrap();
        assert!(at("orch_create_exec_ms_template_p50") < at("orch_create_exec_ms_template_p99"));
        for name in ["hibernate_s_per_gib", "wake_exec_ms"] {
            assert_eq!(plan(10, false).runs_for(by_name(name)), 10, "{name}");
            assert!(!by_name(name).qemu_peer, "{name}");
        }
        let idle = by_name("idle_templated_vm_host_mib");
        assert_eq!(plan(10, false).runs_for(idle), 3);
        assert_eq!(plan(2, false).runs_for(idle), 2);
        assert_eq!(plan(1, true).runs_for(idle), 1);
        assert!(!idle.qemu_peer);
        // wake_exec_ms reuses the VMs of hibernate_s_per_gib's runs, so it comes after.
        assert!(at("hibernate_s_per_gib") < at("wake_exec_ms"));
        assert_eq!(by_name("idle_templated_vm_host_mib").vms_per_run(), 50);
        let tpl: Vec<&str> = all
            .iter()
            .filter(|w| w.uses_template())
            .map(|w| w.def.name)
            .collect();
        assert_eq!(
            tpl,
            [
                "orch_create_exec_ms_template_p50",
                "idle_templated_vm_host_mib"
            ]
        );
    }

    #[test]
    fn the_total_counts_each_workloads_runs_and_the_warm_ups() {
        let only = |names: &[&str]| -> Vec<Workload> {
            workloads()
                .unwrap()
                .into_iter()
                .filter(|w| names.contains(&w.def.name))
                .collect()
        };
        let orch = only(&["orch_create_exec_ms_cold_p50", "orch_creates_per_s"]);
        // 20 + 10 runs of ours only, and the orchestrator's warm-up.
        assert_eq!(plan(10, false).total(&orch), 31);
        assert_eq!(plan(1, true).total(&orch), 2);
        let boot = only(&["boot_ready_ms_1vcpu"]);
        // Both sides, and one warm-up per side.
        assert_eq!(plan(10, false).total(&boot), 22);
        let new = only(&[
            "orch_create_exec_ms_template_p50",
            "orch_create_exec_ms_template_p99",
            "hibernate_s_per_gib",
            "wake_exec_ms",
            "idle_templated_vm_host_mib",
        ]);
        // 20 + 0 + 10 + 10 + 3 runs, the orchestrator's warm-up and the template's build.
        assert_eq!(plan(10, false).total(&new), 45);
        // One run each but the p99, and the template's build (in --quick runs too).
        assert_eq!(plan(1, true).total(&new), 5);
        let hib = only(&["hibernate_s_per_gib", "wake_exec_ms"]);
        assert_eq!(plan(1, true).total(&hib), 2);
    }
}

#[cfg(test)]
mod skip_tests {
    use super::*;

    #[test]
    fn skip_leaves_a_metric_out_and_unknown_names_are_refused() {
        let args = Args::try_parse_from(["bench", "--skip", "net_tcp_guest_to_host_gbps"]).unwrap();
        let names: Vec<&str> = selected(&args)
            .unwrap()
            .iter()
            .map(|w| w.def.name)
            .collect();
        assert!(!names.contains(&"net_tcp_guest_to_host_gbps"), "{names:?}");
        assert!(names.contains(&"net_tcp_host_to_guest_gbps"), "{names:?}");
        let all = selected(&Args::try_parse_from(["bench"]).unwrap()).unwrap();
        assert_eq!(all.len(), names.len() + 1);
        let bad = Args::try_parse_from(["bench", "--skip", "nope"]).unwrap();
        let e = selected(&bad).err().unwrap().to_string();
        assert!(e.contains("\"nope\" in --skip"), "{e}");
    }

    fn names(argv: &[&str]) -> Vec<&'static str> {
        let args = Args::try_parse_from(argv).unwrap();
        selected(&args)
            .unwrap()
            .iter()
            .map(|w| w.def.name)
            .collect()
    }

    #[test]
    fn a_p99_brings_its_samples_workload_along_and_goes_without_it() {
        let (p50, p99) = (
            "orch_create_exec_ms_template_p50",
            "orch_create_exec_ms_template_p99",
        );
        assert_eq!(names(&["bench", "--only", p99]), [p50, p99]);
        assert_eq!(names(&["bench", "--only", p50]), [p50]);
        let only_both = format!("{p50},{p99}");
        assert_eq!(names(&["bench", "--only", &only_both]), [p50, p99]);
        // --skip of the p50 leaves nothing to take the p99 from.
        let skipped = names(&["bench", "--skip", p50]);
        assert!(
            !skipped.contains(&p50) && !skipped.contains(&p99),
            "{skipped:?}"
        );
        assert!(skipped.contains(&"wake_exec_ms"));
        // --skip of the p99 alone keeps the p50.
        let skipped = names(&["bench", "--skip", p99]);
        assert!(
            skipped.contains(&p50) && !skipped.contains(&p99),
            "{skipped:?}"
        );
        let both = names(&["bench", "--only", p99, "--skip", p50]);
        assert!(both.is_empty(), "{both:?}");
    }
}

#[cfg(test)]
mod orch_note_tests {
    use super::*;

    fn orch(quick: bool) -> Orch {
        let p = PathBuf::from("/nonexistent");
        Orch::new(
            OrchInputs {
                orchestrator: p.clone(),
                jailer: p.clone(),
                vmm: p.clone(),
                kernel: p.clone(),
                rootfs: p,
            },
            quick,
        )
    }

    #[test]
    fn the_template_notes_give_the_ratio_to_the_cold_create_of_the_run() {
        let mut o = orch(false);
        let cold: Vec<f64> = vec![3000.0, 4000.0, 5000.0];
        let earlier = [("orch_create_exec_ms_cold_p50", cold)];
        let tpl = [300.0, 400.0, 500.0];
        let n = orch_note("orch_create_exec_ms_template_p50", &tpl, &earlier, &mut o);
        assert_eq!(
            n,
            "; ours / orch_create_exec_ms_cold_p50's p50 of this run (4000 ms) = 0.100x"
        );
        let n = orch_note("orch_create_exec_ms_template_p99", &tpl, &earlier, &mut o);
        // p99s: 498 / 4980.
        assert_eq!(
            n,
            "; ours / orch_create_exec_ms_cold_p50's p99 of this run (4980 ms) = 0.100x"
        );
        let n = orch_note("orch_create_exec_ms_template_p50", &tpl, &[], &mut o);
        assert_eq!(
            n,
            "; compare with orch_create_exec_ms_cold_p50 (not measured in this run)"
        );
        assert_eq!(orch_note("wake_exec_ms", &tpl, &earlier, &mut o), "");
    }

    #[test]
    fn the_idle_note_says_when_quick_runs_fewer_vms() {
        let mut o = orch(true);
        let n = orch_note("idle_templated_vm_host_mib", &[5.0], &[], &mut o);
        assert_eq!(n, "; --quick: 4 VMs instead of 50, so per-VM shares differ");
        let mut o = orch(false);
        assert_eq!(
            orch_note("idle_templated_vm_host_mib", &[5.0], &[], &mut o),
            ""
        );
        let n = idle_note(50, &[30.0, 10.0, 20.0]);
        assert!(n.starts_with("; host MemAvailable drop per VM ("), "{n}");
        assert!(
            n.ends_with(": median 20.0 MiB over 3 run(s) of this session"),
            "{n}"
        );
        let n = idle_note(4, &[7.5]);
        assert!(n.starts_with("; --quick: 4 VMs instead of 50"), "{n}");
        assert!(
            n.ends_with("median 7.50 MiB over 1 run(s) of this session"),
            "{n}"
        );
    }
}
