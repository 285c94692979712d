//! Applying checkpoints off the network loop. Writing a checkpoint into the image (a pre-copy
//! slice of 64 MiB, a quick resync of up to 256 MiB) takes long enough that a loop doing it
//! inline stops answering: heartbeats are not echoed and the primary declares the backup
//! silent. So the replica moves to a blocking thread for each step — `begin` (up to the point
//! where the checkpoint may be acknowledged) and `complete` (written in place after the ack) —
//! and comes back with the result, while the session loop goes on receiving (staging later
//! checkpoints) and answering heartbeats. Steps run one at a time, in order.
//!
//! A small incremental checkpoint's `begin` (at most [`INLINE_PAGES`] pages and
//! [`INLINE_DISK`] disk bytes: a journal write of tens of microseconds) runs on the loop
//! itself: the hand-over to a blocking thread and back cost more than the step (40–90 µs here,
//! measured by `vmatrix bench replication --kv`), and its acknowledgement is what a held reply
//! waits for. So does its `complete` (into the image's write-back: a few `pwrite`s once per
//! journal ring, `crate::write_back`), once the acknowledgement has left.

use std::time::Instant;

use protocol::{Checkpoint, Kind};
use tokio::task::JoinHandle;

use crate::image::{Origin, Staged};
use crate::replica::{Failure, Replica};
use crate::BackupError;

/// What a step on the blocking thread did.
pub(crate) enum Done {
    /// `begin` of a checkpoint: what `complete` must finish (if anything), or why it failed.
    Begun {
        cp: Checkpoint,
        result: Result<Option<Staged>, Failure>,
        started: Instant,
    },
    /// `complete` of checkpoint `cp` (its seq, pages, and when its `begin` started).
    Completed {
        seq: u64,
        pages: usize,
        started: Instant,
        result: Result<(), Failure>,
    },
}

/// Most pages of a checkpoint whose `begin` runs on the loop (see the module docs).
pub const INLINE_PAGES: usize = 64;

/// Most disk bytes of a checkpoint whose `begin` runs on the loop.
pub const INLINE_DISK: usize = 256 << 10;

/// Most bytes a `complete` that flushes the write-back writes on the loop (a 16-client KV
/// load's flushes: ~107 pages, 0.4 MiB); a bigger flush runs on the blocking thread.
pub const INLINE_FLUSH: usize = 1 << 20;

/// Whether a step over `pages` pages and the disk writes `disk` is small enough to run on
/// the loop (see the module docs).
pub(crate) fn inline(pages: usize, disk: &[(u64, Vec<u8>)]) -> bool {
    let bytes: usize = disk.iter().map(|(_, d)| d.len()).sum();
    pages <= INLINE_PAGES && bytes <= INLINE_DISK
}

/// See the module docs.
pub(crate) struct Applier {
    idle: Option<Replica>,
    job: Option<JoinHandle<(Replica, Done)>>,
    /// A step that ran on the loop, for the next [`Applier::next_done`].
    ready: Option<Done>,
    /// A `complete` asked for, started by [`Applier::run_deferred`] once the loop has sent the
    /// acknowledgement (writing the pages in place on another thread meanwhile competed with
    /// the acknowledgement for a CPU).
    deferred: Option<(Staged, u64, usize, Instant)>,
}

impl Applier {
    /// Takes the replica for the session.
    pub fn new(replica: Replica) -> Self {
        Applier {
            idle: Some(replica),
            job: None,
            ready: None,
            deferred: None,
        }
    }

    /// No step runs or waits to be reported.
    pub fn idle(&self) -> bool {
        self.job.is_none() && self.ready.is_none() && self.deferred.is_none()
    }

    /// The replica, when no step runs.
    pub fn replica(&self) -> Option<&Replica> {
        self.idle.as_ref()
    }

    /// The replica, when no step runs, to change.
    pub fn replica_mut(&mut self) -> Option<&mut Replica> {
        self.idle.as_mut()
    }

    /// Starts `begin` of checkpoint `cp` from `origin` (`opens`: it opens the session's
    /// stream); the caller checked the replica is free ([`idle`](Self::idle)).
    pub fn start(&mut self, cp: Checkpoint, origin: Origin, opens: bool) {
        let Some(mut r) = self.idle.take() else {
            return;
        };
        let started = Instant::now();
        // (Not while a full sync runs: its last checkpoint promotes the side image, fsyncs
        // of all of guest RAM, which must not stall the loop and its QUIC tasks.)
        let small = inline(cp.pages.len(), &cp.disk);
        if cp.kind == Kind::Incremental && small && !r.syncing() {
            let result = r.begin(&cp, origin, opens);
            self.idle = Some(r);
            self.ready = Some(Done::Begun {
                cp,
                result,
                started,
            });
            return;
        }
        self.job = Some(tokio::task::spawn_blocking(move || {
            let result = r.begin(&cp, origin, opens);
            (
                r,
                Done::Begun {
                    cp,
                    result,
                    started,
                },
            )
        }));
    }

