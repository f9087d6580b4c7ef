//! The VMM: owns one VM from its configuration to its end, and runs the control loop.
//!
//! [`Vmm`] has three states: *Not started* (the configuration can still change, from the
//! command line or the API), *Running* and *Paused*. [`Vmm::start_vm`] builds the VM
//! (`build`) and starts one thread per vCPU (`crate::vstate::vcpu_thread`);
//! [`Vmm::restore_snapshot`] builds it from a snapshot instead (`restore`, `snapshot`) and
//! leaves it *Paused* (or resumes it);
//! [`Vmm::serve`] runs the control loop on the calling thread until the VM ends, then stops
//! and joins the vCPU threads before guest memory goes away.
//!
//! The loop. One event-manager `EventManager` holds the device subscribers (virtio devices,
//! console input) and the [`control::Control`] subscriber (VM end, signals, API wake-ups).
//! While the VM runs, the loop polls it all. While paused, it polls only Control's fds,
//! through a second epoll set: devices then do nothing, and their pending events (still
//! readable fds, or edge-triggered events queued in the first set) are handled after resume.
//! event-manager 0.4 does not expose its epoll fd, so the device set cannot be nested in a
//! control set; a second set over Control's three fds does the same job. Subscribers only
//! record what happened; the loop acts on it with the whole `Vmm` at hand.
//!
//! The API (crate::api) runs on its own thread and hands requests over a channel plus an
//! eventfd; they are handled here, on the loop's thread (`actions`), so the API thread never
//! touches KVM or a device.
//!
//! Seccomp (the `seccomp` crate, `--seccomp-level`). Each thread installs its own filter,
//! for its kind: the `vmm_api` thread when it starts serving; the vCPU threads and this
//! thread once the VM is built or restored, before any guest code runs. A VM always starts
//! with its vCPUs parked; the first resume ([`Vmm::start_vm`] resumes at once, a restored
//! VM at `--resume` or `PATCH /vm`) first has each parked vCPU thread install the vCPU
//! filter ([`VcpuSet::on_each`]), then installs this thread's, then lets the vCPUs run. The
//! VM's setup (files, taps, /dev/kvm, memory, threads) is thus outside every filter, and
//! nothing opened at setup is needed again (the MSR list for snapshots is read first).

mod actions;
mod build;
mod control;
mod restore;
mod snapshot;

use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::kvm_clock_data;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiRequest, ApiServer, InstanceInfo};
use crate::config::VmConfig;
use crate::device_manager::EventLoop;
use crate::vstate::vcpu::VcpuExitReason;
use crate::vstate::vcpu_thread::VcpuSet;
use crate::vstate::vm::{Vm, VmError};
use build::{BootZero, GuestVm};
use control::{ConsoleInput, Control};
use seccomp::{SeccompLevel, SeccompSettings, ThreadKind};

/// How long the vCPUs get to stop and be joined when the VM ends.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// vCPU threads.
    #[error(transparent)]
    VcpuThread(#[from] crate::vstate::vcpu_thread::VcpuThreadError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
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
    /// The API socket cannot be served.
    #[error(transparent)]
    Api(#[from] crate::api::ApiServerError),
    /// A snapshot could not be restored.
    #[error(transparent)]
    Restore(#[from] crate::snapshot::restore::RestoreError),
    /// A snapshot could not be taken.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::create::SnapshotError),
    /// The VM was already started.
    #[error("the VM is already started")]
    AlreadyStarted,
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
    /// Milliseconds from the boot timer's zero to guest-init's ready mark.
    pub boot_ready_ms: Option<f64>,
}

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Not built yet: the configuration can change.
    NotStarted,
    /// vCPUs run.
    Running,
    /// Every vCPU is parked and devices are not polled.
    Paused,
}

impl VmState {
    /// The name `GET /` reports (Firecracker's).
    pub fn name(self) -> &'static str {
        match self {
            VmState::NotStarted => InstanceInfo::NOT_STARTED,
            VmState::Running => InstanceInfo::RUNNING,
            VmState::Paused => InstanceInfo::PAUSED,
        }
    }
}

