//! The VM-wide KVM state, for snapshots: the in-kernel interrupt controllers (both 8259
//! PICs and the IOAPIC, KVM_GET_IRQCHIP), the PIT (KVM_GET_PIT2) and kvmclock
//! (KVM_GET_CLOCK).
//!
//! Save with every vCPU out of KVM_RUN. Restore into a new VM that has its memory slots and
//! (if the state has them) its irqchip and PIT, before restoring the vCPUs: their LAPICs
//! route through the IOAPIC, and their kvmclock MSRs read the VM clock.
//! A VM without an in-kernel irqchip or PIT (tiny test guests on kvm-pvm) saves `None`
//! for them.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring the VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The state has an irqchip or PIT and the VM has none, or the other way round.
    #[error("the snapshot {} an in-kernel {what} but this VM {}", if *saved { "has" } else { "lacks" }, if *saved { "lacks one" } else { "has one" })]
    Mismatch {
        /// "irqchip" or "PIT".
        what: &'static str,
        /// Whether the state has it.
        saved: bool,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |e| VmStateError::Ioctl(what, e)
}

/// The in-kernel irqchip: both PICs and the IOAPIC.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IrqchipState {
    /// The master 8259 (IRQ 0-7).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 (IRQ 8-15).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// The VM-wide KVM state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The interrupt controllers, if the VM has them in the kernel.
    pub irqchip: Option<IrqchipState>,
    /// The PIT, if the VM has one in the kernel.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock (flags cleared, see [`save_vm`]).
    pub clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<Option<kvm_irqchip>, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    match fd.get_irqchip(&mut chip) {
        Ok(()) => Ok(Some(chip)),
        // ENXIO: no in-kernel irqchip in this VM.
        Err(e) if e.errno() == libc::ENXIO => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves the VM-wide state. Every vCPU must be out of KVM_RUN.
///
/// The clock's flags are cleared: KVM_CLOCK_TSC_STABLE is output-only, and passing
/// KVM_CLOCK_REALTIME back would make KVM add the wall time spent in the snapshot, so a
/// restored guest's clock would jump; the guest sees the pause instead, as on a suspend.
pub fn save_vm(fd: &VmFd) -> Result<KvmVmState, VmStateError> {
    let master = get_chip(fd, KVM_IRQCHIP_PIC_MASTER).map_err(ioctl("KVM_GET_IRQCHIP"))?;
    let irqchip = match master {
        Some(pic_master) => {
            let chip = |id| {
                get_chip(fd, id)
                    .map_err(ioctl("KVM_GET_IRQCHIP"))?
                    .ok_or(VmStateError::Mismatch {
                        what: "irqchip",
                        saved: false,
                    })
            };
            Some(IrqchipState {
                pic_master,
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            })
        }
        None => None,
    };
    let pit = match fd.get_pit2() {
        Ok(p) => Some(p),
        // ENXIO: no in-kernel PIT in this VM.
        Err(e) if e.errno() == libc::ENXIO => None,
        Err(e) => return Err(ioctl("KVM_GET_PIT2")(e)),
    };
    let mut clock = fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
    clock.flags = 0;
    Ok(KvmVmState {
        irqchip,
        pit,
        clock,
    })
}

/// Restores `s` into `fd`, a new VM set up like the saved one (memory registered; irqchip
/// and PIT created if `s` has them). Call before restoring the vCPUs.
pub fn restore_vm(fd: &VmFd, s: &KvmVmState) -> Result<(), VmStateError> {
    let has_irqchip = get_chip(fd, KVM_IRQCHIP_PIC_MASTER)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?
        .is_some();
    if has_irqchip != s.irqchip.is_some() {
        return Err(VmStateError::Mismatch {
            what: "irqchip",
            saved: s.irqchip.is_some(),
        });
    }
    let has_pit = match fd.get_pit2() {
        Ok(_) => true,
        Err(e) if e.errno() == libc::ENXIO => false,
        Err(e) => return Err(ioctl("KVM_GET_PIT2")(e)),
    };
    if has_pit != s.pit.is_some() {
        return Err(VmStateError::Mismatch {
            what: "PIT",
            saved: s.pit.is_some(),
        });
    }
    if let Some(pit) = &s.pit {
        fd.set_pit2(pit).map_err(ioctl("KVM_SET_PIT2"))?;
    }
    let mut clock = s.clock;
    clock.flags = 0;
    fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    if let Some(chips) = &s.irqchip {
        // The chip ids come from the file: force each to its slot.
        for (mut chip, id) in [
            (chips.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (chips.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (chips.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            chip.chip_id = id;
            fd.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
    }
    Ok(())
}
