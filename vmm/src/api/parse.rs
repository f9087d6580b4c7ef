//! Routing and body parsing, with no sockets: `(method, path, body)` in, [`VmmAction`] or a
//! client error out. Everything a client can send reaches this function, so it is the fuzz
//! target; it must never panic.
//!
//! Only the shape is checked here (JSON syntax, known fields, types, required strings not
//! empty, path ids matching body ids). Whether a value can work (vCPU counts, files that
//! exist, the VM's state) is the VMM's to judge.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::types::{
    DriveOverride, MemBackend, MemBackendType, NetworkOverride, SnapshotLoadParams, VsockOverride,
};
use super::{ApiError, VmmAction};
use crate::config::{BootSource, DriveConfig, NetConfig, VsockConfig};

/// Largest request body accepted (413 above it). The biggest real body, a snapshot load
/// with overrides, is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest piece of client input quoted back in an error message.
const MAX_ECHO: usize = 128;

/// The resources, as routed from the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'a> {
    Root,
    BootSource,
    MachineConfig,
    Drive(&'a str),
    NetworkInterface(&'a str),
    Vsock,
    Entropy,
    Actions,
    Vm,
    VmConfig,
    SnapshotCreate,
    SnapshotLoad,
    Metrics,
}

impl<'a> Endpoint<'a> {
    /// Routes a path. Like Firecracker, one trailing `/` is ignored; anything else unknown,
    /// including an empty id (`/drives/`), is no endpoint.
    fn route(path: &'a str) -> Option<Endpoint<'a>> {
        let rest = path.strip_prefix('/')?;
        if rest.is_empty() {
            return Some(Endpoint::Root);
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut parts = rest.split('/');
        let first = parts.next()?;
        let second = parts.next();
        if parts.next().is_some() {
            return None;
        }
        Some(match (first, second) {
            ("boot-source", None) => Endpoint::BootSource,
            ("machine-config", None) => Endpoint::MachineConfig,
            ("drives", Some(id)) if !id.is_empty() => Endpoint::Drive(id),
            ("network-interfaces", Some(id)) if !id.is_empty() => Endpoint::NetworkInterface(id),
            ("vsock", None) => Endpoint::Vsock,
            ("entropy", None) => Endpoint::Entropy,
            ("actions", None) => Endpoint::Actions,
            ("vm", None) => Endpoint::Vm,
            ("vm", Some("config")) => Endpoint::VmConfig,
            ("snapshot", Some("create")) => Endpoint::SnapshotCreate,
            ("snapshot", Some("load")) => Endpoint::SnapshotLoad,
            ("metrics", None) => Endpoint::Metrics,
            _ => return None,
        })
    }

    /// The methods this endpoint serves.
    fn methods(self) -> &'static [&'static str] {
        match self {
            Endpoint::Root | Endpoint::VmConfig | Endpoint::Metrics => &["GET"],
            Endpoint::MachineConfig => &["GET", "PUT"],
            Endpoint::Vm => &["PATCH"],
            Endpoint::BootSource
            | Endpoint::Drive(_)
            | Endpoint::NetworkInterface(_)
            | Endpoint::Vsock
            | Endpoint::Entropy
            | Endpoint::Actions
            | Endpoint::SnapshotCreate
            | Endpoint::SnapshotLoad => &["PUT"],
        }
    }
}

/// The methods served at `path`, or `None` if no endpoint is there (for a 405's `Allow`).
pub fn allowed_methods(path: &str) -> Option<&'static [&'static str]> {
    Endpoint::route(path).map(Endpoint::methods)
}

/// Turns one HTTP request into the action the VMM must take, or the error to answer.
/// `path` is the URI's path without the query; `body` the raw body (ignored for GET).
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<VmmAction, ApiError> {
    let Some(endpoint) = Endpoint::route(path) else {
        return Err(ApiError::not_found(format!(
            "no such endpoint: {}",
            echo(path)
        )));
    };
    let action = match (endpoint, method) {
        (Endpoint::Root, "GET") => VmmAction::GetInstanceInfo,
        (Endpoint::MachineConfig, "GET") => VmmAction::GetMachineConfig,
        (Endpoint::VmConfig, "GET") => VmmAction::GetVmConfig,
        (Endpoint::Metrics, "GET") => VmmAction::GetMetrics,
        (Endpoint::BootSource, "PUT") => boot_source(body)?,
        (Endpoint::MachineConfig, "PUT") => {
            VmmAction::PutMachineConfig(json(body, "machine-config")?)
        }
        (Endpoint::Drive(id), "PUT") => drive(id, body)?,
        (Endpoint::NetworkInterface(id), "PUT") => network_interface(id, body)?,
        (Endpoint::Vsock, "PUT") => vsock(body)?,
        (Endpoint::Entropy, "PUT") => {
            // Firecracker's body is optional here: no body means no rate limiter.
            if is_blank(body) {
                VmmAction::PutEntropy(Default::default())
            } else {
                VmmAction::PutEntropy(json(body, "entropy")?)
            }
        }
        (Endpoint::Actions, "PUT") => actions(body)?,
        (Endpoint::Vm, "PATCH") => vm_state(body)?,
        (Endpoint::SnapshotCreate, "PUT") => snapshot_create(body)?,
        (Endpoint::SnapshotLoad, "PUT") => snapshot_load(body)?,
        (endpoint, method) => {
            return Err(ApiError::new(
                405,
                format!(
                    "{} is not allowed on {}; use {}",
                    echo(method),
                    echo(path),
                    endpoint.methods().join(" or ")
                ),
            ))
        }
    };
    Ok(action)
}

/// Quotes client input in a message, cut short so an error never grows with the input.
fn echo(s: &str) -> String {
    let mut end = s.len().min(MAX_ECHO);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < s.len() { "..." } else { "" };
    format!("{:?}{cut}", &s[..end])
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Parses a body that must be one JSON object of type `T`. serde's message names the
/// unknown field, the wrong type or the syntax error, with line and column.
fn json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(ApiError::bad_request(format!(
            "{what}: the request needs a JSON object body"
        ))),
        Some(b'{') => {
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
        }
        // serde would also accept an array for a struct; that is not our API's shape.
        Some(_) => match serde_json::from_slice::<serde_json::Value>(body) {
            Err(e) => Err(ApiError::bad_request(format!("{what}: {e}"))),
            Ok(_) => Err(ApiError::bad_request(format!(
                "{what}: the body must be a JSON object"
            ))),
        },
    }
}

