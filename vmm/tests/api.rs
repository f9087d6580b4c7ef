//! The `vmm` binary driven over its API socket (`--api-sock`).
//!
//! Host tests (any machine): a VMM started with only `--api-sock` is configured over the
//! socket; bad values come back as 400 naming the field or file, actions that need a
//! running VM as 409, and SIGTERM ends it. One of them starts a VM with a file that is not a
//! kernel, which needs /dev/kvm (kvm-pvm will do) and fails, saying so, without one.
//!
//! Real-guest tests (ignored here; run inside the KVM test host): pause and resume of a
//! guest counting on its console, metrics after boot, and configuration refused after
//! start.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tests::{require_genuine_kvm, Artifacts};

mod common;

// ---- a raw HTTP/1.1 client (a test client, not a parser) -------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self:?}"))
    }

    /// Asserts `status` and a `fault_message` containing each needle; returns the message.
    fn fault(&self, status: u16, needles: &[&str]) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let msg = self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_string();
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in {msg:?}");
        }
        msg
    }

    fn no_content(&self) {
        assert_eq!(self.status, 204, "{self:?}");
    }
}

fn http(sock: &Path, method: &str, path: &str, body: Option<&Json>) -> Reply {
    let body = body.map(Json::to_string);
    let (status, body) = common::api_request(sock, method, path, body.as_deref());
    Reply { status, body }
}

