//! Builds a VM from a [`VmConfig`], in DESIGN.md's boot order: create the VM with its
//! irqchip and PIT; map guest memory; attach the legacy devices; attach the virtio devices
//! (each adds its `virtio_mmio.device=` entry); load the kernel, initrd and command line;
//! write the MP table; configure the vCPUs. Starting the vCPU threads is the caller's step.
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

use super::{host, VmmError};
use crate::arch::layout::{ram_regions, MPTABLE_ADDR};
use crate::arch::mptable;
use crate::boot::{self, append_cmdline, make_cmdline};
use crate::config::{ConsoleTarget, HugePages, VmConfig};
use crate::device_manager::{DeviceManager, EventLoop};
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

/// Builds the VM `cfg` describes. Its devices join `em`; its vCPUs and the i8042 reset line
/// will write `exit_evt`.
pub(super) fn build(
    cfg: &VmConfig,
    em: &mut EventLoop,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<GuestVm, VmmError> {
    let mut dm = DeviceManager::new();
    let built = build_with(cfg, em, &mut dm, exit_evt, boot_zero);
    if built.is_err() {
        dm.unsubscribe_all(em);
    }
    built
}

fn build_with(
    cfg: &VmConfig,
    em: &mut EventLoop,
    dm: &mut DeviceManager,
    exit_evt: &EventFd,
    boot_zero: BootZero,
) -> Result<GuestVm, VmmError> {
    let vm = Vm::new(true)?;
    let mem = guest_memory(cfg)?;
    vm.register_memory(&mem)?;

    let (console, console_on_stdout) = console_output(&cfg.console)?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm.fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(host("KVM_IRQFD for the serial port"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, console)));
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
    let i8042 = Arc::new(Mutex::new(I8042::new(
        exit_evt.try_clone().map_err(host("eventfd"))?,
    )));
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

    let mut cmdline = make_cmdline(cfg.boot_args())?;
    append_cmdline(
        &mut cmdline,
        &format!("gi.statusport={STATUS_PORT_BASE:#x}"),
    )?;
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
        let counters = blk.metrics();
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            em,
            Arc::new(Mutex::new(blk)),
            &name,
        )?;
        device_counters.push((name, Box::new(move || counters.snapshot())));
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
        let counters = dev.metrics();
        let dev = Arc::new(Mutex::new(dev));
        dm.attach(&vm, &mem, &mut cmdline, em, dev, &name)?;
        device_counters.push((name, Box::new(move || counters.snapshot())));
    }
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(VmmError::Vsock)?;
        let counters = dev.metrics();
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            em,
            Arc::new(Mutex::new(dev)),
            "vsock",
        )?;
        device_counters.push(("vsock".into(), Box::new(move || counters.snapshot())));
    }
    if cfg.entropy {
        let rng = Rng::new().map_err(host("virtio-rng"))?;
        let counters = rng.metrics();
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            em,
            Arc::new(Mutex::new(rng)),
            "rng",
        )?;
        device_counters.push(("rng".into(), Box::new(move || counters.snapshot())));
    }
    let mem_bytes = cfg.machine.mem_size_mib << 20;
    let entry = boot::load(
        &mem,
        mem_bytes,
        &cfg.boot_source.kernel_image_path,
        cfg.boot_source.initrd_path.as_deref(),
        &cmdline,
    )?;
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
    let io = VcpuIo {
        pio: Arc::new(pio),
        mmio: Arc::new(std::mem::take(&mut dm.mmio)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    Ok(GuestVm {
        vm,
        mem,
        vcpus,
        io,
        serial,
        i8042,
        report,
        device_counters,
        console_on_stdout,
        subscribers: std::mem::take(&mut dm.subscribers),
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
        let mapping = MmapRegion::build(None, len, libc::PROT_READ | libc::PROT_WRITE, flags)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
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
