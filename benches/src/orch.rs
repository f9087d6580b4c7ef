//! The orchestrator workloads: create-to-first-exec latency of a cold VM (no template), and
//! creates per second with 8 creates in parallel.
//!
//! The harness starts one `orchestrator serve` on a private state directory, bridge and
//! subnet the first time an orchestrator run needs it, adds one manifest, and keeps the
//! daemon for every later run. It talks to it only through its control socket, with the
//! orchestrator crate's own blocking client. Every VM a run creates is destroyed when the
//! run ends (untimed), and when the harness is done, whatever is left is destroyed before
//! the daemon gets SIGTERM, its bridge is deleted and its directory removed, on errors too.
//!
//! The daemon's inputs (jailer, vmm, kernel, rootfs) are copied into its directory under
//! /tmp first: the jailer copies the vmm and links the kernel into each jail, and reading
//! them over the repository's uncached 9p mount would land in every create's time.

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
/// The one manifest every orchestrator workload creates from.
pub const MANIFEST: &str = "bench";
/// Creates in flight at once for `orch_creates_per_s`.
pub const PARALLEL: u32 = 8;
/// The fewest creates `orch_create_exec_ms_cold_p50` makes in a full run (issue 8: p50/p99
/// over at least 20 creates).
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
    /// [`PARALLEL`] creates divided by the seconds from the first POST to the last 201.
    CreatesPerS,
}

impl OrchProbe {
    /// VMs one run creates.
    pub fn vms_per_run(self) -> u32 {
        match self {
            OrchProbe::CreateExecMs => 1,
            OrchProbe::CreatesPerS => PARALLEL,
        }
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

/// The manifest the workloads create from: 1 vCPU, 128 MiB, a writable rootfs (the daemon
/// gives each VM its own copy), networking on, and a workload that only sleeps.
pub fn manifest_body(kernel: &Path, rootfs: &Path) -> String {
    json!({
        "schema": 1,
        "name": MANIFEST,
        "kernel": kernel,
        "rootfs": {"path": rootfs, "read_only": false},
        "vcpus": 1,
        "memory_mib": 128,
        "entrypoint": "/bin/busybox",
        "args": ["sleep", "100000"],
        "network": {"enabled": true},
    })
    .to_string()
}

/// `POST /v1/vms`'s body.
pub fn create_body(id: &str) -> String {
    json!({"manifest": MANIFEST, "id": id}).to_string()
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

/// Creates VM `id` from the manifest; fails unless the daemon answers 201.
pub fn create(c: &impl Control, id: &str, timeout: Duration) -> Result<()> {
    let a = c
        .call("POST", "/v1/vms", Some(&create_body(id)), timeout)
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

/// Destroys every VM of `ids` in parallel; one error naming each that failed.
pub fn destroy_all<C: Control + Sync>(c: &C, ids: &[String]) -> Result<()> {
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| (id, s.spawn(move || destroy(c, id))))
            .collect();
        handles
            .into_iter()
            .filter_map(|(id, h)| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some(format!("destroying VM {id}: the thread panicked")),
            })
            .collect()
    });
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
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
    let vm = Created::new(c, vec![id.to_string()]);
    let t0 = Instant::now();
    create(c, id, timeout)?;
    exec_until_ok(c, id, t0 + timeout)?;
    let took = t0.elapsed();
    vm.destroy()?;
    Ok(took)
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
    /// `target/release/orchestrator` (run in place: it starts once).
    pub orchestrator: PathBuf,
    /// `target/release/jailer`.
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
        let a = d
            .client
            .call(
                "POST",
                "/v1/manifests",
                Some(&manifest_body(&kernel, &rootfs)),
                SHORT_TIMEOUT,
            )
            .context("adding the manifest")?;
        if a.status != 201 {
            bail!("adding the manifest: {}\n  {}", describe(&a), d.log_tail());
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
}

impl Orch {
    /// Nothing starts until the first measurement.
    pub fn new(inputs: OrchInputs) -> Orch {
        Orch {
            inputs,
            daemon: None,
            next_id: 0,
        }
    }

    /// The running daemon, started (again, after cleaning up a dead one) when needed.
    fn daemon(&mut self) -> Result<&Daemon> {
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
            .as_ref()
            .context("the orchestrator daemon is not running")
    }

    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("b{}", self.next_id)
    }

    /// One run of `probe`; `timeout` bounds each create (and the create-to-exec time).
    pub fn measure(&mut self, probe: OrchProbe, timeout: Duration) -> Result<f64> {
        let ids: Vec<String> = (0..probe.vms_per_run()).map(|_| self.next_id()).collect();
        let d = self.daemon()?;
        let result = match probe {
            OrchProbe::CreateExecMs => {
                create_exec_once(&d.client, &ids[0], timeout).map(|t| t.as_secs_f64() * 1000.0)
            }
            OrchProbe::CreatesPerS => creates_per_s_once(&d.sock, &d.client, &ids, timeout),
        };
        result.map_err(|e| anyhow!("{e:#}\n  {}", d.log_tail()))
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
        answer: Box<Rule>,
    }

    impl Fake {
        fn new(answer: impl Fn(&str, &str, usize) -> Result<Answer> + Sync + 'static) -> Fake {
            Fake {
                calls: Mutex::new(Vec::new()),
                answer: Box::new(answer),
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Control for Fake {
        fn call(&self, method: &str, path: &str, _: Option<&str>, _: Duration) -> Result<Answer> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(format!("{method} {path}"));
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
}
