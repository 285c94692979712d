//! The serial console on COM1 (0x3f8), a 16550A from vm-superio.

mod device;
mod persist;

pub use device::{ConsoleOut, Serial};
pub use persist::SerialPersist;
