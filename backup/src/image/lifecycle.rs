//! What is done to a whole image directory, under its lock: recovery after the backup died
//! (settle a full sync, redo the journal), finalization as a snapshot, and handing the
//! committed image to a VM (its state, a working disk, consuming it).

use std::path::Path;

use vmm::snapshot::{self, format};

use super::{io, read_meta, ReplicaImage, ReplicaMeta, REPLICA_FILE};
use crate::journal;
use crate::lock::ImageLock;
use crate::{promote, BackupError};

/// [`recover_locked`], taking the image's lock for the time it works.
pub fn recover(dir: &Path) -> Result<Option<u64>, BackupError> {
    recover_locked(&ImageLock::acquire(dir)?)
}

/// Brings the image in the locked directory to its last committed checkpoint. First a full
/// sync's side image is settled ([`promote::settle`]): an interrupted promotion is finished,
/// an abandoned sync removed. Then the journal records of the image's history newer than
/// `replica.bin` that may not all be in the files are redone in order (idempotent: see
/// [`journal`] for which) and the newest one's facts recorded in `replica.bin`. Returns the
/// seq of the newest, if any. A damaged (torn) record was never acknowledged; it is ignored.
/// A directory without a committed image is left as it is (Ok(None)).
///
/// The journal slots are then removed, except in an image fenced beyond its own term (a
/// promotion): no checkpoint of its history applies to it again, every later recovery ignores
/// its slots, and deleting them would free up to twice the biggest checkpoint ever journaled on
/// the promotion's path (1.3 GB, ~90 ms measured). A later full sync's install removes them.
pub fn recover_locked(lock: &ImageLock) -> Result<Option<u64>, BackupError> {
    let dir = lock.dir();
    let t0 = std::time::Instant::now();
    promote::settle(dir)?;
    if !dir.join(REPLICA_FILE).exists() {
        journal::remove(dir)?;
        return Ok(None);
    }
    let meta = read_meta(dir)?;
    let keep_slots = crate::fence::read_min_term(dir)? > meta.term;
    let clear = || match keep_slots {
        true => Ok(()),
        false => journal::remove(dir),
    };
    // Only checkpoints after the one replica.bin records have anything to redo.
    let js = match meta.syncing() {
        true => Vec::new(),
        false => journal::to_redo(dir, meta.history, meta.seq)?,
    };
    let Some(seq) = js.last().map(|j| j.seq) else {
        clear()?;
        return Ok(None);
    };
    let records = js.len();
    let pages: usize = js.iter().map(|j| j.gfns.len()).sum();
    let writes: usize = js.iter().map(|j| j.disk.len()).sum();
    let t_read = t0.elapsed();
    let mut img = ReplicaImage::open(dir)?;
    img.redo(js)?;
    let t_redo = t0.elapsed();
    clear()?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        "image brought to checkpoint {seq} from its journal ({records} records, {pages} pages, \
         {writes} disk writes; read in {:.1} ms, redone and recorded in {:.1} ms, slots {} in \
         {:.1} ms)",
        ms(t_read),
        ms(t_redo - t_read),
        if keep_slots { "kept" } else { "removed" },
        ms(t0.elapsed() - t_redo)
    );
    Ok(Some(seq))
}

/// [`finalize_locked`], taking the image's lock for the time it works.
pub fn finalize(dir: &Path) -> Result<u64, BackupError> {
    finalize_locked(&ImageLock::acquire(dir)?)
}

/// Turns the committed image in the locked directory into a full snapshot of its checkpoint
/// (recovering it first, see [`recover_locked`]); returns the checkpoint's seq.
///
/// An image fenced beyond its own term (`min-term`: a promotion, or a newer primary elsewhere)
/// is only recovered: a primary of the newer term starts from `replica.bin` directly, or a
/// newer sync replaces it; a `snapshot.bin` (a read of all memory and disk) is not written.
pub fn finalize_locked(lock: &ImageLock) -> Result<u64, BackupError> {
    let dir = lock.dir();
    let meta = committed_locked(lock)?;
    if crate::fence::read_min_term(dir)? > meta.term {
        promote::remove_file_if_present(&dir.join(snapshot::META_FILE))?;
        tracing::info!(
            "image committed at checkpoint {} (fenced beyond its term {}: no snapshot.bin)",
            meta.seq,
            meta.term
        );
        return Ok(meta.seq);
    }
    crate::export::write_snapshot(dir, meta.mem_size, meta.disk_len, &meta.state)?;
    Ok(meta.seq)
}

/// `replica.bin` of an image that a VM took over, renamed (see [`consume_locked`]).
pub const CONSUMED_FILE: &str = "replica.consumed";

