//! Guest physical memory layout shared by the loader, the boot code and the devices.
//!
//! ```text
//! 0x0000_0500  GDT (7 entries)
//! 0x0000_1000  TSS: 104-byte header, 8 KiB I/O bitmap of zeros, trailing 0xff
//! 0x0000_4000  PML4, 0x5000 PDPT, 0x6000..0xa000 four page directories (2 MiB pages, 4 GiB)
//! 0x0000_b000  generation word (u64): the platform device's generation id, written by the VMM
//!              at boot and before a clone's first instruction (the guest polls it for free)
//! 0x0010_0000  lowest address a guest ELF segment may use
//! RAM end      at most MMIO_BASE
//! 0xd000_0000  platform device (4 KiB)
//! 0xd000_1000  virtio-mmio slot 0 (net), 0xd000_2000 slot 1 (block), ...
//! ```
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
/// Largest guest RAM the VMM accepts, in MiB (RAM must end below the MMIO hole).
pub const MAX_MEM_MIB: u64 = MMIO_BASE >> 20;
