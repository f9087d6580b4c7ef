//! One VM's lifecycle: create (lease, netns, jail, VMM, agent health, manifest), stop,
//! destroy, exec, logs, and the watcher that notices a VMM that died.
//!
//! Every step that creates something on the host is undone if a later step fails, and is
//! also findable afterwards from the database row alone (the reconciler's job after a
//! crash): the netns is `orch-<id>`, the jail is `<state>/jail/vmm/<id>`, the per-VM files are
//! `<state>/vms/<id>` with the jailer's report in `jail.json`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Daemon;
use crate::manifest::{FieldError, Manifest};
use crate::netsetup;
use crate::store::{StoreError, VmRecord, VmState};

/// Where a VM's vsock socket is, inside its jail.
pub const VSOCK_IN_JAIL: &str = "/v.sock";
/// The console log inside the jail.
pub const CONSOLE_IN_JAIL: &str = "/console.log";
/// Guest context id of every VM (each has its own vsock device and socket).
pub const GUEST_CID: u32 = 3;
/// The jailer's `--parent-cgroup`: each VM's cgroups are `<daemon's cgroup>/orchestrator/<id>`.
pub const CGROUP_PARENT: &str = "orchestrator";
/// Largest console tail returned by `logs` or kept for a crashed VM.
pub const CONSOLE_TAIL: usize = 64 * 1024;

/// What went wrong, with the HTTP status class it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is wrong.
    BadRequest,
    /// 404.
    NotFound,
    /// 409: the state forbids it.
    Conflict,
    /// 503: out of a resource (addresses).
    Unavailable,
    /// 504: the guest did not answer in time.
    Timeout,
    /// 500.
    Internal,
}

/// An operation's failure: a kind, a message naming the VM/field/file, and field errors.
#[derive(Debug, Clone)]
pub struct OpError {
    /// Its class.
    pub kind: ErrorKind,
    /// What happened.
    pub message: String,
    /// Field-level problems (manifests, request bodies).
    pub fields: Vec<FieldError>,
}

impl OpError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> OpError {
        OpError::new(ErrorKind::Internal, e.to_string())
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        let kind = match &e {
            StoreError::InvalidVmId { .. } => ErrorKind::BadRequest,
            StoreError::ManifestNotFound { .. } | StoreError::VmNotFound { .. } => {
                ErrorKind::NotFound
            }
            StoreError::ManifestExists { .. }
            | StoreError::ManifestInUse { .. }
            | StoreError::VmExists { .. }
            | StoreError::MacCollision { .. } => ErrorKind::Conflict,
            StoreError::NoFreeAddress { .. } => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        // The whole chain: SQLite's own words are in the source.
        OpError::new(kind, format!("{:#}", anyhow::Error::new(e)))
    }
}

/// The host side of the VM network, from the configuration.
pub fn host_net(c: &super::Config) -> netsetup::HostNet {
    netsetup::HostNet {
        bridge: c.bridge.clone(),
        subnet: c.subnet,
        ..netsetup::HostNet::default()
    }
}

/// The network namespace of a VM.
pub fn netns_name(id: &str) -> String {
    format!("orch-{id}")
}

/// The jailer's report (its `--json` line), kept as `<vm dir>/jail.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailReport {
    /// `<base>/vmm/<id>`.
    pub jail_dir: PathBuf,
    /// `<jail_dir>/root`.
    pub jail_root: PathBuf,
    /// The VMM's pid.
    pub pid: i32,
    /// Cgroups the jailer made (ours to remove with --daemonize).
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

