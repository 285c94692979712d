//! virtio-net backed by a tap device, with a receive thread.

mod device;
mod persist;
mod rx;
mod tap;

pub use device::{Net, NetBackend, NetStats, NET_HDR_LEN};
pub use persist::NetPersist;
pub use rx::RxThread;
pub use tap::Tap;

#[cfg(test)]
mod tests;
