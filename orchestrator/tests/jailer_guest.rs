//! The jailer with a real Linux guest (inside the KVM test host): a VM whose guest memory
//! outgrows the VMM's memory cgroup is stopped by the kernel inside that cgroup, and the
//! jailer says so, naming the limit; the host and the test go on.

mod common;

use common::*;
use tests::{require_genuine_kvm, Artifacts};

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn a_guest_larger_than_its_memory_cgroup_fails_clearly() {
    require_genuine_kvm();
    let a = Artifacts::get();
    let base = Base::new("oom");
    let vmm = vmm_binary();
    let vmm = vmm.to_str().unwrap();
    let parent = format!("jailer-test-{}-oom", std::process::id());
    let kernel = format!("{}:/vmlinux", a.vmlinux.display());
    let initrd = format!("{}:/initramfs.cpio", a.initramfs.display());
    let libs = library_files(vmm);
    // 160 MiB for a 512 MiB guest that fills a 300 MiB buffer.
    let mut extra = vec![
        "--json",
        "--mount-proc",
        "--file",
        &kernel,
        "--file",
        &initrd,
        "--parent-cgroup",
        &parent,
        "--cgroup",
        "memory.max=167772160",
    ];
    for l in &libs {
        extra.extend(["--file", l.as_str()]);
    }
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet \
                   gi.cmd=\"busybox dd if=/dev/zero of=/dev/null bs=300M count=1\"";
    let args = [
        "--kernel",
        "/vmlinux",
        "--initrd",
        "/initramfs.cpio",
        "--memory-mib",
        "512",
        "--cmdline",
        cmdline,
    ];
    let d = run(&mut jailer(&base, vmm, "oom", &extra, &args));
    let (cgroups, _cleanup) = report_cgroups(&d);
    // The guest ran (its init started the workload) before memory ran out.
    assert!(
        tests::guest_ready(&d.stdout),
        "the guest never got going:\n{}\n{}",
        d.stdout,
        d.stderr
    );
    assert_eq!(
        d.code,
        Some(128 + libc::SIGKILL),
        "{}\n{}",
        d.stdout,
        d.stderr
    );
    assert!(
        d.stderr
            .contains("jailer: error: vm oom: the kernel's OOM killer killed")
            && (d.stderr.contains("memory.max = 167772160")
                || d.stderr.contains("memory.limit_in_bytes = 167772160")),
        "no clear OOM report:\n{}",
        d.stderr
    );
    assert!(
        !d.stdout.contains("guest-init: exit status"),
        "{}",
        d.stdout
    );
    for c in &cgroups {
        assert!(!c.exists(), "{} left behind", c.display());
    }
}
