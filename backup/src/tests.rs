//! The backup's images on real files in a temporary directory: a full sync never destroys the
//! committed image (a crash before its end, or in the middle of its promotion, leaves a
//! consistent image), quick resyncs apply only on top of the checkpoint they were computed
//! against, journal records go round the ring with jumping seqs, and the directory lock has one
//! holder.

use std::path::Path;

use protocol::message::Position;
use protocol::page::{PageData, PAGE};
use protocol::{Checkpoint, Kind};
use vmm::snapshot::{self, format, VmState};

use crate::image::{self, Origin, ReplicaImage, REPLICA_FILE};
use crate::journal::{self, Journal};
use crate::lock::ImageLock;
use crate::promote::{self, INCOMING};
use crate::replica::{Failure, Replica};
use crate::BackupError;

const MEM: u64 = 32 * PAGE as u64;
const DISK: u64 = 64 << 10;
const A: Origin = Origin {
    history: 0xa,
    term: 1,
};
const B: Origin = Origin {
    history: 0xb,
    term: 1,
};
const C: Origin = Origin {
    history: 0xc,
    term: 2,
};

/// A small seeded generator (xorshift), so a failing seed replays.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A `VmState` (all zero, with a disk of `disk` bytes), postcard-encoded.
pub(crate) fn state(disk: u64) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 16];
    let mut vm: VmState = postcard::from_bytes(&zeros).unwrap();
    if disk > 0 {
        let mut blk: vmm::devices::virtio::persist::TransportPersist<
            vmm::devices::virtio::blk::BlkPersist,
        > = postcard::from_bytes(&zeros).unwrap();
        blk.device.sectors = disk / vmm::devices::virtio::blk::SECTOR_SIZE;
        vm.blk = Some(blk);
    }
    postcard::to_stdvec(&vm).unwrap()
}

/// Guest memory and disk as a checkpoint stream leaves them.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Model {
    pub(crate) mem: Vec<u8>,
    pub(crate) disk: Vec<u8>,
}

impl Model {
    fn new() -> Model {
        Model::sized(MEM, DISK)
    }

    /// All zeros, `mem` bytes of RAM and `disk` of disk.
    pub(crate) fn sized(mem: u64, disk: u64) -> Model {
        Model {
            mem: vec![0; mem as usize],
            disk: vec![0; disk as usize],
        }
    }

