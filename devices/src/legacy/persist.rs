//! Snapshot state of the legacy devices.
//!
//! - The 8250 UART: its registers and receive FIFO, as vm-superio's `SerialState`
//!   (mirrored here with serde, which vm-superio does not derive). The console output
//!   buffer is host-side and is flushed, not saved.
//! - The i8042: it has no guest-visible state (status always reads "buffers empty", there
//!   is no keyboard), so its state is empty; it exists so the vmstate has a place for it.
//! - The status port's only state is "ready already reported", which belongs to the
//!   boot-timer run that took the snapshot, so it is not saved.

use serde::{Deserialize, Serialize};

/// The UART's registers and receive FIFO (vm-superio `SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The i8042's state: none that the guest can see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// Why a UART could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// The saved receive FIFO is larger than the UART's.
    #[error("saved receive FIFO holds {0} bytes, more than the UART has")]
    FifoTooLarge(usize),
    /// Raising the pending interrupt failed.
    #[error("cannot raise the restored interrupt")]
    Interrupt(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::{ConsoleOutput, SerialConsole};

    #[test]
    fn uart_registers_and_fifo_survive() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq.try_clone().unwrap(), ConsoleOutput::discard());
        s.write(3, &[0x03]); // LCR: 8N1
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x01]); // IER: received data interrupt
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let _ = irq.read();
        let st = s.save_state();
        assert_eq!(st.in_buffer, b"hi");

        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r =
            SerialConsole::from_state(&st, irq2.try_clone().unwrap(), ConsoleOutput::discard())
                .unwrap();
        assert_eq!(
            irq2.read().unwrap(),
            1,
            "data waiting: the interrupt is raised again"
        );
        let mut b = [0u8];
        for (off, want) in [(3, 0x03), (7, 0x5a), (1, 0x01), (0, b'h'), (0, b'i')] {
            r.read(off, &mut b);
            assert_eq!(b[0], want, "register {off}");
        }
        assert_eq!(r.save_state().in_buffer, b"");

        let mut big = st.clone();
        big.in_buffer = vec![0; 65];
        assert!(matches!(
            SerialConsole::from_state(&big, irq2, ConsoleOutput::discard()),
            Err(SerialRestoreError::FifoTooLarge(65))
        ));
    }

    #[test]
    fn i8042_still_resets_after_restore() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let st = crate::legacy::I8042::new(evt.try_clone().unwrap()).save_state();
        let mut k = crate::legacy::I8042::from_state(&st, evt.try_clone().unwrap());
        k.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
