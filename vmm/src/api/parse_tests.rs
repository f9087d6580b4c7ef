//! Unit tests for [`parse_request`]: routing, every body shape, and the errors a client
//! gets for each kind of mistake.

use std::path::PathBuf;

use super::*;
use crate::api::{EntropyBody, RateLimiter, SnapshotCreateParams, SnapshotType, TokenBucket};
use crate::config::{HugePages, MachineConfig};

fn ok(method: &str, path: &str, body: &str) -> VmmAction {
    parse_request(method, path, body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"))
}

fn err(method: &str, path: &str, body: &str) -> ApiError {
    match parse_request(method, path, body.as_bytes()) {
        Ok(a) => panic!("{method} {path} {body}: accepted as {a:?}"),
        Err(e) => e,
    }
}

/// Asserts a 400 whose message contains every needle.
fn bad(method: &str, path: &str, body: &str, needles: &[&str]) {
    let e = err(method, path, body);
    assert_eq!(e.status, 400, "{method} {path} {body}: {e}");
    for n in needles {
        assert!(e.message.contains(n), "{method} {path} {body}: {e}");
    }
}

#[test]
fn gets_route_and_ignore_the_body() {
    for (path, kind) in [
        ("/", "GetInstanceInfo"),
        ("/machine-config", "GetMachineConfig"),
        ("/machine-config/", "GetMachineConfig"),
        ("/vm/config", "GetVmConfig"),
        ("/metrics", "GetMetrics"),
    ] {
        assert_eq!(ok("GET", path, "").kind(), kind, "{path}");
        assert_eq!(ok("GET", path, "not json").kind(), kind, "{path}");
    }
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    for path in [
        "",
        "foo",
        "/foo",
        "//",
        "/drives",
        "/drives/",
        "/drives/a/b",
        "/network-interfaces",
        "/snapshot",
        "/snapshot/delete",
        "/vm/config/x",
        "/machine-config/x",
        "/Machine-Config",
        "/metrics?x=1",
    ] {
        let e = err("GET", path, "");
        assert_eq!(e.status, 404, "{path}: {e}");
        assert!(e.message.contains("no such endpoint"), "{path}: {e}");
        assert_eq!(allowed_methods(path), None, "{path}");
    }
    for (method, path, allow) in [
        ("PUT", "/", "GET"),
        ("GET", "/boot-source", "PUT"),
        ("DELETE", "/drives/rootfs", "PUT"),
        ("POST", "/actions", "PUT"),
        ("PUT", "/vm", "PATCH"),
        ("PATCH", "/machine-config", "GET or PUT"),
        ("get", "/", "GET"),
        ("HEAD", "/metrics", "GET"),
    ] {
        let e = err(method, path, "{}");
        assert_eq!(e.status, 405, "{method} {path}: {e}");
        assert!(e.message.contains(allow), "{method} {path}: {e}");
    }
    assert_eq!(
        allowed_methods("/machine-config"),
        Some(&["GET", "PUT"][..])
    );
}

#[test]
fn boot_source() {
    let a = ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"}"#,
    );
    let VmmAction::PutBootSource(b) = a else {
        panic!("{a:?}")
    };
    assert_eq!(b.kernel_image_path, PathBuf::from("/k"));
    assert_eq!(b.initrd_path, Some(PathBuf::from("/i")));
    assert_eq!(b.boot_args.as_deref(), Some("console=ttyS0"));
    bad(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": ""}"#,
        &["kernel_image_path", "empty"],
    );
    bad(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "initrd_path": ""}"#,
        &["initrd_path"],
    );
    bad(
        "PUT",
        "/boot-source",
        r#"{"boot_args": "x"}"#,
        &["missing field `kernel_image_path`"],
    );
}