    pub(crate) fn apply(&mut self, cp: &Checkpoint) {
        for (gfn, p) in &cp.pages {
            let page = protocol::page::decode(*gfn, p, None).unwrap();
            let at = *gfn as usize * PAGE;
            self.mem[at..at + PAGE].copy_from_slice(&page);
        }
        for (off, d) in &cp.disk {
            self.disk[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
    }

    /// The model equals the image files in `dir`.
    fn check(&self, dir: &Path) {
        let mem = std::fs::read(dir.join(snapshot::MEMORY_FILE)).unwrap();
        assert!(mem == self.mem, "memory.bin of {} differs", dir.display());
        let disk = std::fs::read(dir.join(snapshot::DISK_FILE)).unwrap();
        assert!(disk == self.disk, "disk.img of {} differs", dir.display());
    }
}

/// A checkpoint writing byte `fill` into `pages`, `disk` and with state if `with_state`.
fn cp(seq: u64, kind: Kind, fill: u8, pages: &[u64], disk: &[(u64, usize)]) -> Checkpoint {
    let with_state = !matches!(kind, Kind::PreCopy);
    Checkpoint {
        epoch: seq,
        kind,
        mem_size: MEM,
        pages: pages
            .iter()
            .map(|&g| (g, PageData::Raw(vec![fill ^ g as u8; PAGE])))
            .collect(),
        disk: disk
            .iter()
            .map(|&(off, len)| (off, vec![fill; len]))
            .collect(),
        state: with_state.then(|| (format::FORMAT_VERSION, state(DISK))),
    }
}

fn begin(r: &mut Replica, c: &Checkpoint, origin: Origin, opens: bool) {
    if let Some(s) = r.begin(c, origin, opens).unwrap() {
        r.complete(s).unwrap();
    }
}

fn open(dir: &Path) -> Replica {
    Replica::open(ImageLock::acquire(dir).unwrap()).unwrap()
}

/// A replica in `dir` committed at checkpoint 11 of history A (a full sync at 10, an
/// incremental checkpoint); its model.
fn committed_at_11(dir: &Path) -> (Replica, Model) {
    let mut r = open(dir);
    let mut m = Model::new();
    let sync = cp(
        10,
        Kind::Sync,
        0x11,
        &[0, 1, 2, 5, 31],
        &[(0, 4096), (8192, 512)],
    );
    begin(&mut r, &sync, A, true);
    m.apply(&sync);
    let inc = cp(11, Kind::Incremental, 0x22, &[2, 3], &[(512, 512)]);
    begin(&mut r, &inc, A, false);
    m.apply(&inc);
    assert_eq!(r.position(), Some(pos(A, 11)));
    (r, m)
}

fn pos(o: Origin, seq: u64) -> Position {
    Position {
        history: o.history,
        term: o.term,
        seq,
    }
}

fn meta_position(dir: &Path) -> Option<Position> {
    image::read_meta(dir).unwrap().position()
}

#[test]
fn a_crash_during_a_full_sync_keeps_the_committed_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, m) = committed_at_11(dir);
    // A new primary (history B) starts a pre-copy sync: round 0 and round 1, no state yet.
    begin(
        &mut r,
        &cp(0, Kind::PreCopy, 0x33, &[0, 1, 2, 3, 4], &[(0, 65536)]),
        B,
        true,
    );
    begin(
        &mut r,
        &cp(1, Kind::PreCopy, 0x44, &[4, 7], &[(4096, 512)]),
        B,
        false,
    );
    assert!(r.syncing());
    assert!(dir.join(INCOMING).join(snapshot::MEMORY_FILE).exists());
    r.flush().unwrap();
    m.check(dir);
    // The process dies.
    drop(r);
    assert_eq!(image::recover(dir).unwrap(), Some(11));
    assert!(
        !dir.join(INCOMING).exists(),
        "the abandoned sync is removed"
    );
    assert_eq!(image::finalize(dir).unwrap(), 11);
    m.check(dir);
    assert_eq!(meta_position(dir), Some(pos(A, 11)));
    assert!(dir.join(snapshot::META_FILE).exists());
    // A backup started on it again reports it.
    assert_eq!(open(dir).position(), Some(pos(A, 11)));
}

#[test]
fn a_session_that_ends_mid_sync_leaves_the_committed_image_open() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, mut m) = committed_at_11(dir);
    begin(&mut r, &cp(0, Kind::PreCopy, 0x33, &[0, 1], &[]), B, true);
    r.end_session().unwrap();
    assert!(!r.syncing() && !dir.join(INCOMING).exists());
    // The next session (the same primary A, reconnected) resyncs the committed image.
    let rs = cp(15, Kind::Resync { from: 11 }, 0x55, &[9], &[]);
    begin(&mut r, &rs, A, true);
    m.apply(&rs);
    assert_eq!(r.position(), Some(pos(A, 15)));
    assert_eq!(r.finalize().unwrap(), Some(15));
    m.check(dir);
}

/// The new image of history B at seq 2 after pre-copy rounds 0 and 1, on top of a committed
/// image of history A at 11: the side image, complete but not promoted (applied by hand), the
/// new model and the committed one.
fn side_complete(dir: &Path) -> (ReplicaImage, Model, Model) {
    let (r, old) = committed_at_11(dir);
    drop(r);
    let mut m = Model::new();
    let r0 = cp(0, Kind::PreCopy, 0x33, &[0, 1, 2, 3, 4], &[(0, 65536)]);
    let mut side = ReplicaImage::create(dir, B, &r0).unwrap();
    m.apply(&r0);
    for c in [
        cp(1, Kind::PreCopy, 0x44, &[4, 7], &[(4096, 512)]),
        cp(2, Kind::Incremental, 0x66, &[1, 30], &[(60000, 100)]),
    ] {
        side.apply(&c, B).unwrap();
        m.apply(&c);
    }
    assert!(!side.syncing());
    (side, m, old)
}