/// The committed image in the locked directory, recovered ([`recover_locked`]): its facts,
/// once its files are checked to have the sizes they record. What a VM starts from.
pub fn committed_locked(lock: &ImageLock) -> Result<ReplicaMeta, BackupError> {
    let dir = lock.dir();
    recover_locked(lock)?;
    if !dir.join(REPLICA_FILE).exists() {
        return Err(BackupError::NoImage {
            dir: dir.to_path_buf(),
        });
    }
    let meta = read_meta(dir)?;
    if meta.syncing() {
        return Err(BackupError::Apply(format!(
            "the initial sync of {} never completed (pre-copy round {} was the last applied): \
             there is no consistent checkpoint to start",
            dir.display(),
            meta.seq
        )));
    }
    for (name, len) in [
        (snapshot::MEMORY_FILE, meta.mem_size),
        (snapshot::DISK_FILE, meta.disk_len),
    ] {
        let p = dir.join(name);
        let got = match len {
            0 => continue,
            _ => std::fs::metadata(&p).map_err(io(&p))?.len(),
        };
        if got != len {
            let why = format!("{}: {got} bytes, the image records {len}", p.display());
            return Err(BackupError::Apply(why));
        }
    }
    Ok(meta)
}

/// How the working disk of a VM started from a replica image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkingDisk {
    /// A copy-on-write clone of `disk.img` (reflink): the image stays whole.
    Cloned,
    /// `disk.img` itself under a second name: the image is consumed ([`consume_locked`])
    /// before the guest runs.
    Linked,
    /// A copy of the data regions of `disk.img` (`bytes`): the image stays whole.
    Copied {
        /// Bytes copied.
        bytes: u64,
    },
}

/// Makes `dst` the working disk of a VM started from the checkpoint `meta` of the locked image
/// (which has a disk): a copy-on-write clone where the file system can (no data copied, the
/// image stays whole); else, when `take` (a promotion: the new primary takes the image over),
/// `disk.img` itself, hard-linked at `dst`; else (or if linking fails) a copy of its data.
pub fn working_disk_locked(
    lock: &ImageLock,
    meta: &ReplicaMeta,
    dst: &Path,
    take: bool,
) -> Result<WorkingDisk, BackupError> {
    use snapshot::files;
    let src = lock.dir().join(snapshot::DISK_FILE);
    // (A link at `dst` left by an earlier start whose guest never ran is replaced, never
    // written through: see `files::make_working_disk`.)
    if take {
        if files::try_clone(&src, dst)? {
            return Ok(WorkingDisk::Cloned);
        }
        match std::fs::hard_link(&src, dst) {
            Ok(()) => return Ok(WorkingDisk::Linked),
            Err(e) => tracing::warn!("cannot link {} at {}: {e}", src.display(), dst.display()),
        }
    }
    Ok(match files::make_working_disk(&src, meta.disk_len, dst)? {
        files::WorkingDisk::Cloned => WorkingDisk::Cloned,
        files::WorkingDisk::Copied { bytes } => WorkingDisk::Copied { bytes },
    })
}

/// Consumes the locked image, whose `disk.img` a VM about to run took over
/// ([`WorkingDisk::Linked`]): `replica.bin` is renamed to [`CONSUMED_FILE`] (from then on the
/// directory holds no checkpoint: nothing starts or resumes from it, and a backup started on it
/// gets a full sync), `disk.img` and `memory.bin` are unlinked (the VM keeps them open and
/// mapped), and the directory is fsynced, all before the guest runs. A crash at any step leaves
/// no `replica.bin`, never an image whose disk moved on without its memory.
pub fn consume_locked(lock: &ImageLock) -> Result<(), BackupError> {
    let dir = lock.dir();
    let (from, to) = (dir.join(REPLICA_FILE), dir.join(CONSUMED_FILE));
    std::fs::rename(&from, &to).map_err(io(&to))?;
    promote::remove_file_if_present(&dir.join(snapshot::DISK_FILE))?;
    promote::remove_file_if_present(&dir.join(snapshot::MEMORY_FILE))?;
    // (A snapshot a stopped backup finalized describes the files just removed.)
    promote::remove_file_if_present(&dir.join(snapshot::META_FILE))?;
    promote::sync_dir(dir)
}

/// The facts of the checkpoint a VM took the image in `dir` over from, if it was consumed.
pub fn consumed(dir: &Path) -> Option<ReplicaMeta> {
    let bytes = std::fs::read(dir.join(CONSUMED_FILE)).ok()?;
    format::decode(&bytes).ok()
}
