//! A vCPU's architectural state in and out of KVM, for snapshots.
//!
//! [`save_vcpu`] and [`restore_vcpu`] work on a vCPU that is not in KVM_RUN (paused, or
//! never run); they may be called from any thread. The state holds everything KVM keeps
//! per vCPU that a guest can observe: general and special registers, FPU and XSAVE area,
//! XCRs, debug registers, the MSRs listed by [`msrs_to_save`], the local APIC page, the
//! multiprocessing state, pending events, the CPUID the vCPU was given and its TSC
//! frequency.
//!
//! Save order (KVM API; the same as Firecracker's, for the same reasons):
//! 1. KVM_GET_MP_STATE first: it runs `kvm_apic_accept_events()`, which can change the vCPU
//!    and LAPIC state the later calls read.
//! 2. regs, sregs, fpu, xsave, xcrs, debugregs, LAPIC (KVM_GET_LAPIC may update it before
//!    returning), TSC frequency, CPUID, MSRs.
//! 3. KVM_GET_VCPU_EVENTS last: earlier GETs can change the pending-event state it reads.
//!
//! Restore order:
//! 1. CPUID first: KVM checks XSAVE/XCR0, MSR writes and the LAPIC against the guest CPUID.
//! 2. TSC frequency before the TSC MSR, so the TSC offset is computed at the right ratio.
//! 3. mp_state, regs, sregs (SET_SREGS sets the APIC base, which SET_LAPIC needs; on SVM
//!    TR goes back without its busy bit, see `sregs_for_set`), fpu, xsave (after fpu: it
//!    holds the same x87/SSE state and wins), xcrs, debugregs.
//! 4. LAPIC before MSRs: MSR_IA32_TSC_DEADLINE only takes when the LAPIC timer is in
//!    TSC-deadline mode. In the MSR list the TSC comes before TSC_DEADLINE, as the deadline
//!    is a guest TSC value.
//! 5. vcpu_events after regs: SET_REGS clears pending exceptions, which SET_VCPU_EVENTS
//!    puts back.
//! 6. KVM_KVMCLOCK_CTRL (best effort): tells a kvmclock guest it was stopped, so its
//!    watchdogs do not report the gap as a lockup.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// KVM took fewer MSRs than given; names the first one refused.
    #[error("KVM_SET_MSRS: KVM refused MSR {index:#x} ({set} of {want} set)")]
    SetMsrs {
        /// The refused MSR.
        index: u32,
        /// How many were set before it.
        set: usize,
        /// How many were given.
        want: usize,
    },
    /// The saved state has more entries than KVM takes.
    #[error("saved state has {got} {what}, at most {max} allowed")]
    TooMany {
        /// CPUID entries or MSRs.
        what: &'static str,
        /// How many there are.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// The TSC frequency differs and this host cannot scale it.
    #[error("snapshot TSC runs at {saved} kHz, this vCPU at {host} kHz, and KVM cannot scale it")]
    TscFrequency {
        /// The saved frequency.
        saved: u32,
        /// This vCPU's frequency.
        host: u32,
        /// Why scaling failed.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |e| VcpuStateError::Ioctl(what, e)
}

/// `kvm_fpu` (kvm-bindings derives no serde for it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0-ST7, 80 bits each padded to 16 bytes.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM keeps for one vCPU. The KVM structs serialise as their raw bytes
/// (kvm-bindings' `serde` feature); a short or long byte string from a hostile file is
/// zero-padded or cut, never trusted for a length.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID entries the vCPU was given (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The MSRs, in restore order (see the module doc).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy view; `xsave` holds it too and wins on restore).
    pub fpu: FpuState,
    /// The XSAVE area (KVM_GET_XSAVE, 4 KiB), if KVM has it.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, if KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC page, if the LAPIC is in the kernel.
    pub lapic: Option<kvm_lapic_state>,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// MSR numbers (Intel SDM vol. 4; arch/x86/include/asm/msr-index.h; KVM's paravirtual MSRs
/// from Documentation/virt/kvm/x86/msr.rst).
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    pub const APIC_LVTT: usize = 0x320;
}