#[test]
fn a_completed_full_sync_replaces_the_committed_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, _) = committed_at_11(dir);
    let mut m = Model::new();
    for (c, opens) in [
        (
            cp(0, Kind::PreCopy, 0x33, &[0, 1, 2, 3, 4], &[(0, 65536)]),
            true,
        ),
        (cp(1, Kind::PreCopy, 0x44, &[4, 7], &[(4096, 512)]), false),
    ] {
        begin(&mut r, &c, B, opens);
        m.apply(&c);
        assert_eq!(r.position(), Some(pos(A, 11)), "not promoted while syncing");
    }
    // The checkpoint with state ends the sync: promoted before begin returns (and the ack).
    let last = cp(2, Kind::Incremental, 0x66, &[1, 30], &[(60000, 100)]);
    assert!(r.begin(&last, B, false).unwrap().is_none());
    m.apply(&last);
    assert_eq!(r.position(), Some(pos(B, 2)));
    assert_eq!(meta_position(dir), Some(pos(B, 2)));
    assert!(!dir.join(INCOMING).exists() && !r.syncing());
    m.check(dir);
    // It goes on as the committed image: journaled incremental checkpoints.
    let next = cp(3, Kind::Incremental, 0x77, &[5], &[]);
    begin(&mut r, &next, B, false);
    m.apply(&next);
    assert!(journal::slot_path(dir, 0).exists());
    drop(r);
    assert_eq!(image::finalize(dir).unwrap(), 3);
    m.check(dir);
}

#[test]
fn an_interrupted_promotion_is_finished_by_recovery() {
    // The install step, one file at a time; the process dies after `done` of them.
    let steps: [fn(&Path); 4] = [
        |dir| journal::remove(dir).unwrap(),
        |dir| rename(dir, snapshot::MEMORY_FILE),
        |dir| rename(dir, snapshot::DISK_FILE),
        |dir| rename(dir, REPLICA_FILE),
    ];
    fn rename(dir: &Path, f: &str) {
        std::fs::rename(dir.join(INCOMING).join(f), dir.join(f)).unwrap();
    }
    for done in 0..=steps.len() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let (side, m, _) = side_complete(dir);
        // The commit point: files durable, incoming/replica.bin written.
        side.sync_files().unwrap();
        side.save_meta().unwrap();
        drop(side);
        for s in &steps[..done] {
            s(dir);
        }
        image::recover(dir).unwrap();
        assert!(!dir.join(INCOMING).exists(), "after {done} steps");
        assert_eq!(meta_position(dir), Some(pos(B, 2)), "after {done} steps");
        m.check(dir);
        assert!(!journal::slot_path(dir, 0).exists());
        assert_eq!(image::finalize(dir).unwrap(), 2);
    }
}

#[test]
fn a_side_image_without_its_commit_point_is_abandoned() {
    // The process died before incoming/replica.bin was written (or it is damaged).
    for damaged in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let (side, _, old) = side_complete(dir);
        side.sync_files().unwrap();
        drop(side);
        if damaged {
            std::fs::write(dir.join(INCOMING).join(REPLICA_FILE), b"VMXSNAP\0 torn").unwrap();
        }
        image::recover(dir).unwrap();
        assert!(!dir.join(INCOMING).exists());
        assert_eq!(meta_position(dir), Some(pos(A, 11)));
        assert_eq!(image::finalize(dir).unwrap(), 11);
        old.check(dir);
    }
}

