//! Guest side of virtio-mmio (modern) and split virtqueues.

use alloc::alloc::{alloc_zeroed, Layout};
use core::sync::atomic::{fence, Ordering};

use crate::io;

const MAGIC: u32 = 0x7472_6976;
const F_VERSION_1: u64 = 1 << 32;

const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC: u64 = 0x080;
const R_QUEUE_DRIVER: u64 = 0x090;
const R_QUEUE_DEVICE: u64 = 0x0a0;
/// Device-specific config space.
pub const R_CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
/// Status bit set by the device when it needs a reset.
pub const S_NEEDS_RESET: u32 = 0x40;

/// Descriptor flag: chain continues.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const F_WRITE: u16 = 2;

/// A virtio-mmio device window.
#[derive(Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    /// Returns the transport and device id if a modern device sits at `base`.
    pub fn probe(base: u64) -> Option<(Transport, u32)> {
        if io::read32(base + R_MAGIC) != MAGIC || io::read32(base + R_VERSION) != 2 {
            return None;
        }
        let id = io::read32(base + R_DEVICE_ID);
        (id != 0).then_some((Transport { base }, id))
    }

    /// Reset, acknowledge, and negotiate `wanted` features (plus VERSION_1).
    pub fn init(&self, wanted: u64) -> Result<u64, &'static str> {
        io::write32(self.base + R_STATUS, 0);
        io::write32(self.base + R_STATUS, S_ACK);
        io::write32(self.base + R_STATUS, S_ACK | S_DRIVER);
        io::write32(self.base + R_DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(io::read32(self.base + R_DEVICE_FEATURES));
        io::write32(self.base + R_DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(io::read32(self.base + R_DEVICE_FEATURES));
        let offered = lo | (hi << 32);
        if offered & F_VERSION_1 == 0 {
            return Err("device is not virtio 1.x");
        }
        let features = offered & (wanted | F_VERSION_1);
        io::write32(self.base + R_DRIVER_FEATURES_SEL, 0);
        io::write32(self.base + R_DRIVER_FEATURES, features as u32);
        io::write32(self.base + R_DRIVER_FEATURES_SEL, 1);
        io::write32(self.base + R_DRIVER_FEATURES, (features >> 32) as u32);
        io::write32(self.base + R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if io::read32(self.base + R_STATUS) & S_FEATURES_OK == 0 {
            return Err("device refused our features");
        }
        Ok(features)
    }

    /// Allocates and registers queue `idx` with at most `size` entries.
    pub fn setup_queue(&self, idx: u32, size: u16) -> Result<Virtqueue, &'static str> {
        io::write32(self.base + R_QUEUE_SEL, idx);
        let max = io::read32(self.base + R_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        let size = size.min(max as u16);
        let vq = Virtqueue::new(size);
        io::write32(self.base + R_QUEUE_NUM, u32::from(size));
        let set64 = |reg: u64, v: u64| {
            io::write32(self.base + reg, v as u32);
            io::write32(self.base + reg + 4, (v >> 32) as u32);
        };
        set64(R_QUEUE_DESC, vq.desc as u64);
        set64(R_QUEUE_DRIVER, vq.avail as u64);
        set64(R_QUEUE_DEVICE, vq.used as u64);
        io::write32(self.base + R_QUEUE_READY, 1);
        Ok(vq)
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        io::write32(
            self.base + R_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        if io::read32(self.base + R_STATUS) & S_NEEDS_RESET != 0 {
            return Err("device needs reset after DRIVER_OK");
        }
        Ok(())
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        io::read32(self.base + R_STATUS)
    }

    /// Rings the doorbell of queue `idx` (one VM exit).
    pub fn notify(&self, idx: u32) {
        fence(Ordering::SeqCst);
        io::write32(self.base + R_QUEUE_NOTIFY, idx);
    }

    /// Reads a byte of config space.
    pub fn config8(&self, off: u64) -> u8 {
        io::read8(self.base + R_CONFIG + off)
    }
    /// Reads a u32 of config space.
    pub fn config32(&self, off: u64) -> u32 {
        io::read32(self.base + R_CONFIG + off)
    }
}

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue in guest memory.
pub struct Virtqueue {
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u8,
    avail_idx: u16,
    last_used: u16,
}

fn page_alloc(bytes: usize) -> *mut u8 {
    let layout = Layout::from_size_align(bytes.max(1), 4096).expect("valid layout");
    // SAFETY: non-zero size; failure panics below.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of memory for a virtqueue");
    p
}

impl Virtqueue {
    fn new(size: u16) -> Self {
        let n = usize::from(size);
        Virtqueue {
            size,
            desc: page_alloc(16 * n) as *mut Desc,
            avail: page_alloc(6 + 2 * n) as *mut u16,
            used: page_alloc(6 + 8 * n),
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Fills descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        // SAFETY: `i` is within the descriptor table we allocated.
        unsafe {
            self.desc.add(usize::from(i)).write_volatile(Desc {
                addr,
                len,
                flags,
                next,
            });
        }
    }

    /// Makes chain `head` available to the device (no doorbell).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: ring entries follow flags and idx; `slot` < size.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: idx is the second u16 of the avail ring.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
    }

    /// Next used element (head, length), if any.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: idx is at offset 2 of the used ring.
        let idx = unsafe { (self.used.add(2) as *const u16).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: elements of 8 bytes start at offset 4; `slot` < size.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot) as *const u32;
            (e.read_volatile(), e.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// True if the device asked not to be notified (VIRTQ_USED_F_NO_NOTIFY).
    pub fn no_notify(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: flags is the first u16 of the used ring.
        unsafe { (self.used as *const u16).read_volatile() & 1 != 0 }
    }
}
