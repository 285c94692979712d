//! Exporting the committed image as a full snapshot while replication goes on (a clone base on
//! the backup's host: `PUT /snapshot` on its control socket, docs/clones.md).
//!
//! The image is written in place between checkpoints, and a `MAP_PRIVATE` clone of it would see
//! its memory change, so the export is a **frozen copy** of one committed checkpoint, made the
//! way a live migration's pre-copy is made, without holding the apply loop for the copy:
//!
//! 1. **Pass** (a thread of its own, concurrent with applying checkpoints): the data regions of
//!    `memory.bin` and `disk.img` are copied into `<dst>/` (holes stay holes). From the moment
//!    the export starts, every page and disk block a checkpoint writes into the image is recorded
//!    in the [`Tracker`] *after* it is written.
//! 2. **Rounds** (same thread): the recorded pages and blocks are taken and copied again, while
//!    more than [`FINAL_PAGES`] are recorded (at most [`MAX_ROUNDS`] rounds at a time).
//! 3. **Final step**, when the replica is idle between two checkpoints (nothing writes the image,
//!    which then holds exactly the committed checkpoint): if more than [`FINAL_PAGES`] were
//!    recorded since (a big checkpoint landed), more rounds run on the thread first (up to
//!    [`MAX_FINAL_TRIES`] times); then what was recorded is copied (adjacent pages as one run)
//!    and the checkpoint's vCPU/device state taken. This is the only part that holds the apply
//!    loop (about [`FINAL_PAGES`] pages at most but after the last try; 0.1–1 ms measured): the
//!    primary's next acknowledgement waits that long, its guest never pauses for it.
//! 4. **Snapshot** (a thread again): the frozen files are synced and described, and
//!    `snapshot.bin` written last; then the requester gets its answer.
//!
//! Why it is exact: a page written after the pass copied it is recorded after the write, and
//! every recorded page is copied again after it was recorded, by a later round or by the final
//! step; a page written before the pass reached it is copied with its new contents. A torn read
//! (the pass racing a write) is of a page recorded by that write. A full sync that replaces the
//! committed image during an export fails the export (its pages are of another image); so do
//! the backup stopping or being promoted (the export is cancelled before the image is
//! finalized) and the requester giving up (its timeout). A failed export removes what it
//! wrote, on a thread (a big image must not hold the network loop). Each export records under
//! its own generation ([`tracker`]): a cancelled export's thread cannot take what a later one
//! needs.

mod copy;
pub mod tracker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::message::Position;

use crate::replica::Replica;
use crate::BackupError;
pub use copy::write_snapshot;
use copy::{Files, Passed};
pub use tracker::Tracker;

/// Most recorded pages the final step copies while the apply loop waits (8 MiB); more are
/// copied by another round first.
pub const FINAL_PAGES: usize = 2048;
/// Rounds after the pass (or after a try of the final step) before it is tried.
pub const MAX_ROUNDS: usize = 8;
/// Tries of the final step that find more than [`FINAL_PAGES`] recorded and run more rounds
/// instead; the next one copies whatever is recorded.
pub const MAX_FINAL_TRIES: u32 = 4;

/// What an export produced (the answer to `PUT /snapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The snapshot's id.
    pub id: u64,
    /// The committed checkpoint it holds.
    pub position: Position,
    /// How long the final step held the apply loop, µs.
    pub held_us: u64,
    /// Pages and disk blocks the final step copied.
    pub final_pages: u64,
    /// Rounds after the pass.
    pub rounds: u64,
    /// Bytes copied in all (pass, rounds and final step).
    pub bytes: u64,
    /// Total time, ms.
    pub total_ms: u64,
    /// CRC32 of the snapshot's guest memory.
    pub memory_crc32: u32,
}

/// What the requester waits on.
type Reply = mpsc::SyncSender<Result<Exported, BackupError>>;

/// A snapshot thread still writing: its cancel flag and its answer (taken by whoever answers).
type Finishing = (Arc<AtomicBool>, Arc<Mutex<Option<Reply>>>);

