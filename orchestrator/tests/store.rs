//! The state database through its public API, on real files: migrations, reopening,
//! version refusal, concurrent leasing from separate connections, exhaustion, release and
//! manifest removal rules.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

use orchestrator::manifest::Manifest;
use orchestrator::net_addr::{Mac, Subnet};
use orchestrator::store::{LeaseUsage, Store, StoreError, VmState, SCHEMA_VERSION};

/// A fresh directory for one test's database, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "orchestrator-store-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("state.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn manifest(name: &str) -> Manifest {
    let doc = serde_json::json!({
        "schema": 1,
        "name": name,
        "kernel": "/srv/vmlinux",
        "rootfs": { "path": "/srv/rootfs.ext4" },
        "entrypoint": "/bin/app",
        "env": { "MODE": "test" }
    });
    Manifest::parse(doc.to_string().as_bytes()).unwrap()
}

/// The raw `PRAGMA user_version` of a file, read with a separate connection.
fn user_version(path: &PathBuf) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn migrates_an_empty_file() {
    let tmp = TempDir::new("migrate");
    let path = tmp.db();
    std::fs::File::create(&path).unwrap(); // empty file: a valid, empty SQLite database
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(user_version(&path), i64::from(SCHEMA_VERSION));
    assert!(store.list_manifests().unwrap().is_empty());
    assert!(store.list_vms().unwrap().is_empty());
    assert!(store.events_since(0, 10).unwrap().is_empty());

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables.sort();
    assert_eq!(
        tables,
        ["events", "leases", "manifests", "snapshots", "vms"]
    );

    // A state outside the CHECK list is refused by the schema itself.
    let err = conn
        .execute(
            "INSERT INTO manifests (name, json, hash, created_at) VALUES ('m', '{}', 'h', 0)",
            [],
        )
        .and_then(|_| {
            conn.execute(
                "INSERT INTO vms (id, manifest, state, mac, created_at, updated_at)
                 VALUES ('v', 'm', 'zombie', 'x', 0, 0)",
                [],
            )
        })
        .unwrap_err();
    assert!(err.to_string().contains("CHECK constraint failed"), "{err}");
}

#[test]
fn reopen_keeps_data() {
    let tmp = TempDir::new("reopen");
    let subnet: Subnet = "10.50.0.0/24".parse().unwrap();
    let (ip, mac) = {
        let mut store = Store::open(&tmp.db()).unwrap();
        store.add_manifest(&manifest("web")).unwrap();
        let created = store.create_vm_with_lease("vm-a", "web", &subnet).unwrap();
        store.set_state("vm-a", VmState::Running).unwrap();
        created
    };
    let store = Store::open(&tmp.db()).unwrap();
    let record = store.get_manifest("web").unwrap();
    assert_eq!(record.manifest, manifest("web"));
    assert_eq!(record.hash, manifest("web").content_hash());
    let vm = store.get_vm("vm-a").unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!((vm.ip, vm.mac), (Some(ip), mac));
    assert_eq!(store.list_leases().unwrap(), [(ip, "vm-a".to_string())]);
    assert_eq!(store.events_since(0, 100).unwrap().len(), 3);
}

#[test]
fn refuses_a_newer_database() {
    let tmp = TempDir::new("newer");
    let path = tmp.db();
    drop(Store::open(&path).unwrap());
    let future = SCHEMA_VERSION + 5;
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", future)
        .unwrap();
    let err = Store::open(&path)
        .err()
        .expect("newer database must be refused");
    assert!(
        matches!(&err, StoreError::TooNew { path: p, found, known }
            if *p == path && *found == future && *known == SCHEMA_VERSION),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("schema version {future}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("version {SCHEMA_VERSION} ")),
        "{message}"
    );
    // Nothing was changed by the refused open.
    assert_eq!(user_version(&path), i64::from(future));
}

#[test]
fn concurrent_creates_get_distinct_addresses() {
    const THREADS: usize = 16;
    let tmp = TempDir::new("concurrent");
    let path = tmp.db();
    Store::open(&path)
        .unwrap()
        .add_manifest(&manifest("web"))
        .unwrap();
    let subnet: Subnet = "10.60.0.0/24".parse().unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let path = path.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut store = Store::open(&path).unwrap();
                barrier.wait();
                let id = format!("vm-{i}");
                let (ip, mac) = store.create_vm_with_lease(&id, "web", &subnet).unwrap();
                (id, ip, mac)
            })
        })
        .collect();
    let results: Vec<(String, Ipv4Addr, Mac)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();

    let ips: HashSet<_> = results.iter().map(|r| r.1).collect();
    let macs: HashSet<_> = results.iter().map(|r| r.2).collect();
    assert_eq!(ips.len(), THREADS, "duplicate IPs: {results:?}");
    assert_eq!(macs.len(), THREADS);
    // Lowest-first allocation: together they fill .2 ..= .17 exactly.
    let expected: HashSet<_> = (2..2 + THREADS)
        .map(|h| Ipv4Addr::new(10, 60, 0, u8::try_from(h).unwrap()))
        .collect();
    assert_eq!(ips, expected);
    for (id, ip, mac) in &results {
        assert_eq!(*mac, Mac::for_vm(id));
        assert_ne!(*ip, subnet.gateway());
    }

    let store = Store::open(&path).unwrap();
    let leases = store.list_leases().unwrap();
    assert_eq!(leases.len(), THREADS);
    for (id, ip, _) in &results {
        assert!(leases.contains(&(*ip, id.clone())));
        assert_eq!(store.get_vm(id).unwrap().ip, Some(*ip));
    }
    assert_eq!(
        store.lease_usage(&subnet).unwrap(),
        LeaseUsage {
            used: 16,
            total: 253
        }
    );
    let created = store
        .events_since(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "created")
        .count();
    assert_eq!(created, THREADS);
}

