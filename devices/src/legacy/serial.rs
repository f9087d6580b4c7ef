//! The 8250 UART at 0x3f8 (COM1), the guest's console, on vm-superio's `Serial`.
//!
//! Every byte the guest prints is a VM exit, so the host side must not add a system call per
//! byte on top: output is buffered and written out per line (or when 4 KiB pile up), except
//! when the console is an interactive terminal, where a prompt must show at once.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{SerialRestoreError, SerialState};
use crate::bus::BusDevice;

/// COM1's base port.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Registers of an 8250.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Output is flushed once this much is buffered, even without a newline.
const FLUSH_THRESHOLD: usize = 4096;

/// Raises the UART's interrupt by writing the irqfd registered for its GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes, with the buffering policy.
pub struct ConsoleOutput {
    sink: Option<Box<dyn Write + Send>>,
    buf: Vec<u8>,
    unbuffered: bool,
    bytes: u64,
}

impl ConsoleOutput {
    /// Output to `w`, flushed per line, or per byte if `interactive`.
    pub fn new(w: Box<dyn Write + Send>, interactive: bool) -> ConsoleOutput {
        ConsoleOutput {
            sink: Some(w),
            buf: Vec::with_capacity(FLUSH_THRESHOLD),
            unbuffered: interactive,
            bytes: 0,
        }
    }

    /// Output that is counted and dropped (`--console none`).
    pub fn discard() -> ConsoleOutput {
        ConsoleOutput {
            sink: None,
            buf: Vec::new(),
            unbuffered: true,
            bytes: 0,
        }
    }

    /// Bytes the guest has written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.bytes += data.len() as u64;
        if self.sink.is_none() {
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        if self.unbuffered || self.buf.len() >= FLUSH_THRESHOLD || data.contains(&b'\n') {
            self.drain()?;
        }
        Ok(data.len())
    }

    /// vm-superio flushes after every byte; buffering is decided in `write` instead, and
    /// [`ConsoleOutput::drain`] empties the buffer for real.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ConsoleOutput {
    /// Writes out everything buffered.
    pub fn drain(&mut self) -> io::Result<()> {
        if let Some(sink) = self.sink.as_mut() {
            let res = sink.write_all(&self.buf).and_then(|()| sink.flush());
            // Drop the bytes even on error: a closed stdout must not grow the buffer forever.
            self.buf.clear();
            res?;
        }
        Ok(())
    }
}

/// COM1 as a bus device.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOutput>,
    write_errors: u64,
}

impl SerialConsole {
    /// A UART raising `irq` and printing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> SerialConsole {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
            write_errors: 0,
        }
    }

    /// Queues host input for the guest to read. Returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = input.len().min(room);
        self.uart.enqueue_raw_bytes(&input[..n]).unwrap_or_default()
    }

    /// Writes out anything still buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().drain()
    }

    /// Bytes printed by the guest.
    pub fn bytes_out(&self) -> u64 {
        self.uart.writer().bytes()
    }

    /// Failed writes to the output (a closed stdout, a full disk).
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        SerialState::from(self.uart.state())
    }

    /// A UART in the saved state, raising `irq` and printing to `out`. An interrupt that
    /// was pending is raised again.
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        out: ConsoleOutput,
    ) -> Result<SerialConsole, SerialRestoreError> {
        let uart = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, out).map_err(
            |e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialRestoreError::Interrupt(e)
                }
                vm_superio::serial::Error::FullFifo => {
                    SerialRestoreError::FifoTooLarge(state.in_buffer.len())
                }
            },
        )?;
        Ok(SerialConsole {
            uart,
            write_errors: 0,
        })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [b]) = (u8::try_from(offset), data) else {
            return;
        };
        if self.uart.write(off, *b).is_err() {
            self.write_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(d.to_vec());
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart(out: ConsoleOutput) -> (SerialConsole, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (SerialConsole::new(irq.try_clone().unwrap(), out), irq)
    }

    #[test]
    fn output_is_written_per_line_not_per_byte() {
        let shared = Shared::default();
        let (mut s, _irq) = uart(ConsoleOutput::new(Box::new(shared.clone()), false));
        for b in b"hello\nwor" {
            s.write(0, &[*b]);
        }
        assert_eq!(*shared.0.lock().unwrap(), vec![b"hello\n".to_vec()]);
        s.flush().unwrap();
        assert_eq!(shared.0.lock().unwrap().concat(), b"hello\nwor");
        assert_eq!(s.bytes_out(), 9);
    }

    #[test]
    fn interactive_output_is_unbuffered() {
        let shared = Shared::default();
        let (mut s, _irq) = uart(ConsoleOutput::new(Box::new(shared.clone()), true));
        s.write(0, b"#");
        assert_eq!(shared.0.lock().unwrap().concat(), b"#");
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let (mut s, irq) = uart(ConsoleOutput::discard());
        // IER bit 0: interrupt on received data.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(irq.read().is_ok());
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b, [b'a']);
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let (mut s, _irq) = uart(ConsoleOutput::discard());
        let mut wide = [0xffu8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        s.write(0, &[1, 2, 3, 4]);
        s.write(u64::MAX, &[1]);
        s.read(u64::MAX, &mut wide[..1]);
        assert_eq!(s.bytes_out(), 0);
    }
}
