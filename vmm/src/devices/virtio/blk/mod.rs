//! virtio-blk backed by a raw disk file or a clone's copy-on-write overlay: read, write,
//! flush, get-id.

mod device;
mod disk;
mod persist;

pub use device::{Block, DiskWrites, BLK_ID_LEN, MAX_RECORDED, SECTOR_SIZE};
pub use disk::{Disk, Overlay, OVERLAY_BLOCK};
pub use persist::BlkPersist;

#[cfg(test)]
mod tests;
