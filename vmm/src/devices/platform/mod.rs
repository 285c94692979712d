//! The vmatrix platform device: clock, wait-for-event, generation id, config string and exit.

mod device;

pub use device::{regs, Platform, PLATFORM_MAGIC};
