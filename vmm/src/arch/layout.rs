//! Guest physical memory layout (x86_64). Where every boot structure goes and where the
//! RAM and the MMIO hole are.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_9000  PML4 (identity map, long-mode boot)
//! 0x0000_0520  IDT (empty)         0x0000_a000  PDPT
//! 0x0000_6000  PVH start_info      0x0000_b000  PD (2 MiB pages, first GiB)
//! 0x0000_6800  PVH module list     0x0002_0000  kernel command line (2 KiB)
//! 0x0000_6a00  PVH memory map      0x0009_fc00  end of low RAM
//! 0x0000_7000  zero page           0x000f_0000  MP table (BIOS area, not RAM in e820)
//! 0x0000_8ff0  boot stack          0x0010_0000  high RAM starts (bzImage loads here)
//! 0xc000_0000 .. 0x1_0000_0000     MMIO hole: virtio-mmio, IOAPIC, LAPIC
//! 0x1_0000_0000 ..                 RAM above the hole for guests over 3 GiB
//! ```

/// GDT for the boot CPU.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT (interrupts stay off until the kernel sets its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6a00;
/// Linux boot protocol zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the long-mode entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line, including the NUL: the x86 kernel's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the RAM below 640 KiB.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// MP table (floating pointer and configuration table), in the BIOS area Linux scans.
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// Room for the MP table: enough for 254 CPUs.
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// Start of high RAM.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address for virtio-mmio devices, in the hole.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for Intel VMX, just below the IOAPIC's neighbourhood.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page (Intel), right before the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Guest RAM regions `(start, size)` for `mem_size` bytes of RAM: everything below the
/// MMIO hole, and what does not fit there above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// e820 RAM ranges `(start, size)` as the guest should see them: low RAM up to 640 KiB,
/// then high RAM from 1 MiB. The BIOS area between is not RAM (it holds the MP table).
pub fn e820_ram(mem_size: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(0, LOW_RAM_END)];
    for (start, size) in ram_regions(mem_size) {
        let s = start.max(HIGH_RAM_START);
        let e = start + size;
        if e > s {
            out.push((s, e - s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 * MIB), vec![(0, 128 * MIB)]);
        assert_eq!(
            e820_ram(128 * MIB),
            vec![(0, LOW_RAM_END), (HIGH_RAM_START, 127 * MIB)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let four_g = 4096 * MIB;
        assert_eq!(
            ram_regions(four_g),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, MIB * 1024)]
        );
        let e = e820_ram(four_g);
        assert_eq!(e.len(), 3);
        let total: u64 = e.iter().map(|r| r.1).sum();
        // All RAM except the 384 KiB between 640 KiB and 1 MiB (and the 1 KiB at 639 KiB).
        assert_eq!(total, four_g - (HIGH_RAM_START - LOW_RAM_END));
        assert!(e
            .iter()
            .all(|&(s, l)| s + l <= MMIO_GAP_START || s >= MMIO_GAP_END));
    }
}
