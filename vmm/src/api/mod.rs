//! The control API: REST over a unix socket, shaped like Firecracker's so its tooling and
//! habits carry over (`vmm/api/openapi.yaml` documents every endpoint).
//!
//! Boundary: this module never touches KVM or a device. The `vmm_api` thread runs axum on a
//! single-threaded tokio runtime; each request is routed and parsed by the pure
//! [`parse_request`] (fuzzable, no sockets), becomes a [`VmmAction`], and goes to the event
//! loop as an [`ApiRequest`] over a std channel plus a write to an [`EventFd`] the loop
//! polls. The loop answers through [`ApiRequest::respond`]; the HTTP handler awaits that
//! answer without blocking the runtime, so a slow VMM or a slow client stalls nothing else.
//!
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd

mod parse;
mod server;
mod types;

pub use parse::{allowed_methods, parse_request, MAX_BODY_BYTES};
pub use server::{ApiServer, ApiServerConfig, ApiServerError};
pub use types::{
    DriveOverride, EntropyBody, MemBackend, MemBackendType, NetworkOverride, RateLimiter,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType, TokenBucket, VsockOverride,
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{BootSource, DriveConfig, MachineConfig, NetConfig, VmConfig, VsockConfig};

/// What the API asks the VMM to do. One variant per operation in `openapi.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /drives/{drive_id}`; the path id equals the body's `drive_id`.
    PutDrive(DriveConfig),
    /// `PUT /network-interfaces/{iface_id}`; the path id equals the body's `iface_id`.
    PutNetworkInterface(NetConfig),
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `PUT /entropy`.
    PutEntropy(EntropyBody),
    /// `PUT /actions {"action_type": "InstanceStart"}`.
    InstanceStart,
    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`.
    SendCtrlAltDel,
    /// `PATCH /vm {"state": "Paused"}`.
    Pause,
    /// `PATCH /vm {"state": "Resumed"}`.
    Resume,
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `GET /metrics` (our extension: the counters as JSON).
    GetMetrics,
    /// `GET /vm/config`.
    GetVmConfig,
}

impl VmmAction {
    /// The variant's name, for logs and tests (`openapi.yaml` names it in `x-vmm-action`).
    pub fn kind(&self) -> &'static str {
        match self {
            VmmAction::GetInstanceInfo => "GetInstanceInfo",
            VmmAction::PutBootSource(_) => "PutBootSource",
            VmmAction::PutMachineConfig(_) => "PutMachineConfig",
            VmmAction::GetMachineConfig => "GetMachineConfig",
            VmmAction::PutDrive(_) => "PutDrive",
            VmmAction::PutNetworkInterface(_) => "PutNetworkInterface",
            VmmAction::PutVsock(_) => "PutVsock",
            VmmAction::PutEntropy(_) => "PutEntropy",
            VmmAction::InstanceStart => "InstanceStart",
            VmmAction::SendCtrlAltDel => "SendCtrlAltDel",
            VmmAction::Pause => "Pause",
            VmmAction::Resume => "Resume",
            VmmAction::CreateSnapshot(_) => "CreateSnapshot",
            VmmAction::LoadSnapshot(_) => "LoadSnapshot",
            VmmAction::GetMetrics => "GetMetrics",
            VmmAction::GetVmConfig => "GetVmConfig",
        }
    }
}

/// The VMM's successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    /// 200 with the instance description.
    InstanceInfo(InstanceInfo),
    /// 200 with the machine configuration.
    MachineConfig(MachineConfig),
    /// 200 with any JSON body (metrics).
    Json(serde_json::Value),
    /// 200 with the whole VM configuration.
    VmConfig(VmConfig),
}

/// `InstanceInfo` as Firecracker reports it at `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The VM's identifier.
    pub id: String,
    /// One of [`InstanceInfo::NOT_STARTED`], [`InstanceInfo::RUNNING`],
    /// [`InstanceInfo::PAUSED`].
    pub state: String,
    /// This VMM's version.
    pub vmm_version: String,
    /// This VMM's name.
    pub app_name: String,
}

impl InstanceInfo {
    /// Before `InstanceStart` or a snapshot load.
    pub const NOT_STARTED: &'static str = "Not started";
    /// vCPUs are running.
    pub const RUNNING: &'static str = "Running";
    /// vCPUs are paused.
    pub const PAUSED: &'static str = "Paused";
}

/// A refused request: the HTTP status and the `fault_message` the client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// 400 bad request, 404 no such resource, 409 wrong state for this action, 500 the VMM
    /// failed, ...
    pub status: u16,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, message)
    }

    /// 409: the request is valid but not in the VM's current state (e.g. a drive after
    /// start, resume while running).
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, message)
    }

    /// 500: the VMM tried and failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, message)
    }

    /// The JSON body every non-2xx answer carries.
    pub fn fault_json(&self) -> String {
        serde_json::json!({ "fault_message": self.message }).to_string()
    }
}

/// The channel the VMM answers on.
pub type ReplySender = oneshot::Sender<Result<VmmData, ApiError>>;

/// One request from the API thread to the event loop.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the answer goes; [`ApiRequest::respond`] sends on it.
    pub reply: ReplySender,
}

impl ApiRequest {
    /// A request and the receiver for its answer (for tests and in-process callers).
    pub fn new(action: VmmAction) -> (ApiRequest, oneshot::Receiver<Result<VmmData, ApiError>>) {
        let (reply, rx) = oneshot::channel();
        (ApiRequest { action, reply }, rx)
    }

    /// Answers the request. Never blocks; if the client has gone (it timed out or hung
    /// up) the answer is dropped, which is all there is to do.
    pub fn respond(self, r: Result<VmmData, ApiError>) {
        // An Err here only means the receiver is gone; see above.
        let _ = self.reply.send(r);
    }
}
