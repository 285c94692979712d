//! The KVM half of dirty tracking, with *hot pages*.
//!
//! Classic dirty logging write-protects every harvested page again, so a page the guest writes
//! in every epoch takes a write fault in every epoch. On this nested (PVM) host those faults,
//! not the pauses, were the main cost of frequent checkpoints: harvesting alone every 2.5 ms
//! cost a KV guest 36 % of its throughput (docs/BENCHMARKS.md).
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_GET_DIRTY_LOG` only reports, and the VMM
//! chooses with `KVM_CLEAR_DIRTY_LOG` which pages are cleared and write-protected again. A page
//! found dirty [`HOT_AFTER`] times, each within [`HOT_WINDOW`] harvests of the one before,
//! becomes *hot*: it is left writable and stays set, so every harvest reports it (the caller
//! copies it each time: a memcpy in the pause instead of a fault in the guest). After
//! [`HOT_FOR`] harvests a hot page is protected again to see whether it cooled down; one more
//! write within the window makes it hot again. Reporting a page that did not change is always
//! safe — the dirty set is a superset of the pages written — and the replication encoder drops
//! pages identical to what the backup holds.
//!
//! Why a window and not only consecutive harvests: with early checkpoints a busy guest's
//! clients split into cohorts that alternate between checkpoints (16 closed-loop KV clients:
//! two of ~8), so each client's socket buffers are written in every *other* epoch. Counted as
//! consecutive they never became hot and took ~10 write faults per checkpoint, each an exit on
//! this nested host (docs/BENCHMARKS.md, "Hot pages within a window"). But a page hot while
//! written in only every other epoch is copied in two pauses per write, and a churn over
//! thousands of pages at that period would make every pause copy them all (2,048 pages at
//! 1,000 per 20 ms epoch: pause p50 0.5 → 1.6 ms with an earlier, uncapped version of the
//! window). So pages that became
//! hot with a clean harvest between two dirty ones are *sparse* hot pages, at most
//! [`HOT_SPARSE_MAX`] at once (a few dozen socket buffers fit), and none are made in a harvest
//! of more than [`SPARSE_UNTIL`] pages besides those staying hot (that is a churn; with 64 of
//! its pages hot the pause still grew by ~0.1–0.2 ms, same run); pages dirty in consecutive
//! harvests are capped by [`HOT_MAX`] only, as before. A page written once never becomes hot.
//!
//! Heat follows the paused harvests (checkpoints): a harvest while the guest runs (an early
//! copy of a busy epoch, a pre-copy pass) reports and clears as usual, but its pages only count
//! at the next paused harvest, together with that one's — so a page written once per epoch
//! before its early copy still becomes hot, as it did with one harvest per epoch.
//!
//! Without the capability (or with hot pages off) harvests clear everything, as before.

use std::ops::Range;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;

use crate::layout::PAGE_SIZE;
use crate::page_set::PageSet;
use crate::{Error, Result};

/// Dirty harvests, each within [`HOT_WINDOW`] of the one before, that make a page hot.
pub const HOT_AFTER: u8 = 3;
/// Paused harvests within which a page's next dirty harvest counts towards [`HOT_AFTER`]
/// (1: consecutive harvests only; 2: one clean harvest between).
pub const HOT_WINDOW: u64 = 2;
/// Most pages dirty in a harvest that still makes sparse hot pages and remembers pages that are
/// clean in it (see the module docs): a busier epoch is a churn, not a few socket buffers.
pub const SPARSE_UNTIL: usize = 256;
/// Most sparse hot pages at once (256 KiB; see the module docs).
pub const HOT_SPARSE_MAX: usize = 64;
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
/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_AE42;

/// Per-page state of a page dirty in a recent harvest.
#[derive(Debug, Clone, Copy, Default)]
struct Heat {
    /// Dirty harvests so far, each within [`HOT_WINDOW`] of the one before.
    score: u8,
    /// The paused harvest (its number) that last found the page dirty.
    last: u64,
    /// Harvests left while hot (0: not hot).
    hot_left: u8,
    /// A clean harvest came between two of the dirty ones counted in `score` (hot, it is one
    /// of the [`HOT_SPARSE_MAX`]).
    sparse: bool,
}

/// Bits of a packed [`Heat`]: `last` (its low 48 bits), then score, hot_left and sparse.
const LAST_BITS: u32 = 48;
const LAST_MASK: u64 = (1 << LAST_BITS) - 1;
const _: () = assert!(HOT_AFTER < 4 && HOT_FOR < 128, "a packed Heat holds them");

/// `h` in 8 bytes (the heat table's slot).
fn pack(h: Heat) -> u64 {
    (h.last & LAST_MASK)
        | u64::from(h.score) << LAST_BITS
        | u64::from(h.hot_left) << (LAST_BITS + 2)
        | u64::from(h.sparse) << (LAST_BITS + 9)
}

/// A slot's heat as paused harvest `now` reads it, and its age (harvests since `last`).
fn unpack(v: u64, now: u64) -> (Heat, u64) {
    let age = now.wrapping_sub(v & LAST_MASK) & LAST_MASK;
    let h = Heat {
        score: (v >> LAST_BITS & 0b11) as u8,
        last: now.wrapping_sub(age),
        hot_left: (v >> (LAST_BITS + 2) & 0x7f) as u8,
        sparse: v >> (LAST_BITS + 9) & 1 != 0,
    };
    (h, age)
}

/// What a page found dirty in paused harvest number `now` becomes; it stays writable (is not
/// cleared) while the result is hot (`hot_left > 0`).
fn next_heat(h: Heat, now: u64) -> Heat {
    match h.hot_left {
        // Hot: stay writable, unless its time is up.
        n if n > 1 => Heat {
            hot_left: n - 1,
            last: now,
            ..h
        },
        // Protected again; one more write within the window makes it hot again (sparse or
        // not by that write's gap).
        1 => Heat {
            score: HOT_AFTER - 1,
            last: now,
            hot_left: 0,
            sparse: false,
        },
        _ => {
            let gap = now.wrapping_sub(h.last);
            let recent = h.score > 0 && gap <= HOT_WINDOW;
            let score = if recent { h.score + 1 } else { 1 };
            Heat {
                score: score.min(HOT_AFTER),
                last: now,
                hot_left: if score >= HOT_AFTER { HOT_FOR } else { 0 },
                sparse: recent && (h.sparse || gap > 1),
            }
        }
    }
}

/// KVM dirty log of the RAM slots with hot-page handling.
#[derive(Debug, Default)]
pub struct KvmDirtyLog {
    manual: bool,
    /// Each page's heat as last written ([`pack`]), read through [`KvmDirtyLog::view`] (a
    /// page clean since is cooled or forgotten lazily: no pass over all pages per harvest).
    /// Made by [`KvmDirtyLog::prepare`], zeroed by the allocator (untouched pages cost nothing): 8
    /// bytes a page (8 MiB for 4 GiB).
    heat: Vec<u64>,
    /// Paused harvests so far (the clock of [`Heat::last`]; 2^48 of them before a page's
    /// packed `last` wraps: centuries at thousands a second).
    harvests: u64,
    /// The last busy paused harvest (more than [`SPARSE_UNTIL`] pages): it remembered no
    /// clean page, so an entry last dirty before it is forgotten.
    busy_at: Option<u64>,
    /// Pages reported by running harvests since the last paused one.
    seen: PageSet,
    /// The buffer KVM's bitmaps go through (see [`KvmDirtyLog::harvest`]).
    scratch: Vec<u64>,
    /// Pages read by a harvest that failed (after KVM reset or cleared them): the next
    /// harvest returns them.
    carry: PageSet,
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
            heat: Vec::new(),
            harvests: 0,
            busy_at: None,
            seen: PageSet::new(),
            scratch: Vec::new(),
            carry: PageSet::new(),
        }
    }

    /// True if hot pages are in use.
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// Makes the buffers a harvest of a `mem_size` guest needs (KVM's bitmaps, the heat
    /// table), so that the first harvest, inside a pause, does not.
    pub fn prepare(&mut self, mem_size: u64) {
        let pages = (mem_size / PAGE_SIZE) as usize;
        self.scratch.resize(pages.div_ceil(64), 0);
        if self.manual && self.heat.len() < pages {
            // (Zeroed by the allocator: pages of the table never touched cost nothing.)
            self.heat = vec![0; pages];
        }
    }

    /// The pages written since they were last cleared (hot pages included); the non-hot ones
    /// are cleared and write-protected again before this returns. `running`: the guest runs
    /// (see the module docs on heat). KVM's whole-guest bitmaps go through one buffer kept
    /// for them ([`prepare`](Self::prepare)); what else a harvest allocates follows the pages
    /// found. If an ioctl fails, the pages already read (and maybe cleared) are kept and
    /// returned by the next harvest: none is lost.
    pub fn harvest(&mut self, vm_fd: &VmFd, mem_size: u64, running: bool) -> Result<PageSet> {
        self.harvest_from(&mut Kvm(vm_fd), mem_size, running)
    }

    /// [`harvest`](Self::harvest) from the slots' logs `log` (KVM's, or a model in tests).
    fn harvest_from(
        &mut self,
        log: &mut impl SlotLog,
        mem_size: u64,
        running: bool,
    ) -> Result<PageSet> {
        let slots = slot_words(mem_size);
        self.prepare(mem_size);
        let carried = std::mem::take(&mut self.carry);
        for (slot, r, _) in &slots {
            if let Err(e) = log.get(*slot, &mut self.scratch[r.clone()]) {
                // (Classic logging reset the slots read before this one.)
                self.carry = PageSet::from_bitmap(&self.scratch[..r.start]);
                self.carry.union_with(&carried);
                return Err(e);
            }
        }
        let mut dirty = PageSet::from_bitmap(&self.scratch);
        if self.manual {
            if let Err(e) = self.clear(log, &slots, &dirty, running) {
                self.carry = dirty;
                self.carry.union_with(&carried);
                return Err(e);
            }
        }
        dirty.union_with(&carried);
        Ok(dirty)
    }

    /// The hot-page plan of a harvest that found `dirty`, carried out: every page of it that is
    /// not hot is cleared and write-protected again, a `KVM_CLEAR_DIRTY_LOG` per slot over the
    /// span of words that has such pages.
    fn clear(
        &mut self,
        log: &mut impl SlotLog,
        slots: &[(u32, Range<usize>, u64)],
        dirty: &PageSet,
        running: bool,
    ) -> Result<()> {
        let pages = slots.iter().map(|s| s.2).sum();
        // (If the clear fails below, the heat was counted anyway: those pages may turn hot a
        // harvest early. Only the cost moves; the pages themselves are carried.)
        let clear = self.plan(dirty, pages, running);
        // The buffer becomes the bitmap of the pages to clear (only `dirty`'s words are set).
        for (w, _) in dirty.words() {
            self.scratch[w as usize] = 0;
        }
        for (w, bits) in clear.words() {
            self.scratch[w as usize] = bits;
        }
        for (slot, r, slot_pages) in slots {
            if let Some((words, first, count)) = clear_span(&clear, r, *slot_pages) {
                log.clear(*slot, &mut self.scratch[words], first, count)?;
            }
        }
        Ok(())
    }

    /// [`plan_clear`](Self::plan_clear) for a harvest while the guest runs (`running`: heat is
    /// not updated, the pages are kept for the next paused harvest, and the reported pages
    /// that are not hot are cleared) or paused (the pages of both count).
    pub fn plan(&mut self, dirty: &PageSet, pages: u64, running: bool) -> PageSet {
        if running {
            let mut clear = PageSet::new();
            let next = self.harvests.wrapping_add(1);
            for pfn in dirty.pages(pages) {
                if self.view(pfn, next).hot_left == 0 {
                    clear.push_page(pfn);
                }
            }
            self.seen.union_with(dirty);
            return clear;
        }
        match std::mem::take(&mut self.seen) {
            seen if seen.is_empty() => self.plan_clear(dirty, pages),
            mut seen => {
                seen.union_with(dirty);
                // (Clearing a page the running harvest cleared already changes nothing.)
                self.plan_clear(&seen, pages)
            }
        }
    }

    /// The hot-page decision of one harvest (pure): updates every page's heat from the pages
    /// KVM reported (`dirty`) and returns the pages to clear and write-protect again — every
    /// reported page except the hot ones, which stay set and so are reported again by the
    /// next harvest.
    pub fn plan_clear(&mut self, dirty: &PageSet, pages: u64) -> PageSet {
        self.harvests = self.harvests.wrapping_add(1);
        let now = self.harvests;
        match self.heat.len() {
            0 => self.heat = vec![0; pages as usize],
            n if (n as u64) < pages => self.heat.resize(pages as usize, 0),
            _ => {}
        }
        let mut clear = PageSet::new();
        // Pages that stay hot count first; new ones take what room is left.
        let dirty = dirty.pages(pages);
        let (mut hot, mut sparse) = (0, 0);
        for &pfn in &dirty {
            let h = self.view(pfn, now);
            if h.hot_left > 1 {
                hot += 1;
                sparse += usize::from(h.sparse);
            }
        }
        // (The pages staying hot are reported every time: they do not make a harvest busy.)
        let busy = dirty.len() - hot > SPARSE_UNTIL;
        for &pfn in &dirty {
            let was = self.view(pfn, now);
            let mut next = next_heat(was, now);
            if was.hot_left == 0 && next.hot_left > 0 {
                if hot >= HOT_MAX || (next.sparse && (busy || sparse >= HOT_SPARSE_MAX)) {
                    // No room: it stays one harvest short of hot.
                    next = Heat {
                        score: HOT_AFTER - 1,
                        hot_left: 0,
                        ..next
                    };
                } else {
                    hot += 1;
                    sparse += usize::from(next.sparse);
                }
            }
            if next.hot_left == 0 {
                clear.push_page(pfn);
            }
            self.heat[pfn as usize] = pack(next);
        }
        if busy {
            self.busy_at = Some(now);
        }
        clear
    }

    /// Page `pfn`'s heat as paused harvest `now` finds it. Clean in the harvests since it was
    /// last dirty, it is remembered only within the window and if none of them was busy, and
    /// then one write short of hot at most: a page not reported is write-protected in KVM (a
    /// running harvest cleared it before a pause made it hot through `seen`), and so
    /// uncounted it would let the next harvests exceed the caps.
    fn view(&self, pfn: u64, now: u64) -> Heat {
        let Some(&packed) = self.heat.get(pfn as usize) else {
            return Heat::default();
        };
        let (h, age) = unpack(packed, now);
        let busy_since = self.busy_at.is_some_and(|b| now.wrapping_sub(b) < age);
        match age {
            _ if h.score == 0 && h.hot_left == 0 => Heat::default(),
            1 => h,
            a if a > HOT_WINDOW || busy_since => Heat::default(),
            _ => Heat {
                score: h.score.min(HOT_AFTER - 1),
                hot_left: 0,
                ..h
            },
        }
    }

    /// Pages whose heat is remembered before paused harvest `now` (tests).
    #[cfg(test)]
    fn remembered(&self, now: u64) -> usize {
        let pages = self.heat.len() as u64;
        (0..pages).filter(|&p| self.view(p, now).score > 0).count()
    }

    /// A log with manual protection, without KVM (for models of the dirty log in tests).
    #[cfg(test)]
    pub(crate) fn manual_model() -> KvmDirtyLog {
        KvmDirtyLog {
            manual: true,
            heat: Vec::new(),
            harvests: 0,
            busy_at: None,
            seen: PageSet::new(),
            scratch: Vec::new(),
            carry: PageSet::new(),
        }
    }

    /// [`plan`](Self::plan) of a bitmap, as a bitmap of as many words (the models' view).
    #[cfg(test)]
    pub(crate) fn plan_bits(&mut self, bitmap: &[u64], pages: u64, running: bool) -> Vec<u64> {
        let dirty = PageSet::from_bitmap(bitmap);
        self.plan(&dirty, pages, running).to_bitmap(bitmap.len())
    }

    /// [`plan_clear`](Self::plan_clear) of a bitmap, as a bitmap of as many words.
    #[cfg(test)]
    pub(crate) fn plan_clear_bits(&mut self, bitmap: &[u64], pages: u64) -> Vec<u64> {
        let dirty = PageSet::from_bitmap(bitmap);
        self.plan_clear(&dirty, pages).to_bitmap(bitmap.len())
    }
}

/// The dirty logs of a VM's RAM slots: KVM's ([`Kvm`]), or a model in tests.
trait SlotLog {
    /// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap` (a bit per page of the slot).
    fn get(&mut self, slot: u32, bitmap: &mut [u64]) -> Result<()>;
    /// `KVM_CLEAR_DIRTY_LOG` of the pages `first..first + count` of `slot` set in `bitmap`.
    fn clear(&mut self, slot: u32, bitmap: &mut [u64], first: u64, count: u64) -> Result<()>;
}

