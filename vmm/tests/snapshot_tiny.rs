//! Snapshot and restore through the `vmm` binary, with a tiny hand-assembled guest on this
//! machine's /dev/kvm (kvm-pvm included).
//!
//! The guest counts in memory and prints each count on COM1 as `C=<16 hex digits>`. It
//! runs without an in-kernel irqchip (kvm-pvm cannot run a guest with one); a restore
//! makes the same choice from the snapshot, so the real restore and create paths of the
//! VMM run here: the first snapshot is taken by hand with the library's
//! `snapshot::create` (the VMM itself only boots Linux), restored by `vmm --restore`, then
//! snapshotted by the VMM over its API and restored again, over the API and from the CLI.
//! The console output, put end to end across the snapshots, must count on without a gap,
//! a repeat or a duplicated character.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tiny::TinyGuest;
use common::{allocated_bytes, complete_values, VmmProcess};
use devices::legacy::ConsoleOutput;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
const COUNTER_ADDR: u64 = 0x8000;

/// `inc qword [0x8000]`, print it as `C=%016x\n` on port 0x3f8 one `out` per byte, spin
/// 16M iterations, repeat.
#[rustfmt::skip]
const COUNTER_GUEST: &[u8] = &[
    0x48, 0xc7, 0xc3, 0x00, 0x80, 0x00, 0x00, //       mov rbx, 0x8000
    0x48, 0xff, 0x03,                         // loop: inc qword [rbx]
    0x48, 0x8b, 0x33,                         //       mov rsi, [rbx]
    0xba, 0xf8, 0x03, 0x00, 0x00,             //       mov edx, 0x3f8
    0xb0, 0x43, 0xee,                         //       mov al, 'C'; out dx, al
    0xb0, 0x3d, 0xee,                         //       mov al, '='; out dx, al
    0xb9, 0x10, 0x00, 0x00, 0x00,             //       mov ecx, 16
    0x48, 0xc1, 0xc6, 0x04,                   // digit: rol rsi, 4
    0x89, 0xf0,                               //       mov eax, esi
    0x83, 0xe0, 0x0f,                         //       and eax, 0xf
    0x83, 0xf8, 0x0a,                         //       cmp eax, 10
    0x72, 0x03,                               //       jb +3
    0x83, 0xc0, 0x27,                         //       add eax, 'a' - '0' - 10
    0x83, 0xc0, 0x30,                         //       add eax, '0'
    0xee,                                     //       out dx, al
    0xff, 0xc9,                               //       dec ecx
    0x75, 0xe7,                               //       jnz digit
    0xb0, 0x0a, 0xee,                         //       mov al, '\n'; out dx, al
    0xb9, 0x00, 0x00, 0x01, 0x00,             //       mov ecx, 0x10000
    0xff, 0xc9,                               // spin: dec ecx
    0x75, 0xfc,                               //       jnz spin
    0xeb, 0xc3,                               //       jmp loop
];

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);
impl Write for Captured {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-snaptiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counter(mem: &GuestMemoryMmap) -> u64 {
    mem.read_obj(GuestAddress(COUNTER_ADDR)).unwrap()
}

/// The counter as saved in a memory file.
fn counter_in_file(memfile: &Path) -> u64 {
    let bytes = std::fs::read(memfile).unwrap();
    let at = usize::try_from(COUNTER_ADDR).unwrap();
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Boots the counting guest by hand (the same vCPU code the VMM uses), lets it count to at
/// least 3, pauses it and snapshots it with the library into `dir`. Returns the vmstate
/// file, the memory file and what the guest printed.
fn hand_made_snapshot(dir: &Path) -> (PathBuf, PathBuf, String) {
    let out = Captured::default();
    let mut guest = TinyGuest::new(
        COUNTER_GUEST,
        ConsoleOutput::new(Box::new(out.clone()), false),
    );
    let mut set = guest.start(false);
    let mem = &guest.mem;
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(mem) < 3 {
        assert!(
            Instant::now() < deadline,
            "the guest does not count: counter {}, exit {:?}, printed {:?}",
            counter(mem),
            set.take_exit(),
            String::from_utf8_lossy(&out.0.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    set.pause(Duration::from_secs(5)).unwrap();
    let (vmstate, memfile) = (dir.join("vmstate1"), dir.join("mem1"));
    let state = guest.snapshot(set, &vmstate, &memfile);
    assert!(state.vm.irqchip.is_none());
    let printed = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert_eq!(counter_in_file(&memfile), counter(&guest.mem));
    (vmstate, memfile, printed)
}

/// Asserts that `text` counts 1, 2, 3, ... without a gap or repeat, up to at least `min`.
fn assert_counts_on(text: &str, min: u64) {
    let values = complete_values(text, "C", 16);
    let expected: Vec<u64> = (1..=values.len() as u64).collect();
    assert_eq!(values, expected, "the count is not seamless:\n{text}");
    assert!(
        values.len() as u64 >= min,
        "only {} counts:\n{text}",
        values.len()
    );
}

fn wait_until(what: &str, vmm: &VmmProcess, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s\n{}",
            vmm.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn restored_guest_counts_on_and_the_vmm_snapshots_it_again() {
    let dir = temp_dir("chain");
    let (vmstate1, mem1, printed1) = hand_made_snapshot(&dir);

    // 1. CLI restore without --resume: paused until the API resumes it.
    let c1 = dir.join("console1");
    let c1_arg = c1.to_string_lossy().into_owned();
    let mut vmm = VmmProcess::start(
        &dir,
        "vmm1",
        true,
        &[
            "--restore",
            vmstate1.to_str().unwrap(),
            "--memory",
            mem1.to_str().unwrap(),
            "--console",
            &c1_arg,
        ],
    );
    assert_eq!(vmm.state(), "Paused");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(&c1), "", "a paused restored guest printed");
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    wait_until("counting after resume", &vmm, || {
        complete_values(&read(&c1), "C", 16).len() >= 5
    });
    let snap = |n: &str| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            dir.join(format!("vmstate{n}")).display(),
            dir.join(format!("mem{n}")).display()
        )
    };
    let refused = vmm.api_expect("PUT", "/snapshot/create", Some(&snap("2")), 409);
    assert!(refused.contains("paused"), "{refused}");
    let metrics = vmm.api_expect("GET", "/metrics", None, 200);
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert!(m["vcpu"]["io_out"].as_u64().unwrap() > 0, "{m}");
    assert!(m["boot_ready_ms"].is_null(), "{m}");

    // 2. The VMM's own snapshot of the restored VM.
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    vmm.api_expect("PUT", "/snapshot/create", Some(&snap("2")), 204);
    assert_eq!(vmm.state(), "Paused", "a snapshot leaves the VM paused");
    assert!(
        vmm.output().contains("vmm: snapshot: memory file"),
        "{}",
        vmm.output()
    );
    // A bad path is the client's: 400 naming the file; the VM stays paused.
    let bad =
        r#"{"snapshot_path": "/nonexistent/dir/vmstate", "mem_file_path": "/nonexistent/dir/mem"}"#;
    let e = vmm.api_expect("PUT", "/snapshot/create", Some(bad), 400);
    assert!(e.contains("/nonexistent/dir/mem"), "{e}");
    let same = r#"{"snapshot_path": "/tmp/x", "mem_file_path": "/tmp/x"}"#;
    let e = vmm.api_expect("PUT", "/snapshot/create", Some(same), 400);
    assert!(e.contains("same file"), "{e}");
    let console_at_snapshot = read(&c1);
    vmm.child.kill().unwrap();
    vmm.wait(Duration::from_secs(10));
    let (vmstate2, mem2) = (dir.join("vmstate2"), dir.join("mem2"));
    let before = format!("{printed1}{console_at_snapshot}");
    assert_counts_on(&before, 5);
    let saved = counter_in_file(&mem2);
    let last = *complete_values(&before, "C", 16).last().unwrap();
    assert!(
        saved == last || saved == last + 1,
        "memory file has count {saved}, the console ends at {last}"
    );
    // Sparse: a 2 MiB guest touching a handful of pages.
    assert_eq!(std::fs::metadata(&mem2).unwrap().len(), 2 << 20);
    let allocated = allocated_bytes(&mem2);
    assert!(
        allocated <= 256 << 10,
        "memory file takes {allocated} bytes"
    );

    // 3. API load into a fresh VMM, resumed at once.
    let c2 = dir.join("console2");
    let c2_arg = c2.to_string_lossy().into_owned();
    let mut vmm = VmmProcess::start(&dir, "vmm2", true, &["--console", &c2_arg]);
    assert_eq!(vmm.state(), "Not started");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        vmstate2.display(),
        mem2.display()
    );
    let bad_load = load.replace("mem2", "mem1-missing");
    let e = vmm.api_expect("PUT", "/snapshot/load", Some(&bad_load), 400);
    assert!(
        e.contains("mem1-missing") && e.contains("cannot open"),
        "{e}"
    );
    assert_eq!(vmm.state(), "Not started", "a refused load leaves nothing");
    vmm.api_expect("PUT", "/snapshot/load", Some(&load), 204);
    assert_eq!(vmm.state(), "Running");
    let again = vmm.api_expect("PUT", "/snapshot/load", Some(&load), 409);
    assert!(again.contains("LoadSnapshot"), "{again}");
    wait_until("counting after the API load", &vmm, || {
        complete_values(&read(&c2), "C", 16).len() >= 5
    });
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    let frozen = read(&c2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read(&c2), frozen, "counted while paused");
    vmm.api_expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let cfg = vmm.api_expect("GET", "/vm/config", None, 200);
    assert!(cfg.contains("\"mem_size_mib\":2"), "{cfg}");
    let status = vmm.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vmm.output());
    assert_counts_on(&format!("{before}{}", read(&c2)), 10);

    // 4. CLI restore with --resume, no API: a second clone of the same snapshot.
    let c3 = dir.join("console3");
    let c3_arg = c3.to_string_lossy().into_owned();
    let mut vmm = VmmProcess::start(
        &dir,
        "vmm3",
        false,
        &[
            "--restore",
            vmstate2.to_str().unwrap(),
            "--memory",
            mem2.to_str().unwrap(),
            "--resume",
            "--console",
            &c3_arg,
        ],
    );
    wait_until("counting after --resume", &vmm, || {
        complete_values(&read(&c3), "C", 16).len() >= 5
    });
    let status = vmm.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vmm.output());
    assert_counts_on(&format!("{before}{}", read(&c3)), 10);
    assert!(vmm.output().contains("vmm: restored"), "{}", vmm.output());
    // The clones never wrote to the memory file.
    assert_eq!(counter_in_file(&mem2), saved);
    let _ = std::fs::remove_dir_all(&dir);
}
