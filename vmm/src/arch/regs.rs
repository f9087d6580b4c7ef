//! Boot-time CPU state: GDT and segment registers, the identity-map page tables for a
//! long-mode entry, FPU, MSRs and the local APIC's LINT pins.
//!
//! Two entry states exist:
//! - PVH (ELF vmlinux with a PVH note): 32-bit protected mode, paging off, `ebx` pointing at
//!   `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h, "PVH boot ABI").
//! - Linux 64-bit boot protocol (bzImage, or an ELF without the note): long mode with the
//!   first GiB identity-mapped, `rsi` pointing at the zero page
//!   (Documentation/x86/boot.rst, "64-bit Boot Protocol").

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure did not fit in guest memory.
    #[error("writing {what} to guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Building the MSR list failed.
    #[error("building the MSR list")]
    Msrs,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Which entry state the boot CPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, `rbx` = start_info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Long,
}

/// A GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u64| u8::from((entry >> shift) & 1 == 1);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).unwrap_or(0);
            // With G set the limit counts 4 KiB pages.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

/// Writes the GDT and empty IDT and returns the segment registers for `mode`.
fn setup_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let code = match mode {
        // 32-bit code: D/B set, L clear.
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        // 64-bit code: L set.
        EntryMode::Long => gdt_entry(0xa09b, 0, 0xfffff),
    };
    let gdt: [u64; 4] = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0xfffff), // TSS (busy)
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|source| RegsError::Write {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|source| RegsError::Write {
            what: "IDT",
            source,
        })?;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code_seg = segment_from_gdt(gdt[1], 1);
    let data_seg = segment_from_gdt(gdt[2], 2);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages for the long-mode entry.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|source| RegsError::Write {
                what: "page tables",
                source,
            })
    };
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    w(PD_ADDR | 0x3, PDPT_ADDR)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Special registers for the boot CPU in `mode`, starting from KVM's defaults.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
    mode: EntryMode,
) -> Result<kvm_sregs, RegsError> {
    setup_segments(mem, &mut sregs, mode)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if mode == EntryMode::Long {
        setup_page_tables(mem, &mut sregs)?;
    }
    Ok(sregs)
}

/// General registers for the boot CPU: entry point and the pointer the protocol expects.
pub fn boot_regs(mode: EntryMode, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Long => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
    }
    regs
}

/// FPU state after reset: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs given known values at boot; `misc_enable` turns on fast strings.
pub fn boot_msrs() -> Result<Msrs, RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back.
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a local APIC register page, as a PC's BIOS
/// leaves them (the MP table says the same).
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let get = |regs: &[std::os::raw::c_char], off: usize| {
        let b: [u8; 4] = std::array::from_fn(|i| regs[off + i].cast_unsigned());
        u32::from_le_bytes(b)
    };
    let set = |regs: &mut [std::os::raw::c_char], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = b.cast_signed();
        }
    };
    let mode = |reg: u32, m: u32| (reg & !0x700) | (m << 8);
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    set(&mut lapic.regs, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    set(&mut lapic.regs, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.base, code64.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.present),
            (1, 0, 1, 1)
        );
        assert_eq!((code64.type_, code64.selector), (0xb, 8));
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let m = mem();
        let s = boot_sregs(&m, kvm_sregs::default(), EntryMode::Long).unwrap();
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(),
            PDPT_ADDR | 3
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PD_ADDR + 8 * 511)).unwrap(),
            (511 << 21) | 0x83
        );
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let s = boot_sregs(&mem(), kvm_sregs::default(), EntryMode::Pvh).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.db, s.cs.l), (1, 0));
        let r = boot_regs(EntryMode::Pvh, 0x100_0000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rsi), (0x100_0000, 0x6000, 0));
    }

    #[test]
    fn lint_pins_are_set() {
        let mut l = kvm_bindings::kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!(l.regs[0x351].cast_unsigned() & 0x7, 0x7);
        assert_eq!(l.regs[0x361].cast_unsigned() & 0x7, 0x4);
    }
}
