#!/usr/bin/env bash
# Builds the guest side: the static guest-init and gtool binaries, an initramfs (newc cpio)
# and an ext4 root filesystem image, both holding guest-init, gtool and Debian's static
# busybox.
#
# Outputs (all under target/guest/):
#   guest-init        static PID 1 (gnu target, +crt-static)
#   gtool             static test/bench helper run inside the guest (crate guest-tools)
#   initramfs.cpio    /init = guest-init, /bin/gtool, /bin/busybox and its applet links,
#                     /dev/console
#   rootfs.ext4       /sbin/init = guest-init, /bin/gtool, the same busybox; 64 MiB, made
#                     with `mkfs.ext4 -d` (no root or loop device needed)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/target/guest"
mkdir -p "$out"
busybox=/bin/busybox
[[ -x $busybox ]] || { echo "build-images: $busybox missing; install busybox-static (scripts/setup.sh does)" >&2; exit 1; }

echo "images: building static guest-init and gtool"
( cd "$repo" &&
    cargo build --quiet --release -p guest-init -p guest-tools )
for bin in guest-init gtool; do
    install -m 0755 "$repo/target/x86_64-unknown-linux-gnu/release/$bin" "$out/$bin"
    if readelf -d "$out/$bin" | grep -q NEEDED; then
        echo "build-images: $bin is dynamically linked; it must be static" >&2
        exit 1
    fi
done

applets=$("$busybox" --list | grep -vx busybox)

# --- initramfs ---------------------------------------------------------------------------
spec="$out/initramfs.spec"
{
    echo "dir /dev 0755"
    echo "nod /dev/console 0600 c 5 1"
    for d in bin sbin proc sys tmp etc root; do echo "dir /$d 0755"; done
    echo "file /init $out/guest-init 0755"
    echo "file /bin/gtool $out/gtool 0755"
    echo "file /bin/busybox $busybox 0755"
    for a in $applets; do echo "slink /bin/$a busybox"; done
} >"$spec"
python3 "$repo/scripts/mkcpio.py" "$spec" "$out/initramfs.cpio"
echo "images: $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))"

# --- ext4 root ---------------------------------------------------------------------------
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,mnt}
install -m 0755 "$out/guest-init" "$root/sbin/init"
install -m 0755 "$out/gtool" "$root/bin/gtool"
install -m 0755 "$busybox" "$root/bin/busybox"
for a in $applets; do ln -sf busybox "$root/bin/$a"; done
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
rm -f "$out/rootfs.ext4.tmp"
mkfs.ext4 -q -F -L rootfs -d "$root" "$out/rootfs.ext4.tmp" 64M >/dev/null
mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
echo "images: $out/rootfs.ext4 (64 MiB)"
