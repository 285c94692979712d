//! virtio 1.x devices over the virtio-mmio transport, with split virtqueues from the
//! `virtio-queue` crate.
//!
//! Every descriptor chain is untrusted guest input: [`chain::validate`] checks that each buffer
//! lies in guest memory, that the chain ends, and that readable buffers precede writable ones,
//! before a device reads or writes any byte. A malformed chain is a [`DeviceError`]; the
//! transport then sets `DEVICE_NEEDS_RESET` and the device stops touching the queue.

pub mod blk;
pub mod chain;
pub mod mmio;
#[cfg(test)]
mod mmio_tests;
pub mod net;
pub mod persist;
#[cfg(test)]
mod test_utils;

use virtio_queue::Queue;

use crate::memory::GuestMem;

/// virtio device id of a network card.
pub const TYPE_NET: u32 = 1;
/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Feature bit: virtio 1.x (modern) device.
pub const F_VERSION_1: u64 = 1 << 32;

/// A malformed request from the guest driver. The device refuses to go on until it is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor {index} buffer [{addr:#x}, +{len:#x}) is outside guest memory")]
    OutOfRange {
        /// Descriptor index.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain never ends (a loop, or longer than the queue).
    #[error("descriptor chain starting at {head} loops or is longer than the queue ({size})")]
    Loop {
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A readable buffer follows a writable one, or a buffer has the wrong direction for the
    /// request.
    #[error("descriptor chain starting at {head}: {why}")]
    Direction {
        /// Head index.
        head: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// The request is too short or otherwise malformed.
    #[error("malformed request at head {head}: {why}")]
    Malformed {
        /// Head index.
        head: u16,
        /// What is wrong.
        why: String,
    },
    /// Restored from a snapshot in which the device had already failed.
    #[error("device failed before the snapshot: {why}")]
    Frozen {
        /// The original error.
        why: String,
    },
    /// The ring itself cannot be read or written (addresses outside guest memory).
    #[error("virtqueue {queue} is unusable: {why}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// The underlying error.
        why: String,
    },
}

impl DeviceError {
    /// Maps a virtio-queue error on queue `queue` (for `map_err`).
    pub fn queue(queue: u16) -> impl Fn(virtio_queue::Error) -> DeviceError {
        move |e| DeviceError::Queue {
            queue,
            why: e.to_string(),
        }
    }
}

/// A device behind a virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// virtio device id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Called once the driver set DRIVER_OK with valid queues.
    fn activate(&mut self);
    /// Called on device reset (status 0).
    fn reset(&mut self);
    /// Processes queue `index` after a notification. Returns true if any buffer was used.
    fn process_queue(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &GuestMem,
    ) -> Result<bool, DeviceError>;
}
