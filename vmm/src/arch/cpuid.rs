//! Normalises the CPUID table KVM supports into what one vCPU of this VM should see: its
//! APIC ID, a flat topology of `n` single-thread cores in one package, the hypervisor bit,
//! and no PMU. Everything else is KVM_GET_SUPPORTED_CPUID as is, which already filters out
//! host-only features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` things (0 for 1).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn normalise_entry(e: &mut kvm_cpuid_entry2, cpu: u8, count: u8, tsc_deadline: bool) {
    let id = u32::from(cpu);
    let n = u32::from(count);
    match e.function {
        LEAF_FEATURES => {
            // EBX: APIC ID [31:24], logical processors per package [23:16], CLFLUSH 8*8.
            e.ebx = (id << 24) | (n << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            // KVM leaves TSC-deadline out of its supported set; userspace adds it when the
            // in-kernel LAPIC can emulate it (KVM_CAP_TSC_DEADLINE_TIMER). Without it Linux
            // calibrates the LAPIC timer against the PIT at boot, which in a nested setup
            // takes ~0.3 s and can fail ("APIC timer disabled due to verification failure").
            if tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            e.eax &= 0x3fff;
            e.eax |= (n.saturating_sub(1) & 0x3f) << 26;
            // L3 is shared by the whole package; lower levels by one core.
            let level = (e.eax >> 5) & 0x7;
            if level >= 3 {
                e.eax |= (n.saturating_sub(1) & 0xfff) << 14;
            }
        }
        LEAF_PMU => {
            // No virtual PMU: the guest must not program counters that are not there.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = id; // x2APIC ID
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    // Core level: n cores.
                    e.eax = bits_for(n);
                    e.ebx = n;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // ECX[15:12]: APIC ID bits for cores; [7:0]: cores - 1.
            e.ecx = (bits_for(n) << 12) | n.saturating_sub(1);
        }
        LEAF_AMD_TOPOLOGY => {
            e.eax = id;
            e.ebx = id & 0xff; // compute unit = core, one thread each
            e.ecx = 0; // one node
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `cpu` of `count`; `tsc_deadline` when KVM emulates the
/// LAPIC's TSC-deadline mode.
pub fn for_vcpu(supported: &CpuId, cpu: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        normalise_entry(e, cpu, count, tsc_deadline);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(bits_for), [0, 1, 2, 2, 3, 8]);
    }

    #[test]
    fn apic_id_and_topology_per_vcpu() {
        let supported = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_PMU, 0),
            entry(LEAF_AMD_SIZES, 0),
        ])
        .unwrap();
        let c = for_vcpu(&supported, 3, 4, true);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical count");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!((e[1].ebx, e[1].edx, e[1].ecx >> 8), (1, 3, 1));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
        assert_eq!(
            (e[3].ebx, e[3].ecx),
            (0, 2),
            "invalid level past the core level"
        );
        assert_eq!((e[4].eax, e[4].ebx), (0, 0), "no PMU");
        assert_eq!(e[5].ecx & 0xff, 3);
        // One vCPU: no HTT.
        let one = for_vcpu(&supported, 0, 1, false);
        assert_eq!(one.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(one.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}