fn require(what: &str, field: &str, empty: bool) -> Result<(), ApiError> {
    if empty {
        Err(ApiError::bad_request(format!(
            "{what}.{field}: must not be empty"
        )))
    } else {
        Ok(())
    }
}

fn no_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

fn boot_source(body: &[u8]) -> Result<VmmAction, ApiError> {
    let b: BootSource = json(body, "boot-source")?;
    require(
        "boot-source",
        "kernel_image_path",
        no_path(&b.kernel_image_path),
    )?;
    if b.initrd_path.as_deref().is_some_and(no_path) {
        return Err(ApiError::bad_request(
            "boot-source.initrd_path: must not be empty (leave it out for no initrd)",
        ));
    }
    Ok(VmmAction::PutBootSource(b))
}

/// The id in the path names the resource; a body naming another one is a client bug.
fn same_id(what: &str, field: &str, path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what}: the path's id {} differs from the body's {field} {}",
            echo(path_id),
            echo(body_id)
        )))
    }
}

fn drive(path_id: &str, body: &[u8]) -> Result<VmmAction, ApiError> {
    let d: DriveConfig = json(body, "drives")?;
    same_id("drives", "drive_id", path_id, &d.drive_id)?;
    require("drives", "path_on_host", no_path(&d.path_on_host))?;
    Ok(VmmAction::PutDrive(d))
}

fn network_interface(path_id: &str, body: &[u8]) -> Result<VmmAction, ApiError> {
    let n: NetConfig = json(body, "network-interfaces")?;
    same_id("network-interfaces", "iface_id", path_id, &n.iface_id)?;
    require(
        "network-interfaces",
        "host_dev_name",
        n.host_dev_name.is_empty(),
    )?;
    Ok(VmmAction::PutNetworkInterface(n))
}

