//! Snapshot state of the virtio-mmio transport: the registers the driver wrote (status,
//! feature and queue selectors, accepted features, each queue's size, ready bit and ring
//! addresses), the InterruptStatus and the config generation.
//!
//! The ring positions (next_avail, next_used) belong to the device, which holds the live
//! `Queue`s once activated; each device's `persist` saves them as [`QueuePosition`]s and the
//! restore here puts them back. Restoring a transport re-runs the checks the guest's own
//! setup went through (features offered, queue sizes, rings inside guest memory), so a
//! hostile or stale state file is refused, never trusted.
//!
//! A child module of `mmio` so it can read the transport's private registers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, QueueConfig, TransportError};
use crate::virtio::status::{DRIVER_OK, FEATURES_OK};
use crate::virtio::{
    feature, ActivateError, VirtioDevice, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER,
    VIRTIO_F_VERSION_1,
};

/// One queue's registers as the driver wrote them (virtio 1.2 §4.2.2: QueueNum,
/// QueueReady, QueueDesc, QueueDriver, QueueDevice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    /// QueueNum, raw (checked at activation).
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring (driver area) address.
    pub driver: u64,
    /// Used ring (device area) address.
    pub device: u64,
}

/// Where a running queue stands: the device's private ring positions (virtio 1.2 §2.7.13,
/// §2.7.14), kept by the device, not visible in any register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// Next available ring entry the device will read.
    pub next_avail: u16,
    /// Next used ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX in use on this queue.
    pub event_idx: bool,
}

impl QueuePosition {
    /// The position of a live queue.
    pub fn of(q: &Queue) -> QueuePosition {
        QueuePosition {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// Moves `q` to this position.
    pub fn apply(&self, q: &mut Queue) {
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
    }
}

/// The transport's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// DeviceID, checked against the device on restore.
    pub device_type: u32,
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote (accepted at FEATURES_OK).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Each queue's registers, in queue order.
    pub queues: Vec<QueueConfigState>,
}

/// Why a saved transport state could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    /// The transport could not be built around the device.
    #[error("cannot build the transport")]
    Transport(#[source] TransportError),
    /// The state is for another kind of device.
    #[error("state is for device type {saved}, the device is type {actual}")]
    DeviceType {
        /// Type in the state.
        saved: u32,
        /// Type of the device given.
        actual: u32,
    },
    /// The state has a different number of queues than the device.
    #[error("state has {saved} queues, the device has {actual}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// The accepted features are not a valid subset of what the device offers.
    #[error("accepted features {acked:#x} are not offered by the device ({offered:#x}) or lack VERSION_1")]
    Features {
        /// Features in the state.
        acked: u64,
        /// Features the restored device offers.
        offered: u64,
    },
    /// DRIVER_OK without FEATURES_OK cannot happen.
    #[error("status {0:#x} has DRIVER_OK without FEATURES_OK")]
    Status(u32),
    /// The device was running but its ring positions are missing or do not match.
    #[error("device was running: expected {expected} queue positions, got {got}")]
    Positions {
        /// Queues of the device.
        expected: usize,
        /// Positions given.
        got: usize,
    },
    /// A queue's saved configuration is invalid.
    #[error("saved queue configuration refused")]
    Queue(#[source] TransportError),
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
}

impl From<&QueueConfig> for QueueConfigState {
    fn from(q: &QueueConfig) -> Self {
        QueueConfigState {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

impl From<&QueueConfigState> for QueueConfig {
    fn from(q: &QueueConfigState) -> Self {
        QueueConfig {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

impl MmioTransport {
    /// The registers, for a snapshot. Take it with the vCPUs paused (they write the
    /// registers) and after the device's own state, which holds the ring positions.
    pub fn save_state(&self) -> MmioState {
        MmioState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueConfigState::from).collect(),
        }
    }

    /// Puts a freshly built, inactive `device` behind a transport in the saved `state`.
    /// If the driver had set DRIVER_OK, the device is activated with its queues at the
    /// saved `positions` (one per queue, from the device's own saved state). A pending
    /// InterruptStatus raises the interrupt again, since the guest may not have seen it.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
        state: &MmioState,
        positions: Option<&[QueuePosition]>,
    ) -> Result<MmioTransport, MmioRestoreError> {
        let mut t = MmioTransport::new(device, mem, irqfd).map_err(MmioRestoreError::Transport)?;
        if state.device_type != t.device_type {
            return Err(MmioRestoreError::DeviceType {
                saved: state.device_type,
                actual: t.device_type,
            });
        }
        if state.queues.len() != t.max_sizes.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: state.queues.len(),
                actual: t.max_sizes.len(),
            });
        }
        let running = state.status & DRIVER_OK != 0;
        if running && state.status & FEATURES_OK == 0 {
            return Err(MmioRestoreError::Status(state.status));
        }
        if state.status & FEATURES_OK != 0 {
            let mut d = t.lock_device();
            let offered = d.avail_features();
            let acked = state.driver_features;
            // The same rule as at FEATURES_OK (virtio 1.2 §6.1).
            if acked & !offered != 0 || acked & feature(VIRTIO_F_VERSION_1) == 0 {
                return Err(MmioRestoreError::Features { acked, offered });
            }
            d.set_acked_features(acked);
        }
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        t.queues = state.queues.iter().map(QueueConfig::from).collect();
        if running {
            let positions = positions.unwrap_or_default();
            if positions.len() != t.queues.len() {
                return Err(MmioRestoreError::Positions {
                    expected: t.queues.len(),
                    got: positions.len(),
                });
            }
            let mut queues = Vec::with_capacity(t.queues.len());
            for (index, pos) in positions.iter().enumerate() {
                let mut q = t.build_queue(index).map_err(MmioRestoreError::Queue)?;
                pos.apply(&mut q);
                queues.push(q);
            }
            let mem = t.mem.clone();
            let interrupt = t.interrupt.clone();
            t.lock_device()
                .activate(mem, queues, interrupt)
                .map_err(MmioRestoreError::Activate)?;
        }
        let pending = state.interrupt_status & (INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE);
        t.interrupt_status.store(pending, Ordering::SeqCst);
        // The irqfd is an edge: raise it again for a pending status. If KVM has not got the
        // irqfd yet, registering it delivers the pending count. A spurious interrupt is
        // harmless (the driver reads InterruptStatus); a lost one stalls the device.
        if pending & INTERRUPT_USED_BUFFER != 0 {
            t.interrupt.signal_used_queue();
        }
        if pending & INTERRUPT_CONFIG_CHANGE != 0 {
            t.interrupt.signal_config_change();
        }
        Ok(t)
    }
}

#[cfg(test)]
#[path = "mmio_persist_tests.rs"]
mod tests;