#[test]
fn concurrent_opens_of_a_fresh_file_migrate_once() {
    let tmp = TempDir::new("fresh-open");
    let path = tmp.db();
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                Store::open(&path).map(|s| s.schema_version().unwrap())
            })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap().unwrap(), SCHEMA_VERSION);
    }
}

#[test]
fn exhaustion_is_a_distinct_error() {
    let tmp = TempDir::new("exhaust");
    let mut store = Store::open(&tmp.db()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    // A /30 has network .4, gateway .5, broadcast .7: only .6 for a VM.
    let subnet: Subnet = "10.70.0.4/30".parse().unwrap();
    let (ip, _) = store.create_vm_with_lease("only", "web", &subnet).unwrap();
    assert_eq!(ip, Ipv4Addr::new(10, 70, 0, 6));
    let err = store
        .create_vm_with_lease("second", "web", &subnet)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NoFreeAddress { subnet: s, leased: 1 } if *s == subnet),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "no free address in 10.70.0.4/30 (1 leased)"
    );
    // The failed create left no VM row, lease or event.
    assert!(matches!(
        store.get_vm("second"),
        Err(StoreError::VmNotFound { .. })
    ));
    assert_eq!(store.list_leases().unwrap().len(), 1);
    assert_eq!(
        store.lease_usage(&subnet).unwrap(),
        LeaseUsage { used: 1, total: 1 }
    );
    // A /24 pool is exhausted after 253 VMs.
    let pool: Subnet = "10.71.0.0/24".parse().unwrap();
    for i in 0..253 {
        store
            .create_vm_with_lease(&format!("p{i}"), "web", &pool)
            .unwrap();
    }
    let err = store
        .create_vm_with_lease("p253", "web", &pool)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no free address in 10.71.0.0/24 (253 leased)"
    );
}

