//! vCPU threads: one per vCPU, each looping on [`Vcpu::run_once`], and the VMM's handle on
//! them ([`VcpuSet`]: pause, resume, stop and join).
//!
//! Kicking a vCPU out of the guest (Firecracker's scheme): the VMM queues a command on the
//! thread's channel, raises the thread's `pending` flag, and sends the thread a real-time
//! signal whose handler only sets `kvm_run.immediate_exit`. A thread inside KVM_RUN comes
//! back with EINTR; a thread about to enter comes back at once because immediate_exit is set.
//! Without immediate_exit, a signal landing between the loop's look at `pending` and the
//! ioctl would be lost until the guest's next exit, which for a spinning guest is never. The
//! loop clears immediate_exit (after EINTR, and after serving commands, before looking at
//! `pending` again), then reads its commands.
//!
//! A paused thread blocks on its channel until Resume or Exit, so a parked vCPU costs
//! nothing, and the VMM's pause returns only once every vCPU has said it is parked.

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use super::vcpu::{Vcpu, VcpuEmulation, VcpuExitReason, VcpuIo, VcpuMetrics};

/// How often an unanswered kick is repeated while waiting for vCPUs to acknowledge. The
/// immediate_exit flag already closes the race a single signal has; repeating costs nothing
/// and keeps a pause from hanging on anything unforeseen.
const REKICK_INTERVAL: Duration = Duration::from_millis(50);

/// Errors starting or driving vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    /// A thread could not be started.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exit eventfd could not be shared with a thread.
    #[error("eventfd for vCPU {id}")]
    EventFd {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some vCPUs did not acknowledge in time.
    #[error("vCPU(s) {ids:?} did not {what} within {timeout:?}")]
    NoAck {
        /// `pause`, `resume` or `answer`.
        what: &'static str,
        /// The vCPUs that stayed silent.
        ids: Vec<u8>,
        /// How long the VMM waited.
        timeout: Duration,
    },
}

/// What the VMM asks a vCPU thread to do.
pub enum VcpuCommand {
    /// Leave the guest and park until Resume or Exit. Answered with [`VcpuEvent::Paused`],
    /// also when already parked.
    Pause,
    /// Continue running. Answered with [`VcpuEvent::Resumed`], also when already running.
    Resume,
    /// End the thread.
    Exit,
    /// Run this on the vCPU thread, which owns the vCPU's fd (for example to read its
    /// registers while paused, as a snapshot needs).
    With(Box<dyn FnOnce(&mut Vcpu) + Send>),
}

/// What a vCPU thread tells the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// vCPU `id` is parked.
    Paused(u8),
    /// vCPU `id` runs again.
    Resumed(u8),
    /// vCPU `id`'s thread ended, and why.
    Exited(u8, VcpuExitReason),
}

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick handler. Null outside vCPU threads.
    /// Const-initialised with no destructor, so the handler's access is a plain TLS read.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes the current or next KVM_RUN of this thread return.
extern "C" fn on_kick(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, published by vcpu_main while
            // the VcpuFd that owns the mapping is alive and withdrawn before it is dropped.
            // immediate_exit is a byte KVM reads on entry to KVM_RUN; a volatile write of it
            // is what the KVM API prescribes for signal handlers (Documentation/virt/kvm/
            // api.rst, "immediate_exit"), and what Firecracker's handler does.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
    compiler_fence(Ordering::SeqCst);
}

/// The kick signal: the first real-time signal, as Firecracker uses.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the kick handler (process-wide, once).
fn install_kick_handler() -> Result<(), VcpuThreadError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.to_string()))
        .clone()
        .map_err(VcpuThreadError::Signal)
}

/// The VMM's side of one vCPU thread.
struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    pending: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The thread reported its end.
    exited: bool,
}

impl VcpuHandle {
    /// Queues `cmd` and makes the thread look at it.
    fn send(&self, cmd: VcpuCommand) {
        if self.commands.send(cmd).is_err() {
            // The thread has ended; nothing to tell it.
            return;
        }
        self.pending.store(true, Ordering::Release);
        self.kick();
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH once the thread has ended (it is not joined yet, so the handle is still
            // valid); nothing to kick then.
            let _ = t.kill(kick_signal());
        }
    }
}

