//! Dirty-page tracking: pages written by vCPUs (KVM dirty log) OR by the VMM's devices
//! (vm-memory, `crate::device_bitmap`), harvested and reset together while the VM is paused — and
//! handed to every consumer of changes ([`ChangeTracker`]).
//!
//! Two consumers want the changes of one VM: replication (each checkpoint carries what changed
//! since the previous one) and the snapshot chain (each diff snapshot carries what changed since
//! the previous snapshot). Reading KVM's dirty log, the device bitmap or the virtio-blk write
//! log resets it, so a consumer that harvested for itself would take the changes from the other
//! (a checkpoint would miss the pages and disk writes a snapshot took, and the backup silently
//! diverge). Instead every harvest, whoever triggers it, is fanned out: the VM keeps per
//! consumer what was harvested but not yet handed to it, and a capture takes only its own.

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::devices::virtio::blk::DiskWrites;
use crate::dirty_log::KvmDirtyLog;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestMem;
use crate::page_set::PageSet;
use crate::{Error, Result};

/// One harvest: the pages from each source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// Written by a vCPU (KVM's dirty ring or log).
    pub kvm: PageSet,
    /// Written through vm-memory by a device (or the VMM).
    pub device: PageSet,
    /// Number of guest pages covered.
    pub pages: u64,
}

impl DirtyPages {
    /// Pages dirty from either source.
    pub fn union(&self) -> PageSet {
        self.kvm.union(&self.device)
    }

    /// Sorted page numbers dirty from either source.
    pub fn page_list(&self) -> Vec<u64> {
        self.union().pages(self.pages)
    }
}

/// Reads and resets both dirty sources (KVM's ring where the VM has one, else its bitmap,
/// whose hot pages stay set, see [`crate::dirty_log`]). The caller must have quiesced vCPUs and device threads, so that no
/// write falls between the two reads — or copy the pages only after this returns (pre-copy).
pub fn harvest(
    (log, ring): (&mut KvmDirtyLog, Option<&crate::dirty_ring::DirtyRing>),
    vm_fd: &VmFd,
    (mem, mem_size): (&GuestMem, u64),
    running: bool,
) -> Result<DirtyPages> {
    let kvm = match ring {
        Some(r) => r.harvest()?,
        None => log.harvest(vm_fd, mem_size, running)?,
    };
    // One bitmap per RAM region, in address order: the low one covers a whole number of
    // 64-page words (`crate::layout`), so the words of the next follow on.
    let mut device = PageSet::new();
    let mut base = 0;
    for region in mem.iter() {
        base += region.bitmap().take_into(base, &mut device);
    }
    if base == 0 {
        return Err(Error::MemoryMap("no guest RAM region".into()));
    }
    Ok(DirtyPages {
        kvm,
        device,
        pages: mem_size / PAGE_SIZE,
    })
}

/// A consumer of the changes of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// Replication: checkpoints and pre-copy passes.
    Replication,
    /// The snapshot chain: diff snapshots.
    Snapshots,
}

impl Consumer {
    fn index(self) -> usize {
        match self {
            Consumer::Replication => 0,
            Consumer::Snapshots => 1,
        }
    }
}

/// The changes harvested but not yet handed to one consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    /// Pages dirtied (vCPU or device).
    pub dirty: PageSet,
    /// Disk writes in order; `overflowed`: the record is incomplete (not recorded from the
    /// start, or more than the bound): any block may have changed.
    pub disk: DiskWrites,
}

impl Pending {
    /// Nothing known: every block may have changed (the dirty pages are only those harvested
    /// from now on, so a consumer's first capture must copy all memory).
    fn unknown() -> Pending {
        Pending {
            dirty: PageSet::new(),
            disk: DiskWrites {
                overflowed: true,
                ..Default::default()
            },
        }
    }

    /// Sorted numbers of the dirty pages below `pages`.
    pub fn page_list(&self, pages: u64) -> Vec<u64> {
        self.dirty.pages(pages)
    }

    /// Adds changes made after these.
    fn append(&mut self, dirty: &PageSet, disk: DiskWrites, limit: u64) {
        self.dirty.union_with(dirty);
        let d = &mut self.disk;
        if d.overflowed {
            return;
        }
        d.bytes += disk.bytes;
        if disk.overflowed || d.bytes > limit {
            *d = DiskWrites {
                overflowed: true,
                ..Default::default()
            };
        } else {
            d.writes.extend(disk.writes);
        }
    }
}

