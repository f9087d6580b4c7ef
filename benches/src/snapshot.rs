//! The snapshot workloads: snapshot create time per GiB, and restore latency to running and
//! to the guest answering an exec.
//!
//! Ours: boot with `--api-sock` and the guest agent on vsock, pause (`PATCH /vm`), time
//! `PUT /snapshot/create`; kill the VMM; start a bare `vmm --api-sock`, time
//! `PUT /snapshot/load` with `resume_vm` (to running), then until the guest agent answers
//! an exec of `true` over the vsock socket (to exec).
//! Peer: qemu microvm with a QMP socket, `stop`, time `migrate` to `exec:cat > FILE` until
//! `query-migrate` says completed; kill qemu; start it again with `-incoming defer`, time
//! `migrate-incoming` from `exec:cat FILE` until `query-status` says running.
//! Both sides snapshot an idle guest one second after `guest-init: ready`, and both files
//! live on the test host's tmpfs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::control::{Api, Qmp};
use crate::smaps;
use crate::vm::{self, GuestSpec, Inputs, Side, READY_LINE};

/// The guest agent's vsock port (guest-init's `gi.agent=`).
pub const AGENT_PORT: u32 = 1024;
/// How long the guest idles after its ready line before the snapshot.
const SETTLE: Duration = Duration::from_secs(1);

/// What a snapshot workload reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapProbe {
    /// Seconds per GiB of guest RAM for the snapshot (after the pause).
    CreateSPerGib,
    /// ms from the load call to the vCPUs running.
    RestoreRunningMs,
    /// ms from the load call to the guest agent answering an exec (ours only).
    RestoreExecMs,
}

/// One snapshot's memory file: allocated KiB on disk and guest RAM the VMM had touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSize {
    /// Which VMM wrote it.
    pub side: Side,
    /// The file's allocated size (st_blocks), KiB.
    pub allocated_kib: u64,
    /// Resident guest RAM of the VMM just before the snapshot, KiB.
    pub touched_kib: u64,
}

/// Every memory file measured so far in this process (see [`take_file_sizes`]).
static FILE_SIZES: Mutex<Vec<FileSize>> = Mutex::new(Vec::new());