/// MSRs worth saving, as inclusive ranges. Everything guest-writable that KVM keeps per
/// vCPU: time (TSC, TSC_ADJUST, TSC_DEADLINE, TSC_AUX, kvmclock), system-call entry
/// (SYSENTER, STAR/LSTAR/CSTAR/SFMASK), segment bases, EFER, PAT, MTRRs, MISC_ENABLE,
/// machine check banks, speculation control, CET, XSS, and KVM's paravirtual MSRs.
/// Performance counters are left out: the guest CPUID hides the PMU.
const MSR_RANGES_TO_SAVE: &[(u32, u32)] = &[
    (0x10, 0x10),               // IA32_TSC
    (0x11, 0x12),               // MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME (old kvmclock)
    (0x1b, 0x1b),               // IA32_APIC_BASE
    (0x3a, 0x3b),               // IA32_FEATURE_CONTROL, IA32_TSC_ADJUST
    (0x48, 0x48),               // IA32_SPEC_CTRL
    (0x10a, 0x10a),             // IA32_ARCH_CAPABILITIES
    (0x140, 0x140),             // MISC_FEATURES_ENABLES
    (0x174, 0x176),             // IA32_SYSENTER_CS/ESP/EIP
    (0x179, 0x17b),             // IA32_MCG_CAP/STATUS/CTL
    (0x1a0, 0x1a0),             // IA32_MISC_ENABLE
    (0x1d9, 0x1d9),             // IA32_DEBUGCTL
    (0x200, 0x21f),             // variable-range MTRRs
    (0x250, 0x250),             // MTRR fixed 64K
    (0x258, 0x259),             // MTRR fixed 16K
    (0x268, 0x26f),             // MTRR fixed 4K
    (0x277, 0x277),             // IA32_PAT
    (0x2ff, 0x2ff),             // MTRR default type
    (0x400, 0x47f),             // IA32_MCi_CTL/STATUS/ADDR/MISC
    (0x6a0, 0x6a8),             // CET: U_CET, S_CET, PL0-3_SSP, INT_SSP_TAB
    (0x6e0, 0x6e1),             // IA32_TSC_DEADLINE, IA32_PKRS
    (0xd90, 0xd90),             // IA32_BNDCFGS
    (0xda0, 0xda0),             // IA32_XSS
    (0x4b56_4d00, 0x4b56_4d08), // kvmclock, async PF, steal time, PV EOI, poll control
    (0xc000_0080, 0xc000_0084), // EFER, STAR, LSTAR, CSTAR, SFMASK
    (0xc000_0100, 0xc000_0103), // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
];

/// Whether `index` is one of the MSRs a snapshot keeps.
pub fn msr_should_save(index: u32) -> bool {
    MSR_RANGES_TO_SAVE
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&index))
}

/// The MSRs to save on this host: those KVM lists (KVM_GET_MSR_INDEX_LIST) that
/// [`msr_should_save`] keeps. Ask once per VMM and pass to every [`save_vcpu`].
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| msr_should_save(i))
        .collect())
}

/// Reads the MSRs in `list`. KVM stops at the first MSR it cannot read (one listed but
/// not usable with this guest's CPUID); that one is skipped and reading goes on, so one
/// odd MSR does not lose the rest.
fn get_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            what: "MSRs",
            got: entries.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // Entries 0..n were read; entry n (if any) failed: skip it.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Puts the TSC first and TSC_DEADLINE last (see the module doc), keeping the rest in
/// order; a zero deadline with the LAPIC timer in TSC-deadline mode becomes the saved TSC.
fn order_msrs(msrs: &mut Vec<kvm_msr_entry>, lapic: Option<&kvm_lapic_state>) {
    let take = |msrs: &mut Vec<kvm_msr_entry>, index| {
        msrs.iter()
            .position(|e| e.index == index)
            .map(|i| msrs.remove(i))
    };
    let tsc = take(msrs, msr::IA32_TSC);
    let deadline = take(msrs, msr::IA32_TSC_DEADLINE);
    if let Some(t) = tsc {
        msrs.insert(0, t);
    }
    if let Some(mut d) = deadline {
        // KVM reads the deadline as 0 once the timer has fired, even if the guest has not
        // taken the interrupt yet; restored as 0, the timer would never fire again and a
        // tickless guest could sleep forever (the fix Firecracker carries). Arming it at
        // the saved TSC fires it at once.
        let lvtt = lapic.map(|l| lapic_reg(l, msr::APIC_LVTT)).unwrap_or(0);
        let tsc_deadline_mode = (lvtt >> 17) & 0x3 == 0x2;
        if d.data == 0 && tsc_deadline_mode {
            if let Some(t) = tsc {
                d.data = t.data;
            }
        }
        msrs.push(d);
    }
}