/// What each consumer has not been handed yet: every harvest is added to every active
/// consumer, and a capture takes its own consumer's changes (see the module docs). Pure data.
///
/// A consumer is active from its first capture on ([`activate`](Self::activate), or
/// [`start_clean`](Self::start_clean) when the VM is known to equal its last capture, as after
/// a restore), so one that never captures accumulates nothing. Each harvest reports a superset
/// of the pages written since the previous harvest (hot pages included, `crate::dirty_log`), so
/// what a consumer takes is a superset of the pages written since its previous take, and its
/// disk writes are exactly the writes since then, in order (or `overflowed`).
#[derive(Debug)]
pub struct ChangeTracker {
    /// Bound of the disk writes kept per consumer (bytes); beyond it the record is dropped.
    disk_limit: u64,
    /// Per consumer: `None` while inactive.
    slots: [Option<Pending>; 2],
}

impl ChangeTracker {
    /// No consumer active; at most `disk_limit` bytes of disk writes kept per consumer.
    pub fn new(disk_limit: u64) -> ChangeTracker {
        ChangeTracker {
            disk_limit,
            slots: [None, None],
        }
    }

    /// True if `c` receives changes.
    pub fn is_active(&self, c: Consumer) -> bool {
        self.slots[c.index()].is_some()
    }

