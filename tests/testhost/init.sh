#!/bin/sh
# PID 1 of the KVM test host (busybox sh). Loads the 9p modules, mounts the host's root
# read-only and the repository read-write at their host paths, loads kvm_amd, runs the
# command written by tests/testhost/run and reports its status as `TESTHOST-EXIT: N`.
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
fail() { echo TESTHOST-BEGIN; echo "testhost-init: $*"; echo "TESTHOST-EXIT: 125"; busybox poweroff -f; }
for m in /mods/*; do busybox insmod "$m" || fail "insmod $m failed"; done
for arg in $(busybox cat /proc/cmdline); do
    case $arg in
        testhost.repo=*) repo=${arg#testhost.repo=} ;;
        testhost.run=*) run=${arg#testhost.run=} ;;
    esac
done
opts=trans=virtio,version=9p2000.L,msize=512000
busybox mount -t 9p -o "$opts,ro,cache=loose" hostroot /host || fail "mounting the host root over 9p failed"
busybox mount -t proc proc /host/proc
busybox mount -t sysfs sysfs /host/sys
busybox mount -t devtmpfs devtmpfs /host/dev
busybox mkdir -p /host/dev/pts /host/dev/shm
busybox mount -t devpts devpts /host/dev/pts
busybox mount -t tmpfs tmpfs /host/dev/shm
busybox mount -t tmpfs -o mode=1777 tmpfs /host/tmp
busybox mount -t tmpfs tmpfs /host/run
# cgroup v2 only (this machine has v1 hierarchies plus an empty v2 mount), so the jailer is
# tested on both kinds of host; controllers are enabled for the children of the root.
busybox mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || fail "mounting cgroup2 failed"
for c in memory cpu pids; do
    echo "+$c" > /host/sys/fs/cgroup/cgroup.subtree_control || echo "testhost-init: cannot enable the cgroup2 $c controller"
done
busybox mount -t tmpfs tmpfs /host/var/tmp
# The repository last: it may live under one of the tmpfs mounts above (a clone in /tmp).
busybox mkdir -p "/host$repo" 2>/dev/null
busybox mount -t 9p -o "$opts" repo "/host$repo" || fail "mounting the repository over 9p failed"
busybox chroot /host /sbin/modprobe kvm_amd || fail "modprobe kvm_amd failed"
# Entropy for the test host itself, so nothing in it waits on getrandom().
busybox chroot /host /sbin/modprobe virtio_rng 2>/dev/null
# Networking the tests and the orchestrator build: taps, veth pairs, bridges, nftables NAT.
for m in tun veth bridge nf_tables nft_chain_nat nft_nat nft_masq nft_ct; do
    busybox chroot /host /sbin/modprobe "$m" || fail "modprobe $m failed"
done
busybox chroot /host /bin/sh -c "ip link set lo up" 2>/dev/null
echo TESTHOST-BEGIN
busybox chroot /host /usr/bin/env -i HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash "$run/cmd.sh"
echo "TESTHOST-EXIT: $?"
busybox sync
busybox poweroff -f
