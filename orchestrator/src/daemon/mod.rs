//! `orchestrator serve`: the daemon. It owns the state database (the source of truth), serves
//! the control API (REST + JSON over a unix socket, optionally TCP with a bearer token;
//! `api.rs`), runs one jailed `vmm` per VM (`vm.rs`), watches each VMM process through a
//! pidfd and reconciles the database with reality when it starts (`reconcile.rs`).
//!
//! Blocking work (SQLite, spawning the jailer, talking to guest agents over vsock) runs on
//! tokio's blocking pool; the async side only routes requests and streams events.

pub mod api;
pub mod exec;
pub mod forward;
pub mod hibernate;
pub mod reconcile;
pub mod template;
pub mod vm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::net_addr::Subnet;
use crate::store::Store;

/// Everything `orchestrator serve` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `state.db`, `vms/<id>/` (per-VM disks, jailer reports) and `jail/`.
    pub state_dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// Group allowed to use the control socket besides root and the daemon's own uid.
    pub socket_gid: Option<u32>,
    /// Optional TCP listener (needs `token`).
    pub tcp: Option<std::net::SocketAddr>,
    /// Bearer token for TCP clients.
    pub token: Option<String>,
    /// The VM subnet; its first host address is the bridge's.
    pub subnet: Subnet,
    /// The host bridge's name.
    pub bridge: String,
    /// The `jailer` binary.
    pub jailer: PathBuf,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// VMMs run as uid/gid `uid_base + host index of their address` (unique per live VM).
    pub uid_base: u32,
    /// How long a new VM may take to answer on its agent port.
    pub ready_timeout: Duration,
}

impl Config {
    /// The state database.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// Per-VM files kept by the daemon (outside the jail).
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("vms").join(id)
    }

    /// The jailer's `--chroot-base-dir`.
    pub fn jail_base(&self) -> PathBuf {
        self.state_dir.join("jail")
    }
}

/// Latency samples for the metrics endpoint (the last 1024 of each).
#[derive(Debug, Default)]
pub struct Latencies {
    /// Create-to-running, seconds.
    pub create: Vec<f64>,
    /// Destroy, seconds.
    pub destroy: Vec<f64>,
    /// Hibernate (pause to VMM stopped), seconds.
    pub hibernate: Vec<f64>,
    /// Wake (restore to agent answering), seconds.
    pub wake: Vec<f64>,
    /// Hibernations since the daemon started.
    pub hibernations: u64,
    /// Wakes (restores) since the daemon started.
    pub wakes: u64,
}

impl Latencies {
    fn push(v: &mut Vec<f64>, s: f64) {
        if v.len() >= 1024 {
            v.remove(0);
        }
        v.push(s);
    }
}

/// State shared by the API handlers and the VM tasks.
pub struct Daemon {
    /// Configuration.
    pub config: Config,
    /// The state database (one connection; every use is short).
    pub store: Mutex<Store>,
    /// Per-VM locks: one lifecycle operation at a time per VM.
    pub vm_locks: Keyed<tokio::sync::Mutex<()>>,
    /// Latency samples.
    pub latencies: Mutex<Latencies>,
    /// Per-VM use: operations in flight and the last time one ended (idle hibernation).
    pub activity: Mutex<HashMap<String, Activity>>,
    /// Content hashes of kernels, images and the VMM (template keys).
    pub file_hashes: template::HashCache,
    /// Per-manifest template build locks.
    pub template_locks: Keyed<Mutex<()>>,
    /// Port forward listeners, by VM.
    pub forwards: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Per-VM limits on the daemon's agent connections (guest-init serves a few at once).
    pub agent_slots: Keyed<tokio::sync::Semaphore>,
}

/// Shared objects by name (locks, semaphores), made on first use and dropped once nobody
/// holds them: the names come from clients, and a long-running daemon must not keep one
/// for every id it was ever asked about.
pub struct Keyed<T>(Mutex<HashMap<String, Arc<T>>>);

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed(Mutex::new(HashMap::new()))
    }
}

impl<T> Keyed<T> {
    /// The object named `key`, made with `make` if nobody holds one.
    pub fn get_with(&self, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // An entry only the map refers to is neither held nor waited on: it can go. Every
        // clone is taken under this same mutex, so none can appear while this runs.
        map.retain(|_, v| Arc::strong_count(v) > 1);
        Arc::clone(
            map.entry(key.to_string())
                .or_insert_with(|| Arc::new(make())),
        )
    }

    /// How many names are held now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How busy a VM is.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// Operations in flight (exec, logs, forwarded connections).
    pub inflight: u32,
    /// When the last one began or ended.
    pub last: std::time::Instant,
}

impl Daemon {
    /// A daemon on `config` and its opened `store`, with nothing in flight.
    pub fn new(config: Config, store: Store) -> Daemon {
        Daemon {
            config,
            store: Mutex::new(store),
            vm_locks: Keyed::default(),
            latencies: Mutex::new(Latencies::default()),
            activity: Mutex::new(HashMap::new()),
            file_hashes: template::HashCache::default(),
            template_locks: Keyed::default(),
            forwards: Mutex::new(HashMap::new()),
            agent_slots: Keyed::default(),
        }
    }

    /// The semaphore bounding the daemon's agent connections to VM `id`.
    pub fn agent_slots(&self, id: &str) -> Arc<tokio::sync::Semaphore> {
        self.agent_slots
            .get_with(id, || tokio::sync::Semaphore::new(hibernate::AGENT_SLOTS))
    }

