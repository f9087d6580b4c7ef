//! Snapshot and restore: the building blocks (DESIGN.md, "Snapshot").
//!
//! A snapshot is two files:
//! - the **vmstate** file ([`format`]): magic, version, the serialised [`state::VmState`]
//!   (machine shape, VM-wide KVM state, every vCPU, every device) and a CRC-64;
//! - the **memory** file ([`memory`]): guest RAM, sparse, mapped back `MAP_PRIVATE` so a
//!   restore loads lazily and many clones share one page cache.
//!
//! Taking one (vCPUs out of KVM_RUN, event loop not running a device):
//! 1. `vstate::vcpu_state::save_vcpu` for each vCPU, with `msrs_to_save(&kvm)`;
//! 2. `vstate::vm_state::save_vm`;
//! 3. each device: its `save_state()`, then its transport's `save_state()`; serial and
//!    i8042 `save_state()`;
//! 4. [`memory::write_memory`] and [`format::save`].
//!
//! Restoring (a new process, nothing started yet):
//! 1. [`format::load`], then [`memory::map_memory`] with `state.machine.regions`;
//! 2. a new VM with the same irqchip/PIT choice; register the memory; `restore_vm`;
//! 3. each vCPU: create, `restore_vcpu` (not the boot-time `configure`);
//! 4. each device: `Block::restore` / `Net::restore` / ... (backends reopened, paths
//!    overridable), then attach it with `MmioTransport::restore` at the saved MMIO base and
//!    IRQ; for vsock then `finish_restore()`;
//! 5. start the vCPUs.
//!
//! [`create`] does the taking for the VMM (and for tests driving a VM by hand);
//! [`restore`] does the restoring's checks and device rebuilding that need no KVM, and
//! `runtime::restore` builds the VM from them.

pub mod create;
pub mod format;
pub mod memory;
pub mod restore;
pub mod state;

#[cfg(test)]
pub(crate) mod test_utils;

#[cfg(test)]
mod kvm_tests;