/// A 32-bit register of the LAPIC page.
fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let b: [u8; 4] =
        std::array::from_fn(|i| l.regs.get(offset + i).copied().unwrap_or(0).cast_unsigned());
    u32::from_le_bytes(b)
}

/// Whether an errno means "this VM has no such thing" (no in-kernel LAPIC, no XSAVE).
fn absent(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINVAL | libc::ENXIO | libc::ENOTTY)
}

/// Saves vCPU `fd`, which must not be running. `msr_list` comes from [`msrs_to_save`].
///
/// An exit to user space for port I/O or MMIO is finished only by the next KVM_RUN (KVM
/// API, "KVM_RUN": the pending part of the operation is in no state user space can read),
/// so the vCPU must have re-entered KVM_RUN since its last such exit, e.g. with
/// `immediate_exit` set, which is how a pause kick leaves KVM_RUN.
///
/// The XSAVE area is read with KVM_GET_XSAVE (4 KiB). That is all of it unless the VMM
/// asked for dynamically enabled features (AMX, `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`),
/// which this VMM never does, so KVM_GET_XSAVE2 is not needed.
pub fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?);
    let xsave = match fd.get_xsave() {
        Ok(x) => Some(x),
        Err(e) if absent(&e) => None,
        Err(e) => return Err(ioctl("KVM_GET_XSAVE")(e)),
    };
    let xcrs = match fd.get_xcrs() {
        Ok(x) => Some(x),
        Err(e) if absent(&e) => None,
        Err(e) => return Err(ioctl("KVM_GET_XCRS")(e)),
    };
    let debugregs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = match fd.get_lapic() {
        Ok(l) => Some(l),
        Err(e) if absent(&e) => None,
        Err(e) => return Err(ioctl("KVM_GET_LAPIC")(e)),
    };
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let mut msrs = get_msrs(fd, msr_list)?;
    order_msrs(&mut msrs, lapic.as_ref());
    let vcpu_events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        vcpu_events,
        tsc_khz,
    })
}

