//! Foundation check inside the KVM test host: the KVM there is genuine (not kvm-pvm) and
//! runs a vCPU. Booting the project's kernel and guest-init, from the initramfs and from the
//! ext4 image, is tested with `vmm` itself in vmm/tests/boot.rs and vmm/tests/blk.rs.

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn test_host_kvm_is_genuine_and_runs_a_vcpu() {
    let desc = tests::kvm_probe::genuine_kvm().unwrap_or_else(|why| panic!("{why}"));
    assert!(desc.contains("hlt"), "{desc}");
    assert!(!std::path::Path::new("/sys/module/kvm_pvm").exists());
}
