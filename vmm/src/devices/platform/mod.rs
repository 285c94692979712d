//! The vmatrix platform device: clock, wait-for-event, generation id, config string and exit.

mod device;
mod persist;

pub use device::{regs, Platform, PLATFORM_MAGIC};
pub use persist::{PlatformArgs, PlatformPersist};
