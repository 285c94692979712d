//! What continuous replication needs from a VM: one pause per epoch that captures the epoch's
//! dirty pages (copied), disk writes and vCPU/device state, and closes the output epoch; and
//! the output-commit controls (hold, release); and the pre-copy passes of an initial sync, which
//! copy memory while the guest keeps running.
//!
//! "Since the previous capture" means since replication's previous capture: the changes come
//! from the VM's change tracker (`crate::dirty`), so a snapshot taken in between takes nothing
//! from a checkpoint, nor a checkpoint from the snapshot chain. A capture that fails after it
//! took its changes gives them back (the next capture carries them).

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::Bytes;

use super::{lock, Vm};
use crate::devices::virtio::blk::SECTOR_SIZE;
use crate::dirty::{Consumer, Pending};
use crate::layout::PAGE_SIZE;
use crate::snapshot::SnapshotError;

/// Disk bytes read under the device lock at a time by a pre-copy slice (and the unit in which
/// zero chunks are skipped).
const SLICE_CHUNK: u64 = 64 << 10;

/// Full (initial sync) or incremental capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    /// Every non-zero page, the whole disk, the state; arms output commit.
    Full,
    /// Pages dirtied and disk writes made since the previous capture.
    Incremental,
}

/// The disk part of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskCapture {
    /// No disk.
    None,
    /// The whole disk (initial sync, or the write log overflowed).
    Full(Vec<u8>),
    /// Writes since the previous capture, in order.
    Writes(Vec<(u64, Vec<u8>)>),
}

/// One epoch, captured in one pause.
#[derive(Debug)]
pub struct EpochCapture {
    /// Output epoch closed by this capture (frames of it may be released once it is safe).
    pub epoch: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Guest frame numbers of `data`, ascending.
    pub pages: Vec<u64>,
    /// Page contents, 4 KiB each, in `pages` order.
    pub data: Vec<u8>,
    /// The disk part.
    pub disk: DiskCapture,
    /// `VmState`, postcard-encoded (the snapshot format's state).
    pub state: Vec<u8>,
    /// Guest RAM size.
    pub mem_size: u64,
    /// For a full capture: what changed since the previous replication capture (dirty pages
    /// and disk writes), so it can also serve backups that hold the previous state. For pre-copy round
    /// 0: what changed since the previous capture and is no longer tracked (the round restarts
    /// tracking). `None` otherwise.
    pub changes: Option<Changes>,
    /// Disk ranges read while paused at the caller's request (`capture_epoch_with`): their
    /// contents as of this capture, after the epoch's writes.
    pub extra_disk: Vec<(u64, Vec<u8>)>,
}

/// The changes since the previous capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Pages dirtied (vCPU or device), ascending.
    pub dirty: Vec<u64>,
    /// Disk writes in order, or the whole disk if they were not all recorded.
    pub disk: DiskCapture,
}

/// Largest page buffer kept for reuse (a checkpoint of 16,384 dirty pages).
pub const POOLED_MAX: usize = 64 << 20;

fn capture_err(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Capture(e.to_string())
}

/// An incremental capture runs its pause at real-time priority only if the one before had at
/// most this many pages (64 MiB: tens of ms of copying at most).
pub const BOOST_MAX_PAGES: usize = 16_384;

impl Vm {
    /// Pauses (if running), captures one epoch, closes the output epoch, resumes.
    pub fn capture_epoch(&self, kind: CaptureKind) -> Result<EpochCapture, SnapshotError> {
        self.capture_epoch_with(kind, &[])
    }

