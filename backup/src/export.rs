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
//!    more than [`FINAL_PAGES`] are recorded (at most [`MAX_ROUNDS`] rounds).
//! 3. **Final step**, when the replica is idle between two checkpoints (nothing writes the image,
//!    which then holds exactly the committed checkpoint): what was recorded since is copied and
//!    the checkpoint's vCPU/device state taken. This is the only part that holds the apply loop
//!    (at most [`FINAL_PAGES`] pages plus the disk blocks, ~1–3 ms): the primary's next
//!    acknowledgement waits that long, its guest never pauses for it.
//! 4. **Snapshot** (a thread again): the frozen files are synced and described, and
//!    `snapshot.bin` written last; then the requester gets its answer.
//!
//! Why it is exact: a page written after the pass copied it is recorded after the write, and
//! every recorded page is copied again after it was recorded, by a later round or by the final
//! step; a page written before the pass reached it is copied with its new contents. A torn read
//! (the pass racing a write) is of a page recorded by that write. A full sync that replaces the
//! committed image during an export fails the export (its pages are of another image); so does
//! the backup stopping or being promoted. A failed export removes what it wrote.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::message::Position;
use protocol::page::PAGE;
use vmm::snapshot;

use crate::image::{io, ReplicaMeta};
use crate::replica::Replica;
use crate::BackupError;

/// Most recorded pages the final step copies while the apply loop waits (8 MiB); more are
/// copied by another round first.
pub const FINAL_PAGES: usize = 2048;
/// Rounds after the pass before the final step is taken whatever is recorded.
pub const MAX_ROUNDS: usize = 8;
/// Unit of the disk blocks recorded.
const BLOCK: u64 = 4096;
/// Bytes the pass copies between two checks of cancellation.
const CHUNK: u64 = 4 << 20;

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
pub type Reply = mpsc::SyncSender<Result<Exported, BackupError>>;

/// Pages and disk blocks written into the committed image since an export started.
#[derive(Debug, Clone, Default)]
pub struct Tracker(Arc<Mutex<Track>>);

#[derive(Debug, Default)]
struct Track {
    active: bool,
    replaced: bool,
    pages: BTreeSet<u64>,
    blocks: BTreeSet<u64>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self) {
        *self.lock() = Track {
            active: true,
            ..Track::default()
        };
    }

    fn stop(&self) {
        *self.lock() = Track::default();
    }

    /// Whether an export records writes now.
    pub(crate) fn active(&self) -> bool {
        self.lock().active
    }

    /// Pages and disk ranges `(offset, len)` just written into the committed image.
    pub(crate) fn record(&self, gfns: &[u64], disk: &[(u64, u64)]) {
        let mut t = self.lock();
        if !t.active {
            return;
        }
        t.pages.extend(gfns.iter().copied());
        for (off, len) in disk.iter().filter(|(_, l)| *l > 0) {
            t.blocks.extend(off / BLOCK..=(off + len - 1) / BLOCK);
        }
    }

    /// The committed image was replaced (a full sync was promoted).
    pub(crate) fn replaced(&self) {
        let mut t = self.lock();
        if t.active {
            t.replaced = true;
        }
    }

    /// Takes what was recorded (an error if the image was replaced).
    fn take(&self) -> Result<(Vec<u64>, Vec<u64>), BackupError> {
        let mut t = self.lock();
        if t.replaced {
            return Err(BackupError::Apply(
                "a full sync replaced the image during the export".into(),
            ));
        }
        let pages = std::mem::take(&mut t.pages).into_iter().collect();
        let blocks = std::mem::take(&mut t.blocks).into_iter().collect();
        Ok((pages, blocks))
    }

    fn pending(&self) -> usize {
        let t = self.lock();
        t.pages.len() + t.blocks.len()
    }
}

/// The source and destination files of an export.
struct Files {
    dst: PathBuf,
    src_mem: File,
    src_disk: Option<File>,
    mem: File,
    disk: Option<File>,
    mem_size: u64,
    disk_len: u64,
}

