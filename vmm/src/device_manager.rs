//! Attaches virtio-mmio devices: each gets a 4 KiB MMIO window in the 3-4 GiB hole and an
//! IOAPIC line, an irqfd for its interrupt, an ioeventfd per queue (so a guest notify never
//! leaves the kernel), a place on the MMIO bus, its `virtio_mmio.device=` entry on the kernel
//! command line, and a subscription in the event loop. The VMM holds no per-device code
//! beyond choosing which devices to build.

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::MMIO_DEVICES_START;
use crate::boot::append_cmdline;
use crate::config::MAX_VIRTIO_DEVICES;
use crate::vstate::vm::Vm;

/// First IOAPIC line for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
const FIRST_VIRTIO_IRQ: u32 = 5;

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No MMIO window or interrupt line left.
    #[error("no room for another virtio device (at most {MAX_VIRTIO_DEVICES})")]
    Full,
    /// The transport refused the device.
    #[error("virtio-mmio transport for {name}")]
    Transport {
        /// Device name.
        name: String,
        /// The error.
        #[source]
        source: devices::virtio::mmio::TransportError,
    },
    /// A KVM registration failed.
    #[error("{what} for {name}")]
    Kvm {
        /// What was registered.
        what: &'static str,
        /// Device name.
        name: String,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be made.
    #[error("eventfd for {name}")]
    EventFd {
        /// Device name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The MMIO window is taken.
    #[error("MMIO bus for {name}")]
    Bus {
        /// Device name.
        name: String,
        /// The error.
        #[source]
        source: devices::bus::BusError,
    },
    /// The command line has no room for the device's entry.
    #[error(transparent)]
    Cmdline(#[from] crate::boot::BootError),
}

/// Event loop type shared by the VMM and its devices.
pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Where an attached device ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDevice {
    /// Name given at attach time, e.g. `block:rootfs`.
    pub name: String,
    /// MMIO base.
    pub base: u64,
    /// IOAPIC line.
    pub irq: u32,
}

/// Hands out MMIO windows and IRQs and wires devices up.
#[derive(Default)]
pub struct DeviceManager {
    /// The MMIO bus the vCPUs route to.
    pub mmio: Bus,
    /// Devices attached so far, in order.
    pub attached: Vec<AttachedDevice>,
    /// Their subscriptions in the event loop, so a failed build can take them back.
    pub subscribers: Vec<SubscriberId>,
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> DeviceManager {
        DeviceManager::default()
    }

    /// Attaches `device` (also subscribed to `event_loop` as `subscriber`, the same object).
    pub fn attach<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        cmdline: &mut Cmdline,
        event_loop: &mut EventLoop,
        device: Arc<Mutex<D>>,
        name: &str,
    ) -> Result<AttachedDevice, DeviceManagerError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = self.attached.len();
        if index >= MAX_VIRTIO_DEVICES {
            return Err(DeviceManagerError::Full);
        }
        let offset = u32::try_from(index).map_err(|_| DeviceManagerError::Full)?;
        let base = MMIO_DEVICES_START + u64::from(offset) * MMIO_SIZE;
        let irq = FIRST_VIRTIO_IRQ + offset;
        let name_s = name.to_string();
        let kvm_err = |what: &'static str| {
            let name = name_s.clone();
            move |source| DeviceManagerError::Kvm { what, name, source }
        };

        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceManagerError::EventFd {
                name: name.into(),
                source,
            })?;
        let irqfd_copy = irqfd
            .try_clone()
            .map_err(|source| DeviceManagerError::EventFd {
                name: name.into(),
                source,
            })?;
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport =
            MmioTransport::new(as_virtio, mem.clone(), irqfd_copy).map_err(|source| {
                DeviceManagerError::Transport {
                    name: name.into(),
                    source,
                }
            })?;
        vm.fd
            .register_irqfd(&irqfd, irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        // The irqfd stays registered with KVM for the VM's life; KVM holds its own reference.
        drop(irqfd);
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            let datamatch = u32::try_from(queue).map_err(|_| DeviceManagerError::Full)?;
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), datamatch)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        self.mmio
            .insert(base, MMIO_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|source| DeviceManagerError::Bus {
                name: name.into(),
                source,
            })?;
        append_cmdline(cmdline, &format!("virtio_mmio.device=4K@{base:#x}:{irq}"))?;
        let as_subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = device;
        self.subscribers
            .push(event_loop.add_subscriber(as_subscriber));
        let a = AttachedDevice {
            name: name.into(),
            base,
            irq,
        };
        self.attached.push(a.clone());
        Ok(a)
    }

    /// Takes every attached device off `event_loop` (when building the VM failed half way).
    pub fn unsubscribe_all(&mut self, event_loop: &mut EventLoop) {
        for id in self.subscribers.drain(..) {
            // InvalidId cannot happen: the ids came from this event loop.
            let _ = event_loop.remove_subscriber(id);
        }
    }
}
