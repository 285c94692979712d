//! The simulated guest of `policy_sim.rs`: memory and a disk written at random, what changed
//! since the last capture, output epochs, early epoch copies; and the simulation's seeded
//! random numbers.

use std::collections::BTreeSet;
use std::time::Duration;

use primary::policy::Slice;
use protocol::page::PAGE;
use vmm::{CaptureKind, Changes, DiskCapture, EpochCapture};

pub const PAGES: usize = 64;
pub const DISK: usize = 128 << 10;
pub const STEP: Duration = Duration::from_micros(250);

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The simulated guest: memory, disk, what changed since the last capture, output epochs.
pub struct Guest {
    pub mem: Vec<u8>,
    pub disk: Vec<u8>,
    pub dirty: BTreeSet<u64>,
    pub writes: Vec<(u64, Vec<u8>)>,
    pub out_epoch: u64,
    /// Pages copied early in this epoch (`Vm::precopy_epoch`): their contents then.
    pub pre: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Guest {
    pub fn run(&mut self, rng: &mut Rng) {
        for _ in 0..rng.below(3) {
            let g = rng.below(PAGES as u64);
            let off = g as usize * PAGE + rng.below(PAGE as u64) as usize;
            // Now and then a page becomes all zero again.
            if rng.chance(20) {
                self.mem[g as usize * PAGE..(g as usize + 1) * PAGE].fill(0);
            } else {
                self.mem[off] = rng.next() as u8;
            }
            self.dirty.insert(g);
        }
        // Now and then a whole 64 KiB block is zeroed (as a discard would).
        if rng.chance(3) {
            let off = rng.below((DISK / (64 << 10)) as u64) * (64 << 10);
            let zero = vec![0u8; 64 << 10];
            self.disk[off as usize..off as usize + zero.len()].copy_from_slice(&zero);
            self.writes.push((off, zero));
        }
        if rng.chance(100) {
            let off = rng.below((DISK / 512) as u64) * 512;
            let data = if rng.chance(200) {
                vec![0; 512]
            } else {
                vec![rng.next() as u8; 512]
            };
            self.disk[off as usize..off as usize + 512].copy_from_slice(&data);
            self.writes.push((off, data));
        }
    }

    /// `Vm::precopy_epoch`: the pages dirtied so far are copied and clean again.
    pub fn precopy_epoch(&mut self) {
        for g in std::mem::take(&mut self.dirty) {
            let page = self.mem[g as usize * PAGE..(g as usize + 1) * PAGE].to_vec();
            self.pre.insert(g, page);
        }
    }

    /// Puts the early copy and a capture's pages together as `Vm::merge_epoch_pre` does: the
    /// capture's copy where a page is in both (a page written after its early copy is dirty
    /// again, so the early copy of a page not dirty again is its current content).
    pub fn merge_pre(&mut self, kind: CaptureKind, cap: &mut EpochCapture) {
        let pre = std::mem::take(&mut self.pre);
        if kind == CaptureKind::Full {
            if let Some(ch) = &mut cap.changes {
                ch.dirty.extend(pre.keys());
                ch.dirty.sort_unstable();
                ch.dirty.dedup();
            }
            return;
        }
        let mut all: std::collections::BTreeMap<u64, Vec<u8>> = pre;
        for (i, &g) in cap.pages.iter().enumerate() {
            all.insert(g, cap.data[i * PAGE..(i + 1) * PAGE].to_vec());
        }
        for (g, page) in &all {
            let now = &self.mem[*g as usize * PAGE..(*g as usize + 1) * PAGE];
            assert_eq!(
                now,
                &page[..],
                "an early copy of page {g} went stale undetected"
            );
        }
        cap.pages = all.keys().copied().collect();
        cap.data = all.into_values().flatten().collect();
    }

    pub fn copy(&self, pages: &[u64]) -> Vec<u8> {
        let mut data = Vec::with_capacity(pages.len() * PAGE);
        for &g in pages {
            data.extend_from_slice(&self.mem[g as usize * PAGE..(g as usize + 1) * PAGE]);
        }
        data
    }

    pub fn nonzero(&self) -> Vec<u64> {
        (0..PAGES as u64)
            .filter(|&g| {
                self.mem[g as usize * PAGE..(g as usize + 1) * PAGE]
                    .iter()
                    .any(|&b| b != 0)
            })
            .collect()
    }

    /// A capture; `overflowed`: the disk write log overflowed since the previous one, so the
    /// capture carries the whole disk (blocks the guest zeroed must reach the backup too).
    pub fn capture(
        &mut self,
        kind: CaptureKind,
        ranges: &[(u64, u64)],
        overflowed: bool,
    ) -> EpochCapture {
        let dirty: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        let writes = std::mem::take(&mut self.writes);
        let (pages, disk, changes) = match kind {
            CaptureKind::Incremental if overflowed => {
                (dirty, DiskCapture::Full(self.disk.clone()), None)
            }
            CaptureKind::Incremental => (dirty, DiskCapture::Writes(writes), None),
            CaptureKind::Full => (
                self.nonzero(),
                DiskCapture::Full(self.disk.clone()),
                Some(Changes {
                    dirty,
                    disk: DiskCapture::Writes(writes),
                }),
            ),
        };
        let extra_disk = ranges
            .iter()
            .filter_map(|&(o, l)| {
                let end = o.saturating_add(l).min(DISK as u64);
                (o < end).then(|| (o, self.disk[o as usize..end as usize].to_vec()))
            })
            .collect();
        let epoch = self.out_epoch;
        self.out_epoch += 1;
        let mut cap = EpochCapture {
            epoch,
            pause: Duration::from_micros(100),
            data: self.copy(&pages),
            pages,
            disk,
            state: epoch.to_le_bytes().to_vec(),
            mem_size: (PAGES * PAGE) as u64,
            changes,
            extra_disk,
        };
        self.merge_pre(kind, &mut cap);
        cap
    }

    /// A pre-copy pass: a slice of round 0 (the first restarts tracking), or a later round.
    pub fn precopy(&mut self, slice: Option<Slice>) -> EpochCapture {
        let (pages, disk, changes): (Vec<u64>, _, _) = match slice {
            Some(s) => {
                let changes = match s.first {
                    true => {
                        let mut dirty = std::mem::take(&mut self.dirty);
                        dirty.extend(std::mem::take(&mut self.pre).into_keys());
                        Some(Changes {
                            dirty: dirty.into_iter().collect(),
                            disk: DiskCapture::Writes(std::mem::take(&mut self.writes)),
                        })
                    }
                    false => None,
                };
                let pages = self
                    .nonzero()
                    .into_iter()
                    .filter(|g| s.pages.contains(g))
                    .collect();
                let (a, b) = (s.disk.start.min(DISK as u64), s.disk.end.min(DISK as u64));
                let chunk = self.disk[a as usize..b as usize].to_vec();
                let disk = match chunk.iter().any(|&x| x != 0) {
                    true => vec![(a, chunk)],
                    false => Vec::new(),
                };
                (pages, DiskCapture::Writes(disk), changes)
            }
            // Disk writes stay recorded for the final capture.
            None => {
                let dirty: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
                (dirty, DiskCapture::Writes(Vec::new()), None)
            }
        };
        EpochCapture {
            epoch: 0,
            pause: Duration::ZERO,
            data: self.copy(&pages),
            pages,
            disk,
            state: Vec::new(),
            mem_size: (PAGES * PAGE) as u64,
            changes,
            extra_disk: Vec::new(),
        }
    }

    pub fn crc(&self) -> u32 {
        image_crc(&self.mem, &self.disk)
    }
}

pub fn image_crc(mem: &[u8], disk: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(mem);
    h.update(disk);
    h.finalize()
}
