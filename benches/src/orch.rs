//! The orchestrator workloads, all through one `orchestrator serve` daemon:
//! - create-to-first-exec latency of a cold VM (no template), and of a VM restored from the
//!   manifest's template (p50 and p99 of the same runs);
//! - creates per second with 8 creates in parallel;
//! - hibernation: the time a `POST /v1/vms/{id}/hibernate` takes, per GiB of guest RAM, and
//!   the time of the first exec on the hibernated VM, which wakes it (one VM serves both);
//! - host memory per idle templated VM: the VMMs' Pss with 50 of them running.
//!
//! The harness starts one `orchestrator serve` on a private state directory, bridge and
//! subnet the first time an orchestrator run needs it, adds two manifests (the cold one and
//! the same with `"template": true`), and keeps the daemon for every later run. Before the
//! first templated run of a daemon, one untimed create, exec and destroy builds the template
//! (a boot to the agent and a snapshot). It talks to the daemon only through its control
//! socket, with the orchestrator crate's own blocking client. Every VM a run creates is
//! destroyed when the run ends (untimed), and when the harness is done, whatever is left is
//! destroyed before the daemon gets SIGTERM, its bridge is deleted and its directory
//! removed, on errors too.
//!
//! The daemon's inputs (jailer, vmm, kernel, rootfs) are copied into its directory under
//! /tmp first: the jailer copies the vmm and links the kernel into each jail, and reading
//! them over the repository's uncached 9p mount would land in every create's time.

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use orchestrator::client::{Answer, Client};
use serde_json::json;

/// The daemon's host bridge (deleted when the harness is done).
pub const BRIDGE: &str = "orchb0";
/// The daemon's VM subnet; apart from the network workloads' 172.30.0.0/24.
pub const SUBNET: &str = "172.28.0.0/24";
/// The manifest the cold workloads (and hibernation) create from.
pub const MANIFEST: &str = "bench";
/// The same manifest with `"template": true`, for the templated workloads.
pub const TEMPLATE_MANIFEST: &str = "bench-tpl";
/// Guest RAM of both manifests.
pub const GUEST_MIB: u32 = 128;
/// Idle templated VMs `idle_templated_vm_host_mib` runs at once in a full run.
pub const IDLE_VMS: u32 = 50;
/// The same in `--quick` mode.
pub const IDLE_VMS_QUICK: u32 = 4;
/// How long the idle templated VMs sit before their memory is read.
pub const IDLE_SETTLE: Duration = Duration::from_secs(3);
/// Creates in flight at once for `orch_creates_per_s`.
pub const PARALLEL: u32 = 8;
/// The fewest creates `orch_create_exec_ms_cold_p50` (and the templated
/// `orch_create_exec_ms_template_p50`) makes in a full run (issue 8: p50/p99 over at least
/// 20 creates).
pub const COLD_MIN_RUNS: u32 = 20;
/// What the exec runs in the guest.
pub const EXEC_ARGV: [&str; 2] = ["/bin/busybox", "true"];
/// How long one destroy may take.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Short calls: listing VMs, adding the manifest.
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);

/// What an orchestrator workload reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrchProbe {
    /// ms from just before `POST /v1/vms` to the end of the first exec that returns 0.
    CreateExecMs,
    /// The same for a VM of [`TEMPLATE_MANIFEST`], restored from its template.
    TemplateCreateExecMs,
    /// [`PARALLEL`] creates divided by the seconds from the first POST to the last 201.
    CreatesPerS,
    /// Seconds of `POST /v1/vms/{id}/hibernate` per GiB of guest RAM.
    HibernateSPerGib,
    /// ms from just before the first exec on a hibernated VM to its answer with code 0.
    WakeExecMs,
    /// Pss of the VMMs of [`IDLE_VMS`] idle templated VMs, per VM, in MiB.
    IdleTemplatedHostMib,
}

impl OrchProbe {
    /// VMs one run creates (in a full run: `--quick` runs fewer idle VMs).
    pub fn vms_per_run(self) -> u32 {
        match self {
            OrchProbe::CreateExecMs
            | OrchProbe::TemplateCreateExecMs
            | OrchProbe::HibernateSPerGib
            | OrchProbe::WakeExecMs => 1,
            OrchProbe::CreatesPerS => PARALLEL,
            OrchProbe::IdleTemplatedHostMib => IDLE_VMS,
        }
    }

    /// Whether its VMs come from the template (built, untimed, before the first run).
    pub fn uses_template(self) -> bool {
        matches!(
            self,
            OrchProbe::TemplateCreateExecMs | OrchProbe::IdleTemplatedHostMib
        )
    }
}

/// One request to the daemon; the real client, or a fake in the tests.
pub trait Control {
    /// Sends `method path` with `body` and returns the answer, within `timeout`.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer>;
}

impl Control for Client {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer> {
        self.request(method, path, body.map(str::as_bytes), timeout)
    }
}

/// The manifest the cold workloads create from: 1 vCPU, 128 MiB, a writable rootfs (the
/// daemon gives each VM its own copy), networking on, and a workload that only sleeps.
pub fn manifest_body(kernel: &Path, rootfs: &Path) -> String {
    manifest_json(MANIFEST, kernel, rootfs).to_string()
}

/// [`TEMPLATE_MANIFEST`]: the cold manifest plus `"template": true`.
pub fn template_manifest_body(kernel: &Path, rootfs: &Path) -> String {
    let mut m = manifest_json(TEMPLATE_MANIFEST, kernel, rootfs);
    m["template"] = json!(true);
    m.to_string()
}

fn manifest_json(name: &str, kernel: &Path, rootfs: &Path) -> serde_json::Value {
    json!({
        "schema": 1,
        "name": name,
        "kernel": kernel,
        "rootfs": {"path": rootfs, "read_only": false},
        "vcpus": 1,
        "memory_mib": GUEST_MIB,
        "entrypoint": "/bin/busybox",
        "args": ["sleep", "100000"],
        "network": {"enabled": true},
    })
}

/// `POST /v1/vms`'s body for the cold manifest.
pub fn create_body(id: &str) -> String {
    create_body_from(MANIFEST, id)
}

/// `POST /v1/vms`'s body for VM `id` of `manifest`.
pub fn create_body_from(manifest: &str, id: &str) -> String {
    json!({"manifest": manifest, "id": id}).to_string()
}

/// `POST /v1/vms/{id}/exec`'s body.
pub fn exec_body(argv: &[&str]) -> String {
    json!({ "argv": argv }).to_string()
}

/// An answer for an error message: status and the daemon's message (or the whole body).
pub fn describe(a: &Answer) -> String {
    let v = a.json();
    match v["error"]["message"].as_str() {
        Some(m) => format!(
            "status {} ({}): {m}",
            a.status,
            v["error"]["kind"].as_str().unwrap_or("?")
        ),
        None => format!("status {}: {}", a.status, a.body.trim()),
    }
}

/// Creates VM `id` from the cold manifest; fails unless the daemon answers 201.
pub fn create(c: &impl Control, id: &str, timeout: Duration) -> Result<()> {
    create_from(c, MANIFEST, id, timeout)
}

