//! A tiny hand-assembled guest run by the library's own vCPU code on this machine's
//! /dev/kvm (kvm-pvm included: no in-kernel irqchip), and its snapshot, written with the
//! library's `snapshot::create`. The `vmm` binary only boots Linux, so a test that wants
//! the binary to run such a guest gives it this snapshot to restore.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::Bus;
use devices::legacy::{ConsoleOutput, SerialConsole, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::regs::EntryMode;
use vmm::boot::BootEntry;
use vmm::snapshot::create::{capture, write, SnapshotSource};
use vmm::snapshot::state::VmState;
use vmm::vstate::vcpu::{Vcpu, VcpuIo};
use vmm::vstate::vcpu_state::msrs_to_save;
use vmm::vstate::vcpu_thread::VcpuSet;
use vmm::vstate::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

/// Where the guest's code is loaded and starts (64-bit mode).
pub const CODE_ADDR: u64 = 0x1000;

/// One VM of 2 MiB with `code` at [`CODE_ADDR`], one vCPU set up to run it, and COM1.
pub struct TinyGuest {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub io: VcpuIo,
    pub exit_evt: EventFd,
    pub vcpu: Option<Vcpu>,
}

impl TinyGuest {
    /// Builds the VM; the guest's console output goes to `out`.
    pub fn new(code: &[u8], out: ConsoleOutput) -> TinyGuest {
        let vm = Vm::new(false).expect("creating a VM on /dev/kvm");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        vm.register_memory(&mem).unwrap();
        mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
        let vcpu = Vcpu::new(&vm, 0).unwrap();
        let entry = BootEntry {
            mode: EntryMode::Long,
            entry: CODE_ADDR,
            boot_info: 0,
        };
        vcpu.configure(&vm, 1, Some((&mem, entry))).unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            out,
        )));
        let mut pio = Bus::new();
        pio.insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, serial.clone())
            .unwrap();
        let io = VcpuIo {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            stop: Arc::new(AtomicBool::new(false)),
        };
        TinyGuest {
            vm,
            mem,
            serial,
            io,
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            vcpu: Some(vcpu),
        }
    }

    /// Its vCPU thread: running, or (`paused`) parked before its first instruction.
    pub fn start(&mut self, paused: bool) -> VcpuSet {
        let vcpus = vec![self.vcpu.take().expect("the vCPU is already started")];
        if paused {
            VcpuSet::start_paused(vcpus, &self.io, &self.exit_evt, Duration::from_secs(5)).unwrap()
        } else {
            VcpuSet::start(vcpus, &self.io, &self.exit_evt).unwrap()
        }
    }

    /// Captures the (paused) guest, writes the vmstate and memory files, stops the vCPU
    /// thread, and returns the captured state.
    pub fn snapshot(&self, mut set: VcpuSet, vmstate: &Path, memfile: &Path) -> VmState {
        let msr_list = msrs_to_save(&Kvm::new().unwrap()).unwrap();
        let src = SnapshotSource {
            vm: &self.vm,
            mem: &self.mem,
            io: &self.io,
            msr_list: &msr_list,
            devices: &[],
            serial: Some(&self.serial),
            i8042: None,
            paused_clock: self.vm.get_clock().unwrap(),
        };
        let state = capture(&src, &mut set).expect("capturing the paused guest");
        write(&state, &self.mem, vmstate, memfile).expect("writing the snapshot");
        assert!(set.stop(Duration::from_secs(5)));
        state
    }
}
