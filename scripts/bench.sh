#!/usr/bin/env bash
# Runs the side-by-side benchmark harness (benches/README.md): builds the release `vmm`,
# `orchestrator`, `jailer` and `bench` binaries (static, under
# target/x86_64-unknown-linux-gnu/release: .cargo/config.toml), then runs `bench ARGS`.
# Where this machine's /dev/kvm cannot boot Linux, `bench` itself re-runs inside the KVM
# test host (tests/testhost/run).
#
# Usage: scripts/bench.sh [--runs N] [--quick] [--only NAME,...] [--vm-timeout SECS]
# Needs the guest kernel, initramfs and rootfs under target/guest/ (scripts/setup.sh
# builds them; the rootfs only for the orchestrator metrics).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
for f in target/guest/vmlinux target/guest/initramfs.cpio; do
    [[ -e $f ]] || { echo "bench: $f is missing; run scripts/setup.sh" >&2; exit 1; }
done
cargo build --release --quiet -p vmm -p orchestrator -p benches
exec "$repo/target/x86_64-unknown-linux-gnu/release/bench" "$@"
