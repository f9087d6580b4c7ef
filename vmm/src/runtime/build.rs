//! Builds a VM from a [`VmConfig`]: map guest memory and load the kernel and initrd into it
//! while the VM (with its irqchip and PIT) is made on another thread; then register the
//! memory; attach the legacy devices; attach the virtio devices (each adds its
//! `virtio_mmio.device=` entry); write the command line and boot data; write the MP table;
//! configure the vCPUs. Starting the vCPU threads is the caller's step.
//!
//! A failed build leaves nothing behind: what was built is dropped and the devices already
//! subscribed to the event loop are taken off it, so an API client can fix the
//! configuration and send InstanceStart again.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::Bus;
use devices::legacy::{
    ConsoleOutput, SerialConsole, StatusEvent, StatusPort, I8042, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN, STATUS_PORT_BASE, STATUS_PORT_LEN,
};
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use event_manager::SubscriberId;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{host, PendingVm, VmmError};
use crate::arch::layout::{ram_regions, MPTABLE_ADDR};
use crate::arch::mptable;
use crate::boot::{self, append_cmdline, make_cmdline};
use crate::config::{ConsoleTarget, HugePages, VmConfig};
use crate::device_manager::{AttachedVirtio, DeviceManager, EventLoop, VirtioHandle};
use crate::snapshot::restore::RestoreError;
use crate::snapshot::state::DevicesState;
use crate::vstate::ram;
use crate::vstate::vcpu::{Vcpu, VcpuIo};
use crate::vstate::vm::Vm;

/// The serial port's interrupt line (COM1).
const SERIAL_IRQ: u32 = 4;

/// What guest-init reported on the status port.
#[derive(Default)]
pub(super) struct GuestReport {
    /// The command's exit status.
    pub status: Option<u8>,
    /// Milliseconds from the boot timer's zero to guest-init's ready mark.
    pub ready_ms: Option<f64>,
}

/// Reads one device's counters as (name, value) pairs.
pub(super) type CounterSource = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send>;

/// A built VM whose vCPUs have not started.
pub(super) struct GuestVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub io: VcpuIo,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub report: Arc<Mutex<GuestReport>>,
    /// Counters of each virtio device, by attach name (`block:rootfs`, `net:eth0`, ...).
    pub device_counters: Vec<(String, CounterSource)>,
    /// Every virtio device with its transport, in attach order (for snapshots).
    pub devices: Vec<AttachedVirtio>,
    /// The console is this process's stdout (so stdin feeds it).
    pub console_on_stdout: bool,
    /// The devices' subscriptions in the event loop.
    pub subscribers: Vec<SubscriberId>,
}

/// The boot timer's zero, and its name for the `--boot-timer` line.
#[derive(Debug, Clone, Copy)]
pub(super) struct BootZero {
    pub at: Instant,
    pub name: &'static str,
}

