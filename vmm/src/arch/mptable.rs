//! The Intel MultiProcessor table (MP spec 1.4, chapter 4), which tells a guest without ACPI
//! how many CPUs it has and how ISA interrupts reach the IOAPIC.
//!
//! Layout written at [`super::layout::MPTABLE_ADDR`]: the 16-byte floating pointer, then the
//! configuration table: header, one processor entry per vCPU, the ISA bus, the IOAPIC, one
//! I/O interrupt entry per IOAPIC pin, and the two local interrupt entries (ExtINT on LINT0,
//! NMI on LINT1).

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_MAX_SIZE};

/// IOAPIC pins wired to ISA IRQs 0..24.
pub const IOAPIC_PINS: u8 = 24;
/// Most vCPUs the table (and the APIC ID space below the IOAPIC's ID) allows.
pub const MAX_CPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Errors building the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// 0 or more than [`MAX_CPUS`] CPUs.
    #[error("{0} vCPUs cannot be described (1 to {MAX_CPUS})")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The table bytes for `cpus` vCPUs, to be written at guest address `base`.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let ioapic_id = cpus; // APIC IDs 0..cpus are the CPUs.
    let mut t: Vec<u8> = Vec::with_capacity(
        FLOATING_LEN
            + HEADER_LEN
            + CPU_ENTRY_LEN * usize::from(cpus)
            + SMALL_ENTRY_LEN * (usize::from(IOAPIC_PINS) + 4),
    );

    // Configuration table, built first at offset FLOATING_LEN so the header can be patched.
    let table_start = FLOATING_LEN;
    t.resize(FLOATING_LEN + HEADER_LEN, 0);
    let mut entries: u16 = 0;
    for id in 0..cpus {
        let flags = if id == 0 { 0x3 } else { 0x1 }; // enabled, BSP
        t.extend_from_slice(&[0, id, 0x14, flags]);
        t.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        t.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    // Bus 0 is ISA.
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    // The IOAPIC.
    t.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    t.extend_from_slice(&u32::try_from(IOAPIC_ADDR).unwrap_or(0).to_le_bytes());
    entries += 1;
    // ISA IRQ n -> IOAPIC pin n, conforming polarity and trigger.
    for irq in 0..IOAPIC_PINS {
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI, to all local APICs (0xff).
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let table_len = t.len() - table_start;
    let h = &mut t[table_start..table_start + HEADER_LEN];
    h[0..4].copy_from_slice(b"PCMP");
    h[4..6].copy_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    h[6] = 4; // spec revision 1.4
    h[8..16].copy_from_slice(b"VMM     ");
    h[16..28].copy_from_slice(b"MICROVM     ");
    h[34..36].copy_from_slice(&entries.to_le_bytes());
    h[36..40].copy_from_slice(&u32::try_from(LAPIC_ADDR).unwrap_or(0).to_le_bytes());
    let sum = checksum(&t[table_start..]);
    t[table_start + 7] = sum;

    // Floating pointer.
    let table_addr = base + table_start as u64;
    let f = &mut t[0..FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = 4;
    let sum = checksum(&t[0..FLOATING_LEN]);
    t[10] = sum;

    debug_assert!(t.len() as u64 <= MPTABLE_MAX_SIZE);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 4, 254] {
            let t = build(0xf0000, cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(ptr, 0xf0010);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes(table[4..6].try_into().unwrap()));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            assert_eq!(
                len,
                HEADER_LEN + CPU_ENTRY_LEN * usize::from(cpus) + SMALL_ENTRY_LEN * 28
            );
            assert!(t.len() as u64 <= MPTABLE_MAX_SIZE);
            // First CPU is the BSP, the rest are plain enabled CPUs.
            assert_eq!(table[HEADER_LEN + 3], 3);
            if cpus > 1 {
                assert_eq!(table[HEADER_LEN + CPU_ENTRY_LEN + 3], 1);
            }
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert_eq!(build(0, 0), Err(MptableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MptableError::CpuCount(255)));
    }
}
