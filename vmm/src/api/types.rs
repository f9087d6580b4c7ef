//! Request bodies the API defines itself (the VM's configuration sections live in
//! `crate::config`). Field names follow Firecracker's API; our extensions are marked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's token bucket: `size` tokens refilled over `refill_time` ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Bucket size in tokens (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

/// Firecracker's rate limiter: a bandwidth and an operations bucket, both optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /entropy`: Firecracker's virtio-rng device; `{}` is a valid body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyBody {
    /// Limits how fast the guest may draw entropy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Kind of snapshot. Only full snapshots exist here; `Diff` is refused by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// `Full` when absent.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the vmstate file goes.
    pub snapshot_path: PathBuf,
    /// Where the guest memory file goes.
    pub mem_file_path: PathBuf,
}

/// How guest memory is restored. Only files (mapped copy-on-write) exist here; `Uffd` is
/// refused by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map the memory file privately.
    #[default]
    File,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// `File`.
    pub backend_type: MemBackendType,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// Re-points a restored network interface at another host tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface as it was snapshotted.
    pub iface_id: String,
    /// The tap to use now.
    pub host_dev_name: String,
}

/// Re-points a restored drive at another backing file (our extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive as it was snapshotted.
    pub drive_id: String,
    /// The file to use now.
    pub path_on_host: PathBuf,
}

/// Moves a restored vsock device's host socket (our extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The unix socket to listen on now.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`, normalised: the legacy `mem_file_path` becomes a `File` backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// The vmstate file.
    pub snapshot_path: PathBuf,
    /// The guest memory file.
    pub mem_backend: MemBackend,
    /// Resume the vCPUs once loaded (otherwise the VM stays paused).
    pub resume_vm: bool,
    /// Taps to use instead of the snapshotted ones.
    pub network_overrides: Vec<NetworkOverride>,
    /// Backing files to use instead of the snapshotted ones (our extension).
    pub drive_overrides: Vec<DriveOverride>,
    /// Host socket to use instead of the snapshotted one (our extension).
    pub vsock_override: Option<VsockOverride>,
}
