#!/usr/bin/env bash
# Builds the guest kernel (vmlinux and bzImage) from Debian's linux-source-6.1 package with
# tinyconfig + kernel-config/guest.config, and caches the result outside the repo, keyed by a
# hash of the fragment, this script and the source package version. A second run with the
# same inputs only re-links target/guest/{vmlinux,bzImage} to the cached files.
#
# Environment:
#   VMM_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vmm)
#   KERNEL_JOBS     make -j value (default: nproc)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
fragment="$here/guest.config"
tarball=/usr/src/linux-source-6.1.tar.xz
cache_root=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
jobs=${KERNEL_JOBS:-$(nproc)}

if [[ ! -r $tarball ]]; then
    echo "kernel-config/build.sh: $tarball not found; install Debian's linux-source-6.1 (scripts/setup.sh does)" >&2
    exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { cat "$fragment" "$0"; echo "$src_version"; } | sha256sum | cut -c1-16)
out="$cache_root/kernel/$key"
dest="$repo/target/guest"
mkdir -p "$dest"

link_outputs() {
    ln -sf "$out/vmlinux" "$dest/vmlinux"
    ln -sf "$out/bzImage" "$dest/bzImage"
    ln -sf "$out/config" "$dest/kernel.config"
}

if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
    echo "guest kernel: cached ($out)"
    link_outputs
    exit 0
fi

work="$cache_root/kernel-build/$src_version"
mkdir -p "$work" "$out"
if [[ ! -f $work/src/Makefile ]]; then
    echo "guest kernel: unpacking linux-source $src_version into $work/src"
    rm -rf "$work/src" && mkdir -p "$work/src"
    tar -xJf "$tarball" -C "$work/src" --strip-components=1
fi
obj="$work/obj-$key"
rm -rf "$obj" && mkdir -p "$obj"
log="$obj/build.log"

echo "guest kernel: configuring (tinyconfig + $fragment)"
make -C "$work/src" O="$obj" tinyconfig >"$log" 2>&1
"$work/src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment" >>"$log" 2>&1
make -C "$work/src" O="$obj" olddefconfig >>"$log" 2>&1

# Every option the fragment asks for must have survived olddefconfig; a silently dropped
# dependency would give a kernel that boots but lacks a device.
missing=0
while IFS= read -r line; do
    case $line in
        CONFIG_*=*) grep -qxF "$line" "$obj/.config" || { echo "guest kernel: option not applied: $line" >&2; missing=1; } ;;
        "# CONFIG_"*" is not set") grep -qxF "$line" "$obj/.config" || { echo "guest kernel: option not applied: $line" >&2; missing=1; } ;;
    esac
done <"$fragment"
if ((missing)); then
    echo "guest kernel: config check failed; see $obj/.config" >&2
    exit 1
fi

echo "guest kernel: building with -j$jobs (about 5 minutes on 2 cores; log: $log)"
start=$(date +%s)
make -C "$work/src" O="$obj" -j"$jobs" vmlinux bzImage >>"$log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null || break
    n=$(find "$obj" -name '*.o' 2>/dev/null | wc -l)
    echo "guest kernel: ... $(( $(date +%s) - start ))s, $n objects built"
done
if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    echo "guest kernel: build failed; full log: $log" >&2
    exit 1
fi
cp "$obj/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$obj/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$obj/.config" "$out/config"
rm -rf "$obj"
echo "guest kernel: built in $(( $(date +%s) - start ))s -> $out"
link_outputs
