//! KVM tests with a tiny hand-assembled guest, on this machine's own /dev/kvm (kvm-pvm
//! included: no in-kernel irqchip, see ../shared/TEST-HOST.md). They prove the vCPU setup in
//! long mode, port I/O exits reaching the serial device, MMIO exits both ways, a clean
//! stop, pause/resume of vCPU threads, the kvmclock save/restore around a pause and the
//! completion of a pending port write before a snapshot, through the same code paths `vmm`
//! uses for Linux. Without a usable /dev/kvm they fail, saying so.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusDevice};
use devices::legacy::{ConsoleOutput, SerialConsole, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::regs::EntryMode;
use vmm::boot::BootEntry;
use vmm::vstate::vcpu::{Vcpu, VcpuEmulation, VcpuExitReason, VcpuIo};
use vmm::vstate::vcpu_thread::VcpuSet;
use vmm::vstate::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

const CODE_ADDR: u64 = 0x1000;
/// Where the counting guests keep their counters (one u64 per vCPU).
const COUNTERS_ADDR: u64 = 0x3000;

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
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
    let m = &s.vcpu.metrics;
    assert_eq!(count(&m.mmio_write), 1);
    assert_eq!(count(&m.mmio_read), 1);
    assert_eq!(count(&m.io_out), 4);
    assert_eq!(count(&m.io_in), 0);
    assert_eq!(count(&m.unhandled), 0);
    assert_eq!(count(&m.hlt), 1);
    assert_eq!(count(&m.kvm_run), 7, "six exits served, then HLT");
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
    assert_eq!(count(&s.vcpu.metrics.io_in), 1);
    assert_eq!(count(&s.vcpu.metrics.unhandled), 1);
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

/// A VM with one vCPU per entry of `code`, each entering its own code in long mode.
fn setup_smp(code: &[&[u8]]) -> (Vm, GuestMemoryMmap, Vec<Vcpu>) {
    let vm = Vm::new(false).expect("creating a VM on /dev/kvm");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    vm.register_memory(&mem).unwrap();
    let count = u8::try_from(code.len()).unwrap();
    let mut vcpus = Vec::new();
    for (id, c) in (0..count).zip(code) {
        let addr = CODE_ADDR + 0x100 * u64::from(id);
        mem.write_slice(c, GuestAddress(addr)).unwrap();
        let vcpu = Vcpu::new(&vm, id).unwrap();
        let entry = BootEntry {
            mode: EntryMode::Long,
            entry: addr,
            boot_info: 0,
        };
        vcpu.configure(&vm, count, Some((&mem, entry)))
            .expect("configuring a vCPU");
        vcpus.push(vcpu);
    }
    (vm, mem, vcpus)
}

/// Counts in memory forever, never leaving the guest: only a kick gets it out of KVM_RUN.
#[rustfmt::skip]
const SPIN_COUNTER_0: &[u8] = &[
    0x48, 0xc7, 0xc0, 0x00, 0x30, 0x00, 0x00, // mov rax, 0x3000
    0x48, 0xff, 0x00,                         // inc qword [rax]
    0xeb, 0xfb,                               // jmp back to inc
];

/// Counts in memory and writes to port 0x80 (no device: an unhandled exit) each time.
#[rustfmt::skip]
const PORT_COUNTER_1: &[u8] = &[
    0x48, 0xc7, 0xc0, 0x08, 0x30, 0x00, 0x00, // mov rax, 0x3008
    0x48, 0xff, 0x00,                         // inc qword [rax]
    0xe6, 0x80,                               // out 0x80, al
    0xeb, 0xf9,                               // jmp back to inc
];

fn counters(mem: &GuestMemoryMmap) -> [u64; 2] {
    [0, 8].map(|off| {
        mem.read_obj::<u64>(GuestAddress(COUNTERS_ADDR + off))
            .unwrap()
    })
}

/// Waits until `ok` holds for the counters, or fails after 10 s.
fn wait_counters(mem: &GuestMemoryMmap, what: &str, ok: impl Fn([u64; 2]) -> bool) -> [u64; 2] {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counters(mem);
        if ok(c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: counters stuck at {c:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn empty_io() -> VcpuIo {
    VcpuIo {
        pio: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
        stop: Arc::new(AtomicBool::new(false)),
    }
}

#[test]
fn pause_parks_every_vcpu_and_resume_continues_the_count() {
    let (vm, mem, vcpus) = setup_smp(&[SPIN_COUNTER_0, PORT_COUNTER_1]);
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut set = VcpuSet::start(vcpus, &empty_io(), &exit_evt).unwrap();
    wait_counters(&mem, "both vCPUs run", |c| c[0] > 0 && c[1] > 0);

    let t = Instant::now();
    set.pause(Duration::from_secs(5)).expect("every vCPU parks");
    let paused_in = t.elapsed();
    let frozen = counters(&mem);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counters(&mem),
        frozen,
        "a paused vCPU ran (paused in {paused_in:?})"
    );
    // The spinning vCPU never exits on its own: only the kick got it out.
    let metrics = set.metrics().to_vec();
    assert!(count(&metrics[0].1.interrupted) >= 1);
    // vCPU 1 may have been kicked between its `inc` and its `out`.
    let outs = count(&metrics[1].1.io_out);
    assert!(
        outs + 1 >= frozen[1],
        "{outs} port writes for a count of {}",
        frozen[1]
    );
    assert_eq!(count(&metrics[1].1.unhandled), outs);
    // Parked vCPUs answer on their own threads: both stopped inside their loops.
    let rips = set
        .on_each(|v| v.fd.get_regs().unwrap().rip, Duration::from_secs(5))
        .unwrap();
    assert_eq!(rips.len(), 2);
    for (id, rip) in rips {
        let code = CODE_ADDR + 0x100 * u64::from(id);
        assert!((code..code + 16).contains(&rip), "vCPU {id} at {rip:#x}");
    }
    // Pausing a paused VM is a no-op that still answers.
    set.pause(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&mem), frozen);

    set.resume(Duration::from_secs(5))
        .expect("every vCPU resumes");
    let after = wait_counters(&mem, "both vCPUs resume", |c| {
        c[0] > frozen[0] && c[1] > frozen[1]
    });
    assert!(after[1] > frozen[1], "the count continues, no reset");
    set.resume(Duration::from_secs(5)).unwrap();

    assert!(set.stop(Duration::from_secs(5)), "vCPU threads joined");
    let stopped = counters(&mem);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counters(&mem), stopped, "a vCPU ran after stop");
    assert_eq!(set.take_exit(), None, "a stop is not a guest exit");
    assert!(
        exit_evt.read().is_err(),
        "a stop does not signal the VM's end"
    );
    drop(set);
    drop(vm);
}

#[test]
fn stop_ends_paused_vcpus_and_a_halted_vcpu_reports_its_exit() {
    // vCPU 0 halts at once (HLT reaches user space without an irqchip); vCPU 1 spins.
    let (_vm, mem, vcpus) = setup_smp(&[&[0xf4], PORT_COUNTER_1]);
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut set = VcpuSet::start(vcpus, &empty_io(), &exit_evt).unwrap();
    wait_counters(&mem, "vCPU 1 runs", |c| c[1] > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while exit_evt.read().is_err() {
        assert!(Instant::now() < deadline, "the halted vCPU never signalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Pausing with one vCPU gone waits only for the live one.
    set.pause(Duration::from_secs(5)).unwrap();
    assert_eq!(set.take_exit(), Some((0, VcpuExitReason::Halted)));
    assert_eq!(set.take_exit(), None);
    assert_eq!(count(&set.metrics()[0].1.hlt), 1);
    // A paused VM stops (SIGTERM while paused): parked threads end and are joined.
    assert!(set.stop(Duration::from_secs(5)));
}

#[test]
fn triple_fault_is_a_reset_counted_as_other() {
    // ud2 with an empty IDT: #UD cannot be delivered, nor the #GP or #DF after it.
    let (_vm, _mem, vcpus) = setup_smp(&[&[0x0f, 0x0b]]);
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut set = VcpuSet::start(vcpus, &empty_io(), &exit_evt).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(e) = set.take_exit() {
            break e;
        }
        assert!(Instant::now() < deadline, "no exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(exit, (0, VcpuExitReason::Reset));
    assert_eq!(count(&set.metrics()[0].1.other), 1);
    assert!(set.stop(Duration::from_secs(5)));
}

#[test]
fn kvmclock_restore_hides_the_time_between() {
    let vm = Vm::new(false).expect("creating a VM on /dev/kvm");
    assert!(vm.adjust_clock, "KVM lacks KVM_CAP_ADJUST_CLOCK");
    let before = vm.get_clock().unwrap().expect("kvmclock");
    std::thread::sleep(Duration::from_millis(300));
    let later = vm.get_clock().unwrap().unwrap();
    assert!(
        later.clock - before.clock >= 250_000_000,
        "kvmclock runs: {} ns",
        later.clock - before.clock
    );
    // What pause/resume does: the guest's clock continues from where it was saved.
    vm.set_clock(&before).unwrap();
    let restored = vm.get_clock().unwrap().unwrap();
    let ahead = restored.clock.saturating_sub(before.clock);
    assert!(
        restored.clock >= before.clock && ahead < 100_000_000,
        "restored clock is {ahead} ns past the saved one"
    );
}

#[test]
fn a_pending_port_write_is_completed_without_running_guest_code() {
    // out 0x80, al; then count at 0x3000 and halt.
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xe6, 0x80,                               // out 0x80, al
        0x48, 0xc7, 0xc0, 0x00, 0x30, 0x00, 0x00, // mov rax, 0x3000
        0x48, 0xff, 0x00,                         // inc qword [rax]
        0xf4,                                     // hlt
    ];
    let mut s = setup(code);
    let io = empty_io();
    assert_eq!(s.vcpu.run_once(&io), VcpuEmulation::Handled);
    // KVM's fast port-I/O path (VMX, SVM) moves past the `out` only at the next KVM_RUN:
    // a vCPU parked here and saved would write the port again after a restore. (kvm-pvm
    // has already moved past it; either way the completion must leave RIP after it.)
    let rip = s.vcpu.fd.get_regs().unwrap().rip;
    assert!(rip == CODE_ADDR || rip == CODE_ADDR + 2, "RIP {rip:#x}");
    s.vcpu.complete_pending_io(&io).unwrap();
    assert_eq!(s.vcpu.fd.get_regs().unwrap().rip, CODE_ADDR + 2);
    assert_eq!(counters(&s.mem)[0], 0, "guest code ran");
    assert_eq!(
        count(&s.vcpu.metrics.io_out),
        1,
        "the write was not repeated"
    );
    // Nothing pending: a second call is a no-op.
    s.vcpu.complete_pending_io(&io).unwrap();
    assert_eq!(s.vcpu.fd.get_regs().unwrap().rip, CODE_ADDR + 2);
    assert_eq!(s.vcpu.run(&io), VcpuExitReason::Halted);
    assert_eq!(counters(&s.mem)[0], 1);
}
