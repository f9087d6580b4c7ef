//! Benchmark harness: runs each workload against this project's stack and against
//! `qemu-system-x86_64 -enable-kvm -M microvm` in the same KVM test host run, and reports
//! min/median/p99 and the ratio ours/peer. Grows with each issue's bench.
