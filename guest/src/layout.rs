//! Device addresses; must match `vmm/src/layout.rs`.

/// Platform device MMIO window.
pub const PLATFORM: u64 = 0xd000_0000;
/// virtio-mmio slot `i`.
pub const fn virtio_slot(i: u64) -> u64 {
    PLATFORM + (i + 1) * 0x1000
}
/// Number of virtio-mmio slots to probe.
pub const VIRTIO_SLOTS: u64 = 4;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The generation word (u64) the VMM writes at boot and before a clone's first instruction.
pub const GENID: u64 = 0xb000;
/// The clock page the VMM writes before this vCPU first runs in a VMM process
/// (`vmm/src/pvclock.rs`): time from the TSC without a VM exit.
pub const CLOCK_PAGE: u64 = GENID + 0x40;
/// Guest RAM beyond the part below the MMIO hole (which ends at [`PLATFORM`]) is here.
pub const HIGH_RAM: u64 = 1 << 32;
