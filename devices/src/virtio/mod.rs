//! Virtio devices over the virtio-mmio transport.
//!
//! The boundary: [`mmio::MmioTransport`] speaks the register protocol with the guest driver
//! (feature negotiation, queue setup, status) and hands the configured queues to a
//! [`VirtioDevice`] when the driver sets DRIVER_OK. The device then runs on the VMM's event
//! loop (event-manager), woken by one [`EventFd`] per queue, and tells the guest about used
//! buffers through a [`VirtioInterrupt`]. Nothing here touches KVM: the VMM registers the
//! queue EventFds as ioeventfds and the interrupt EventFd as an irqfd.

pub mod block;
pub mod common;
pub mod mmio;
pub mod net;
pub mod queue_handler;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use common::DeviceCommon;
pub use mmio::{
    MmioRestoreError, MmioState, MmioTransport, QueueConfigState, QueuePosition, TransportError,
    MMIO_SIZE,
};

/// Device type of virtio-net (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
/// Device type of virtio-blk (virtio 1.2 §5.2).
pub const TYPE_BLOCK: u32 = 2;
/// Device type of virtio-rng (virtio 1.2 §5.4).
pub const TYPE_RNG: u32 = 4;
/// Device type of virtio-vsock (virtio 1.2 §5.10).
pub const TYPE_VSOCK: u32 = 19;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest OS has found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver has acknowledged the features it understands; negotiation is over.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver has given up on the device.
    pub const FAILED: u32 = 128;
}

/// Feature bit: the device follows virtio 1.x, not legacy (virtio 1.2 §6). Bit number.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the driver may use indirect descriptors (virtio 1.2 §2.7.5.3). Bit number.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// InterruptStatus bit: a queue has new used buffers (virtio 1.2 §4.2.2).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the configuration space changed (virtio 1.2 §4.2.2).
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Feature mask for a bit number.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Why a device refused activation. The transport answers with DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device is already running.
    #[error("device already activated")]
    AlreadyActivated,
    /// The transport passed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// Waking the event loop failed.
    #[error("cannot signal the activation event")]
    EventFd(#[source] std::io::Error),
}

/// How a device tells the guest that something happened. Generic so tests can count
/// signals instead of writing an irqfd.
pub trait VirtioInterrupt: Send + Sync {
    /// A queue has new entries in its used ring.
    fn signal_used_queue(&self);
    /// The configuration space changed (or the device needs a reset).
    fn signal_config_change(&self);
}

/// [`VirtioInterrupt`] over a KVM irqfd: sets the bit in the InterruptStatus register the
/// transport shares, then raises the line. The guest reads the status and acks it through
/// the transport (virtio 1.2 §4.2.2 InterruptStatus / InterruptACK).
#[derive(Debug)]
pub struct IrqfdInterrupt {
    irqfd: EventFd,
    status: Arc<AtomicU32>,
}

impl IrqfdInterrupt {
    /// Wraps `irqfd`; `status` is the InterruptStatus shared with the transport.
    pub fn new(irqfd: EventFd, status: Arc<AtomicU32>) -> IrqfdInterrupt {
        IrqfdInterrupt { irqfd, status }
    }

    fn raise(&self, bit: u32) {
        // SeqCst so the guest, on taking the interrupt, sees the bit set.
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            // Host-side failure (not guest-triggerable): an eventfd write only fails if the
            // counter would overflow, which needs 2^64 unacknowledged writes.
            tracing::error!(error = %e, "virtio: irqfd write failed");
        }
    }
}

impl VirtioInterrupt for IrqfdInterrupt {
    fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_BUFFER);
    }

    fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }
}

/// A virtio device model behind a transport.
///
/// Queue notifications: the device creates one [`EventFd`] per queue at construction and
/// exposes them through [`VirtioDevice::queue_events`]. The transport keeps clones of them
/// (same underlying eventfd) which the VMM registers as ioeventfds, and the device's event
/// handler registers its own copies on the event loop once activated. This keeps
/// `activate` free of fd plumbing.
pub trait VirtioDevice: Send {
    /// The transport-facing state the default methods below read.
    fn common(&self) -> &DeviceCommon;
    /// Mutable access to the same state.
    fn common_mut(&mut self) -> &mut DeviceCommon;
    /// Device type (virtio 1.2 §5), e.g. [`TYPE_BLOCK`].
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }
    /// One notification EventFd per queue, in queue order.
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_events()
    }
    /// Written by `activate` (on a vCPU thread) to wake the event loop.
    fn activate_evt(&self) -> &EventFd {
        self.common().activate_evt()
    }
    /// Features the device offers.
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// Features the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64 {
        self.common().acked_features()
    }
    /// Records the features the driver accepted, at FEATURES_OK.
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().set_acked_features(features);
    }
    /// Reads the device configuration space at `offset`. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.common().read_config(offset, data);
    }
    /// Writes the device configuration space at `offset`. Unknown or read-only bytes are
    /// ignored; by default every byte is (none of the devices here has a writable field).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
}

