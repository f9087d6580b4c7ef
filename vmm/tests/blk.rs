//! Real-guest tests of virtio-blk and virtio-rng (issue "virtio-mmio transport, virtio-blk
//! and virtio-rng"): root on the ext4 image without an initrd, writes that reach the host
//! file and survive a reboot, read-only drives, several drives with serials, /dev/hwrng.

mod common;

use common::{guest_value, scratch_copy, Guest};
use tests::{guest_exit_status, guest_ready, Artifacts};

fn sha(path: &std::path::Path) -> Vec<u8> {
    // The bytes themselves: images are small (64 MiB) and comparing all of them is exact.
    std::fs::read(path).unwrap()
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn root_on_virtio_blk_without_initrd() {
    let img = scratch_copy(&Artifacts::get().rootfs, "rootfs.ext4");
    let out = Guest::new()
        .no_initrd()
        .drive(&img, "rootfs", false, true)
        .cmd("busybox sh -c 'grep -q /dev/root.*ext4 /proc/mounts && exit 42'")
        .run();
    assert!(guest_ready(&out.output), "{}", out.output);
    assert_eq!(
        guest_exit_status(&out.output),
        Some(42),
        "root is not ext4 on vda:\n{}",
        out.output
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn guest_writes_reach_the_host_file_and_survive_a_reboot() {
    let img = scratch_copy(&Artifacts::get().rootfs, "rootfs.ext4");
    let marker = format!("vmm-blk-marker-{}", std::process::id());
    let out = Guest::new()
        .no_initrd()
        .drive(&img, "rootfs", false, true)
        .cmd(&format!(
            "busybox sh -c 'echo {marker} > /root/marker && sync'"
        ))
        .run();
    assert_eq!(guest_exit_status(&out.output), Some(0), "{}", out.output);
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker written in the guest is not in the host image"
    );
    let out = Guest::new()
        .no_initrd()
        .drive(&img, "rootfs", false, true)
        .cmd("busybox sh -c 'echo READ=$(cat /root/marker)'")
        .run();
    assert_eq!(guest_value(&out, "READ"), marker, "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn read_only_drive_refuses_writes_and_the_file_is_unchanged() {
    let a = Artifacts::get();
    let root = scratch_copy(&a.rootfs, "rootfs.ext4");
    let data = scratch_copy(&a.rootfs, "data.ext4");
    let before = sha(&data);
    // Raw writes to the read-only disk must fail; so must mounting it read-write and writing.
    let out = Guest::new()
        .no_initrd()
        .drive(&root, "rootfs", false, true)
        .drive(&data, "data", true, false)
        .cmd(
            "busybox sh -c 'dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null && echo RAW=written || echo RAW=refused; \
             echo RO=$(cat /sys/block/vdb/ro)'",
        )
        .run();
    assert_eq!(guest_value(&out, "RAW"), "refused", "{}", out.output);
    assert_eq!(guest_value(&out, "RO"), "1", "{}", out.output);
    assert!(
        sha(&data) == before,
        "the read-only image changed on the host"
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn two_drives_with_their_serials() {
    let a = Artifacts::get();
    let root = scratch_copy(&a.rootfs, "rootfs.ext4");
    let data = scratch_copy(&a.rootfs, "second.ext4");
    let out = Guest::new()
        .no_initrd()
        .drive(&data, "second-disk", false, false)
        .drive(&root, "root-disk", false, true)
        .cmd("busybox sh -c 'echo A=$(cat /sys/block/vda/serial); echo B=$(cat /sys/block/vdb/serial)'")
        .run();
    // The root drive is attached first whatever the flag order, so it is vda.
    assert_eq!(guest_value(&out, "A"), "root-disk", "{}", out.output);
    assert_eq!(guest_value(&out, "B"), "second-disk", "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn hwrng_gives_data_and_the_crng_is_ready_before_init() {
    let out = Guest::new()
        .cmd(
            "busybox sh -c 'echo HWRNG=$(head -c 64 /dev/hwrng | wc -c); \
             echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
             dmesg | grep -q crng.init.done && echo CRNG=ready || echo CRNG=waiting'",
        )
        .run();
    assert_eq!(guest_value(&out, "HWRNG"), "64", "{}", out.output);
    assert!(
        guest_value(&out, "RNG").starts_with("virtio_rng"),
        "{}",
        out.output
    );
    assert_eq!(guest_value(&out, "CRNG"), "ready", "{}", out.output);
}