    /// [`capture_epoch`](Self::capture_epoch) that also reads the disk ranges `(offset, len)`
    /// in the same pause (a quick resync needs the current contents of the blocks a backup
    /// missed). Ranges beyond the disk are clipped.
    pub fn capture_epoch_with(
        &self,
        kind: CaptureKind,
        disk_ranges: &[(u64, u64)],
    ) -> Result<EpochCapture, SnapshotError> {
        let mut last_pages = lock(&self.captures);
        let t0 = Instant::now();
        // Pauses are counted: this one nests inside a user's pause without ending it. An
        // incremental capture is short: its pause path may run at real-time priority — unless
        // the last one was big (a guest writing a gigabyte made 262,000-page captures of
        // 0.5–2.5 s: no thread may run real-time that long).
        let must_resume = self.thread_running();
        let mut boosted = None;
        let small = *last_pages <= BOOST_MAX_PAGES;
        let boostable =
            must_resume && small && kind == CaptureKind::Incremental && disk_ranges.is_empty();
        // (`--rt-pause auto` boosts once such pauses are seen waiting for the scheduler.)
        let probe = boostable
            .then(|| self.control.boost.probe(self.control.vcpu_tid()))
            .flatten();
        if boostable {
            boosted = Some(self.pause_boosted().map_err(capture_err)?);
        } else if must_resume {
            self.pause().map_err(capture_err)?;
        }
        // The ranges are read first: nothing can fail after the epoch's changes are taken
        // but before they are in the capture (a failed capture gives them back).
        let r = self.read_disk_ranges(disk_ranges).and_then(|extra| {
            let mut c = self.capture_epoch_paused(kind)?;
            c.extra_disk = extra;
            Ok(c)
        });
        let raised = boosted.as_ref().is_some_and(|b| b.any());
        let still = match boosted {
            Some(b) => Some(self.resume_boosted(b)),
            None if must_resume => {
                self.resume();
                None
            }
            None => None,
        };
        // The pause ends when the vCPU is released; this thread is lowered after that.
        let pause = t0.elapsed();
        if let Some(b) = still {
            self.lower_boosted(b);
        }
        if boostable {
            self.control.boost.observe(probe, pause, raised);
        }
        let mut c = match r {
            Ok(c) => c,
            Err(e) => {
                self.give_back_epoch_pre();
                return Err(e);
            }
        };
        c.pause = pause;
        self.merge_epoch_pre(&mut c, kind);
        *last_pages = c.pages.len();
        Ok(c)
    }

    /// Gives back the page buffer of a capture the caller is done with (`EpochCapture::data`):
    /// a later capture copies its pages into it (no allocation, no page faults in the pause).
    /// It is refilled to its capacity here, outside any pause, so the next capture never has
    /// to grow it within that. Buffers above [`POOLED_MAX`], beyond two, or much larger than
    /// what their capture used (a full capture's, then an epoch's: the refill would rewrite
    /// the difference after every epoch) are dropped.
    pub fn recycle_capture(&self, mut data: Vec<u8>) {
        let used = data.len().max(256 << 10);
        let full = lock(&self.capture_pool).len() >= 2;
        if full || data.capacity() > POOLED_MAX || data.capacity() > 4 * used {
            self.unlock_buffer(data.as_ptr() as usize, data.capacity());
            return;
        }
        data.resize(data.capacity(), 0);
        // (Locked only once it is pooled; unlocked when the pool drops it.)
        self.lock_buffer(&data);
        lock(&self.capture_pool).push(data);
    }

    fn capture_epoch_paused(&self, kind: CaptureKind) -> Result<EpochCapture, SnapshotError> {
        use std::sync::atomic::Ordering::Relaxed;
        // (A little more than the last: the varint-encoded counters and registers move the
        // length by a few bytes from one capture to the next.)
        let last = self.state_len.load(Relaxed);
        let buf = Vec::with_capacity(last + last / 8 + 64);
        let state = postcard::to_extend(&self.capture_state()?, buf).map_err(capture_err)?;
        self.state_len.store(state.len(), Relaxed);
        // Replication's changes since its previous capture (a snapshot taken meanwhile took
        // nothing from them).
        let ch = self
            .take_changes(Consumer::Replication, false)
            .map_err(capture_err)?;
        let full = kind == CaptureKind::Full;
        let (pages, data, whole_disk) = match self.copy_epoch(kind, &ch) {
            Ok(c) => c,
            Err(e) => {
                self.give_back(Consumer::Replication, ch);
                return Err(e);
            }
        };
        // A full capture also keeps the dirty list and the writes (see `Changes`); an
        // incremental one sends them.
        let dirty = match full {
            true => ch.page_list(self.mem_size / PAGE_SIZE),
            false => Vec::new(),
        };
        let (disk, disk_changes) = match (&self.devices.blk, whole_disk) {
            (None, _) => (DiskCapture::None, DiskCapture::None),
            (Some(_), None) => (DiskCapture::Writes(ch.disk.writes), DiskCapture::None),
            (Some(_), Some(buf)) => {
                let changes = match (full, ch.disk.overflowed) {
                    (true, false) => DiskCapture::Writes(ch.disk.writes),
                    (true, true) => DiskCapture::Full(buf.clone()),
                    (false, _) => DiskCapture::None,
                };
                (DiskCapture::Full(buf), changes)
            }
        };
        let epoch = match &self.devices.net {
            Some(n) => {
                let mut t = lock(n);
                t.with_device_unchecked(|net| {
                    if kind == CaptureKind::Full && net.held_output().is_none() {
                        // Checkpoint 0 is this capture: output from now on belongs to epoch 1.
                        net.enable_output_commit(1, crate::devices::virtio::net::DEFAULT_MAX_HELD);
                        0
                    } else {
                        // Output held since boot is epoch 0 and leaves with checkpoint 0.
                        net.advance_output_epoch().unwrap_or(0)
                    }
                })
            }
            None => 0,
        };
        Ok(EpochCapture {
            epoch,
            pause: Duration::ZERO,
            pages,
            data,
            disk,
            state,
            mem_size: self.mem_size,
            changes: full.then_some(Changes {
                dirty,
                disk: disk_changes,
            }),
            extra_disk: Vec::new(),
        })
    }