#[test]
fn destroy_releases_the_lease_for_reuse() {
    let tmp = TempDir::new("destroy");
    let mut store = Store::open(&tmp.db()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    let subnet: Subnet = "10.80.0.0/24".parse().unwrap();
    let (ip_a, _) = store.create_vm_with_lease("a", "web", &subnet).unwrap();
    let (ip_b, _) = store.create_vm_with_lease("b", "web", &subnet).unwrap();
    let (ip_c, _) = store.create_vm_with_lease("c", "web", &subnet).unwrap();
    assert_eq!(
        [ip_a, ip_b, ip_c],
        [2, 3, 4].map(|h| Ipv4Addr::new(10, 80, 0, h))
    );

    store.destroy_vm("b").unwrap();
    assert!(matches!(
        store.get_vm("b"),
        Err(StoreError::VmNotFound { id }) if id == "b"
    ));
    let leased: Vec<_> = store
        .list_leases()
        .unwrap()
        .into_iter()
        .map(|l| l.0)
        .collect();
    assert_eq!(leased, [ip_a, ip_c]);
    assert_eq!(store.lease_usage(&subnet).unwrap().used, 2);
    let last = store.events_since(0, 100).unwrap().pop().unwrap();
    assert_eq!(last.kind, "destroyed");
    assert_eq!(last.vm_id.as_deref(), Some("b"));
    assert_eq!(last.detail["ip"], ip_b.to_string());

    // The lowest free address is b's old one.
    let (ip_d, _) = store.create_vm_with_lease("d", "web", &subnet).unwrap();
    assert_eq!(ip_d, ip_b);
    // The same id can be created again once destroyed, and keeps its MAC.
    store.destroy_vm("a").unwrap();
    let (ip_a2, mac_a2) = store.create_vm_with_lease("a", "web", &subnet).unwrap();
    assert_eq!((ip_a2, mac_a2), (ip_a, Mac::for_vm("a")));
    assert!(matches!(
        store.destroy_vm("b"),
        Err(StoreError::VmNotFound { .. })
    ));
}

#[test]
fn manifest_removal_is_refused_while_in_use() {
    let tmp = TempDir::new("manifest-rm");
    let mut store = Store::open(&tmp.db()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    store.add_manifest(&manifest("idle")).unwrap();
    let subnet = Subnet::default();
    store.create_vm_with_lease("vm-2", "web", &subnet).unwrap();
    store.create_vm_with_lease("vm-1", "web", &subnet).unwrap();
    store.set_state("vm-1", VmState::Stopped).unwrap();

    let err = store.remove_manifest("web").unwrap_err();
    assert!(
        matches!(&err, StoreError::ManifestInUse { name, count: 2, vm_ids }
            if name == "web" && vm_ids == &["vm-1", "vm-2"]),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "manifest web is used by 2 VM(s) (vm-1, vm-2); destroy them first"
    );
    assert!(store.get_manifest("web").is_ok());

    // An unused manifest goes; an absent one is reported.
    store.remove_manifest("idle").unwrap();
    assert!(matches!(
        store.remove_manifest("idle"),
        Err(StoreError::ManifestNotFound { name }) if name == "idle"
    ));
    let names: Vec<_> = store
        .list_manifests()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["web"]);

    // Once its VMs are destroyed, it can be removed.
    store.destroy_vm("vm-1").unwrap();
    store.destroy_vm("vm-2").unwrap();
    store.remove_manifest("web").unwrap();
    assert!(store.list_manifests().unwrap().is_empty());
}

#[test]
fn a_hibernation_is_recorded_in_one_step_and_replaces_the_previous_snapshot() {
    let tmp = TempDir::new("hibernate");
    let mut store = Store::open(&tmp.db()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    let subnet: Subnet = "10.9.0.0/24".parse().unwrap();
    store.create_vm_with_lease("vm-h", "web", &subnet).unwrap();
    store.set_state("vm-h", VmState::Running).unwrap();
    store
        .set_process("vm-h", 4242, 99, std::path::Path::new("/j"), "orch-vm-h")
        .unwrap();
    assert!(store
        .latest_snapshot("vm-h", "hibernate")
        .unwrap()
        .is_none());

    let first = store
        .commit_hibernation("vm-h", "/s1/vmstate".as_ref(), "/s1/memory".as_ref())
        .unwrap();
    let vm = store.get_vm("vm-h").unwrap();
    assert_eq!(vm.state, VmState::Hibernated);
    assert_eq!((vm.pid, vm.pid_start_time), (None, None));
    assert!(vm.ip.is_some(), "the lease stays");
    let snap = store.latest_snapshot("vm-h", "hibernate").unwrap().unwrap();
    assert_eq!(
        (snap.id, snap.mem_path.to_str()),
        (first, Some("/s1/memory"))
    );

    store.set_state("vm-h", VmState::Running).unwrap();
    let second = store
        .commit_hibernation("vm-h", "/s2/vmstate".as_ref(), "/s2/memory".as_ref())
        .unwrap();
    let all = store.list_snapshots("vm-h").unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].id, second);
    assert_eq!(all[0].vmstate_path.to_str(), Some("/s2/vmstate"));
    let events = store.events_since(0, 100).unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, "state");
    assert_eq!(last.detail["from"], "running");
    assert_eq!(last.detail["to"], "hibernated");

    assert!(matches!(
        store.commit_hibernation("nope", "/a".as_ref(), "/b".as_ref()),
        Err(StoreError::VmNotFound { .. })
    ));
    store
        .set_port_forward(
            "vm-h",
            Some(orchestrator::store::PortForward {
                host_port: 8080,
                guest_port: 80,
            }),
        )
        .unwrap();
    assert_eq!(
        store.get_vm("vm-h").unwrap().port_forward,
        Some(orchestrator::store::PortForward {
            host_port: 8080,
            guest_port: 80
        })
    );
}

#[test]
fn pruning_keeps_the_newest_events() {
    let tmp = TempDir::new("prune");
    let mut store = Store::open(&tmp.db()).unwrap();
    for i in 0..50 {
        store
            .record_event(None, "test", &serde_json::json!({ "i": i }))
            .unwrap();
    }
    assert_eq!(store.prune_events(20).unwrap(), 30);
    let left = store.events_since(0, 1000).unwrap();
    assert_eq!(left.len(), 20);
    assert_eq!(left[0].detail["i"], 30);
    assert_eq!(left[19].detail["i"], 49);
    assert_eq!(store.prune_events(20).unwrap(), 0);
    // Sequence numbers go on from where they were.
    let next = store
        .record_event(None, "test", &serde_json::json!({}))
        .unwrap();
    assert_eq!(next, left[19].seq + 1);
}
