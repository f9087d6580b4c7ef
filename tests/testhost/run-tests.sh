#!/usr/bin/env bash
# Runs inside the KVM test host: each given test binary with --ignored (the real-guest
# tests), one test at a time. Exits 1 if any binary fails.
set -u
failed=0
for bin in "$@"; do
    echo "--- $(basename "$bin")"
    "$bin" --ignored --test-threads 1 || failed=1
done
exit $failed
