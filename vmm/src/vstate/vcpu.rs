//! One vCPU: its boot state and its run loop. The loop sends port I/O and MMIO exits to the
//! buses and returns when the guest resets, shuts down, or KVM reports a failure. The
//! thread around it (pause, resume, stop) is in `vcpu_thread`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Set by the VMM to make [`Vcpu::run`] return at its next exit. (vCPU threads started
    /// by [`super::vcpu_thread::VcpuSet`] are stopped with a command and a kick instead.)
    pub stop: Arc<AtomicBool>,
}

/// Exit counts, for `GET /metrics` and for the boot benchmark's exit budget. Atomics so the
/// VMM thread reads them while the vCPU thread runs.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// KVM_RUN calls (guest entries).
    pub kvm_run: AtomicU64,
    /// Port reads (`in`).
    pub io_in: AtomicU64,
    /// Port writes (`out`).
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT reaching user space (only without an in-kernel irqchip).
    pub hlt: AtomicU64,
    /// Any other exit to user space (shutdown, system events, failures).
    pub other: AtomicU64,
    /// KVM_RUN left early for a kick (pause, stop).
    pub interrupted: AtomicU64,
    /// Port or MMIO accesses no device claimed.
    pub unhandled: AtomicU64,
}

impl VcpuMetrics {
    /// Every counter as (name, value), in declaration order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("kvm_run", get(&self.kvm_run)),
            ("io_in", get(&self.io_in)),
            ("io_out", get(&self.io_out)),
            ("mmio_read", get(&self.mmio_read)),
            ("mmio_write", get(&self.mmio_write)),
            ("hlt", get(&self.hlt)),
            ("other", get(&self.other)),
            ("interrupted", get(&self.interrupted)),
            ("unhandled", get(&self.unhandled)),
        ]
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The outcome of one KVM_RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEmulation {
    /// An exit was served; enter the guest again.
    Handled,
    /// KVM_RUN was interrupted by a signal (a kick): look at pending commands.
    Interrupted,
    /// The vCPU cannot continue.
    Exit(VcpuExitReason),
}

/// A vCPU.
pub struct Vcpu {
    /// KVM's vCPU handle.
    pub fd: VcpuFd,
    /// Index, equal to its APIC ID.
    pub id: u8,
    /// Exit counts so far, shared with whoever reports them.
    pub metrics: Arc<VcpuMetrics>,
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
            metrics: Arc::default(),
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

    /// Runs the guest until it resets, shuts down, fails or is stopped through `io.stop`.
    pub fn run(&mut self, io: &VcpuIo) -> VcpuExitReason {
        loop {
            if io.stop.load(Ordering::Acquire) {
                return VcpuExitReason::Stopped;
            }
            if let VcpuEmulation::Exit(reason) = self.run_once(io) {
                return reason;
            }
        }
    }

    /// Finishes an I/O or MMIO exit the vCPU left KVM_RUN with, without running guest code:
    /// KVM completes such an exit (the data of a read, the instruction pointer past an
    /// `out`) only at the next KVM_RUN (KVM API, "KVM_RUN"), so a vCPU parked right after
    /// serving one would otherwise be saved mid-instruction and repeat the access after a
    /// restore. KVM_RUN with `immediate_exit` set runs that completion and returns EINTR
    /// before entering the guest. A completion that needs user space again (a string I/O
    /// instruction's next round) is served and completed the same way, a bounded number of
    /// times. Call with the vCPU parked, on its own thread.
    pub fn complete_pending_io(&mut self, io: &VcpuIo) -> Result<(), VcpuExitReason> {
        /// Rounds of a string I/O instruction served at most (`rep outsb` of a page).
        const MAX_ROUNDS: usize = 4096;
        for _ in 0..MAX_ROUNDS {
            self.fd.set_kvm_immediate_exit(1);
            let outcome = self.run_once(io);
            self.fd.set_kvm_immediate_exit(0);
            match outcome {
                VcpuEmulation::Interrupted => return Ok(()),
                VcpuEmulation::Handled => {}
                VcpuEmulation::Exit(reason) => return Err(reason),
            }
        }
        Err(VcpuExitReason::Failed(format!(
            "I/O still pending after {MAX_ROUNDS} completions"
        )))
    }

    /// Enters the guest once and serves the exit that brings it back.
    pub fn run_once(&mut self, io: &VcpuIo) -> VcpuEmulation {
        let m = &*self.metrics;
        count(&m.kvm_run);
        let reason = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(&m.io_in);
                if !io.pio.read(u64::from(port), data) {
                    // Nothing there: reads float high, as on a PC bus.
                    data.fill(0xff);
                    count(&m.unhandled);
                }
                return VcpuEmulation::Handled;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(&m.io_out);
                if !io.pio.write(u64::from(port), data) {
                    count(&m.unhandled);
                }
                return VcpuEmulation::Handled;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(&m.mmio_read);
                if !io.mmio.read(addr, data) {
                    data.fill(0xff);
                    count(&m.unhandled);
                }
                return VcpuEmulation::Handled;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(&m.mmio_write);
                if !io.mmio.write(addr, data) {
                    count(&m.unhandled);
                }
                return VcpuEmulation::Handled;
            }
            Ok(VcpuExit::Hlt) => {
                count(&m.hlt);
                return VcpuEmulation::Exit(VcpuExitReason::Halted);
            }
            Ok(VcpuExit::Shutdown) => VcpuExitReason::Reset,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::Shutdown,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VcpuExitReason::Crash,
                other => VcpuExitReason::Failed(format!("unknown system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => VcpuExitReason::Failed(format!(
                "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
            )),
            Ok(VcpuExit::InternalError) => VcpuExitReason::Failed("KVM internal error".into()),
            Ok(other) => VcpuExitReason::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked by a signal, whose handler set immediate_exit so that a kick
                // landing just before KVM_RUN is not lost (see vcpu_thread). Clear it, or
                // every later KVM_RUN would return at once.
                self.fd.set_kvm_immediate_exit(0);
                count(&m.interrupted);
                return VcpuEmulation::Interrupted;
            }
            Err(e) => return VcpuEmulation::Exit(VcpuExitReason::Failed(format!("KVM_RUN: {e}"))),
        };
        count(&m.other);
        VcpuEmulation::Exit(reason)
    }
}
