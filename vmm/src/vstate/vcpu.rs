//! One vCPU: its boot state and its run loop. The loop sends port I/O and MMIO exits to the
//! buses and returns when the guest resets, shuts down, or KVM reports a failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use super::vm::Vm;
use crate::arch::{cpuid, regs};
use crate::boot::BootEntry;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// An ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("vCPU {id}: KVM accepted {set} of {want} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        want: usize,
    },
    /// Boot register state could not be built.
    #[error("vCPU {id}: boot registers")]
    Regs {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: regs::RegsError,
    },
}

/// Why a vCPU's run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest reset the machine (triple fault or KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    Shutdown,
    /// HLT reached user space: only without an in-kernel irqchip (tiny test guests).
    Halted,
    /// The guest kernel reported a crash (KVM_SYSTEM_EVENT_CRASH).
    Crash,
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// KVM could not run the vCPU.
    Failed(String),
}

/// What a vCPU thread needs to serve exits.
#[derive(Clone)]
pub struct VcpuIo {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Set by the VMM to make the loop return at its next exit.
    pub stop: Arc<AtomicBool>,
}

/// Exit counts, for metrics and for the boot benchmark's exit budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub pio: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Accesses no device claimed.
    pub unhandled: u64,
}

/// A vCPU.
pub struct Vcpu {
    /// KVM's vCPU handle.
    pub fd: VcpuFd,
    /// Index, equal to its APIC ID.
    pub id: u8,
    /// Exit counts so far.
    pub exits: ExitCounts,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                id,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Vcpu {
            fd,
            id,
            exits: ExitCounts::default(),
        })
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC for vCPU `id` of `count`; for the boot CPU also the
    /// entry registers from `boot`.
    pub fn configure(
        &self,
        vm: &Vm,
        count: u8,
        boot: Option<(&GuestMemoryMmap, BootEntry)>,
    ) -> Result<(), VcpuError> {
        let cpuid = cpuid::for_vcpu(&vm.supported_cpuid, self.id, count, vm.tsc_deadline);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        let msrs = regs::boot_msrs().map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                want: msrs.as_slice().len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.ioctl("KVM_SET_FPU"))?;
        if vm.has_irqchip {
            let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
            regs::set_lint(&mut lapic);
            self.fd
                .set_lapic(&lapic)
                .map_err(self.ioctl("KVM_SET_LAPIC"))?;
        }
        if let Some((mem, entry)) = boot {
            self.set_entry(mem, entry)?;
        }
        Ok(())
    }

    /// Puts the vCPU at `entry` in the entry state it needs.
    pub fn set_entry(&self, mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        let sregs = regs::boot_sregs(mem, sregs, entry.mode).map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry.mode, entry.entry, entry.boot_info))
            .map_err(self.ioctl("KVM_SET_REGS"))
    }

    /// Runs the guest until it resets, shuts down, fails or is stopped.
    pub fn run(&mut self, io: &VcpuIo) -> VcpuExitReason {
        loop {
            if io.stop.load(Ordering::Acquire) {
                return VcpuExitReason::Stopped;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.exits.pio += 1;
                    if !io.pio.read(u64::from(port), data) {
                        // Nothing there: reads float high, as on a PC bus.
                        data.fill(0xff);
                        self.exits.unhandled += 1;
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.exits.pio += 1;
                    if !io.pio.write(u64::from(port), data) {
                        self.exits.unhandled += 1;
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.exits.mmio += 1;
                    if !io.mmio.read(addr, data) {
                        data.fill(0xff);
                        self.exits.unhandled += 1;
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.exits.mmio += 1;
                    if !io.mmio.write(addr, data) {
                        self.exits.unhandled += 1;
                    }
                }
                Ok(VcpuExit::Hlt) => return VcpuExitReason::Halted,
                Ok(VcpuExit::Shutdown) => return VcpuExitReason::Reset,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::Shutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VcpuExitReason::Crash,
                        other => VcpuExitReason::Failed(format!("unknown system event {other}")),
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuExitReason::Failed(format!(
                        "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    return VcpuExitReason::Failed("KVM internal error".into())
                }
                Ok(other) => {
                    return VcpuExitReason::Failed(format!("unexpected exit {other:?}"));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked by a signal: loop around to look at `stop`.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuExitReason::Failed(format!("KVM_RUN: {e}")),
            }
        }
    }
}
