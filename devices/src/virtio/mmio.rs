//! The virtio-mmio transport, register layout version 2 (virtio 1.2 §4.2.2).
//!
//! Its job: turn the guest driver's 32-bit register accesses into feature negotiation,
//! queue configuration and the device status state machine (virtio 1.2 §3.1.1), then hand
//! validated queues to the [`VirtioDevice`] at DRIVER_OK. It sits on the MMIO bus and runs
//! on vCPU threads; queue processing itself happens elsewhere (the device's event handler).
//!
//! Every guest access is bounds- and width-checked: registers are 32-bit aligned only,
//! config space takes any width, anything else reads as 0 and writes are dropped. Guest
//! mistakes never panic; they leave FEATURES_OK unset or set DEVICE_NEEDS_RESET.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{
    feature, ActivateError, IrqfdInterrupt, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

/// Size of one device's MMIO window: `virtio_mmio.device=4K@0x...:IRQ`.
pub const MMIO_SIZE: u64 = 0x1000;
/// MagicValue: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version 2 is the modern (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID reported to the guest ("\0VMM").
pub const MMIO_VENDOR_ID: u32 = 0x4d4d_5600;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors building a transport, and the reasons an activation is refused.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device's queue EventFds could not be duplicated for the transport.
    #[error("cannot duplicate the EventFd of queue {index}")]
    QueueEvent {
        /// Queue index.
        index: usize,
        /// The dup failure.
        #[source]
        source: std::io::Error,
    },
    /// The device has a different number of queue EventFds than queues.
    #[error("device has {queues} queues but {events} queue EventFds")]
    QueueEventCount {
        /// Number of queues.
        queues: usize,
        /// Number of EventFds.
        events: usize,
    },
    /// A queue's maximum size is 0, above 32768 or not a power of two (virtio 1.2 §2.7).
    #[error("queue {index} has invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size the device reported.
        size: u16,
    },
    /// The device must offer VIRTIO_F_VERSION_1: this transport is modern only.
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// At DRIVER_OK a queue was not ready.
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// Queue index.
        index: usize,
    },
    /// At DRIVER_OK a queue had a bad size or misaligned ring (virtio 1.2 §2.7).
    #[error("queue {index} is misconfigured")]
    QueueConfig {
        /// Queue index.
        index: usize,
        /// What virtio-queue refused.
        #[source]
        source: virtio_queue::Error,
    },
    /// At DRIVER_OK a ring of a queue was not inside guest memory.
    #[error("queue {index} has a ring outside guest memory")]
    QueueMemory {
        /// Queue index.
        index: usize,
    },
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
}

/// What the driver wrote for one queue. Kept raw so a bad value is refused once, at
/// DRIVER_OK, rather than silently dropped at write time.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// The low 32 bits of `v`.
fn low_half(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX)
}

/// Replaces the low or high 32 bits of `v`.
fn set_half(v: &mut u64, high: bool, half: u32) {
    *v = if high {
        (*v & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*v & !0xffff_ffff) | u64::from(half)
    };
}

/// A virtio device behind the virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    queue_evts: Vec<EventFd>,
    max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    device_type: u32,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activation_failures: u64,
    last_activation_error: Option<TransportError>,
}