/// Removes a failed export's directory on a thread of its own.
fn remove(dir: &Path) {
    let dir = dir.to_path_buf();
    let r = std::thread::Builder::new()
        .name("export-rm".into())
        .spawn(move || remove_now(&dir));
    if let Err(e) = r {
        tracing::warn!("no thread to remove a failed export: {e}");
    }
}

fn remove_now(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing the failed export {}: {e}", dir.display());
        }
    }
}

/// A request: the directory to export into, where to answer, and whether the requester gave
/// up waiting.
struct Request {
    dst: PathBuf,
    reply: Reply,
    abandoned: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    tracker: Tracker,
}

/// Requests waiting for the network loop, and whether it stopped taking them.
#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    closed: bool,
}

/// Export requests for a backup (shared between its control socket, which asks, and its
/// network loop, which does the work: see the module docs). Clones share one queue.
#[derive(Clone, Default)]
pub struct Exports(Arc<Shared>);

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").finish_non_exhaustive()
    }
}

impl Exports {
    /// Requests waiting to be taken.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        let q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.requests.len()
    }

    /// Asks for the committed image to be exported into `dst` (a new directory, or an empty
    /// one) and waits up to `timeout` for the answer; an export not done by then is cancelled.
    pub fn export(&self, dst: PathBuf, timeout: Duration) -> Result<Exported, BackupError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let req = Request {
            dst,
            reply,
            abandoned: abandoned.clone(),
        };
        {
            let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.closed {
                return Err(BackupError::Export("the backup is stopping".into()));
            }
            q.requests.push(req);
        }
        self.0.wake.notify_one();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                abandoned.store(true, Ordering::SeqCst);
                self.0.wake.notify_one();
                Err(BackupError::Export(format!(
                    "no export within {} s (the backup is busy or not serving): cancelled",
                    timeout.as_secs()
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(BackupError::Export(
                "the backup stopped before the export was done".into(),
            )),
        }
    }

    /// The tracker a [`Replica`] records its writes in.
    pub(crate) fn tracker(&self) -> Tracker {
        self.0.tracker.clone()
    }

    /// Resolves when there may be something to do: a new request, a thread that finished, a
    /// requester that gave up.
    pub(crate) async fn wait(&self) {
        self.0.wake.notified().await
    }

    fn wake(&self) {
        self.0.wake.notify_one();
    }
}

/// One export in progress. Dropped unfinished (the backup stopping, the requester gone), it
/// cancels its thread, stops recording, answers with an error and removes its directory.
struct Running {
    dst: PathBuf,
    reply: Option<Reply>,
    abandoned: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Passed, BackupError>>>,
    started: Instant,
    tracker: Tracker,
    gen: u64,
    /// Tries of the final step that ran more rounds instead.
    tries: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(r) = self.reply.take() {
            self.cancel.store(true, Ordering::Relaxed);
            self.tracker.stop(self.gen);
            let why = match self.abandoned.load(Ordering::SeqCst) {
                true => "the requester gave up",
                false => "the backup stopped or was promoted during the export",
            };
            let _ = r.try_send(Err(BackupError::Export(why.into())));
            // (The thread sees the cancel within a chunk; it only writes through its open
            // files, so removing the directory under it is safe.)
            remove(&self.dst);
        }
    }
}

/// The network loop's side of the exports: at most one runs; its steps are taken by
/// [`Exporter::poll`] whenever the replica is idle. Dropped (the backup stopping or being
/// promoted), it cancels what runs, the snapshot threads included.
pub(crate) struct Exporter {
    exports: Exports,
    running: Option<Running>,
    /// The snapshot threads still writing: their cancel flags and their answers.
    finishing: Vec<Finishing>,
}

/// The answer to a stopping backup's pending export.
fn stopping() -> BackupError {
    BackupError::Export("the backup stopped or was promoted during the export".into())
}