/// Restores `s` into vCPU `fd`: a new vCPU of a VM whose memory, irqchip and clock are
/// already restored (see `vm_state`). The order is in the module doc.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuStateError::TooMany {
        what: "CPUID entries",
        got: s.cpuid.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    if let Some(saved) = s.tsc_khz {
        let host = fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
        if host != saved {
            fd.set_tsc_khz(saved)
                .map_err(|source| VcpuStateError::TscFrequency {
                    saved,
                    host,
                    source,
                })?;
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
    fd.set_sregs(&sregs_for_set(&s.sregs, host_uses_svm()))
        .map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&s.fpu))
        .map_err(ioctl("KVM_SET_FPU"))?;
    if let Some(xsave) = &s.xsave {
        // SAFETY: `xsave` is a whole 4 KiB `kvm_xsave`; KVM reads at most its uabi size,
        // which is 4 KiB or less because this VMM never enables dynamic XSTATE features
        // (see `save_vcpu`).
        unsafe { fd.set_xsave(xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    if let Some(lapic) = &s.lapic {
        fd.set_lapic(lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    set_msrs(fd, &s.msrs)?;
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    // EINVAL when the guest has not set up kvmclock: nothing to tell it then.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

/// The TSS descriptor types (Intel SDM vol. 3, table 3-2): available and busy 32/64-bit TSS.
const TSS_AVAILABLE: u8 = 0x9;
const TSS_BUSY: u8 = 0xb;

/// Whether this host's KVM runs guests with AMD SVM (kvm_amd) rather than Intel VMX: the
/// SVM feature bit, CPUID 0x8000_0001 ECX[2], which no Intel CPU sets.
fn host_uses_svm() -> bool {
    static SVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SVM.get_or_init(|| {
        let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        max_ext >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 2) != 0
    })
}

/// The saved `sregs` as KVM_SET_SREGS should get them.
///
/// On SVM the VMCB keeps TR's hidden type as the CPU loaded it, "available" (9): LTR marks
/// the descriptor in the GDT busy but caches it as it read it. KVM_GET_SREGS reports it
/// busy (11) all the same (`svm_get_segment` sets the bit, for VMX, whose VM entry demands
/// a busy TR), and KVM_SET_SREGS writes whatever it is given into the VMCB. Restored as 11,
/// the guest runs with a TR the CPU never loaded itself; a CPU that checks the cached type
/// when it consults the TSS I/O permission bitmap (QEMU's TCG SVM, our test host) then
/// refuses every user-space IN/OUT, even to ports the task was granted with ioperm(): the
/// guest process gets SIGSEGV. So on SVM the busy bit goes back to what the VMCB held.
/// VMX keeps 11.
fn sregs_for_set(saved: &kvm_sregs, svm: bool) -> kvm_sregs {
    let mut sregs = *saved;
    if svm && sregs.tr.s == 0 && sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

/// Writes the MSRs. KVM stops at the first write it refuses; a refused write of the value
/// the vCPU already holds changes nothing and is skipped (e.g. MSR_KVM_ASYNC_PF_INT = 0
/// without an in-kernel LAPIC: readable, but every write is refused). Any other refusal
/// is an error naming the MSR.
fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooMany {
            what: "MSRs",
            got: chunk.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if let Some(refused) = chunk.get(set) {
            let current = get_msrs(fd, &[refused.index])?;
            if current.first().map(|e| e.data) != Some(refused.data) {
                return Err(VcpuStateError::SetMsrs {
                    index: refused.index,
                    set,
                    want: chunk.len(),
                });
            }
        }
        // Past the written ones and the skipped one.
        rest = &rest[(set + 1).min(chunk.len())..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn msr_allowlist() {
        for i in [
            0x10,
            0x1b,
            0x6e0,
            0x277,
            0xc000_0080,
            0xc000_0082,
            0x4b56_4d01,
            0x12,
        ] {
            assert!(msr_should_save(i), "{i:#x}");
        }
        for i in [0, 0xc1, 0x186, 0x38f, 0xc001_0000, 0x4b56_4d09] {
            assert!(!msr_should_save(i), "{i:#x}");
        }
    }

    fn lapic_with_lvtt(v: u32) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[msr::APIC_LVTT + i] = b.cast_signed();
        }
        l
    }

    #[test]
    fn tsc_goes_first_and_deadline_last() {
        let mut m = vec![e(0x6e0, 5), e(0x1b, 1), e(0x10, 100), e(0x277, 7)];
        order_msrs(&mut m, None);
        let order: Vec<u32> = m.iter().map(|e| e.index).collect();
        assert_eq!(order, [0x10, 0x1b, 0x277, 0x6e0]);
        assert_eq!(m[3].data, 5);
    }

    #[test]
    fn zero_deadline_is_armed_only_in_tsc_deadline_mode() {
        let mut m = vec![e(0x6e0, 0), e(0x10, 100)];
        order_msrs(&mut m, Some(&lapic_with_lvtt(2 << 17)));
        assert_eq!(m[1].data, 100);
        let mut m = vec![e(0x6e0, 0), e(0x10, 100)];
        order_msrs(&mut m, Some(&lapic_with_lvtt(1 << 17)));
        assert_eq!(m[1].data, 0, "periodic mode: deadline unused");
    }

    #[test]
    fn busy_tr_is_restored_available_on_svm_only() {
        let mut saved = kvm_sregs::default();
        saved.tr.type_ = TSS_BUSY;
        saved.tr.present = 1;
        assert_eq!(sregs_for_set(&saved, true).tr.type_, TSS_AVAILABLE);
        assert_eq!(sregs_for_set(&saved, false).tr.type_, TSS_BUSY);
        // Only the TR's type changes.
        let mut back = sregs_for_set(&saved, true);
        back.tr.type_ = TSS_BUSY;
        assert_eq!(back, saved);
        // Anything but a busy system-segment TR is left alone.
        saved.tr.type_ = TSS_AVAILABLE;
        assert_eq!(sregs_for_set(&saved, true), saved);
        saved.tr.type_ = TSS_BUSY;
        saved.tr.s = 1;
        assert_eq!(sregs_for_set(&saved, true), saved);
    }

    #[test]
    fn fpu_round_trips_through_the_serde_mirror() {
        let f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        assert_eq!(kvm_fpu::from(&FpuState::from(&f)), f);
    }
}