    /// The fallible copies of a capture, given its changes `ch`: the pages (every non-zero
    /// page, or the dirty ones), their contents, and the whole disk if the capture is full or
    /// the disk writes were not all recorded.
    #[allow(clippy::type_complexity)]
    fn copy_epoch(
        &self,
        kind: CaptureKind,
        ch: &Pending,
    ) -> Result<(Vec<u64>, Vec<u8>, Option<Vec<u8>>), SnapshotError> {
        let pages = match kind {
            CaptureKind::Incremental => ch.page_list(self.mem_size / PAGE_SIZE),
            CaptureKind::Full => self.nonzero_pages(0..self.mem_size / PAGE_SIZE)?,
        };
        let mut data = lock(&self.capture_pool).pop().unwrap_or_default();
        crate::snapshot::memory::stage_pages(&self.mem, &pages, &mut data)?;
        data.truncate(pages.len() * PAGE_SIZE as usize);
        let whole_disk = match &self.devices.blk {
            Some(b) if kind == CaptureKind::Full || ch.disk.overflowed => {
                use std::os::unix::fs::FileExt;
                let t = lock(b);
                let len = t.device().sectors() * SECTOR_SIZE;
                let mut buf = vec![0u8; len as usize];
                t.device()
                    .disk()
                    .read_exact_at(&mut buf, 0)
                    .map_err(capture_err)?;
                Some(buf)
            }
            _ => None,
        };
        Ok((pages, data, whole_disk))
    }

    /// Contents of the disk ranges `(offset, len)`, clipped to the disk (the VM is paused).
    fn read_disk_ranges(
        &self,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let Some(b) = &self.devices.blk else {
            return Ok(Vec::new());
        };
        let t = lock(b);
        let size = t.device().sectors() * SECTOR_SIZE;
        let mut out = Vec::with_capacity(ranges.len());
        for &(off, len) in ranges {
            let end = off.saturating_add(len).min(size);
            if off >= end {
                continue;
            }
            let mut buf = vec![0u8; (end - off) as usize];
            t.device()
                .disk()
                .read_exact_at(&mut buf, off)
                .map_err(capture_err)?;
            out.push((off, buf));
        }
        Ok(out)
    }

    /// Guest frame numbers of the pages that are not all zero.
    fn nonzero_pages(&self, range: Range<u64>) -> Result<Vec<u64>, SnapshotError> {
        let mut nonzero = Vec::new();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for pfn in range {
            self.mem
                .read_slice(&mut page, crate::memory::page_addr(pfn))
                .map_err(capture_err)?;
            // OR-folding fixed chunks vectorizes; an early-exit byte loop does not.
            if page
                .chunks(64)
                .any(|c| c.iter().fold(0u8, |a, &b| a | b) != 0)
            {
                nonzero.push(pfn);
            }
        }
        Ok(nonzero)
    }

    /// First pre-copy pass of a full sync, while the guest runs: starts dirty tracking and
    /// disk-write recording afresh, then copies the first slice of round 0 (see
    /// [`precopy_slice`](Self::precopy_slice)). What the guest changes meanwhile is tracked, so a
    /// torn copy is sent again by a later pass.
    pub fn precopy_start(
        &self,
        pages: Range<u64>,
        disk: Range<u64>,
    ) -> Result<EpochCapture, SnapshotError> {
        let _one = lock(&self.captures);
        // What changed since the previous capture is no longer tracked after this: returned as
        // `changes`, so a caller that tracks changes per checkpoint (quick resync) loses nothing.
        let ch = self
            .take_changes(Consumer::Replication, true)
            .map_err(capture_err)?;
        let mut cap = match self.slice_capture(pages, disk) {
            Ok(c) => c,
            Err(e) => {
                self.give_back(Consumer::Replication, ch);
                return Err(e);
            }
        };
        let mut dirty = ch.page_list(self.mem_size / PAGE_SIZE);
        self.fold_epoch_pre(&mut dirty);
        let disk_changes = match (&self.devices.blk, ch.disk.overflowed) {
            (None, _) => DiskCapture::None,
            (Some(_), false) => DiskCapture::Writes(ch.disk.writes),
            // Not recorded (first sync) or overflowed: round 0 copies the whole disk anyway.
            (Some(_), true) => DiskCapture::Full(Vec::new()),
        };
        cap.changes = Some(Changes {
            dirty,
            disk: disk_changes,
        });
        Ok(cap)
    }

