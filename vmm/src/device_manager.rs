//! Attaches virtio-mmio devices: each gets a 4 KiB MMIO window in the 3-4 GiB hole and an
//! IOAPIC line, an irqfd for its interrupt, an ioeventfd per queue (so a guest notify never
//! leaves the kernel), a place on the MMIO bus, its `virtio_mmio.device=` entry on the kernel
//! command line, and a subscription in the event loop. The VMM holds no per-device code
//! beyond choosing which devices to build.
//!
//! For snapshots the manager keeps, per device, its transport, where it sits (MMIO base,
//! IRQ, name) and a typed handle ([`VirtioHandle`]) to read the device's own state. A
//! restored device is attached at its saved base and IRQ ([`DeviceManager::attach_restored`]):
//! the same wiring, without a command-line entry (the guest kernel already has it).

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use devices::virtio::net::Net;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{MmioRestoreError, MmioState, QueuePosition, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::MMIO_DEVICES_START;
use crate::boot::append_cmdline;
use crate::config::MAX_VIRTIO_DEVICES;
use crate::snapshot::state::{VirtioDeviceKind, VirtioDeviceState};
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
    /// A restored device's saved MMIO window or IRQ is not one this VMM hands out, or is
    /// taken.
    #[error("{name}: saved MMIO base {base:#x} / IRQ {irq} is not a free virtio slot")]
    Slot {
        /// Device name.
        name: String,
        /// Saved base.
        base: u64,
        /// Saved IRQ.
        irq: u32,
    },
    /// The saved transport state was refused.
    #[error("virtio-mmio transport state of {name}")]
    TransportState {
        /// Device name.
        name: String,
        /// The error.
        #[source]
        source: MmioRestoreError,
    },
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

/// A typed handle on an attached device, to read its snapshot state.
#[derive(Clone)]
pub enum VirtioHandle {
    /// virtio-blk.
    Block(Arc<Mutex<Block>>),
    /// virtio-net.
    Net(Arc<Mutex<Net>>),
    /// virtio-rng.
    Rng(Arc<Mutex<Rng>>),
    /// virtio-vsock.
    Vsock(Arc<Mutex<Vsock>>),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A device panicking while locked is a VMM bug already reported; its state is still
    // the best there is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioHandle {
    /// The device as the transport sees it.
    fn as_virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
        }
    }

    /// The device as the event loop sees it.
    fn as_subscriber(&self) -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
        }
    }

    /// The device's own snapshot state.
    pub fn save_state(&self) -> VirtioDeviceKind {
        match self {
            VirtioHandle::Block(d) => VirtioDeviceKind::Block(lock(d).save_state()),
            VirtioHandle::Net(d) => VirtioDeviceKind::Net(lock(d).save_state()),
            VirtioHandle::Rng(d) => VirtioDeviceKind::Rng(lock(d).save_state()),
            VirtioHandle::Vsock(d) => VirtioDeviceKind::Vsock(lock(d).save_state()),
        }
    }
}

/// An attached device with what a snapshot needs of it.
#[derive(Clone)]
pub struct AttachedVirtio {
    /// Name, MMIO base and IRQ.
    pub info: AttachedDevice,
    /// Its transport (on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The device itself.
    pub device: VirtioHandle,
}

impl AttachedVirtio {
    /// The device's and its transport's state. Take it with the vCPUs paused and the
    /// event loop not running the device: the device first (it holds the ring positions),
    /// then the transport's registers.
    pub fn save_state(&self) -> VirtioDeviceState {
        let device = self.device.save_state();
        let transport = lock(&self.transport).save_state();
        VirtioDeviceState {
            name: self.info.name.clone(),
            mmio_base: self.info.base,
            irq: self.info.irq,
            transport,
            device,
        }
    }
}

/// The MMIO base and IRQ of virtio slot `index`.
fn slot(index: usize) -> Option<(u64, u32)> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    let offset = u32::try_from(index).ok()?;
    Some((
        MMIO_DEVICES_START + u64::from(offset) * MMIO_SIZE,
        FIRST_VIRTIO_IRQ + offset,
    ))
}

/// Hands out MMIO windows and IRQs and wires devices up.
#[derive(Default)]
pub struct DeviceManager {
    /// The MMIO bus the vCPUs route to.
    pub mmio: Bus,
    /// Devices attached so far, in order.
    pub attached: Vec<AttachedVirtio>,
    /// Their subscriptions in the event loop, so a failed build can take them back.
    pub subscribers: Vec<SubscriberId>,
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> DeviceManager {
        DeviceManager::default()
    }

