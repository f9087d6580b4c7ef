#!/usr/bin/env bash
# Boots the demo VM with `vmm`: the project's guest kernel with guest-init in an initramfs, printing
# guest-init's summary of the machine it sees, then powering off.
# Where this machine's /dev/kvm can boot Linux, the VM runs here; where it cannot (kvm-pvm),
# the demo says so and runs inside the KVM test host (tests/testhost/run).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
g=target/guest
demo_cmd=(target/x86_64-unknown-linux-gnu/release/vmm --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio" --vcpus 2
    --memory-mib 256 --boot-timer --cmdline "console=ttyS0 reboot=k panic=-1 quiet")
if [[ -e /sys/module/kvm_amd || -e /sys/module/kvm_intel ]] && [[ ! -e /sys/module/kvm_pvm ]]; then
    echo "demo: booting on this machine's KVM"
    exec "${demo_cmd[@]}"
fi
echo "demo: this machine's /dev/kvm cannot boot Linux ($( [[ -e /sys/module/kvm_pvm ]] && echo kvm-pvm || echo 'no hardware KVM')); running the demo inside the KVM test host (about 15 s)"
exec tests/testhost/run --timeout 300 -- "${demo_cmd[@]}"
