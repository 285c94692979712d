//! The KVM half of dirty tracking, with *hot pages*.
//!
//! Classic dirty logging write-protects every harvested page again, so a page the guest writes
//! in every epoch takes a write fault in every epoch. On this nested (PVM) host those faults,
//! not the pauses, were the main cost of frequent checkpoints: harvesting alone every 2.5 ms
//! cost a KV guest 36 % of its throughput (docs/BENCHMARKS.md).
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_GET_DIRTY_LOG` only reports, and the VMM
//! chooses with `KVM_CLEAR_DIRTY_LOG` which pages are cleared and write-protected again. A page
//! found dirty in [`HOT_AFTER`] consecutive harvests becomes *hot*: it is left writable and
//! stays set, so every harvest reports it (the caller copies it each time: a memcpy in the
//! pause instead of a fault in the guest). After [`HOT_FOR`] harvests a hot page is protected
//! again to see whether it cooled down. Reporting a page that did not change is always safe —
//! the dirty set is a superset of the pages written — and the replication encoder drops pages
//! identical to what the backup holds.
//!
//! Heat follows the paused harvests (checkpoints): a harvest while the guest runs (an early
//! copy of a busy epoch, a pre-copy pass) reports and clears as usual, but its pages only count
//! at the next paused harvest, together with that one's — so a page written once per epoch
//! before its early copy still becomes hot, as it did with one harvest per epoch.
//!
//! Without the capability (or with hot pages off) harvests clear everything, as before.

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// Consecutive dirty harvests that make a page hot.
pub const HOT_AFTER: u8 = 3;
/// Harvests a hot page stays writable before it is protected again.
pub const HOT_FOR: u8 = 64;
/// Most pages hot at once (16 MiB). Hot pages are for a small set written every epoch; a guest
/// that writes a gigabyte for a while would otherwise keep all of it hot — copied and sent
/// whole at every checkpoint for [`HOT_FOR`] more harvests after it stopped writing (found with
/// a 1 GiB churn on a 2 GiB guest: seconds-long checkpoints for minutes, and every full sync's
/// final pause copying 1 GiB). Pages beyond the cap are tracked as usual.
pub const HOT_MAX: usize = 4096;
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;

/// Per-page state of a page dirty in the previous harvest.
#[derive(Debug, Clone, Copy, Default)]
struct Heat {
    /// Consecutive harvests the page was dirty in.
    streak: u8,
    /// Harvests left while hot (0: not hot).
    hot_left: u8,
}

/// What a page found dirty in a harvest becomes; it stays writable (is not cleared) while the
/// result is hot (`hot_left > 0`). A page not found dirty starts again from `Heat::default()`.
fn next_heat(h: Heat) -> Heat {
    match h.hot_left {
        // Hot: stay writable, unless its time is up.
        n if n > 1 => Heat {
            streak: h.streak,
            hot_left: n - 1,
        },
        1 => Heat::default(),
        _ if h.streak + 1 >= HOT_AFTER => Heat {
            streak: HOT_AFTER,
            hot_left: HOT_FOR,
        },
        _ => Heat {
            streak: h.streak + 1,
            hot_left: 0,
        },
    }
}

/// KVM dirty log of the RAM slots with hot-page handling.
#[derive(Debug, Default)]
pub struct KvmDirtyLog {
    manual: bool,
    heat: HashMap<u64, Heat>,
    /// Pages reported by running harvests since the last paused one.
    seen: Vec<u64>,
}

impl KvmDirtyLog {
    /// Turns manual protection on for `vm_fd` if KVM offers it (call before the memory slot is
    /// registered). Falls back to classic logging otherwise.
    pub fn new(vm_fd: &VmFd) -> KvmDirtyLog {
        let flags = vm_fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let mut manual = false;
        if flags > 0 && (flags as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) != 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            manual = vm_fd.enable_cap(&cap).is_ok();
        }
        tracing::debug!("KVM dirty log: manual protection {manual}");
        KvmDirtyLog {
            manual,
            heat: HashMap::new(),
            seen: Vec::new(),
        }
    }

    /// True if hot pages are in use.
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// The pages written since they were last cleared (hot pages included), as a bitmap; the
    /// non-hot ones are cleared and write-protected again before this returns. `running`: the
    /// guest runs (see the module docs on heat).
    pub fn harvest(&mut self, vm_fd: &VmFd, mem_size: u64, running: bool) -> Result<Vec<u64>> {
        // One bitmap per slot (`crate::layout::ram_ranges`); the low slot is a whole number of
        // words, so concatenated they are the bitmap of the linear image.
        let ranges = crate::layout::ram_ranges(mem_size);
        let mut bitmap = Vec::new();
        for (slot, r) in ranges.iter().enumerate() {
            let b = vm_fd
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(Error::kvm("get_dirty_log"))?;
            bitmap.extend(b);
        }
        if !self.manual {
            return Ok(bitmap);
        }
        let pages = mem_size / crate::layout::PAGE_SIZE;
        let mut clear = self.plan(&bitmap, pages, running);
        for (slot, r) in ranges.iter().enumerate() {
            let first = (r.off / crate::layout::PAGE_SIZE / 64) as usize;
            let words = (r.len / crate::layout::PAGE_SIZE).div_ceil(64) as usize;
            let pages = r.len / crate::layout::PAGE_SIZE;
            self.clear(vm_fd, slot as u32, &mut clear[first..first + words], pages)?;
        }
        Ok(bitmap)
    }

    /// [`plan_clear`](Self::plan_clear) for a harvest while the guest runs (`running`: heat is
    /// not updated, the pages are kept for the next paused harvest, and the reported pages
    /// that are not hot are cleared) or paused (the pages of both count).
    pub fn plan(&mut self, bitmap: &[u64], pages: u64, running: bool) -> Vec<u64> {
        if running {
            let mut clear = vec![0u64; bitmap.len()];
            for pfn in crate::dirty::bits(bitmap, pages) {
                if self.heat.get(&pfn).is_none_or(|h| h.hot_left == 0) {
                    clear[(pfn / 64) as usize] |= 1 << (pfn % 64);
                }
            }
            if self.seen.len() < bitmap.len() {
                self.seen.resize(bitmap.len(), 0);
            }
            for (s, b) in self.seen.iter_mut().zip(bitmap) {
                *s |= b;
            }
            return clear;
        }
        match std::mem::take(&mut self.seen) {
            seen if seen.is_empty() => self.plan_clear(bitmap, pages),
            mut seen => {
                if seen.len() < bitmap.len() {
                    seen.resize(bitmap.len(), 0);
                }
                for (s, b) in seen.iter_mut().zip(bitmap) {
                    *s |= b;
                }
                // (Clearing a page the running harvest cleared already changes nothing.)
                self.plan_clear(&seen, pages)
            }
        }
    }

    /// The hot-page decision of one harvest (pure): updates every page's heat from the pages
    /// KVM reported (`bitmap`) and returns the pages to clear and write-protect again — every
    /// reported page except the hot ones, which stay set and so are reported again by the
    /// next harvest.
    pub fn plan_clear(&mut self, bitmap: &[u64], pages: u64) -> Vec<u64> {
        let mut clear = vec![0u64; bitmap.len()];
        let mut heat = HashMap::with_capacity(self.heat.len());
        // Pages that stay hot count first; new ones take what room is left.
        let dirty = crate::dirty::bits(bitmap, pages);
        let mut hot = dirty
            .iter()
            .filter(|pfn| self.heat.get(pfn).is_some_and(|h| h.hot_left > 1))
            .count();
        for pfn in dirty {
            let was = self.heat.get(&pfn).copied().unwrap_or_default();
            let mut next = next_heat(was);
            if was.hot_left == 0 && next.hot_left > 0 {
                if hot >= HOT_MAX {
                    // No room: it stays one harvest short of hot.
                    next = Heat {
                        streak: HOT_AFTER - 1,
                        hot_left: 0,
                    };
                } else {
                    hot += 1;
                }
            }
            if next.hot_left == 0 {
                clear[(pfn / 64) as usize] |= 1 << (pfn % 64);
            }
            if next.streak > 0 || next.hot_left > 0 {
                heat.insert(pfn, next);
            }
        }
        self.heat = heat;
        clear
    }

    /// A log with manual protection, without KVM (for models of the dirty log in tests).
    #[cfg(test)]
    pub(crate) fn manual_model() -> KvmDirtyLog {
        KvmDirtyLog {
            manual: true,
            heat: HashMap::new(),
            seen: Vec::new(),
        }
    }

    /// Clears (and write-protects) the pages of `slot` set in `bitmap`.
    fn clear(&self, vm_fd: &VmFd, slot: u32, bitmap: &mut [u64], pages: u64) -> Result<()> {
        if bitmap.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let mut arg = kvm_clear_dirty_log {
            slot,
            // The whole slot: a multiple of 64 pages, or its end.
            num_pages: pages as u32,
            first_page: 0,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap points to `bitmap`, which
        // holds at least `pages` bits (one per page of the slot) and outlives the call; the
        // ioctl only reads it. The fd is this VM's.
        let r = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
        if r < 0 {
            return Err(Error::Host(format!(
                "KVM_CLEAR_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_written_once_per_epoch_before_its_early_copy_still_becomes_hot() {
        let mut log = KvmDirtyLog::manual_model();
        let page = vec![1u64 << 5];
        let none = vec![0u64];
        let mut hot_at = None;
        for epoch in 0..5 {
            // The early (running) harvest finds it, the paused one does not.
            let running = log.plan(&page, 64, true);
            log.plan(&none, 64, false);
            if running[0] == 0 && hot_at.is_none() {
                hot_at = Some(epoch);
            }
        }
        // Cleared by the early harvests of epochs 0-2 (which make it hot at their pause);
        // left writable from epoch 3 on.
        assert_eq!(hot_at, Some(3));
    }

    #[test]
    fn at_most_hot_max_pages_are_hot_and_the_rest_cool_down_at_once() {
        let mut log = KvmDirtyLog::manual_model();
        let pages = 4 * HOT_MAX as u64;
        let all = vec![u64::MAX; (pages / 64) as usize];
        let mut kept = 0;
        for _ in 0..HOT_AFTER {
            let clear = log.plan_clear(&all, pages);
            kept = all
                .iter()
                .zip(&clear)
                .map(|(a, c)| (a & !c).count_ones())
                .sum::<u32>();
        }
        assert_eq!(kept as usize, HOT_MAX, "only HOT_MAX pages stay writable");
        // The guest stops writing: KVM reports only the hot pages (left set), and the next
        // harvest keeps those and nothing else.
        let reported: Vec<u64> = all
            .iter()
            .zip(&log.plan_clear(&all, pages))
            .map(|(a, c)| a & !c)
            .collect();
        let again = log.plan_clear(&reported, pages);
        let still: u32 = reported
            .iter()
            .zip(&again)
            .map(|(r, c)| (r & !c).count_ones())
            .sum();
        assert!(still as usize <= HOT_MAX);
    }

    #[test]
    fn a_page_dirty_in_three_harvests_stays_hot_for_a_while_then_is_protected_again() {
        let mut h = Heat::default();
        let mut writable = Vec::new();
        for _ in 0..(HOT_AFTER as usize + HOT_FOR as usize + 2) {
            h = next_heat(h);
            writable.push(h.hot_left > 0);
        }
        // Harvests 1 and 2 clear it; the 3rd makes it hot.
        assert_eq!(&writable[..3], &[false, false, true]);
        let hot = writable.iter().filter(|&&w| w).count();
        assert_eq!(hot, HOT_FOR as usize, "writable for HOT_FOR harvests");
        // When its time is up it is cleared and starts over.
        let first_cold = 3 + hot;
        assert!(!writable[first_cold]);
        assert_eq!(next_heat(Heat::default()).streak, 1);
    }
}