    /// A later slice of pre-copy round 0, while the guest runs (tracking was restarted by
    /// [`precopy_start`](Self::precopy_start)): the non-zero pages among guest frames `pages`
    /// and the non-zero 64 KiB chunks of the disk bytes `disk` (both clipped to the VM), as
    /// disk writes. Round 0 goes in slices so that no buffer, checkpoint or staging area on
    /// either side has to hold a whole big guest.
    pub fn precopy_slice(
        &self,
        pages: Range<u64>,
        disk: Range<u64>,
    ) -> Result<EpochCapture, SnapshotError> {
        let _one = lock(&self.captures);
        self.slice_capture(pages, disk)
    }

    fn slice_capture(
        &self,
        pages: Range<u64>,
        disk: Range<u64>,
    ) -> Result<EpochCapture, SnapshotError> {
        let (pages, data, disk) = self.copy_slice(pages, disk)?;
        Ok(EpochCapture {
            epoch: 0,
            pause: Duration::ZERO,
            pages,
            data,
            disk,
            state: Vec::new(),
            mem_size: self.mem_size,
            changes: None,
            extra_disk: Vec::new(),
        })
    }

    /// Size of the disk in bytes (0 without one).
    pub fn disk_len(&self) -> u64 {
        self.devices
            .blk
            .as_ref()
            .map_or(0, |b| lock(b).device().sectors() * SECTOR_SIZE)
    }

    /// The copies of one slice of pre-copy round 0, while the guest runs.
    fn copy_slice(
        &self,
        pages: Range<u64>,
        disk: Range<u64>,
    ) -> Result<(Vec<u64>, Vec<u8>, DiskCapture), SnapshotError> {
        let last = self.mem_size / PAGE_SIZE;
        let pages = self.nonzero_pages(pages.start.min(last)..pages.end.min(last))?;
        let mut data = Vec::new();
        crate::snapshot::memory::stage_pages(&self.mem, &pages, &mut data)?;
        let disk = match &self.devices.blk {
            None => DiskCapture::None,
            Some(b) => {
                // Read under the device lock a chunk at a time, so no request is half applied
                // in what we read; writes after the chunk are recorded and replayed later.
                use std::os::unix::fs::FileExt;
                let len = lock(b).device().sectors() * SECTOR_SIZE;
                let mut chunks = Vec::new();
                let mut off = disk.start.min(len);
                while off < disk.end.min(len) {
                    let n = (disk.end.min(len) - off).min(SLICE_CHUNK);
                    let mut buf = vec![0u8; n as usize];
                    let t = lock(b);
                    t.device()
                        .disk()
                        .read_exact_at(&mut buf, off)
                        .map_err(capture_err)?;
                    drop(t);
                    // The side image on the backup starts zeroed: zero chunks need not travel.
                    if buf.iter().any(|&x| x != 0) {
                        chunks.push((off, buf));
                    }
                    off += n;
                }
                DiskCapture::Writes(chunks)
            }
        };
        Ok((pages, data, disk))
    }

    /// A later pre-copy pass, while the guest runs: the pages dirtied since the previous pass
    /// (by the vCPU or a device), copied. Disk writes stay pending for the final capture.
    pub fn precopy_pass(&self) -> Result<EpochCapture, SnapshotError> {
        let _one = lock(&self.captures);
        let (pages, data) = self.copy_dirty_running()?;
        Ok(EpochCapture {
            epoch: 0,
            pause: Duration::ZERO,
            pages,
            data,
            disk: DiskCapture::Writes(Vec::new()),
            state: Vec::new(),
            mem_size: self.mem_size,
            changes: None,
            extra_disk: Vec::new(),
        })
    }

