//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! Order (DESIGN.md, "Boot"): open KVM and create the VM with its irqchip and PIT; map guest
//! memory; attach the legacy devices; load the kernel, initrd and command line; write the
//! MP table; configure the vCPUs; start one thread per vCPU; then serve the control loop
//! (guest reset, signals, console input) on this thread until the VM ends.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver};
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
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{ram_regions, MPTABLE_ADDR};
use crate::arch::mptable;
use crate::boot::{self, append_cmdline, make_cmdline};
use crate::config::{ConsoleTarget, HugePages, VmConfig};
use crate::device_manager::{DeviceManager, EventLoop};
use crate::vstate::vcpu::{Vcpu, VcpuExitReason, VcpuIo};
use crate::vstate::vm::Vm;

/// The serial port's interrupt line (COM1).
const SERIAL_IRQ: u32 = 4;

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Guest memory could not be mapped.
    #[error("cannot map {mib} MiB of guest memory{hint}")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// Advice for hugepages.
        hint: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The console file cannot be opened.
    #[error("cannot open console file {path}")]
    Console {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A virtio device could not be attached.
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceManagerError),
    /// A drive's backing file cannot be used.
    #[error("drive {id}")]
    Drive {
        /// The drive id.
        id: String,
        /// The error.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// A network interface's tap cannot be used.
    #[error("network interface {id}")]
    Net {
        /// The interface id.
        id: String,
        /// The error.
        #[source]
        source: devices::virtio::net::NetError,
    },
    /// The vsock device cannot be set up (socket path in use, bad CID).
    #[error("vsock")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    /// A configuration value was refused while building.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Another host resource (eventfd, signalfd, thread, epoll) failed.
    #[error("{0}")]
    Host(String),
}

fn host<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Host(format!("{what}: {e}"))
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The guest rebooted (guest-init's normal end, `reboot`, i8042 reset, triple fault).
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// The guest kernel crashed.
    GuestCrash,
    /// The VMM got this signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// A vCPU could not run.
    VcpuFailed(String),
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// Why the VM ended.
    pub reason: EndReason,
    /// The command's exit status reported on the status port.
    pub guest_status: Option<u8>,
    /// Milliseconds from VMM start to guest-init's ready mark.
    pub boot_ready_ms: Option<f64>,
}