/// Builds the VM `cfg` describes on the KVM VM that `vm` yields (with irqchip and PIT),
/// taken once the kernel and initrd are in guest memory. Its devices join `em`; its vCPUs
/// and the i8042 reset line will write `exit_evt`. Returns the built VM and the MSR list
/// `vm` came with, if any.
pub(super) fn build(
    vm: PendingVm,
    cfg: &VmConfig,
    em: &mut EventLoop,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<(GuestVm, Option<Vec<u32>>), VmmError> {
    let mem = guest_memory(cfg)?;
    let mut dm = DeviceManager::new();
    let built = build_with(vm, cfg, mem.clone(), em, &mut dm, exit_evt, boot_zero);
    if built.is_err() {
        dm.unsubscribe_all(em);
        // The devices are gone; the RAM mapping stays for the process (vstate::ram).
        ram::release(&mem);
    }
    built
}

fn build_with(
    pending: PendingVm,
    cfg: &VmConfig,
    mem: GuestMemoryMmap,
    em: &mut EventLoop,
    dm: &mut DeviceManager,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<(GuestVm, Option<Vec<u32>>), VmmError> {
    // The command line's own checks come before the costly loading.
    let mut cmdline = make_cmdline(cfg.boot_args())?;
    append_cmdline(
        &mut cmdline,
        &format!("gi.statusport={STATUS_PORT_BASE:#x}"),
    )?;
    let images = boot::load_images(
        &mem,
        &cfg.boot_source.kernel_image_path,
        cfg.boot_source.initrd_path.as_deref(),
    )?;
    let (vm, msrs) = pending.take(true)?;
    vm.register_memory(&mem)?;
    let legacy = legacy_devices(&vm, cfg, exit_evt, boot_zero, None)?;
    let mut device_counters: Vec<(String, CounterSource)> = Vec::new();
    for drive in cfg.ordered_drives() {
        let blk = Block::new(
            &drive.path_on_host,
            drive.is_read_only,
            Some(drive.drive_id.clone()),
        )
        .map_err(|source| VmmError::Drive {
            id: drive.drive_id.clone(),
            source,
        })?;
        let name = format!("block:{}", drive.drive_id);
        let dev = VirtioHandle::Block(Arc::new(Mutex::new(blk)));
        device_counters.push((name.clone(), counter_source(&dev)));
        dm.attach(&vm, &mem, &mut cmdline, em, dev, &name)?;
        if drive.is_root_device {
            let mode = if drive.is_read_only { "ro" } else { "rw" };
            append_cmdline(&mut cmdline, &format!("root=/dev/vda {mode}"))?;
        }
    }
    for n in &cfg.net {
        let dev =
            Net::new(&n.host_dev_name, n.mac_bytes()?, n.mtu).map_err(|source| VmmError::Net {
                id: n.iface_id.clone(),
                source,
            })?;
        let name = format!("net:{}", n.iface_id);
        let dev = VirtioHandle::Net(Arc::new(Mutex::new(dev)));
        device_counters.push((name.clone(), counter_source(&dev)));
        dm.attach(&vm, &mem, &mut cmdline, em, dev, &name)?;
    }
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(VmmError::Vsock)?;
        let dev = VirtioHandle::Vsock(Arc::new(Mutex::new(dev)));
        device_counters.push(("vsock".into(), counter_source(&dev)));
        dm.attach(&vm, &mem, &mut cmdline, em, dev, "vsock")?;
    }
    if cfg.entropy {
        let rng = Rng::new().map_err(host("virtio-rng"))?;
        let dev = VirtioHandle::Rng(Arc::new(Mutex::new(rng)));
        device_counters.push(("rng".into(), counter_source(&dev)));
        dm.attach(&vm, &mem, &mut cmdline, em, dev, "rng")?;
    }
    let mem_bytes = cfg.machine.mem_size_mib << 20;
    let entry = boot::write_boot_data(&mem, mem_bytes, &images, &cmdline)?;
    let count = u8::try_from(cfg.machine.vcpu_count)
        .map_err(|_| VmmError::Host("vcpu_count over 254".into()))?;
    let table = mptable::build(MPTABLE_ADDR, count)
        .map_err(|e| VmmError::Host(format!("MP table: {e}")))?;
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(host("writing the MP table"))?;

    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let v = Vcpu::new(&vm, id)?;
        v.configure(&vm, count, (id == 0).then_some((&mem, entry)))?;
        vcpus.push(v);
    }
    let guest = GuestVm::assemble(vm, mem, vcpus, legacy, dm, device_counters);
    Ok((guest, msrs))
}