/// Creates VM `id` from `manifest`; fails unless the daemon answers 201.
pub fn create_from(c: &impl Control, manifest: &str, id: &str, timeout: Duration) -> Result<()> {
    let a = c
        .call(
            "POST",
            "/v1/vms",
            Some(&create_body_from(manifest, id)),
            timeout,
        )
        .with_context(|| format!("creating VM {id}"))?;
    if a.status != 201 {
        bail!("creating VM {id}: {}", describe(&a));
    }
    Ok(())
}

/// Runs [`EXEC_ARGV`] in VM `id` until one exec returns code 0, retrying every 10 ms
/// until `deadline`.
pub fn exec_until_ok(c: &impl Control, id: &str, deadline: Instant) -> Result<()> {
    let path = format!("/v1/vms/{id}/exec");
    let body = exec_body(&EXEC_ARGV);
    let mut last = String::from("no exec tried");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "VM {id}: no exec of `{}` returned 0 by the deadline; last: {last}",
                EXEC_ARGV.join(" ")
            );
        }
        match c.call("POST", &path, Some(&body), left.max(Duration::from_secs(1))) {
            Ok(a) if a.status == 200 && a.json()["code"].as_i64() == Some(0) => return Ok(()),
            Ok(a) if a.status == 200 => last = format!("answered {}", a.body.trim()),
            Ok(a) => last = describe(&a),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Destroys VM `id`: 204, or 404 when it does not exist (a create that failed undoes itself).
pub fn destroy(c: &impl Control, id: &str) -> Result<()> {
    let a = c
        .call("DELETE", &format!("/v1/vms/{id}"), None, DESTROY_TIMEOUT)
        .with_context(|| format!("destroying VM {id}"))?;
    match a.status {
        204 | 404 => Ok(()),
        _ => bail!("destroying VM {id}: {}", describe(&a)),
    }
}

/// Runs `op` on every id of `ids`, [`PARALLEL`] at a time (so that each request waits for
/// at most that many others at the daemon); one error joining each failure, in no order.
fn for_each_parallel(ids: &[String], op: impl Fn(&str) -> Result<()> + Sync) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let errors: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..ids.len().min(PARALLEL as usize))
            .map(|_| {
                s.spawn(|| {
                    let mut errors = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(id) = ids.get(i) else {
                            return errors;
                        };
                        if let Err(e) = op(id) {
                            errors.push(format!("{e:#}"));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a worker thread panicked".into()])
            })
            .collect()
    });
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Destroys every VM of `ids`, [`PARALLEL`] at a time; one error naming each that failed.
pub fn destroy_all<C: Control + Sync>(c: &C, ids: &[String]) -> Result<()> {
    for_each_parallel(ids, |id| destroy(c, id))
}

/// The ids of every VM the daemon knows.
pub fn list_ids(c: &impl Control) -> Result<Vec<String>> {
    let a = c
        .call("GET", "/v1/vms", None, SHORT_TIMEOUT)
        .context("listing VMs")?;
    if a.status != 200 {
        bail!("listing VMs: {}", describe(&a));
    }
    let v = a.json();
    let list = v
        .as_array()
        .with_context(|| format!("listing VMs: not a JSON array: {}", a.body.trim()))?;
    Ok(list
        .iter()
        .filter_map(|vm| vm["id"].as_str().map(String::from))
        .collect())
}

/// The VMs one run created, destroyed when it ends: by [`Created::destroy`], which reports
/// failures, or on drop (an early error), best effort.
pub struct Created<'a, C: Control + Sync> {
    control: &'a C,
    ids: Vec<String>,
}

impl<'a, C: Control + Sync> Created<'a, C> {
    /// Destroys `ids` when done (ids that were never created answer 404, which is fine).
    pub fn new(control: &'a C, ids: Vec<String>) -> Created<'a, C> {
        Created { control, ids }
    }

    /// Destroys them now.
    pub fn destroy(mut self) -> Result<()> {
        let ids = std::mem::take(&mut self.ids);
        destroy_all(self.control, &ids)
    }
}

impl<C: Control + Sync> Drop for Created<'_, C> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            let _ = destroy_all(self.control, &self.ids);
        }
    }
}

/// One cold create-to-exec run of VM `id`: the time from just before the POST to the end
/// of the first exec returning 0. The VM is destroyed afterwards, untimed; a failed destroy
/// fails the run.
pub fn create_exec_once<C: Control + Sync>(c: &C, id: &str, timeout: Duration) -> Result<Duration> {
    create_exec_once_from(c, MANIFEST, id, timeout)
}

/// [`create_exec_once`] for a VM of `manifest` (the templated workload, and the untimed
/// warm-up that builds the template).
pub fn create_exec_once_from<C: Control + Sync>(
    c: &C,
    manifest: &str,
    id: &str,
    timeout: Duration,
) -> Result<Duration> {
    let vm = Created::new(c, vec![id.to_string()]);
    let t0 = Instant::now();
    create_from(c, manifest, id, timeout)?;
    exec_until_ok(c, id, t0 + timeout)?;
    let took = t0.elapsed();
    vm.destroy()?;
    Ok(took)
}

/// What one hibernation cycle measured: the hibernate call, and the wake exec after it
/// (its own outcome: a failed wake does not undo a measured hibernation).
#[derive(Debug)]
pub struct HibernateCycle {
    /// From just before `POST /v1/vms/{id}/hibernate` to its 200 (the VMM stopped).
    pub hibernate: Duration,
    /// From just before the first exec on the hibernated VM to its 200 with code 0.
    pub wake_exec: Result<Duration>,
}

/// Hibernates VM `id`: `POST /v1/vms/{id}/hibernate`, which answers 200 with the VM in
/// state `hibernated` once it is snapshotted and its VMM stopped.
pub fn hibernate(c: &impl Control, id: &str, timeout: Duration) -> Result<()> {
    let a = c
        .call("POST", &format!("/v1/vms/{id}/hibernate"), None, timeout)
        .with_context(|| format!("hibernating VM {id}"))?;
    if a.status != 200 {
        bail!("hibernating VM {id}: {}", describe(&a));
    }
    let state = a.json()["state"].as_str().map(String::from);
    if state.as_deref() != Some("hibernated") {
        bail!(
            "hibernating VM {id}: answered 200 but the VM is not hibernated: {}",
            a.body.trim()
        );
    }
    Ok(())
}

/// One exec of [`EXEC_ARGV`] in VM `id`, no retry: fails unless it answers 200 with code 0.
pub fn exec_once(c: &impl Control, id: &str, timeout: Duration) -> Result<()> {
    let a = c
        .call(
            "POST",
            &format!("/v1/vms/{id}/exec"),
            Some(&exec_body(&EXEC_ARGV)),
            timeout,
        )
        .with_context(|| format!("exec in VM {id}"))?;
    if a.status != 200 {
        bail!("exec in VM {id}: {}", describe(&a));
    }
    if a.json()["code"].as_i64() != Some(0) {
        bail!(
            "exec in VM {id}: `{}` answered {}",
            EXEC_ARGV.join(" "),
            a.body.trim()
        );
    }
    Ok(())
}

