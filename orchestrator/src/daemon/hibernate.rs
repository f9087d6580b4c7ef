//! Hibernation and wake-on-demand: a VM's VMM is paused, snapshotted into the VM's state
//! directory and stopped (its lease, netns and disk kept); whatever needs the VM next
//! (exec, logs, the wake endpoint, a forwarded connection) restores it first.
//!
//! Crash safety, step by step (a `kill -9` of the daemon can land anywhere):
//! - The snapshot is written by the VMM into its jail, then moved by the daemon into a new
//!   directory `<vm dir>/snap-<ms>.tmp`, both files fsynced, and the directory renamed to
//!   `snap-<ms>` (and the parent fsynced). Until the database says otherwise the VM is still
//!   `running`: its VMM, paused, still exists and the reconciler resumes it.
//! - One transaction records the snapshot, clears the process and sets `hibernated`. Only
//!   then is the VMM stopped; the reconciler stops any VMM left in a hibernated VM's
//!   cgroups.
//! - Wake never writes the snapshot (its memory is mapped copy-on-write), so a wake cut
//!   short leaves the VM `hibernated` with intact files; the reconciler stops the half-woken
//!   VMM. Snapshot directories no row names (older ones, `.tmp` ones) are removed.

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::vm::{self, kill_point, ErrorKind, JailReport, OpError, Spawn, Start, API_IN_JAIL};
use super::Daemon;
use crate::store::{VmRecord, VmState};

/// Snapshot `kind` of hibernation snapshots in the database.
pub const KIND: &str = "hibernate";
/// The files the VMM writes in its jail during a hibernation.
const VMSTATE_OUT: &str = "/hibernate.vmstate";
const MEMORY_OUT: &str = "/hibernate.mem";
/// How long the VMM may take to write a snapshot (a slow disk and a big guest).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Held while an operation (exec, logs, a forwarded connection) uses a VM: the VM is not
/// hibernated under it.
pub struct Busy {
    d: Arc<Daemon>,
    id: String,
    _agent: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Most agent connections the daemon opens to one VM at once: guest-init serves 8, and
/// the rest are left for other clients of its vsock socket. Further execs and logs
/// requests wait for a slot.
pub const AGENT_SLOTS: usize = 6;

/// [`ensure_awake`] for an operation that talks to the guest agent: it first waits for
/// one of the VM's [`AGENT_SLOTS`].
pub async fn ensure_awake_for_agent(d: &Arc<Daemon>, id: &str) -> Result<Busy, OpError> {
    let permit = d
        .agent_slots(id)
        .acquire_owned()
        .await
        .map_err(OpError::internal)?;
    let mut busy = ensure_awake(d, id).await?;
    busy._agent = Some(permit);
    Ok(busy)
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.d.activity_end(&self.id);
    }
}

/// Makes sure VM `id` runs (waking it if it is hibernated) and marks it busy until the
/// returned guard is dropped. Concurrent callers share one wake: they queue on the VM's
/// lock, and the first wakes it while the others then find it running.
pub async fn ensure_awake(d: &Arc<Daemon>, id: &str) -> Result<Busy, OpError> {
    let lock = d.vm_lock(id);
    let _g = lock.lock().await;
    let state = {
        let id = id.to_string();
        let d2 = Arc::clone(d);
        tokio::task::spawn_blocking(move || d2.with_store(|s| s.get_vm(&id)))
            .await
            .map_err(OpError::internal)??
            .state
    };
    if state == VmState::Hibernated {
        let id2 = id.to_string();
        let d2 = Arc::clone(d);
        tokio::task::spawn_blocking(move || wake(&d2, &id2))
            .await
            .map_err(OpError::internal)??;
        vm::watch(Arc::clone(d), id.to_string());
    }
    d.activity_begin(id);
    Ok(Busy {
        d: Arc::clone(d),
        id: id.to_string(),
        _agent: None,
    })
}

