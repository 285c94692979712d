//! Address-range dispatch of port-I/O and MMIO exits to devices.

use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// A set of non-overlapping device windows.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// Adds a device at `[base, base + len)`. Panics are avoided: overlap is a programming error
    /// reported as `false`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> bool {
        let end = base.saturating_add(len);
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return false;
        }
        self.entries.push(Entry { base, len, dev });
        true
    }

    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (&e.dev, addr - e.base))
    }

    /// Dispatches a read; returns false if no device claims `addr` (data is then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device claims `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Reads a little-endian integer of up to 8 bytes from an access.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes the low `data.len()` bytes of `v` little-endian into an access.
pub fn put_le_value(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
    data[n..].fill(0);
}
