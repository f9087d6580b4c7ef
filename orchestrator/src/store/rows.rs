//! Typed records of the state database and their conversion from rows. Reading happens in
//! two steps: `from_row` takes the SQLite values as stored (so rusqlite's errors stay
//! rusqlite errors), `into_record` checks and converts them, naming the row and column of
//! anything that does not fit.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rusqlite::Row;
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use crate::manifest::Manifest;
use crate::net_addr::Mac;

/// Lifecycle state of a VM, as stored in `vms.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Lease taken, VMM not yet ready.
    Creating,
    /// The guest agent answered; the workload runs.
    Running,
    /// Stopped on request.
    Stopped,
    /// The VMM exited unexpectedly.
    Crashed,
    /// Being torn down.
    Destroying,
    /// Snapshotted to disk, no process.
    Hibernated,
}

impl VmState {
    /// Every state.
    pub const ALL: [VmState; 6] = [
        VmState::Creating,
        VmState::Running,
        VmState::Stopped,
        VmState::Crashed,
        VmState::Destroying,
        VmState::Hibernated,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Destroying => "destroying",
            VmState::Hibernated => "hibernated",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown VM state {s:?}"))
    }
}

/// A stored manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    /// Its name (also `manifest.name`).
    pub name: String,
    /// The manifest.
    pub manifest: Manifest,
    /// `Manifest::content_hash` at the time it was stored.
    pub hash: String,
    /// When it was stored, Unix milliseconds.
    pub created_at_ms: i64,
}

/// A stored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmRecord {
    /// The VM id.
    pub id: String,
    /// Name of the manifest it was created from.
    pub manifest: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Leased address.
    pub ip: Option<Ipv4Addr>,
    /// MAC of its NIC.
    pub mac: Mac,
    /// Pid of its jailer/VMM process, while one runs.
    pub pid: Option<u32>,
    /// Start time of that process (`/proc/PID/stat` field 22).
    pub pid_start_time: Option<u64>,
    /// Its jail directory on the host.
    pub jail_dir: Option<PathBuf>,
    /// Its network namespace name.
    pub netns: Option<String>,
    /// Created, Unix milliseconds.
    pub created_at_ms: i64,
    /// Last changed, Unix milliseconds.
    pub updated_at_ms: i64,
    /// Tail of the console output, kept when it crashed or stopped.
    pub last_console: Option<String>,
    /// A host TCP port forwarded to the guest (and waking it).
    pub port_forward: Option<PortForward>,
}

/// A host TCP port forwarded to a port of the guest: the first connection wakes a
/// hibernated VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Port listened on, on the host (all addresses).
    pub host_port: u16,
    /// Port of the guest it connects to.
    pub guest_port: u16,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Sequence number, increasing, never reused.
    pub seq: i64,
    /// When, Unix milliseconds.
    pub time_ms: i64,
    /// The VM concerned, if any.
    pub vm_id: Option<String>,
    /// What happened: `created`, `state`, `destroyed`, `manifest_added`, ...
    pub kind: String,
    /// Details, depending on `kind`.
    pub detail: Value,
}

/// Lease pool usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LeaseUsage {
    /// Addresses leased.
    pub used: u32,
    /// Addresses that can be leased.
    pub total: u32,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRecord {
    /// Snapshot id.
    pub id: i64,
    /// The VM it belongs to.
    pub vm_id: String,
    /// Its kind (defined by the hibernation code).
    pub kind: String,
    /// The VMM state file.
    pub vmstate_path: PathBuf,
    /// The guest memory file.
    pub mem_path: PathBuf,
    /// When it was taken, Unix milliseconds.
    pub created_at_ms: i64,
}

/// Columns read for a `RawVmRow`, in order.
pub(super) const VM_COLUMNS: &str = "id, manifest, state, ip, mac, pid, pid_start_time, \
     jail_dir, netns, created_at, updated_at, last_console, port_forward";

pub(super) struct RawVmRow {
    id: String,
    manifest: String,
    state: String,
    ip: Option<String>,
    mac: String,
    pid: Option<i64>,
    pid_start_time: Option<i64>,
    jail_dir: Option<String>,
    netns: Option<String>,
    created_at: i64,
    updated_at: i64,
    last_console: Option<String>,
    port_forward: Option<String>,
}

