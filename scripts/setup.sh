#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running demo VM:
#   1. installs the Debian packages the project needs (apt-get; root),
#   2. builds the guest kernel (cached outside the repo by config hash), the workspace and
#      the guest images,
#   3. boots the demo VM and prints its console (skip with --no-demo).
# Safe to re-run: every step skips what is already done.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
demo=1
for arg in "$@"; do
    case $arg in
        --no-demo) demo=0 ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown option $arg" >&2; exit 2 ;;
    esac
done

# Debian packages: qemu (test host and peer VMM), the kernel source for the guest kernel and
# its build tools, Debian's kernel for the test host, busybox for guest images, e2fsprogs
# and cpio for images, socat/python3/iproute2 for tests, nftables for the orchestrator.
packages=(
    qemu-system-x86 linux-source-6.1 linux-image-amd64 busybox-static e2fsprogs cpio
    xz-utils build-essential bc bison flex libelf-dev libssl-dev dwarves kmod
    python3 socat iproute2 file nftables
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "setup: Debian packages present"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

./kernel-config/build.sh
echo "setup: building the workspace (release)"
cargo build --release --workspace --bins
./scripts/build-images.sh

if ((demo)); then
    exec ./scripts/demo.sh
fi