impl GuestVm {
    /// The built pieces as a [`GuestVm`]; takes the bus, devices and subscriptions out of
    /// `dm`.
    pub(super) fn assemble(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vec<Vcpu>,
        legacy: Legacy,
        dm: &mut DeviceManager,
        device_counters: Vec<(String, CounterSource)>,
    ) -> GuestVm {
        let io = VcpuIo {
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(std::mem::take(&mut dm.mmio)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        GuestVm {
            vm,
            mem,
            vcpus,
            io,
            serial: legacy.serial,
            i8042: legacy.i8042,
            report: legacy.report,
            device_counters,
            devices: std::mem::take(&mut dm.attached),
            console_on_stdout: legacy.console_on_stdout,
            subscribers: std::mem::take(&mut dm.subscribers),
        }
    }
}

/// Reads a device's counters.
pub(super) fn counter_source(dev: &VirtioHandle) -> CounterSource {
    fn read<D>(d: &Mutex<D>, metrics: impl Fn(&D) -> CounterSource) -> CounterSource {
        metrics(&d.lock().unwrap_or_else(|e| e.into_inner()))
    }
    match dev {
        VirtioHandle::Block(d) => read(d, |d| {
            let m = d.metrics();
            Box::new(move || m.snapshot())
        }),
        VirtioHandle::Net(d) => read(d, |d| {
            let m = d.metrics();
            Box::new(move || m.snapshot())
        }),
        VirtioHandle::Rng(d) => read(d, |d| {
            let m = d.metrics();
            Box::new(move || m.snapshot())
        }),
        VirtioHandle::Vsock(d) => read(d, |d| {
            let m = d.metrics();
            Box::new(move || m.snapshot())
        }),
    }
}

/// The port-I/O devices: COM1, the i8042 and the status port, on their bus.
pub(super) struct Legacy {
    pub pio: Bus,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub report: Arc<Mutex<GuestReport>>,
    pub console_on_stdout: bool,
}

/// Makes the port-I/O devices for `vm`: the UART printing to `cfg.console` (in its state
/// in `saved`, a snapshot's devices, if there), the i8042 whose reset line writes
/// `exit_evt`, and the status port reporting to a fresh [`GuestReport`].
pub(super) fn legacy_devices(
    vm: &Vm,
    cfg: &VmConfig,
    exit_evt: &EventFd,
    boot_zero: BootZero,
    saved: Option<&DevicesState>,
) -> Result<Legacy, VmmError> {
    let (console, console_on_stdout) = console_output(&cfg.console)?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
    // Without an in-kernel irqchip (tiny test guests restored on kvm-pvm) there is nothing
    // to deliver the interrupt to, and KVM refuses the irqfd; the UART then polls fine.
    if vm.has_irqchip {
        vm.fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(host("KVM_IRQFD for the serial port"))?;
    }
    let serial = match saved.and_then(|d| d.serial.as_ref()) {
        Some(s) => SerialConsole::from_state(s, serial_irq, console)
            .map_err(|e| VmmError::Restore(RestoreError::Serial(e)))?,
        None => SerialConsole::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    let report = Arc::new(Mutex::new(GuestReport::default()));
    let status = {
        let report = report.clone();
        let print = cfg.boot_timer;
        StatusPort::new(Box::new(move |ev| {
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            match ev {
                StatusEvent::Ready => {
                    let ms = boot_zero.at.elapsed().as_secs_f64() * 1000.0;
                    r.ready_ms = Some(ms);
                    if print {
                        let zero = boot_zero.name;
                        eprintln!("vmm: boot-timer: guest-init ready {ms:.1} ms after {zero}");
                    }
                }
                StatusEvent::ExitStatus(s) => r.status = Some(s),
            }
        }))
    };
    let reset = exit_evt.try_clone().map_err(host("eventfd"))?;
    let i8042 = Arc::new(Mutex::new(match saved.and_then(|d| d.i8042.as_ref()) {
        Some(s) => I8042::from_state(s, reset),
        None => I8042::new(reset),
    }));
    let mut pio = Bus::new();
    pio.insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, serial.clone())
        .and_then(|()| pio.insert(I8042::BASE, I8042::LEN, i8042.clone()))
        .and_then(|()| {
            pio.insert(
                STATUS_PORT_BASE,
                STATUS_PORT_LEN,
                Arc::new(Mutex::new(status)),
            )
        })
        .map_err(host("laying out the I/O bus"))?;
    Ok(Legacy {
        pio,
        serial,
        i8042,
        report,
        console_on_stdout,
    })
}

fn guest_memory(cfg: &VmConfig) -> Result<GuestMemoryMmap, VmmError> {
    let mib = cfg.machine.mem_size_mib;
    let bytes = mib << 20;
    let ranges = ram_regions(bytes);
    let hint = match cfg.machine.huge_pages {
        HugePages::None => "",
        HugePages::Huge2M => " (huge_pages 2M: reserve pages in /proc/sys/vm/nr_hugepages)",
    };
    let err = |source| VmmError::Memory { mib, hint, source };
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if cfg.machine.huge_pages == HugePages::Huge2M {
        flags |= libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT);
    }
    let mut regions = Vec::new();
    for (start, size) in ranges {
        let len = usize::try_from(size).map_err(|_| err(std::io::Error::other("size")))?;
        let mapping = if cfg.machine.huge_pages == HugePages::None {
            ram::map_aligned(len, cfg.machine.thp).map_err(err)?
        } else {
            MmapRegion::build(None, len, libc::PROT_READ | libc::PROT_WRITE, flags)
                .map_err(|e| err(std::io::Error::other(e.to_string())))?
        };
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(std::io::Error::other("region overflows the address space")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(std::io::Error::other(e.to_string())))
}

fn console_output(target: &ConsoleTarget) -> Result<(ConsoleOutput, bool), VmmError> {
    Ok(match target {
        ConsoleTarget::Stdout => {
            let tty = std::io::stdout().is_terminal();
            (ConsoleOutput::new(Box::new(std::io::stdout()), tty), true)
        }
        ConsoleTarget::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Console {
                    path: path.clone(),
                    source,
                })?;
            (ConsoleOutput::new(Box::new(f), false), false)
        }
        ConsoleTarget::None => (ConsoleOutput::discard(), false),
    })
}