    /// Attaches `device` in the next free slot and announces it on `cmdline`.
    pub fn attach(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        cmdline: &mut Cmdline,
        event_loop: &mut EventLoop,
        device: VirtioHandle,
        name: &str,
    ) -> Result<AttachedDevice, DeviceManagerError> {
        let (base, irq) = slot(self.attached.len()).ok_or(DeviceManagerError::Full)?;
        let (irqfd, irqfd_copy) = irqfd_pair(name)?;
        let transport =
            MmioTransport::new(device.as_virtio(), mem.clone(), irqfd_copy).map_err(|source| {
                DeviceManagerError::Transport {
                    name: name.into(),
                    source,
                }
            })?;
        append_cmdline(cmdline, &format!("virtio_mmio.device=4K@{base:#x}:{irq}"))?;
        let info = AttachedDevice {
            name: name.into(),
            base,
            irq,
        };
        self.wire(vm, event_loop, transport, irqfd, device, info)
    }

    /// Attaches a device rebuilt from a snapshot (`device`, inactive, built from
    /// `saved.device`) at its saved MMIO base and IRQ, with its transport in the saved
    /// state; a running device is activated at its saved ring positions. No command-line
    /// entry: the restored guest kernel already knows the device.
    pub fn attach_restored(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        event_loop: &mut EventLoop,
        device: VirtioHandle,
        saved: &VirtioDeviceState,
    ) -> Result<AttachedDevice, DeviceManagerError> {
        let name = saved.name.as_str();
        let (base, irq) = (saved.mmio_base, saved.irq);
        let is_slot = (0..MAX_VIRTIO_DEVICES)
            .filter_map(slot)
            .any(|s| s == (base, irq));
        let taken = self
            .attached
            .iter()
            .any(|a| a.info.base == base || a.info.irq == irq);
        if !is_slot || taken {
            return Err(DeviceManagerError::Slot {
                name: name.into(),
                base,
                irq,
            });
        }
        let (irqfd, irqfd_copy) = irqfd_pair(name)?;
        let positions: Option<&[QueuePosition]> = saved.device.queues();
        let transport = restore_transport(&device, mem, irqfd_copy, &saved.transport, positions)
            .map_err(|source| DeviceManagerError::TransportState {
                name: name.into(),
                source,
            })?;
        let info = AttachedDevice {
            name: name.into(),
            base,
            irq,
        };
        self.wire(vm, event_loop, transport, irqfd, device, info)
    }

    /// Registers the irqfd and the queue ioeventfds with KVM, puts the transport on the
    /// MMIO bus and the device in the event loop.
    fn wire(
        &mut self,
        vm: &Vm,
        event_loop: &mut EventLoop,
        transport: MmioTransport,
        irqfd: EventFd,
        device: VirtioHandle,
        info: AttachedDevice,
    ) -> Result<AttachedDevice, DeviceManagerError> {
        let name = info.name.as_str();
        let kvm_err = |what: &'static str| {
            let name = name.to_string();
            move |source| DeviceManagerError::Kvm { what, name, source }
        };
        // A restored transport may already have signalled the irqfd (a pending interrupt):
        // registering it delivers that count.
        vm.fd
            .register_irqfd(&irqfd, info.irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        // The irqfd stays registered with KVM for the VM's life; KVM holds its own reference.
        drop(irqfd);
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            let datamatch = u32::try_from(queue).map_err(|_| DeviceManagerError::Full)?;
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(info.base + 0x50), datamatch)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(info.base, MMIO_SIZE, transport.clone())
            .map_err(|source| DeviceManagerError::Bus {
                name: name.into(),
                source,
            })?;
        self.subscribers
            .push(event_loop.add_subscriber(device.as_subscriber()));
        self.attached.push(AttachedVirtio {
            info: info.clone(),
            transport,
            device,
        });
        Ok(info)
    }

    /// Takes every attached device off `event_loop` (when building the VM failed half way).
    pub fn unsubscribe_all(&mut self, event_loop: &mut EventLoop) {
        for id in self.subscribers.drain(..) {
            // InvalidId cannot happen: the ids came from this event loop.
            let _ = event_loop.remove_subscriber(id);
        }
    }
}

/// An irqfd and a second handle on it (one for KVM, one for the transport).
fn irqfd_pair(name: &str) -> Result<(EventFd, EventFd), DeviceManagerError> {
    let err = |source| DeviceManagerError::EventFd {
        name: name.into(),
        source,
    };
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
    let copy = irqfd.try_clone().map_err(err)?;
    Ok((irqfd, copy))
}

/// `MmioTransport::restore` for a typed device; vsock then sends its transport reset.
fn restore_transport(
    device: &VirtioHandle,
    mem: &GuestMemoryMmap,
    irqfd: EventFd,
    state: &MmioState,
    positions: Option<&[QueuePosition]>,
) -> Result<MmioTransport, MmioRestoreError> {
    let t = MmioTransport::restore(device.as_virtio(), mem.clone(), irqfd, state, positions)?;
    if let VirtioHandle::Vsock(v) = device {
        // After activation: tells the guest its connections are gone.
        lock(v).finish_restore();
    }
    Ok(t)
}
