//! Guest memory: one anonymous mapping at guest address 0 with an [`AtomicBitmap`] that records
//! every write made through vm-memory (that is, by the VMM's devices).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::{Error, Result};

/// Guest memory with device-write dirty tracking.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Checks that `mib` MiB is a usable guest RAM size; returns it in bytes.
pub fn check_size(mib: u64) -> Result<usize> {
    if mib < MIN_MEM_MIB {
        return Err(Error::Memory {
            mib,
            why: format!("the test guest needs at least {MIN_MEM_MIB} MiB"),
        });
    }
    if mib > MAX_MEM_MIB {
        return Err(Error::Memory {
            mib,
            why: format!("RAM must end below the MMIO hole: at most {MAX_MEM_MIB} MiB"),
        });
    }
    let size = usize::try_from(mib << 20).map_err(|_| Error::Memory {
        mib,
        why: "does not fit in this host's address space".into(),
    })?;
    Ok(size)
}

/// Creates guest RAM of `mib` MiB at guest physical address 0.
pub fn create(mib: u64) -> Result<GuestMem> {
    let size = check_size(mib)?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| Error::MemoryMap(e.to_string()))
}