#[test]
fn a_resync_applies_only_on_top_of_the_checkpoint_it_was_computed_from() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, mut m) = committed_at_11(dir);
    let wrong = [
        (
            cp(20, Kind::Resync { from: 10 }, 0x99, &[6], &[]),
            A,
            "an older from",
        ),
        (
            cp(20, Kind::Resync { from: 12 }, 0x99, &[6], &[]),
            A,
            "a newer from",
        ),
        (
            cp(20, Kind::Resync { from: 11 }, 0x99, &[6], &[]),
            B,
            "another history",
        ),
        (
            cp(20, Kind::Resync { from: 11 }, 0x99, &[6], &[]),
            C,
            "another term",
        ),
        (
            cp(11, Kind::Resync { from: 11 }, 0x99, &[6], &[]),
            A,
            "no step forward",
        ),
        (cp(13, Kind::Incremental, 0x99, &[6], &[]), A, "a gap"),
        (
            cp(12, Kind::Incremental, 0x99, &[6], &[]),
            B,
            "another history",
        ),
    ];
    for (c, origin, why) in &wrong {
        match r.begin(c, *origin, false) {
            Err(Failure::Refused(BackupError::Apply(_))) => {}
            Err(e) => panic!("{why}: {e}"),
            Ok(_) => panic!("{why}: applied"),
        }
        assert_eq!(r.position(), Some(pos(A, 11)), "{why}");
        r.flush().unwrap();
        m.check(dir);
    }
    // The right one: from 11 to 20, with a disk chunk of zeros over written data.
    let rs = cp(20, Kind::Resync { from: 11 }, 0x99, &[6, 2], &[(0, 8192)]);
    let rs = Checkpoint {
        disk: vec![(0, vec![0; 8192]), (16384, vec![7; 512])],
        ..rs
    };
    begin(&mut r, &rs, A, true);
    m.apply(&rs);
    assert!(m.disk[..8192].iter().all(|&b| b == 0));
    assert_eq!(r.position(), Some(pos(A, 20)));
    r.flush().unwrap();
    m.check(dir);
    let inc = cp(21, Kind::Incremental, 0xab, &[8], &[(100, 10)]);
    begin(&mut r, &inc, A, false);
    m.apply(&inc);
    // The process dies: replica.bin still says 10 (the promotion); the journal brings it to 21.
    drop(r);
    assert_eq!(meta_position(dir), Some(pos(A, 10)));
    assert_eq!(image::recover(dir).unwrap(), Some(21));
    assert_eq!(meta_position(dir), Some(pos(A, 21)));
    m.check(dir);
}

/// Truncates a journal slot to half its length (a write torn by the process dying).
fn tear(dir: &Path, slot: usize) {
    let p = journal::slot_path(dir, slot);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

fn slot_seq(dir: &Path, slot: usize) -> u64 {
    Journal::decode(&std::fs::read(journal::slot_path(dir, slot)).unwrap())
        .unwrap()
        .seq
}

#[test]
fn journal_records_go_round_the_ring_and_a_torn_one_leaves_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut r = open(dir);
    let mut m = Model::new();
    let sync = cp(40, Kind::Sync, 0x11, &[0, 1, 2], &[(0, 4096)]);
    begin(&mut r, &sync, A, true);
    m.apply(&sync);
    let inc = cp(41, Kind::Incremental, 0x22, &[1, 3], &[(4096, 512)]);
    begin(&mut r, &inc, A, false);
    m.apply(&inc);
    assert_eq!(slot_seq(dir, 0), 41);
    // A resync 41 → 43 (by seq parity it would overwrite 41's slot): it goes into the next
    // slot; the process dies in the middle of writing it.
    let rs = cp(43, Kind::Resync { from: 41 }, 0x33, &[1, 4], &[(4096, 512)]);
    let staged = r.begin(&rs, A, false).unwrap().unwrap();
    assert_eq!(slot_seq(dir, 1), 43);
    assert_eq!(slot_seq(dir, 0), 41);
    drop(staged);
    tear(dir, 1);
    drop(r);
    assert_eq!(
        image::recover(dir).unwrap(),
        Some(41),
        "41 redone, not lost"
    );
    assert_eq!(meta_position(dir), Some(pos(A, 41)));
    m.check(dir);

    // Seqs jump on: 41 → 57 → 58 → 60, each into the next slot (the ring starts over with a
    // recovered image), none written in place yet.
    let mut r = open(dir);
    assert_eq!(r.position(), Some(pos(A, 41)));
    let steps = [
        (
            cp(57, Kind::Resync { from: 41 }, 0x44, &[5], &[(0, 100)]),
            0,
        ),
        (cp(58, Kind::Incremental, 0x55, &[6, 1], &[]), 1),
        (
            cp(60, Kind::Resync { from: 58 }, 0x66, &[7, 5], &[(0, 50)]),
            2,
        ),
    ];
    for (c, slot) in &steps {
        begin(&mut r, c, A, false);
        m.apply(c);
        assert_eq!(slot_seq(dir, *slot), c.epoch);
    }
    // 61 is torn in slot 3: recovery redoes 57, 58 and 60, in order (60 rewrites 57's page 5
    // and disk bytes).
    let inc = cp(61, Kind::Incremental, 0x77, &[1, 2, 3], &[(0, 4096)]);
    drop(r.begin(&inc, A, false).unwrap());
    tear(dir, 3);
    drop(r);
    assert_eq!(image::recover(dir).unwrap(), Some(60));
    m.check(dir);
    assert_eq!(image::finalize(dir).unwrap(), 60);
}

