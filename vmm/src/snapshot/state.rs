//! What a vmstate file holds: the machine's shape, the VM-wide and per-vCPU KVM state, and
//! each device's state. Guest RAM is not here: it is the memory file (`memory`).
//!
//! Everything in here comes from a file and is untrusted until [`VmState::validate`]
//! passed; even then, each restore function re-checks what KVM or a device would refuse.

use devices::legacy::{I8042State, SerialState};
use devices::virtio::block::BlockState;
use devices::virtio::net::NetState;
use devices::virtio::rng::RngState;
use devices::virtio::vsock::VsockState;
use devices::virtio::{MmioState, QueuePosition};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use serde::{Deserialize, Serialize};

use super::memory::MemoryRegionLayout;
use crate::config::{MAX_MEM_MIB, MAX_VIRTIO_DEVICES};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::KvmVmState;

/// Most MSRs a vCPU state may carry (KVM lists a few hundred at most).
pub const MAX_MSRS: usize = 1024;
/// Most guest RAM regions (the VMM makes one or two).
pub const MAX_REGIONS: usize = 16;
/// Longest device name.
pub const MAX_NAME_LEN: usize = 64;
/// Most queues a virtio device may have.
pub const MAX_QUEUES: usize = 16;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// The whole saved VM, less its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// vCPUs and memory layout.
    pub machine: MachineState,
    /// Interrupt controllers, PIT, kvmclock.
    pub vm: KvmVmState,
    /// One per vCPU, in vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// Legacy and virtio devices.
    pub devices: DevicesState,
}

/// The machine's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Guest RAM regions in guest address order; the memory file holds them back to back.
    pub regions: Vec<MemoryRegionLayout>,
}

/// Every device's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: Option<SerialState>,
    /// The i8042 reset line.
    pub i8042: Option<I8042State>,
    /// Virtio devices in attach order (so each gets its MMIO window and IRQ back).
    pub virtio: Vec<VirtioDeviceState>,
}

/// One virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Name given at attach time, e.g. `block:rootfs`.
    pub name: String,
    /// MMIO base.
    pub mmio_base: u64,
    /// IOAPIC line.
    pub irq: u32,
    /// The transport's registers.
    pub transport: MmioState,
    /// The device's own state.
    pub device: VirtioDeviceKind,
}

/// A virtio device's own state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceKind {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-rng.
    Rng(RngState),
    /// virtio-vsock.
    Vsock(VsockState),
}

impl VirtioDeviceKind {
    /// The ring positions, if the device was running: pass to `MmioTransport::restore`.
    pub fn queues(&self) -> Option<&[QueuePosition]> {
        match self {
            VirtioDeviceKind::Block(s) => s.queues.as_deref(),
            VirtioDeviceKind::Net(s) => s.queues.as_deref(),
            VirtioDeviceKind::Rng(s) => s.queues.as_deref(),
            VirtioDeviceKind::Vsock(s) => s.queues.as_deref(),
        }
    }
}

impl VmState {
    /// Checks the shape of a state read from a file: counts and sizes within bounds and
    /// consistent with each other, memory regions page-aligned, ordered, disjoint and
    /// adding up to the memory size. Says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.machine;
        if m.vcpu_count == 0 || usize::from(m.vcpu_count) != self.vcpus.len() {
            return Err(format!(
                "vcpu_count is {} but {} vCPU states are present",
                m.vcpu_count,
                self.vcpus.len()
            ));
        }
        if m.mem_size_mib == 0 || m.mem_size_mib > MAX_MEM_MIB {
            return Err(format!("memory size {} MiB out of range", m.mem_size_mib));
        }
        validate_regions(&m.regions, m.mem_size_mib << 20)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
                return Err(format!("vCPU {i} has {} CPUID entries", v.cpuid.len()));
            }
            if v.msrs.len() > MAX_MSRS {
                return Err(format!("vCPU {i} has {} MSRs", v.msrs.len()));
            }
        }
        let virtio = &self.devices.virtio;
        if virtio.len() > MAX_VIRTIO_DEVICES {
            return Err(format!("{} virtio devices", virtio.len()));
        }
        for d in virtio {
            if d.name.len() > MAX_NAME_LEN {
                return Err(format!("device name of {} bytes", d.name.len()));
            }
            let queues = d.device.queues().map_or(0, <[_]>::len);
            if d.transport.queues.len() > MAX_QUEUES || queues > MAX_QUEUES {
                return Err(format!("device {:?} has too many queues", d.name));
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.machine.mem_size_mib << 20
    }
}

/// Checks a memory layout read from a file against the RAM size it must add up to.
pub fn validate_regions(regions: &[MemoryRegionLayout], total: u64) -> Result<(), String> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(format!("{} memory regions", regions.len()));
    }
    let mut sum = 0u64;
    let mut next_free = 0u64;
    for r in regions {
        if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
            return Err(format!(
                "memory region {:#x}+{:#x} is not page-aligned",
                r.guest_addr, r.size
            ));
        }
        let end = r.guest_addr.checked_add(r.size);
        if r.guest_addr < next_free || end.is_none() {
            return Err(format!(
                "memory region {:#x}+{:#x} overlaps or is out of order",
                r.guest_addr, r.size
            ));
        }
        next_free = end.unwrap_or(u64::MAX);
        sum = sum.saturating_add(r.size);
    }
    if sum != total {
        return Err(format!(
            "memory regions add up to {sum} bytes, the memory size is {total}"
        ));
    }
    Ok(())
}
