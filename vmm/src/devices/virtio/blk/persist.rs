//! virtio-blk state: geometry, device id and counters. The disk (a raw file or a clone's
//! overlay) is a host resource and comes back through `Args`; it must have the saved size.

use serde::{Deserialize, Serialize};

use super::device::{Block, BLK_ID_LEN, SECTOR_SIZE};
use super::disk::Disk;
use crate::persist::{Persist, RestoreError};

/// Saved block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkPersist {
    /// Capacity in sectors.
    pub sectors: u64,
    /// GET_ID string.
    pub id: [u8; BLK_ID_LEN],
    /// Requests completed.
    pub completed: u64,
}

impl Persist for Block {
    type State = BlkPersist;
    type Args = Disk;

    fn save(&self) -> BlkPersist {
        BlkPersist {
            sectors: self.sectors(),
            id: self.id(),
            completed: self.completed,
        }
    }

    fn restore(disk: Disk, st: &BlkPersist) -> Result<Self, RestoreError> {
        let len = disk
            .len()
            .map_err(|e| RestoreError::new("virtio-blk", format!("disk metadata: {e}")))?;
        if len / SECTOR_SIZE != st.sectors {
            return Err(RestoreError::new(
                "virtio-blk",
                format!(
                    "disk has {} sectors, snapshot expects {}",
                    len / SECTOR_SIZE,
                    st.sectors
                ),
            ));
        }
        let mut b = Block::with_id(disk, st.id);
        b.completed = st.completed;
        Ok(b)
    }
}