    /// True if any consumer receives changes (disk writes need recording).
    pub fn any_active(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// `c` receives every change from the next harvest on. If it was inactive, nothing is known
    /// of what came before: its next take reports the disk as wholly changed (and only the
    /// pages of the harvests from now on), so that capture must copy everything.
    pub fn activate(&mut self, c: Consumer) {
        self.slots[c.index()].get_or_insert_with(Pending::unknown);
    }

    /// `c` holds the VM as it is now (a VM restored from `c`'s last capture, with disk writes
    /// recorded from now on): active, nothing pending.
    pub fn start_clean(&mut self, c: Consumer) {
        self.slots[c.index()] = Some(Pending::default());
    }

    /// One harvest, fanned out to every active consumer: the pages dirtied and the disk writes
    /// recorded since the previous harvest (`None`: writes were not being recorded).
    pub fn add(&mut self, dirty: &PageSet, disk: Option<DiskWrites>) {
        let disk = disk.unwrap_or(DiskWrites {
            overflowed: true,
            ..Default::default()
        });
        let limit = self.disk_limit;
        let mut active: Vec<&mut Pending> = self.slots.iter_mut().flatten().collect();
        // The writes are copied for all but the last consumer (they are moved to it).
        if let Some(last) = active.pop() {
            for p in active {
                p.append(dirty, disk.clone(), limit);
            }
            last.append(dirty, disk, limit);
        }
    }

    /// Hands `c` everything pending for it; nothing is pending afterwards. An inactive consumer
    /// gets "unknown" (see [`activate`](Self::activate)) and stays inactive.
    pub fn take(&mut self, c: Consumer) -> Pending {
        match &mut self.slots[c.index()] {
            Some(p) => std::mem::take(p),
            None => Pending::unknown(),
        }
    }

    /// Hands `c` only its dirty pages (a pre-copy pass): its disk writes stay pending.
    pub fn take_dirty(&mut self, c: Consumer) -> PageSet {
        self.slots[c.index()]
            .as_mut()
            .map(|p| std::mem::take(&mut p.dirty))
            .unwrap_or_default()
    }

    /// A capture of `c` failed after it took `taken`: the changes are pending again, before
    /// any harvested since (disk writes keep their order).
    pub fn give_back(&mut self, c: Consumer, taken: Pending) {
        let limit = self.disk_limit;
        if let Some(p) = &mut self.slots[c.index()] {
            let newer = std::mem::replace(p, taken);
            p.append(&newer.dirty, newer.disk, limit);
        }
    }
}

/// Clears the device bitmap without reading it (after the VMM itself wrote guest memory, e.g.
/// when restoring pages).
pub fn reset_device_bitmap(mem: &GuestMem) {
    for r in mem.iter() {
        r.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_and_page_list() {
        let d = DirtyPages {
            kvm: PageSet::from_bitmap(&[0b101, 0]),
            device: PageSet::from_bitmap(&[0b010, 1]),
            pages: 128,
        };
        assert_eq!(d.union(), PageSet::from_bitmap(&[0b111, 1]));
        assert_eq!(d.page_list(), vec![0, 1, 2, 64]);
        assert!(d.kvm.contains(2));
        assert!(!d.kvm.contains(1));
    }

    use Consumer::{Replication, Snapshots};

    fn bitmap(pages: &[u64]) -> PageSet {
        PageSet::from_pages(pages)
    }

    fn writes(w: &[(u64, u8)]) -> DiskWrites {
        DiskWrites {
            writes: w.iter().map(|&(o, b)| (o, vec![b; 512])).collect(),
            bytes: 512 * w.len() as u64,
            overflowed: false,
        }
    }

    /// A tracker with both consumers active and clean.
    fn both() -> ChangeTracker {
        let mut t = ChangeTracker::new(1 << 20);
        t.start_clean(Replication);
        t.start_clean(Snapshots);
        t
    }

    #[test]
    fn a_harvest_taken_by_one_consumer_is_still_handed_to_the_other() {
        let mut t = both();
        // Replication's checkpoint harvests a page and a disk write; a snapshot's harvest
        // (the next pause) finds something else. Each consumer sees both.
        t.add(&bitmap(&[3]), Some(writes(&[(0, 1)])));
        let r = t.take(Replication);
        assert_eq!(r.page_list(128), vec![3]);
        assert_eq!(r.disk, writes(&[(0, 1)]));
        t.add(&bitmap(&[70]), Some(writes(&[(512, 2)])));
        let s = t.take(Snapshots);
        assert_eq!(
            s.page_list(128),
            vec![3, 70],
            "the snapshot got replication's page"
        );
        assert_eq!(
            s.disk,
            writes(&[(0, 1), (512, 2)]),
            "and its disk write, in order"
        );
        let r = t.take(Replication);
        assert_eq!(
            r.page_list(128),
            vec![70],
            "replication got the snapshot's page"
        );
        assert_eq!(r.disk, writes(&[(512, 2)]));
        // Taken: nothing pending any more.
        assert_eq!(t.take(Replication), Pending::default());
        assert_eq!(t.take(Snapshots), Pending::default());
    }

    #[test]
    fn an_idle_consumer_accumulates_nothing_and_its_first_take_knows_nothing() {
        let mut t = ChangeTracker::new(1 << 20);
        assert!(!t.any_active());
        t.add(&bitmap(&[1]), None);
        t.activate(Replication);
        assert!(t.is_active(Replication) && !t.is_active(Snapshots));
        t.add(&bitmap(&[2]), None);
        let r = t.take(Replication);
        assert_eq!(
            r.page_list(128),
            vec![2],
            "only what was harvested once active"
        );
        assert!(r.disk.overflowed, "the disk before activation is unknown");
        // From then on the record is complete; the idle snapshot chain holds nothing.
        t.add(&bitmap(&[5]), Some(writes(&[(0, 7)])));
        assert_eq!(t.take(Replication).disk, writes(&[(0, 7)]));
        let s = t.take(Snapshots);
        assert!(s.dirty.is_empty() && s.disk.overflowed);
        assert!(!t.is_active(Snapshots));
        // Activating an active consumer keeps what is pending.
        t.add(&bitmap(&[9]), Some(writes(&[(0, 8)])));
        t.activate(Replication);
        assert_eq!(t.take(Replication).page_list(128), vec![9]);
    }

    #[test]
    fn disk_writes_beyond_the_bound_or_unrecorded_make_that_consumer_copy_the_disk() {
        let mut t = ChangeTracker::new(1024);
        t.start_clean(Replication);
        t.start_clean(Snapshots);
        t.add(&PageSet::new(), Some(writes(&[(0, 1)])));
        assert_eq!(t.take(Replication).disk, writes(&[(0, 1)]));
        // The snapshot chain keeps accumulating: 3 × 512 bytes > 1024.
        t.add(&PageSet::new(), Some(writes(&[(0, 2), (512, 3)])));
        assert_eq!(t.take(Replication).disk, writes(&[(0, 2), (512, 3)]));
        let s = t.take(Snapshots);
        assert!(s.disk.overflowed && s.disk.writes.is_empty());
        // A device log that overflowed (or was not recording) reaches every consumer so.
        t.add(&PageSet::new(), Some(writes(&[(0, 4)])));
        t.add(
            &PageSet::new(),
            Some(DiskWrites {
                overflowed: true,
                ..Default::default()
            }),
        );
        t.add(&PageSet::new(), Some(writes(&[(0, 5)])));
        assert!(t.take(Replication).disk.overflowed);
        assert!(t.take(Snapshots).disk.overflowed);
        t.add(&PageSet::new(), None);
        assert!(t.take(Snapshots).disk.overflowed);
        assert_eq!(t.take(Snapshots).disk, DiskWrites::default());
    }

    #[test]
    fn a_failed_capture_gives_its_changes_back_before_newer_ones() {
        let mut t = both();
        t.add(&bitmap(&[1]), Some(writes(&[(0, 1)])));
        let taken = t.take(Snapshots);
        t.add(&bitmap(&[2]), Some(writes(&[(0, 2)])));
        t.give_back(Snapshots, taken);
        let s = t.take(Snapshots);
        assert_eq!(s.page_list(128), vec![1, 2]);
        assert_eq!(s.disk, writes(&[(0, 1), (0, 2)]), "older writes first");
        // A pre-copy pass takes the pages only; the disk writes wait for the final capture.
        t.add(&bitmap(&[4]), Some(writes(&[(0, 3)])));
        assert_eq!(t.take_dirty(Replication).pages(128), vec![1, 2, 4]);
        t.add(&bitmap(&[5]), Some(writes(&[(0, 4)])));
        let r = t.take(Replication);
        assert_eq!(r.page_list(128), vec![5]);
        assert_eq!(r.disk, writes(&[(0, 1), (0, 2), (0, 3), (0, 4)]));
    }

    /// A model of a VM's dirty sources under random writes, with hot pages: KVM's log (set by
    /// vCPU writes, cleared per `plan_clear`, so hot pages stay set), the device bitmap and the
    /// disk write log; harvests are triggered at random by either consumer (or by neither:
    /// `harvest_dirty`). Every take must cover every page written since that consumer's
    /// previous take, and hold exactly its disk writes, in order.
    #[test]
    fn every_consumer_sees_every_write_since_its_previous_take_hot_pages_included() {
        use std::collections::BTreeSet;
        const PAGES: u64 = 256;
        let words = (PAGES / 64) as usize;
        for seed in 1..=20u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut log = crate::dirty_log::KvmDirtyLog::manual_model();
            let (mut kvm, mut device) = (vec![0u64; words], vec![0u64; words]);
            let mut disk_log = DiskWrites::default();
            let mut t = ChangeTracker::new(u64::MAX);
            let consumers = [Replication, Snapshots];
            for c in consumers {
                t.start_clean(c);
            }
            let mut written: [BTreeSet<u64>; 2] = Default::default();
            let mut disk: [Vec<(u64, Vec<u8>)>; 2] = Default::default();
            let set = |b: &mut Vec<u64>, p: u64| b[(p / 64) as usize] |= 1 << (p % 64);
            for step in 0..3000u64 {
                match next() % 10 {
                    // The vCPU writes, mostly the same few pages (they become hot).
                    0..=4 => {
                        let p = match next() % 4 {
                            0 => next() % PAGES,
                            _ => next() % 8,
                        };
                        set(&mut kvm, p);
                        written.iter_mut().for_each(|w| {
                            w.insert(p);
                        });
                    }
                    5 => {
                        let p = next() % PAGES;
                        set(&mut device, p);
                        written.iter_mut().for_each(|w| {
                            w.insert(p);
                        });
                    }
                    6 => {
                        let w = (next() % 64 * 512, vec![step as u8; 512]);
                        disk_log.writes.push(w.clone());
                        disk_log.bytes += 512;
                        disk.iter_mut().for_each(|d| d.push(w.clone()));
                    }
                    _ => {
                        // A harvest: KVM reports its log and clears all but the hot pages.
                        let reported = kvm.clone();
                        let clear = log.plan_clear_bits(&reported, PAGES);
                        for (k, c) in kvm.iter_mut().zip(&clear) {
                            *k &= !c;
                        }
                        let h = DirtyPages {
                            kvm: PageSet::from_bitmap(&reported),
                            device: PageSet::from_bitmap(&std::mem::replace(
                                &mut device,
                                vec![0; words],
                            )),
                            pages: PAGES,
                        };
                        t.add(&h.union(), Some(std::mem::take(&mut disk_log)));
                        let who = next() % 3;
                        let Some(&c) = consumers.get(who as usize) else {
                            continue;
                        };
                        let got = t.take(c);
                        let got_pages: BTreeSet<u64> = got.page_list(PAGES).into_iter().collect();
                        let i = c.index();
                        let missed: Vec<_> = written[i].difference(&got_pages).collect();
                        assert!(
                            missed.is_empty(),
                            "seed {seed} step {step}: {c:?} missed pages {missed:?}"
                        );
                        assert_eq!(got.disk.writes, disk[i], "seed {seed} step {step}: {c:?}");
                        assert!(!got.disk.overflowed);
                        written[i].clear();
                        disk[i].clear();
                    }
                }
            }
        }
    }
}
