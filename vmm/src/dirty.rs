//! Dirty-page tracking: pages written by vCPUs (KVM dirty log) OR by the VMM's devices
//! (vm-memory `AtomicBitmap`), harvested and reset together while the VM is paused.

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::dirty_log::KvmDirtyLog;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestMem;
use crate::{Error, Result};

/// One harvest: a bit per guest page from each source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// Written by a vCPU (KVM dirty log).
    pub kvm: Vec<u64>,
    /// Written through vm-memory by a device (or the VMM).
    pub device: Vec<u64>,
    /// Number of guest pages covered.
    pub pages: u64,
}

impl DirtyPages {
    /// Bitmap of pages dirty from either source.
    pub fn union(&self) -> Vec<u64> {
        let n = self.kvm.len().max(self.device.len());
        (0..n)
            .map(|i| {
                self.kvm.get(i).copied().unwrap_or(0) | self.device.get(i).copied().unwrap_or(0)
            })
            .collect()
    }

    /// Sorted page numbers dirty from either source.
    pub fn page_list(&self) -> Vec<u64> {
        bits(&self.union(), self.pages)
    }

    /// True if page `pfn` is dirty in `bitmap`.
    pub fn is_set(bitmap: &[u64], pfn: u64) -> bool {
        bitmap
            .get((pfn / 64) as usize)
            .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }
}

/// Page numbers of the set bits of `bitmap`, below `limit`.
pub fn bits(bitmap: &[u64], limit: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in bitmap.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            let pfn = i as u64 * 64 + b;
            if pfn < limit {
                out.push(pfn);
            }
            w &= w - 1;
        }
    }
    out
}

/// Reads and resets both dirty sources (KVM's hot pages stay set, see
/// [`crate::dirty_log`]). The caller must have quiesced vCPUs and device threads, so that no
/// write falls between the two reads — or copy the pages only after this returns (pre-copy).
pub fn harvest(
    log: &mut KvmDirtyLog,
    vm_fd: &VmFd,
    mem: &GuestMem,
    mem_size: u64,
) -> Result<DirtyPages> {
    let kvm = log.harvest(vm_fd, mem_size)?;
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or_else(|| Error::MemoryMap("no guest RAM region".into()))?;
    let device = region.bitmap().get_and_reset();
    Ok(DirtyPages {
        kvm,
        device,
        pages: mem_size / PAGE_SIZE,
    })
}

/// Clears the device bitmap without reading it (after the VMM itself wrote guest memory, e.g.
/// when restoring pages).
pub fn reset_device_bitmap(mem: &GuestMem) {
    if let Some(r) = mem.find_region(GuestAddress(0)) {
        r.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_and_page_list() {
        let d = DirtyPages {
            kvm: vec![0b101, 0],
            device: vec![0b010, 1],
            pages: 128,
        };
        assert_eq!(d.union(), vec![0b111, 1]);
        assert_eq!(d.page_list(), vec![0, 1, 2, 64]);
        assert!(DirtyPages::is_set(&d.kvm, 2));
        assert!(!DirtyPages::is_set(&d.kvm, 1));
        assert_eq!(bits(&[u64::MAX], 3), vec![0, 1, 2]);
    }
}
