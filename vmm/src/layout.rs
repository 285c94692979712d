//! Guest physical memory layout shared by the loader, the boot code and the devices.
//!
//! ```text
//! 0x0000_0500  GDT (7 entries)
//! 0x0000_1000  TSS: 104-byte header, 8 KiB I/O bitmap of zeros, trailing 0xff
//! 0x0000_4000  PML4, 0x5000 PDPT, 0x6000..0xa000 four page directories (2 MiB pages, 4 GiB)
//! 0x0000_b000  generation word (u64): the platform device's generation id, written by the VMM
//!              at boot and before a clone's first instruction (the guest polls it for free)
//! 0x0000_b040  clock page (32 bytes, `crate::pvclock`): the guest's clock from the TSC
//! 0x0001_0000  page directories 4.. (guests whose RAM goes beyond 4 GiB of addresses)
//! 0x0010_0000  lowest address a guest ELF segment may use
//! low RAM end  at most MMIO_BASE
//! 0xd000_0000  platform device (4 KiB)
//! 0xd000_1000  virtio-mmio slot 0 (net), 0xd000_2000 slot 1 (block), ...
//! 0x1_0000_0000  the rest of guest RAM, if it is larger than MMIO_BASE (KVM slot 1)
//! ```
//! Guest RAM is one linear image (the memory file of a snapshot or replica, page numbers of the
//! protocol): its first [`MMIO_BASE`] bytes are at guest address 0, the rest at
//! [`HIGH_RAM_BASE`] ([`ram_gpa`]).
//! The test guest finds its devices at these fixed addresses; the same constants are
//! duplicated in `guest/src/layout.rs` (it is a separate, `no_std` workspace).

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x1000;
/// Offset of the I/O permission bitmap inside the TSS.
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// TSS limit: header + 8 KiB bitmap + trailing 0xff byte.
pub const TSS_LIMIT: u32 = 0x2068;
/// Address of the PML4 table.
pub const PML4_ADDR: u64 = 0x4000;
/// Address of the PDPT.
pub const PDPT_ADDR: u64 = 0x5000;
/// Address of the first of four page directories.
pub const PD_ADDR: u64 = 0x6000;
/// Guest physical address of the generation word (see the module docs).
pub const GENID_ADDR: u64 = 0xb000;
/// Lowest address a guest ELF segment may occupy.
pub const GUEST_MIN_ADDR: u64 = 0x10_0000;
/// Start of the MMIO hole; guest RAM must end below it.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The platform device's MMIO window.
pub const PLATFORM_ADDR: u64 = MMIO_BASE;
/// Size of every MMIO device window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Address of virtio-mmio slot `i`.
pub const fn virtio_slot(i: u64) -> u64 {
    MMIO_BASE + (i + 1) * MMIO_WINDOW
}
/// Number of virtio-mmio slots the guest probes.
pub const VIRTIO_SLOTS: u64 = 4;
/// Serial console port base (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Smallest guest RAM the VMM accepts, in MiB (image, stack, heap, rings, page tables).
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM the VMM accepts, in MiB (16 GiB: page directories for up to 17 GiB of
/// addresses fit below [`GUEST_MIN_ADDR`]).
pub const MAX_MEM_MIB: u64 = 16 << 10;
/// Guest physical address of the RAM beyond the first [`MMIO_BASE`] bytes.
pub const HIGH_RAM_BASE: u64 = 1 << 32;
/// Address of page directory 4 (and 5, 6, ... after it): the directories of guest addresses
/// beyond 4 GiB.
pub const HIGH_PD_ADDR: u64 = 0x1_0000;

/// The guest physical address of byte `off` of guest RAM (its offset in the linear image).
pub const fn ram_gpa(off: u64) -> u64 {
    if off < MMIO_BASE {
        off
    } else {
        off - MMIO_BASE + HIGH_RAM_BASE
    }
}

/// One contiguous piece of guest RAM: `len` bytes at guest address `gpa`, which are bytes
/// `off..off + len` of the linear image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical address.
    pub gpa: u64,
    /// Offset in the linear image.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The pieces of a guest RAM of `mem_size` bytes: one below the MMIO hole, and one at
/// [`HIGH_RAM_BASE`] if it is larger than [`MMIO_BASE`]. Piece `i` is KVM memory slot `i`.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(MMIO_BASE);
    let mut v = vec![RamRange {
        gpa: 0,
        off: 0,
        len: low,
    }];
    if mem_size > low {
        v.push(RamRange {
            gpa: HIGH_RAM_BASE,
            off: low,
            len: mem_size - low,
        });
    }
    v
}

/// Page directories (1 GiB of addresses each) the boot page tables need for `mem_size` bytes
/// of RAM: 4 for the first 4 GiB (RAM and the MMIO hole), and one per GiB of RAM beyond.
pub fn page_dirs(mem_size: u64) -> u64 {
    let end = ram_gpa(mem_size.max(1) - 1) + 1;
    end.div_ceil(1 << 30).max(4)
}

/// Address of page directory `i` (see [`page_dirs`]).
pub const fn page_dir_addr(i: u64) -> u64 {
    if i < 4 {
        PD_ADDR + i * PAGE_SIZE
    } else {
        HIGH_PD_ADDR + (i - 4) * PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_pieces_and_page_directories() {
        let mib = |m: u64| m << 20;
        assert_eq!(ram_ranges(mib(64)).len(), 1);
        assert_eq!(page_dirs(mib(64)), 4);
        assert_eq!(ram_ranges(MMIO_BASE).len(), 1);
        let r = ram_ranges(mib(4096));
        assert_eq!(r[1].gpa, HIGH_RAM_BASE);
        assert_eq!(r[1].off, MMIO_BASE);
        assert_eq!(r[0].len + r[1].len, mib(4096));
        assert_eq!(ram_gpa(MMIO_BASE), HIGH_RAM_BASE);
        assert_eq!(ram_gpa(MMIO_BASE - 1), MMIO_BASE - 1);
        // 4 GiB: 768 MiB above 4 GiB, one more directory.
        assert_eq!(page_dirs(mib(4096)), 5);
        let max = mib(MAX_MEM_MIB);
        let last = page_dir_addr(page_dirs(max) - 1);
        assert!(last + PAGE_SIZE <= GUEST_MIN_ADDR, "{last:#x}");
        // The low slot is a whole number of 64-page bitmap words (bitmaps concatenate).
        assert_eq!((MMIO_BASE / PAGE_SIZE) % 64, 0);
    }
}
