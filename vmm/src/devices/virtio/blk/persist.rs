//! virtio-blk state: geometry, device id and counters. The disk file is a host resource and
//! comes back through `Args`; it must have the saved size.

use std::fs::File;

use serde::{Deserialize, Serialize};

use super::device::{Block, BLK_ID_LEN, SECTOR_SIZE};
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
    type Args = File;

    fn save(&self) -> BlkPersist {
        BlkPersist {
            sectors: self.sectors(),
            id: self.id(),
            completed: self.completed,
        }
    }

    fn restore(file: File, st: &BlkPersist) -> Result<Self, RestoreError> {
        let len = file
            .metadata()
            .map_err(|e| RestoreError::new("virtio-blk", format!("disk metadata: {e}")))?
            .len();
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
        let mut b = Block::with_id(file, st.id);
        b.completed = st.completed;
        Ok(b)
    }
}