fn vsock(body: &[u8]) -> Result<VmmAction, ApiError> {
    let v: VsockConfig = json(body, "vsock")?;
    require("vsock", "uds_path", no_path(&v.uds_path))?;
    Ok(VmmAction::PutVsock(v))
}

/// `PUT /actions`. `FlushMetrics` is Firecracker's, for its metrics file; metrics here are
/// read with `GET /metrics`, so serde refuses it by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
}

fn actions(body: &[u8]) -> Result<VmmAction, ApiError> {
    let a: ActionBody = json(body, "actions")?;
    Ok(match a.action_type {
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
    })
}

/// `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmState,
}

#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

fn vm_state(body: &[u8]) -> Result<VmmAction, ApiError> {
    let v: VmStateBody = json(body, "vm")?;
    Ok(match v.state {
        VmState::Paused => VmmAction::Pause,
        VmState::Resumed => VmmAction::Resume,
    })
}

fn snapshot_create(body: &[u8]) -> Result<VmmAction, ApiError> {
    let s: super::SnapshotCreateParams = json(body, "snapshot/create")?;
    require(
        "snapshot/create",
        "snapshot_path",
        no_path(&s.snapshot_path),
    )?;
    require(
        "snapshot/create",
        "mem_file_path",
        no_path(&s.mem_file_path),
    )?;
    Ok(VmmAction::CreateSnapshot(s))
}

/// `PUT /snapshot/load` as sent: Firecracker's fields (the memory file either as
/// `mem_backend` or as the older `mem_file_path`) plus our overrides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    /// Firecracker's; accepted when false, as its clients send it.
    #[serde(default)]
    enable_diff_snapshots: bool,
    /// Firecracker's; accepted when false.
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
}

fn snapshot_load(body: &[u8]) -> Result<VmmAction, ApiError> {
    const WHAT: &str = "snapshot/load";
    let s: SnapshotLoadBody = json(body, WHAT)?;
    require(WHAT, "snapshot_path", no_path(&s.snapshot_path))?;
    let mem_backend = match (s.mem_backend, s.mem_file_path) {
        (Some(b), None) => b,
        (None, Some(path)) => MemBackend {
            backend_type: MemBackendType::File,
            backend_path: path,
        },
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "{WHAT}: mem_backend is required"
            )))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "{WHAT}: give mem_backend or mem_file_path, not both"
            )))
        }
    };
    require(
        WHAT,
        "mem_backend.backend_path",
        no_path(&mem_backend.backend_path),
    )?;
    if s.enable_diff_snapshots || s.track_dirty_pages {
        return Err(ApiError::bad_request(format!(
            "{WHAT}: diff snapshots and dirty page tracking are not supported; \
             leave enable_diff_snapshots and track_dirty_pages out or false"
        )));
    }
    let mut seen = HashSet::new();
    for o in &s.network_overrides {
        require(WHAT, "network_overrides.iface_id", o.iface_id.is_empty())?;
        require(
            WHAT,
            "network_overrides.host_dev_name",
            o.host_dev_name.is_empty(),
        )?;
        if !seen.insert(o.iface_id.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{WHAT}: network_overrides names iface_id {} twice",
                echo(&o.iface_id)
            )));
        }
    }
    let mut seen = HashSet::new();
    for o in &s.drive_overrides {
        require(WHAT, "drive_overrides.drive_id", o.drive_id.is_empty())?;
        require(
            WHAT,
            "drive_overrides.path_on_host",
            no_path(&o.path_on_host),
        )?;
        if !seen.insert(o.drive_id.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{WHAT}: drive_overrides names drive_id {} twice",
                echo(&o.drive_id)
            )));
        }
    }
    if let Some(v) = &s.vsock_override {
        require(WHAT, "vsock_override.uds_path", no_path(&v.uds_path))?;
    }
    Ok(VmmAction::LoadSnapshot(SnapshotLoadParams {
        snapshot_path: s.snapshot_path,
        mem_backend,
        resume_vm: s.resume_vm,
        network_overrides: s.network_overrides,
        drive_overrides: s.drive_overrides,
        vsock_override: s.vsock_override,
    }))
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
