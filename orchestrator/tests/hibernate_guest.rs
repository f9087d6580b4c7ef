//! Hibernation, wake-on-demand and templates with real guests (inside the KVM test host):
//! a hibernate/wake round trip keeps memory, disk and a correct clock while the VMM is
//! gone; exec, the wake endpoint, idle hibernation and a host port forward wake it; 10
//! concurrent execs cause one restore; 20 VMs from one template (memory measured against 20
//! cold boots); kill -9 of the daemon at every hibernate and wake point loses nothing.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::{json, Value};
use tests::Artifacts;

/// A manifest whose workload answers each TCP connection on port 8080 with its hostname.
fn manifest(name: &str, rootfs: &Path, extra: Value) -> Value {
    let a = Artifacts::get();
    let mut m = json!({
        "schema": 1,
        "name": name,
        "kernel": a.vmlinux,
        "rootfs": {"path": rootfs, "read_only": false},
        "vcpus": 1,
        "memory_mib": 128,
        "entrypoint": "/bin/busybox",
        "args": ["nc", "-ll", "-p", "8080", "-e", "/bin/busybox", "hostname"],
        "network": {"enabled": true, "egress_allow": []}
    });
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    m
}

fn exec(d: &Daemon, id: &str, script: &str) -> String {
    let r = d.ok(
        "POST",
        &format!("/v1/vms/{id}/exec"),
        Some(json!({"argv": ["/bin/busybox", "sh", "-c", script]})),
    );
    assert_eq!(r["code"], 0, "exec {script:?} in {id}: {r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// How many times VM `id` was woken (its `woken` events).
fn wakes(d: &Daemon, id: &str) -> usize {
    d.ok("GET", "/v1/events?since=0", None)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "woken" && e["vm_id"] == id)
        .count()
}

fn alive(pid: &Value) -> bool {
    pid.as_u64()
        .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        / 1024
}

/// Sum of the proportional set size (shared pages split between sharers) of every `vmm`
/// process, MiB.
fn vmm_pss_mib() -> f64 {
    let mut kib = 0u64;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "vmm") {
            let s = std::fs::read_to_string(p.join("smaps_rollup")).unwrap_or_default();
            kib += s
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib as f64 / 1024.0
}

fn snapshot_dirs(d: &Daemon, id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.dir.join("state/vms").join(id))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("snap-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn host_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn connect_read(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let _ = s.write_all(b"\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn hibernate_and_wake_keep_memory_disk_and_clock_and_wake_on_demand() {
    let d = Daemon::start("hib", 18);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("h", &rootfs, json!({})));
    let port = 18080;
    let v = d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "h", "id": "vm-h1", "port_forward": {"host_port": port, "guest_port": 8080}})),
    );
    let pid = v["pid"].clone();
    assert!(alive(&pid), "{v}");
    exec(
        &d,
        "vm-h1",
        "echo 41 > /run/counter; echo disk-data > /root/persist; sync",
    );
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", pid))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let avail_before = mem_available_mib();

    // Hibernate: the VMM is gone, its memory freed; the netns and lease stay.
    let t = Instant::now();
    let h = d.ok("POST", "/v1/vms/vm-h1/hibernate", None);
    eprintln!("hibernate took {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(h["state"], "hibernated", "{h}");
    assert!(h["pid"].is_null(), "{h}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!alive(&pid), "the VMM (pid {pid}) still runs");
    assert!(!d.dir.join("state/jail/vmm/vm-h1").exists());
    assert!(Path::new("/run/netns/orch-vm-h1").exists());
    assert_eq!(snapshot_dirs(&d, "vm-h1").len(), 1);
    let avail_after = mem_available_mib();
    eprintln!(
        "hibernated: the VMM's RSS was {} MiB; MemAvailable {} -> {} MiB",
        rss_kib / 1024,
        avail_before,
        avail_after
    );
    assert_eq!(d.ok("GET", "/v1/vms/vm-h1", None)["ip"], v["ip"]);

    // Asleep for a while: the clock must be corrected on wake.
    std::thread::sleep(Duration::from_secs(8));
    let t = Instant::now();
    let out = exec(&d, "vm-h1", "cat /run/counter; cat /root/persist; date +%s");
    eprintln!("exec waking the VM took {:.2} s", t.elapsed().as_secs_f64());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["41", "disk-data"], "{out}");
    let guest_now: i64 = lines[2].parse().unwrap();
    let skew = (guest_now - host_now_s()).abs();
    assert!(skew <= 3, "guest clock off by {skew} s after wake ({out})");
    assert_eq!(wakes(&d, "vm-h1"), 1);
    let v2 = d.ok("GET", "/v1/vms/vm-h1", None);
    assert_eq!(v2["state"], "running");
    assert_ne!(v2["pid"], pid, "a new VMM");
    // The guest's network is back: the host reaches it through the lease.
    exec(&d, "vm-h1", "echo 42 > /run/counter");

    // 10 concurrent execs against a hibernated VM: one restore.
    d.ok("POST", "/v1/vms/vm-h1/hibernate", None);
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let c = orchestrator::client::Client::new(&sock).unwrap();
                let body = json!({"argv": ["/bin/busybox", "sh", "-c", format!("echo $(cat /run/counter)-{i}")]});
                let a = c
                    .request(
                        "POST",
                        "/v1/vms/vm-h1/exec",
                        Some(body.to_string().as_bytes()),
                        Duration::from_secs(600),
                    )
                    .unwrap();
                (a.status, a.json())
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (st, r) = h.join().unwrap();
        assert_eq!(st, 200, "{r}\n{}", d.log());
        assert_eq!(r["stdout"], format!("42-{i}\n"), "{r}");
    }
    assert_eq!(
        wakes(&d, "vm-h1"),
        2,
        "10 concurrent execs: exactly one more restore"
    );

    // The port forward wakes it on the first connection and passes the traffic through.
    d.ok("POST", "/v1/vms/vm-h1/hibernate", None);
    let t = Instant::now();
    let answer = connect_read(port);
    eprintln!(
        "forwarded connection waking the VM answered in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(answer.trim(), "vm-h1");
    assert_eq!(wakes(&d, "vm-h1"), 3);
    assert_eq!(connect_read(port).trim(), "vm-h1");
    assert_eq!(wakes(&d, "vm-h1"), 3, "a running VM is not restored again");

    // Wake endpoint; a second wake of a running VM does nothing.
    d.ok("POST", "/v1/vms/vm-h1/hibernate", None);
    assert_eq!(d.ok("POST", "/v1/vms/vm-h1/wake", None)["state"], "running");
    assert_eq!(d.ok("POST", "/v1/vms/vm-h1/wake", None)["state"], "running");
    assert_eq!(wakes(&d, "vm-h1"), 4);
    assert_eq!(exec(&d, "vm-h1", "cat /run/counter"), "42\n");

    // Idle hibernation from the manifest, then a wake by exec.
    d.add_manifest(&manifest("idle", &rootfs, json!({"idle_hibernate_s": 3})));
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "idle", "id": "vm-idle"})),
    );
    let t = Instant::now();
    loop {
        let s = d.ok("GET", "/v1/vms/vm-idle", None);
        if s["state"] == "hibernated" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "never hibernated: {s}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "idle VM hibernated after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(exec(&d, "vm-idle", "hostname"), "vm-idle\n");

    // Destroy: everything goes, the forward too.
    for id in ["vm-h1", "vm-idle"] {
        let (st, r) = d.call("DELETE", &format!("/v1/vms/{id}"), None);
        assert_eq!(st, 204, "{r}");
        assert!(!d.dir.join("state/vms").join(id).exists());
        assert!(!Path::new(&format!("/run/netns/orch-{id}")).exists());
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn twenty_vms_from_one_template_have_their_own_identity_and_share_memory() {
    const N: usize = 20;
    let d = Daemon::start("tpl", 19);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("t", &rootfs, json!({"template": true})));
    d.add_manifest(&manifest("cold", &rootfs, json!({})));

    let measure = |manifest: &str, prefix: &str| -> (Vec<Value>, f64, u64, Vec<f64>) {
        let avail = mem_available_mib();
        let mut vms = Vec::new();
        let mut times = Vec::new();
        for i in 0..N {
            let t = Instant::now();
            let v = d.ok(
                "POST",
                "/v1/vms",
                Some(json!({"manifest": manifest, "id": format!("{prefix}{i}")})),
            );
            times.push(t.elapsed().as_secs_f64());
            vms.push(v);
        }
        std::thread::sleep(Duration::from_secs(3));
        (
            vms,
            vmm_pss_mib(),
            avail.saturating_sub(mem_available_mib()),
            times,
        )
    };

    let (clones, clone_pss, clone_used, clone_times) = measure("t", "vm-c");
    // Each clone: its own address, hostname and state.
    let mut ips: Vec<String> = clones.iter().map(|v| v["ip"].to_string()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N);
    for v in &clones {
        let id = v["id"].as_str().unwrap();
        exec(&d, id, &format!("echo {id} > /run/me"));
    }
    for v in &clones {
        let id = v["id"].as_str().unwrap();
        let out = exec(
            &d,
            id,
            "hostname; cat /run/me; cat /run/manifest.json | busybox wc -c; date +%s",
        );
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l[0], id, "{out}");
        assert_eq!(l[1], id, "{out}");
        assert!(l[2].trim().parse::<u64>().unwrap() > 100, "{out}");
        let skew = (l[3].parse::<i64>().unwrap() - host_now_s()).abs();
        assert!(skew <= 3, "{id}: clock off by {skew} s");
    }
    // Their RNGs differ after the reseed.
    let a = exec(&d, "vm-c0", "busybox od -An -tx1 -N16 /dev/urandom");
    let b = exec(&d, "vm-c1", "busybox od -An -tx1 -N16 /dev/urandom");
    assert_ne!(a, b);
    // The workload runs in each: the forwarded-style service answers from the host side.
    let ip0 = clones[0]["ip"].as_str().unwrap().to_string();
    let mut s = std::net::TcpStream::connect((ip0.as_str(), 8080)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(out.trim(), "vm-c0");
    for v in &clones {
        let (st, r) = d.call(
            "DELETE",
            &format!("/v1/vms/{}", v["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(st, 204, "{r}");
    }

    let (_cold, cold_pss, cold_used, cold_times) = measure("cold", "vm-b");
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each clone's writable disk is a copy of the template's (reflinked where the
    // filesystem can; the test host's tmpfs cannot, so this is a sparse copy).
    let mut copy_ms: Vec<u64> = d
        .log()
        .lines()
        .filter(|l| l.contains("disk copied from") && l.contains("/templates/"))
        .filter_map(|l| l.rsplit(" in ").next()?.strip_suffix(" ms")?.parse().ok())
        .collect();
    copy_ms.sort_unstable();
    assert_eq!(copy_ms.len(), N, "one disk copy per clone");
    eprintln!(
        "clone disk copies (cp --reflink=auto of a 64 MiB sparse image): median {} ms, max {} ms",
        copy_ms[N / 2],
        copy_ms[N - 1]
    );
    // The jailer copies the vmm binary into each jail (a tmpfs here): part of each drop.
    let vmm_mib = std::fs::metadata(common::vmm_binary()).unwrap().len() / (1 << 20);
    eprintln!("each MemAvailable drop includes {N} jail copies of the {vmm_mib} MiB vmm binary");
    eprintln!(
        "{N} template clones: VMM Pss total {clone_pss:.1} MiB, MemAvailable drop {clone_used} MiB, \
         create median {:.2} s (first, with the template build, {:.2} s)",
        med(&clone_times[1..]),
        clone_times[0]
    );
    eprintln!(
        "{N} cold-booted VMs: VMM Pss total {cold_pss:.1} MiB, MemAvailable drop {cold_used} MiB, \
         create median {:.2} s",
        med(&cold_times)
    );
    assert!(
        clone_pss < cold_pss,
        "clones share the template's pages: {clone_pss:.1} vs {cold_pss:.1} MiB"
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn daemon_killed_during_hibernate_and_wake_loses_nothing() {
    let mut d = Daemon::start("hkill", 20);
    let rootfs = d.dir.join("rootfs.ext4");
    std::fs::copy(Artifacts::get().rootfs, &rootfs).unwrap();
    d.add_manifest(&manifest("k", &rootfs, json!({})));
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"manifest": "k", "id": "vm-hk"})),
    );
    exec(&d, "vm-hk", "echo 0 > /run/counter");
    let points: Vec<&str> = orchestrator::daemon::vm::KILL_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("hibernate:") || p.starts_with("wake:"))
        .collect();
    assert!(
        points
            .iter()
            .filter(|p| p.starts_with("hibernate:"))
            .count()
            >= 5
    );
    assert!(points.iter().filter(|p| p.starts_with("wake:")).count() >= 5);
    for (i, point) in points.iter().enumerate() {
        let state = d.ok("GET", "/v1/vms/vm-hk", None)["state"].clone();
        if point.starts_with("wake:") && state == "running" {
            d.ok("POST", "/v1/vms/vm-hk/hibernate", None);
        }
        if point.starts_with("hibernate:") && state == "hibernated" {
            d.ok("POST", "/v1/vms/vm-hk/wake", None);
        }
        d.restart(Some(point));
        let path = if point.starts_with("hibernate:") {
            "/v1/vms/vm-hk/hibernate"
        } else {
            "/v1/vms/vm-hk/wake"
        };
        let r = d
            .client
            .request("POST", path, None, Duration::from_secs(600));
        assert!(r.is_err(), "{point}: the daemon answered: {r:?}");
        d.wait_killed();
        d.restart(None);
        let v = d.ok("GET", "/v1/vms/vm-hk", None);
        let state = v["state"].as_str().unwrap().to_string();
        assert!(state == "running" || state == "hibernated", "{point}: {v}");
        // Never a half-written snapshot: no `.tmp`, at most the one the row names.
        let snaps = snapshot_dirs(&d, "vm-hk");
        assert!(
            snaps.iter().all(|s| !s.ends_with(".tmp")),
            "{point}: {snaps:?}"
        );
        assert!(snaps.len() <= 1, "{point}: {snaps:?}");
        if state == "hibernated" {
            assert_eq!(snaps.len(), 1, "{point}: hibernated without its snapshot");
            let vmms = Command::new("ps").args(["-eo", "comm"]).output().unwrap();
            assert!(
                !String::from_utf8_lossy(&vmms.stdout)
                    .lines()
                    .any(|l| l.trim() == "vmm"),
                "{point}: a VMM is left for a hibernated VM"
            );
        }
        // The VM works (waking it if needed) and its memory went on from where it was.
        let out = exec(
            &d,
            "vm-hk",
            &format!("cat /run/counter; echo {} > /run/counter", i + 1),
        );
        assert_eq!(out.trim(), i.to_string(), "{point}: {out}");
        eprintln!("killed at {point}: after restart {state}, then working");
    }
    let (st, r) = d.call("DELETE", "/v1/vms/vm-hk", None);
    assert_eq!(st, 204, "{r}");
}
