//! `vmm --restore` refuses bad snapshot files and flags clearly: a non-zero status and a
//! message naming the file and what is wrong, never a panic, and before any vCPU runs.
//! Every refusal here happens before KVM is opened, so these run on any machine.

use std::path::{Path, PathBuf};

use vmm::snapshot::format::{self, HEADER_LEN};
use vmm::snapshot::memory::MemoryRegionLayout;
use vmm::snapshot::state::{DevicesState, MachineState, VmState};
use vmm::vstate::vcpu_state::VcpuState;
use vmm::vstate::vm_state::KvmVmState;

mod common;

use common::run_vmm_cli as vmm;

/// Runs `vmm ARGS` and checks it exits with `code` saying each of `needles`.
fn assert_refused_with(code: i32, args: &[&str], needles: &[&str]) {
    let out = vmm(args);
    assert_eq!(out.code, Some(code), "{args:?}:\n{}", out.output);
    for n in needles {
        assert!(
            out.output.contains(n),
            "{args:?}: missing {n:?} in:\n{}",
            out.output
        );
    }
}

fn assert_refused(args: &[&str], needles: &[&str]) {
    let mut all = vec!["vmm: error:"];
    all.extend_from_slice(needles);
    assert_refused_with(1, args, &all);
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-snapcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid state of one vCPU and `mib` MiB of RAM, no devices.
fn state(mib: u64) -> VmState {
    VmState {
        machine: MachineState {
            vcpu_count: 1,
            mem_size_mib: mib,
            regions: vec![MemoryRegionLayout {
                guest_addr: 0,
                size: mib << 20,
            }],
        },
        vm: KvmVmState {
            irqchip: None,
            pit: None,
            clock: Default::default(),
        },
        vcpus: vec![VcpuState {
            cpuid: Vec::new(),
            msrs: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: None,
            xcrs: None,
            debugregs: Default::default(),
            lapic: None,
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: None,
        }],
        devices: DevicesState::default(),
    }
}

fn write(d: &Path, name: &str, bytes: &[u8]) -> String {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// A sparse file of `len` bytes.
fn mem_file(d: &Path, name: &str, len: u64) -> String {
    let p = d.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p.to_string_lossy().into_owned()
}

fn restore(vmstate: &str, mem: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--restore", vmstate, "--memory", mem, "--resume"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refused(args: &[String], needles: &[&str]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, needles);
}

#[test]
fn damaged_vmstate_files_are_refused_naming_the_file_and_the_problem() {
    let d = dir("damaged");
    let image = format::encode(&state(2)).unwrap();
    let mem = mem_file(&d, "mem", 2 << 20);

    let truncated = write(&d, "truncated-header", &image[..10]);
    refused(
        &restore(&truncated, &mem, &[]),
        &[&truncated, "truncated", "10 bytes"],
    );
    let truncated = write(&d, "truncated-payload", &image[..image.len() / 2]);
    refused(
        &restore(&truncated, &mem, &[]),
        &[&truncated, "truncated", "payload"],
    );

    let mut bad = image.clone();
    bad[0] ^= 0xff;
    let magic = write(&d, "bad-magic", &bad);
    refused(
        &restore(&magic, &mem, &[]),
        &[&magic, "bad magic", "not a vmstate file"],
    );

    let mut bad = image.clone();
    bad[8..12].copy_from_slice(&7u32.to_le_bytes());
    let version = write(&d, "other-version", &bad);
    refused(
        &restore(&version, &mem, &[]),
        &[&version, "format version 7", "supports version"],
    );

    let mut bad = image.clone();
    bad[HEADER_LEN + 3] ^= 0x55;
    let crc = write(&d, "bad-checksum", &bad);
    refused(&restore(&crc, &mem, &[]), &[&crc, "checksum mismatch"]);

    let empty = write(&d, "empty", &[]);
    refused(&restore(&empty, &mem, &[]), &[&empty, "truncated"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn memory_file_problems_are_refused_naming_the_file() {
    let d = dir("memory");
    let good = write(&d, "vmstate", &format::encode(&state(2)).unwrap());
    let small = mem_file(&d, "mem-small", 1 << 20);
    refused(
        &restore(&good, &small, &[]),
        &[&small, "1048576 bytes", "2097152 bytes"],
    );
    let missing = d.join("no-such-mem").to_string_lossy().into_owned();
    refused(
        &restore(&good, &missing, &[]),
        &[&missing, "cannot open", "No such file"],
    );
    // A layout this VMM would not make (RAM moved up by 1 MiB).
    let mut odd = state(2);
    odd.machine.regions[0].guest_addr = 1 << 20;
    let odd = write(&d, "odd-layout", &format::encode(&odd).unwrap());
    let mem = mem_file(&d, "mem", 2 << 20);
    refused(&restore(&odd, &mem, &[]), &[&odd, "memory layout", "2 MiB"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_vmstate_file_is_refused() {
    refused(
        &restore("/nonexistent/vmstate", "/nonexistent/mem", &[]),
        &["/nonexistent/vmstate", "cannot open"],
    );
}

#[test]
fn overrides_must_name_devices_of_the_snapshot() {
    let d = dir("overrides");
    let good = write(&d, "vmstate", &format::encode(&state(2)).unwrap());
    let mem = mem_file(&d, "mem", 2 << 20);
    refused(
        &restore(&good, &mem, &["--drive-override", "rootfs=/x.ext4"]),
        &["drive_overrides", "no drive \"rootfs\"", "none"],
    );
    refused(
        &restore(&good, &mem, &["--net-override", "eth0=tap9"]),
        &["network_overrides", "eth0"],
    );
    refused(
        &restore(&good, &mem, &["--vsock-override", "/tmp/v.sock"]),
        &["vsock_override", "no vsock device"],
    );
    refused(
        &restore(&good, &mem, &["--drive-override", "rootfs"]),
        &["--drive-override", "expected ID=PATH"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn restore_flags_are_checked() {
    // clap's usage errors: status 2.
    assert_refused_with(2, &["--memory", "/m"], &["--restore"]);
    assert_refused_with(2, &["--restore", "/s"], &["--memory"]);
    assert_refused_with(
        2,
        &["--restore", "/s", "--memory", "/m", "--kernel", "/k"],
        &["cannot be used with"],
    );
    assert_refused_with(2, &["--resume"], &["--restore"]);
    assert_refused_with(2, &["--drive-override", "a=b"], &["--restore"]);
    // Paused with nothing to resume it.
    assert_refused(
        &["--restore", "/s", "--memory", "/m"],
        &["--api-sock", "--resume"],
    );
}
