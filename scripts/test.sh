#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. setup without the demo (installs, builds the kernel/workspace/images; cached),
#   2. format and lint gates,
#   3. host tests: unit tests and tiny-guest KVM tests on this machine's /dev/kvm; the
#      real-guest tests show as "ignored" here because they need a genuine KVM,
#   4. the real-guest tests, run with --ignored inside the KVM test host (one boot for all),
#   5. the benchmark harness in --quick mode: every workload once on both sides; it fails
#      only when a workload breaks, never on timings (benches/README.md).
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
# The test host itself can wedge or panic (TCG soft lockups, and a kernel stack overflow
# in its nested-SVM path, seen under heavy guest I/O; see tests/testhost/run). That is 124
# or 125 from the runner, never a test failure, which exits 1: try such a run again, up to
# three times, as long as the whole suite still fits in CI's 90 minutes (TEST_BUDGET_S from
# the start of this script, default 75 minutes, leaving room for the benchmark step).
budget_s=${TEST_BUDGET_S:-4500}
attempts=3
for attempt in $(seq 1 $attempts); do
    left=$((budget_s - ($(date +%s) - start)))
    attempt_s=$((left < 1500 ? left : 1500))
    set +e
    # shellcheck disable=SC2086
    tests/testhost/run --timeout "$attempt_s" -- tests/testhost/run-tests.sh $bins
    rc=$?
    set -e
    left=$((budget_s - ($(date +%s) - start)))
    if [[ $rc -ne 124 && $rc -ne 125 ]] || [[ $attempt -eq $attempts ]] || ((left < 600)); then
        break
    fi
    echo "test: the test host failed or wedged (status $rc); starting it again (attempt $((attempt + 1)) of $attempts, ${left}s of the budget left)"
done
if [[ $rc -ne 0 ]]; then
    echo "test: real-guest tests failed (status $rc)" >&2
    exit "$rc"
fi

step "benchmark harness --quick"
./scripts/bench.sh --quick

step "all tests passed"