#[derive(Default)]
struct GuestReport {
    status: Option<u8>,
    ready_ms: Option<f64>,
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

/// The control loop's one subscriber: VM end events, signals, and console input.
struct Control {
    exit_evt: EventFd,
    signals: SignalFd,
    stdin: Option<RawFd>,
    serial: Arc<Mutex<SerialConsole>>,
    vcpu_rx: Receiver<(u8, VcpuExitReason)>,
    end: Option<EndReason>,
}

impl Control {
    fn on_exit_evt(&mut self) {
        let _ = self.exit_evt.read();
        // A vCPU's report wins over a bare reset event: it carries the reason.
        if let Ok((id, reason)) = self.vcpu_rx.try_recv() {
            self.end = Some(match reason {
                VcpuExitReason::Reset | VcpuExitReason::Halted | VcpuExitReason::Stopped => {
                    EndReason::GuestReset
                }
                VcpuExitReason::Shutdown => EndReason::GuestShutdown,
                VcpuExitReason::Crash => EndReason::GuestCrash,
                VcpuExitReason::Failed(msg) => EndReason::VcpuFailed(format!("vCPU {id}: {msg}")),
            });
        } else {
            // The i8042 reset line.
            self.end = Some(EndReason::GuestReset);
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let Some(fd) = self.stdin else { return };
        let mut buf = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length from our own stdin fd.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EOF or error: stop watching stdin, the guest keeps running.
            let _ = ops.remove(Events::empty_raw(fd));
            self.stdin = None;
            return;
        }
        let n = usize::try_from(n).unwrap_or(0);
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        // Input beyond the UART's FIFO is dropped, as a real UART would.
        serial.enqueue_input(&buf[..n]);
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit_evt.as_raw_fd() {
            self.on_exit_evt();
        } else if fd == self.signals.as_raw_fd() {
            if let Ok(Some(info)) = self.signals.read_signal() {
                self.end = Some(EndReason::Signal(
                    i32::try_from(info.ssi_signo).unwrap_or(0),
                ));
            }
        } else if Some(fd) == self.stdin {
            self.on_stdin(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.exit_evt, EventSet::IN));
        let _ = ops.add(Events::new(&self.signals, EventSet::IN));
        if let Some(fd) = self.stdin {
            if ops.add(Events::new_raw(fd, EventSet::IN)).is_err() {
                // stdin is a regular file or /dev/null (not pollable): no console input.
                self.stdin = None;
            }
        }
    }
}

/// Builds the VM described by `cfg` and runs it until it ends. `start` is when the VMM
/// process started, the boot timer's zero.
pub fn run(cfg: &VmConfig, start: Instant) -> Result<RunOutcome, VmmError> {
    // Signals are taken through a signalfd by the control loop; block them before any
    // thread exists so every thread inherits the mask.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block().map_err(host("blocking signals"))?;
    let signals = SignalFd::new(&mask).map_err(host("signalfd"))?;

    let vm = Vm::new(true)?;
    let mem = guest_memory(cfg)?;
    vm.register_memory(&mem)?;

    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
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
                    let ms = start.elapsed().as_secs_f64() * 1000.0;
                    r.ready_ms = Some(ms);
                    if print {
                        eprintln!("vmm: boot-timer: guest-init ready {ms:.1} ms after VMM start");
                    }
                }
                StatusEvent::ExitStatus(s) => r.status = Some(s),
            }
        }))
    };
    let i8042 = I8042::new(exit_evt.try_clone().map_err(host("eventfd"))?);
    let mut pio = Bus::new();
    let bus_err = host("laying out the I/O bus");
    pio.insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, serial.clone())
        .and_then(|()| pio.insert(I8042::BASE, I8042::LEN, Arc::new(Mutex::new(i8042))))
        .and_then(|()| {
            pio.insert(
                STATUS_PORT_BASE,
                STATUS_PORT_LEN,
                Arc::new(Mutex::new(status)),
            )
        })
        .map_err(bus_err)?;

    let mut em: EventLoop = EventManager::new().map_err(host("epoll"))?;
    let mut cmdline = make_cmdline(cfg.boot_args())?;
    append_cmdline(
        &mut cmdline,
        &format!("gi.statusport={STATUS_PORT_BASE:#x}"),
    )?;
    let mut dm = DeviceManager::new();
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
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            &mut em,
            Arc::new(Mutex::new(blk)),
            &name,
        )?;
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
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            &mut em,
            Arc::new(Mutex::new(dev)),
            &name,
        )?;
    }
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(VmmError::Vsock)?;
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            &mut em,
            Arc::new(Mutex::new(dev)),
            "vsock",
        )?;
    }
    if cfg.entropy {
        let rng = Rng::new().map_err(host("virtio-rng"))?;
        dm.attach(
            &vm,
            &mem,
            &mut cmdline,
            &mut em,
            Arc::new(Mutex::new(rng)),
            "rng",
        )?;
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
    let (tx, rx) = channel();
    for mut v in vcpus {
        let io = io.clone();
        let tx = tx.clone();
        let evt = exit_evt.try_clone().map_err(host("eventfd"))?;
        std::thread::Builder::new()
            .name(format!("vcpu{}", v.id))
            .spawn(move || {
                let reason = v.run(&io);
                let _ = tx.send((v.id, reason));
                let _ = evt.write(1);
            })
            .map_err(host("starting a vCPU thread"))?;
    }

    let stdin = (console_on_stdout).then_some(libc::STDIN_FILENO);
    let control = Arc::new(Mutex::new(Control {
        exit_evt,
        signals,
        stdin,
        serial: serial.clone(),
        vcpu_rx: rx,
        end: None,
    }));
    em.add_subscriber(control.clone());
    let reason = loop {
        em.run().map_err(host("event loop"))?;
        let c = control.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(end) = &c.end {
            break end.clone();
        }
    };
    // Keep the memory mapped until here: vCPU threads may still be running in it.
    let _ = serial.lock().map(|mut s| s.flush());
    let r = report.lock().unwrap_or_else(|e| e.into_inner());
    let outcome = RunOutcome {
        reason,
        guest_status: r.status,
        boot_ready_ms: r.ready_ms,
    };
    drop(r);
    // The vCPU threads are not joined: the caller exits the process, which ends them
    // with the guest (they may be inside KVM_RUN).
    std::mem::forget(mem);
    std::mem::forget(vm);
    Ok(outcome)
}