#[test]
fn recovery_ignores_a_journal_of_another_history() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (r, m) = committed_at_11(dir);
    drop(r);
    // replica.bin says 10 (written at the promotion); slot 0 holds 11 of history A.
    assert_eq!(meta_position(dir), Some(pos(A, 10)));
    let mut meta = image::read_meta(dir).unwrap();
    meta.history = B.history;
    meta.seq = 99;
    let stray = Journal {
        seq: 99,
        base: 98,
        meta,
        gfns: vec![0],
        data: vec![0xee; PAGE],
        ranges: vec![None],
        disk: vec![],
    };
    std::fs::write(journal::slot_path(dir, 1), stray.encode().unwrap()).unwrap();
    assert_eq!(image::recover(dir).unwrap(), Some(11));
    assert_eq!(meta_position(dir), Some(pos(A, 11)));
    m.check(dir);
}

#[test]
fn the_image_lock_has_one_holder() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("image");
    let held = ImageLock::acquire(&dir).unwrap();
    let e = ImageLock::acquire(&dir).unwrap_err();
    assert!(matches!(e, BackupError::InUse { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "image {} is in use by another process (a backup or restore)",
            dir.display()
        )
    );
    // Finalizing (as `vmatrix restore` does) and a backup's replica are refused too.
    assert!(matches!(
        image::finalize(&dir),
        Err(BackupError::InUse { .. })
    ));
    assert!(matches!(
        ImageLock::acquire(&dir).and_then(Replica::open),
        Err(BackupError::InUse { .. })
    ));
    drop(held);
    let r = Replica::open(ImageLock::acquire(&dir).unwrap()).unwrap();
    assert_eq!(r.position(), None);
    // Without a committed image there is nothing to finalize.
    assert_eq!(r.finalize().unwrap(), None);
    assert!(matches!(
        image::finalize(&dir),
        Err(BackupError::NoImage { .. })
    ));
}

#[test]
fn a_sync_promotes_at_once_and_a_lone_incremental_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut r = open(dir);
    let lone = cp(3, Kind::Incremental, 1, &[1], &[]);
    assert!(matches!(r.begin(&lone, A, true), Err(Failure::Refused(_))));
    let resync = cp(3, Kind::Resync { from: 2 }, 1, &[1], &[]);
    assert!(matches!(
        r.begin(&resync, A, true),
        Err(Failure::Refused(_))
    ));
    let mut m = Model::new();
    let sync = cp(7, Kind::Sync, 0x42, &[0, 9], &[(0, 512)]);
    assert!(r.begin(&sync, C, true).unwrap().is_none());
    m.apply(&sync);
    assert_eq!(r.position(), Some(pos(C, 7)));
    m.check(dir);
    // A primary with another history replaces it by a full sync, never by an incremental.
    let other = cp(8, Kind::Incremental, 1, &[1], &[]);
    assert!(matches!(
        r.begin(&other, A, false),
        Err(Failure::Refused(_))
    ));
    assert_eq!(r.finalize().unwrap(), Some(7));
    assert!(promote::incoming(dir).symlink_metadata().is_err());
}

#[test]
fn a_full_sync_of_an_impossible_ram_size_is_refused_and_keeps_the_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut r, m) = committed_at_11(dir);
    for size in [0, MEM + 1, (vmm::layout::MAX_MEM_MIB << 20) + MEM, !4095] {
        let mut bad = cp(20, Kind::Sync, 0x55, &[0], &[]);
        bad.mem_size = size;
        let e = r.begin(&bad, C, false).err().map(|e| format!("{e:?}"));
        assert!(
            e.as_deref().is_some_and(|e| e.contains("guest RAM of")),
            "{size}: {e:?}"
        );
    }
    assert_eq!(r.position(), Some(pos(A, 11)));
    r.flush().unwrap();
    m.check(dir);
}