#[test]
fn body_errors_name_the_problem() {
    // Syntax: serde's message with line and column.
    bad(
        "PUT",
        "/boot-source",
        "{\"kernel_image_path\": \"/k\",\n}",
        &["boot-source", "line 2", "column"],
    );
    bad("PUT", "/vsock", "nonsense", &["expected", "line 1 column"]);
    // Unknown field, named.
    bad(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
        &["unknown field `cpu_template`"],
    );
    // Wrong type.
    bad(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
        &["invalid type", "u16"],
    );
    bad(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 70000, "mem_size_mib": 128}"#,
        &["invalid value", "u16"],
    );
    // Not an object, even though serde would take an array for a struct.
    bad(
        "PUT",
        "/boot-source",
        r#"["/k"]"#,
        &["must be a JSON object"],
    );
    bad("PUT", "/boot-source", "42", &["must be a JSON object"]);
    // No body.
    bad("PUT", "/boot-source", "", &["needs a JSON object body"]);
    bad("PUT", "/actions", " \n", &["needs a JSON object body"]);
    // Trailing garbage.
    bad(
        "PATCH",
        "/vm",
        r#"{"state": "Paused"} {}"#,
        &["trailing characters"],
    );
    // Deep nesting is an error, not a stack overflow.
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    for body in [format!(r#"{{"rate_limiter": {deep}}}"#), deep.clone()] {
        let e = parse_request("PUT", "/entropy", body.as_bytes()).unwrap_err();
        assert_eq!(e.status, 400, "{}", e.message);
    }
}

#[test]
fn machine_config() {
    let a = ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "2M"}"#,
    );
    assert_eq!(
        a,
        VmmAction::PutMachineConfig(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: false,
            huge_pages: HugePages::Huge2M,
            thp: true,
        })
    );
    bad(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1}"#,
        &["missing field `mem_size_mib`"],
    );
}

#[test]
fn drives_and_interfaces_match_the_path_id() {
    let a = ok(
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true, "is_read_only": false}"#,
    );
    let VmmAction::PutDrive(d) = a else {
        panic!("{a:?}")
    };
    assert_eq!(
        (d.drive_id.as_str(), d.is_root_device, d.is_read_only),
        ("rootfs", true, false)
    );
    bad(
        "PUT",
        "/drives/data",
        r#"{"drive_id": "rootfs", "path_on_host": "/img"}"#,
        &["\"data\"", "\"rootfs\"", "drive_id"],
    );
    bad(
        "PUT",
        "/drives/x",
        r#"{"drive_id": "x", "path_on_host": ""}"#,
        &["path_on_host", "empty"],
    );
    let a = ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
    );
    assert_eq!(a.kind(), "PutNetworkInterface");
    bad(
        "PUT",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        &["iface_id", "\"eth1\""],
    );
    bad(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": ""}"#,
        &["host_dev_name"],
    );
    // A huge id is quoted back cut short.
    let long = "x".repeat(10_000);
    let e = err(
        "PUT",
        &format!("/drives/{long}"),
        r#"{"drive_id": "y", "path_on_host": "/img"}"#,
    );
    assert!(e.message.len() < 400, "{}", e.message.len());
}

#[test]
fn vsock_and_entropy() {
    let a = ok(
        "PUT",
        "/vsock",
        r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/run/v.sock"}"#,
    );
    assert_eq!(a.kind(), "PutVsock");
    bad(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 3, "uds_path": ""}"#,
        &["uds_path"],
    );
    for body in ["", "{}", " {} "] {
        assert_eq!(
            ok("PUT", "/entropy", body),
            VmmAction::PutEntropy(EntropyBody::default())
        );
    }
    let a = ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
    );
    assert_eq!(
        a,
        VmmAction::PutEntropy(EntropyBody {
            rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 1000,
                    one_time_burst: None,
                    refill_time: 100
                }),
                ops: None,
            })
        })
    );
    bad(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwith": {}}}"#,
        &["unknown field `bandwith`"],
    );
}

#[test]
fn actions_and_vm_state() {
    assert_eq!(
        ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        VmmAction::InstanceStart
    );
    assert_eq!(
        ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
        VmmAction::SendCtrlAltDel
    );
    bad(
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        &["unknown variant `FlushMetrics`", "InstanceStart"],
    );
    bad("PUT", "/actions", "{}", &["missing field `action_type`"]);
    assert_eq!(
        ok("PATCH", "/vm", r#"{"state": "Paused"}"#),
        VmmAction::Pause
    );
    assert_eq!(
        ok("PATCH", "/vm", r#"{"state": "Resumed"}"#),
        VmmAction::Resume
    );
    bad(
        "PATCH",
        "/vm",
        r#"{"state": "Running"}"#,
        &["unknown variant `Running`"],
    );
}

#[test]
fn snapshot_create() {
    assert_eq!(
        ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s/vm.state", "mem_file_path": "/s/vm.mem"}"#
        ),
        VmmAction::CreateSnapshot(SnapshotCreateParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: "/s/vm.state".into(),
            mem_file_path: "/s/vm.mem".into(),
        })
    );
    bad(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_type": "Diff", "snapshot_path": "/a", "mem_file_path": "/b"}"#,
        &["unknown variant `Diff`"],
    );
    bad(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/a", "mem_file_path": ""}"#,
        &["mem_file_path"],
    );
}