/// KVM's dirty logs of the VM `.0`.
struct Kvm<'a>(&'a VmFd);

impl SlotLog for Kvm<'_> {
    fn get(&mut self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        get_dirty_log(self.0, slot, bitmap)
    }

    fn clear(&mut self, slot: u32, bitmap: &mut [u64], first: u64, count: u64) -> Result<()> {
        clear_dirty_log(self.0, slot, bitmap, first, count)
    }
}

/// The RAM slots of a `mem_size` guest: each one's number, its words in the bitmap of the
/// linear image (`crate::layout::ram_ranges`; the low slot is a whole number of words, so the
/// slots' bitmaps side by side are that bitmap) and its pages.
fn slot_words(mem_size: u64) -> Vec<(u32, Range<usize>, u64)> {
    let ranges = crate::layout::ram_ranges(mem_size);
    (ranges.iter().enumerate())
        .map(|(slot, r)| {
            let first = (r.off / PAGE_SIZE / 64) as usize;
            let pages = r.len / PAGE_SIZE;
            let words = first..first + pages.div_ceil(64) as usize;
            (slot as u32, words, pages)
        })
        .collect()
}

/// The one `KVM_CLEAR_DIRTY_LOG` that clears the pages of `clear` in the slot whose words
/// are `slot` (of the linear image) and that has `pages` pages: the span of words from its
/// first such page to its last, and that span's first page in the slot and its page count —
/// from a whole word, to the span's end or the slot's (KVM takes a count that is not a multiple
/// of 64 only when it reaches the slot's end). None if the slot has none.
fn clear_span(
    clear: &PageSet,
    slot: &Range<usize>,
    pages: u64,
) -> Option<(std::ops::RangeInclusive<usize>, u64, u64)> {
    let mut inside = (clear.words().map(|(w, _)| w as usize)).filter(|w| slot.contains(w));
    let lo = inside.next()?;
    let hi = inside.last().unwrap_or(lo);
    let first = (lo - slot.start) as u64 * 64;
    let count = ((hi - lo + 1) as u64 * 64).min(pages.saturating_sub(first));
    Some((lo..=hi, first, count))
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap` (a bit per page of the slot: KVM writes all
/// of it).
fn get_dirty_log(vm_fd: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<()> {
    let mut arg = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` is a valid kvm_dirty_log whose bitmap points to `bitmap`, which holds a
    // bit for every page of the slot (the caller sizes it from the slot's length) and outlives
    // the call; KVM writes at most that many bits. The fd is this VM's.
    let r = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_GET_DIRTY_LOG, &arg) };
    ioctl_result("KVM_GET_DIRTY_LOG", r)
}

/// An ioctl's result: `Err` with the OS error if it failed.
fn ioctl_result(name: &str, r: i32) -> Result<()> {
    match r {
        r if r < 0 => Err(Error::Host(format!(
            "{name}: {}",
            std::io::Error::last_os_error()
        ))),
        _ => Ok(()),
    }
}

/// Clears (and write-protects) the pages `first..first + count` of `slot` that are set in
/// `bitmap` (a bit per page of that span; `first` a multiple of 64, `count` too unless the
/// span ends at the slot's end).
fn clear_dirty_log(
    vm_fd: &VmFd,
    slot: u32,
    bitmap: &mut [u64],
    first: u64,
    count: u64,
) -> Result<()> {
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages: count as u32,
        first_page: first,
        ..Default::default()
    };
    if bitmap.len() as u64 * 64 < count {
        return Err(Error::Host("KVM_CLEAR_DIRTY_LOG: bitmap too short".into()));
    }
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap points to `bitmap`, which
    // holds at least `count` bits (checked above) and outlives the call; the ioctl only reads
    // it. The fd is this VM's.
    let r = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
    ioctl_result("KVM_CLEAR_DIRTY_LOG", r)
}

#[cfg(test)]
#[path = "dirty_log_tests.rs"]
mod tests;
