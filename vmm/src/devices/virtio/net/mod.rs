//! virtio-net backed by a tap device, with a receive thread.

mod commit;
mod device;
mod persist;
mod rx;
mod tap;

pub use commit::{OutputCommit, DEFAULT_MAX_HELD};
pub use device::{Net, NetBackend, NetStats, OutputWaker, NET_HDR_LEN};
pub use persist::NetPersist;
pub use rx::RxThread;
pub use tap::Tap;

#[cfg(test)]
mod tests;