impl Drop for Exporter {
    /// The backup stops (or is promoted): everything asked is answered at once (a control
    /// request left waiting would hold the process's exit, and a promotion, for its timeout),
    /// what runs is cancelled, and no new request is taken.
    fn drop(&mut self) {
        let waiting = {
            let mut q = self
                .exports
                .0
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.closed = true;
            std::mem::take(&mut q.requests)
        };
        for r in waiting {
            let _ = r.reply.try_send(Err(stopping()));
        }
        for (cancel, reply) in &self.finishing {
            cancel.store(true, Ordering::Relaxed);
            if let Some(r) = reply.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = r.try_send(Err(stopping()));
            }
        }
    }
}

impl Exporter {
    pub(crate) fn new(exports: Exports) -> Exporter {
        Exporter {
            exports,
            running: None,
            finishing: Vec::new(),
        }
    }

    /// Whether an export is in progress.
    #[cfg(test)]
    pub(crate) fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether an export waits for its final step (the loop should take it before the next
    /// checkpoint).
    pub(crate) fn wants_final(&self) -> bool {
        self.running
            .as_ref()
            .and_then(|r| r.thread.as_ref())
            .is_some_and(|t| t.is_finished())
    }

    /// Takes what can be taken now, with the replica idle (`None`: the replica is busy).
    /// Returns quickly: at most the final step's copy runs here.
    pub(crate) fn poll(&mut self, replica: Option<&mut Replica>) {
        self.finishing.retain(|(c, _)| Arc::strong_count(c) > 1);
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.abandoned.load(Ordering::SeqCst))
        {
            self.running = None;
        }
        let Some(replica) = replica else {
            return;
        };
        let requests = std::mem::take(
            &mut self
                .exports
                .0
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .requests,
        );
        for req in requests {
            if req.abandoned.load(Ordering::SeqCst) {
                continue;
            }
            if let Some(r) = &self.running {
                let _ = req.reply.try_send(Err(BackupError::Export(format!(
                    "an export into {} is in progress: one at a time",
                    r.dst.display()
                ))));
                continue;
            }
            match self.start(replica, &req.dst, req.abandoned) {
                Ok(mut r) => {
                    r.reply = Some(req.reply);
                    self.running = Some(r);
                }
                Err(e) => {
                    let _ = req.reply.try_send(Err(e));
                }
            }
        }
        // After the requests: an export is in progress until its final step is taken, so a
        // request that comes while its copy ends is refused, one at a time, in every order.
        if self.wants_final() {
            self.step(replica);
        }
    }