#[test]
fn snapshot_load() {
    let full = r#"{
        "snapshot_path": "/s/vm.state",
        "mem_backend": {"backend_type": "File", "backend_path": "/s/vm.mem"},
        "resume_vm": true,
        "enable_diff_snapshots": false,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/clone.img"}],
        "vsock_override": {"uds_path": "/run/v7.sock"}
    }"#;
    let a = ok("PUT", "/snapshot/load", full);
    let VmmAction::LoadSnapshot(p) = a else {
        panic!("{a:?}")
    };
    assert!(p.resume_vm);
    assert_eq!(p.mem_backend.backend_path, PathBuf::from("/s/vm.mem"));
    assert_eq!(p.network_overrides[0].host_dev_name, "tap7");
    assert_eq!(
        p.drive_overrides[0].path_on_host,
        PathBuf::from("/clone.img")
    );
    assert_eq!(
        p.vsock_override.map(|v| v.uds_path),
        Some(PathBuf::from("/run/v7.sock"))
    );
    // The legacy field becomes a File backend; resume_vm defaults to false.
    let a = ok(
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/a", "mem_file_path": "/b"}"#,
    );
    let VmmAction::LoadSnapshot(p) = a else {
        panic!("{a:?}")
    };
    assert_eq!(
        (
            p.mem_backend.backend_type,
            p.mem_backend.backend_path,
            p.resume_vm
        ),
        (MemBackendType::File, PathBuf::from("/b"), false)
    );
    for (body, needles) in [
        (
            r#"{"snapshot_path": "/a"}"#,
            &["mem_backend is required"][..],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "mem_backend": {"backend_type": "File", "backend_path": "/b"}}"#,
            &["not both"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
            &["unknown variant `Uffd`"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "enable_diff_snapshots": true}"#,
            &["not supported"],
        ),
        (
            r#"{"snapshot_path": "", "mem_file_path": "/b"}"#,
            &["snapshot_path", "empty"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "network_overrides": [{"iface_id": "e", "host_dev_name": "t"}, {"iface_id": "e", "host_dev_name": "u"}]}"#,
            &["twice"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "drive_overrides": [{"drive_id": "d", "path_on_host": ""}]}"#,
            &["drive_overrides.path_on_host"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "vsock_override": {"uds_path": ""}}"#,
            &["vsock_override.uds_path"],
        ),
        (
            r#"{"snapshot_path": "/a", "mem_file_path": "/b", "network_overrides": [{"iface_id": "e"}]}"#,
            &["missing field `host_dev_name`"],
        ),
    ] {
        bad("PUT", "/snapshot/load", body, needles);
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap stand-in for the fuzzer: every prefix of valid bodies, and junk bytes, on
    // every endpoint and method.
    let paths = [
        "/",
        "/boot-source",
        "/machine-config",
        "/drives/a",
        "/network-interfaces/a",
        "/vsock",
        "/entropy",
        "/actions",
        "/vm",
        "/vm/config",
        "/snapshot/create",
        "/snapshot/load",
        "/metrics",
        "/\u{e9}\u{0}",
    ];
    let bodies: [&[u8]; 5] = [
        br#"{"snapshot_path": "/a", "mem_backend": {"backend_type": "File", "backend_path": "/b"}}"#,
        br#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": true}"#,
        b"\xff\xfe{\"\xc3\x28\": 1}",
        b"{\"kernel_image_path\": \"\\ud800\"}",
        b"\0\0\0",
    ];
    for method in ["GET", "PUT", "PATCH", "POST", ""] {
        for path in paths {
            for body in bodies {
                for end in 0..=body.len() {
                    let _ = parse_request(method, path, &body[..end]);
                }
            }
        }
    }
}
