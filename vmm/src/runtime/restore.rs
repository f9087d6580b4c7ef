//! Builds a VM from a snapshot, in the order DESIGN.md gives: a new KVM VM with the same
//! irqchip/PIT choice as the saved one, the memory file's private mapping as its RAM, the
//! VM-wide state; the legacy devices from their state; each virtio device rebuilt with its
//! backend reopened (overrides applied) and attached at its saved MMIO base and IRQ with
//! its transport state; then each vCPU created and given its saved state (never the boot
//! configuration). Starting the vCPU threads (parked) is the caller's step.
//!
//! As for a boot, a failed restore leaves nothing behind: the devices already subscribed
//! to the event loop are taken off it.

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::build::{counter_source, legacy_devices, BootZero, CounterSource, GuestVm};
use super::VmmError;
use crate::api::SnapshotLoadParams;
use crate::config::VmConfig;
use crate::device_manager::{DeviceManager, EventLoop};
use crate::snapshot::restore::{rebuild_device, RestoreError};
use crate::snapshot::state::VmState as SavedVm;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state::restore_vcpu;
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::restore_vm;

/// Builds the VM `state` describes over `mem` (the mapped memory file). Devices join `em`;
/// the console is `cfg`'s; vCPUs and the i8042 reset line will write `exit_evt`.
#[expect(
    clippy::too_many_arguments,
    reason = "the VM to restore into, the snapshot, its load parameters and the VMM's loop"
)]
pub(super) fn restore(
    vm: Vm,
    state: &SavedVm,
    mem: GuestMemoryMmap,
    params: &SnapshotLoadParams,
    cfg: &VmConfig,
    em: &mut EventLoop,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<GuestVm, VmmError> {
    let mut dm = DeviceManager::new();
    let built = restore_with(
        vm, state, mem, params, cfg, em, &mut dm, exit_evt, boot_zero,
    );
    if built.is_err() {
        dm.unsubscribe_all(em);
    }
    built
}

#[expect(
    clippy::too_many_arguments,
    reason = "restore's arguments plus the device manager, split out for its cleanup"
)]
fn restore_with(
    vm: Vm,
    state: &SavedVm,
    mem: GuestMemoryMmap,
    params: &SnapshotLoadParams,
    cfg: &VmConfig,
    em: &mut EventLoop,
    dm: &mut DeviceManager,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<GuestVm, VmmError> {
    vm.register_memory(&mem)?;
    restore_vm(&vm.fd, &state.vm).map_err(RestoreError::Vm)?;
    let legacy = legacy_devices(&vm, cfg, exit_evt, boot_zero, Some(&state.devices))?;

    let mut device_counters: Vec<(String, CounterSource)> = Vec::new();
    for saved in &state.devices.virtio {
        let dev = rebuild_device(saved, params)?;
        device_counters.push((saved.name.clone(), counter_source(&dev)));
        dm.attach_restored(&vm, &mem, em, dev, saved)?;
    }

    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (id, saved) in (0..state.machine.vcpu_count).zip(&state.vcpus) {
        let v = Vcpu::new(&vm, id)?;
        restore_vcpu(&v.fd, saved).map_err(|source| RestoreError::Vcpu { id, source })?;
        vcpus.push(v);
    }
    Ok(GuestVm::assemble(
        vm,
        mem,
        vcpus,
        legacy,
        dm,
        device_counters,
    ))
}
