//! virtio-rng, the entropy device (virtio 1.2 §5.4): fills the guest's buffers with bytes
//! from the host kernel's `getrandom(2)`.
//!
//! `device` holds the state machine and the request loop, `event_handler` the event-loop
//! glue, `metrics` the counters.

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::persist::RngState;
pub use device::Rng;
pub use metrics::RngMetrics;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// At most this many random bytes per chain, to bound the work one request causes.
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;
/// At most this many descriptors of a chain are looked at.
pub const MAX_DESCRIPTORS_PER_CHAIN: usize = 256;

/// Errors creating an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// An EventFd could not be created.
    #[error("cannot create an EventFd")]
    EventFd(#[source] std::io::Error),
}
