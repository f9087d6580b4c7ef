//! The orchestrator: a daemon and CLI that runs one jailed `vmm` per workload, leases IPs,
//! injects manifests over vsock and uses snapshot/restore for hibernation. It reaches `vmm`
//! only through its API socket and command line. The daemon is filled in by the
//! "Orchestrator" issue; the `jailer` binary that confines one `vmm` is in place.

pub mod jailer;
