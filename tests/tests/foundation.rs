//! Foundation checks inside the KVM test host: the KVM there is genuine, and the project's
//! own guest kernel boots guest-init from the ext4 image under
//! `qemu-system-x86_64 -enable-kvm -M microvm` (the peer VMM). Booting with `vmm` itself is
//! tested in vmm/tests/boot.rs; this ext4 case moves there once vmm has virtio-blk.

use std::time::Duration;

use tests::{
    guest_exit_status, guest_ready, qemu_microvm, require_genuine_kvm, run_with_timeout, Artifacts,
    Root,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn test_host_kvm_is_genuine_and_runs_a_vcpu() {
    let desc = tests::kvm_probe::genuine_kvm().unwrap_or_else(|why| panic!("{why}"));
    assert!(desc.contains("hlt"), "{desc}");
    assert!(!std::path::Path::new("/sys/module/kvm_pvm").exists());
}

fn boot_qemu(root: Root, cmd: &str) -> tests::RunOutput {
    require_genuine_kvm();
    let a = Artifacts::get();
    let out = run_with_timeout(
        &mut qemu_microvm(&a.vmlinux, &root, cmd, 1, 256),
        BOOT_TIMEOUT,
    );
    assert!(
        !out.timed_out,
        "guest did not finish in {BOOT_TIMEOUT:?}:\n{}",
        out.output
    );
    out
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn qemu_boots_own_kernel_with_ext4_root() {
    let a = Artifacts::get();
    // The image is written by the guest (rw root); work on a copy.
    let dir = std::env::temp_dir().join(format!("foundation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("rootfs.ext4");
    std::fs::copy(&a.rootfs, &img).unwrap();
    let out = boot_qemu(
        Root::Disk(img),
        // No double quotes: the kernel's own quoting wraps gi.cmd.
        "busybox sh -c 'grep -q ext4 /proc/mounts && exit 42'",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(guest_ready(&out.output), "no ready line:\n{}", out.output);
    assert_eq!(
        guest_exit_status(&out.output),
        Some(42),
        "root is not ext4 or the command failed:\n{}",
        out.output
    );
}