impl Files {
    /// Opens the committed image's files in `src` and creates `dst` (which must not exist, or
    /// be empty).
    fn open(src: &Path, dst: &Path, mem_size: u64, disk_len: u64) -> Result<Files, BackupError> {
        if let Err(e) = std::fs::create_dir(dst) {
            let empty = std::fs::read_dir(dst).is_ok_and(|mut d| d.next().is_none());
            if e.kind() != std::io::ErrorKind::AlreadyExists || !empty {
                return Err(BackupError::Io {
                    path: dst.to_path_buf(),
                    err: e,
                });
            }
        }
        let ro = |p: PathBuf| File::open(&p).map_err(io(&p));
        let sized = |p: PathBuf, len: u64| -> Result<File, BackupError> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(io(&p))?;
            f.set_len(len).map_err(io(&p))?;
            Ok(f)
        };
        let (src_disk, disk) = match disk_len {
            0 => (None, None),
            n => (
                Some(ro(src.join(snapshot::DISK_FILE))?),
                Some(sized(dst.join(snapshot::DISK_FILE), n)?),
            ),
        };
        Ok(Files {
            dst: dst.to_path_buf(),
            src_mem: ro(src.join(snapshot::MEMORY_FILE))?,
            mem: sized(dst.join(snapshot::MEMORY_FILE), mem_size)?,
            src_disk,
            disk,
            mem_size,
            disk_len,
        })
    }

    /// Copies `[start, end)` of the memory (or the disk), in chunks; stops when cancelled.
    fn copy_range(
        &self,
        disk: bool,
        (start, end): (u64, u64),
        buf: &mut [u8],
        cancel: &AtomicBool,
    ) -> Result<u64, BackupError> {
        let (src, dst, name) = match (disk, &self.src_disk, &self.disk) {
            (false, _, _) => (&self.src_mem, &self.mem, snapshot::MEMORY_FILE),
            (true, Some(s), Some(d)) => (s, d, snapshot::DISK_FILE),
            (true, _, _) => return Ok(0),
        };
        let p = self.dst.join(name);
        let mut off = start;
        while off < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(BackupError::Apply("the export was cancelled".into()));
            }
            let n = (end - off).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], off).map_err(io(&p))?;
            dst.write_all_at(&buf[..n], off).map_err(io(&p))?;
            off += n as u64;
        }
        Ok(end.saturating_sub(start))
    }

    /// Copies recorded pages and disk blocks; returns the bytes copied.
    fn copy_recorded(
        &self,
        pages: &[u64],
        blocks: &[u64],
        cancel: &AtomicBool,
    ) -> Result<u64, BackupError> {
        let mut buf = vec![0u8; PAGE.max(BLOCK as usize)];
        let mut bytes = 0;
        for g in pages {
            let off = g * PAGE as u64;
            if off + PAGE as u64 <= self.mem_size {
                bytes += self.copy_range(false, (off, off + PAGE as u64), &mut buf, cancel)?;
            }
        }
        for b in blocks {
            let off = b * BLOCK;
            let end = (off + BLOCK).min(self.disk_len);
            if off < end {
                bytes += self.copy_range(true, (off, end), &mut buf, cancel)?;
            }
        }
        Ok(bytes)
    }
}

/// What the pass thread hands to the final step.
struct Passed {
    files: Files,
    rounds: u64,
    bytes: u64,
}

