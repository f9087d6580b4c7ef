//! Snapshot round trips on this machine's /dev/kvm with a tiny guest: run it, stop it,
//! save the vCPU, the VM and the memory through the real files, restore into a new VM and
//! check the guest continues from where it was.
//!
//! The counting guest runs without an in-kernel irqchip (kvm-pvm cannot run a guest with
//! one); kvm-pvm can still create the irqchip and PIT, so their state round trip runs here
//! too, without running a guest.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::format;
use super::memory::{layout_of, map_memory, write_memory};
use super::state::{DevicesState, MachineState, VmState};
use crate::arch::{cpuid, regs};
use crate::vstate::vcpu_state::{msrs_to_save, restore_vcpu, save_vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::{restore_vm, save_vm};

const CODE_ADDR: u64 = 0x1000;
const COUNTER_ADDR: u64 = 0x8000;
const MEM_SIZE: usize = 2 << 20;

/// Counts in rax and in the u64 at COUNTER_ADDR, with an `out 0x80` per iteration so each
/// step is one exit to user space.
#[rustfmt::skip]
const COUNTER: &[u8] = &[
    0x48, 0xc7, 0xc3, 0x00, 0x80, 0x00, 0x00, // mov rbx, 0x8000
    0x48, 0xff, 0xc0,                         // loop: inc rax
    0x48, 0xff, 0x03,                         //       inc qword [rbx]
    0xe6, 0x80,                               //       out 0x80, al
    0xeb, 0xf6,                               //       jmp loop
];

/// A VM with 2 MiB of RAM at 0 and one vCPU configured for a long-mode entry at CODE_ADDR,
/// set up like `Vcpu::configure` does for the boot CPU.
fn boot_vcpu(vm: &Vm, mem: &GuestMemoryMmap) -> VcpuFd {
    let fd = vm.fd.create_vcpu(0).unwrap();
    fd.set_cpuid2(&cpuid::for_vcpu(&vm.supported_cpuid, 0, 1, vm.tsc_deadline))
        .unwrap();
    fd.set_msrs(&regs::boot_msrs().unwrap()).unwrap();
    fd.set_fpu(&regs::boot_fpu()).unwrap();
    let sregs = regs::boot_sregs(mem, fd.get_sregs().unwrap(), regs::EntryMode::Long).unwrap();
    fd.set_sregs(&sregs).unwrap();
    fd.set_regs(&regs::boot_regs(regs::EntryMode::Long, CODE_ADDR, 0))
        .unwrap();
    fd
}

/// Runs until `n` writes to port 0x80, then completes the last one with an immediate exit
/// (KVM API: an I/O exit is finished only by the next KVM_RUN), as a pause would.
fn run_steps(fd: &mut VcpuFd, n: u32) {
    let mut seen = 0;
    while seen < n {
        match fd.run().unwrap() {
            VcpuExit::IoOut(0x80, _) => seen += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    fd.set_kvm_immediate_exit(1);
    let e = fd.run().unwrap_err();
    assert_eq!(e.errno(), libc::EINTR);
    fd.set_kvm_immediate_exit(0);
}

fn counter(mem: &GuestMemoryMmap) -> u64 {
    mem.read_obj(GuestAddress(COUNTER_ADDR)).unwrap()
}

#[test]
fn counting_guest_continues_after_restore_into_a_new_vm() {
    let kvm = Kvm::new().unwrap();
    let msr_list = msrs_to_save(&kvm).unwrap();
    assert!(msr_list.contains(&0x10), "the TSC is listed: {msr_list:x?}");

    // Boot and run five steps.
    let vm = Vm::new(false).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    vm.register_memory(&mem).unwrap();
    mem.write_slice(COUNTER, GuestAddress(CODE_ADDR)).unwrap();
    let mut fd = boot_vcpu(&vm, &mem);
    run_steps(&mut fd, 5);
    assert_eq!(fd.get_regs().unwrap().rax, 5);
    assert_eq!(counter(&mem), 5);

    // Snapshot to files.
    let vcpu = save_vcpu(&fd, &msr_list).unwrap();
    assert!(
        vcpu.msrs.iter().any(|m| m.index == 0xc000_0082),
        "LSTAR saved"
    );
    assert!(vcpu.cpuid.len() > 1, "the CPUID set is saved");
    let state = VmState {
        machine: MachineState {
            vcpu_count: 1,
            mem_size_mib: (MEM_SIZE >> 20) as u64,
            regions: layout_of(&mem),
        },
        vm: save_vm(&vm.fd).unwrap(),
        vcpus: vec![vcpu],
        devices: DevicesState::default(),
    };
    assert!(state.vm.irqchip.is_none() && state.vm.pit.is_none());
    let dir = TempDir::new().unwrap();
    let (vmstate, memfile) = (dir.as_path().join("vmstate"), dir.as_path().join("mem"));
    format::save(&vmstate, &state).unwrap();
    let stats = write_memory(&mem, &memfile).unwrap();
    assert!(stats.pages_written >= 3, "code, counter, page tables");

    // The original keeps running on its own.
    run_steps(&mut fd, 2);
    assert_eq!(counter(&mem), 7);

    // Restore into a new VM and vCPU, with no boot-time setup at all.
    let state = format::load(&vmstate, Some(2)).unwrap();
    let vm2 = Vm::new(false).unwrap();
    let mem2 = map_memory(&memfile, &state.machine.regions).unwrap();
    vm2.register_memory(&mem2).unwrap();
    restore_vm(&vm2.fd, &state.vm).unwrap();
    let mut fd2 = vm2.fd.create_vcpu(0).unwrap();
    restore_vcpu(&fd2, &state.vcpus[0]).unwrap();
    let regs = fd2.get_regs().unwrap();
    assert_eq!((regs.rax, regs.rip), (5, state.vcpus[0].regs.rip));
    assert_eq!(
        fd2.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .unwrap()
            .as_slice()
            .len(),
        state.vcpus[0].cpuid.len()
    );
    assert_ne!(
        fd2.get_sregs().unwrap().efer & 0x400,
        0,
        "still in long mode"
    );

    run_steps(&mut fd2, 3);
    assert_eq!(
        fd2.get_regs().unwrap().rax,
        8,
        "continued from the saved count"
    );
    assert_eq!(counter(&mem2), 8);
    assert_eq!(counter(&mem), 7, "the original VM is untouched");
    let file = std::fs::read(&memfile).unwrap();
    let at = usize::try_from(COUNTER_ADDR).unwrap();
    assert_eq!(
        u64::from_le_bytes(file[at..at + 8].try_into().unwrap()),
        5,
        "guest writes after restore stay out of the memory file"
    );
}

#[test]
fn saved_msrs_restore_with_their_values() {
    let kvm = Kvm::new().unwrap();
    let msr_list = msrs_to_save(&kvm).unwrap();
    let vm = Vm::new(false).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    vm.register_memory(&mem).unwrap();
    let fd = boot_vcpu(&vm, &mem);
    // Give a few MSRs distinctive values.
    let lstar = 0xffff_ffff_8100_0000u64;
    let set = [
        (0xc000_0082u32, lstar),
        (0x175, 0x1234_5000),
        (0x277, 0x0007_0406_0007_0406),
    ];
    let entries: Vec<_> = set
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).unwrap();
    assert_eq!(fd.set_msrs(&msrs).unwrap(), set.len());
    let saved = save_vcpu(&fd, &msr_list).unwrap();
    assert_eq!(saved.msrs[0].index, 0x10, "the TSC goes first");

    let vm2 = Vm::new(false).unwrap();
    vm2.register_memory(&mem).unwrap();
    let fd2 = vm2.fd.create_vcpu(0).unwrap();
    restore_vcpu(&fd2, &saved).unwrap();
    let again = save_vcpu(&fd2, &msr_list).unwrap();
    for (index, data) in set {
        let got = again.msrs.iter().find(|m| m.index == index).map(|m| m.data);
        assert_eq!(got, Some(data), "MSR {index:#x}");
    }
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.fpu, saved.fpu);
    assert_eq!(again.debugregs, saved.debugregs);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.mp_state, saved.mp_state);
}

