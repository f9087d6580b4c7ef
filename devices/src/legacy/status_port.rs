//! The guest status port: how guest-init tells the VMM it is ready (the boot timer's end
//! point) and what its command's exit status was, without the VMM parsing console text.
//!
//! Registers (8-bit writes, base [`STATUS_PORT_BASE`]; guest-init learns the base from
//! `gi.statusport=` on the kernel command line):
//! - offset 0: any value marks "guest-init ready";
//! - offset 1: the command's exit status (0..=255).
//!
//! Reads return 0. A guest can write anything here at any rate; the device only records the
//! first ready mark and the latest exit status, so it cannot flood the host.

use crate::bus::BusDevice;

/// Base I/O port; unused by PC hardware.
pub const STATUS_PORT_BASE: u64 = 0x440;
/// Number of ports.
pub const STATUS_PORT_LEN: u64 = 2;

/// What the guest reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    /// guest-init is up (reported once).
    Ready,
    /// The command ended with this status.
    ExitStatus(u8),
}

/// The status port device. `notify` is called from the vCPU thread that made the write.
pub struct StatusPort {
    notify: Box<dyn FnMut(StatusEvent) + Send>,
    ready_seen: bool,
}

impl StatusPort {
    /// A device that reports events to `notify`.
    pub fn new(notify: Box<dyn FnMut(StatusEvent) + Send>) -> StatusPort {
        StatusPort {
            notify,
            ready_seen: false,
        }
    }
}

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            0 if !self.ready_seen => {
                self.ready_seen = true;
                (self.notify)(StatusEvent::Ready);
            }
            1 => (self.notify)(StatusEvent::ExitStatus(*value)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn records_ready_once_and_every_exit_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = StatusPort::new(Box::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[1]);
        dev.write(0, &[1]);
        dev.write(1, &[7]);
        dev.write(1, &[7, 7]); // wrong width: ignored
        dev.write(5, &[1]); // outside the registers: ignored
        let mut r = [0xff; 2];
        dev.read(0, &mut r);
        assert_eq!(r, [0, 0]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![StatusEvent::Ready, StatusEvent::ExitStatus(7)]
        );
    }
}
