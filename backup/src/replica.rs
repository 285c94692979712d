//! What a backup holds across sessions: the committed image (`<dir>`, always consistent) and,
//! while a full sync is in progress, the side image (`<dir>/incoming/`), under the directory's
//! lock. [`Replica::begin`] routes each checkpoint:
//!
//! - `Sync`: a new side image, applied whole, promoted; then acknowledged.
//! - `PreCopy` that opens the session's stream (or with no side image of its primary open): a
//!   new side image; a later `PreCopy`: the next round on it (no journal: it protects nothing).
//! - `Incremental` while a side image is open: applied whole to it, which ends its sync; it is
//!   promoted, then acknowledged.
//! - `Incremental` (seq + 1) or `Resync { from }` (from the committed seq) otherwise: staged on
//!   the committed image (journal written: durable), acknowledged, then completed
//!   ([`Replica::complete`]).
//!
//! A checkpoint that does not fit is refused before anything changed ([`Failure::Refused`]),
//! and the primary resends it.

use std::path::Path;

use protocol::message::Position;
use protocol::{Checkpoint, Kind};

use crate::export::Tracker;
use crate::image::{self, Origin, ReplicaImage, ReplicaMeta, Staged, REPLICA_FILE};
use crate::lock::ImageLock;
use crate::{promote, BackupError};

/// A checkpoint that could not be applied, by what it means for the backup.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Refused before any image file changed: the primary resends it.
    #[error("{0}")]
    Refused(BackupError),
    /// The side image could not be written (it is dropped): the session must end, and the
    /// primary starts a new full sync.
    #[error("side image: {0}")]
    Session(BackupError),
    /// The committed image could not be written or replaced: the backup must stop (the image
    /// on disk is recoverable from its journal or its committed side image).
    #[error("committed image: {0}")]
    Fatal(BackupError),
}

/// The backup's images.
pub struct Replica {
    lock: ImageLock,
    committed: Option<ReplicaImage>,
    side: Option<ReplicaImage>,
    /// Where writes into the committed image are recorded while an export runs.
    tracker: Tracker,
}

impl Replica {
    /// Recovers the image in the locked directory (see [`image::recover_locked`]) and opens
    /// its committed image, if it has one.
    pub fn open(lock: ImageLock) -> Result<Replica, BackupError> {
        image::recover_locked(&lock)?;
        let dir = lock.dir();
        let committed = match dir.join(REPLICA_FILE).exists() {
            true => Some(ReplicaImage::open(dir)?),
            false => None,
        };
        Ok(Replica {
            lock,
            committed,
            side: None,
            tracker: Tracker::default(),
        })
    }

    /// Records the writes into the committed image in `tracker` (shared with the exports).
    pub(crate) fn set_tracker(&mut self, tracker: Tracker) {
        self.tracker = tracker;
    }

    /// The committed image's facts, if it holds a consistent checkpoint.
    pub(crate) fn committed_meta(&self) -> Option<&ReplicaMeta> {
        self.committed
            .as_ref()
            .map(|i| i.meta())
            .filter(|m| !m.syncing())
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        self.lock.dir()
    }

    /// The committed image's position (reported to a primary in `Welcome`).
    pub fn position(&self) -> Option<Position> {
        self.committed.as_ref().and_then(|i| i.position())
    }

    /// True while a full sync is in progress (a side image is open).
    pub fn syncing(&self) -> bool {
        self.side.is_some()
    }

    /// Seq of the last checkpoint applied to either image (the side image's while syncing).
    pub fn seq(&self) -> Option<u64> {
        self.side
            .as_ref()
            .or(self.committed.as_ref())
            .map(|i| i.seq())
    }

    /// Applies `cp` from `origin` up to the point where it may be acknowledged: durable (a
    /// journal written) or, for a full sync, applied and promoted. `opens` is true for the
    /// first checkpoint of the session's stream. Returns what [`Replica::complete`] must finish
    /// after the acknowledgement, if anything.
    pub fn begin(
        &mut self,
        cp: &Checkpoint,
        origin: Origin,
        opens: bool,
    ) -> Result<Option<Staged>, Failure> {
        let side_of_origin = self.side.as_ref().is_some_and(|s| s.origin() == origin);
        match cp.kind {
            Kind::Sync => {
                self.start_side(cp, origin)?;
                self.promote_side().map_err(Failure::Fatal)?;
                Ok(None)
            }
            Kind::PreCopy if opens || !side_of_origin => {
                self.start_side(cp, origin)?;
                Ok(None)
            }
            Kind::PreCopy | Kind::Incremental if side_of_origin => {
                self.advance_side(cp, origin)?;
                Ok(None)
            }
            // (A pre-copy round never gets here: it either opens a side image or advances one.)
            Kind::PreCopy | Kind::Incremental | Kind::Resync { .. } => {
                let Some(img) = self.committed.as_mut() else {
                    return Err(Failure::Refused(BackupError::Apply(format!(
                        "checkpoint {} ({:?}) needs a committed image, and there is none \
                         (a full sync must come first)",
                        cp.epoch, cp.kind
                    ))));
                };
                let staged = img.stage(cp, origin).map_err(Failure::Refused)?;
                if matches!(cp.kind, Kind::Resync { .. }) && self.side.is_some() {
                    // The primary went on from the committed image: the sync is abandoned.
                    self.side = None;
                    promote::abandon(self.dir()).map_err(Failure::Fatal)?;
                }
                Ok(Some(staged))
            }
        }
    }