/// All vCPU threads of a VM.
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    /// Exits reported while the VMM waited for something else, for [`VcpuSet::take_exit`].
    exits: VecDeque<(u8, VcpuExitReason)>,
    metrics: Vec<(u8, Arc<VcpuMetrics>)>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, running at once. Each thread writes `exit_evt` when its
    /// vCPU ends on its own (guest reset, shutdown, failure); [`VcpuSet::take_exit`] says
    /// which and why.
    pub fn start(
        vcpus: Vec<Vcpu>,
        io: &VcpuIo,
        exit_evt: &EventFd,
    ) -> Result<VcpuSet, VcpuThreadError> {
        VcpuSet::spawn(vcpus, io, exit_evt, false)
    }

    /// Like [`VcpuSet::start`], but every thread parks before its vCPU first enters the
    /// guest (a restored VM stays paused until resumed). Returns once each has parked;
    /// [`VcpuSet::resume`] lets them run.
    pub fn start_paused(
        vcpus: Vec<Vcpu>,
        io: &VcpuIo,
        exit_evt: &EventFd,
        timeout: Duration,
    ) -> Result<VcpuSet, VcpuThreadError> {
        let mut set = VcpuSet::spawn(vcpus, io, exit_evt, true)?;
        set.wait_for("pause", timeout, |e| match e {
            VcpuEvent::Paused(id) => Some(*id),
            _ => None,
        })?;
        Ok(set)
    }

    fn spawn(
        vcpus: Vec<Vcpu>,
        io: &VcpuIo,
        exit_evt: &EventFd,
        paused: bool,
    ) -> Result<VcpuSet, VcpuThreadError> {
        install_kick_handler()?;
        let (events_tx, events) = channel();
        let mut set = VcpuSet {
            handles: Vec::with_capacity(vcpus.len()),
            events,
            exits: VecDeque::new(),
            metrics: vcpus.iter().map(|v| (v.id, v.metrics.clone())).collect(),
        };
        for vcpu in vcpus {
            let id = vcpu.id;
            let (commands, commands_rx) = channel();
            let pending = Arc::new(AtomicBool::new(false));
            if paused {
                // Served before the first KVM_RUN: the thread parks at once. The receiver
                // is alive here, so the send cannot fail.
                let _ = commands.send(VcpuCommand::Pause);
                pending.store(true, Ordering::Release);
            }
            let thread_pending = pending.clone();
            let io = io.clone();
            let events_tx = events_tx.clone();
            let exit_evt = exit_evt
                .try_clone()
                .map_err(|source| VcpuThreadError::EventFd { id, source })?;
            // On error `set` is dropped, which stops the threads started so far.
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let reason = vcpu_main(vcpu, &io, &thread_pending, &commands_rx, &events_tx);
                    let ended_on_its_own = reason != VcpuExitReason::Stopped;
                    let _ = events_tx.send(VcpuEvent::Exited(id, reason));
                    if ended_on_its_own {
                        // Only fails if the counter would overflow; the VMM is told anyway
                        // by the first write.
                        let _ = exit_evt.write(1);
                    }
                })
                .map_err(|source| VcpuThreadError::Spawn { id, source })?;
            set.handles.push(VcpuHandle {
                id,
                commands,
                pending,
                thread: Some(thread),
                exited: false,
            });
        }
        Ok(set)
    }

    /// Exit counters of each vCPU, by id.
    pub fn metrics(&self) -> &[(u8, Arc<VcpuMetrics>)] {
        &self.metrics
    }

    /// Kicks every vCPU out of the guest and returns once each has parked (or ended). On
    /// timeout the vCPUs that did park stay parked; [`VcpuSet::resume`] restarts them.
    pub fn pause(&mut self, timeout: Duration) -> Result<(), VcpuThreadError> {
        self.broadcast(|| VcpuCommand::Pause);
        self.wait_for("pause", timeout, |e| match e {
            VcpuEvent::Paused(id) => Some(*id),
            _ => None,
        })
    }

    /// Lets every parked vCPU run again; returns once each has acknowledged.
    pub fn resume(&mut self, timeout: Duration) -> Result<(), VcpuThreadError> {
        self.broadcast(|| VcpuCommand::Resume);
        self.wait_for("resume", timeout, |e| match e {
            VcpuEvent::Resumed(id) => Some(*id),
            _ => None,
        })
    }

    /// Runs `f` on every live vCPU's thread and returns the results by vCPU id. Meant for a
    /// paused VM (a running vCPU is kicked out, runs `f`, and goes back into the guest).
    pub fn on_each<T, F>(
        &mut self,
        f: F,
        timeout: Duration,
    ) -> Result<Vec<(u8, T)>, VcpuThreadError>
    where
        T: Send + 'static,
        F: Fn(&mut Vcpu) -> T + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let (tx, rx) = channel();
        let mut waiting = BTreeSet::new();
        for h in self.handles.iter().filter(|h| !h.exited) {
            let (f, tx) = (f.clone(), tx.clone());
            waiting.insert(h.id);
            h.send(VcpuCommand::With(Box::new(move |v: &mut Vcpu| {
                let _ = tx.send((v.id, f(v)));
            })));
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((id, value)) => {
                    waiting.remove(&id);
                    out.push((id, value));
                }
                // Timeout, or every closure was dropped unrun (threads ended).
                Err(_) => {
                    return Err(VcpuThreadError::NoAck {
                        what: "answer",
                        ids: waiting.into_iter().collect(),
                        timeout,
                    })
                }
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// The first vCPU end not yet taken: `(vCPU id, reason)`.
    pub fn take_exit(&mut self) -> Option<(u8, VcpuExitReason)> {
        while let Ok(e) = self.events.try_recv() {
            self.note(e);
        }
        self.exits.pop_front()
    }

    /// Tells every thread to end, kicks it out of the guest, and joins it. Returns false if
    /// some thread did not end within `timeout` (it is left running, detached: the caller
    /// must then keep guest memory and the VM alive for the rest of the process).
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.broadcast(|| VcpuCommand::Exit);
        let deadline = Instant::now() + timeout;
        loop {
            for h in &mut self.handles {
                if h.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                    if let Some(t) = h.thread.take() {
                        // A vCPU thread panicking is a VMM bug already printed by the
                        // panic hook; the thread is gone either way.
                        let _ = t.join();
                    }
                }
            }
            if self.handles.iter().all(|h| h.thread.is_none()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            match self.events.recv_timeout(Duration::from_millis(10)) {
                Ok(e) => self.note(e),
                // Kick again only threads that have not said they ended, and at this pace:
                // a thread that has ended its loop is only tearing down, and signals sent
                // to it in a tight loop (each one queued: they are real-time signals) would
                // keep it busy running the handler instead.
                Err(RecvTimeoutError::Timeout) => {
                    for h in self.handles.iter().filter(|h| !h.exited) {
                        h.kick();
                    }
                }
                // Every thread is past its last message: only their teardown is left.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn broadcast(&self, cmd: impl Fn() -> VcpuCommand) {
        for h in self.handles.iter().filter(|h| !h.exited) {
            h.send(cmd());
        }
    }

    /// Records an event that is not the acknowledgement being waited for.
    fn note(&mut self, e: VcpuEvent) {
        if let VcpuEvent::Exited(id, reason) = e {
            if let Some(h) = self.handles.iter_mut().find(|h| h.id == id) {
                h.exited = true;
            }
            if reason != VcpuExitReason::Stopped {
                self.exits.push_back((id, reason));
            }
        }
    }

    /// Waits until every live vCPU has sent the event `ack` recognises. A vCPU that ends
    /// meanwhile counts as done (its end is kept for `take_exit`).
    fn wait_for(
        &mut self,
        what: &'static str,
        timeout: Duration,
        ack: impl Fn(&VcpuEvent) -> Option<u8>,
    ) -> Result<(), VcpuThreadError> {
        let mut waiting: BTreeSet<u8> = self
            .handles
            .iter()
            .filter(|h| !h.exited)
            .map(|h| h.id)
            .collect();
        let deadline = Instant::now() + timeout;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VcpuThreadError::NoAck {
                    what,
                    ids: waiting.into_iter().collect(),
                    timeout,
                });
            }
            match self.events.recv_timeout(left.min(REKICK_INTERVAL)) {
                Ok(e) => {
                    if let Some(id) = ack(&e) {
                        waiting.remove(&id);
                    } else if let VcpuEvent::Exited(id, _) = e {
                        waiting.remove(&id);
                        self.note(e);
                    }
                    // Anything else is a late answer to an earlier request.
                }
                Err(RecvTimeoutError::Timeout) => {
                    for h in self.handles.iter().filter(|h| waiting.contains(&h.id)) {
                        h.pending.store(true, Ordering::Release);
                        h.kick();
                    }
                }
                // Every thread has ended.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(())
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        // Owners stop the set themselves (they must know whether it worked before freeing
        // guest memory); this only covers early-return paths, where no guest code ran long.
        if self.handles.iter().any(|h| h.thread.is_some()) {
            self.stop(Duration::from_secs(1));
        }
    }
}

