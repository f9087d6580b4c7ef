//! `orchestrator serve` with real guests (inside the KVM test host): concurrent creates with
//! distinct leases, exec, isolation, manifest delivery, destroy leaving no trace, and bad
//! manifests and bodies refused with field-level errors and nothing created.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use orchestrator::client::Client;
use serde_json::{json, Value};
use tests::Artifacts;

const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_orchestrator");

fn manifest(name: &str, rootfs_copy: &Path) -> Value {
    let a = Artifacts::get();
    json!({
        "schema": 1,
        "name": name,
        "kernel": a.vmlinux,
        "rootfs": {"path": rootfs_copy, "read_only": false},
        "vcpus": 1,
        "memory_mib": 128,
        "entrypoint": "/bin/busybox",
        "args": ["sh", "-c", "echo workload-started-$VM_ROLE; exec busybox sleep 100000"],
        "env": {"VM_ROLE": "tester"},
        "network": {"enabled": true, "egress_allow": []}
    })
}

fn lines(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn eight_concurrent_vms_get_distinct_leases_run_their_workload_and_leave_no_trace() {
    const N: usize = 8;
    let d = Daemon::start("four", 11);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("web", &rootfs));

    let started = Instant::now();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let c = Client::new(&sock).unwrap();
                let body = json!({"manifest": "web", "id": format!("vm-t{i}")}).to_string();
                let a = c
                    .request(
                        "POST",
                        "/v1/vms",
                        Some(body.as_bytes()),
                        Duration::from_secs(900),
                    )
                    .unwrap();
                (a.status, a.json())
            })
        })
        .collect();
    let created: Vec<Value> = handles
        .into_iter()
        .map(|h| {
            let (st, v) = h.join().unwrap();
            assert_eq!(st, 201, "create: {v}\n{}", d.log());
            v
        })
        .collect();
    eprintln!(
        "{N} VMs running after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut ips: Vec<&str> = created.iter().map(|v| v["ip"].as_str().unwrap()).collect();
    let mut macs: Vec<&str> = created.iter().map(|v| v["mac"].as_str().unwrap()).collect();
    ips.sort_unstable();
    ips.dedup();
    macs.sort_unstable();
    macs.dedup();
    assert_eq!((ips.len(), macs.len()), (N, N), "{created:?}");
    let gateway = format!("{}.1", d.subnet_prefix);
    for v in &created {
        assert_eq!(v["state"], "running", "{v}");
        assert!(v["ip"].as_str().unwrap().starts_with(&d.subnet_prefix));
    }

    for (i, v) in created.iter().enumerate() {
        let id = v["id"].as_str().unwrap();
        // The manifest reached guest-init: hostname, the file, and the workload's output.
        let r = d.ok(
            "POST",
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"argv": ["/bin/busybox", "sh", "-c", "busybox hostname; busybox grep -c '\"web\"' /run/manifest.json"]})),
        );
        assert_eq!(r["code"], 0, "{r}");
        assert_eq!(r["stdout"], format!("{id}\n1\n"), "{r}");
        let logs = d.ok("GET", &format!("/v1/vms/{id}/logs"), None);
        assert!(
            logs["workload"]
                .as_str()
                .unwrap_or("")
                .contains("workload-started-tester"),
            "{logs}"
        );
        // The host bridge answers; another VM's address does not (isolation).
        let other = created[(i + 1) % N]["ip"].as_str().unwrap();
        let script = format!(
            "busybox ping -c 1 -W 5 {gateway} >/dev/null && echo gw-ok; \
             busybox ping -c 1 -W 2 {other} >/dev/null && echo other-reached || echo other-blocked"
        );
        let r = d.ok(
            "POST",
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"argv": ["/bin/busybox", "sh", "-c", script], "timeout_ms": 60000})),
        );
        assert_eq!(r["stdout"], "gw-ok\nother-blocked\n", "{id}: {r}");
    }
    let list = d.ok("GET", "/v1/vms", None);
    assert_eq!(list.as_array().unwrap().len(), N);
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], N as u64, "{info}");

    // Destroy: no VMM, netns, veth, jail directory or lease left.
    for v in &created {
        let id = v["id"].as_str().unwrap();
        let (st, body) = d.call("DELETE", &format!("/v1/vms/{id}"), None);
        assert_eq!(st, 204, "{body}");
        let (st, _) = d.call("GET", &format!("/v1/vms/{id}"), None);
        assert_eq!(st, 404);
    }
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], 0, "{info}");
    let netns = lines("ip", &["netns", "list"]);
    assert!(!netns.contains("orch-vm-t"), "netns left: {netns}");
    let links = lines("ip", &["-o", "link"]);
    assert!(!links.contains(": ov"), "veth left: {links}");
    let jails = std::fs::read_dir(d.dir.join("state/jail/vmm"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(jails, 0, "jail directories left");
    let vm_dirs = std::fs::read_dir(d.dir.join("state/vms")).map_or(0, |r| r.count());
    assert_eq!(vm_dirs, 0, "per-VM directories left");
    let procs = lines("ps", &["-eo", "args"]);
    assert!(
        !procs.lines().any(|l| l.starts_with("/vmm ")),
        "VMM left: {procs}"
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn bad_manifests_and_bodies_get_field_errors_and_create_nothing() {
    let d = Daemon::start("bad", 12);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    let good = manifest("ok", &rootfs);

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("entrypoint");
    let mut wrong_type = good.clone();
    wrong_type["vcpus"] = json!("two");
    let mut big = good.clone();
    big["env"] = json!({"X": "y".repeat(2 << 20)});
    let mut unknown_kernel = good.clone();
    unknown_kernel["name"] = json!("nokernel");
    unknown_kernel["kernel"] = json!("/nonexistent/vmlinux");
    for (m, field) in [(&missing, "entrypoint"), (&wrong_type, "vcpus"), (&big, "")] {
        let a = d
            .client
            .request(
                "POST",
                "/v1/manifests",
                Some(m.to_string().as_bytes()),
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(
            a.status == 400 || a.status == 413,
            "{field}: {} {}",
            a.status,
            a.body
        );
        if !field.is_empty() {
            assert!(a.body.contains(field), "{}", a.body);
        }
    }
    // A kernel that does not exist is refused at create time, before any lease.
    d.add_manifest(&unknown_kernel);
    let (st, v) = d.call("POST", "/v1/vms", Some(json!({"manifest": "nokernel"})));
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("kernel"), "{v}");
    // Bad bodies.
    for (body, needle) in [
        (json!({"manifest": 7}), "manifest"),
        (json!({"manifest": "nokernel", "extra": 1}), "extra"),
        (json!({"manifest": "missing"}), "missing"),
        (json!({"manifest": "nokernel", "id": "bad id!"}), "id"),
    ] {
        let (st, v) = d.call("POST", "/v1/vms", Some(body.clone()));
        assert!((400..500).contains(&st), "{body}: {st} {v}");
        assert!(v.to_string().contains(needle), "{body}: {v}");
    }
    let (st, v) = d.call("POST", "/v1/vms/none/exec", Some(json!({"argv": []})));
    assert_eq!(st, 400, "{v}");
    let list = d.ok("GET", "/v1/vms", None);
    assert_eq!(list, json!([]), "nothing was created");
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], 0);
    let netns = lines("ip", &["netns", "list"]);
    assert!(!netns.contains("orch-"), "{netns}");
}

/// The host agrees with the database: each VM left is running with a live VMM that answers
/// an exec; netns, jail and per-VM directories, leases and VMM processes match the VM list
/// exactly.
fn assert_consistent(d: &Daemon, what: &str) -> Vec<String> {
    let list = d.ok("GET", "/v1/vms", None);
    let vms: Vec<&Value> = list.as_array().unwrap().iter().collect();
    let mut ids: Vec<String> = Vec::new();
    for v in &vms {
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(v["state"], "running", "{what}: {v}");
        let r = d.ok(
            "POST",
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"argv": ["/bin/busybox", "echo", "alive"]})),
        );
        assert_eq!(r["stdout"], "alive\n", "{what}: {r}");
        ids.push(id);
    }
    ids.sort();
    let mut netns: Vec<String> = lines("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|n| n.strip_prefix("orch-"))
        .map(String::from)
        .collect();
    netns.sort();
    assert_eq!(netns, ids, "{what}: netns");
    for dir in ["state/jail/vmm", "state/vms"] {
        let mut found: Vec<String> = std::fs::read_dir(d.dir.join(dir))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        assert_eq!(found, ids, "{what}: {dir}");
    }
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], ids.len() as u64, "{what}: {info}");
    let vmms = lines("ps", &["-eo", "comm"])
        .lines()
        .filter(|l| l.trim() == "vmm")
        .count();
    assert_eq!(vmms, ids.len(), "{what}: VMM processes");
    ids
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn daemon_killed_at_each_point_of_create_and_destroy_is_reconciled_on_restart() {
    let mut d = Daemon::start("kill", 13);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("k", &rootfs));
    // Create's and destroy's points (hibernate's and wake's: tests/hibernate_guest.rs).
    let points: Vec<&str> = orchestrator::daemon::vm::KILL_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("create:") || p.starts_with("destroy:"))
        .collect();
    assert!(points.len() >= 10);
    // A VM that lives through every kill: re-adopted each time, same VMM process.
    let keep = d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "k", "id": "vm-keep"})),
    );
    let keep_pid = keep["pid"].clone();
    for (i, point) in points.iter().enumerate() {
        let id = format!("vm-k{i}");
        d.restart(Some(point));
        let body = json!({"manifest": "k", "id": id}).to_string();
        let create = d.client.request(
            "POST",
            "/v1/vms",
            Some(body.as_bytes()),
            Duration::from_secs(600),
        );
        if point.starts_with("create:") {
            assert!(create.is_err(), "{point}: the daemon answered: {create:?}");
        } else {
            assert_eq!(create.unwrap().status, 201, "{point}\n{}", d.log());
            let destroy = d.client.request(
                "DELETE",
                &format!("/v1/vms/{id}"),
                None,
                Duration::from_secs(120),
            );
            assert!(
                destroy.is_err(),
                "{point}: the daemon answered: {destroy:?}"
            );
        }
        d.wait_killed();
        d.restart(None);
        let left = assert_consistent(&d, point);
        eprintln!("killed at {point}: after restart {left:?} (re-adopted), the rest cleaned");
        assert!(left.iter().any(|id| id == "vm-keep"), "{point}: {left:?}");
        let again = d.ok("GET", "/v1/vms/vm-keep", None);
        assert_eq!(again["pid"], keep_pid, "{point}: vm-keep's VMM changed");
        for id in left.iter().filter(|id| *id != "vm-keep") {
            let (st, v) = d.call("DELETE", &format!("/v1/vms/{id}"), None);
            assert_eq!(st, 204, "{v}");
        }
        assert_eq!(assert_consistent(&d, point), ["vm-keep"]);
    }
    let (st, v) = d.call("DELETE", "/v1/vms/vm-keep", None);
    assert_eq!(st, 204, "{v}");
    assert!(assert_consistent(&d, "the end").is_empty());
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn a_vmm_that_dies_is_marked_crashed_with_its_console_and_its_pieces_reclaimed() {
    let d = Daemon::start("crash", 14);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("c", &rootfs));
    let v = d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "c", "id": "vm-crash"})),
    );
    let pid = v["pid"].as_i64().unwrap();
    // SAFETY: killing the VMM the daemon started, as a crash would.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    let start = Instant::now();
    let v = loop {
        let v = d.ok("GET", "/v1/vms/vm-crash", None);
        if v["state"] == "crashed" {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not noticed: {v}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["pid"], Value::Null, "{v}");
    let console = v["last_console"].as_str().unwrap_or("");
    assert!(console.contains("guest-init"), "no console kept: {v}");
    let events = d.ok("GET", "/v1/events", None);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["vm_id"] == "vm-crash" && e["detail"]["to"] == "crashed"),
        "{events}"
    );
    // Its host pieces are gone; the row and the lease stay until destroy.
    let netns = lines("ip", &["netns", "list"]);
    assert!(!netns.contains("orch-vm-crash"), "{netns}");
    assert!(!d.dir.join("state/jail/vmm/vm-crash").exists());
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], 1, "{info}");
    let (st, body) = d.call(
        "POST",
        "/v1/vms/vm-crash/exec",
        Some(json!({"argv": ["true"]})),
    );
    assert_eq!(st, 409, "exec on a crashed VM: {body}");
    let (st, _) = d.call("DELETE", "/v1/vms/vm-crash", None);
    assert_eq!(st, 204);
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], 0, "{info}");

    // A stop is no crash: `stopped`, with the network and lease kept until destroy.
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "c", "id": "vm-stop"})),
    );
    let v = d.ok("POST", "/v1/vms/vm-stop/stop", None);
    assert_eq!(v["state"], "stopped", "{v}");
    std::thread::sleep(Duration::from_secs(2));
    let v = d.ok("GET", "/v1/vms/vm-stop", None);
    assert_eq!(
        v["state"], "stopped",
        "the exit watcher took it for a crash: {v}"
    );
    assert!(lines("ip", &["netns", "list"]).contains("orch-vm-stop"));
    let info = d.ok("GET", "/v1", None);
    assert_eq!(info["leases"]["used"], 1, "{info}");
    let (st, _) = d.call("DELETE", "/v1/vms/vm-stop", None);
    assert_eq!(st, 204);
    assert!(!lines("ip", &["netns", "list"]).contains("orch-vm-stop"));
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn streaming_exec_delivers_output_as_it_is_written() {
    let d = Daemon::start("stream", 15);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("s", &rootfs));
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "s", "id": "vm-stream"})),
    );
    let script = "echo one; busybox sleep 2; echo two; echo err >&2; exit 7";
    let body = json!({"argv": ["/bin/busybox", "sh", "-c", script]}).to_string();
    let started = Instant::now();
    let mut splitter = orchestrator::client::LineSplitter::default();
    let mut lines: Vec<(Duration, Value)> = Vec::new();
    let status = d
        .client
        .request_streaming(
            "POST",
            "/v1/vms/vm-stream/exec?stream=true",
            Some(body.as_bytes()),
            Duration::from_secs(120),
            |chunk| {
                splitter.push(chunk, |line| {
                    let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                        panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(line))
                    });
                    lines.push((started.elapsed(), v));
                });
                true
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_eq!(status, 200, "{lines:?}");
    assert!(
        splitter.rest().is_empty(),
        "a line without its newline: {:?}",
        String::from_utf8_lossy(splitter.rest())
    );
    eprintln!("streamed: {lines:?}");
    let (first_at, first) = &lines[0];
    assert_eq!(first, &json!({"stdout": "one\n"}), "{lines:?}");
    let (exit_at, exit) = lines.last().unwrap();
    assert_eq!(
        exit,
        &json!({"exit": {"code": 7, "signal": null, "timed_out": false}}),
        "{lines:?}"
    );
    assert!(
        *exit_at - *first_at >= Duration::from_secs(1),
        "the first line came with the rest: {lines:?}"
    );
    let text = |key: &str| -> String {
        lines
            .iter()
            .filter_map(|(_, v)| v[key].as_str())
            .collect::<String>()
    };
    assert_eq!(text("stdout"), "one\ntwo\n", "{lines:?}");
    assert_eq!(text("stderr"), "err\n", "{lines:?}");

    // The CLI streams it too and exits with the command's code.
    let out = Command::new(ORCHESTRATOR)
        .arg("--socket")
        .arg(&d.sock)
        .args([
            "vms",
            "exec",
            "vm-stream",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let (st, v) = d.call("DELETE", "/v1/vms/vm-stream", None);
    assert_eq!(st, 204, "{v}");
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn a_manifest_over_64_kib_reaches_the_guest_whole() {
    let d = Daemon::start("bigman", 16);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    let mut m = manifest("big", &rootfs);
    // One 70 KiB variable (an env entry may hold up to 128 KiB - 1, KEY=VALUE), varied
    // text, plus a few small ones; the workload prints the big one's length.
    let big: String = (0..70 * 1024)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    m["env"] = json!({"VM_ROLE": "tester", "BIG": big, "SMALL_1": "1", "SMALL_2": "two"});
    m["args"] = json!([
        "sh",
        "-c",
        "echo workload-big-${#BIG}; exec busybox sleep 100000"
    ]);
    d.add_manifest(&m);
    let rec = d.ok("GET", "/v1/manifests/big", None);
    let canonical = orchestrator::manifest::Manifest::parse(rec["manifest"].to_string().as_bytes())
        .unwrap()
        .canonical_json();
    assert!(canonical.len() > 64 * 1024, "{}", canonical.len());
    let hash = rec["hash"].as_str().unwrap().to_string();
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "big", "id": "vm-big"})),
    );
    let r = d.ok(
        "POST",
        "/v1/vms/vm-big/exec",
        Some(json!({"argv": ["/bin/busybox", "sh", "-c",
            "busybox wc -c < /run/manifest.json; busybox sha256sum /run/manifest.json"]})),
    );
    assert_eq!(r["code"], 0, "{r}");
    let out = r["stdout"].as_str().unwrap();
    let mut words = out.split_whitespace();
    assert_eq!(
        words.next().and_then(|n| n.parse::<usize>().ok()),
        Some(canonical.len()),
        "{r}"
    );
    assert_eq!(words.next(), Some(hash.as_str()), "{r}");
    // The workload got the variable whole.
    let start = Instant::now();
    loop {
        let logs = d.ok("GET", "/v1/vms/vm-big/logs", None);
        let w = logs["workload"].as_str().unwrap_or("");
        if w.contains(&format!("workload-big-{}", 70 * 1024)) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{logs}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (st, v) = d.call("DELETE", "/v1/vms/vm-big", None);
    assert_eq!(st, 204, "{v}");
}