#[test]
fn irqchip_pit_and_clock_round_trip() {
    let vm = Vm::new(true).expect("a VM with an in-kernel irqchip and PIT");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    vm.register_memory(&mem).unwrap();
    let fd = vm.fd.create_vcpu(0).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    regs::set_lint(&mut lapic);
    fd.set_lapic(&lapic).unwrap();
    // Mask IOAPIC pin 3 with a distinctive vector, so the state is not the default.
    let mut s = save_vm(&vm.fd).unwrap();
    let chips = s.irqchip.as_mut().unwrap();
    // SAFETY: chip 2 is the IOAPIC, so the union holds `ioapic`.
    unsafe { chips.ioapic.chip.ioapic.redirtbl[3].bits = 0x1_0000 | 0x33 };
    restore_vm(&vm.fd, &s).unwrap();
    let kvm = Kvm::new().unwrap();
    let vcpu = save_vcpu(&fd, &msrs_to_save(&kvm).unwrap()).unwrap();
    assert!(vcpu.lapic.is_some());
    let saved = save_vm(&vm.fd).unwrap();
    assert!(saved.pit.is_some());

    let vm2 = Vm::new(true).unwrap();
    vm2.register_memory(&mem).unwrap();
    restore_vm(&vm2.fd, &saved).unwrap();
    let fd2 = vm2.fd.create_vcpu(0).unwrap();
    restore_vcpu(&fd2, &vcpu).unwrap();
    let back = save_vm(&vm2.fd).unwrap();
    let chips = back.irqchip.unwrap();
    // SAFETY: as above.
    let bits = unsafe { chips.ioapic.chip.ioapic.redirtbl[3].bits };
    assert_eq!(bits & 0x1_00ff, 0x1_0033);
    assert!(
        back.clock.clock >= saved.clock.clock,
        "kvmclock does not go back"
    );
    assert_eq!(
        fd2.get_lapic().unwrap().regs[..],
        vcpu.lapic.unwrap().regs[..]
    );
    // A VM without an irqchip refuses a state that has one.
    let bare = Vm::new(false).unwrap();
    assert!(restore_vm(&bare.fd, &saved).is_err());
}
