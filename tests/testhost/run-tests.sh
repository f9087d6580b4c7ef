#!/usr/bin/env bash
# Runs inside the KVM test host: each given test binary with --ignored (the real-guest
# tests), one test at a time. Exits 1 if any binary fails.
#
# The boot tests go first: they include the 4 GiB guest, which was seen to stall the
# emulated test host when it ran after the bulk network transfer. Scratch images the tests
# leave in /tmp (a tmpfs here) are removed between binaries to keep the test host's memory
# free.
set -u
failed=0
ordered=()
for bin in "$@"; do [[ $(basename "$bin") == boot-* ]] && ordered+=("$bin"); done
for bin in "$@"; do [[ $(basename "$bin") != boot-* ]] && ordered+=("$bin"); done
for bin in "${ordered[@]}"; do
    echo "--- $(basename "$bin")"
    "$bin" --ignored --test-threads 1 || failed=1
    rm -rf /tmp/vmm-test-* /tmp/vsock-* 2>/dev/null
done
exit $failed
