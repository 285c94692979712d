//! The VM's devices. Each device lives in its own folder (`mod.rs`, `device.rs`, and from the
//! snapshot work on a `persist.rs`), as in Firecracker.

pub mod platform;
pub mod serial;
pub mod virtio;