/// The API server and the end of its request channel.
struct ApiLink {
    rx: Receiver<ApiRequest>,
    /// Kept for its Drop, which stops the API thread and removes the socket.
    _server: ApiServer,
}

/// A started VM: what was built, and its running vCPU threads.
struct Instance {
    vcpus: VcpuSet,
    guest: GuestVm,
    /// kvmclock read at pause, written back at resume.
    saved_clock: Option<kvm_clock_data>,
    /// The MSRs a snapshot saves, asked of KVM at the first snapshot.
    msr_list: Option<Vec<u32>>,
    /// The vCPU threads have been stopped (and joined, or given up on).
    stopped: bool,
    /// The vCPU threads and this thread have their seccomp filters.
    filtered: bool,
}

impl Instance {
    /// Installs the seccomp filters `seccomp` asks for: the vCPU filter on each (parked)
    /// vCPU thread, then the main thread's. Reads the MSR list snapshots need first, as
    /// that opens /dev/kvm, which the main thread's filter forbids.
    fn install_filters(&mut self, seccomp: SeccompSettings) -> Result<(), VmmError> {
        if self.filtered || seccomp.level == SeccompLevel::Off {
            return Ok(());
        }
        if self.msr_list.is_none() {
            // A failure shows again, with its reason, when a snapshot is asked for.
            self.msr_list = kvm_ioctls::Kvm::new()
                .ok()
                .and_then(|kvm| crate::vstate::vcpu_state::msrs_to_save(&kvm).ok());
        }
        let answers = self
            .vcpus
            .on_each(
                move |v| {
                    let r =
                        seccomp::install(ThreadKind::Vcpu, seccomp.level, &format!("vcpu{}", v.id))
                            .map_err(|e| actions::chain(&e));
                    if r.is_ok() && v.id == 0 && seccomp.forbidden_syscall_on_vcpu0 {
                        seccomp::forbidden_syscall();
                    }
                    r
                },
                STOP_TIMEOUT,
            )
            .map_err(host("installing the vCPU seccomp filters"))?;
        for (id, r) in answers {
            r.map_err(|e| VmmError::Host(format!("vCPU {id}: {e}")))?;
        }
        seccomp::install(ThreadKind::Vmm, seccomp.level, "vmm")
            .map_err(|e| VmmError::Host(actions::chain(&e)))?;
        self.filtered = true;
        Ok(())
    }
}

impl Instance {
    /// Stops and joins the vCPU threads. If one does not end (it would be stuck outside
    /// KVM_RUN, since kicks end that), it may still touch guest memory: the mapping is then
    /// leaked, kept for the rest of the process, which is about to exit anyway.
    fn stop_vcpus(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if !self.vcpus.stop(STOP_TIMEOUT) {
            eprintln!(
                "vmm: warning: a vCPU thread did not stop within {STOP_TIMEOUT:?}; leaving it"
            );
            std::mem::forget(self.guest.mem.clone());
        }
    }

    /// Stops the vCPUs, flushes the console, and returns what guest-init reported
    /// (status, ready time).
    fn shutdown(mut self) -> (Option<u8>, Option<f64>) {
        self.stop_vcpus();
        let _ = self.guest.serial.lock().map(|mut s| s.flush());
        let r = self.guest.report.lock().unwrap_or_else(|e| e.into_inner());
        (r.status, r.ready_ms)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Error paths: guest memory must not be unmapped under running vCPUs.
        self.stop_vcpus();
    }
}

