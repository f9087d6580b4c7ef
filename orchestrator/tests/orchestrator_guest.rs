//! `orchestrator serve` with real guests (inside the KVM test host): concurrent creates with
//! distinct leases, exec, isolation, manifest delivery, destroy leaving no trace, and bad
//! manifests and bodies refused with field-level errors and nothing created.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator::client::Client;
use serde_json::{json, Value};
use tests::{require_genuine_kvm, Artifacts};

const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_orchestrator");
const JAILER: &str = env!("CARGO_BIN_EXE_jailer");

/// A daemon on its own state dir, socket, bridge and subnet; stopped and cleaned on drop.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    bridge: String,
    subnet_prefix: String,
    client: Client,
}

impl Daemon {
    fn start(name: &str, n: u8) -> Daemon {
        require_genuine_kvm();
        let dir = PathBuf::from(format!("/tmp/orch-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("o.sock");
        let bridge = format!("orcht{n}");
        let subnet_prefix = format!("172.29.{n}");
        let mut d = Daemon {
            child: None,
            client: Client::new(&sock).unwrap(),
            dir,
            sock,
            bridge,
            subnet_prefix,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(ORCHESTRATOR)
            .arg("--socket")
            .arg(&self.sock)
            .arg("serve")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--subnet", &format!("{}.0/24", self.subnet_prefix)])
            .args(["--bridge", &self.bridge])
            .args(["--jailer", JAILER])
            .arg("--vmm")
            .arg(common::vmm_binary())
            .args(["--ready-timeout-s", "240"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no control socket:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let a = self
            .client
            .request(
                method,
                path,
                body.as_deref().map(str::as_bytes),
                Duration::from_secs(600),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}\n{}", self.log()));
        (a.status, a.json())
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.call(method, path, body);
        assert!(
            (200..300).contains(&st),
            "{method} {path}: {st} {v}\n{}",
            self.log()
        );
        v
    }

    fn add_manifest(&self, m: &Value) {
        let a = self
            .client
            .request(
                "POST",
                "/v1/manifests",
                Some(m.to_string().as_bytes()),
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // Destroy what is left, so no VMM or netns outlives the test.
            if let Ok(a) = self
                .client
                .request("GET", "/v1/vms", None, Duration::from_secs(10))
            {
                for v in a.json().as_array().into_iter().flatten() {
                    let id = v["id"].as_str().unwrap_or_default();
                    let _ = self.client.request(
                        "DELETE",
                        &format!("/v1/vms/{id}"),
                        None,
                        Duration::from_secs(60),
                    );
                }
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!("--- daemon log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
fn four_concurrent_vms_get_distinct_leases_run_their_workload_and_leave_no_trace() {
    const N: usize = 4;
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
