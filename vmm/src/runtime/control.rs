//! The control loop's own event sources, as event-manager subscribers.
//!
//! [`Control`] watches what must be seen whether or not the VM runs: the VM-end eventfd
//! (vCPU exits, the i8042 reset line), the signalfd (SIGTERM, SIGINT, SIGHUP) and the API's
//! wake-up eventfd. It only records what happened; the loop in `runtime` acts on it with the
//! whole [`super::Vmm`] at hand. While the VM is paused the loop waits on these same fds
//! through a separate epoll set ([`Control::fds`]), leaving the device subscribers unpolled.
//!
//! [`ConsoleInput`] feeds host stdin to the serial console. It is a device-side source:
//! like the virtio devices it is not polled while the VM is paused.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::legacy::SerialConsole;
use event_manager::{EventOps, Events, MutEventSubscriber};
use nix::sys::signalfd::SignalFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// VM end, signals and API wake-ups.
pub(super) struct Control {
    exit_evt: EventFd,
    signals: SignalFd,
    api_wake: Option<EventFd>,
    /// A signal asked the VMM to stop.
    pub signal: Option<i32>,
    /// The VM-end eventfd fired.
    pub vm_event: bool,
    /// The API has queued requests.
    pub api_pending: bool,
}

impl Control {
    pub fn new(exit_evt: EventFd, signals: SignalFd, api_wake: Option<EventFd>) -> Control {
        Control {
            exit_evt,
            signals,
            api_wake,
            signal: None,
            vm_event: false,
            api_pending: false,
        }
    }

    /// Every fd this subscriber watches.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.exit_evt.as_raw_fd(), self.signals.as_raw_fd()];
        fds.extend(self.api_wake.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }

    /// Records what `fd` being readable means.
    pub fn on_ready(&mut self, fd: RawFd) {
        if fd == self.exit_evt.as_raw_fd() {
            // Reading resets the counter; the vCPU set keeps the reasons.
            let _ = self.exit_evt.read();
            self.vm_event = true;
        } else if fd == self.signals.as_raw_fd() {
            if let Ok(Some(info)) = self.signals.read_signal() {
                self.signal = Some(i32::try_from(info.ssi_signo).unwrap_or(0));
            }
        } else if self.api_wake.as_ref().map(AsRawFd::as_raw_fd) == Some(fd) {
            if let Some(wake) = &self.api_wake {
                // EAGAIN (nothing to read) only means another wake-up was merged.
                let _ = wake.read();
            }
            self.api_pending = true;
        }
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.on_ready(events.fd());
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in self.fds() {
            // Only fails for a closed fd or out of memory; the loop would then never see
            // that source, which the first request or signal makes plain.
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
    }
}

/// Host stdin to the guest's serial console (when the console is stdout).
pub(super) struct ConsoleInput {
    stdin: Option<RawFd>,
    serial: Arc<Mutex<SerialConsole>>,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialConsole>>) -> ConsoleInput {
        ConsoleInput {
            stdin: Some(libc::STDIN_FILENO),
            serial,
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
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

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.stdin {
            if ops.add(Events::new_raw(fd, EventSet::IN)).is_err() {
                // stdin is a regular file or /dev/null (not pollable): no console input.
                self.stdin = None;
            }
        }
    }
}
