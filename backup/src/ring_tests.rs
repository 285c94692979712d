//! The journal ring and the write-back under seeded random streams, killed at every kind of
//! moment: between two checkpoints with writes waiting, between a journal record and the
//! write in place, in the middle of a record (torn), in the middle of a flush (some pages
//! written, some torn, some not; a part of the disk writes). After each kill the image is recovered and compared byte for byte with
//! a model of what was acknowledged; then the stream goes on from the recovered image.
//! `VMATRIX_RING_SEEDS=n` runs n seeds; `VMATRIX_RING_SEED=s` replays one.

use std::os::unix::fs::FileExt;
use std::path::Path;

use protocol::page::{self, EncodeOptions, PageData, PAGE};
use protocol::{Checkpoint, Kind};
use vmm::snapshot::{self, format};

use crate::image::{self, Origin};
use crate::journal::{self, Journal};
use crate::lock::ImageLock;
use crate::replica::Replica;

const PAGES: u64 = 256;
const MEM: u64 = PAGES * PAGE as u64;
const DISK: u64 = 64 << 10;
const O: Origin = Origin {
    history: 0x71,
    term: 3,
};

use crate::tests::Rng;

/// What the acknowledged checkpoints made of memory and disk.
#[derive(Clone)]
struct Model {
    mem: Vec<u8>,
    disk: Vec<u8>,
}

impl Model {
    fn page(&self, gfn: u64) -> &[u8] {
        &self.mem[gfn as usize * PAGE..(gfn as usize + 1) * PAGE]
    }

