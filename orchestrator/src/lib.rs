//! The orchestrator: a daemon and CLI that runs one jailed `vmm` per workload, leases IPs,
//! injects manifests over vsock and uses snapshot/restore for hibernation. It reaches `vmm`
//! only through the jailer, its command line and its vsock socket.
//!
//! - `daemon`: `orchestrator serve` (control API, VM lifecycle, reconciler);
//! - `cli` and `client`: the `orchestrator` command line, a client of the control socket;
//! - `manifest` (workload manifests: parse, validate, hash), `store` (SQLite state:
//!   manifests, VMs, IP leases, snapshots, events), `net_addr` (subnet, CIDR, per-VM MAC),
//!   `netsetup` (per-VM network namespaces, veth, bridge, NAT);
//! - `jailer`: the `jailer` binary that confines one `vmm`.

pub mod cli;
pub mod client;
pub mod daemon;
pub mod jailer;
pub mod manifest;
pub mod net_addr;
pub mod netsetup;
pub mod store;