    fn start(
        &self,
        replica: &mut Replica,
        dst: &Path,
        abandoned: Arc<AtomicBool>,
    ) -> Result<Running, BackupError> {
        if replica.committed_meta().is_none() {
            return Err(BackupError::NoImage {
                dir: replica.dir().to_path_buf(),
            });
        }
        // The files hold the committed checkpoint before the pass reads them; while the
        // export records, checkpoints are written through (`Replica::complete`).
        replica.flush()?;
        let Some(meta) = replica.committed_meta() else {
            return Err(BackupError::NoImage {
                dir: replica.dir().to_path_buf(),
            });
        };
        let tracker = self.exports.tracker();
        // Recording starts before the pass reads anything.
        let gen = tracker.start();
        let files = match Files::open(replica.dir(), dst, meta.mem_size, meta.disk_len) {
            Ok(f) => f,
            Err(e) => {
                tracker.stop(gen);
                if !matches!(&e, BackupError::Io { path, .. } if path == dst) {
                    remove(dst);
                }
                return Err(e);
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let (c, exports, t) = (cancel.clone(), self.exports.clone(), tracker.clone());
        let thread = self.spawn(move || copy::pass(files, &t, gen, &c), &exports);
        let thread = thread.inspect_err(|_| {
            tracker.stop(gen);
            remove(dst);
        })?;
        tracing::info!("exporting checkpoint {} into {}", meta.seq, dst.display());
        Ok(Running {
            dst: dst.to_path_buf(),
            reply: None,
            abandoned,
            cancel,
            thread: Some(thread),
            started: Instant::now(),
            tracker,
            gen,
            tries: 0,
        })
    }

    /// Runs `f` on the export's thread, waking the loop when it is done.
    fn spawn(
        &self,
        f: impl FnOnce() -> Result<Passed, BackupError> + Send + 'static,
        exports: &Exports,
    ) -> Result<JoinHandle<Result<Passed, BackupError>>, BackupError> {
        let exports = exports.clone();
        std::thread::Builder::new()
            .name("export".into())
            .spawn(move || {
                let r = f();
                exports.wake();
                r
            })
            .map_err(|e| BackupError::Export(format!("no thread for the export: {e}")))
    }

    /// The thread is done and the replica idle: more rounds if too much was recorded since
    /// (see [`MAX_FINAL_TRIES`]), else the final step.
    fn step(&mut self, replica: &Replica) {
        let Some(run) = self.running.as_mut() else {
            return;
        };
        let passed = match run.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(BackupError::Export("the export's thread failed".into())),
        };
        let again = run.tracker.pending(run.gen) > FINAL_PAGES && run.tries < MAX_FINAL_TRIES;
        match passed {
            Ok(p) if again => {
                run.tries += 1;
                let (c, t) = (run.cancel.clone(), run.tracker.clone());
                match self.spawn(move || copy::rounds(p, &t, &c), &self.exports.clone()) {
                    Ok(h) => {
                        if let Some(run) = self.running.as_mut() {
                            run.thread = Some(h);
                        }
                    }
                    Err(e) => self.fail(e),
                }
            }
            Ok(p) => self.finish(replica, p),
            Err(e) => self.fail(e),
        }
    }

    /// Ends the running export with `e` (its directory removed).
    fn fail(&mut self, e: BackupError) {
        if let Some(mut run) = self.running.take() {
            run.tracker.stop(run.gen);
            if let Some(r) = run.reply.take() {
                let _ = r.try_send(Err(e));
            }
            remove(&run.dst);
        }
    }

    /// The final step (see the module docs), then the snapshot on a thread of its own.
    fn finish(&mut self, replica: &Replica, p: Passed) {
        let t0 = Instant::now();
        let Some(mut run) = self.running.take() else {
            return;
        };
        let meta = replica.committed_meta().cloned();
        let last = (|| {
            let meta = meta.ok_or_else(|| BackupError::Export("the image is gone".into()))?;
            let (pages, blocks) = run.tracker.take(run.gen)?;
            let never = AtomicBool::new(false);
            let bytes = p.files.copy_recorded(&pages, &blocks, &never)?;
            Ok((meta, (pages.len() + blocks.len()) as u64, bytes))
        })();
        run.tracker.stop(run.gen);
        let held_us = t0.elapsed().as_micros() as u64;
        let (reply, dst, started) = (run.reply.take(), run.dst.clone(), run.started);
        let abandoned = run.abandoned.clone();
        drop(run);
        let Some(reply) = reply else { return };
        let (meta, final_pages, bytes) = match last {
            Ok(l) => l,
            Err(e) => {
                remove(&dst);
                let _ = reply.try_send(Err(e));
                return;
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let reply = Arc::new(Mutex::new(Some(reply)));
        self.finishing.push((cancel.clone(), reply.clone()));
        let spawned = std::thread::Builder::new()
            .name("export-meta".into())
            .spawn(move || {
                let flags = [&*cancel, &*abandoned];
                let r = copy::snapshot_of(&p, &meta, &flags).map(|(id, crc)| Exported {
                    id,
                    position: Position {
                        history: meta.history,
                        term: meta.term,
                        seq: meta.seq,
                    },
                    held_us,
                    final_pages,
                    rounds: p.rounds,
                    bytes: p.bytes + bytes,
                    total_ms: started.elapsed().as_millis() as u64,
                    memory_crc32: crc,
                });
                match &r {
                    Ok(e) => tracing::info!(
                        "exported checkpoint {} into {} in {} ms ({} rounds, final step {} \
                         pages/blocks in {} µs)",
                        meta.seq,
                        p.files.dst.display(),
                        e.total_ms,
                        e.rounds,
                        e.final_pages,
                        e.held_us
                    ),
                    Err(_) => remove_now(&p.files.dst),
                }
                if let Some(reply) = reply.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = reply.try_send(r);
                }
                drop(cancel);
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread to finish the export: {e}");
            remove(&dst);
        }
    }
}