impl RawVmRow {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawVmRow {
            id: row.get(0)?,
            manifest: row.get(1)?,
            state: row.get(2)?,
            ip: row.get(3)?,
            mac: row.get(4)?,
            pid: row.get(5)?,
            pid_start_time: row.get(6)?,
            jail_dir: row.get(7)?,
            netns: row.get(8)?,
            created_at: row.get(9)?,
            updated_at: row.get(10)?,
            last_console: row.get(11)?,
            port_forward: row.get(12)?,
        })
    }

    pub(super) fn into_record(self, path: &Path) -> Result<VmRecord, StoreError> {
        let corrupt = |field, reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            row: format!("VM {}", self.id),
            field,
            reason,
        };
        let state = self.state.parse().map_err(|r| corrupt("state", r))?;
        let ip = match &self.ip {
            Some(text) => Some(
                text.parse()
                    .map_err(|_| corrupt("ip", format!("{text:?} is not an IPv4 address")))?,
            ),
            None => None,
        };
        let mac = self
            .mac
            .parse()
            .map_err(|_| corrupt("mac", format!("{:?} is not a MAC address", self.mac)))?;
        let pid = match self.pid {
            Some(p) => Some(u32::try_from(p).map_err(|_| corrupt("pid", format!("{p}")))?),
            None => None,
        };
        let pid_start_time = match self.pid_start_time {
            Some(t) => {
                Some(u64::try_from(t).map_err(|_| corrupt("pid_start_time", format!("{t}")))?)
            }
            None => None,
        };
        let port_forward = match &self.port_forward {
            Some(text) => Some(
                serde_json::from_str(text).map_err(|e| corrupt("port_forward", e.to_string()))?,
            ),
            None => None,
        };
        Ok(VmRecord {
            port_forward,
            state,
            ip,
            mac,
            pid,
            pid_start_time,
            jail_dir: self.jail_dir.map(PathBuf::from),
            id: self.id,
            manifest: self.manifest,
            netns: self.netns,
            created_at_ms: self.created_at,
            updated_at_ms: self.updated_at,
            last_console: self.last_console,
        })
    }
}

pub(super) struct RawManifestRow {
    name: String,
    json: String,
    hash: String,
    created_at: i64,
}

impl RawManifestRow {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawManifestRow {
            name: row.get(0)?,
            json: row.get(1)?,
            hash: row.get(2)?,
            created_at: row.get(3)?,
        })
    }

    pub(super) fn into_record(self, path: &Path) -> Result<ManifestRecord, StoreError> {
        let manifest =
            Manifest::parse(self.json.as_bytes()).map_err(|source| StoreError::StoredManifest {
                path: path.to_path_buf(),
                name: self.name.clone(),
                source,
            })?;
        Ok(ManifestRecord {
            name: self.name,
            manifest,
            hash: self.hash,
            created_at_ms: self.created_at,
        })
    }
}

pub(super) struct RawEventRow {
    seq: i64,
    time: i64,
    vm_id: Option<String>,
    kind: String,
    detail: String,
}

impl RawEventRow {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawEventRow {
            seq: row.get(0)?,
            time: row.get(1)?,
            vm_id: row.get(2)?,
            kind: row.get(3)?,
            detail: row.get(4)?,
        })
    }

    pub(super) fn into_event(self, path: &Path) -> Result<Event, StoreError> {
        let detail = serde_json::from_str(&self.detail).map_err(|err| StoreError::Corrupt {
            path: path.to_path_buf(),
            row: format!("event {}", self.seq),
            field: "detail",
            reason: err.to_string(),
        })?;
        Ok(Event {
            seq: self.seq,
            time_ms: self.time,
            vm_id: self.vm_id,
            kind: self.kind,
            detail,
        })
    }
}

pub(super) fn snapshot_from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: row.get(0)?,
        vm_id: row.get(1)?,
        kind: row.get(2)?,
        vmstate_path: PathBuf::from(row.get::<_, String>(3)?),
        mem_path: PathBuf::from(row.get::<_, String>(4)?),
        created_at_ms: row.get(5)?,
    })
}

/// A lease address as stored.
pub(super) fn parse_ip(path: &Path, text: &str) -> Result<Ipv4Addr, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
        row: format!("lease {text:?}"),
        field: "ip",
        reason: "not an IPv4 address".into(),
    })
}