/// What the command handling asks the run loop to do.
enum Next {
    Run,
    Exit,
}

/// The body of a vCPU thread. Returns why the vCPU ended.
fn vcpu_main(
    mut vcpu: Vcpu,
    io: &VcpuIo,
    pending: &AtomicBool,
    commands: &Receiver<VcpuCommand>,
    events: &Sender<VcpuEvent>,
) -> VcpuExitReason {
    // The kick must reach KVM_RUN even if the thread was started with signals blocked.
    let _ = unblock_signal(kick_signal());
    let run: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run));
    let reason = loop {
        if pending.swap(false, Ordering::AcqRel) {
            if let Next::Exit = serve_commands(&mut vcpu, commands, events) {
                break VcpuExitReason::Stopped;
            }
            // A kick that landed after its command was served left immediate_exit set:
            // clear it, then look at `pending` again before entering, so a kick arriving
            // from here on still makes the next KVM_RUN return (see the module comment).
            vcpu.fd.set_kvm_immediate_exit(0);
            continue;
        }
        match vcpu.run_once(io) {
            VcpuEmulation::Handled | VcpuEmulation::Interrupted => {}
            VcpuEmulation::Exit(reason) => break reason,
        }
    };
    // The mapping goes away with `vcpu`: withdraw it from the handler first.
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    reason
}

