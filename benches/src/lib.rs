//! Benchmark harness: runs each workload against this project's stack and against
//! `qemu-system-x86_64 -enable-kvm -M microvm` in the same KVM test host run, and reports
//! min/median/p99 and the ratio ours/peer. Grows with each issue's bench.
//!
//! The `bench` binary (src/bin/bench.rs) drives the runs; this library holds the parts that
//! can be tested without a VM: statistics, smaps parsing, the metric catalog, the report's
//! JSON, table and RESULTS.md section, the VM runner (tested with stand-in processes),
//! the machinery around the test host (progress events, the run journal, the relay), and
//! the orchestrator workloads' API calls and cleanup (tested against a fake daemon).

pub mod control;
pub mod host;
pub mod journal;
pub mod metrics;
pub mod orch;
pub mod progress;
pub mod report;
pub mod smaps;
pub mod snapshot;
pub mod stats;
pub mod testhost;
pub mod vm;
