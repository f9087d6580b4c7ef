//! Just enough of the i8042 keyboard controller for the guest to reset the machine:
//! `reboot=k` makes Linux wait for the input buffer to drain (status bit 1 clear) and then
//! write command 0xFE ("pulse reset line") to port 0x64. That write signals `reset_evt`,
//! which the VMM treats as the end of the VM. There is no keyboard.

use vmm_sys_util::eventfd::EventFd;

use super::persist::I8042State;
use crate::bus::BusDevice;

/// Offset of the command/status register from the base port 0x60.
const COMMAND_OFFSET: u64 = 4;
/// Controller command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    reset_evt: EventFd,
    resets: u64,
}

impl I8042 {
    /// First port.
    pub const BASE: u64 = 0x60;
    /// Ports covered (0x60 to 0x64).
    pub const LEN: u64 = 5;

    /// A controller that writes to `reset_evt` when the guest resets the machine.
    pub fn new(reset_evt: EventFd) -> I8042 {
        I8042 {
            reset_evt,
            resets: 0,
        }
    }

    /// How many resets the guest asked for.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The controller's snapshot state (empty: see [`I8042State`]).
    pub fn save_state(&self) -> I8042State {
        I8042State {}
    }

    /// A controller in the saved state, signalling `reset_evt`.
    pub fn from_state(_state: &I8042State, reset_evt: EventFd) -> I8042 {
        I8042::new(reset_evt)
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty. Data reads return 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            // Failure to signal can only be an eventfd counter overflow, which needs 2^64
            // resets; nothing useful to do with it.
            let _ = self.reset_evt.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0], "input buffer must look empty or Linux spins");
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(COMMAND_OFFSET, &[]);
        assert!(evt.read().is_err(), "only 0xfe on port 0x64 resets");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }
}