/// The pass and the rounds (see the module docs).
fn pass(files: Files, tracker: &Tracker, cancel: &AtomicBool) -> Result<Passed, BackupError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bytes = 0;
    for (disk, f, len) in [
        (false, &files.src_mem, files.mem_size),
        (
            true,
            files.src_disk.as_ref().unwrap_or(&files.src_mem),
            files.disk_len,
        ),
    ] {
        if disk && files.src_disk.is_none() {
            continue;
        }
        for region in snapshot::files::data_regions(f, len) {
            bytes += files.copy_range(disk, region, &mut buf, cancel)?;
        }
    }
    let mut rounds = 0;
    while tracker.pending() > FINAL_PAGES && rounds < MAX_ROUNDS as u64 {
        let (pages, blocks) = tracker.take()?;
        bytes += files.copy_recorded(&pages, &blocks, cancel)?;
        rounds += 1;
    }
    Ok(Passed {
        files,
        rounds,
        bytes,
    })
}

/// Describes the frozen files of `dir` and writes its `snapshot.bin` (last): a full snapshot
/// of the checkpoint whose state is `state`. Returns its id and its memory's CRC32.
pub fn write_snapshot(
    dir: &Path,
    mem_size: u64,
    disk_len: u64,
    state: &[u8],
) -> Result<(u64, u32), BackupError> {
    let vm = crate::image::decode_state(state)?;
    let (memory, checksum) =
        snapshot::memory::describe_file(&dir.join(snapshot::MEMORY_FILE), mem_size)?;
    let disk = match disk_len {
        0 => None,
        len => Some(snapshot::DiskPart::Full {
            len,
            crc: snapshot::disk::file_crc(&dir.join(snapshot::DISK_FILE), len)?,
        }),
    };
    let sm = snapshot::SnapshotMeta {
        id: snapshot::new_id(),
        parent: None,
        created_unix_ms: snapshot::now_unix_ms(),
        mem_size,
        memory,
        memory_checksum: Some(checksum),
        disk,
        vm,
    };
    snapshot::write_meta(dir, &sm)?;
    Ok((sm.id, checksum))
}

/// One export in progress.
struct Running {
    dst: PathBuf,
    reply: Option<Reply>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Passed, BackupError>>>,
    started: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(r) = self.reply.take() {
            let _ = r.try_send(Err(BackupError::Apply(
                "the backup stopped or was promoted during the export".into(),
            )));
            // (The pass thread sees the cancel within a chunk; what it wrote is removed here.
            // It only writes into `dst`, which nothing else uses.)
            remove(&self.dst);
        }
    }
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing the failed export {}: {e}", dir.display());
        }
    }
}

/// A request: the directory to export into and where to answer.
struct Request {
    dst: PathBuf,
    reply: Reply,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Vec<Request>>,
    wake: tokio::sync::Notify,
    tracker: Tracker,
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
    /// Asks for the committed image to be exported into `dst` (a new directory) and waits up
    /// to `timeout` for the answer.
    pub fn export(&self, dst: PathBuf, timeout: Duration) -> Result<Exported, BackupError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.0
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Request { dst, reply });
        self.0.wake.notify_one();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(BackupError::Apply(format!(
                "no export within {} s (the backup is busy or not serving)",
                timeout.as_secs()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(BackupError::Apply(
                "the backup stopped before the export was done".into(),
            )),
        }
    }

    /// The tracker a [`Replica`] records its writes in.
    pub(crate) fn tracker(&self) -> Tracker {
        self.0.tracker.clone()
    }

    /// Resolves when there may be something to do: a new request, or a pass that finished.
    pub(crate) async fn wait(&self) {
        self.0.wake.notified().await
    }
}

/// The network loop's side of the exports: at most one runs; its steps are taken by
/// [`Exporter::poll`] whenever the replica is idle.
pub(crate) struct Exporter {
    exports: Exports,
    running: Option<Running>,
}

