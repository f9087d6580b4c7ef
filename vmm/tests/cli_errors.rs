//! Bad input to `vmm` gives a clear error naming the field or file and a non-zero status,
//! never a panic. These run on any machine with /dev/kvm (kvm-pvm included): every case is
//! refused before a vCPU runs.

mod common;

use common::run_vmm_cli as vmm;

fn tmp(name: &str, body: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

fn assert_refused(args: &[&str], needles: &[&str]) {
    let out = vmm(args);
    assert_eq!(out.code, Some(1), "{args:?}:\n{}", out.output);
    assert!(
        out.output.contains("vmm: error:"),
        "{args:?}:\n{}",
        out.output
    );
    for n in needles {
        assert!(
            out.output.contains(n),
            "{args:?}: missing {n:?} in:\n{}",
            out.output
        );
    }
}

#[test]
fn missing_kernel() {
    assert_refused(&[], &["no kernel given"]);
    assert_refused(
        &["--kernel", "/nonexistent/vmlinux"],
        &["/nonexistent/vmlinux", "kernel_image_path"],
    );
}

#[test]
fn non_kernel_file_as_kernel() {
    let junk = tmp("junk-kernel", &[0x42; 4096]);
    assert_refused(&["--kernel", &junk], &["junk-kernel", "is not a kernel"]);
    let empty = tmp("empty-kernel", b"");
    assert_refused(&["--kernel", &empty], &["empty-kernel", "is not a kernel"]);
}

#[test]
fn bad_memory_sizes() {
    let k = tmp("k", b"x");
    assert_refused(
        &["--kernel", &k, "--memory-mib", "0"],
        &["mem_size_mib", "at least 1"],
    );
    assert_refused(
        &["--kernel", &k, "--memory-mib", "100000000"],
        &["mem_size_mib", "more than this host"],
    );
}

#[test]
fn bad_vcpu_counts() {
    let k = tmp("k", b"x");
    assert_refused(
        &["--kernel", &k, "--vcpus", "0"],
        &["vcpu_count", "out of range"],
    );
    assert_refused(
        &["--kernel", &k, "--vcpus", "255"],
        &["vcpu_count", "out of range"],
    );
    let out = vmm(&["--kernel", &k, "--vcpus", "-3"]);
    assert_ne!(out.code, Some(0));
}

#[test]
fn cmdline_too_long() {
    let k = tmp("k", b"x");
    let long = "x".repeat(3000);
    assert_refused(
        &["--kernel", &k, "--cmdline", &long],
        &["boot_args", "3000 bytes"],
    );
    // Just under the limit for the user's part, but over it with the VMM's own entry.
    let edge = "y".repeat(2040);
    let junk = tmp("junk2", &[0x42; 4096]);
    let out = vmm(&["--kernel", &junk, "--cmdline", &edge]);
    assert_eq!(out.code, Some(1), "{}", out.output);
    assert!(out.output.contains("command line"), "{}", out.output);
}

#[test]
fn unreadable_initrd() {
    let k = tmp("k", b"x");
    assert_refused(
        &["--kernel", &k, "--initrd", "/nonexistent/initrd.cpio"],
        &["initrd_path", "/nonexistent/initrd.cpio"],
    );
    let dir = std::env::temp_dir();
    let d = dir.to_string_lossy();
    assert_refused(
        &["--kernel", &k, "--initrd", &d],
        &["initrd_path", "not a regular file"],
    );
}

#[test]
fn bad_config_file_names_file_and_field() {
    let cfg = tmp("vm.json", br#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "memsize": 3}}"#);
    assert_refused(&["--config", &cfg], &["vm.json", "memsize"]);
    let cfg = tmp("broken.json", b"{not json");
    assert_refused(&["--config", &cfg], &["broken.json"]);
}

#[test]
fn help_explains_every_flag() {
    let out = vmm(&["--help"]);
    assert_eq!(out.code, Some(0));
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory-mib",
        "--console",
        "--config",
        "--boot-timer",
        "--hugepages",
        "--exit-with-guest-status",
        "--api-sock",
    ] {
        assert!(out.output.contains(flag), "--help lacks {flag}");
    }
}