/// Implements [`VirtioDevice::common`] and [`VirtioDevice::common_mut`] over the
/// [`DeviceCommon`] field `$field`, inside an `impl VirtioDevice` block.
macro_rules! common_accessors {
    ($field:ident) => {
        fn common(&self) -> &$crate::virtio::DeviceCommon {
            &self.$field
        }

        fn common_mut(&mut self) -> &mut $crate::virtio::DeviceCommon {
            &mut self.$field
        }
    };
}
pub(crate) use common_accessors;

/// Declares a struct of `AtomicU64` counters with a `snapshot()` listing them by name, so
/// the list the API reports cannot drift from the fields.
macro_rules! counters {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* $field:ident,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: std::sync::atomic::AtomicU64,)*
        }

        impl $name {
            /// Every counter as (name, value), in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((
                    stringify!($field),
                    self.$field.load(std::sync::atomic::Ordering::Relaxed),
                ),)*]
            }
        }
    };
}
pub(crate) use counters;

/// Adds `n` to a counter.
pub(crate) fn count(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Event-manager data tag of a device's activation EventFd.
pub const ACTIVATE_EVENT: u32 = 0;
/// Event-manager data tag of queue 0's EventFd; queue `i` is tagged `QUEUE_EVENT_BASE + i`.
pub const QUEUE_EVENT_BASE: u32 = 1;

/// Puts a device's activation EventFd on the event loop (from `MutEventSubscriber::init`).
pub(crate) fn register_activate_event(ops: &mut EventOps, evt: &EventFd, device: &str) {
    if let Err(e) = ops.add(Events::with_data(evt, ACTIVATE_EVENT, EventSet::IN)) {
        // Host-side failure: the device will never start. Not guest-triggerable.
        tracing::error!(error = %e, device, "cannot register the activation event");
    }
}

/// Puts a device's queue EventFds on the event loop, tagged `QUEUE_EVENT_BASE + index`.
/// Returns whether all of them are registered.
pub(crate) fn register_queue_events(ops: &mut EventOps, evts: &[EventFd], device: &str) -> bool {
    let mut ok = true;
    for (i, evt) in evts.iter().enumerate() {
        let tag = u32::try_from(i).map_or(u32::MAX, |i| QUEUE_EVENT_BASE.saturating_add(i));
        match ops.add(Events::with_data(evt, tag, EventSet::IN)) {
            Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {}
            Err(e) => {
                tracing::error!(error = %e, device, queue = i, "cannot register a queue event");
                ok = false;
            }
        }
    }
    ok
}

/// Copies the part of `config` that `[offset, offset + data.len())` overlaps into `data`
/// and zeroes the rest. Any offset and width is safe.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        if let (Some(dst), Some(src)) = (data.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_clipped_and_zero_filled() {
        let config = [1u8, 2, 3, 4, 5];
        let mut d = [0xffu8; 4];
        read_config_bytes(&config, 3, &mut d);
        assert_eq!(d, [4, 5, 0, 0]);
        let mut d = [0xffu8; 2];
        read_config_bytes(&config, 5, &mut d);
        assert_eq!(d, [0, 0]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0, 0]);
        let mut d = [0u8; 1];
        read_config_bytes(&config, 1, &mut d);
        assert_eq!(d, [2]);
    }

    #[test]
    fn irqfd_interrupt_sets_status_and_raises_the_line() {
        let status = Arc::new(AtomicU32::new(0));
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = IrqfdInterrupt::new(fd.try_clone().unwrap(), status.clone());
        irq.signal_used_queue();
        assert_eq!(status.load(Ordering::SeqCst), INTERRUPT_USED_BUFFER);
        irq.signal_config_change();
        assert_eq!(
            status.load(Ordering::SeqCst),
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        );
        assert_eq!(fd.read().unwrap(), 2);
    }
}
