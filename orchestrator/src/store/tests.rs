use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A fresh database path in its own directory, removed on drop.
struct TempDb {
    dir: PathBuf,
}

impl TempDb {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "store-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDb { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.db")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn manifest(name: &str) -> Manifest {
    let doc = format!(
        r#"{{"schema":1,"name":"{name}","kernel":"/k","rootfs":{{"path":"/r"}},"entrypoint":"sh"}}"#
    );
    Manifest::parse(doc.as_bytes()).unwrap()
}

#[test]
fn start_time_is_field_22() {
    // comm may hold spaces and parentheses; fields are counted from the last ')'.
    let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                987654 1000 50 18446744073709551615";
    assert_eq!(parse_start_time(stat), Some(987_654));
    assert_eq!(parse_start_time("1 (x) S 1 2"), None);
    assert_eq!(parse_start_time("garbage"), None);

    let me = process_start_time(std::process::id()).unwrap();
    assert!(me > 0);
    assert_eq!(process_start_time(std::process::id()).unwrap(), me);
    assert!(process_start_time(u32::MAX).is_err());
}

#[test]
fn vm_ids_follow_the_jailer_rule() {
    assert!(valid_vm_id("vm-1_A"));
    assert!(valid_vm_id(&"a".repeat(64)));
    for bad in ["", "a/b", "../x", "a b", "é", &"a".repeat(65)] {
        assert!(!valid_vm_id(bad), "{bad:?}");
    }
}

#[test]
fn states_round_trip() {
    for state in VmState::ALL {
        assert_eq!(state.as_str().parse::<VmState>().unwrap(), state);
        assert_eq!(
            serde_json::to_value(state).unwrap(),
            Value::from(state.as_str())
        );
    }
    assert!("Running".parse::<VmState>().is_err());
}

#[test]
fn vm_lifecycle_fields_and_events() {
    let tmp = TempDb::new();
    let mut store = Store::open(&tmp.path()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    let subnet: Subnet = "10.9.0.0/24".parse().unwrap();
    let (ip, mac) = store.create_vm_with_lease("vm1", "web", &subnet).unwrap();
    assert_eq!(ip, Ipv4Addr::new(10, 9, 0, 2));
    assert_eq!(mac, Mac::for_vm("vm1"));

    let vm = store.get_vm("vm1").unwrap();
    assert_eq!(vm.state, VmState::Creating);
    assert_eq!((vm.ip, vm.mac), (Some(ip), mac));
    assert_eq!(
        (vm.pid, vm.pid_start_time, vm.jail_dir.as_ref()),
        (None, None, None)
    );

    store
        .set_process(
            "vm1",
            4242,
            u64::from(u32::MAX) + 7,
            Path::new("/jail/vm1"),
            "vm1",
        )
        .unwrap();
    assert_eq!(
        store.set_state("vm1", VmState::Running).unwrap(),
        VmState::Creating
    );
    let vm = store.get_vm("vm1").unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.pid, Some(4242));
    assert_eq!(vm.pid_start_time, Some(u64::from(u32::MAX) + 7));
    assert_eq!(vm.jail_dir, Some(PathBuf::from("/jail/vm1")));
    assert_eq!(vm.netns.as_deref(), Some("vm1"));
    assert!(vm.updated_at_ms >= vm.created_at_ms);

    assert!(matches!(
        store.set_process("vm1", 1, u64::MAX, Path::new("/j"), "n"),
        Err(StoreError::OutOfRange {
            field: "pid_start_time",
            ..
        })
    ));

    // The console tail is bounded and cut on a character boundary.
    let console = format!("{}é{}", "a".repeat(10), "b".repeat(MAX_CONSOLE_BYTES - 1));
    store.set_last_console("vm1", &console).unwrap();
    let kept = store.get_vm("vm1").unwrap().last_console.unwrap();
    assert_eq!(kept, "b".repeat(MAX_CONSOLE_BYTES - 1));

    store.clear_process("vm1").unwrap();
    let vm = store.get_vm("vm1").unwrap();
    assert_eq!((vm.pid, vm.pid_start_time), (None, None));
    assert_eq!(vm.jail_dir, Some(PathBuf::from("/jail/vm1")));

    for missing in [
        store.set_state("nope", VmState::Running).err(),
        store.set_process("nope", 1, 1, Path::new("/j"), "n").err(),
        store.clear_process("nope").err(),
        store.destroy_vm("nope").err(),
        store.get_vm("nope").err(),
    ] {
        assert!(
            matches!(&missing, Some(StoreError::VmNotFound { id }) if id == "nope"),
            "{missing:?}"
        );
    }

    let events = store.events_since(0, 100).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["manifest_added", "created", "state"]);
    assert_eq!(events[1].vm_id.as_deref(), Some("vm1"));
    assert_eq!(events[1].detail["ip"], "10.9.0.2");
    assert_eq!(events[1].detail["mac"], mac.to_string());
    assert_eq!(
        events[2].detail,
        serde_json::json!({"from": "creating", "to": "running"})
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // Paging.
    let rest = store.events_since(events[0].seq, 1).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].seq, events[1].seq);

    let seq = store
        .record_event(Some("vm1"), "crashed", &serde_json::json!({"status": 139}))
        .unwrap();
    assert_eq!(store.events_since(seq - 1, 10).unwrap()[0].kind, "crashed");
}