    /// Writes an acknowledged checkpoint into the committed image (a small one may wait in
    /// its write-back: [`crate::write_back`]). An error leaves the image recoverable from its
    /// journal, but this process cannot go on with it.
    pub fn complete(&mut self, s: Staged) -> Result<(), Failure> {
        match self.committed.as_mut() {
            // While an export records writes, they are written through (the write-back was
            // flushed when it started: `flush`), so what is recorded is in the files.
            Some(img) if self.tracker.active() => {
                let (gfns, disk) = s.writes();
                img.complete_through(s).map_err(Failure::Fatal)?;
                // (After the write: see `crate::export`.)
                self.tracker.record(&gfns, &disk);
                Ok(())
            }
            Some(img) => img.complete(s).map_err(Failure::Fatal),
            None => Err(Failure::Fatal(BackupError::Apply(
                "a staged checkpoint without a committed image".into(),
            ))),
        }
    }

    /// Whether completing a checkpoint now would flush more than the loop should write.
    pub(crate) fn heavy_flush_due(&self) -> bool {
        self.committed.as_ref().is_some_and(|i| i.heavy_flush_due())
    }

    /// Writes what waits in the committed image's write-back into its files (before anything
    /// reads them: an export).
    pub fn flush(&mut self) -> Result<(), BackupError> {
        match self.committed.as_mut() {
            Some(img) => img.flush(),
            None => Ok(()),
        }
    }

    /// The session ended: a full sync in progress is abandoned (the next one starts over).
    pub fn end_session(&mut self) -> Result<(), BackupError> {
        if self.side.take().is_some() {
            promote::abandon(self.dir())?;
            tracing::info!("full sync abandoned with its session");
        }
        Ok(())
    }

    /// Closes the images and finalizes the committed one as a snapshot; returns its seq, or
    /// None if there is no committed image (no full sync ever completed).
    pub fn finalize(self) -> Result<Option<u64>, BackupError> {
        let Replica {
            lock,
            committed,
            side,
            ..
        } = self;
        // (What waits in the committed image's write-back is redone from its journal by the
        // recovery below, as after the process dying.)
        drop((committed, side));
        image::recover_locked(&lock)?;
        if !lock.dir().join(REPLICA_FILE).exists() {
            tracing::warn!(
                "{}: no full sync ever completed: there is no image to finalize",
                lock.dir().display()
            );
            return Ok(None);
        }
        image::finalize_locked(&lock).map(Some)
    }

    /// A new side image from `cp` (a `Sync` or the first pre-copy round).
    fn start_side(&mut self, cp: &Checkpoint, origin: Origin) -> Result<(), Failure> {
        self.side = None;
        let img = ReplicaImage::create(self.dir(), origin, cp).map_err(Failure::Refused)?;
        tracing::info!(
            "full sync: a side image from checkpoint {} ({:?}, term {}, history {:#x})",
            cp.epoch,
            cp.kind,
            origin.term,
            origin.history
        );
        self.side = Some(img);
        Ok(())
    }

    /// The next pre-copy round, or the checkpoint that ends the sync (then promoted).
    fn advance_side(&mut self, cp: &Checkpoint, origin: Origin) -> Result<(), Failure> {
        let Some(side) = self.side.as_mut() else {
            return Err(Failure::Refused(BackupError::Apply(format!(
                "checkpoint {}: no full sync in progress",
                cp.epoch
            ))));
        };
        let staged = side.stage(cp, origin).map_err(Failure::Refused)?;
        if let Err(e) = side.complete(staged) {
            // Half written: of no use. The session ends and a new sync starts over.
            self.side = None;
            let _ = promote::abandon(self.dir());
            return Err(Failure::Session(e));
        }
        if !side.syncing() {
            self.promote_side().map_err(Failure::Fatal)?;
        }
        Ok(())
    }

    /// The side image (consistent now) replaces the committed one.
    fn promote_side(&mut self) -> Result<(), BackupError> {
        let Some(side) = self.side.take() else {
            return Ok(());
        };
        self.committed = None;
        self.tracker.replaced();
        let dir = self.lock.dir().to_path_buf();
        self.committed = Some(promote::promote(side, &dir)?);
        Ok(())
    }
}
