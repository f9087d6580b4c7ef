//! virtio-vsock (virtio 1.2 §5.10) with a Firecracker-compatible host side over unix
//! sockets.
//!
//! - Host to guest: a host client connects to the device's unix socket and writes
//!   `CONNECT <port>\n`; once the guest accepts, the device answers `OK <host_port>\n` and
//!   the stream carries the connection's bytes.
//! - Guest to host: a guest connection to CID 2 port P is connected to the unix socket
//!   `<uds_path>_P`.
//!
//! This module holds the public type, constants, config space and errors. The device state
//! machine and queue loops are in `device`, TX/RX chain parsing in `packet`, one
//! connection's state machine and credit accounting in `connection`, the host sockets and
//! the connection table in `muxer`, the event-loop glue in `event_handler`, counters in
//! `metrics`.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;

use std::path::PathBuf;

pub use device::persist::VsockState;
pub use device::Vsock;
pub use metrics::VsockMetrics;
pub use muxer::{EventRegistry, NoEventLoop};

/// The host's well-known CID (virtio 1.2 §5.10.4).
pub const HOST_CID: u64 = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the RX queue (device to guest packets).
pub const RX_QUEUE: usize = 0;
/// Index of the TX queue (guest to device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues (virtio 1.2 §5.10.2).
pub const NUM_QUEUES: usize = 3;
/// Bytes of config space: `le64 guest_cid` (virtio 1.2 §5.10.4).
pub const CONFIG_LEN: usize = 8;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Event-manager tag of the listening unix socket.
pub const LISTENER_EVENT: u32 = 8;
/// Event-manager tag of the housekeeping timer (timeouts).
pub const TIMER_EVENT: u32 = 9;
/// Event-manager tag of every host stream (handshakes and connections); the fd says which.
pub const HOST_STREAM_EVENT: u32 = 10;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2, 0xffffffff) or does not fit in 32 bits
    /// (virtio 1.2 §5.10.4).
    #[error("guest CID {0} is reserved or out of range (must be 3..0xffffffff)")]
    InvalidCid(u64),
    /// The listening unix socket could not be created.
    #[error("cannot listen on unix socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The bind or fcntl failure.
        #[source]
        source: std::io::Error,
    },
    /// An EventFd could not be created.
    #[error("cannot create an EventFd")]
    EventFd(#[source] std::io::Error),
    /// The housekeeping timer could not be created.
    #[error("cannot create a timerfd")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// Checks a guest CID: not reserved, upper 32 bits zero (virtio 1.2 §5.10.4).
pub fn validate_cid(cid: u64) -> Result<u64, VsockError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(cid)
    } else {
        Err(VsockError::InvalidCid(cid))
    }
}

/// Builds the config space: `guest_cid` as le64.
pub fn config_space(guest_cid: u64) -> [u8; CONFIG_LEN] {
    guest_cid.to_le_bytes()
}

#[cfg(test)]
mod test_utils;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_range_and_config_layout() {
        for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX, 1 << 32] {
            assert!(matches!(validate_cid(bad), Err(VsockError::InvalidCid(c)) if c == bad));
        }
        assert_eq!(validate_cid(3).unwrap(), 3);
        assert_eq!(validate_cid(0xffff_fffe).unwrap(), 0xffff_fffe);
        assert_eq!(config_space(0x0102_0304), [4, 3, 2, 1, 0, 0, 0, 0]);
    }
}
