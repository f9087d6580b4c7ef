//! KVM tests with a tiny hand-assembled guest, on this machine's own /dev/kvm (kvm-pvm
//! included: no in-kernel irqchip, see ../shared/TEST-HOST.md). They prove the vCPU setup in
//! long mode, port I/O exits reaching the serial device, MMIO exits both ways, and a clean
//! stop, through the same code paths `vmm` uses for Linux.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice};
use devices::legacy::{ConsoleOutput, SerialConsole, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::regs::EntryMode;
use vmm::boot::BootEntry;
use vmm::vstate::vcpu::{Vcpu, VcpuExitReason, VcpuIo};
use vmm::vstate::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

const CODE_ADDR: u64 = 0x1000;
/// Inside the identity-mapped first GiB but outside guest RAM: accesses become MMIO exits.
const MMIO_ADDR: u64 = 0x1000_0000;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);
impl Write for Captured {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An MMIO register that remembers writes and answers reads with 0x21 ('!').
#[derive(Default)]
struct Scratch {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Scratch {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x21);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct Setup {
    vm: Vm,
    mem: GuestMemoryMmap,
    vcpu: Vcpu,
}

fn setup(code: &[u8]) -> Setup {
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
    vcpu.configure(&vm, 1, Some((&mem, entry)))
        .expect("configuring the vCPU (CPUID, MSRs, FPU, long mode)");
    Setup { vm, mem, vcpu }
}

#[rustfmt::skip]
const PRINT_MMIO_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
    0xb0, b'O', 0xee,                   // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee,                   // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee,                  // mov al, '\n'; out dx, al
    0x48, 0xb8, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, // mov rax, 0x10000000
    0xc6, 0x00, 0x5a,                   // mov byte [rax], 0x5a   (MMIO write)
    0x8a, 0x18,                         // mov bl, [rax]          (MMIO read)
    0x88, 0xd8, 0xee,                   // mov al, bl; out dx, al
    0xf4,                               // hlt
];

#[test]
fn long_mode_guest_prints_on_serial_and_does_mmio() {
    let mut s = setup(PRINT_MMIO_HALT);
    let out = Captured::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        irq,
        ConsoleOutput::new(Box::new(out.clone()), false),
    )));
    let scratch = Arc::new(Mutex::new(Scratch::default()));
    let mut pio = Bus::new();
    pio.insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, serial.clone())
        .unwrap();
    let mut mmio = Bus::new();
    mmio.insert(MMIO_ADDR, 0x1000, scratch.clone()).unwrap();
    let io = VcpuIo {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        stop: Arc::new(AtomicBool::new(false)),
    };

    let reason = s.vcpu.run(&io);
    serial.lock().unwrap().flush().unwrap();

    assert_eq!(reason, VcpuExitReason::Halted);
    assert_eq!(String::from_utf8_lossy(&out.0.lock().unwrap()), "OK\n!");
    assert_eq!(scratch.lock().unwrap().writes, vec![(0, vec![0x5a])]);
    assert_eq!(s.vcpu.exits.mmio, 2, "one MMIO write and one read");
    assert_eq!(s.vcpu.exits.pio, 4);
    assert_eq!(s.vcpu.exits.unhandled, 0);
    // The vCPU really ran in long mode.
    let sregs = s.vcpu.fd.get_sregs().unwrap();
    assert_ne!(sregs.efer & 0x400, 0, "EFER.LMA");
    let regs = s.vcpu.fd.get_regs().unwrap();
    assert_eq!(regs.rip, CODE_ADDR + PRINT_MMIO_HALT.len() as u64);
    drop(s.vm);
    drop(s.mem);
}

#[test]
fn unclaimed_port_reads_float_high_and_are_counted() {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0x34, 0x12, // mov dx, 0x1234
        0xec,                   // in al, dx
        0x88, 0xc3,             // mov bl, al
        0xf4,                   // hlt
    ];
    let mut s = setup(code);
    let io = VcpuIo {
        pio: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    assert_eq!(s.vcpu.run(&io), VcpuExitReason::Halted);
    assert_eq!(s.vcpu.exits.unhandled, 1);
    assert_eq!(s.vcpu.fd.get_regs().unwrap().rbx & 0xff, 0xff);
}

#[test]
fn stop_flag_ends_the_run_loop_before_entering_the_guest() {
    // jmp $ : would spin forever if the loop entered the guest.
    let mut s = setup(&[0xeb, 0xfe]);
    let io = VcpuIo {
        pio: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
        stop: Arc::new(AtomicBool::new(true)),
    };
    assert_eq!(s.vcpu.run(&io), VcpuExitReason::Stopped);
}
