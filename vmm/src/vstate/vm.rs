//! The KVM VM: creation, in-kernel interrupt controllers, and guest memory slots.

use kvm_bindings::{
    kvm_clock_data, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM loaded and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM's API version is not 12.
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0:?} capability")]
    MissingCap(Cap),
    /// An ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A VM and what is needed to make its vCPUs.
pub struct Vm {
    /// The VM file descriptor.
    pub fd: VmFd,
    /// CPUID entries KVM supports on this host.
    pub supported_cpuid: CpuId,
    /// Whether the in-kernel irqchip and PIT were created.
    pub has_irqchip: bool,
    /// KVM emulates the LAPIC's TSC-deadline timer (needs the in-kernel irqchip).
    pub tsc_deadline: bool,
    /// KVM_GET_CLOCK / KVM_SET_CLOCK are available (KVM_CAP_ADJUST_CLOCK).
    pub adjust_clock: bool,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM. With `irqchip`, also the in-kernel PIC/IOAPIC/LAPICs
    /// and the PIT (real guests need them; tiny test guests on kvm-pvm must not have them).
    pub fn new(irqchip: bool) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::UserMemory,
            Cap::Irqfd,
            Cap::Ioeventfd,
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let vm = Vm {
            fd,
            supported_cpuid,
            has_irqchip: irqchip,
            tsc_deadline: irqchip && kvm.check_extension(Cap::TscDeadlineTimer),
            adjust_clock: kvm.check_extension(Cap::AdjustClock),
        };
        if irqchip {
            vm.create_irqchip()?;
        }
        Ok(vm)
    }

    fn create_irqchip(&self) -> Result<(), VmError> {
        // Intel VMX needs a TSS and identity-map page below 4 GiB; AMD ignores them.
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or(0))
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // No speaker port emulation: port 0x61 accesses stay cheap.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
    }

    /// Gives every region of `mem` to KVM as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller keeps
            // alive for as long as the VM exists (the Vmm holds both).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The guest's kvmclock (KVM_GET_CLOCK), or `None` when KVM cannot adjust it.
    pub fn get_clock(&self) -> Result<Option<kvm_clock_data>, VmError> {
        if !self.adjust_clock {
            return Ok(None);
        }
        self.fd
            .get_clock()
            .map(Some)
            .map_err(ioctl("KVM_GET_CLOCK"))
    }

    /// Sets the guest's kvmclock back to `clock` (KVM_SET_CLOCK), so that time the vCPUs
    /// did not run does not show up in the guest's clock. Only the clock value is given:
    /// KVM_CLOCK_REALTIME would make KVM add the host time elapsed since `clock` was read,
    /// which is what this call exists to avoid.
    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), VmError> {
        let data = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&data).map_err(ioctl("KVM_SET_CLOCK"))
    }
}