impl Exporter {
    pub(crate) fn new(exports: Exports) -> Exporter {
        Exporter {
            exports,
            running: None,
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

    /// Takes what can be taken now, with the replica idle (`None`: the replica is busy; only
    /// refusals are answered). Returns quickly: at most the final step's copy runs here.
    pub(crate) fn poll(&mut self, replica: Option<&Replica>) {
        let Some(replica) = replica else {
            return;
        };
        if self.wants_final() {
            self.finish(replica);
        }
        let requests = std::mem::take(
            &mut *self
                .exports
                .0
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for req in requests {
            if self.running.is_some() {
                let _ = req.reply.try_send(Err(BackupError::Apply(format!(
                    "an export into {} is in progress: one at a time",
                    self.running
                        .as_ref()
                        .map_or(PathBuf::new(), |r| r.dst.clone())
                        .display()
                ))));
                continue;
            }
            match self.start(replica, &req.dst) {
                Ok(mut r) => {
                    r.reply = Some(req.reply);
                    self.running = Some(r);
                }
                Err(e) => {
                    let _ = req.reply.try_send(Err(e));
                }
            }
        }
    }

    fn start(&self, replica: &Replica, dst: &Path) -> Result<Running, BackupError> {
        let Some(meta) = replica.committed_meta() else {
            return Err(BackupError::NoImage {
                dir: replica.dir().to_path_buf(),
            });
        };
        let tracker = self.exports.tracker();
        // Recording starts before the pass reads anything.
        tracker.start();
        let files = match Files::open(replica.dir(), dst, meta.mem_size, meta.disk_len) {
            Ok(f) => f,
            Err(e) => {
                tracker.stop();
                if !matches!(&e, BackupError::Io { path, .. } if path == dst) {
                    remove(dst);
                }
                return Err(e);
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let (c, exports) = (cancel.clone(), self.exports.clone());
        let thread = std::thread::Builder::new()
            .name("export".into())
            .spawn(move || {
                let r = pass(files, &exports.tracker(), &c);
                exports.0.wake.notify_one();
                r
            })
            .map_err(|e| {
                tracker.stop();
                remove(dst);
                BackupError::Apply(format!("no thread for the export: {e}"))
            })?;
        tracing::info!("exporting checkpoint {} into {}", meta.seq, dst.display());
        Ok(Running {
            dst: dst.to_path_buf(),
            reply: None,
            cancel,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    /// The final step (see the module docs), then the snapshot on a thread of its own.
    fn finish(&mut self, replica: &Replica) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        let tracker = self.exports.tracker();
        let t0 = Instant::now();
        let passed = match run.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(BackupError::Apply("the export's thread failed".into())),
        };
        let meta = replica.committed_meta().cloned();
        let last = passed.and_then(|p| {
            let meta = meta.ok_or_else(|| BackupError::Apply("the image is gone".into()))?;
            let (pages, blocks) = tracker.take()?;
            let bytes = p
                .files
                .copy_recorded(&pages, &blocks, &AtomicBool::new(false))?;
            Ok((p, meta, (pages.len() + blocks.len()) as u64, bytes))
        });
        tracker.stop();
        let held_us = t0.elapsed().as_micros() as u64;
        let reply = run.reply.take();
        let (dst, started) = (run.dst.clone(), run.started);
        drop(run);
        let Some(reply) = reply else { return };
        let (p, meta, final_pages, bytes) = match last {
            Ok(l) => l,
            Err(e) => {
                remove(&dst);
                let _ = reply.try_send(Err(e));
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("export-meta".into())
            .spawn(move || {
                let r = snapshot_of(&p, &meta).map(|(id, crc)| Exported {
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
                    Err(_) => remove(&p.files.dst),
                }
                let _ = reply.try_send(r);
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread to finish the export: {e}");
        }
    }
}

/// Syncs the frozen files and writes their `snapshot.bin`.
fn snapshot_of(p: &Passed, meta: &ReplicaMeta) -> Result<(u64, u32), BackupError> {
    let f = &p.files;
    let mp = f.dst.join(snapshot::MEMORY_FILE);
    f.mem.sync_all().map_err(io(&mp))?;
    if let Some(d) = &f.disk {
        let dp = f.dst.join(snapshot::DISK_FILE);
        d.sync_all().map_err(io(&dp))?;
    }
    write_snapshot(&f.dst, f.mem_size, f.disk_len, &meta.state)
}
