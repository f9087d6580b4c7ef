#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. setup without the demo (installs, builds the kernel/workspace/images; cached),
#   2. format and lint gates,
#   3. host tests: unit tests and tiny-guest KVM tests on this machine's /dev/kvm; the
#      real-guest tests show as "ignored" here because they need a genuine KVM,
#   4. the real-guest tests, run with --ignored inside the KVM test host (one boot for all).
# Exits non-zero if any step or test fails.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "setup"
./scripts/setup.sh --no-demo

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "host tests (unit + tiny-guest KVM)"
cargo test --workspace

step "real-guest tests inside the KVM test host"
# Real-guest tests are the ignored tests of the workspace's integration-test binaries.
bins=$(cargo test --workspace --tests --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])
')
[[ -n $bins ]] || { echo "test: no real-guest test binaries found" >&2; exit 1; }
# shellcheck disable=SC2086
tests/testhost/run --timeout 3000 -- tests/testhost/run-tests.sh $bins

step "all tests passed"