    /// Takes replication's dirty pages while the guest runs and copies them (after the harvest
    /// protected them again: a write during the copy is in the next harvest); on failure they
    /// are pending again. Page numbers ascending, and their contents.
    pub(crate) fn copy_dirty_running(&self) -> Result<(Vec<u64>, Vec<u8>), SnapshotError> {
        let dirty = self
            .take_dirty_running(Consumer::Replication)
            .map_err(capture_err)?;
        let pages = dirty.pages(self.mem_size / PAGE_SIZE);
        let mut data = Vec::new();
        if let Err(e) = crate::snapshot::memory::stage_pages(&self.mem, &pages, &mut data) {
            let taken = Pending {
                dirty,
                ..Default::default()
            };
            self.give_back(Consumer::Replication, taken);
            return Err(e);
        }
        data.truncate(pages.len() * PAGE_SIZE as usize);
        Ok((pages, data))
    }

    /// Releases guest output of epochs up to `upto` (checkpoint `upto` is safe on the backups);
    /// a frame that would leave after `not_after` is dropped instead (see
    /// `Net::release_output`).
    pub fn release_output(&self, upto: u64, not_after: Option<Instant>) -> usize {
        let mut released = 0;
        if let Some(n) = &self.devices.net {
            let _ = lock(n).with_device(|net, queues, mem| {
                released = net.release_output(upto, not_after, queues, mem)?;
                Ok(false)
            });
        }
        released
    }

    /// Holds every frame the guest sends from now on (epoch 0) until it is released: a protected
    /// VM calls this before it starts, so nothing leaves before the initial sync is safe.
    pub fn hold_output_from_start(&self) {
        if let Some(n) = &self.devices.net {
            lock(n).with_device_unchecked(|net| {
                net.enable_output_commit(0, crate::devices::virtio::net::DEFAULT_MAX_HELD)
            });
        }
    }

    /// Runs `waker` (on the vCPU thread, keep it short) whenever guest output starts waiting
    /// for a checkpoint: the first frame held in an output epoch. If armed
    /// ([`set_pause_at_output`](Self::set_pause_at_output)), the vCPU pauses first.
    pub fn set_output_waker(&self, waker: Option<crate::devices::virtio::net::OutputWaker>) {
        let waker = waker.map(|w| {
            let control = self.control.clone();
            Arc::new(move || {
                control.pause_at_output();
                w();
            }) as crate::devices::virtio::net::OutputWaker
        });
        if let Some(n) = &self.devices.net {
            lock(n).with_device_unchecked(|net| net.set_output_waker(waker));
        }
    }

    /// Whether the next guest output that starts waiting pauses the vCPU at once, on its own
    /// thread, for the capture the output wakes up (`crate::vcpu`, "a pause at guest output"):
    /// the capture then adopts that pause instead of kicking the vCPU out of the guest, and
    /// the vCPU parks while the capturing thread wakes up rather than after. Arm it only
    /// when such output is captured at once; an unadopted pause ends after
    /// [`crate::vcpu::PRE_PAUSE_MAX`] (see [`set_pause_at_output_wait`](Self::set_pause_at_output_wait)).
    /// One pause per arming.
    pub fn set_pause_at_output(&self, on: bool) {
        self.control.arm_output_pause(on);
    }

    /// How long a pause taken at guest output waits for its capture before the vCPU runs on
    /// (default [`crate::vcpu::PRE_PAUSE_MAX`]; tests that look at the pause make it long).
    pub fn set_pause_at_output_wait(&self, d: Duration) {
        self.control.set_pre_pause_max(d);
    }

    /// Pauses taken at guest output so far (see [`set_pause_at_output`](Self::set_pause_at_output)).
    pub fn output_pauses(&self) -> crate::vcpu::OutputPauses {
        self.control.output_pauses()
    }

    /// Stops holding output (unprotected operation); held frames are sent.
    pub fn disable_output_commit(&self) {
        if let Some(n) = &self.devices.net {
            lock(n).with_device_unchecked(|net| net.disable_output_commit());
        }
    }

    /// True if guest output of the current epoch waits for a checkpoint not yet taken.
    pub fn output_waiting(&self) -> bool {
        self.devices
            .net
            .as_ref()
            .is_some_and(|n| lock(n).device().output_waiting())
    }

    /// (frames, bytes, current epoch) of held output, if output commit is on.
    pub fn held_output(&self) -> Option<(usize, usize, u64)> {
        self.devices
            .net
            .as_ref()
            .and_then(|n| lock(n).device().held_output())
    }
}