/// One hibernation cycle of VM `id` (cold manifest): create, exec until one returns 0
/// (untimed), hibernate (timed), one exec on the hibernated VM, which wakes it (timed),
/// destroy (untimed). Fails if any step up to the hibernation, or the destroy, fails; a
/// failed wake exec is only [`HibernateCycle::wake_exec`]'s error.
pub fn hibernate_cycle<C: Control + Sync>(
    c: &C,
    id: &str,
    timeout: Duration,
) -> Result<HibernateCycle> {
    let vm = Created::new(c, vec![id.to_string()]);
    create(c, id, timeout)?;
    exec_until_ok(c, id, Instant::now() + timeout)?;
    let t0 = Instant::now();
    hibernate(c, id, timeout)?;
    let hibernate = t0.elapsed();
    let t1 = Instant::now();
    let wake_exec = exec_once(c, id, timeout)
        .map(|()| t1.elapsed())
        .context("waking with an exec");
    vm.destroy()?;
    Ok(HibernateCycle {
        hibernate,
        wake_exec,
    })
}

/// Seconds per GiB of guest RAM: `took` for a guest of `guest_mib`.
pub fn s_per_gib(took: Duration, guest_mib: u32) -> f64 {
    took.as_secs_f64() / (f64::from(guest_mib) / 1024.0)
}

/// Host memory of idle templated VMs, per VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleMemory {
    /// The VMMs' summed `Pss` (smaps_rollup) divided by the VM count, in MiB.
    pub pss_mib: f64,
    /// `MemAvailable` before the creates minus after the wait, divided by the VM count, in
    /// MiB (negative if memory was freed meanwhile).
    pub available_drop_mib: f64,
    /// How many VMs.
    pub vms: usize,
}

/// The VMM's host pid of running VM `id`, from `GET /v1/vms/{id}`.
pub fn vm_pid(c: &impl Control, id: &str) -> Result<u32> {
    let a = c
        .call("GET", &format!("/v1/vms/{id}"), None, SHORT_TIMEOUT)
        .with_context(|| format!("reading VM {id}"))?;
    if a.status != 200 {
        bail!("reading VM {id}: {}", describe(&a));
    }
    let v = a.json();
    if v["state"].as_str() != Some("running") {
        bail!("VM {id} is not running: {}", a.body.trim());
    }
    v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .with_context(|| format!("VM {id} has no VMM pid: {}", a.body.trim()))
}

/// Creates every VM of `ids` from `manifest`, [`PARALLEL`] at a time; one error naming each
/// that failed.
pub fn create_all<C: Control + Sync>(
    c: &C,
    manifest: &str,
    ids: &[String],
    timeout: Duration,
) -> Result<()> {
    for_each_parallel(ids, |id| create_from(c, manifest, id, timeout))
}

/// One idle-memory run: `MemAvailable` read (via `read`, given a /proc path), every VM of
/// `ids` created from the template manifest, `settle` waited, `MemAvailable` read again,
/// then each VM's VMM pid asked for and its `/proc/PID/smaps_rollup` `Pss:` summed. All
/// are destroyed afterwards, untimed; a failed destroy fails the run.
pub fn idle_memory<C: Control + Sync>(
    c: &C,
    ids: &[String],
    timeout: Duration,
    settle: Duration,
    read: &dyn Fn(&str) -> Result<String>,
) -> Result<IdleMemory> {
    if ids.is_empty() {
        bail!("no VMs to measure");
    }
    let meminfo = "/proc/meminfo";
    let before = crate::smaps::mem_available_kib(&read(meminfo)?)
        .with_context(|| format!("in {meminfo}"))?;
    let vms = Created::new(c, ids.to_vec());
    create_all(c, TEMPLATE_MANIFEST, ids, timeout)?;
    std::thread::sleep(settle);
    let after = crate::smaps::mem_available_kib(&read(meminfo)?)
        .with_context(|| format!("in {meminfo}"))?;
    let mut pss_kib = 0u64;
    for id in ids {
        let pid = vm_pid(c, id)?;
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = read(&path).with_context(|| format!("VM {id}"))?;
        pss_kib +=
            crate::smaps::rollup_pss_kib(&text).with_context(|| format!("VM {id}: in {path}"))?;
    }
    vms.destroy()?;
    let n = ids.len() as f64;
    Ok(IdleMemory {
        pss_mib: pss_kib as f64 / 1024.0 / n,
        available_drop_mib: (before as f64 - after as f64) / 1024.0 / n,
        vms: ids.len(),
    })
}

/// Creates per second from each create's (POST sent, 201 read) instants: the count over
/// the time from the first POST to the last answer.
pub fn rate(spans: &[(Instant, Instant)]) -> Result<f64> {
    let first = spans.iter().map(|s| s.0).min().context("no creates")?;
    let last = spans.iter().map(|s| s.1).max().context("no creates")?;
    let secs = last.saturating_duration_since(first).as_secs_f64();
    if secs <= 0.0 {
        bail!("the creates took no measurable time");
    }
    Ok(spans.len() as f64 / secs)
}