/// Serves every queued command; parks on Pause until Resume or Exit.
fn serve_commands(
    vcpu: &mut Vcpu,
    commands: &Receiver<VcpuCommand>,
    events: &Sender<VcpuEvent>,
) -> Next {
    let id = vcpu.id;
    loop {
        let cmd = match commands.try_recv() {
            Ok(cmd) => cmd,
            Err(TryRecvError::Empty) => return Next::Run,
            // The VMM is gone: nothing will ever resume us.
            Err(TryRecvError::Disconnected) => return Next::Exit,
        };
        match cmd {
            VcpuCommand::Pause => {
                let _ = events.send(VcpuEvent::Paused(id));
                // Parked: block until told otherwise.
                loop {
                    match commands.recv() {
                        Ok(VcpuCommand::Resume) => {
                            let _ = events.send(VcpuEvent::Resumed(id));
                            break;
                        }
                        Ok(VcpuCommand::Pause) => {
                            let _ = events.send(VcpuEvent::Paused(id));
                        }
                        Ok(VcpuCommand::With(f)) => f(vcpu),
                        Ok(VcpuCommand::Exit) | Err(_) => return Next::Exit,
                    }
                }
            }
            VcpuCommand::Resume => {
                let _ = events.send(VcpuEvent::Resumed(id));
            }
            VcpuCommand::With(f) => f(vcpu),
            VcpuCommand::Exit => return Next::Exit,
        }
    }
}