    fn apply(&mut self, cp: &Checkpoint) {
        for (gfn, p) in &cp.pages {
            let new = page::decode(*gfn, p, Some(self.page(*gfn))).unwrap();
            self.mem[*gfn as usize * PAGE..(*gfn as usize + 1) * PAGE].copy_from_slice(&new);
        }
        for (off, d) in &cp.disk {
            self.disk[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
    }

    fn check(&self, dir: &Path, what: &str) {
        let mem = std::fs::read(dir.join(snapshot::MEMORY_FILE)).unwrap();
        let at = mem.iter().zip(&self.mem).position(|(a, b)| a != b);
        assert!(at.is_none(), "{what}: memory.bin differs at byte {at:?}");
        let disk = std::fs::read(dir.join(snapshot::DISK_FILE)).unwrap();
        assert!(disk == self.disk, "{what}: disk.img differs");
    }

    fn files_equal(&self, dir: &Path) -> bool {
        std::fs::read(dir.join(snapshot::MEMORY_FILE)).unwrap() == self.mem
    }
}

/// The next checkpoint after `seq`: mostly a few hot pages (encoded against the model, as a
/// primary encodes against what the backup holds), sometimes a big one (written through),
/// sometimes a resync that jumps seqs.
fn next_cp(rng: &mut Rng, m: &Model, seq: u64) -> Checkpoint {
    let big = rng.chance(4);
    let n = match big {
        true => 65 + rng.below(60),
        false => 1 + rng.below(12),
    };
    let mut gfns: Vec<u64> = (0..n)
        .map(|_| match rng.chance(60) {
            true => rng.below(24),
            false => rng.below(PAGES),
        })
        .collect();
    gfns.sort_unstable();
    gfns.dedup();
    let pages = gfns
        .into_iter()
        .map(|g| {
            let mut new = m.page(g).to_vec();
            match rng.below(8) {
                0 => new.fill(0),
                1 => new.fill(rng.next() as u8),
                _ => {
                    for _ in 0..1 + rng.below(6) {
                        let at = rng.below(PAGE as u64) as usize;
                        new[at] = rng.next() as u8;
                    }
                }
            }
            let opts = EncodeOptions {
                xor: true,
                lz4: rng.chance(30),
            };
            (g, page::encode(&new, Some(m.page(g)), opts))
        })
        .collect();
    let disk = match rng.chance(40) {
        true => (0..1 + rng.below(3))
            .map(|_| {
                let len = 1 + rng.below(6000);
                let off = rng.below(DISK - len);
                (off, vec![rng.next() as u8; len as usize])
            })
            .collect(),
        false => Vec::new(),
    };
    let (epoch, kind) = match rng.chance(10) {
        true => (seq + 2 + rng.below(20), Kind::Resync { from: seq }),
        false => (seq + 1, Kind::Incremental),
    };
    Checkpoint {
        epoch,
        kind,
        mem_size: MEM,
        pages,
        disk,
        state: Some((format::FORMAT_VERSION, crate::tests::state(DISK))),
    }
}

/// A replica in `dir` after a full sync (checkpoint 1, random pages); its model and the sync.
fn synced(dir: &Path, rng: &mut Rng) -> (Replica, Model, Checkpoint) {
    let mut m = Model {
        mem: vec![0; MEM as usize],
        disk: vec![0; DISK as usize],
    };
    let mut r = open(dir);
    let mut sync = next_cp(rng, &m, 0);
    (sync.epoch, sync.kind) = (1, Kind::Sync);
    assert!(r.begin(&sync, O, true).unwrap().is_none());
    m.apply(&sync);
    (r, m, sync)
}

fn open(dir: &Path) -> Replica {
    Replica::open(ImageLock::acquire(dir).unwrap()).unwrap()
}

/// The slot file holding the record of checkpoint `seq`.
fn slot_of(dir: &Path, seq: u64) -> std::path::PathBuf {
    (0..journal::SLOTS)
        .map(|s| journal::slot_path(dir, s))
        .find(|p| {
            std::fs::read(p)
                .ok()
                .and_then(|b| Journal::decode(&b).ok())
                .is_some_and(|j| j.seq == seq)
        })
        .expect("the staged checkpoint's record")
}

/// How the backup process dies.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Between two checkpoints (writes waiting in the write-back).
    Idle,
    /// After a checkpoint's journal record (acknowledged), before its write in place.
    Staged,
    /// In the middle of writing a record (never acknowledged).
    Torn,
    /// In the middle of a flush: some waiting pages in the files (some of them torn), some
    /// not, and a part of the disk's writes.
    MidFlush,
}

fn run(seed: u64) -> [u32; 4] {
    eprintln!("ring seed {seed} (VMATRIX_RING_SEED={seed} replays it)");
    let mut rng = Rng(seed | 1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, mut m, _) = synced(dir, &mut rng);
    let (mut seq, mut kills, mut lagged) = (1, [0u32; 4], false);
    for step in 0..400 {
        let cp = next_cp(&mut rng, &m, seq);
        let kill = match rng.below(100) {
            0..=1 => Some(Kill::Idle),
            2..=3 => Some(Kill::Staged),
            4..=5 => Some(Kill::Torn),
            6..=7 => Some(Kill::MidFlush),
            _ => None,
        };
        let what = format!("seed {seed} step {step} checkpoint {} {kill:?}", cp.epoch);
        let staged = r.begin(&cp, O, false).unwrap().unwrap();
        match kill {
            Some(Kill::Torn) => {
                drop(staged);
                let p = slot_of(dir, cp.epoch);
                // (Within the record: the file may be longer, from an older record.)
                let b = std::fs::read(&p).unwrap();
                let len = Journal::decode(&b).unwrap().encode().unwrap().len() as u64;
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(rng.below(len)).unwrap();
            }
            Some(Kill::Staged) => {
                drop(staged);
                m.apply(&cp);
                seq = cp.epoch;
            }
            _ => {
                r.complete(staged).unwrap();
                m.apply(&cp);
                seq = cp.epoch;
            }
        }
        lagged |= !m.files_equal(dir);
        if let Some(Kill::MidFlush) = kill {
            // What a flush cut short leaves: the newest version of some pages.
            let mem = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(snapshot::MEMORY_FILE))
                .unwrap();
            for gfn in 0..PAGES {
                if rng.chance(50) {
                    // Some pages whole, some torn: a part of the new version written.
                    let (from, to) = match rng.chance(50) {
                        true => (0, PAGE),
                        false => {
                            let a = rng.below(PAGE as u64) as usize;
                            (a, a + rng.below((PAGE - a) as u64) as usize + 1)
                        }
                    };
                    let at = gfn * PAGE as u64 + from as u64;
                    mem.write_all_at(&m.page(gfn)[from..to], at).unwrap();
                }
            }
            // And a part of the disk's newest contents.
            let disk = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(snapshot::DISK_FILE))
                .unwrap();
            let a = rng.below(DISK) as usize;
            let b = a + rng.below(DISK - a as u64) as usize;
            disk.write_all_at(&m.disk[a..b], a as u64).unwrap();
        }
        if let Some(k) = kill {
            kills[k as usize] += 1;
            drop(r);
            // (None: replica.bin records it already, nothing to redo.)
            let redone = image::recover(dir).unwrap();
            assert!(redone.is_none_or(|s| s == seq), "{what}: {redone:?}");
            assert_eq!(image::read_meta(dir).unwrap().seq, seq, "{what}");
            m.check(dir, &what);
            r = open(dir);
        } else if rng.chance(3) {
            r.flush().unwrap();
            m.check(dir, &format!("{what}, flushed"));
        }
    }
    assert!(
        lagged,
        "seed {seed}: the files never lagged (no write-back)"
    );
    assert_eq!(r.finalize().unwrap(), Some(seq));
    m.check(dir, &format!("seed {seed} finalized"));
    kills
}