    /// Asks for `complete` of an acknowledged checkpoint: it starts at the next
    /// [`Applier::run_deferred`].
    pub fn start_complete(&mut self, s: Staged, seq: u64, pages: usize, started: Instant) {
        debug_assert!(self.deferred.is_none(), "two completes asked for at once");
        self.deferred = Some((s, seq, pages, started));
    }

    /// Starts the `complete` asked for, if any.
    pub fn run_deferred(&mut self) {
        // (Only once the replica is free; the complete waits otherwise, never dropped.)
        if self.deferred.is_none() || self.idle.is_none() {
            return;
        }
        let (Some((s, seq, pages, started)), Some(mut r)) =
            (self.deferred.take(), self.idle.take())
        else {
            return;
        };
        // A small one is written here, as a small `begin` is: the hand-over to a blocking
        // thread and back cost two wake-ups per checkpoint (BENCHMARKS.md, "Time without an
        // exit"). Its acknowledgement has left already.
        if s.small() && !r.syncing() && !r.heavy_flush_due() {
            let result = r.complete(s);
            self.idle = Some(r);
            self.ready = Some(Done::Completed {
                seq,
                pages,
                started,
                result,
            });
            return;
        }
        self.job = Some(tokio::task::spawn_blocking(move || {
            let result = r.complete(s);
            (
                r,
                Done::Completed {
                    seq,
                    pages,
                    started,
                    result,
                },
            )
        }));
    }

    /// Waits for the running step (pending forever if none runs: use it in `select!`).
    pub async fn next_done(&mut self) -> Result<Done, Failure> {
        if let Some(done) = self.ready.take() {
            return Ok(done);
        }
        self.run_deferred();
        // (A small complete just ran here, on the loop: its result is ready now.)
        if let Some(done) = self.ready.take() {
            return Ok(done);
        }
        let Some(job) = self.job.as_mut() else {
            return std::future::pending().await;
        };
        let r = job.await;
        self.job = None;
        match r {
            Ok((replica, done)) => {
                self.idle = Some(replica);
                Ok(done)
            }
            Err(e) => Err(Failure::Fatal(BackupError::Apply(format!(
                "the apply thread failed: {e}"
            )))),
        }
    }

    /// Ends the session: waits for a running step and gives the replica back. A `begin` that
    /// finished unacknowledged is harmless (its journal redoes it, or the next session's
    /// position says where the image stands); a `complete` still runs to its end.
    pub async fn finish(mut self) -> Result<Replica, Failure> {
        if !self.idle() {
            match self.next_done().await? {
                // Durable but not written in place: finish it (on the apply thread), so the
                // image is whole.
                Done::Begun {
                    result: Ok(Some(s)),
                    cp,
                    started,
                } => {
                    self.start_complete(s, cp.epoch, cp.pages.len(), started);
                    self.run_deferred();
                    if let Done::Completed { result, .. } = self.next_done().await? {
                        result?;
                    }
                }
                // An image that could not be written cannot be served on.
                Done::Completed { result: Err(f), .. } => return Err(f),
                Done::Begun {
                    result: Err(f @ Failure::Fatal(_)),
                    ..
                } => return Err(f),
                _ => {}
            }
        }
        self.idle.ok_or_else(|| {
            Failure::Fatal(BackupError::Apply(
                "the replica was lost with its apply thread".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use protocol::page::{PageData, PAGE};
    use protocol::{Checkpoint, Kind};
    use vmm::snapshot::format;

    use super::*;
    use crate::lock::ImageLock;

    fn cp(seq: u64, kind: Kind) -> Checkpoint {
        Checkpoint {
            epoch: seq,
            kind,
            mem_size: 16 * PAGE as u64,
            pages: vec![(1, PageData::Raw(vec![seq as u8; PAGE]))],
            disk: vec![],
            state: Some((format::FORMAT_VERSION, crate::tests::state(0))),
        }
    }

    /// A session that ends with a small checkpoint's complete asked for but not yet run (its
    /// acknowledgement could not be sent: the primary went away) gives the replica back.
    #[tokio::test]
    async fn a_session_ending_with_a_small_complete_asked_for_ends() {
        let d = tempfile::tempdir().unwrap();
        let o = Origin {
            history: 7,
            term: 1,
        };
        let mut r = Replica::open(ImageLock::acquire(d.path()).unwrap()).unwrap();
        assert!(r.begin(&cp(1, Kind::Sync), o, true).unwrap().is_none());
        let mut a = Applier::new(r);
        a.start(cp(2, Kind::Incremental), o, false);
        let Ok(Done::Begun {
            result: Ok(Some(s)),
            started,
            ..
        }) = a.next_done().await
        else {
            panic!("not staged");
        };
        a.start_complete(s, 2, 1, started);
        let r = tokio::time::timeout(Duration::from_secs(5), a.finish())
            .await
            .expect("finish waited forever")
            .unwrap();
        assert_eq!(r.seq(), Some(2));
    }
}