// ---- a vmm process ------------------------------------------------------------------------

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-apitest-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `vmm --api-sock`, killed if the test ends early.
struct Vmm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    /// Starts `vmm --api-sock DIR/api.sock ARGS...` and waits for the socket.
    fn start(name: &str, args: &[&str]) -> Vmm {
        let dir = temp_dir(name);
        let sock = dir.join("api.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("--api-sock").arg(&sock).args(args);
        let (mut cmd, _jail) = tests::jail::maybe_jailed(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut vmm = Vmm { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&vmm.sock).is_err() {
            if let Some(status) = vmm.child.try_wait().unwrap() {
                panic!("vmm exited ({status}) before serving:\n{}", vmm.output());
            }
            assert!(
                Instant::now() < deadline,
                "no API socket:\n{}",
                vmm.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    fn get(&self, path: &str) -> Reply {
        http(&self.sock, "GET", path, None)
    }

    fn put(&self, path: &str, body: Json) -> Reply {
        http(&self.sock, "PUT", path, Some(&body))
    }

    fn patch_vm(&self, state: &str) -> Reply {
        http(&self.sock, "PATCH", "/vm", Some(&json!({ "state": state })))
    }

    fn state(&self) -> String {
        let r = self.get("/");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["state"].as_str().unwrap().to_string()
    }

    /// The VMM's stdout and stderr so far.
    fn output(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- stdout\n{}--- stderr\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// Sends SIGTERM and waits (at most 20 s) for the VMM to exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait(Duration::from_secs(20))
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = self.output();
                assert!(!out.contains("panicked"), "{out}");
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vmm still running after {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("{}", self.output());
            }
        }
    }
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---- host tests -------------------------------------------------------------------------

#[test]
fn configured_over_the_api_with_errors_naming_the_field() {
    let mut vmm = Vmm::start("configure", &["--console", "none"]);
    let info = vmm.get("/").json();
    assert_eq!(info["state"], "Not started", "{info}");
    assert_eq!(info["app_name"], "vmm");
    assert_eq!(vmm.get("/machine-config").json()["vcpu_count"], 1);

    // machine-config: checked as it arrives.
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 0, "mem_size_mib": 128}),
    )
    .fault(400, &["machine-config.vcpu_count", "out of range"]);
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 1u64 << 40}),
    )
    .fault(400, &["machine-config.mem_size_mib"]);
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256}),
    )
    .no_content();
    let m = vmm.get("/machine-config").json();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(256))
    );

    // boot-source: missing files are named.
    vmm.put(
        "/boot-source",
        json!({"kernel_image_path": "/nonexistent/vmlinux"}),
    )
    .fault(
        400,
        &["boot-source.kernel_image_path", "/nonexistent/vmlinux"],
    );
    let kernel = file(&vmm.dir, "not-a-kernel", &[0x42; 4096]);
    vmm.put(
        "/boot-source",
        json!({"kernel_image_path": kernel, "initrd_path": "/nonexistent/initrd.cpio"}),
    )
    .fault(
        400,
        &["boot-source.initrd_path", "/nonexistent/initrd.cpio"],
    );
    vmm.put(
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "x".repeat(3000)}),
    )
    .fault(400, &["boot-source.boot_args", "3000 bytes"]);

    // Devices.
    vmm.put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": "/nonexistent/disk.img"}),
    )
    .fault(400, &["drives.path_on_host", "/nonexistent/disk.img"]);
    let disk = file(&vmm.dir, "disk.img", &[0; 1 << 20]);
    let drive = |id: &str, root: bool| json!({"drive_id": id, "path_on_host": disk, "is_root_device": root});
    vmm.put("/drives/root", drive("root", true)).no_content();
    vmm.put("/drives/data", drive("data", false)).no_content();
    vmm.put("/drives/data", drive("data", true))
        .fault(400, &["more than one root"]);
    vmm.put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}),
    )
    .fault(400, &["guest_mac", "multicast"]);
    vmm.put("/vsock", json!({"guest_cid": 2, "uds_path": "/tmp/v.sock"}))
        .fault(400, &["vsock.guest_cid"]);
    vmm.put(
        "/entropy",
        json!({"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}),
    )
    .fault(400, &["entropy.rate_limiter"]);
    vmm.put("/entropy", json!({})).no_content();

    // The whole configuration, as set.
    let cfg = vmm.get("/vm/config").json();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2, "{cfg}");
    let ids: Vec<&str> = cfg["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["drive_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["root", "data"], "{cfg}");
    assert_eq!(
        cfg["drives"][1]["is_root_device"], false,
        "the refused PUT changed nothing"
    );
    assert!(cfg.get("vsock").is_none(), "{cfg}");

    // Actions that need a started VM.
    vmm.patch_vm("Paused").fault(409, &["Pause", "not started"]);
    vmm.patch_vm("Resumed")
        .fault(409, &["Resume", "not started"]);
    vmm.put("/actions", json!({"action_type": "SendCtrlAltDel"}))
        .fault(409, &["not started"]);
    vmm.put(
        "/snapshot/create",
        json!({"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}),
    )
    .fault(409, &["CreateSnapshot", "not started"]);
    // A load that cannot work is refused before anything is built, naming the file.
    vmm.put(
        "/snapshot/load",
        json!({"snapshot_path": "/nonexistent/vmstate", "mem_file_path": "/tmp/m"}),
    )
    .fault(
        400,
        &["LoadSnapshot", "/nonexistent/vmstate", "cannot open"],
    );
    // No boot source yet: InstanceStart says what is missing.
    vmm.put("/actions", json!({"action_type": "InstanceStart"}))
        .fault(400, &["boot-source.kernel_image_path", "no kernel given"]);
    assert_eq!(vmm.state(), "Not started");

    let metrics = vmm.get("/metrics").json();
    assert_eq!(metrics["state"], "Not started", "{metrics}");
    assert!(metrics["boot_ready_ms"].is_null(), "{metrics}");
    assert!(
        metrics["api"]["requests"].as_u64().unwrap() > 20,
        "{metrics}"
    );
    assert!(metrics["uptime_ms"].as_u64().is_some(), "{metrics}");

    // SIGTERM ends a VMM that never started a VM; the socket goes with it.
    let status = vmm.terminate();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vmm.output());
    assert!(
        vmm.output().contains("stopped by signal 15"),
        "{}",
        vmm.output()
    );
    assert!(!vmm.sock.exists(), "the API socket outlived the VMM");
}

#[test]
fn failed_instance_start_leaves_the_vmm_ready_for_another_try() {
    // Builds a VM on /dev/kvm (kvm-pvm will do) before finding the kernel unusable.
    let mut vmm = Vmm::start("failed-start", &["--console", "none"]);
    let junk = file(&vmm.dir, "junk-kernel", &[0x42; 4096]);
    let disk = file(&vmm.dir, "disk.img", &[0; 1 << 20]);
    vmm.put("/boot-source", json!({"kernel_image_path": junk}))
        .no_content();
    vmm.put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk}),
    )
    .no_content();
    for _ in 0..2 {
        vmm.put("/actions", json!({"action_type": "InstanceStart"}))
            .fault(400, &["InstanceStart", "junk-kernel", "is not a kernel"]);
        assert_eq!(vmm.state(), "Not started");
    }
    // Still configurable.
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    )
    .no_content();
    assert_eq!(
        vmm.terminate().code(),
        Some(128 + libc::SIGTERM),
        "{}",
        vmm.output()
    );
}

#[test]
fn api_socket_in_use_is_refused() {
    let vmm = Vmm::start("in-use", &["--console", "none"]);
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--api-sock")
        .arg(&vmm.sock)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vmm: error:") && stderr.contains("api.sock") && stderr.contains("in use"),
        "{stderr}"
    );
    // The first VMM still answers.
    assert_eq!(vmm.state(), "Not started");
}

// ---- real-guest tests ---------------------------------------------------------------------

/// Console lines `TICK=n`, in order.
fn ticks(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TICK=")?.parse().ok())
        .collect()
}

