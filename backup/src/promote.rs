//! The side image of a full sync and its promotion to committed image.
//!
//! A full sync (a `Sync` checkpoint, or pre-copy rounds ended by a checkpoint with state) is
//! built in `<dir>/incoming/` (`memory.bin`, `disk.img`, and at its end `replica.bin`), never in
//! the committed image: until the new image is consistent and durable, the last committed one
//! stays whole, so a primary dying mid-sync loses nothing it was told is safe. [`promote`] then
//! replaces the committed image, crash-safe at every step (for the backup process dying):
//!
//! 1. *Commit point*: the side files are complete; `memory.bin` and `disk.img` are fsynced;
//!    `incoming/replica.bin` (consistent, with state) is written through a temporary file,
//!    fsync and rename, and `incoming/` is fsynced.
//! 2. *Install* (idempotent): remove `<dir>/journal-*`, `<dir>/snapshot.bin`,
//!    `<dir>/replica.consumed` and `<dir>/disk-live.img` (they describe the old image); rename `incoming/memory.bin` and
//!    `incoming/disk.img` over the committed ones (or remove `<dir>/disk.img` if the new image
//!    has no disk); rename `incoming/replica.bin` last; remove `incoming/`; fsync `<dir>`.
//!
//! Only then is the checkpoint acknowledged. [`settle`] (the first step of every recovery)
//! finishes an interrupted promotion — `incoming/replica.bin` exists and is consistent: redo
//! step 2, renaming the files still in `incoming/` — or removes an abandoned sync (`incoming/`
//! without a consistent `replica.bin`: the committed image is intact). After the last rename
//! `incoming/` holds nothing of value, so removing it as abandoned is right there too.

use std::path::{Path, PathBuf};

use vmm::snapshot;

use crate::image::{io, read_meta, ReplicaImage, ReplicaMeta, CONSUMED_FILE, REPLICA_FILE};
use crate::{journal, BackupError};

/// Directory of the side image, inside the image directory.
pub const INCOMING: &str = "incoming";
/// The working disk `vmatrix restore` creates from a snapshot by default.
pub const LIVE_DISK: &str = "disk-live.img";

/// The side image directory of image directory `dir`.
pub fn incoming(dir: &Path) -> PathBuf {
    dir.join(INCOMING)
}

/// Makes the complete side image `side` the committed image of `dir` (see the module docs);
/// returns it, now living in `dir`. The caller has closed the old committed image.
pub fn promote(mut side: ReplicaImage, dir: &Path) -> Result<ReplicaImage, BackupError> {
    if side.syncing() || side.dir() != incoming(dir) {
        return Err(BackupError::Apply(format!(
            "{} is not a complete side image of {}",
            side.dir().display(),
            dir.display()
        )));
    }
    side.sync_files()?;
    side.save_meta()?;
    finish(dir, side.meta())?;
    side.rehome(dir);
    tracing::info!(
        "checkpoint {} (term {}, history {:#x}) is the committed image now",
        side.seq(),
        side.meta().term,
        side.meta().history
    );
    Ok(side)
}

/// Step 2 of a promotion to the image `meta` describes (committed in `incoming/replica.bin`).
/// Idempotent: renames only what is still in `incoming/`.
fn finish(dir: &Path, meta: &ReplicaMeta) -> Result<(), BackupError> {
    let inc = incoming(dir);
    journal::remove(dir)?;
    remove_file_if_present(&dir.join(snapshot::META_FILE))?;
    remove_file_if_present(&dir.join(CONSUMED_FILE))?;
    remove_file_if_present(&dir.join(LIVE_DISK))?;
    rename_if_present(
        &inc.join(snapshot::MEMORY_FILE),
        &dir.join(snapshot::MEMORY_FILE),
    )?;
    if meta.disk_len > 0 {
        rename_if_present(
            &inc.join(snapshot::DISK_FILE),
            &dir.join(snapshot::DISK_FILE),
        )?;
    } else {
        remove_file_if_present(&dir.join(snapshot::DISK_FILE))?;
    }
    rename_if_present(&inc.join(REPLICA_FILE), &dir.join(REPLICA_FILE))?;
    remove_dir_if_present(&inc)?;
    sync_dir(dir)
}

/// Settles what a full sync left in `dir`: finishes an interrupted promotion, or removes an
/// abandoned side image. Nothing to do without `incoming/`.
pub fn settle(dir: &Path) -> Result<(), BackupError> {
    let inc = incoming(dir);
    if !inc.exists() {
        return Ok(());
    }
    let committed = match read_meta(&inc) {
        Ok(m) if !m.syncing() => Some(m),
        Ok(_) => None,
        Err(BackupError::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(e @ BackupError::Meta { .. }) => {
            tracing::warn!("{e}; the sync is abandoned");
            None
        }
        Err(e) => return Err(e),
    };
    match committed {
        Some(meta) => {
            finish(dir, &meta)?;
            tracing::info!(
                "finished the interrupted promotion of checkpoint {} (term {}, history {:#x})",
                meta.seq,
                meta.term,
                meta.history
            );
        }
        None => {
            abandon(dir)?;
            tracing::info!("removed the side image of an abandoned full sync");
        }
    }
    Ok(())
}

/// Removes the side image of `dir`, if any (the committed image is not touched).
pub fn abandon(dir: &Path) -> Result<(), BackupError> {
    if remove_dir_if_present(&incoming(dir))? {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Fsyncs directory `dir` (its entries: renames, removals).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn rename_if_present(from: &Path, to: &Path) -> Result<(), BackupError> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io(to)),
    }
}

pub(crate) fn remove_file_if_present(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io(path)),
    }
}

/// Removes directory `path` and its contents; false if there was none.
fn remove_dir_if_present(path: &Path) -> Result<bool, BackupError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(BackupError::Io {
            path: path.to_path_buf(),
            err,
        }),
    }
}