/// The memory file sizes recorded since the last call.
pub fn take_file_sizes() -> Vec<FileSize> {
    std::mem::take(&mut *FILE_SIZES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A VMM process with its console in a file; killed on drop.
struct Running {
    child: Child,
    out: PathBuf,
}

impl Running {
    fn spawn(mut cmd: Command, out: &Path) -> Result<Running> {
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("console file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        Ok(Running {
            child,
            out: out.to_path_buf(),
        })
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// The last lines of the console, for error messages.
    fn tail(&self) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n  ")
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if self.console().lines().any(|l| l.trim() == READY_LINE) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait().context("waiting for the VMM")? {
                bail!("exited with {st} before `{READY_LINE}`:\n  {}", self.tail());
            }
            if Instant::now() >= deadline {
                bail!("no `{READY_LINE}` by the deadline:\n  {}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for one run; removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn allocated_kib(path: &Path) -> Result<u64> {
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(m.blocks() * 512 / 1024)
}

fn guest_rss_kib(pid: u32, mem_mib: u32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
    let maps = smaps::parse(&text)?;
    let guest = smaps::guest_ram(&maps, u64::from(mem_mib) * 1024)
        .context("no guest RAM mapping in smaps")?;
    Ok(guest.iter().map(|&i| maps[i].rss_kib).sum())
}

/// The guest every snapshot workload boots: one vCPU, `mem_mib`, idle. Ours serves the
/// guest agent on vsock; qemu (no vsock in the test host) sleeps.
pub fn guest(side: Side, mem_mib: u32, uds: &Path) -> GuestSpec {
    let mut spec = GuestSpec {
        vcpus: 1,
        mem_mib,
        gi_cmd: None,
        disk: None,
        net: None,
        vsock_uds: None,
        agent_port: None,
    };
    match side {
        Side::Ours => {
            spec.vsock_uds = Some(uds.to_path_buf());
            spec.agent_port = Some(AGENT_PORT);
        }
        Side::Peer => spec.gi_cmd = Some("busybox sleep 100000".into()),
    }
    spec
}

/// Runs one snapshot cycle under `side` and returns what `probe` asks for.
pub fn measure(
    side: Side,
    inputs: &Inputs,
    mem_mib: u32,
    probe: SnapProbe,
    timeout: Duration,
) -> Result<f64> {
    let base = inputs
        .kernel
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("snap-{}", side.as_str()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch(dir.clone());
    let deadline = Instant::now() + timeout;
    let spec = guest(side, mem_mib, &dir.join("v.sock"));
    let value = match side {
        Side::Ours => ours(inputs, &spec, &scratch.0, probe, deadline),
        Side::Peer => peer(inputs, &spec, &scratch.0, probe, deadline),
    }?;
    Ok(value)
}

fn record(side: Side, mem: &Path, touched_kib: u64) -> Result<()> {
    let allocated_kib = allocated_kib(mem)?;
    FILE_SIZES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(FileSize {
            side,
            allocated_kib,
            touched_kib,
        });
    Ok(())
}

fn per_gib(took: Duration, mem_mib: u32) -> f64 {
    took.as_secs_f64() / (f64::from(mem_mib) / 1024.0)
}

fn ours(
    inputs: &Inputs,
    spec: &GuestSpec,
    dir: &Path,
    probe: SnapProbe,
    deadline: Instant,
) -> Result<f64> {
    let (vmstate, mem) = (dir.join("vmstate"), dir.join("memory"));
    let uds = spec.vsock_uds.clone().context("no vsock socket")?;
    let sock = dir.join("boot.sock");
    let mut cmd = vm::command(Side::Ours, inputs, spec)?;
    cmd.arg("--api-sock").arg(&sock);
    let mut first = Running::spawn(cmd, &dir.join("boot.out"))?;
    first.wait_ready(deadline)?;
    std::thread::sleep(SETTLE);
    let touched = guest_rss_kib(first.child.id(), spec.mem_mib)?;
    let api = Api::new(&sock)?;
    api.expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204)?;
    let body = json!({"snapshot_path": vmstate, "mem_file_path": mem}).to_string();
    let t0 = Instant::now();
    api.expect("PUT", "/snapshot/create", Some(&body), 204)
        .with_context(|| format!("console:\n  {}", first.tail()))?;
    let created = t0.elapsed();
    record(Side::Ours, &mem, touched)?;
    first.kill();
    if probe == SnapProbe::CreateSPerGib {
        return Ok(per_gib(created, spec.mem_mib));
    }
    let _ = fs::remove_file(&uds);

    let sock = dir.join("restore.sock");
    let mut cmd = Command::new(&inputs.vmm);
    cmd.arg("--api-sock").arg(&sock);
    let second = Running::spawn(cmd, &dir.join("restore.out"))?;
    let api = Api::new(&sock)?;
    api.wait_ready(deadline)?;
    let body = json!({
        "snapshot_path": vmstate,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string();
    let t0 = Instant::now();
    api.expect("PUT", "/snapshot/load", Some(&body), 204)
        .with_context(|| format!("console:\n  {}", second.tail()))?;
    let running = t0.elapsed();
    if probe == SnapProbe::RestoreRunningMs {
        return Ok(running.as_secs_f64() * 1000.0);
    }
    exec_true(&uds, deadline).with_context(|| format!("console:\n  {}", second.tail()))?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Connects to the guest agent through the hybrid vsock socket, retrying until its listener
/// is back after the transport reset and it answers `Hello`, then runs `true`.
fn exec_true(uds: &Path, deadline: Instant) -> Result<()> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let client = agent::connect_hybrid(uds, AGENT_PORT, Duration::from_secs(10))
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut c = agent::AgentClient::new(s);
                c.hello().map_err(|e| e.to_string())?;
                Ok(c)
            });
        match client {
            Ok(mut c) => {
                let r = c
                    .exec(&agent::ExecRequest::new(["busybox", "true"]))
                    .context("agent exec")?;
                if r.code != Some(0) {
                    bail!("agent exec of `busybox true` ended with {r:?}");
                }
                return Ok(());
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!(
        "the guest agent never answered on {}: {last}",
        uds.display()
    )
}

fn peer(
    inputs: &Inputs,
    spec: &GuestSpec,
    dir: &Path,
    probe: SnapProbe,
    deadline: Instant,
) -> Result<f64> {
    if probe == SnapProbe::RestoreExecMs {
        bail!(
            "qemu microvm has no guest agent path in the test host (its vsock needs vhost-vsock)"
        );
    }
    let file = dir.join("migration");
    let qmp_sock = dir.join("qmp.sock");
    let mut cmd = vm::command(Side::Peer, inputs, spec)?;
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()));
    let mut first = Running::spawn(cmd, &dir.join("boot.out"))?;
    first.wait_ready(deadline)?;
    std::thread::sleep(SETTLE);
    let touched = guest_rss_kib(first.child.id(), spec.mem_mib)?;
    let mut qmp = Qmp::connect(&qmp_sock, deadline)?;
    qmp.execute("stop", None)?;
    let t0 = Instant::now();
    qmp.execute(
        "migrate",
        Some(json!({"uri": format!("exec:cat > {}", file.display())})),
    )?;
    qmp.poll("query-migrate", deadline, |v| match v["status"].as_str() {
        Some("completed") => Ok(true),
        Some("failed") | Some("cancelled") => bail!("qemu's migration ended: {v}"),
        _ => Ok(false),
    })?;
    let created = t0.elapsed();
    record(Side::Peer, &file, touched)?;
    first.kill();
    if probe == SnapProbe::CreateSPerGib {
        return Ok(per_gib(created, spec.mem_mib));
    }

    let qmp_sock = dir.join("qmp-restore.sock");
    let mut cmd = vm::command(Side::Peer, inputs, spec)?;
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .args(["-incoming", "defer"]);
    let second = Running::spawn(cmd, &dir.join("restore.out"))?;
    let mut qmp = Qmp::connect(&qmp_sock, deadline)
        .with_context(|| format!("console:\n  {}", second.tail()))?;
    let t0 = Instant::now();
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("exec:cat {}", file.display())})),
    )?;
    // The stream carries the source's run state (stopped), so once the incoming side is
    // done the VM waits paused; `cont` runs it, as ours' `resume_vm` does.
    qmp.poll("query-status", deadline, |v| {
        Ok(v["status"].as_str() != Some("inmigrate"))
    })
    .with_context(|| format!("console:\n  {}", second.tail()))?;
    qmp.execute("cont", None)?;
    qmp.poll("query-status", deadline, |v| {
        Ok(v["status"].as_str() == Some("running"))
    })
    .with_context(|| format!("console:\n  {}", second.tail()))?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}