#[test]
fn snapshots_belong_to_a_vm() {
    let tmp = TempDb::new();
    let mut store = Store::open(&tmp.path()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    store
        .create_vm_with_lease("vm1", "web", &Subnet::default())
        .unwrap();
    let id = store
        .add_snapshot("vm1", "full", Path::new("/s/vmstate"), Path::new("/s/mem"))
        .unwrap();
    let snaps = store.list_snapshots("vm1").unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, id);
    assert_eq!(snaps[0].mem_path, PathBuf::from("/s/mem"));
    assert!(matches!(
        store.add_snapshot("ghost", "full", Path::new("/a"), Path::new("/b")),
        Err(StoreError::VmNotFound { .. })
    ));
    store.destroy_vm("vm1").unwrap();
    assert!(store.list_snapshots("vm1").unwrap().is_empty());
}

#[test]
fn create_checks_its_inputs() {
    let tmp = TempDb::new();
    let mut store = Store::open(&tmp.path()).unwrap();
    let subnet = Subnet::default();
    assert!(matches!(
        store.create_vm_with_lease("vm1", "absent", &subnet),
        Err(StoreError::ManifestNotFound { name }) if name == "absent"
    ));
    store.add_manifest(&manifest("web")).unwrap();
    assert!(matches!(
        store.add_manifest(&manifest("web")),
        Err(StoreError::ManifestExists { name }) if name == "web"
    ));
    assert!(matches!(
        store.create_vm_with_lease("../etc", "web", &subnet),
        Err(StoreError::InvalidVmId { .. })
    ));
    store.create_vm_with_lease("vm1", "web", &subnet).unwrap();
    let err = store
        .create_vm_with_lease("vm1", "web", &subnet)
        .unwrap_err();
    assert!(matches!(&err, StoreError::VmExists { id } if id == "vm1"));
    assert_eq!(err.to_string(), "VM vm1 already exists");
    // Failed creates left nothing behind.
    assert_eq!(store.list_vms().unwrap().len(), 1);
    assert_eq!(store.list_leases().unwrap().len(), 1);
}

#[test]
fn foreign_keys_are_enforced() {
    let tmp = TempDb::new();
    let store = Store::open(&tmp.path()).unwrap();
    let err = store
        .conn
        .execute(
            "INSERT INTO leases (ip, vm_id) VALUES ('10.0.0.9', 'ghost')",
            [],
        )
        .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
}

#[test]
fn corrupt_rows_are_named() {
    let tmp = TempDb::new();
    let mut store = Store::open(&tmp.path()).unwrap();
    store.add_manifest(&manifest("web")).unwrap();
    store
        .create_vm_with_lease("vm1", "web", &Subnet::default())
        .unwrap();
    store
        .conn
        .execute("UPDATE vms SET mac = 'zz' WHERE id = 'vm1'", [])
        .unwrap();
    let err = store.get_vm("vm1").unwrap_err();
    assert!(
        err.to_string()
            .ends_with("VM vm1 has an invalid mac: \"zz\" is not a MAC address"),
        "{err}"
    );
    store
        .conn
        .execute("UPDATE manifests SET json = '{}' WHERE name = 'web'", [])
        .unwrap();
    assert!(matches!(
        store.get_manifest("web"),
        Err(StoreError::StoredManifest { name, .. }) if name == "web"
    ));
}
