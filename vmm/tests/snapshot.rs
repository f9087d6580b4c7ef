//! Real-guest snapshot tests (ignored here; run inside the KVM test host): a Linux guest
//! paused, snapshotted over the API, its VMM killed, and restored by `vmm --restore`.
//!
//! - A counting guest continues its count from where it was (no reset, no repeated tick),
//!   keeps working as a VM (pause/resume, metrics), ends on its own with its exit status,
//!   and its memory file takes no more disk than the guest had touched.
//! - A disk write made before the snapshot is there after it, on an overridden disk; a new
//!   vsock connection reaches the guest agent and exec works.
//! - Ten clones restored at once from one snapshot, each on its own disk and vsock socket,
//!   share the memory file's pages: together they take far less than ten single VMs.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{connect_hybrid, AgentClient, ExecRequest, ExecResult};
use common::{allocated_bytes, complete_values, proc_kib, VmmProcess};
use tests::{require_genuine_kvm, Artifacts};

const AGENT_PORT: u32 = 1024;
const MEM_MIB: u64 = 128;
const DISK_BYTES: u64 = 16 << 20;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Boots the project's kernel and initramfs with `kernel_args` under `vmm --api-sock`.
fn boot(dir: &Path, name: &str, kernel_args: &str, extra: &[&str]) -> VmmProcess {
    require_genuine_kvm();
    let a = Artifacts::get();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet {kernel_args}");
    let mut args = vec![
        "--kernel".to_string(),
        s(&a.vmlinux),
        "--initrd".into(),
        s(&a.initramfs),
        "--memory-mib".into(),
        MEM_MIB.to_string(),
        "--cmdline".into(),
        cmdline,
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    VmmProcess::start(dir, name, true, &args)
}

fn wait_for(what: &str, limit: Duration, vmm: &VmmProcess, mut ok: impl FnMut() -> bool) {
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

/// Pauses the VM and snapshots it to `DIR/TAG.vmstate` and `DIR/TAG.mem`.
fn pause_and_snapshot(vmm: &VmmProcess, dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    snapshot_paused(vmm, dir, tag)
}

fn snapshot_paused(vmm: &VmmProcess, dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let (vmstate, mem) = (
        dir.join(format!("{tag}.vmstate")),
        dir.join(format!("{tag}.mem")),
    );
    let body = serde_json::json!({"snapshot_path": vmstate, "mem_file_path": mem}).to_string();
    vmm.api_expect("PUT", "/snapshot/create", Some(&body), 204);
    assert!(
        vmm.output().contains("vmm: snapshot: memory file"),
        "{}",
        vmm.output()
    );
    (vmstate, mem)
}

/// Kills the VMM outright (SIGKILL), as a host would lose it.
fn kill(mut vmm: VmmProcess) {
    vmm.child.kill().unwrap();
    vmm.wait(Duration::from_secs(20));
}

/// `vmm --restore VMSTATE --memory MEM --resume` with `extra` flags, and an API socket.
fn restore(dir: &Path, name: &str, (vmstate, mem): (&Path, &Path), extra: &[&str]) -> VmmProcess {
    let mut args = vec![
        "--restore".to_string(),
        s(vmstate),
        "--memory".into(),
        s(mem),
        "--resume".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    VmmProcess::start(dir, name, true, &args)
}

/// An agent client over the hybrid vsock socket `uds`, retrying while the guest boots.
fn agent(uds: &Path, vmm: &VmmProcess) -> AgentClient<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = connect_hybrid(uds, AGENT_PORT, Duration::from_secs(10)) {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut c = AgentClient::new(s);
            if c.hello().is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered on {}:\n{}",
            uds.display(),
            vmm.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `script` with the guest's busybox sh; it must exit 0.
fn sh(c: &mut AgentClient<UnixStream>, script: &str) -> ExecResult {
    let r = c
        .exec(&ExecRequest::new(["busybox", "sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert_eq!(
        r.code,
        Some(0),
        "{script:?}: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    r
}

/// Writes `text` to the guest's /dev/vda at 512-byte sector `sector`, through to the host.
fn write_sector(c: &mut AgentClient<UnixStream>, sector: u32, text: &str) {
    sh(
        c,
        &format!(
            "echo {text} | dd of=/dev/vda bs=512 seek={sector} conv=fsync 2>/dev/null && sync"
        ),
    );
}

fn host_sector(disk: &Path, sector: u64, len: usize) -> String {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(disk)
        .unwrap()
        .read_exact_at(&mut buf, sector * 512)
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

fn zero_disk(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
}

/// Resident KiB of the VMM's guest RAM mapping (the one mapping of exactly `mib` MiB).
fn guest_rss_kib(pid: i32, mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                // The kernel may merge the guest RAM mapping with a neighbouring anonymous
                // one (same flags), so accept a mapping a little larger than guest RAM.
                let len = b - a;
                in_guest = len >= mib << 20 && len < (mib + 64) << 20;
                continue;
            }
        }
        if in_guest {
            if let Some(v) = line.strip_prefix("Rss:") {
                return v.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    }
    panic!("no {mib} MiB mapping in /proc/{pid}/smaps")
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn restored_guest_continues_its_count_and_ends_with_its_status() {
    let dir = temp_dir("count");
    let (c1, c2) = (dir.join("console1"), dir.join("console2"));
    let gi_cmd = "busybox sh -c 'n=0; while [ $n -lt 60 ]; do n=$((n+1)); echo TICK=$n; \
                  sleep 0.3; done; exit 7'";
    let vmm = boot(
        &dir,
        "original",
        &format!("gi.cmd=\"{gi_cmd}\""),
        &["--console", &s(&c1)],
    );
    wait_for("TICK=3", Duration::from_secs(120), &vmm, || {
        complete_values(&read(&c1), "TICK", 10).len() >= 3
    });
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    let touched = guest_rss_kib(vmm.pid(), MEM_MIB) * 1024;
    let (vmstate, mem) = snapshot_paused(&vmm, &dir, "count");
    let before = read(&c1);
    kill(vmm);

    // The memory file takes about what the guest had touched: never-touched and zero pages
    // are holes.
    let allocated = allocated_bytes(&mem);
    eprintln!(
        "memory file: {} MiB apparent, {:.1} MiB allocated; guest RAM resident at snapshot \
         time {:.1} MiB",
        MEM_MIB,
        allocated as f64 / 1048576.0,
        touched as f64 / 1048576.0
    );
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), MEM_MIB << 20);
    assert!(
        allocated <= touched + touched / 10,
        "memory file allocates {allocated} bytes, the guest had touched {touched}"
    );

    let last = *complete_values(&before, "TICK", 10).last().unwrap();
    let mut vmm = restore(
        &dir,
        "restored",
        (&vmstate, &mem),
        &["--console", &s(&c2), "--exit-with-guest-status"],
    );
    let all = || complete_values(&format!("{before}{}", read(&c2)), "TICK", 10);
    wait_for(
        "three ticks after restore",
        Duration::from_secs(60),
        &vmm,
        || all().contains(&(last + 3)),
    );
    // No reset and no repeat: the count only goes up, and continues at last + 1. (A line
    // cut by the snapshot is completed by the restored guest's output.)
    let ticks = all();
    assert!(
        ticks.windows(2).all(|w| w[1] > w[0]),
        "the count went back or repeated: {ticks:?}"
    );
    assert_eq!(
        ticks.iter().find(|&&t| t > last),
        Some(&(last + 1)),
        "{ticks:?}"
    );

    // Still a VM like any other: pause, resume, metrics.
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    assert_eq!(vmm.state(), "Paused");
    let frozen = read(&c2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(read(&c2), frozen, "the console grew while paused");
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let m: serde_json::Value =
        serde_json::from_str(&vmm.api_expect("GET", "/metrics", None, 200)).unwrap();
    assert_eq!(m["state"], "Running", "{m}");
    assert!(m["devices"]["rng"].is_object(), "{m}");
    assert!(m["vcpu"]["kvm_run"].as_u64().unwrap() > 0, "{m}");

    // The guest command ends; its status (reported on the status port) is the VMM's.
    let status = vmm.wait(Duration::from_secs(120));
    let console = read(&c2);
    let tail: Vec<&str> = console
        .lines()
        .filter(|l| !l.starts_with("TICK=") && !l.contains("0xffffffff"))
        .collect();
    assert_eq!(
        status.code(),
        Some(7),
        "{}\nconsole ({} bytes), its lines other than ticks:\n{}",
        vmm.output(),
        console.len(),
        tail.join("\n")
    );
    assert!(
        vmm.output().contains("guest ended, guest exit status 7"),
        "{}",
        vmm.output()
    );
    assert_eq!(all().last(), Some(&60));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn disk_writes_and_the_vsock_agent_survive_a_restore() {
    let dir = temp_dir("disk-vsock");
    let (disk, uds) = (dir.join("disk.img"), dir.join("v.sock"));
    zero_disk(&disk);
    let vmm = boot(
        &dir,
        "original",
        &format!("gi.agent={AGENT_PORT}"),
        &[
            "--drive",
            &format!("path={},id=data", disk.display()),
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--console",
            &s(&dir.join("console1")),
        ],
    );
    let mut c = agent(&uds, &vmm);
    write_sector(&mut c, 8, "BEFORE-SNAPSHOT");
    assert!(host_sector(&disk, 8, 15).starts_with("BEFORE-SNAPSHOT"));
    // The connection is open at the snapshot; the restored guest is told its connections
    // were reset, and serves new ones.
    let snapshot = pause_and_snapshot(&vmm, &dir, "disk");
    drop(c);
    kill(vmm);

    // The clone gets its own copy of the disk and its own socket.
    let (disk2, uds2) = (dir.join("disk2.img"), dir.join("v2.sock"));
    std::fs::copy(&disk, &disk2).unwrap();
    let mut vmm = restore(
        &dir,
        "restored",
        (&snapshot.0, &snapshot.1),
        &[
            "--drive-override",
            &format!("data={}", disk2.display()),
            "--vsock-override",
            &s(&uds2),
            "--console",
            &s(&dir.join("console2")),
        ],
    );
    let mut c2 = agent(&uds2, &vmm);
    // Read from the disk itself, not the guest's page cache.
    let r = sh(
        &mut c2,
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null",
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).starts_with("BEFORE-SNAPSHOT"),
        "{:?}",
        String::from_utf8_lossy(&r.stdout)
    );
    write_sector(&mut c2, 16, "AFTER-RESTORE");
    assert!(host_sector(&disk2, 16, 13).starts_with("AFTER-RESTORE"));
    assert!(
        !host_sector(&disk, 16, 13).starts_with("AFTER-RESTORE"),
        "the clone wrote to the original disk, not its override"
    );
    let cfg = vmm.api_expect("GET", "/vm/config", None, 200);
    assert!(cfg.contains(&s(&disk2)) && cfg.contains(&s(&uds2)), "{cfg}");
    let m: serde_json::Value =
        serde_json::from_str(&vmm.api_expect("GET", "/metrics", None, 200)).unwrap();
    assert!(m["devices"]["block:data"].is_object(), "{m}");
    assert!(m["devices"]["vsock"].is_object(), "{m}");
    // The agent ends the VM cleanly.
    c2.shutdown().unwrap();
    let status = vmm.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", vmm.output());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn ten_clones_of_one_snapshot_share_its_memory() {
    const CLONES: usize = 10;
    let dir = temp_dir("clones");
    // `<name>.sock` is the API socket (VmmProcess); vsock sockets get their own names.
    let (disk, uds) = (dir.join("template.img"), dir.join("template.vsock"));
    zero_disk(&disk);
    let vmm = boot(
        &dir,
        "template",
        &format!("gi.agent={AGENT_PORT}"),
        &[
            "--drive",
            &format!("path={},id=data", disk.display()),
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--console",
            "none",
        ],
    );
    sh(&mut agent(&uds, &vmm), "true");
    let snapshot = pause_and_snapshot(&vmm, &dir, "template");
    kill(vmm);

    let clone = |i: usize| {
        let (d, u) = (
            dir.join(format!("clone{i}.img")),
            dir.join(format!("clone{i}.vsock")),
        );
        std::fs::copy(&disk, &d).unwrap();
        let vmm = restore(
            &dir,
            &format!("clone{i}"),
            (&snapshot.0, &snapshot.1),
            &[
                "--drive-override",
                &format!("data={}", d.display()),
                "--vsock-override",
                &s(&u),
                "--console",
                "none",
            ],
        );
        (vmm, d, u)
    };
    let work = |vmm: &VmmProcess, uds: &Path, i: usize| {
        write_sector(&mut agent(uds, vmm), 8, &format!("CLONE-{i}"));
    };

    // One clone alone: what a single VM takes.
    let first = clone(0);
    work(&first.0, &first.2, 0);
    let single_rss = proc_kib(first.0.pid(), "Rss");
    let mut clones = vec![first];
    // Nine more, restored at once.
    let t = Instant::now();
    clones.extend((1..CLONES).map(&clone));
    for (i, (vmm, _, uds)) in clones.iter().enumerate().skip(1) {
        work(vmm, uds, i);
    }
    eprintln!(
        "9 clones restored and each ran an exec in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (mut rss, mut pss, mut anon) = (0, 0, 0);
    for (vmm, _, _) in &clones {
        rss += proc_kib(vmm.pid(), "Rss");
        pss += proc_kib(vmm.pid(), "Pss");
        anon += proc_kib(vmm.pid(), "Pss_Anon");
    }
    // RSS counts every page a process maps, so pages of the shared memory file count once
    // per clone; PSS divides each shared page among the processes mapping it, so the sum
    // of PSS is the memory the clones really take together.
    eprintln!(
        "{CLONES} clones: sum of RSS {:.1} MiB (shared pages counted in each), sum of PSS \
         {:.1} MiB (of which private anonymous {:.1} MiB); one clone alone: RSS {:.1} MiB; \
         PSS sum / single RSS = {:.2}",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0,
        anon as f64 / 1024.0,
        single_rss as f64 / 1024.0,
        pss as f64 / single_rss as f64
    );
    assert!(
        pss < 5 * single_rss,
        "{CLONES} clones take {pss} KiB together, one alone {single_rss} KiB: not shared"
    );
    for (i, (_, d, _)) in clones.iter().enumerate() {
        let marker = format!("CLONE-{i}");
        assert!(
            host_sector(d, 8, marker.len()).starts_with(&marker),
            "clone {i}'s disk lacks its marker"
        );
    }
    assert_eq!(
        host_sector(&disk, 8, 6),
        "\0\0\0\0\0\0",
        "a clone wrote to the template's disk"
    );
    for (mut vmm, _, _) in clones {
        let st = vmm.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{}", vmm.output());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
