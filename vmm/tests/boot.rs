//! Real-guest boot tests: `vmm` boots the project's kernel and guest-init on a genuine KVM
//! (inside the KVM test host; ignored elsewhere, see tests/src/lib.rs).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Guest;
use tests::{guest_exit_status, guest_ready, require_genuine_kvm, Artifacts, RunOutput};

/// Boots `kernel` with the initramfs and runs `gi_cmd` (no double quotes inside).
fn boot(kernel: &Path, vcpus: u32, mem_mib: u64, gi_cmd: &str, extra: &[&str]) -> RunOutput {
    Guest::new()
        .kernel(kernel)
        .machine(vcpus, mem_mib)
        .cmd(gi_cmd)
        .args(extra)
        .run()
}

fn guest_value(out: &RunOutput, key: &str) -> u64 {
    let v = common::guest_value(out, key);
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} is not a number:\n{}", out.output))
}

const FACTS: &str = "busybox sh -c 'echo CPUS=$(grep -c ^processor /proc/cpuinfo); echo MEMKB=$(grep MemTotal /proc/meminfo | tr -s \\  | cut -d\\  -f2)'";

fn check_machine(kernel: &Path, vcpus: u32, mem_mib: u64) {
    let out = boot(kernel, vcpus, mem_mib, FACTS, &[]);
    assert_eq!(out.code, Some(0), "{}", out.output);
    assert!(guest_ready(&out.output), "{}", out.output);
    assert_eq!(
        guest_value(&out, "CPUS"),
        u64::from(vcpus),
        "{}",
        out.output
    );
    let mem_kb = guest_value(&out, "MEMKB");
    // MemTotal excludes the kernel's own reservations: at least 80% must be visible, and
    // never more than configured.
    let configured_kb = mem_mib * 1024;
    assert!(
        mem_kb > configured_kb * 8 / 10 && mem_kb <= configured_kb,
        "MemTotal {mem_kb} kB for {mem_mib} MiB:\n{}",
        out.output
    );
    assert_eq!(guest_exit_status(&out.output), Some(0));
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boots_elf_with_1_vcpu_128m() {
    check_machine(&Artifacts::get().vmlinux, 1, 128);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boots_elf_with_2_vcpus() {
    check_machine(&Artifacts::get().vmlinux, 2, 256);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boots_elf_with_4_vcpus() {
    check_machine(&Artifacts::get().vmlinux, 4, 256);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boots_elf_with_4_gib_across_the_mmio_hole() {
    check_machine(&Artifacts::get().vmlinux, 2, 4096);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boots_bzimage() {
    check_machine(&Artifacts::get().bzimage, 2, 128);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn guest_exit_status_reaches_the_caller() {
    let k = Artifacts::get().vmlinux;
    // By default the VMM exits 0 for a clean guest end and reports the status on stderr.
    let out = boot(&k, 1, 128, "busybox sh -c 'exit 7'", &[]);
    assert_eq!(out.code, Some(0), "{}", out.output);
    assert_eq!(guest_exit_status(&out.output), Some(7));
    assert!(
        out.output.contains("vmm: guest ended, guest exit status 7"),
        "{}",
        out.output
    );
    // With --exit-with-guest-status it becomes the VMM's own status.
    let out = boot(
        &k,
        1,
        128,
        "busybox sh -c 'exit 7'",
        &["--exit-with-guest-status"],
    );
    assert_eq!(out.code, Some(7), "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn reboot_inside_the_guest_ends_the_vmm_with_status_0() {
    let k = Artifacts::get().vmlinux;
    // busybox reboot -f calls reboot(2) at once: guest-init never reports a status.
    let out = boot(
        &k,
        1,
        128,
        "busybox reboot -f",
        &["--exit-with-guest-status"],
    );
    assert_eq!(out.code, Some(0), "{}", out.output);
    assert_eq!(guest_exit_status(&out.output), None, "{}", out.output);
    assert!(out.output.contains("vmm: guest ended"), "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn boot_timer_reports_guest_init_ready() {
    let k = Artifacts::get().vmlinux;
    let out = boot(&k, 1, 128, "", &["--boot-timer"]);
    assert_eq!(out.code, Some(0), "{}", out.output);
    let line = out
        .output
        .lines()
        .find(|l| l.starts_with("vmm: boot-timer: guest-init ready "))
        .unwrap_or_else(|| panic!("no boot-timer line:\n{}", out.output));
    let ms: f64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    assert!(
        ms > 0.0 && ms < out.elapsed.as_secs_f64() * 1000.0,
        "{line}"
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn sigterm_stops_the_guest_and_the_vmm() {
    require_genuine_kvm();
    let a = Artifacts::get();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initrd")
        .arg(&a.initramfs)
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 quiet gi.cmd=\"busybox sleep 600\"",
        ])
        .args(["--console", "none"]);
    let (mut cmd, _jail) = tests::jail::maybe_jailed(cmd);
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let pid = nix_pid(&child);
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(128 + libc::SIGTERM));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "vmm ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nix_pid(child: &std::process::Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).unwrap()
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn guest_init_reports_a_missing_command_as_127() {
    let out = boot(&Artifacts::get().vmlinux, 1, 128, "/no/such/program", &[]);
    assert!(
        out.output.contains("guest-init: error: cannot run"),
        "{}",
        out.output
    );
    assert_eq!(guest_exit_status(&out.output), Some(127), "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn guest_init_reports_a_bad_cmdline_and_still_ends_the_vm() {
    // Unterminated single quote: guest-init must say so and end the VM with status 1.
    let out = boot(
        &Artifacts::get().vmlinux,
        1,
        128,
        "sh -c 'exit 3",
        &["--exit-with-guest-status"],
    );
    assert!(
        out.output
            .contains("guest-init: error: gi.cmd: unterminated"),
        "{}",
        out.output
    );
    assert_eq!(guest_exit_status(&out.output), Some(1), "{}", out.output);
    assert_eq!(
        out.code,
        Some(1),
        "status port carries guest-init's own error status"
    );
}
