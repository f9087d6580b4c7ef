#!/usr/bin/env bash
# Runs inside the KVM test host: each given test binary with --ignored (the real-guest
# tests), one test at a time. With VMM_TEST_JAILER set, every VMM runs under that jailer
# (tests/src/jail.rs). Exits 1 if any binary fails. After each binary it prints
# `run-tests: DONE <binary> <status>`, so a caller whose test host wedged part-way can start
# a fresh one with only the binaries not yet done (scripts/test.sh does).
#
# The boot tests go first: they include the 4 GiB guest, which was seen to stall the
# emulated test host when it ran after the bulk network transfer. Scratch images the tests
# leave in /tmp (a tmpfs here) are removed between binaries to keep the test host's memory
# free.
set -u
failed=0
# Known defects excluded from the gate would be listed here and printed as SKIPPING (never
# silent); there are none. (ping_and_256_mib_tcp_both_ways used to stall about 1 run in 3:
# the guest stopped running its own timers; it passes since the runner wakes an idle-halted
# test host CPU, see tests/testhost/run.)
skips=()
ordered=()
for bin in "$@"; do [[ $(basename "$bin") == boot-* ]] && ordered+=("$bin"); done
for bin in "$@"; do [[ $(basename "$bin") != boot-* ]] && ordered+=("$bin"); done
for bin in "${ordered[@]}"; do
    echo "--- $(basename "$bin")"
    "$bin" --ignored --test-threads 1 "${skips[@]}"
    status=$?
    [[ $status -eq 0 ]] || failed=1
    echo "run-tests: DONE $(basename "$bin") $status"
    rm -rf /tmp/vmm-test-* /tmp/vsock-* /tmp/vmm-snapshot-* /run/vmm-test-jails /run/vmm-test-bin-* 2>/dev/null
done
exit $failed
