//! virtio-blk backed by a raw disk file: read, write, flush, get-id.

mod device;

pub use device::{Block, BLK_ID_LEN, SECTOR_SIZE};

#[cfg(test)]
mod tests;