/// The VMM for one VM.
pub struct Vmm {
    /// First, so that on any path the vCPU threads stop before the rest is dropped.
    instance: Option<Instance>,
    config: VmConfig,
    /// When the VMM process started (uptime, and the boot timer's zero on the CLI path).
    start: Instant,
    state: VmState,
    em: EventLoop,
    control: Arc<Mutex<Control>>,
    /// Control's fds alone, polled while paused.
    paused_epoll: Epoll,
    exit_evt: EventFd,
    api: Option<ApiLink>,
    api_requests: u64,
    /// The seccomp filters to install.
    seccomp: SeccompSettings,
    /// A VM (with irqchip and PIT) and the MSR list, made ahead on their own thread while
    /// an API-driven VMM waits for its configuration or snapshot (see [`Warm`]).
    warm: Option<Warm>,
}

/// What the pre-warm thread makes: creating a KVM VM (KVM_GET_SUPPORTED_CPUID,
/// KVM_CREATE_VM, the in-kernel irqchip and PIT) and listing the MSRs to snapshot are the
/// same for every boot and restore, so an API-driven VMM does them before it is asked,
/// off the load call's path, and a boot does them while it loads the kernel. A failure is
/// not reported here: the VM is then made again at start, where its error is reported.
struct Warm(std::thread::JoinHandle<WarmResult>);

/// The pre-warmed VM (or why it could not be made) and MSR list.
type WarmResult = (Result<Vm, VmError>, Option<Vec<u32>>);

/// A VM on its way: being made on the pre-warm thread, or (`None`) made when taken.
pub(super) struct PendingVm(Option<Warm>);

impl PendingVm {
    /// The VM with (`irqchip`) or without an in-kernel irqchip and PIT: the pre-warmed one
    /// when it fits and was made, else a new one (whose error, if any, is the one
    /// reported); and the pre-warmed MSR list, if any.
    pub(super) fn take(self, irqchip: bool) -> Result<(Vm, Option<Vec<u32>>), VmmError> {
        let (warm_vm, msrs) = match self.0.map(|w| w.0.join()) {
            Some(Ok((vm, msrs))) => (vm.ok(), msrs),
            _ => (None, None),
        };
        let vm = match warm_vm {
            Some(vm) if irqchip => vm,
            _ => Vm::new(irqchip)?,
        };
        Ok((vm, msrs))
    }
}

impl Warm {
    fn start() -> Option<Warm> {
        std::thread::Builder::new()
            .name("vmm_prewarm".into())
            .spawn(|| {
                let vm = Vm::new(true);
                let msrs = kvm_ioctls::Kvm::new()
                    .ok()
                    .and_then(|kvm| crate::vstate::vcpu_state::msrs_to_save(&kvm).ok());
                (vm, msrs)
            })
            .ok()
            .map(Warm)
    }
}