#[test]
fn a_backup_killed_at_any_moment_of_the_ring_recovers_every_acknowledged_checkpoint() {
    let seeds: Vec<u64> = match std::env::var("VMATRIX_RING_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n: u64 = std::env::var("VMATRIX_RING_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(12);
            (1..=n)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .collect()
        }
    };
    let mut kills = [0u32; 4];
    for seed in seeds {
        for (k, n) in kills.iter_mut().zip(run(seed)) {
            *k += n;
        }
    }
    eprintln!("kills (idle, staged, torn, mid-flush): {kills:?}");
    assert!(kills.iter().all(|&k| k > 0), "every kind of kill ran");
}

#[test]
fn big_checkpoints_are_written_through_and_small_ones_wait_a_ring() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut rng = Rng(5);
    let (mut r, mut m, sync) = synced(dir, &mut rng);
    let small = |seq: u64, fill: u8| Checkpoint {
        epoch: seq,
        kind: Kind::Incremental,
        mem_size: MEM,
        pages: vec![(3, PageData::Raw(vec![fill; PAGE]))],
        disk: vec![],
        state: sync.state.clone(),
    };
    // A ring's worth of small checkpoints wait; the last of the ring flushes them all.
    for seq in 2..2 + journal::SLOTS as u64 {
        let c = small(seq, seq as u8);
        let s = r.begin(&c, O, false).unwrap().unwrap();
        r.complete(s).unwrap();
        m.apply(&c);
        let last = seq == 1 + journal::SLOTS as u64;
        assert_eq!(m.files_equal(dir), last, "checkpoint {seq}");
    }
    // A big one flushes what waits and is written through.
    let c = small(2 + journal::SLOTS as u64, 0xaa);
    let s = r.begin(&c, O, false).unwrap().unwrap();
    r.complete(s).unwrap();
    m.apply(&c);
    assert!(!m.files_equal(dir));
    let mut big = small(3 + journal::SLOTS as u64, 0);
    big.pages = (10..90)
        .map(|g| (g, PageData::Raw(vec![g as u8; PAGE])))
        .collect();
    let s = r.begin(&big, O, false).unwrap().unwrap();
    r.complete(s).unwrap();
    m.apply(&big);
    m.check(dir, "after a big checkpoint");
}
