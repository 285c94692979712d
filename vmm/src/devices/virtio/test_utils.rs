//! Test helpers: a split virtqueue laid out in plain guest memory (no KVM), so device models
//! can be driven with well-formed and malformed descriptor chains.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestMem;

/// Guest memory size used by device tests.
pub const MEM_SIZE: usize = 1 << 20;
/// Where the queue structures live.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
/// A data area for buffers.
pub const DATA: u64 = 0x10000;
pub const QSIZE: u16 = 16;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A driver-side view of one queue.
pub struct Driver {
    pub avail_idx: u16,
}

impl Driver {
    pub fn new() -> Self {
        Driver { avail_idx: 0 }
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, mem: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(base)).unwrap();
        mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Makes chain `head` available.
    pub fn push(&mut self, mem: &GuestMem, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used element `n`: (id, len).
    pub fn used(&self, mem: &GuestMem, n: u16) -> (u32, u32) {
        let e = USED + 4 + u64::from(n % QSIZE) * 8;
        (
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }
}

/// A ready device-side queue over the layout above.
pub fn queue(mem: &GuestMem) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// A checksum of all guest memory except the queue area (to prove nothing else was written).
pub fn checksum_outside(mem: &GuestMem, skip: &[(u64, u64)]) -> u32 {
    let mut buf = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    for &(a, l) in skip {
        buf[a as usize..(a + l) as usize].fill(0);
    }
    crc32fast::hash(&buf)
}
