//! virtio-blk backed by a raw disk file: read, write, flush, get-id.

mod device;
mod persist;

pub use device::{Block, DiskWrites, BLK_ID_LEN, MAX_RECORDED, SECTOR_SIZE};
pub use persist::BlkPersist;

#[cfg(test)]
mod tests;
