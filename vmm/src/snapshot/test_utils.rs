//! A small but complete [`VmState`] for tests (and as the fuzzing seed).

use devices::legacy::{I8042State, SerialState};
use devices::virtio::block::BlockState;
use devices::virtio::{MmioState, QueueConfigState, QueuePosition};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_xsave,
};

use super::memory::MemoryRegionLayout;
use super::state::{DevicesState, MachineState, VirtioDeviceKind, VirtioDeviceState, VmState};
use crate::vstate::vcpu_state::{FpuState, VcpuState};
use crate::vstate::vm_state::KvmVmState;

/// One vCPU, 2 MiB of RAM, a serial port, an i8042 and one running block device.
pub fn sample_state() -> VmState {
    let mut xsave = kvm_xsave::default();
    xsave.region[0] = 0x37f;
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = 1;
    VmState {
        machine: MachineState {
            vcpu_count: 1,
            mem_size_mib: 2,
            regions: vec![MemoryRegionLayout {
                guest_addr: 0,
                size: 2 << 20,
            }],
        },
        vm: KvmVmState {
            irqchip: None,
            pit: None,
            clock: kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
        },
        vcpus: vec![VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 1_000_000,
                ..Default::default()
            }],
            regs: kvm_regs {
                rip: 0x1000,
                rflags: 2,
                rax: 42,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: FpuState {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            },
            xsave: Some(xsave),
            xcrs: Some(Default::default()),
            debugregs: Default::default(),
            lapic: Some(lapic),
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: Some(2_000_000),
        }],
        devices: DevicesState {
            serial: Some(SerialState::default()),
            i8042: Some(I8042State {}),
            virtio: vec![VirtioDeviceState {
                name: "block:rootfs".into(),
                mmio_base: 0xd000_0000,
                irq: 5,
                transport: MmioState {
                    device_type: 2,
                    status: 0xf,
                    driver_features: 1 << 32,
                    queues: vec![QueueConfigState {
                        size: 256,
                        ready: true,
                        desc: 0x1000,
                        driver: 0x2000,
                        device: 0x3000,
                    }],
                    ..Default::default()
                },
                device: VirtioDeviceKind::Block(BlockState {
                    path: Some("/rootfs.ext4".into()),
                    read_only: false,
                    serial: Some("root".into()),
                    capacity_sectors: 2048,
                    acked_features: 1 << 32,
                    queues: Some(vec![QueuePosition {
                        next_avail: 7,
                        next_used: 7,
                        event_idx: false,
                    }]),
                }),
            }],
        },
    }
}
