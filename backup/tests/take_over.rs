//! A replica image taken over by a new primary (a promotion), on real files: a fenced image is
//! finalized without reading its memory (no `snapshot.bin`), recovery first if its last
//! checkpoint is only in the journal; the working disk is a clone, a link (with `take`) or a
//! copy, never written through the image's own name; the image stays a committed image until
//! it is consumed, and once consumed it holds no checkpoint (nothing starts from it, a backup
//! started on it gets a full sync, which clears the mark).

use std::os::unix::fs::FileExt;
use std::path::Path;

use backup::image::{self, Origin, ReplicaImage, WorkingDisk, CONSUMED_FILE, REPLICA_FILE};
use backup::{BackupError, ImageLock};
use protocol::page::{PageData, PAGE};
use protocol::{Checkpoint, Kind};
use vmm::snapshot::{self, format, VmState};

const MEM: u64 = 32 * PAGE as u64;
const DISK: u64 = 64 << 10;
const A: Origin = Origin {
    history: 0xa,
    term: 1,
};

/// A `VmState` (all zero, with a disk of `DISK` bytes), postcard-encoded.
fn state() -> Vec<u8> {
    let zeros = vec![0u8; 1 << 16];
    let mut vm: VmState = postcard::from_bytes(&zeros).unwrap();
    let mut blk: vmm::devices::virtio::persist::TransportPersist<
        vmm::devices::virtio::blk::BlkPersist,
    > = postcard::from_bytes(&zeros).unwrap();
    blk.device.sectors = DISK / vmm::devices::virtio::blk::SECTOR_SIZE;
    vm.blk = Some(blk);
    postcard::to_stdvec(&vm).unwrap()
}

fn cp(seq: u64, kind: Kind, fill: u8, pages: &[u64], disk: &[(u64, usize)]) -> Checkpoint {
    Checkpoint {
        epoch: seq,
        kind,
        mem_size: MEM,
        pages: pages
            .iter()
            .map(|&g| (g, PageData::Raw(vec![fill; PAGE])))
            .collect(),
        disk: disk.iter().map(|&(o, n)| (o, vec![fill; n])).collect(),
        state: Some((format::FORMAT_VERSION, state())),
    }
}

/// A committed image at checkpoint 10 (full sync), and checkpoint 11 journaled only (the
/// backup stopped before writing it in place).
fn image_at_11_in_journal(dir: &Path) {
    let side = ReplicaImage::create(dir, A, &cp(10, Kind::Sync, 1, &[0, 3], &[(0, 4096)])).unwrap();
    let mut img = backup::promote::promote(side, dir).unwrap();
    let staged = img
        .stage(&cp(11, Kind::Incremental, 2, &[3, 7], &[(8192, 512)]), A)
        .unwrap();
    drop((staged, img));
}

fn disk_of(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(snapshot::DISK_FILE)).unwrap()
}

#[test]
fn a_fenced_image_is_committed_without_a_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    image_at_11_in_journal(dir);
    backup::fence::write_min_term(dir, 2).unwrap();
    assert_eq!(image::finalize(dir).unwrap(), 11);
    assert!(!dir.join(snapshot::META_FILE).exists(), "no snapshot.bin");
    assert_eq!(image::read_meta(dir).unwrap().seq, 11);
    assert_eq!(disk_of(dir)[8192], 2, "checkpoint 11 was redone");
    // Not fenced: a full snapshot, as before.
    let d2 = tempfile::tempdir().unwrap();
    image_at_11_in_journal(d2.path());
    assert_eq!(image::finalize(d2.path()).unwrap(), 11);
    assert!(d2.path().join(snapshot::META_FILE).exists());
}

#[test]
fn a_taken_over_image_stays_whole_until_consumed_then_holds_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("image");
    image_at_11_in_journal(&dir);
    let work = d.path().join("disk-term2.img");
    let lock = ImageLock::acquire(&dir).unwrap();
    let meta = image::committed_locked(&lock).unwrap();
    assert_eq!(meta.seq, 11);
    let disk = disk_of(&dir);
    let how = image::working_disk_locked(&lock, &meta, &work, true).unwrap();
    assert!(
        matches!(how, WorkingDisk::Linked | WorkingDisk::Cloned),
        "{how:?}"
    );
    assert_eq!(std::fs::read(&work).unwrap(), disk);
    // The start failed before the guest ran: the image is whole and starts again; the link
    // left behind is replaced, not written through.
    assert!(dir.join(REPLICA_FILE).exists());
    let again = image::working_disk_locked(&lock, &meta, &work, true).unwrap();
    assert_eq!(again, how);
    assert_eq!(disk_of(&dir), disk);
    // The working disk is not the image's own name.
    let own = dir.join(snapshot::DISK_FILE);
    assert!(image::working_disk_locked(&lock, &meta, &own, true).is_err());
    assert_eq!(disk_of(&dir), disk);

    // The guest is about to run: the image is consumed.
    image::consume_locked(&lock).unwrap();
    assert!(!dir.join(REPLICA_FILE).exists());
    assert!(!dir.join(snapshot::DISK_FILE).exists());
    assert!(!dir.join(snapshot::MEMORY_FILE).exists());
    assert_eq!(image::consumed(&dir).unwrap().seq, 11);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&work)
        .unwrap()
        .write_all_at(&[9; 512], 0)
        .unwrap();
    assert!(matches!(
        image::committed_locked(&lock),
        Err(BackupError::NoImage { .. })
    ));
    drop(lock);
    assert!(!image::is_replica(&dir), "nothing starts from it");
    assert_eq!(image::recover(&dir).unwrap(), None);

    // A backup started on it later gets a full sync, which clears the mark.
    let side = ReplicaImage::create(&dir, A, &cp(20, Kind::Sync, 5, &[1], &[])).unwrap();
    backup::promote::promote(side, &dir).unwrap();
    assert!(!dir.join(CONSUMED_FILE).exists());
    assert_eq!(image::read_meta(&dir).unwrap().seq, 20);
}

#[test]
fn without_take_the_working_disk_is_a_copy_and_the_image_stays() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("image");
    image_at_11_in_journal(&dir);
    let work = d.path().join("live.img");
    let lock = ImageLock::acquire(&dir).unwrap();
    let meta = image::committed_locked(&lock).unwrap();
    let disk = disk_of(&dir);
    let how = image::working_disk_locked(&lock, &meta, &work, false).unwrap();
    assert!(
        matches!(how, WorkingDisk::Copied { .. } | WorkingDisk::Cloned),
        "{how:?}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&work)
        .unwrap()
        .write_all_at(&[9; 512], 0)
        .unwrap();
    assert_eq!(disk_of(&dir), disk, "the image's disk is untouched");
    assert!(dir.join(REPLICA_FILE).exists());
}