impl JailReport {
    /// Reads a VM's report, if it got that far.
    pub fn load(vm_dir: &Path) -> Option<JailReport> {
        let text = std::fs::read_to_string(vm_dir.join("jail.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Points of create and destroy where a test can kill the daemon (`kill -9`) to check that
/// a restart reconciles whatever was half done.
pub const KILL_POINTS: [&str; 22] = [
    "create:leased",
    "create:disk",
    "create:network",
    "create:jailer",
    "create:jail-report",
    "create:process",
    "create:agent",
    "create:manifest",
    "destroy:destroying",
    "destroy:vmm-stopped",
    "destroy:network-removed",
    "destroy:files-removed",
    "hibernate:paused",
    "hibernate:written",
    "hibernate:renamed",
    "hibernate:committed",
    "hibernate:released",
    "wake:jailer",
    "wake:jail-report",
    "wake:process",
    "wake:agent",
    "wake:resynced",
];

/// Test hook (debug builds only): with `ORCHESTRATOR_TEST_KILL_AT=<point>` in its
/// environment the daemon SIGKILLs itself on reaching that point of [`KILL_POINTS`].
pub(crate) fn kill_point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("ORCHESTRATOR_TEST_KILL_AT").is_ok_and(|v| v == name) {
        eprintln!("orchestrator: test hook: killing the daemon at {name}");
        // SAFETY: signalling ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// A new VM id: `vm-` and 8 hex digits from the kernel's RNG.
pub fn new_vm_id() -> String {
    let mut b = [0u8; 4];
    // getrandom(2) with no flags blocks only before the RNG is seeded at boot.
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        b = t.to_le_bytes();
    }
    format!("vm-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Refuses a VM id that cannot name the VM's netns, veth, jail and cgroups: the tightest
/// of their rules (netsetup's) applies, checked before anything is created.
pub fn check_id(id: &str) -> Result<(), OpError> {
    netsetup::validate_vm_id(id).map_err(|e| OpError {
        kind: ErrorKind::BadRequest,
        message: format!("invalid VM id {id:?}: {e}"),
        fields: vec![FieldError {
            path: "id".into(),
            reason: e.to_string(),
        }],
    })
}

/// Creates, boots and hands the manifest to a VM; returns its record once `running`.
/// Blocking: run it on the blocking pool.
pub fn create(d: &Daemon, manifest_name: &str, id: Option<String>) -> Result<VmRecord, OpError> {
    let started = Instant::now();
    let id = id.unwrap_or_else(new_vm_id);
    check_id(&id)?;
    let record = d.with_store(|s| s.get_manifest(manifest_name))?;
    let manifest = record.manifest;
    // Checked before anything is created: a manifest whose kernel went away creates nothing.
    manifest.check_files().map_err(|e| OpError {
        kind: ErrorKind::BadRequest,
        message: format!("manifest {manifest_name}: {e}"),
        fields: e.errors().to_vec(),
    })?;
    let (ip, mac) =
        d.with_store(|s| s.create_vm_with_lease(&id, manifest_name, &d.config.subnet))?;
    kill_point("create:leased");
    match boot(d, &id, &manifest, ip, mac) {
        Ok(()) => {
            d.with_store(|s| s.set_state(&id, VmState::Running))?;
            d.record_latency(true, started.elapsed().as_secs_f64());
            Ok(d.with_store(|s| s.get_vm(&id))?)
        }
        Err(e) => {
            // Undo everything, then forget the VM (lease released with it).
            teardown(d, &id);
            let _ = d.with_store(|s| s.destroy_vm(&id));
            Err(e)
        }
    }
}

/// The uid/gid a VM's VMM runs as: unique among live VMs, since leases are.
pub(crate) fn vm_uid(d: &Daemon, ip: std::net::Ipv4Addr) -> u32 {
    let index = u32::from(ip) - u32::from(d.config.subnet.network());
    d.config.uid_base + index
}

fn boot(
    d: &Daemon,
    id: &str,
    m: &Manifest,
    ip: std::net::Ipv4Addr,
    mac: crate::net_addr::Mac,
) -> Result<(), OpError> {
    let c = &d.config;
    let uid = vm_uid(d, ip);
    let vm_dir = c.vm_dir(id);
    super::ensure_private_dir(&vm_dir).map_err(OpError::internal)?;

    // From a template snapshot when the manifest asks for one (built on first use).
    let template = if m.template {
        Some(super::template::ensure(d, m)?)
    } else {
        None
    };

    // The disk: shared read-only, or a private copy (reflinked where the filesystem can)
    // of the image, or of the template's disk as it was when the template was taken. The
    // copy runs while the network is built.
    let (disk, copying) = if m.rootfs.read_only {
        (m.rootfs.path.clone(), None)
    } else {
        let copy = vm_dir.join("rootfs.img");
        let src = template
            .as_ref()
            .map_or(m.rootfs.path.clone(), |t| t.disk.clone());
        let (id2, dst) = (id.to_string(), copy.clone());
        let worker = std::thread::spawn(move || {
            let t = Instant::now();
            copy_disk(&id2, &src, &dst)?;
            eprintln!(
                "orchestrator: VM {id2}: disk copied from {} in {} ms",
                src.display(),
                t.elapsed().as_millis()
            );
            Ok::<_, OpError>(())
        });
        (copy, Some(worker))
    };
    let net = build_net(d, id, m, ip, mac, uid);
    if let Some(worker) = copying {
        worker
            .join()
            .map_err(|_| OpError::internal(format!("VM {id}: the disk copy panicked")))??;
    }
    net?;
    kill_point("create:disk");
    let netns = netns_name(id);
    kill_point("create:network");

    let start = match &template {
        Some(t) => Start::Restore {
            vmstate: &t.vmstate,
            memory: &t.memory,
        },
        None => Start::Boot {
            cmdline: kernel_cmdline(m),
        },
    };
    let spawn = Spawn {
        id,
        m,
        uid,
        disk: &disk,
        netns: &netns,
        start,
    };
    let report = spawn_vmm(c, &spawn)?;
    let pid = record_process(d, id, &report, "create")?;

    // The agent answers once guest-init is up; then the workload gets its manifest.
    let delivery = agent::ManifestDelivery {
        vm_id: id.to_string(),
        hostname: id.to_string(),
        workload: agent::WorkloadSpec {
            argv: std::iter::once(m.entrypoint.clone())
                .chain(m.args.iter().cloned())
                .collect(),
            env: m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            cwd: Some(m.working_dir.clone()),
        },
        manifest: agent::RawManifest::from_value(&m.to_value())
            .map_err(|e| OpError::internal(format!("VM {id}: manifest: {e}")))?,
    };
    if template.is_some() {
        // A clone: its own clock, RNG seed and hostname before the workload starts.
        after_restore(
            &report,
            m.agent_port,
            d.config.ready_timeout,
            pid,
            id,
            "create",
            Some(&delivery),
        )?;
    } else {
        let mut client = wait_for_agent(&report, m.agent_port, d.config.ready_timeout, pid, id)?;
        kill_point("create:agent");
        client.send_manifest(&delivery).map_err(|e| {
            OpError::internal(format!("VM {id}: delivering the manifest: {}", chain(&e)))
        })?;
    }
    kill_point("create:manifest");
    Ok(())
}

/// VM `id`'s network namespace: with its tap, veth and rules, or empty.
fn build_net(
    d: &Daemon,
    id: &str,
    m: &Manifest,
    ip: std::net::Ipv4Addr,
    mac: crate::net_addr::Mac,
    uid: u32,
) -> Result<(), OpError> {
    let c = &d.config;
    if m.network.enabled {
        netsetup::create_vm_net(
            &host_net(c),
            &netsetup::VmNet {
                vm_id: id.to_string(),
                leased_ip: ip,
                egress_allow: m.network.egress_allow.clone(),
                mac,
                tap_owner: uid,
            },
        )
        .map_err(|e| OpError::internal(format!("VM {id}: network: {e}")))?;
    } else {
        // Its own empty namespace all the same: no host interfaces visible.
        netsetup::create_offline_netns(id)
            .map_err(|e| OpError::internal(format!("VM {id}: network namespace: {e}")))?;
    }
    Ok(())
}

/// An error with its sources, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The agent steps after a snapshot restore: Resync (clock, RNG seed, hostname), then for a
/// new clone its manifest. The restored guest resets every vsock connection when it
/// handles the restore's transport-reset event, and a connection opened just before it
/// does is cut: so a broken connection is made again and the steps redone (Resync is
/// idempotent; a manifest is sent again only if the agent reports no workload yet). `phase`
/// names the kill points passed (`<phase>:agent`, `wake:resynced`).
pub(crate) fn after_restore(
    report: &JailReport,
    port: u32,
    timeout: Duration,
    pid: u32,
    id: &str,
    phase: &str,
    delivery: Option<&agent::ManifestDelivery>,
) -> Result<(), OpError> {
    let deadline = Instant::now() + timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut client = wait_for_agent(report, port, left, pid, id)?;
        if attempt == 1 {
            kill_point(&format!("{phase}:agent"));
        }
        let step = (|| {
            let req = agent::ResyncRequest::now(Some(id.to_string()))
                .map_err(|e| (false, format!("resync request: {e}")))?;
            client.resync(&req).map_err(|e| {
                (
                    matches!(e, agent::AgentError::Frame(_)),
                    format!("resync: {}", chain(&e)),
                )
            })?;
            if phase == "wake" {
                kill_point("wake:resynced");
            }
            let Some(delivery) = delivery else {
                return Ok(());
            };
            if attempt > 1 {
                let st = client.workload_status().map_err(|e| {
                    (
                        matches!(e, agent::AgentError::Frame(_)),
                        format!("workload status: {}", chain(&e)),
                    )
                })?;
                if st.state != agent::WorkloadState::None {
                    // Delivered by the attempt whose connection broke.
                    return Ok(());
                }
            }
            client.send_manifest(delivery).map(|_| ()).map_err(|e| {
                (
                    matches!(e, agent::AgentError::Frame(_)),
                    format!("delivering the manifest: {}", chain(&e)),
                )
            })
        })();
        match step {
            Ok(()) => return Ok(()),
            Err((true, why)) if attempt < 5 && Instant::now() < deadline => {
                eprintln!("orchestrator: VM {id}: agent connection cut after the restore ({why}); connecting again");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((_, why)) => return Err(OpError::internal(format!("VM {id}: {why}"))),
        }
    }
}

/// Copies a disk image for a VM (reflinked where the filesystem can, sparse otherwise).
pub(crate) fn copy_disk(id: &str, src: &Path, dst: &Path) -> Result<(), OpError> {
    let st = Command::new("cp")
        .arg("--reflink=auto")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .map_err(|e| OpError::internal(format!("VM {id}: run cp: {e}")))?;
    if !st.success() {
        return Err(OpError::internal(format!(
            "VM {id}: copying {} to {} failed ({st})",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}

/// The guest kernel command line of a manifest's VMs (the same for all of them: the guest
/// side of the network is identical in every VM, so a template's snapshot fits any clone).
pub(crate) fn kernel_cmdline(m: &Manifest) -> String {
    let mut args = String::from("console=ttyS0 reboot=k panic=-1 quiet");
    if m.network.enabled {
        args.push(' ');
        args.push_str(&netsetup::guest_kernel_ip_param());
    }
    args.push_str(&format!(" gi.agent={}", m.agent_port));
    args
}

/// The VMM's API socket inside its jail.
pub const API_IN_JAIL: &str = "/api.sock";
/// Where a snapshot's files are put in the jail for a restore.
const VMSTATE_IN_JAIL: &str = "/snapshot.vmstate";
const MEMORY_IN_JAIL: &str = "/snapshot.mem";

/// How a VMM starts.
pub(crate) enum Start<'a> {
    /// Boot the manifest's kernel with this command line.
    Boot {
        /// The kernel command line.
        cmdline: String,
    },
    /// Restore a snapshot (host paths) and resume it at once.
    Restore {
        /// The vmstate file.
        vmstate: &'a Path,
        /// The memory file (mapped copy-on-write, never written).
        memory: &'a Path,
    },
}

/// One jailed VMM to start.
pub(crate) struct Spawn<'a> {
    /// Its id (jail, cgroups, hostname).
    pub id: &'a str,
    /// The manifest it runs.
    pub m: &'a Manifest,
    /// Its uid and gid.
    pub uid: u32,
    /// The host path of its disk.
    pub disk: &'a Path,
    /// Its network namespace (under /run/netns).
    pub netns: &'a str,
    /// Boot or restore.
    pub start: Start<'a>,
}

/// Starts a jailed, daemonized VMM; returns the jailer's report.
pub(crate) fn spawn_vmm(c: &super::Config, s: &Spawn<'_>) -> Result<JailReport, OpError> {
    let (id, m) = (s.id, s.m);
    let mut cmd = Command::new(&c.jailer);
    cmd.args(["--id", id])
        .arg("--exec-file")
        .arg(&c.vmm)
        .args(["--uid", &s.uid.to_string(), "--gid", &s.uid.to_string()])
        .arg("--chroot-base-dir")
        .arg(c.jail_base())
        .arg("--netns")
        .arg(Path::new("/run/netns").join(s.netns))
        .args(["--parent-cgroup", CGROUP_PARENT])
        .args(["--mount-proc", "--daemonize", "--json"]);
    match &s.start {
        Start::Boot { .. } => {
            cmd.arg("--file")
                .arg(format!("{}:/vmlinux", m.kernel.display()));
            if let Some(initrd) = &m.initrd {
                cmd.arg("--file")
                    .arg(format!("{}:/initrd", initrd.display()));
            }
        }
        Start::Restore { vmstate, memory } => {
            cmd.arg("--file")
                .arg(format!("{}:{VMSTATE_IN_JAIL}", vmstate.display()))
                .arg("--file")
                .arg(format!("{}:{MEMORY_IN_JAIL}", memory.display()));
        }
    }
    let rw = if m.rootfs.read_only { "" } else { ":rw" };
    cmd.arg("--file")
        .arg(format!("{}:/rootfs.img{rw}", s.disk.display()));
    for lib in vmm_libraries(&c.vmm) {
        cmd.arg("--file")
            .arg(format!("{}:{}", lib.display(), lib.display()));
    }
    let mem_max_mib = m
        .limits
        .memory_max_mib
        .unwrap_or(u64::from(m.memory_mib) + 256);
    cmd.arg("--cgroup")
        .arg(format!("memory.max={}", mem_max_mib * 1024 * 1024));
    if let Some(pct) = m.limits.cpu_quota_pct {
        cmd.arg("--cgroup")
            .arg(format!("cpu.max={} 100000", u64::from(pct) * 1000));
    }
    if let Some(p) = m.limits.pids_max {
        cmd.arg("--cgroup").arg(format!("pids.max={p}"));
    }
    if let Some(n) = m.limits.open_files {
        cmd.arg("--resource-limit").arg(format!("no-file={n}"));
    }
    cmd.arg("--");
    match &s.start {
        Start::Boot { cmdline } => {
            cmd.args(["--kernel", "/vmlinux"]);
            if m.initrd.is_some() {
                cmd.args(["--initrd", "/initrd"]);
            }
            cmd.args(["--vcpus", &m.vcpus.to_string()])
                .args(["--memory-mib", &m.memory_mib.to_string()])
                .arg("--drive")
                .arg(format!(
                    "path=/rootfs.img,id=rootfs,root=true,readonly={}",
                    m.rootfs.read_only
                ))
                .arg("--vsock")
                .arg(format!("cid={GUEST_CID},uds={VSOCK_IN_JAIL}"));
            if m.network.enabled {
                // The guest side is the same in every VM (its netns translates to the
                // lease).
                cmd.arg("--net").arg(format!(
                    "tap={},mac={}",
                    netsetup::TAP_NAME,
                    netsetup::GUEST_MAC
                ));
            }
            cmd.args(["--cmdline", cmdline]);
        }
        Start::Restore { .. } => {
            // Disk, tap and vsock paths are the snapshot's own: every jail and netns lays
            // them out the same way.
            cmd.args([
                "--restore",
                VMSTATE_IN_JAIL,
                "--memory",
                MEMORY_IN_JAIL,
                "--resume",
            ]);
        }
    }
    cmd.args(["--console", CONSOLE_IN_JAIL, "--api-sock", API_IN_JAIL]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| OpError::internal(format!("VM {id}: run {}: {e}", c.jailer.display())))?;
    if !out.status.success() {
        return Err(OpError::internal(format!(
            "VM {id}: the jailer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().next().unwrap_or(""))
        .map_err(|e| OpError::internal(format!("VM {id}: jailer report {line:?}: {e}")))
}

/// Keeps a started VMM's report (`jail.json`) and records its process; `phase` names the
/// kill points passed (`create` or `wake`). Returns the pid.
pub(crate) fn record_process(
    d: &Daemon,
    id: &str,
    report: &JailReport,
    phase: &str,
) -> Result<u32, OpError> {
    kill_point(&format!("{phase}:jailer"));
    let vm_dir = d.config.vm_dir(id);
    let tmp = vm_dir.join("jail.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(report).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, vm_dir.join("jail.json")))
        .map_err(|e| OpError::internal(format!("VM {id}: write jail.json: {e}")))?;
    kill_point(&format!("{phase}:jail-report"));
    let pid = u32::try_from(report.pid).map_err(OpError::internal)?;
    let start_time = crate::store::process_start_time(pid)
        .map_err(|e| OpError::internal(format!("VM {id}: its VMM (pid {pid}) is gone: {e}")))?;
    d.with_store(|s| s.set_process(id, pid, start_time, &report.jail_dir, &netns_name(id)))?;
    kill_point(&format!("{phase}:process"));
    Ok(pid)
}

fn with_console(mut e: OpError, jail_root: &Path) -> OpError {
    let tail = console_tail(jail_root, 2048);
    if !tail.is_empty() {
        e.message.push_str("; last console output:\n");
        e.message.push_str(&tail);
    }
    e
}

/// Connects to the agent of the VMM in `report`'s jail and checks its health, retrying
/// until `timeout`; fails early if the VMM process is gone. Errors carry the console tail.
pub(crate) fn wait_for_agent(
    report: &JailReport,
    port: u32,
    timeout: Duration,
    pid: u32,
    id: &str,
) -> Result<agent::AgentClient<std::os::unix::net::UnixStream>, OpError> {
    let uds = report.jail_root.join(VSOCK_IN_JAIL.trim_start_matches('/'));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(with_console(
                OpError::internal(format!(
                    "VM {id}: its VMM (pid {pid}) exited while starting"
                )),
                &report.jail_root,
            ));
        }
        if uds.exists() {
            match connect_agent(&uds, port) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(with_console(
                OpError::new(
                    ErrorKind::Timeout,
                    format!(
                        "VM {id}: guest agent on vsock port {port} did not answer within {} s ({last})",
                        timeout.as_secs()
                    ),
                ),
                &report.jail_root,
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One agent connection: handshake and a health check.
pub fn connect_agent(
    uds: &Path,
    port: u32,
) -> Result<agent::AgentClient<std::os::unix::net::UnixStream>, String> {
    let s = agent::connect_hybrid(uds, port, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut c = agent::AgentClient::new(s);
    c.hello().map_err(|e| e.to_string())?;
    c.health().map_err(|e| e.to_string())?;
    Ok(c)
}

/// The last `max` bytes of a VM's console log.
pub fn console_tail(jail_root: &Path, max: usize) -> String {
    let path = jail_root.join(CONSOLE_IN_JAIL.trim_start_matches('/'));
    let Ok(mut f) = std::fs::File::open(&path) else {
        return String::new();
    };
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max as u64);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).replace('\r', "")
}

/// Whether the process `pid` started at `start_time` still runs (not a reused pid).
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    crate::store::process_start_time(pid).is_ok_and(|t| t == start_time)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

/// Stops the VMM of `vm` (SIGTERM, then SIGKILL after 10 s) if it is still the process we
/// started.
pub(crate) fn kill_vmm(vm: &VmRecord) {
    if let (Some(pid), Some(start)) = (vm.pid, vm.pid_start_time) {
        kill_process(pid, start);
    }
}

/// SIGTERM, then SIGKILL after 10 s, to the process `pid` started at `start`; returns once
/// it is gone (or 5 s after the SIGKILL).
pub(crate) fn kill_process(pid: u32, start: u64) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if !process_alive(pid, start) {
        return;
    }
    // SAFETY: signalling a pid we verified by its start time.
    unsafe { libc::kill(raw, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid, start) {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(raw, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid, start) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops VM `id`'s VMM and removes what only a VMM needs: its cgroups (killing whatever
/// still runs in them, even a VMM the database never heard of) and its jail directory. The
/// netns, disk and per-VM files stay. Idempotent.
pub fn release_vmm(d: &Daemon, id: &str) {
    if let Ok(vm) = d.with_store(|s| s.get_vm(id)) {
        kill_vmm(&vm);
        if vm.state == VmState::Destroying {
            kill_point("destroy:vmm-stopped");
        }
    }
    let mut cgroups = planned_cgroups(id);
    if let Some(r) = JailReport::load(&d.config.vm_dir(id)) {
        cgroups.extend(r.cgroups);
    }
    for cg in &cgroups {
        empty_cgroup(cg);
    }
    for cg in &cgroups {
        let _ = std::fs::remove_dir(cg);
    }
    let _ = std::fs::remove_dir_all(d.config.jail_base().join("vmm").join(id));
}

/// Removes everything a VM has on the host except its database row: VMM, cgroups, netns,
/// jail directory, per-VM files. Idempotent; used by destroy, failed creates and the
/// reconciler.
pub fn teardown(d: &Daemon, id: &str) {
    release_vmm(d, id);
    let _ = netsetup::destroy_vm_net(id);
    let destroying = d
        .with_store(|s| s.get_vm(id))
        .is_ok_and(|v| v.state == VmState::Destroying);
    if destroying {
        kill_point("destroy:network-removed");
    }
    let _ = std::fs::remove_dir_all(d.config.vm_dir(id));
    if destroying {
        kill_point("destroy:files-removed");
    }
}

/// The cgroup settings every VMM is started with (the optional ones too: a plan over all
/// of them names every hierarchy a VM's cgroups can be in).
const CGROUP_KEYS: [&str; 3] = ["memory.max=max", "cpu.max=max", "pids.max=max"];

/// Where the jailer puts VM `id`'s cgroups (`--parent-cgroup orchestrator`), worked out the
/// way the jailer does it: the daemon and the jailers it starts share their cgroup.
pub(crate) fn planned_cgroups(id: &str) -> Vec<PathBuf> {
    use crate::jailer::cgroup::{CgroupPlan, CgroupSetting, CgroupVersionArg};
    for n in (1..=CGROUP_KEYS.len()).rev() {
        let settings: Vec<CgroupSetting> = CGROUP_KEYS[..n]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        if let Ok(plan) = CgroupPlan::new(&settings, CgroupVersionArg::Auto, CGROUP_PARENT, id) {
            return plan.leaves();
        }
    }
    Vec::new()
}

/// SIGKILLs every process in a cgroup directory and waits (at most 5 s) until it is empty.
pub(crate) fn empty_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            // SAFETY: a process in the VM's own cgroup, which only its VMM joins.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Destroys a VM: everything on the host, then its row and lease (one transaction).
pub fn destroy(d: &Daemon, id: &str) -> Result<(), OpError> {
    let started = Instant::now();
    let vm = d.with_store(|s| s.get_vm(id))?;
    if vm.state != VmState::Destroying {
        d.with_store(|s| s.set_state(id, VmState::Destroying))?;
    }
    kill_point("destroy:destroying");
    super::forward::stop(d, id);
    teardown(d, id);
    d.with_store(|s| s.destroy_vm(id))?;
    d.forget_activity(id);
    d.record_latency(false, started.elapsed().as_secs_f64());
    Ok(())
}

/// Stops a VM's VMM, keeping its lease, disk and network for a later destroy.
pub fn stop(d: &Daemon, id: &str) -> Result<VmRecord, OpError> {
    let vm = d.with_store(|s| s.get_vm(id))?;
    if vm.state != VmState::Running && vm.state != VmState::Crashed {
        return Err(OpError::new(
            ErrorKind::Conflict,
            format!("VM {id} is {}, not running", vm.state),
        ));
    }
    // Forget the process first: the exit watcher then knows this exit is no crash.
    d.with_store(|s| s.clear_process(id))?;
    kill_vmm(&vm);
    let tail = JailReport::load(&d.config.vm_dir(id))
        .map(|r| console_tail(&r.jail_root, CONSOLE_TAIL))
        .unwrap_or_default();
    d.with_store(|s| {
        s.set_last_console(id, &tail)?;
        s.set_state(id, VmState::Stopped)
    })?;
    Ok(d.with_store(|s| s.get_vm(id))?)
}

/// Watches a running VM's VMM through a pidfd: when it exits while the VM should be
/// running, the VM becomes `crashed` with its last console lines, and its host resources
/// (VMM leftovers, cgroups, netns) are reclaimed; the row and lease stay until destroy.
pub fn watch(d: Arc<Daemon>, id: String) {
    let Ok(vm) = d.with_store(|s| s.get_vm(&id)) else {
        return;
    };
    let (Some(pid), Some(start)) = (vm.pid, vm.pid_start_time) else {
        return;
    };
    tokio::spawn(async move {
        wait_exit(pid, start).await;
        let d2 = Arc::clone(&d);
        let _ = tokio::task::spawn_blocking(move || on_exit(&d2, &id, pid)).await;
    });
}

/// Resolves when process `pid` (started at `start`) has exited.
async fn wait_exit(pid: u32, start: u64) {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if let Ok(fd) = i32::try_from(fd) {
        if fd >= 0 {
            // SAFETY: a fresh fd we own.
            let owned =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            if process_alive(pid, start) {
                // SAFETY: the AsyncFd owns the pidfd and nothing else closes or replaces it.
                if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(owned) } {
                    // A pidfd becomes readable when the process exits.
                    let _ = afd.readable().await;
                    return;
                }
            }
        }
    }
    while process_alive(pid, start) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn on_exit(d: &Daemon, id: &str, pid: u32) {
    let Ok(vm) = d.with_store(|s| s.get_vm(id)) else {
        return;
    };
    // Only a VMM that dies on its own is a crash; stop and destroy clear `pid` first or
    // move the state on.
    if vm.state != VmState::Running || vm.pid != Some(pid) {
        return;
    }
    let tail = JailReport::load(&d.config.vm_dir(id))
        .map(|r| console_tail(&r.jail_root, CONSOLE_TAIL))
        .unwrap_or_default();
    // Its host pieces go first, so `crashed` means reclaimed; the row (with the console
    // tail) and the lease stay until destroy.
    teardown(d, id);
    let _ = d.with_store(|s| {
        s.set_last_console(id, &tail)?;
        s.clear_process(id)?;
        s.set_state(id, VmState::Crashed)
    });
    eprintln!("orchestrator: VM {id}: its VMM (pid {pid}) exited unexpectedly; marked crashed");
}

/// [`shared_libraries`] of the `vmm` binary, worked out again only when the binary changes.
fn vmm_libraries(vmm: &Path) -> Vec<PathBuf> {
    type Cached = Option<(PathBuf, Option<std::time::SystemTime>, Vec<PathBuf>)>;
    static CACHE: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let mtime = std::fs::metadata(vmm).and_then(|md| md.modified()).ok();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((p, t, libs)) = cache.as_ref() {
        if p == vmm && *t == mtime && mtime.is_some() {
            return libs.clone();
        }
    }
    let libs = shared_libraries(vmm);
    *cache = Some((vmm.to_path_buf(), mtime, libs.clone()));
    libs
}

/// The loader and libraries a dynamic binary needs (from `ldd`), for its jail.
pub fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
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