fn wait_for(what: &str, limit: Duration, vmm: &Vmm, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            vmm.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kernel command line running `gi_cmd` (no double quotes inside).
fn boot_args(gi_cmd: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 quiet gi.cmd=\"{gi_cmd}\"")
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn pause_freezes_the_guest_and_resume_continues_it() {
    require_genuine_kvm();
    let a = Artifacts::get();
    let dir = temp_dir("pause-console");
    let console = dir.join("console.log");
    let console_arg = console.to_string_lossy().into_owned();
    let mut vmm = Vmm::start("pause", &["--console", &console_arg]);
    vmm.put(
        "/boot-source",
        json!({
            "kernel_image_path": a.vmlinux,
            "initrd_path": a.initramfs,
            "boot_args": boot_args(
                "busybox sh -c 'n=0; while true; do n=$((n+1)); echo TICK=$n; sleep 0.2; done'"
            ),
        }),
    )
    .no_content();
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 128}),
    )
    .no_content();
    vmm.put("/actions", json!({"action_type": "InstanceStart"}))
        .no_content();
    assert_eq!(vmm.state(), "Running");
    vmm.put("/actions", json!({"action_type": "InstanceStart"}))
        .fault(409, &["already started"]);
    wait_for("TICK=3", Duration::from_secs(120), &vmm, || {
        ticks(&console).len() >= 3
    });

    vmm.patch_vm("Paused").no_content();
    assert_eq!(vmm.state(), "Paused");
    // Idempotent, as in Firecracker.
    vmm.patch_vm("Paused").no_content();
    let frozen = std::fs::read(&console).unwrap();
    let last = *ticks(&console).last().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        std::fs::read(&console).unwrap(),
        frozen,
        "the console grew while paused"
    );
    assert_eq!(vmm.get("/metrics").json()["state"], "Paused");

    vmm.patch_vm("Resumed").no_content();
    assert_eq!(vmm.state(), "Running");
    vmm.patch_vm("Resumed").no_content();
    wait_for("a tick after resume", Duration::from_secs(30), &vmm, || {
        ticks(&console).contains(&(last + 1))
    });
    // No reset: the count only goes up, and continued from where it was. (Not every tick
    // must be intact: a kernel message could in principle break a console line.)
    let all = ticks(&console);
    assert!(
        all.windows(2).all(|w| w[1] > w[0]),
        "the count went back: {all:?}"
    );
    let next = all.iter().find(|&&t| t > last);
    assert_eq!(next, Some(&(last + 1)), "{all:?}");

    // SIGTERM while paused still ends the VMM cleanly.
    vmm.patch_vm("Paused").no_content();
    let status = vmm.terminate();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vmm.output());
    assert!(!vmm.sock.exists());
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn metrics_after_boot_count_exits_and_boot_time() {
    require_genuine_kvm();
    let a = Artifacts::get();
    let (kernel, initrd) = (a.vmlinux.to_string_lossy(), a.initramfs.to_string_lossy());
    let cmdline = boot_args("busybox sleep 600");
    let mut vmm = Vmm::start(
        "metrics",
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            &cmdline,
            "--console",
            "none",
        ],
    );
    let mut metrics = Json::Null;
    wait_for("guest-init ready", Duration::from_secs(120), &vmm, || {
        metrics = vmm.get("/metrics").json();
        !metrics["boot_ready_ms"].is_null()
    });
    assert_eq!(metrics["state"], "Running", "{metrics}");
    let ms = metrics["boot_ready_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 120_000.0, "{metrics}");
    for counter in ["kvm_run", "io_out", "io_in", "mmio_read", "mmio_write"] {
        assert!(
            metrics["vcpu"][counter].as_u64().unwrap_or(0) > 0,
            "vcpu.{counter} is 0: {metrics}"
        );
    }
    assert_eq!(metrics["vcpus"][0]["id"], 0, "{metrics}");
    assert!(metrics["devices"]["rng"].is_object(), "{metrics}");
    assert!(
        metrics["legacy"]["serial"]["bytes_out"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert_eq!(
        vmm.terminate().code(),
        Some(128 + libc::SIGTERM),
        "{}",
        vmm.output()
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn configuration_after_start_is_refused() {
    require_genuine_kvm();
    let a = Artifacts::get();
    let (kernel, initrd) = (a.vmlinux.to_string_lossy(), a.initramfs.to_string_lossy());
    let cmdline = boot_args("busybox sleep 600");
    let mut vmm = Vmm::start(
        "after-start",
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            &cmdline,
            "--console",
            "none",
        ],
    );
    assert_eq!(vmm.state(), "Running");
    let disk = file(&vmm.dir, "disk.img", &[0; 1 << 20]);
    vmm.put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk}),
    )
    .fault(409, &["PutDrive", "after the VM started"]);
    vmm.put("/boot-source", json!({"kernel_image_path": a.vmlinux}))
        .fault(409, &["PutBootSource"]);
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 128}),
    )
    .fault(409, &["PutMachineConfig"]);
    vmm.put("/actions", json!({"action_type": "InstanceStart"}))
        .fault(409, &["already started"]);
    // Reading is fine at any time.
    assert_eq!(vmm.get("/machine-config").json()["vcpu_count"], 1);
    assert_eq!(
        vmm.terminate().code(),
        Some(128 + libc::SIGTERM),
        "{}",
        vmm.output()
    );
}