/// One creates-per-second run: [`PARALLEL`] threads, each with its own client, released
/// together, each POSTing one create. All are destroyed afterwards, untimed.
fn creates_per_s_once(
    sock: &Path,
    control: &Client,
    ids: &[String],
    timeout: Duration,
) -> Result<f64> {
    // Clients (each with its own runtime) are made before the start, so the threads do
    // nothing fallible between the barrier and their POST.
    let clients: Vec<Client> = ids
        .iter()
        .map(|_| Client::new(sock))
        .collect::<Result<_>>()
        .with_context(|| format!("making clients for {}", sock.display()))?;
    let vms = Created::new(control, ids.to_vec());
    let barrier = std::sync::Barrier::new(ids.len());
    let results: Vec<Result<(Instant, Instant)>> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .zip(ids)
            .map(|(client, id)| {
                let barrier = &barrier;
                (
                    id,
                    s.spawn(move || {
                        let body = create_body(id);
                        barrier.wait();
                        let t0 = Instant::now();
                        let a = client.call("POST", "/v1/vms", Some(&body), timeout);
                        let t1 = Instant::now();
                        let a = a.with_context(|| format!("creating VM {id}"))?;
                        if a.status != 201 {
                            bail!("creating VM {id}: {}", describe(&a));
                        }
                        Ok((t0, t1))
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(id, h)| {
                h.join()
                    .map_err(|_| anyhow!("creating VM {id}: the thread panicked"))?
            })
            .collect()
    });
    let spans: Result<Vec<_>> = results.into_iter().collect();
    let destroyed = vms.destroy();
    let value = rate(&spans?)?;
    destroyed?;
    Ok(value)
}

/// Where the daemon's binaries and the guest's files come from (copied at start).
#[derive(Debug, Clone)]
pub struct OrchInputs {
    /// `target/x86_64-unknown-linux-gnu/release/orchestrator` (run in place: it starts once).
    pub orchestrator: PathBuf,
    /// `target/x86_64-unknown-linux-gnu/release/jailer`.
    pub jailer: PathBuf,
    /// Our `vmm`.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// `target/guest/rootfs.ext4`.
    pub rootfs: PathBuf,
}

/// What stopping the daemon does besides API calls; a fake in the tests.
pub trait DaemonOps {
    /// Whether the daemon still runs; if not, tries to start it again on the same state
    /// (it reconciles its VMs on start) so they can be destroyed. False if it could not.
    fn ensure_running(&mut self) -> bool;
    /// SIGTERM, then SIGKILL if it lingers.
    fn terminate(&mut self);
    /// Deletes the host bridge.
    fn delete_bridge(&mut self);
    /// Removes the daemon's directory.
    fn remove_dir(&mut self);
}

/// Stops the daemon and leaves nothing behind, in this order: every VM it knows destroyed
/// (SIGTERM alone would leave them running), the daemon stopped, its bridge deleted, its
/// directory removed. Every step is tried even when an earlier one failed; the failures
/// are returned for the log.
pub fn shut_down<C: Control + Sync>(c: &C, ops: &mut impl DaemonOps) -> Vec<String> {
    let mut errors = Vec::new();
    if ops.ensure_running() {
        match list_ids(c) {
            Ok(ids) => {
                if let Err(e) = destroy_all(c, &ids) {
                    errors.push(format!("{e:#}"));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    } else {
        errors.push("the daemon is gone and did not start again; its VMs may be left".into());
    }
    ops.terminate();
    ops.delete_bridge();
    ops.remove_dir();
    errors
}

/// A running `orchestrator serve` with its directory; stopped and cleaned up on drop.
struct Daemon {
    child: Option<Child>,
    orchestrator: PathBuf,
    dir: PathBuf,
    sock: PathBuf,
    client: Client,
    /// Whether this daemon's template VM has been built (by an untimed warm-up).
    template_ready: bool,
}

impl Daemon {
    fn start(inputs: &OrchInputs) -> Result<Daemon> {
        // A bridge left by an earlier harness in this host would carry stale addresses.
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(Stdio::null())
            .status();
        let dir = PathBuf::from(format!("/tmp/bench-orch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sock = dir.join("o.sock");
        let mut d = Daemon {
            child: None,
            orchestrator: inputs.orchestrator.clone(),
            client: Client::new(&sock)
                .with_context(|| format!("making a client for {}", sock.display()))?,
            dir,
            sock,
            template_ready: false,
        };
        // From here on, drop cleans up whatever fails.
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = d.dir.join(name);
            fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        let jailer = copy(&inputs.jailer, "jailer")?;
        let vmm = copy(&inputs.vmm, "vmm")?;
        let kernel = copy(&inputs.kernel, "vmlinux")?;
        let rootfs = copy(&inputs.rootfs, "rootfs.ext4")?;
        d.spawn(&jailer, &vmm)?;
        for (name, body) in [
            (MANIFEST, manifest_body(&kernel, &rootfs)),
            (TEMPLATE_MANIFEST, template_manifest_body(&kernel, &rootfs)),
        ] {
            let a = d
                .client
                .call("POST", "/v1/manifests", Some(&body), SHORT_TIMEOUT)
                .with_context(|| format!("adding the manifest {name}"))?;
            if a.status != 201 {
                bail!(
                    "adding the manifest {name}: {}\n  {}",
                    describe(&a),
                    d.log_tail()
                );
            }
        }
        Ok(d)
    }

    /// Starts `orchestrator serve` on the directory and waits for its socket.
    fn spawn(&mut self, jailer: &Path, vmm: &Path) -> Result<()> {
        let log_path = self.dir.join("daemon.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let err_log = log.try_clone().context("daemon log")?;
        let _ = fs::remove_file(&self.sock);
        let child = Command::new(&self.orchestrator)
            .arg("--socket")
            .arg(&self.sock)
            .arg("serve")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--subnet", SUBNET, "--bridge", BRIDGE])
            .arg("--jailer")
            .arg(jailer)
            .arg("--vmm")
            .arg(vmm)
            .args(["--ready-timeout-s", "300"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .with_context(|| format!("spawning {}", self.orchestrator.display()))?;
        let child = self.child.insert(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = child.try_wait().context("waiting for the daemon")? {
                self.child = None;
                bail!(
                    "the orchestrator exited ({st}) before opening {}:\n  {}",
                    self.sock.display(),
                    self.log_tail()
                );
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "the orchestrator opened no socket at {} within {} s:\n  {}",
                    self.sock.display(),
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The daemon log's last lines, for error messages.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("daemon.log")) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "daemon log ({}):\n  {}",
            self.dir.join("daemon.log").display(),
            lines[lines.len().saturating_sub(15)..].join("\n  ")
        )
    }
}

impl DaemonOps for Daemon {
    fn ensure_running(&mut self) -> bool {
        if self.alive() {
            return true;
        }
        let (jailer, vmm) = (self.dir.join("jailer"), self.dir.join("vmm"));
        self.spawn(&jailer, &vmm).is_ok()
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet (so the pid
            // still names it).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn delete_bridge(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(Stdio::null())
            .status();
    }

    fn remove_dir(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let client = match Client::new(&self.sock) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench: orchestrator cleanup: {e:#}");
                return;
            }
        };
        for e in shut_down(&client, self) {
            eprintln!("bench: orchestrator cleanup: {e}");
        }
    }
}

/// The orchestrator workloads' state: the daemon, started on first use and kept.
pub struct Orch {
    inputs: OrchInputs,
    daemon: Option<Daemon>,
    next_id: u32,
    idle_vms: u32,
    /// Wake exec times (ms) measured by `hibernate_s_per_gib` runs, for `wake_exec_ms` runs
    /// to report instead of making a VM of their own.
    pending_wakes: VecDeque<std::result::Result<f64, String>>,
    /// Each idle-memory run's `MemAvailable` drop per VM, for the note.
    idle_drops: Vec<f64>,
}

impl Orch {
    /// Nothing starts until the first measurement. `quick` runs [`IDLE_VMS_QUICK`] idle VMs
    /// instead of [`IDLE_VMS`].
    pub fn new(inputs: OrchInputs, quick: bool) -> Orch {
        Orch {
            inputs,
            daemon: None,
            next_id: 0,
            idle_vms: if quick { IDLE_VMS_QUICK } else { IDLE_VMS },
            pending_wakes: VecDeque::new(),
            idle_drops: Vec::new(),
        }
    }

    /// Idle templated VMs per run in this harness run.
    pub fn idle_vms(&self) -> u32 {
        self.idle_vms
    }

    /// The `MemAvailable` drops per VM (MiB) of the idle-memory runs so far, emptied.
    pub fn take_idle_drops(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.idle_drops)
    }

    /// The running daemon, started (again, after cleaning up a dead one) when needed.
    fn daemon(&mut self) -> Result<&mut Daemon> {
        if let Some(d) = self.daemon.as_mut() {
            if !d.alive() {
                let tail = d.log_tail();
                // Dropping it destroys its VMs (on a restarted daemon) and removes it all.
                self.daemon = None;
                eprintln!("bench: the orchestrator daemon died; starting a fresh one. {tail}");
            }
        }
        if self.daemon.is_none() {
            self.daemon = Some(Daemon::start(&self.inputs)?);
        }
        self.daemon
            .as_mut()
            .context("the orchestrator daemon is not running")
    }

    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("b{}", self.next_id)
    }

    /// One untimed create, exec and destroy from the template manifest, which builds the
    /// daemon's template (a boot to the agent and a snapshot); returns its ms.
    pub fn build_template(&mut self, timeout: Duration) -> Result<f64> {
        let id = self.next_id();
        let d = self.daemon()?;
        let took = create_exec_once_from(&d.client, TEMPLATE_MANIFEST, &id, timeout)
            .map_err(|e| anyhow!("building the template: {e:#}\n  {}", d.log_tail()))?;
        d.template_ready = true;
        Ok(took.as_secs_f64() * 1000.0)
    }

    /// One run of `probe`; `timeout` bounds each create (and the create-to-exec time).
    pub fn measure(&mut self, probe: OrchProbe, timeout: Duration) -> Result<f64> {
        if probe == OrchProbe::WakeExecMs {
            if let Some(wake) = self.pending_wakes.pop_front() {
                return wake.map_err(|e| anyhow!("{e}"));
            }
        }
        let vms = match probe {
            OrchProbe::IdleTemplatedHostMib => self.idle_vms,
            _ => probe.vms_per_run(),
        };
        let ids: Vec<String> = (0..vms).map(|_| self.next_id()).collect();
        // A fresh daemon (the first, or one started after a crash) has no template yet.
        if probe.uses_template() && !self.daemon()?.template_ready {
            self.build_template(timeout)?;
        }
        let d = self.daemon()?;
        let ms = |t: Duration| t.as_secs_f64() * 1000.0;
        let mut wake = None;
        let mut idle_drop = None;
        let result = match probe {
            OrchProbe::CreateExecMs => create_exec_once(&d.client, &ids[0], timeout).map(ms),
            OrchProbe::TemplateCreateExecMs => {
                create_exec_once_from(&d.client, TEMPLATE_MANIFEST, &ids[0], timeout).map(ms)
            }
            OrchProbe::CreatesPerS => creates_per_s_once(&d.sock, &d.client, &ids, timeout),
            OrchProbe::HibernateSPerGib | OrchProbe::WakeExecMs => {
                hibernate_cycle(&d.client, &ids[0], timeout).and_then(|cycle| {
                    let woke = cycle.wake_exec.map(ms);
                    if probe == OrchProbe::HibernateSPerGib {
                        // Kept for the next wake_exec_ms run.
                        wake = Some(woke.map_err(|e| {
                            format!(
                                "{e:#} (on the VM of a hibernate_s_per_gib run)\n  {}",
                                d.log_tail()
                            )
                        }));
                        Ok(s_per_gib(cycle.hibernate, GUEST_MIB))
                    } else {
                        woke
                    }
                })
            }
            OrchProbe::IdleTemplatedHostMib => {
                let read = |path: &str| -> Result<String> {
                    fs::read_to_string(path).with_context(|| format!("reading {path}"))
                };
                idle_memory(&d.client, &ids, timeout, IDLE_SETTLE, &read).map(|m| {
                    idle_drop = Some(m.available_drop_mib);
                    m.pss_mib
                })
            }
        };
        let result = result.map_err(|e| anyhow!("{e:#}\n  {}", d.log_tail()));
        self.pending_wakes.extend(wake);
        self.idle_drops.extend(idle_drop);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// How the fake answers `method path` called for the n-th time (from 1).
    type Rule = dyn Fn(&str, &str, usize) -> Result<Answer> + Sync;

    /// A daemon stand-in: answers by a rule and records every call.
    struct Fake {
        calls: Mutex<Vec<String>>,
        bodies: Mutex<Vec<Option<String>>>,
        answer: Box<Rule>,
    }

    impl Fake {
        fn new(answer: impl Fn(&str, &str, usize) -> Result<Answer> + Sync + 'static) -> Fake {
            Fake {
                calls: Mutex::new(Vec::new()),
                bodies: Mutex::new(Vec::new()),
                answer: Box::new(answer),
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        /// The body of each call, in the order of [`Fake::calls`].
        fn bodies(&self) -> Vec<Option<String>> {
            self.bodies.lock().unwrap().clone()
        }
    }

    impl Control for Fake {
        fn call(
            &self,
            method: &str,
            path: &str,
            body: Option<&str>,
            _: Duration,
        ) -> Result<Answer> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(format!("{method} {path}"));
                self.bodies.lock().unwrap().push(body.map(String::from));
                calls
                    .iter()
                    .filter(|c| **c == format!("{method} {path}"))
                    .count()
            };
            (self.answer)(method, path, n)
        }
    }

    fn ans(status: u16, body: &str) -> Result<Answer> {
        Ok(Answer {
            status,
            body: body.into(),
        })
    }

    #[test]
    fn bodies_are_what_the_api_expects() {
        let m: serde_json::Value = serde_json::from_str(&manifest_body(
            Path::new("/t/vmlinux"),
            Path::new("/t/r.ext4"),
        ))
        .unwrap();
        assert_eq!(m["schema"], 1);
        assert_eq!(m["name"], MANIFEST);
        assert_eq!(m["kernel"], "/t/vmlinux");
        assert_eq!(
            m["rootfs"],
            json!({"path": "/t/r.ext4", "read_only": false})
        );
        assert_eq!(
            (m["vcpus"].clone(), m["memory_mib"].clone()),
            (json!(1), json!(128))
        );
        assert_eq!(m["entrypoint"], "/bin/busybox");
        assert_eq!(m["args"], json!(["sleep", "100000"]));
        assert_eq!(m["network"], json!({"enabled": true}));
        let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
        assert_eq!(
            parse(create_body("b7")),
            json!({"manifest": "bench", "id": "b7"})
        );
        assert_eq!(
            parse(exec_body(&EXEC_ARGV)),
            json!({"argv": ["/bin/busybox", "true"]})
        );
    }

    #[test]
    fn errors_carry_the_status_and_the_daemons_message() {
        let a = Answer {
            status: 409,
            body: r#"{"error":{"kind":"conflict","message":"VM b1 exists","fields":[]}}"#.into(),
        };
        assert_eq!(describe(&a), "status 409 (conflict): VM b1 exists");
        let a = Answer {
            status: 502,
            body: "bad gateway\n".into(),
        };
        assert_eq!(describe(&a), "status 502: bad gateway");
    }

    #[test]
    fn a_cold_run_creates_execs_and_destroys() {
        let fake = Fake::new(|method, path, n| match (method, path) {
            ("POST", "/v1/vms") => ans(201, r#"{"id":"b1","state":"running"}"#),
            // The first exec fails, the second returns 1, the third succeeds.
            ("POST", "/v1/vms/b1/exec") if n == 1 => ans(
                409,
                r#"{"error":{"kind":"conflict","message":"not running"}}"#,
            ),
            ("POST", "/v1/vms/b1/exec") if n == 2 => ans(200, r#"{"code":1}"#),
            ("POST", "/v1/vms/b1/exec") => ans(
                200,
                r#"{"stdout":"","stderr":"","code":0,"signal":null,"timed_out":false}"#,
            ),
            ("DELETE", "/v1/vms/b1") => ans(204, ""),
            _ => bail!("unexpected {method} {path}"),
        });
        let took = create_exec_once(&fake, "b1", Duration::from_secs(5)).unwrap();
        assert!(
            took >= Duration::from_millis(20),
            "two retries of 10 ms: {took:?}"
        );
        assert_eq!(
            fake.calls(),
            [
                "POST /v1/vms",
                "POST /v1/vms/b1/exec",
                "POST /v1/vms/b1/exec",
                "POST /v1/vms/b1/exec",
                "DELETE /v1/vms/b1"
            ]
        );
    }

    #[test]
    fn a_failed_create_names_the_vm_and_still_destroys() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("POST", "/v1/vms") => ans(
                500,
                r#"{"error":{"kind":"internal","message":"jailer failed"}}"#,
            ),
            ("DELETE", "/v1/vms/b2") => ans(404, ""),
            _ => bail!("unexpected {method} {path}"),
        });
        let e = create_exec_once(&fake, "b2", Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "creating VM b2: status 500 (internal): jailer failed"
        );
        assert_eq!(fake.calls(), ["POST /v1/vms", "DELETE /v1/vms/b2"]);
    }

    #[test]
    fn exec_gives_up_at_the_deadline_with_the_last_answer() {
        let fake = Fake::new(|_, _, _| ans(200, r#"{"code":2}"#));
        let e = exec_until_ok(&fake, "b3", Instant::now() + Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("VM b3: no exec of `/bin/busybox true` returned 0"),
            "{e}"
        );
        assert!(e.ends_with(r#"last: answered {"code":2}"#), "{e}");
    }

    #[test]
    fn a_failed_destroy_fails_the_run() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("POST", "/v1/vms") => ans(201, "{}"),
            ("POST", _) => ans(200, r#"{"code":0}"#),
            _ => ans(
                500,
                r#"{"error":{"kind":"internal","message":"netns busy"}}"#,
            ),
        });
        let e = create_exec_once(&fake, "b4", Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "destroying VM b4: status 500 (internal): netns busy"
        );
    }

    #[test]
    fn dropping_created_vms_destroys_them_all() {
        let fake = Fake::new(|_, _, _| ans(204, ""));
        drop(Created::new(&fake, vec!["b5".into(), "b6".into()]));
        let mut calls = fake.calls();
        calls.sort();
        assert_eq!(calls, ["DELETE /v1/vms/b5", "DELETE /v1/vms/b6"]);
        // Destroyed explicitly: not again on drop.
        let fake = Fake::new(|_, _, _| ans(204, ""));
        Created::new(&fake, vec!["b7".into()]).destroy().unwrap();
        assert_eq!(fake.calls(), ["DELETE /v1/vms/b7"]);
    }

    #[test]
    fn rate_is_creates_over_first_post_to_last_answer() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let spans = [(at(0), at(1500)), (at(10), at(2000)), (at(5), at(1000))];
        assert!((rate(&spans).unwrap() - 1.5).abs() < 1e-9);
        assert!(rate(&[]).is_err());
        assert!(rate(&[(t, t)]).is_err());
    }

    /// Records the order of the shutdown steps.
    struct Ops<'a> {
        log: &'a Mutex<Vec<String>>,
        running: bool,
    }

    impl DaemonOps for Ops<'_> {
        fn ensure_running(&mut self) -> bool {
            self.log.lock().unwrap().push("ensure_running".into());
            self.running
        }
        fn terminate(&mut self) {
            self.log.lock().unwrap().push("terminate".into());
        }
        fn delete_bridge(&mut self) {
            self.log.lock().unwrap().push("delete_bridge".into());
        }
        fn remove_dir(&mut self) {
            self.log.lock().unwrap().push("remove_dir".into());
        }
    }

    #[test]
    fn shutdown_destroys_every_vm_before_stopping_and_cleans_up_on_errors() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("GET", "/v1/vms") => ans(200, r#"[{"id":"b1"},{"id":"b9"}]"#),
            ("DELETE", "/v1/vms/b1") => ans(204, ""),
            _ => ans(500, r#"{"error":{"kind":"internal","message":"stuck"}}"#),
        });
        let log = Mutex::new(Vec::new());
        let errors = shut_down(
            &fake,
            &mut Ops {
                log: &log,
                running: true,
            },
        );
        assert_eq!(errors, ["destroying VM b9: status 500 (internal): stuck"]);
        let mut calls = fake.calls();
        calls.sort();
        assert_eq!(
            calls,
            ["DELETE /v1/vms/b1", "DELETE /v1/vms/b9", "GET /v1/vms"]
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["ensure_running", "terminate", "delete_bridge", "remove_dir"]
        );

        // A daemon that cannot be reached: no API calls, the rest still happens.
        let fake = Fake::new(|_, _, _| bail!("unreachable"));
        let log = Mutex::new(Vec::new());
        let errors = shut_down(
            &fake,
            &mut Ops {
                log: &log,
                running: false,
            },
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(fake.calls().is_empty());
        assert_eq!(
            *log.lock().unwrap(),
            ["ensure_running", "terminate", "delete_bridge", "remove_dir"]
        );
    }

    #[test]
    fn the_template_manifest_is_the_cold_one_with_template_on() {
        let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
        let (k, r) = (Path::new("/t/vmlinux"), Path::new("/t/r.ext4"));
        let cold = parse(manifest_body(k, r));
        let mut tpl = parse(template_manifest_body(k, r));
        assert_eq!(tpl["name"], TEMPLATE_MANIFEST);
        assert_eq!(tpl["template"], true);
        assert!(cold.get("template").is_none());
        let t = tpl.as_object_mut().unwrap();
        t.remove("template");
        t.insert("name".into(), json!(MANIFEST));
        assert_eq!(tpl, cold);
        assert_eq!(
            parse(create_body_from(TEMPLATE_MANIFEST, "b3")),
            json!({"manifest": "bench-tpl", "id": "b3"})
        );
    }

    #[test]
    fn probes_know_their_vm_count_and_whether_they_use_the_template() {
        use OrchProbe::*;
        let all = [
            CreateExecMs,
            TemplateCreateExecMs,
            CreatesPerS,
            HibernateSPerGib,
            WakeExecMs,
            IdleTemplatedHostMib,
        ];
        let vms: Vec<u32> = all.iter().map(|p| p.vms_per_run()).collect();
        assert_eq!(vms, [1, 1, PARALLEL, 1, 1, IDLE_VMS]);
        let tpl: Vec<OrchProbe> = all.into_iter().filter(|p| p.uses_template()).collect();
        assert_eq!(tpl, [TemplateCreateExecMs, IdleTemplatedHostMib]);
        assert_eq!((IDLE_VMS, IDLE_VMS_QUICK), (50, 4));
    }

    #[test]
    fn a_templated_run_creates_from_the_template_manifest() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("POST", "/v1/vms") => ans(201, "{}"),
            ("POST", "/v1/vms/b1/exec") => ans(200, r#"{"code":0}"#),
            ("DELETE", "/v1/vms/b1") => ans(204, ""),
            _ => bail!("unexpected {method} {path}"),
        });
        create_exec_once_from(&fake, TEMPLATE_MANIFEST, "b1", Duration::from_secs(5)).unwrap();
        assert_eq!(
            fake.calls(),
            ["POST /v1/vms", "POST /v1/vms/b1/exec", "DELETE /v1/vms/b1"]
        );
        let body: serde_json::Value =
            serde_json::from_str(fake.bodies()[0].as_deref().unwrap()).unwrap();
        assert_eq!(body, json!({"manifest": "bench-tpl", "id": "b1"}));
        assert_eq!(
            fake.bodies()[1].as_deref(),
            Some(r#"{"argv":["/bin/busybox","true"]}"#)
        );
        // The cold run names the cold manifest; a create answered 200, not 201, is an error.
        let fake = Fake::new(|method, _, _| match method {
            "POST" => ans(200, "{}"),
            _ => ans(204, ""),
        });
        let e = create_exec_once(&fake, "b2", Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string().starts_with("creating VM b2: status 200"),
            "{e}"
        );
        assert!(fake.bodies()[0]
            .as_deref()
            .unwrap()
            .contains(r#""manifest":"bench""#));
    }

    /// A daemon with one VM `id` whose calls succeed; `hibernate` and the exec on the
    /// hibernated VM (the second successful one) answer as given, after the given sleeps.
    fn hibernating_fake(
        id: &'static str,
        hibernate: (u64, u16, &'static str),
        wake: (u64, u16, &'static str),
    ) -> Fake {
        Fake::new(move |method, path, n| {
            let exec = format!("/v1/vms/{id}/exec");
            let hib = format!("/v1/vms/{id}/hibernate");
            let vm = format!("/v1/vms/{id}");
            match (method, path) {
                ("POST", "/v1/vms") => ans(201, "{}"),
                // The first exec finds the agent not up yet, the second returns 0.
                ("POST", p) if p == exec && n == 1 => ans(
                    409,
                    r#"{"error":{"kind":"conflict","message":"agent not ready"}}"#,
                ),
                ("POST", p) if p == exec && n == 2 => ans(200, r#"{"code":0}"#),
                ("POST", p) if p == hib => {
                    std::thread::sleep(Duration::from_millis(hibernate.0));
                    ans(hibernate.1, hibernate.2)
                }
                ("POST", p) if p == exec => {
                    std::thread::sleep(Duration::from_millis(wake.0));
                    ans(wake.1, wake.2)
                }
                ("DELETE", p) if p == vm => ans(204, ""),
                _ => bail!("unexpected {method} {path}"),
            }
        })
    }

    #[test]
    fn a_hibernation_cycle_times_the_hibernate_and_the_waking_exec() {
        let fake = hibernating_fake(
            "b1",
            (40, 200, r#"{"id":"b1","state":"hibernated","pid":null}"#),
            (20, 200, r#"{"stdout":"","stderr":"","code":0}"#),
        );
        let cycle = hibernate_cycle(&fake, "b1", Duration::from_secs(5)).unwrap();
        let (hib, wake) = (cycle.hibernate, cycle.wake_exec.unwrap());
        assert!(hib >= Duration::from_millis(40), "{hib:?}");
        assert!(wake >= Duration::from_millis(20), "{wake:?}");
        // Neither includes the create, the first execs (10 ms apart) or the other's sleep.
        assert!(hib < Duration::from_millis(40 + 15), "{hib:?}");
        assert!(wake < Duration::from_millis(20 + 35), "{wake:?}");
        assert_eq!(
            fake.calls(),
            [
                "POST /v1/vms",
                "POST /v1/vms/b1/exec",
                "POST /v1/vms/b1/exec",
                "POST /v1/vms/b1/hibernate",
                "POST /v1/vms/b1/exec",
                "DELETE /v1/vms/b1"
            ]
        );
        // The hibernate call has no body; the waking exec runs busybox true.
        assert_eq!(fake.bodies()[3], None);
        assert_eq!(
            fake.bodies()[4].as_deref(),
            Some(r#"{"argv":["/bin/busybox","true"]}"#)
        );
    }

    #[test]
    fn a_failed_wake_keeps_the_hibernation_and_still_destroys() {
        let fake = hibernating_fake(
            "b2",
            (0, 200, r#"{"state":"hibernated"}"#),
            (0, 200, r#"{"code":1}"#),
        );
        let cycle = hibernate_cycle(&fake, "b2", Duration::from_secs(5)).unwrap();
        let e = format!("{:#}", cycle.wake_exec.unwrap_err());
        assert_eq!(
            e,
            r#"waking with an exec: exec in VM b2: `/bin/busybox true` answered {"code":1}"#
        );
        assert_eq!(fake.calls().last().unwrap(), "DELETE /v1/vms/b2");
        // A wake that errors at the daemon names its status.
        let fake = hibernating_fake(
            "b2",
            (0, 200, r#"{"state":"hibernated"}"#),
            (
                500,
                500,
                r#"{"error":{"kind":"internal","message":"restore failed"}}"#,
            ),
        );
        let cycle = hibernate_cycle(&fake, "b2", Duration::from_secs(5)).unwrap();
        let e = format!("{:#}", cycle.wake_exec.unwrap_err());
        assert!(e.ends_with("status 500 (internal): restore failed"), "{e}");
    }

    #[test]
    fn a_refused_or_unfinished_hibernation_fails_the_cycle_and_destroys() {
        let fake = hibernating_fake(
            "b3",
            (
                0,
                409,
                r#"{"error":{"kind":"conflict","message":"VM b3 is in use"}}"#,
            ),
            (0, 200, r#"{"code":0}"#),
        );
        let e = hibernate_cycle(&fake, "b3", Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "hibernating VM b3: status 409 (conflict): VM b3 is in use"
        );
        assert_eq!(fake.calls().last().unwrap(), "DELETE /v1/vms/b3");
        // No wake exec after a refused hibernation: only the two before it.
        let execs = fake.calls().iter().filter(|c| c.ends_with("/exec")).count();
        assert_eq!(execs, 2);
        // A 200 that does not say hibernated is not a hibernation.
        let fake = hibernating_fake(
            "b4",
            (0, 200, r#"{"state":"running"}"#),
            (0, 200, r#"{"code":0}"#),
        );
        let e = hibernate_cycle(&fake, "b4", Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string()
                .contains("answered 200 but the VM is not hibernated"),
            "{e}"
        );
        let calls = fake.calls();
        assert_eq!(calls.iter().filter(|c| c.ends_with("/exec")).count(), 2);
        assert_eq!(calls.last().unwrap(), "DELETE /v1/vms/b4");
    }

    #[test]
    fn seconds_per_gib_scale_by_the_guest_size() {
        assert!((s_per_gib(Duration::from_millis(500), 128) - 4.0).abs() < 1e-9);
        assert!((s_per_gib(Duration::from_secs(3), 1024) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn create_all_creates_every_vm_and_names_each_failure() {
        let fake = Fake::new(|method, path, n| match (method, path) {
            ("POST", "/v1/vms") if n == 4 || n == 7 => {
                ans(500, r#"{"error":{"kind":"internal","message":"no lease"}}"#)
            }
            ("POST", "/v1/vms") => ans(201, "{}"),
            _ => bail!("unexpected {method} {path}"),
        });
        let ids: Vec<String> = (1..=20).map(|i| format!("b{i}")).collect();
        let e = create_all(&fake, TEMPLATE_MANIFEST, &ids, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e.matches("status 500 (internal): no lease").count(),
            2,
            "{e}"
        );
        assert_eq!(fake.calls().len(), 20);
        let mut created: Vec<String> = fake
            .bodies()
            .iter()
            .map(|b| {
                let v: serde_json::Value = serde_json::from_str(b.as_deref().unwrap()).unwrap();
                assert_eq!(v["manifest"], TEMPLATE_MANIFEST);
                v["id"].as_str().unwrap().to_string()
            })
            .collect();
        created.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(created, want);
        let fake = Fake::new(|_, _, _| ans(201, "{}"));
        create_all(&fake, MANIFEST, &ids[..3], Duration::from_secs(5)).unwrap();
        assert_eq!(fake.calls().len(), 3);
    }

    /// /proc as the idle-memory tests see it: MemAvailable falls from 1,000,000 kB to
    /// 700,000 kB between the two reads, and VMM `100 + i` has a Pss of `i * 10` MiB.
    fn fake_proc<'a>(
        fake: &'a Fake,
        reads: &'a Mutex<Vec<(String, usize)>>,
    ) -> impl Fn(&str) -> Result<String> + 'a {
        move |path: &str| {
            let mut reads = reads.lock().unwrap();
            // With how many daemon calls made so far.
            reads.push((path.to_string(), fake.calls().len()));
            if path == "/proc/meminfo" {
                let n = reads.iter().filter(|(p, _)| p == path).count();
                let avail = if n == 1 { 1_000_000 } else { 700_000 };
                return Ok(format!("MemTotal: 10240000 kB\nMemAvailable: {avail} kB\n"));
            }
            let pid: u64 = path
                .strip_prefix("/proc/")
                .and_then(|p| p.strip_suffix("/smaps_rollup"))
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("no such file {path}"))?;
            Ok(format!(
                "Rss: 99999 kB\nPss: {} kB\nPss_Anon: 1 kB\n",
                (pid - 100) * 10 * 1024
            ))
        }
    }

    #[test]
    fn idle_memory_sums_the_vmms_pss_per_vm_and_the_available_drop() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("POST", "/v1/vms") => ans(201, "{}"),
            ("GET", p) => {
                let i: u64 = p.trim_start_matches("/v1/vms/b").parse().unwrap();
                ans(
                    200,
                    &format!(r#"{{"id":"b{i}","state":"running","pid":{}}}"#, 100 + i),
                )
            }
            ("DELETE", _) => ans(204, ""),
            _ => bail!("unexpected {method} {path}"),
        });
        let reads = Mutex::new(Vec::new());
        let ids: Vec<String> = (1..=3).map(|i| format!("b{i}")).collect();
        let m = idle_memory(
            &fake,
            &ids,
            Duration::from_secs(5),
            Duration::from_millis(30),
            &fake_proc(&fake, &reads),
        )
        .unwrap();
        assert_eq!(m.vms, 3);
        // (10 + 20 + 30) MiB / 3, and 300,000 kB / 3.
        assert!((m.pss_mib - 20.0).abs() < 1e-9, "{m:?}");
        assert!((m.available_drop_mib - 300_000.0 / 1024.0 / 3.0).abs() < 1e-9);
        // MemAvailable before any create and after all three; then the VMs' rollups.
        let reads = reads.into_inner().unwrap();
        let paths: Vec<&str> = reads.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/proc/meminfo",
                "/proc/meminfo",
                "/proc/101/smaps_rollup",
                "/proc/102/smaps_rollup",
                "/proc/103/smaps_rollup"
            ]
        );
        assert_eq!((reads[0].1, reads[1].1), (0, 3));
        let mut calls = fake.calls();
        calls.sort();
        assert_eq!(
            calls,
            [
                "DELETE /v1/vms/b1",
                "DELETE /v1/vms/b2",
                "DELETE /v1/vms/b3",
                "GET /v1/vms/b1",
                "GET /v1/vms/b2",
                "GET /v1/vms/b3",
                "POST /v1/vms",
                "POST /v1/vms",
                "POST /v1/vms",
            ]
        );
        assert!(fake
            .bodies()
            .iter()
            .flatten()
            .all(|b| b.contains(r#""manifest":"bench-tpl""#)));
    }

    #[test]
    fn idle_memory_fails_on_a_vm_without_a_vmm_and_destroys_them_all() {
        let fake = Fake::new(|method, path, _| match (method, path) {
            ("POST", "/v1/vms") => ans(201, "{}"),
            ("GET", "/v1/vms/b2") => ans(200, r#"{"id":"b2","state":"hibernated","pid":null}"#),
            ("GET", "/v1/vms/b1") => ans(200, r#"{"id":"b1","state":"running","pid":null}"#),
            ("GET", _) => ans(200, r#"{"state":"running","pid":105}"#),
            ("DELETE", _) => ans(204, ""),
            _ => bail!("unexpected {method} {path}"),
        });
        let reads = Mutex::new(Vec::new());
        let run = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            idle_memory(
                &fake,
                &ids,
                Duration::from_secs(5),
                Duration::ZERO,
                &fake_proc(&fake, &reads),
            )
            .unwrap_err()
            .to_string()
        };
        let e = run(&["b3", "b2"]);
        assert!(e.starts_with("VM b2 is not running: "), "{e}");
        let deletes = |fake: &Fake| {
            let mut d: Vec<String> = fake
                .calls()
                .into_iter()
                .filter(|c| c.starts_with("DELETE"))
                .collect();
            d.sort();
            d
        };
        assert_eq!(deletes(&fake), ["DELETE /v1/vms/b2", "DELETE /v1/vms/b3"]);
        let e = run(&["b1"]);
        assert!(e.starts_with("VM b1 has no VMM pid: "), "{e}");
        assert!(idle_memory(&fake, &[], Duration::ZERO, Duration::ZERO, &|_| bail!("no")).is_err());
    }

    #[test]
    fn many_vms_are_destroyed_at_most_8_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static MAX: AtomicUsize = AtomicUsize::new(0);
        let fake = Fake::new(|_, _, _| {
            let now = NOW.fetch_add(1, Ordering::SeqCst) + 1;
            MAX.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            NOW.fetch_sub(1, Ordering::SeqCst);
            ans(204, "")
        });
        let ids: Vec<String> = (1..=30).map(|i| format!("b{i}")).collect();
        destroy_all(&fake, &ids).unwrap();
        let mut calls = fake.calls();
        calls.sort();
        calls.dedup();
        assert_eq!(calls.len(), 30);
        let max = MAX.load(Ordering::SeqCst);
        assert!((2..=PARALLEL as usize).contains(&max), "{max} at once");
    }
}