impl Vmm {
    /// A VMM for `config`, not started. `start` is when the process started. With
    /// `api_sock`, serves the API there from now until the VMM is dropped.
    ///
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (they are read from a
    /// signalfd), so call it before starting other threads: they inherit the mask.
    ///
    /// No seccomp filters: see [`Vmm::with_seccomp`].
    pub fn new(config: VmConfig, start: Instant, api_sock: Option<&Path>) -> Result<Vmm, VmmError> {
        Vmm::with_seccomp(config, start, api_sock, SeccompSettings::OFF)
    }

    /// [`Vmm::new`] with the seccomp filters `seccomp` asks for: the API thread's from when
    /// it serves, the others from the VM's first run on (see the module docs). The filters
    /// apply to the threads of this process, so only a `vmm` process should ask for them.
    pub fn with_seccomp(
        config: VmConfig,
        start: Instant,
        api_sock: Option<&Path>,
        seccomp: SeccompSettings,
    ) -> Result<Vmm, VmmError> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block().map_err(host("blocking signals"))?;
        let signals = SignalFd::new(&mask).map_err(host("signalfd"))?;
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
        let (api, api_wake) = match api_sock {
            Some(path) => {
                let (tx, rx) = channel();
                let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
                let server = ApiServer::start_filtered(
                    path,
                    tx,
                    wake.try_clone().map_err(host("eventfd"))?,
                    seccomp.level,
                )?;
                (
                    Some(ApiLink {
                        rx,
                        _server: server,
                    }),
                    Some(wake),
                )
            }
            None => (None, None),
        };
        let control = Control::new(
            exit_evt.try_clone().map_err(host("eventfd"))?,
            signals,
            api_wake,
        );
        let paused_epoll = Epoll::new().map_err(host("epoll"))?;
        for fd in control.fds() {
            let fd_data = u64::try_from(fd).map_err(host("epoll"))?;
            paused_epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd_data),
                )
                .map_err(host("epoll"))?;
        }
        let control = Arc::new(Mutex::new(control));
        let mut em: EventLoop = EventManager::new().map_err(host("epoll"))?;
        em.add_subscriber(control.clone());
        Ok(Vmm {
            instance: None,
            config,
            start,
            state: VmState::NotStarted,
            em,
            control,
            paused_epoll,
            exit_evt,
            warm: if api_sock.is_some() {
                Warm::start()
            } else {
                None
            },
            api,
            api_requests: 0,
            seccomp,
        })
    }

    /// A VM with (`irqchip`) or without an in-kernel irqchip and PIT: the pre-warmed one
    /// when it fits and was made, else a new one; and the pre-warmed MSR list, if any.
    fn take_vm(&mut self, irqchip: bool) -> Result<(Vm, Option<Vec<u32>>), VmmError> {
        PendingVm(self.warm.take()).take(irqchip)
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The configuration (as built, once started).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Validates the configuration, builds the VM and starts its vCPUs. `boot_zero` is the
    /// boot timer's zero. On error nothing is left behind and the VMM stays not started.
    pub fn start_vm(&mut self, boot_zero: Instant) -> Result<(), VmmError> {
        if self.state != VmState::NotStarted {
            return Err(VmmError::AlreadyStarted);
        }
        self.config.validate(crate::config::host_mem_mib())?;
        let zero = BootZero {
            at: boot_zero,
            name: if boot_zero == self.start {
                "VMM start"
            } else {
                "InstanceStart"
            },
        };
        // The VM is made on its own thread (unless an API-driven VMM pre-warmed it already)
        // while `build` maps guest RAM and loads the kernel and initrd, which need no VM.
        // Creating a KVM VM partly waits in the kernel, so this gains even on one CPU.
        let pending = PendingVm(self.warm.take().or_else(Warm::start));
        let (mut guest, msrs) =
            build::build(pending, &self.config, &mut self.em, &self.exit_evt, zero)?;
        // Parked first, so that the seccomp filters are in before any guest code runs.
        let vcpus = match VcpuSet::start_paused(
            std::mem::take(&mut guest.vcpus),
            &guest.io,
            &self.exit_evt,
            actions::PAUSE_TIMEOUT,
        ) {
            Ok(v) => v,
            Err(e) => {
                for id in guest.subscribers.drain(..) {
                    let _ = self.em.remove_subscriber(id);
                }
                crate::vstate::ram::release(&guest.mem);
                return Err(e.into());
            }
        };
        let subscribers = guest.subscribers.clone();
        let mem = guest.mem.clone();
        self.install(vcpus, guest, None, msrs);
        self.state = VmState::Paused;
        let seccomp = self.seccomp;
        if let Some(Err(e)) = self.instance.as_mut().map(|i| i.install_filters(seccomp)) {
            // Not started after all: the vCPUs stop (when the instance drops) and the
            // devices leave the loop, as when the build fails. This thread has no filter
            // yet (it is installed last), so another start can open what it needs.
            self.instance = None;
            for id in subscribers {
                let _ = self.em.remove_subscriber(id);
            }
            crate::vstate::ram::release(&mem);
            self.state = VmState::NotStarted;
            return Err(e);
        }
        self.resume_instance()
    }

    /// Makes a started VM this VMM's instance (and its console, stdin).
    fn install(
        &mut self,
        vcpus: VcpuSet,
        guest: GuestVm,
        saved_clock: Option<kvm_clock_data>,
        msr_list: Option<Vec<u32>>,
    ) {
        if guest.console_on_stdout {
            let input = ConsoleInput::new(guest.serial.clone());
            self.em.add_subscriber(Arc::new(Mutex::new(input)));
        }
        self.instance = Some(Instance {
            vcpus,
            guest,
            saved_clock,
            msr_list,
            stopped: false,
            filtered: false,
        });
    }

    /// Runs the control loop until the VM ends (or, before start, until a signal), then
    /// stops the vCPUs and returns how it ended.
    pub fn serve(mut self) -> Result<RunOutcome, VmmError> {
        let reason = loop {
            if self.state == VmState::Paused {
                self.wait_paused()?;
            } else {
                self.em.run().map_err(host("event loop"))?;
            }
            if let Some(end) = self.after_events() {
                break end;
            }
        };
        let (guest_status, boot_ready_ms) = match self.instance.take() {
            Some(instance) => instance.shutdown(),
            None => (None, None),
        };
        Ok(RunOutcome {
            reason,
            guest_status,
            boot_ready_ms,
        })
    }

    /// While paused: waits on Control's fds only.
    fn wait_paused(&mut self) -> Result<(), VmmError> {
        let mut ready = [EpollEvent::default(); 4];
        let n = match self.paused_epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(VmmError::Host(format!("epoll while paused: {e}"))),
        };
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        for ev in ready.iter().take(n) {
            control.on_ready(ev.fd());
        }
        Ok(())
    }

    /// Acts on what the subscribers recorded. Returns the end reason once the VM is over.
    fn after_events(&mut self) -> Option<EndReason> {
        let (signal, vm_event, api_pending) = {
            let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
            (
                c.signal.take(),
                std::mem::take(&mut c.vm_event),
                std::mem::take(&mut c.api_pending),
            )
        };
        if let Some(sig) = signal {
            return Some(EndReason::Signal(sig));
        }
        if vm_event {
            return Some(self.vm_end_reason());
        }
        if api_pending {
            self.serve_api();
        }
        None
    }

    /// Why the VM-end eventfd fired: a vCPU's report wins, as it carries the reason; with
    /// none, it was the i8042 reset line.
    fn vm_end_reason(&mut self) -> EndReason {
        let exit = self.instance.as_mut().and_then(|i| i.vcpus.take_exit());
        match exit {
            Some((id, reason)) => match reason {
                VcpuExitReason::Reset | VcpuExitReason::Halted | VcpuExitReason::Stopped => {
                    EndReason::GuestReset
                }
                VcpuExitReason::Shutdown => EndReason::GuestShutdown,
                VcpuExitReason::Crash => EndReason::GuestCrash,
                VcpuExitReason::Failed(msg) => EndReason::VcpuFailed(format!("vCPU {id}: {msg}")),
            },
            None => EndReason::GuestReset,
        }
    }

    /// Answers every queued API request.
    fn serve_api(&mut self) {
        let requests: Vec<ApiRequest> = match &self.api {
            Some(api) => api.rx.try_iter().collect(),
            None => return,
        };
        for request in requests {
            self.api_requests += 1;
            let answer = self.handle_action(&request.action);
            request.respond(answer);
        }
    }
}

/// Builds the VM described by `cfg` and runs it until it ends, without an API. `start` is
/// when the VMM process started, the boot timer's zero.
pub fn run(cfg: &VmConfig, start: Instant) -> Result<RunOutcome, VmmError> {
    run_with_seccomp(cfg, start, SeccompSettings::OFF)
}

/// [`run`] under the seccomp filters `seccomp` asks for (see [`Vmm::with_seccomp`]).
pub fn run_with_seccomp(
    cfg: &VmConfig,
    start: Instant,
    seccomp: SeccompSettings,
) -> Result<RunOutcome, VmmError> {
    let mut vmm = Vmm::with_seccomp(cfg.clone(), start, None, seccomp)?;
    vmm.start_vm(start)?;
    vmm.serve()
}