    /// Runs `f` with the database.
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut guard = match self.store.lock() {
            Ok(g) => g,
            // A panic while holding the lock leaves SQLite consistent (transactions roll
            // back); keep serving.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The lock serialising lifecycle operations on VM `id`.
    pub fn vm_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.vm_locks.get_with(id, Default::default)
    }

    /// An operation on VM `id` begins.
    pub fn activity_begin(&self, id: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let e = a.entry(id.to_string()).or_insert(Activity {
            inflight: 0,
            last: std::time::Instant::now(),
        });
        e.inflight += 1;
        e.last = std::time::Instant::now();
    }

    /// An operation on VM `id` ended.
    pub fn activity_end(&self, id: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = a.get_mut(id) {
            e.inflight = e.inflight.saturating_sub(1);
            e.last = std::time::Instant::now();
        }
    }

    /// Forgets VM `id`'s activity (the VM is gone).
    pub fn forget_activity(&self, id: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.remove(id);
    }

    /// VM `id`'s activity (none recorded yet: idle from now on).
    pub fn activity(&self, id: &str) -> Activity {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        *a.entry(id.to_string()).or_insert(Activity {
            inflight: 0,
            last: std::time::Instant::now(),
        })
    }

    /// The lock serialising builds of manifest `name`'s template.
    pub fn template_lock(&self, name: &str) -> Arc<Mutex<()>> {
        self.template_locks.get_with(name, Default::default)
    }

    /// Records a hibernation's duration.
    pub fn record_hibernation(&self, seconds: f64) {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        Latencies::push(&mut l.hibernate, seconds);
        l.hibernations += 1;
    }

    /// Records a wake's duration.
    pub fn record_wake(&self, seconds: f64) {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        Latencies::push(&mut l.wake, seconds);
        l.wakes += 1;
    }

    /// Records a latency sample.
    pub fn record_latency(&self, create: bool, seconds: f64) {
        let mut l = match self.latencies.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if create {
            Latencies::push(&mut l.create, seconds);
        } else {
            Latencies::push(&mut l.destroy, seconds);
        }
    }
}

/// Checks that a directory the daemon owns exists (creating it 0755) and is root's.
pub fn ensure_private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .with_context(|| format!("create {}", path.display()))?;
    let md = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if md.uid() != 0 || md.mode() & 0o002 != 0 {
        anyhow::bail!(
            "{} must be owned by root and not world-writable (uid {}, mode {:o})",
            path.display(),
            md.uid(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(config: Config) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("orchestrator serve must run as root (it creates network namespaces, jails and cgroups)");
    }
    if config.tcp.is_some() && config.token.is_none() {
        anyhow::bail!("--tcp needs --token-file: TCP clients must present a bearer token");
    }
    for (what, p) in [("--jailer", &config.jailer), ("--vmm", &config.vmm)] {
        if !p.is_file() {
            anyhow::bail!("{what} {}: not a file", p.display());
        }
    }
    ensure_private_dir(&config.state_dir)?;
    ensure_private_dir(&config.state_dir.join("vms"))?;
    ensure_private_dir(&config.jail_base())?;
    let store = Store::open(&config.db_path())?;
    crate::netsetup::ensure_host(&vm::host_net(&config)).context("set up the host network")?;

    let daemon = Arc::new(Daemon::new(config, store));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async move {
        let report = {
            let d = Arc::clone(&daemon);
            tokio::task::spawn_blocking(move || reconcile::reconcile(&d))
                .await
                .context("reconcile task")??
        };
        eprintln!("orchestrator: {report}");
        for id in report.adopted.iter() {
            vm::watch(Arc::clone(&daemon), id.clone());
        }
        forward::restore_all(&daemon);
        tokio::spawn(hibernate::idle_loop(Arc::clone(&daemon)));
        api::serve(daemon).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_objects_are_shared_while_held_and_dropped_after() {
        let k: Keyed<Mutex<()>> = Keyed::default();
        let a = k.get_with("vm-a", Default::default);
        let guard = a.lock().unwrap();
        // The same lock while it is held: a second user cannot take it.
        let again = k.get_with("vm-a", Default::default);
        assert!(Arc::ptr_eq(&a, &again));
        assert!(again.try_lock().is_err());
        drop(guard);
        drop(again);
        // Names nobody holds any more go at the next use, whatever the name asked for.
        for i in 0..1000 {
            drop(k.get_with(&format!("made-up-{i}"), Default::default));
        }
        assert_eq!(
            k.len(),
            2,
            "vm-a, held here, and the last name, until the next use"
        );
        drop(a);
        let _b = k.get_with("vm-b", Default::default);
        assert_eq!(
            k.len(),
            1,
            "vm-a went once unheld, and so did the last name"
        );
    }

    #[test]
    fn keyed_semaphores_keep_their_count_while_permits_are_out() {
        let k: Keyed<tokio::sync::Semaphore> = Keyed::default();
        let permit = k
            .get_with("vm-a", || tokio::sync::Semaphore::new(2))
            .try_acquire_owned()
            .unwrap();
        // The map's Arc and the permit's: the entry stays, one permit left.
        let s = k.get_with("vm-a", || tokio::sync::Semaphore::new(2));
        assert_eq!(s.available_permits(), 1);
        drop(s);
        drop(permit);
        let _other = k.get_with("vm-b", || tokio::sync::Semaphore::new(2));
        assert_eq!(k.len(), 1);
        let s = k.get_with("vm-a", || tokio::sync::Semaphore::new(2));
        assert_eq!(s.available_permits(), 2);
    }
}
