//! Guest memory: anonymous mappings at the guest addresses of [`crate::layout::ram_ranges`] (one
//! below the MMIO hole, one at 4 GiB for RAM beyond it), each with a [`DeviceBitmap`] that
//! records every write made through vm-memory (that is, by the VMM's devices).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::device_bitmap::DeviceBitmap;
use crate::layout::{ram_ranges, MAX_MEM_MIB, MIN_MEM_MIB};
use crate::{Error, Result};

/// Guest memory with device-write dirty tracking.
pub type GuestMem = GuestMemoryMmap<DeviceBitmap>;

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
            why: format!("at most {MAX_MEM_MIB} MiB"),
        });
    }
    let size = usize::try_from(mib << 20).map_err(|_| Error::Memory {
        mib,
        why: "does not fit in this host's address space".into(),
    })?;
    Ok(size)
}

/// Creates guest RAM of `mib` MiB (see [`crate::layout::ram_ranges`]).
pub fn create(mib: u64) -> Result<GuestMem> {
    let size = check_size(mib)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size as u64)
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::MemoryMap(e.to_string()))
}

/// The guest address of byte `off` of the linear RAM image (see [`crate::layout::ram_gpa`]).
pub const fn ram_addr(off: u64) -> GuestAddress {
    GuestAddress(crate::layout::ram_gpa(off))
}

/// The guest address of page `pfn` of the linear RAM image.
pub const fn page_addr(pfn: u64) -> GuestAddress {
    ram_addr(pfn * crate::layout::PAGE_SIZE)
}