impl MmioTransport {
    /// Puts `device` behind a transport. `mem` is the guest memory the queues live in;
    /// `irqfd` is the EventFd the VMM registers as the device's KVM irqfd.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> Result<MmioTransport, TransportError> {
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(IrqfdInterrupt::new(irqfd, interrupt_status.clone()));
        let (device_type, max_sizes, queue_evts) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            if d.avail_features() & feature(VIRTIO_F_VERSION_1) == 0 {
                return Err(TransportError::NotModern);
            }
            let max_sizes = d.queue_max_sizes().to_vec();
            for (index, &size) in max_sizes.iter().enumerate() {
                if Queue::new(size).is_err() {
                    return Err(TransportError::QueueMaxSize { index, size });
                }
            }
            let evts = d.queue_events();
            if evts.len() != max_sizes.len() {
                return Err(TransportError::QueueEventCount {
                    queues: max_sizes.len(),
                    events: evts.len(),
                });
            }
            let mut clones = Vec::with_capacity(evts.len());
            for (index, e) in evts.iter().enumerate() {
                let c = e
                    .try_clone()
                    .map_err(|source| TransportError::QueueEvent { index, source })?;
                clones.push(c);
            }
            (d.device_type(), max_sizes, clones)
        };
        let queues = Self::default_queues(&max_sizes);
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            interrupt_status,
            queue_evts,
            max_sizes,
            queues,
            device_type,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activation_failures: 0,
            last_activation_error: None,
        })
    }

    /// One EventFd per queue. Register each as a KVM ioeventfd on `base + 0x50`
    /// (QueueNotify) with datamatch = queue index. A QueueNotify write that reaches the
    /// transport through the bus (no ioeventfd) signals the same EventFd.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register, shared with the device's interrupt.
    pub fn interrupt_status(&self) -> &Arc<AtomicU32> {
        &self.interrupt_status
    }

    /// How many times DRIVER_OK failed to start the device (guest misconfiguration or
    /// device error), for metrics.
    pub fn activation_failures(&self) -> u64 {
        self.activation_failures
    }

    /// Why the last DRIVER_OK failed to start the device, if it did.
    pub fn last_activation_error(&self) -> Option<&TransportError> {
        self.last_activation_error.as_ref()
    }

    fn default_queues(max_sizes: &[u16]) -> Vec<QueueConfig> {
        max_sizes
            .iter()
            .map(|&m| QueueConfig {
                size: u32::from(m),
                ..QueueConfig::default()
            })
            .collect()
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A poisoned lock means the event loop panicked mid-request; the device state is
        // still memory-safe, so keep answering the guest.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn selected(&self) -> Option<(&QueueConfig, u16)> {
        let i = usize::try_from(self.queue_sel).ok()?;
        Some((self.queues.get(i)?, *self.max_sizes.get(i)?))
    }

    /// virtio 1.2 §3.1.1: queues are set up after FEATURES_OK and before DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED | DEVICE_NEEDS_RESET) == FEATURES_OK
    }

    /// The selected queue, if the driver may change it now and it is not yet ready.
    fn configurable_queue(&mut self) -> Option<&mut QueueConfig> {
        if !self.queue_config_allowed() {
            return None;
        }
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i).filter(|q| !q.ready)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.lock_device().avail_features();
                match self.device_features_sel {
                    0 => low_half(f),
                    1 => low_half(f >> 32),
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |(_, max)| u32::from(max)),
            reg::QUEUE_READY => self.selected().map_or(0, |(q, _)| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            // virtio 1.2 §4.2.2: no shared memory regions; a missing region has length -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            // virtio 1.2 §3.1.1 step 5: features are written after DRIVER and before
            // FEATURES_OK; other writes are ignored.
            reg::DRIVER_FEATURES if self.status & (DRIVER | FEATURES_OK | FAILED) == DRIVER => {
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, v),
                    1 => set_half(&mut self.driver_features, true, v),
                    _ => {}
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    q.size = v;
                }
            }
            reg::QUEUE_READY if self.queue_config_allowed() => {
                let i = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                if let Some(q) = self.queues.get_mut(i) {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_half(&mut q.desc, offset == reg::QUEUE_DESC_HIGH, v);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_half(&mut q.driver, offset == reg::QUEUE_DRIVER_HIGH, v);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_half(&mut q.device, offset == reg::QUEUE_DEVICE_HIGH, v);
                }
            }
            // Read-only registers, SHMSel (no regions), QueueReset (VIRTIO_F_RING_RESET
            // not offered) and holes: ignored.
            _ => {}
        }
    }

    /// QueueNotify: the value is the queue index (no VIRTIO_F_NOTIFICATION_DATA).
    fn notify(&self, v: u32) {
        let evt = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i));
        if let Some(evt) = evt {
            if let Err(e) = evt.write(1) {
                tracing::error!(error = %e, queue = v, "virtio-mmio: queue notify failed");
            }
        }
    }

    /// The device status state machine (virtio 1.2 §2.1, §3.1.1). The driver sets bits one
    /// step at a time and may only clear them all at once (0 = reset). A step whose
    /// prerequisite is missing is not taken, nor any later step in the same write.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device: the driver can neither set nor clear it.
        let new = (v & !DEVICE_NEEDS_RESET) | (old & DEVICE_NEEDS_RESET);
        if new & old != old {
            // Clearing bits other than through reset is not allowed (virtio 1.2 §2.1.2).
            return;
        }
        let added = new & !old;
        let mut status = old;
        if added & FAILED != 0 {
            status |= FAILED;
        }
        if status & FAILED == 0 {
            status = self.advance(status, added);
        }
        self.status = status;
    }

    fn advance(&mut self, mut status: u32, added: u32) -> u32 {
        if added & ACKNOWLEDGE != 0 {
            status |= ACKNOWLEDGE;
        }
        if added & DRIVER != 0 {
            if status & ACKNOWLEDGE == 0 {
                return status;
            }
            status |= DRIVER;
        }
        if added & FEATURES_OK != 0 {
            if status & DRIVER == 0 || !self.accept_features() {
                // virtio 1.2 §3.1.1 step 6: the driver re-reads Status and sees
                // FEATURES_OK unset, so it knows the subset was refused.
                return status;
            }
            status |= FEATURES_OK;
        }
        if added & DRIVER_OK != 0 {
            if status & (FEATURES_OK | DEVICE_NEEDS_RESET) != FEATURES_OK {
                return status;
            }
            match self.activate() {
                Ok(()) => status |= DRIVER_OK,
                Err(e) => {
                    self.activation_failures += 1;
                    // Guest-triggerable: log the first failure only.
                    if self.activation_failures == 1 {
                        tracing::warn!(
                            error = %e,
                            device_type = self.device_type,
                            "virtio-mmio: activation refused"
                        );
                    }
                    // virtio 1.2 §2.1.2: a device in an unrecoverable state sets
                    // DEVICE_NEEDS_RESET and sends a configuration change notification.
                    status |= DEVICE_NEEDS_RESET;
                    self.interrupt.signal_config_change();
                    self.last_activation_error = Some(e);
                }
            }
        }
        status
    }

    /// virtio 1.2 §6.1: a modern device refuses a driver that did not accept
    /// VIRTIO_F_VERSION_1; any driver accepting a feature not offered is refused too.
    fn accept_features(&mut self) -> bool {
        let mut d = self.lock_device();
        let offered = d.avail_features();
        let acked = self.driver_features;
        if acked & !offered != 0 || acked & feature(VIRTIO_F_VERSION_1) == 0 {
            return false;
        }
        d.set_acked_features(acked);
        true
    }

    fn build_queue(&self, index: usize) -> Result<Queue, TransportError> {
        let (Some(cfg), Some(&max)) = (self.queues.get(index), self.max_sizes.get(index)) else {
            return Err(TransportError::QueueNotReady { index });
        };
        if !cfg.ready {
            return Err(TransportError::QueueNotReady { index });
        }
        let bad = |source| TransportError::QueueConfig { index, source };
        let mut q = Queue::new(max).map_err(bad)?;
        let size = u16::try_from(cfg.size).map_err(|_| bad(virtio_queue::Error::InvalidSize))?;
        q.try_set_size(size).map_err(bad)?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(bad)?;
        // virtio-queue treats an avail ring at 0 as "not configured" and would refuse to
        // iterate it forever, so refuse it now.
        if cfg.driver == 0 {
            return Err(TransportError::QueueMemory { index });
        }
        // Ring sizes (virtio 1.2 §2.7.2): descriptors 16*n; avail flags+idx+ring+used_event;
        // used flags+idx+ring+avail_event. The event fields are counted whether or not
        // EVENT_IDX is negotiated, as drivers allocate them anyway.
        let n = u64::from(size);
        let ranges = [
            (cfg.desc, 16 * n),
            (cfg.driver, 6 + 2 * n),
            (cfg.device, 6 + 8 * n),
        ];
        for (addr, len) in ranges {
            let len = usize::try_from(len).map_err(|_| TransportError::QueueMemory { index })?;
            if !GuestMemoryBackend::check_range(&self.mem, GuestAddress(addr), len) {
                return Err(TransportError::QueueMemory { index });
            }
        }
        q.set_ready(true);
        Ok(q)
    }

    fn activate(&mut self) -> Result<(), TransportError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for index in 0..self.queues.len() {
            queues.push(self.build_queue(index)?);
        }
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        self.lock_device()
            .activate(mem, queues, interrupt)
            .map_err(TransportError::Activate)
    }

    /// Status 0: back to the initial state (virtio 1.2 §2.4, §4.2.3.1).
    fn reset(&mut self) {
        self.lock_device().reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = Self::default_queues(&self.max_sizes);
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_SIZE {
            data.fill(0);
        } else if offset >= reg::CONFIG {
            self.lock_device().read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset & 3 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            // virtio 1.2 §4.2.2.2: registers are accessed 32 bits wide, aligned.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_SIZE {
            return;
        }
        if offset >= reg::CONFIG {
            self.lock_device().write_config(offset - reg::CONFIG, data);
            return;
        }
        if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset & 3) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[path = "mmio_persist.rs"]
mod persist;
pub use persist::{MmioRestoreError, MmioState, QueueConfigState, QueuePosition};

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