/// A request to the VMM's API socket in the jail at `jail_root`, owned by `uid`.
fn vmm_api(
    jail_root: &Path,
    uid: u32,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(), String> {
    let sock = jail_root.join(API_IN_JAIL.trim_start_matches('/'));
    // The jail root is the VMM's: check that this is its socket, not something it put
    // there for us to connect to.
    let md = std::fs::symlink_metadata(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    if !md.file_type().is_socket() || md.uid() != uid {
        return Err(format!(
            "{} is not a socket owned by uid {uid}",
            sock.display()
        ));
    }
    let client = crate::client::Client::new(&sock).map_err(|e| format!("{e:#}"))?;
    let body = serde_json::to_vec(body).unwrap_or_default();
    // The VMM's answers are a few hundred bytes; one that goes on past this cap is cut
    // there (a compromised VMM could otherwise stream until the timeout).
    const MAX_ANSWER: usize = 64 * 1024;
    let mut answer = Vec::new();
    let status = client
        .request_streaming(method, path, Some(&body), timeout, |chunk| {
            let room = MAX_ANSWER - answer.len();
            answer.extend_from_slice(&chunk[..room.min(chunk.len())]);
            answer.len() < MAX_ANSWER
        })
        .map_err(|e| format!("{e:#}"))?;
    if status >= 300 {
        return Err(format!(
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    Ok(())
}

/// Asks the VMM in `report`'s jail to resume, ignoring the answer (a running VM says no).
pub fn resume_quietly(report: &JailReport, uid: u32) {
    let _ = vmm_api(
        &report.jail_root,
        uid,
        "PATCH",
        "/vm",
        &json!({"state": "Resumed"}),
        Duration::from_secs(10),
    );
}

/// Moves a file the VMM wrote in its jail to `dst` (same filesystem, a directory only root
/// writes) and fsyncs it. It is checked where it landed, out of the VMM's reach: a regular
/// file of `uid` with one link (not a symlink or a link to some other file).
fn take_file(src: &Path, dst: &Path, uid: u32) -> Result<(), String> {
    std::fs::rename(src, dst)
        .map_err(|e| format!("move {} to {}: {e}", src.display(), dst.display()))?;
    let md = std::fs::symlink_metadata(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    if !md.file_type().is_file() || md.uid() != uid || md.nlink() != 1 {
        let _ = std::fs::remove_file(dst);
        return Err(format!(
            "{}: not a regular file of uid {uid} with one link",
            src.display()
        ));
    }
    fsync_path(dst)
}

pub(crate) fn fsync_path(p: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", p.display()))
}

/// The snapshot directories of a VM (`snap-*`, finished or not).
fn snapshot_dirs(vm_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(vm_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
        .map(|e| e.path())
        .collect()
}

/// Removes a VM's snapshot directories other than the one `keep` (a file in it) is in.
pub fn prune_snapshots(vm_dir: &Path, keep: Option<&Path>) {
    let keep_dir = keep.and_then(Path::parent);
    for dir in snapshot_dirs(vm_dir) {
        if Some(dir.as_path()) != keep_dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Pauses the VMM of `report`'s jail (run as `uid`) and has it write a snapshot, which is
/// then moved into `dest` as `vmstate` and `memory`, fsynced. `phase` names the kill points
/// passed (`<phase>:paused`, `<phase>:written`).
pub(crate) fn snapshot_into(
    report: &JailReport,
    uid: u32,
    dest: &Path,
    phase: Option<&str>,
) -> Result<(), String> {
    let root = &report.jail_root;
    vmm_api(
        root,
        uid,
        "PATCH",
        "/vm",
        &json!({"state": "Paused"}),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("pause: {e}"))?;
    if let Some(p) = phase {
        kill_point(&format!("{p}:paused"));
    }
    vmm_api(
        root,
        uid,
        "PUT",
        "/snapshot/create",
        &json!({"snapshot_path": VMSTATE_OUT, "mem_file_path": MEMORY_OUT}),
        SNAPSHOT_TIMEOUT,
    )
    .map_err(|e| format!("snapshot: {e}"))?;
    if let Some(p) = phase {
        kill_point(&format!("{p}:written"));
    }
    take_file(&root.join(&VMSTATE_OUT[1..]), &dest.join("vmstate"), uid)?;
    take_file(&root.join(&MEMORY_OUT[1..]), &dest.join("memory"), uid)?;
    fsync_path(dest)
}

/// Hibernates VM `id`: pause, snapshot into its state directory, stop the VMM; the lease,
/// netns and disk stay. Blocking; the caller holds the VM's lock.
pub fn hibernate(d: &Daemon, id: &str) -> Result<VmRecord, OpError> {
    let started = Instant::now();
    let vm = d.with_store(|s| s.get_vm(id))?;
    if vm.state != VmState::Running {
        return Err(OpError::new(
            ErrorKind::Conflict,
            format!("VM {id} is {}, not running", vm.state),
        ));
    }
    let busy = d.activity(id).inflight;
    if busy > 0 {
        return Err(OpError::new(
            ErrorKind::Conflict,
            format!("VM {id} is in use ({busy} exec/logs/connection(s) in progress)"),
        ));
    }
    let vm_dir = d.config.vm_dir(id);
    let report = JailReport::load(&vm_dir)
        .ok_or_else(|| OpError::internal(format!("VM {id}: no jail report")))?;
    let ip = vm
        .ip
        .ok_or_else(|| OpError::internal(format!("VM {id}: no lease")))?;
    let uid = vm::vm_uid(d, ip);
    let name = format!(
        "snap-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis())
    );
    let tmp = vm_dir.join(format!("{name}.tmp"));
    let done = vm_dir.join(&name);
    let result = std::fs::create_dir(&tmp)
        .map_err(|e| format!("create {}: {e}", tmp.display()))
        .and_then(|()| snapshot_into(&report, uid, &tmp, Some("hibernate")))
        .and_then(|()| {
            std::fs::rename(&tmp, &done).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
            fsync_path(&vm_dir)
        });
    if let Err(e) = result {
        // The VM goes on running; a half-made snapshot directory is removed.
        resume_quietly(&report, uid);
        let current = d.with_store(|s| s.latest_snapshot(id, KIND)).ok().flatten();
        prune_snapshots(&vm_dir, current.as_ref().map(|s| s.vmstate_path.as_path()));
        return Err(OpError::internal(format!("VM {id}: hibernate: {e}")));
    }
    kill_point("hibernate:renamed");
    let (vmstate, memory) = (done.join("vmstate"), done.join("memory"));
    d.with_store(|s| s.commit_hibernation(id, &vmstate, &memory))?;
    kill_point("hibernate:committed");
    // The process is forgotten, so the exit watcher takes this for no crash.
    vm::kill_vmm(&vm);
    vm::release_vmm(d, id);
    kill_point("hibernate:released");
    prune_snapshots(&vm_dir, Some(&vmstate));
    d.record_hibernation(started.elapsed().as_secs_f64());
    eprintln!(
        "orchestrator: VM {id}: hibernated in {:.2} s ({})",
        started.elapsed().as_secs_f64(),
        done.display()
    );
    Ok(d.with_store(|s| s.get_vm(id))?)
}

/// Wakes a hibernated VM `id`: restore its snapshot in a fresh jail in its own netns, wait
/// for the agent, resync the guest's clock and RNG. Blocking; the caller holds the VM's
/// lock. On failure the VM stays `hibernated` (its files untouched).
pub fn wake(d: &Daemon, id: &str) -> Result<VmRecord, OpError> {
    let started = Instant::now();
    let vm = d.with_store(|s| s.get_vm(id))?;
    match vm.state {
        VmState::Hibernated => {}
        VmState::Running => return Ok(vm),
        other => {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!("VM {id} is {other}, not hibernated"),
            ))
        }
    }
    let snap = d
        .with_store(|s| s.latest_snapshot(id, KIND))?
        .ok_or_else(|| OpError::internal(format!("VM {id}: hibernated without a snapshot")))?;
    let manifest = d.with_store(|s| s.get_manifest(&vm.manifest))?.manifest;
    let ip = vm
        .ip
        .ok_or_else(|| OpError::internal(format!("VM {id}: no lease")))?;
    let vm_dir = d.config.vm_dir(id);
    let disk = if manifest.rootfs.read_only {
        manifest.rootfs.path.clone()
    } else {
        vm_dir.join("rootfs.img")
    };
    let netns = vm::netns_name(id);
    // Whatever a wake cut short left behind (the jail, a VMM) goes first.
    vm::release_vmm(d, id);
    let spawn = Spawn {
        id,
        m: &manifest,
        uid: vm::vm_uid(d, ip),
        disk: &disk,
        netns: &netns,
        start: Start::Restore {
            vmstate: &snap.vmstate_path,
            memory: &snap.mem_path,
        },
    };
    let result = (|| {
        let report = vm::spawn_vmm(&d.config, &spawn)?;
        let pid = vm::record_process(d, id, &report, "wake")?;
        vm::after_restore(
            &report,
            manifest.agent_port,
            d.config.ready_timeout,
            pid,
            id,
            "wake",
            None,
        )
    })();
    if let Err(e) = result {
        let _ = d.with_store(|s| s.clear_process(id));
        vm::release_vmm(d, id);
        return Err(e);
    }
    d.with_store(|s| {
        s.set_state(id, VmState::Running)?;
        s.record_event(
            Some(id),
            "woken",
            &json!({"ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)}),
        )
    })?;
    d.record_wake(started.elapsed().as_secs_f64());
    eprintln!(
        "orchestrator: VM {id}: woken in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(d.with_store(|s| s.get_vm(id))?)
}

/// Hibernates running VMs whose manifest sets `idle_hibernate_s` once they have been idle
/// that long (nothing in flight), and prunes the event log to `EVENTS_KEPT` at start and
/// hourly. Runs until the daemon ends.
pub async fn idle_loop(d: Arc<Daemon>) {
    let mut last_prune: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The event log's housekeeping rides along: pruned at start, then hourly.
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_prune = Some(Instant::now());
            let d2 = Arc::clone(&d);
            let _ = tokio::task::spawn_blocking(move || {
                d2.with_store(|s| s.prune_events(crate::store::EVENTS_KEPT))
            })
            .await;
        }
        let d2 = Arc::clone(&d);
        let due = tokio::task::spawn_blocking(move || idle_candidates(&d2))
            .await
            .unwrap_or_default();
        for id in due {
            let lock = d.vm_lock(&id);
            let Ok(_g) = lock.try_lock() else { continue };
            let d2 = Arc::clone(&d);
            let id2 = id.clone();
            let r = tokio::task::spawn_blocking(move || {
                // Re-checked under the lock: an exec may have begun meanwhile.
                if idle_candidates(&d2).contains(&id2) {
                    hibernate(&d2, &id2).map(|_| ())
                } else {
                    Ok(())
                }
            })
            .await;
            if let Ok(Err(e)) = r {
                eprintln!("orchestrator: idle hibernation of VM {id} failed: {e}");
            }
        }
    }
}

/// Running VMs idle past their manifest's `idle_hibernate_s`.
fn idle_candidates(d: &Daemon) -> Vec<String> {
    let Ok(vms) = d.with_store(|s| s.list_vms()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in vms.into_iter().filter(|v| v.state == VmState::Running) {
        let Ok(m) = d.with_store(|s| s.get_manifest(&v.manifest)) else {
            continue;
        };
        let Some(idle_s) = m.manifest.idle_hibernate_s else {
            continue;
        };
        let a = d.activity(&v.id);
        if a.inflight == 0 && a.last.elapsed() >= Duration::from_secs(idle_s) {
            out.push(v.id);
        }
    }
    out
}
