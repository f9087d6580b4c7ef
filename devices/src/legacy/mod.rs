//! Legacy port-I/O devices: the 8250 serial console, the i8042's reset line and the guest
//! status port.

mod i8042;
pub mod persist;
mod serial;
mod status_port;

pub use i8042::I8042;
pub use persist::{I8042State, SerialRestoreError, SerialState};
pub use serial::{ConsoleOutput, SerialConsole, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
pub use status_port::{StatusEvent, StatusPort, STATUS_PORT_BASE, STATUS_PORT_LEN};
