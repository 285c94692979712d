//! The replica image a backup keeps: guest memory and disk as files, plus the latest state.
//!
//! ```text
//! <dir>/memory.bin   guest RAM as of the committed checkpoint (sparse, full size)
//! <dir>/disk.img     the disk as of the committed checkpoint
//! <dir>/replica.bin  position (history, term, seq), sizes and the vCPU/device state (CRC-framed)
//! <dir>/journal-N.bin  the redo journal, a ring of 16 slots (see [`journal`])
//! <dir>/incoming/    a full sync in progress: the side image (see [`promote`])
//! <dir>/lock         held by the process working on the image (see [`lock`])
//! <dir>/replica.consumed  replica.bin of an image a new primary took over (see below)
//! ```
//! The image in `<dir>` is the *committed* one: always a consistent checkpoint, named by its
//! [`Position`] `(history, term, seq)`. Checkpoints of the same history and term are applied to
//! it in seq order — an incremental one (seq + 1) or a quick resync (from its seq, any later
//! seq) — in two steps: [`ReplicaImage::stage`] decodes the pages and writes the journal (the
//! checkpoint is now durable and may be acknowledged), [`ReplicaImage::complete`] writes the
//! image files in place — a small checkpoint's pages at the next flush of the write-back
//! ([`write_back`], once per journal ring). A backup killed at any moment leaves an image [`recover`] brings to the
//! last journaled checkpoint; `replica.bin` is rewritten only by promotion and by
//! [`recover`]/[`finalize`].
//!
//! A full sync never touches the committed image: it builds a side image in `<dir>/incoming/`
//! ([`ReplicaImage::create`]), *syncing* (pages, no state) through its pre-copy rounds, which
//! the first checkpoint with state makes consistent; it then replaces the committed image
//! atomically ([`promote`]) before that checkpoint is acknowledged. [`finalize`] turns the
//! committed image into a snapshot directory (`snapshot.bin`) that `vmatrix restore` starts;
//! an image fenced beyond its term (a promotion) is only recovered, and started from its parts.
//!
//! A VM starts from the committed image ([`committed_locked`]) with guest RAM mapped from
//! `memory.bin` and a working disk made by [`working_disk_locked`]: a clone of `disk.img` where
//! the file system can, else (a new primary taking the image over) `disk.img` itself under the
//! working disk's name, and then the image is consumed ([`consume_locked`]) right before the
//! guest runs: it holds no checkpoint from then on (docs/failover.md, "Promotion").
//!
//! [`journal`]: crate::journal
//! [`write_back`]: crate::write_back
//! [`promote`]: crate::promote
//! [`lock`]: crate::lock

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protocol::message::Position;
use protocol::page::{decode_into, PAGE};
use protocol::{Checkpoint, Kind};
use serde::{Deserialize, Serialize};
use vmm::snapshot::{self, format, VmState};

use crate::journal::{self, Journal};
use crate::mem_file::MemFile;
use crate::write_back::WriteBack;
use crate::{promote, BackupError};

/// Largest disk a pre-copy round may write to before the state tells the real size (1 TiB).
const MAX_SYNC_DISK: u64 = 1 << 40;
/// The image's facts ([`ReplicaMeta`]) in an image directory.
pub const REPLICA_FILE: &str = "replica.bin";

/// Persistent facts about the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeta {
    /// History id of the primary whose checkpoints these are.
    pub history: u64,
    /// Term of that primary.
    pub term: u64,
    /// Seq of the last applied checkpoint.
    pub seq: u64,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Disk size (0: no disk).
    pub disk_len: u64,
    /// `VmState`, postcard-encoded; empty while the image is syncing (pre-copy rounds only).
    pub state: Vec<u8>,
}

impl ReplicaMeta {
    /// No checkpoint with state applied yet.
    pub fn syncing(&self) -> bool {
        self.state.is_empty()
    }

    /// The consistent checkpoint this records; None while syncing.
    pub fn position(&self) -> Option<Position> {
        (!self.syncing()).then_some(Position {
            history: self.history,
            term: self.term,
            seq: self.seq,
        })
    }

    /// The vCPU and device state of the checkpoint.
    pub fn vm_state(&self) -> Result<VmState, BackupError> {
        decode_state(&self.state)
    }
}

/// The primary a checkpoint comes from: its session's history id and term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// History id (`Hello.history`).
    pub history: u64,
    /// Term.
    pub term: u64,
}

/// An open replica image (the committed one, or a side image).
pub struct ReplicaImage {
    dir: PathBuf,
    mem: MemFile,
    disk: Option<File>,
    meta: ReplicaMeta,
    /// The journal ring's slot files, open, with their lengths.
    slots: Vec<Option<(File, u64)>>,
    /// Journal records written (the next goes into slot `records % SLOTS`).
    records: u64,
    /// Journal records whose checkpoints are not all in the image files yet.
    unflushed: usize,
    /// Seq of the newest checkpoint entirely in the image files.
    base: u64,
    /// Small checkpoints' writes waiting for the next flush.
    wb: WriteBack,
}

/// A checkpoint between [`ReplicaImage::stage`] and [`ReplicaImage::complete`].
pub struct Staged {
    journal: Box<Journal>,
    /// The pages' new contents, whole (4 KiB each, in the journal's `gfns` order).
    pages: Vec<u8>,
    ends_sync: bool,
    /// Its journal record was written (a consistent image): its writes may wait.
    journaled: bool,
}

impl Staged {
    /// Small enough to write in place on the session loop (see `crate::applier`): an
    /// incremental checkpoint's pages and disk writes within the inline bounds.
    pub(crate) fn small(&self) -> bool {
        !self.ends_sync && crate::applier::inline(self.journal.gfns.len(), &self.journal.disk)
    }

    /// The pages and disk ranges `(offset, len)` it writes into the image.
    pub(crate) fn writes(&self) -> (Vec<u64>, Vec<(u64, u64)>) {
        let disk = self.journal.disk.iter();
        let disk = disk.map(|(o, d)| (*o, d.len() as u64)).collect();
        (self.journal.gfns.clone(), disk)
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |err| BackupError::Io {
        path: path.to_path_buf(),
        err,
    }
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<VmState, BackupError> {
    postcard::from_bytes(bytes)
        .map_err(|e| BackupError::Apply(format!("state does not decode: {e}")))
}

fn open_rw(path: &Path) -> Result<File, BackupError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))
}

/// Creates (or empties) `path` with length `len`, open for reading and writing.
fn create_sized(path: &Path, len: u64) -> Result<File, BackupError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(len).map_err(io(path))?;
    Ok(f)
}

/// Maps an image's memory file (see [`MemFile`]), which has the image's RAM size.
fn map_mem(dir: &Path, f: File) -> Result<MemFile, BackupError> {
    let p = dir.join(snapshot::MEMORY_FILE);
    let len = f.metadata().map_err(io(&p))?.len();
    MemFile::map(f, len).map_err(io(&p))
}

impl ReplicaImage {
    /// Starts a side image for a full sync in `<image_dir>/incoming/` from an initial sync
    /// (`Sync`, consistent at once) or a first pre-copy round (`PreCopy`, syncing), replacing
    /// whatever an earlier, abandoned sync left there. The committed image is not touched;
    /// nothing is recorded in `replica.bin` until [`promote`](crate::promote::promote).
    pub fn create(
        image_dir: &Path,
        origin: Origin,
        cp: &Checkpoint,
    ) -> Result<ReplicaImage, BackupError> {
        let (state, disk_len) = match cp.kind {
            Kind::Sync => {
                let state = usable_state(cp)?;
                let len = disk_len_of(&decode_state(&state)?);
                (state, len)
            }
            Kind::PreCopy => (Vec::new(), 0),
            k => {
                return Err(BackupError::Apply(format!(
                    "a {k:?} checkpoint ({}) does not start an image",
                    cp.epoch
                )))
            }
        };
        let max = vmm::layout::MAX_MEM_MIB << 20;
        if cp.mem_size == 0 || !cp.mem_size.is_multiple_of(PAGE as u64) || cp.mem_size > max {
            return Err(BackupError::Apply(format!(
                "guest RAM of {} bytes (whole pages, at most {max})",
                cp.mem_size
            )));
        }
        promote::abandon(image_dir)?;
        let dir = promote::incoming(image_dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mem = map_mem(
            &dir,
            create_sized(&dir.join(snapshot::MEMORY_FILE), cp.mem_size)?,
        )?;
        // While syncing the disk's size is unknown: the file grows with the chunks written.
        let disk_path = dir.join(snapshot::DISK_FILE);
        let disk = match (cp.kind, disk_len) {
            (Kind::PreCopy, _) => Some(create_sized(&disk_path, 0)?),
            (_, 0) => None,
            (_, n) => Some(create_sized(&disk_path, n)?),
        };
        let img = ReplicaImage {
            dir,
            mem,
            disk,
            meta: ReplicaMeta {
                history: origin.history,
                term: origin.term,
                seq: cp.epoch,
                mem_size: cp.mem_size,
                disk_len,
                // With its state (a `Sync`) the image is consistent: disk writes must fit.
                state,
            },
            slots: Vec::new(),
            records: 0,
            unflushed: 0,
            base: cp.epoch,
            wb: WriteBack::default(),
        };
        let (gfns, data, _) = img.decode_pages(cp)?;
        img.check_disk(cp)?;
        img.write_in_place(&gfns, &data, &cp.disk)?;
        Ok(img)
    }

    /// Opens the committed image in `dir` (recovered: see [`recover`]) to apply checkpoints to
    /// it. Its snapshot (`snapshot.bin`), if finalized before, is removed: the image files are
    /// about to change ([`finalize`] writes it again).
    pub fn open(dir: &Path) -> Result<ReplicaImage, BackupError> {
        let meta = read_meta(dir)?;
        if meta.syncing() {
            return Err(BackupError::Apply(format!(
                "{}: the image records no consistent checkpoint",
                dir.display()
            )));
        }
        let sized = |name: &str, len: u64| -> Result<File, BackupError> {
            let p = dir.join(name);
            let f = open_rw(&p)?;
            let got = f.metadata().map_err(io(&p))?.len();
            if got != len {
                return Err(BackupError::Apply(format!(
                    "{}: {got} bytes, the image records {len}",
                    p.display()
                )));
            }
            Ok(f)
        };
        let mem = map_mem(dir, sized(snapshot::MEMORY_FILE, meta.mem_size)?)?;
        let disk = match meta.disk_len {
            0 => None,
            n => Some(sized(snapshot::DISK_FILE, n)?),
        };
        promote::remove_file_if_present(&dir.join(snapshot::META_FILE))?;
        Ok(ReplicaImage {
            dir: dir.to_path_buf(),
            mem,
            disk,
            base: meta.seq,
            meta,
            slots: Vec::new(),
            records: 0,
            unflushed: 0,
            wb: WriteBack::default(),
        })
    }

    /// True while no checkpoint with state has been applied (a full sync in progress).
    pub fn syncing(&self) -> bool {
        self.meta.syncing()
    }

    /// Seq of the last applied checkpoint.
    pub fn seq(&self) -> u64 {
        self.meta.seq
    }

    /// The image's facts.
    pub fn meta(&self) -> &ReplicaMeta {
        &self.meta
    }

    /// The consistent checkpoint the image holds; None while syncing.
    pub fn position(&self) -> Option<Position> {
        self.meta.position()
    }

    /// The primary whose checkpoints the image holds.
    pub fn origin(&self) -> Origin {
        Origin {
            history: self.meta.history,
            term: self.meta.term,
        }
    }

    /// Directory of the image's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The new contents of the checkpoint's pages (decoded against the image's current ones).
    /// With each page, the byte ranges its encoding changed, where it names them (what the
    /// journal keeps of it).
    fn decode_pages(&self, cp: &Checkpoint) -> Result<journal::Pages, BackupError> {
        if cp.mem_size != self.meta.mem_size {
            return Err(BackupError::Apply("guest RAM size changed".into()));
        }
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        let mut gfns = Vec::with_capacity(cp.pages.len());
        let mut data = vec![0u8; cp.pages.len() * PAGE];
        let mut ranges = Vec::with_capacity(cp.pages.len());
        // Each page's current contents are read into its slot and decoded there (no buffer
        // per page: BENCHMARKS.md, "Time without an exit").
        for ((gfn, enc), slot) in cp.pages.iter().zip(data.chunks_exact_mut(PAGE)) {
            let off = gfn
                .checked_mul(PAGE as u64)
                .filter(|o| o + PAGE as u64 <= self.meta.mem_size)
                .ok_or_else(|| BackupError::Apply(format!("page {gfn} beyond guest RAM")))?;
            if enc.relative() {
                match self.wb.page(*gfn) {
                    Some(page) => slot.copy_from_slice(page),
                    None => self.mem.read_exact_at(slot, off).map_err(io(&mp))?,
                }
            }
            decode_into(*gfn, enc, slot)?;
            gfns.push(*gfn);
            ranges.push(protocol::page::changed_ranges(enc));
        }
        Ok((gfns, data, ranges))
    }

    /// Refuses disk writes the image cannot hold.
    fn check_disk(&self, cp: &Checkpoint) -> Result<(), BackupError> {
        if cp.disk.is_empty() {
            return Ok(());
        }
        if self.disk.is_none() {
            return Err(BackupError::Apply(
                "disk writes for a VM without a disk".into(),
            ));
        }
        let limit = match self.meta.syncing() {
            true => MAX_SYNC_DISK,
            false => self.meta.disk_len,
        };
        for (off, data) in &cp.disk {
            if off
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > limit)
            {
                return Err(BackupError::Apply(format!(
                    "disk write at {off} beyond the disk"
                )));
            }
        }
        Ok(())
    }

    /// Writes pages and disk writes into the image files (idempotent: a redo is harmless).
    fn write_in_place(
        &self,
        gfns: &[u64],
        data: &[u8],
        disk: &[(u64, Vec<u8>)],
    ) -> Result<(), BackupError> {
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        // One write per run of consecutive pages (their data is consecutive too).
        let mut i = 0;
        while i < gfns.len() {
            let mut n = 1;
            while i + n < gfns.len() && gfns[i + n] == gfns[i] + n as u64 {
                n += 1;
            }
            self.mem
                .write_all_at(&data[i * PAGE..(i + n) * PAGE], gfns[i] * PAGE as u64)
                .map_err(io(&mp))?;
            i += n;
        }
        if let Some(d) = &self.disk {
            let dp = self.dir.join(snapshot::DISK_FILE);
            for (off, bytes) in disk {
                d.write_all_at(bytes, *off).map_err(io(&dp))?;
            }
        }
        Ok(())
    }

    /// Applies the next checkpoint in one go ([`stage`](Self::stage) then
    /// [`complete`](Self::complete)).
    pub fn apply(&mut self, cp: &Checkpoint, origin: Origin) -> Result<(), BackupError> {
        let s = self.stage(cp, origin)?;
        self.complete(s)
    }

    /// Checks that `cp` from `origin` applies to the image as it is; returns its state bytes.
    fn check_next(&self, cp: &Checkpoint, origin: Origin) -> Result<Vec<u8>, BackupError> {
        if origin != self.origin() {
            return Err(BackupError::Apply(format!(
                "checkpoint {} is of history {:#x} term {}, the image of history {:#x} term {}",
                cp.epoch, origin.history, origin.term, self.meta.history, self.meta.term
            )));
        }
        let at = self.meta.seq;
        let follows = self.meta.seq.checked_add(1) == Some(cp.epoch);
        match cp.kind {
            Kind::PreCopy if self.meta.syncing() && follows => Ok(Vec::new()),
            Kind::Incremental if follows => usable_state(cp),
            Kind::Resync { from } if !self.meta.syncing() && from == at && cp.epoch > from => {
                usable_state(cp)
            }
            Kind::Resync { from } => {
                Err(BackupError::Apply(format!(
                "resync from checkpoint {from} to {} does not apply to the image at checkpoint \
                 {at}{}",
                cp.epoch,
                if self.meta.syncing() { " (syncing)" } else { "" }
            )))
            }
            Kind::PreCopy | Kind::Incremental if !follows => Err(BackupError::Apply(format!(
                "checkpoint {} does not follow {at}",
                cp.epoch
            ))),
            k => Err(BackupError::Apply(format!(
                "a {k:?} checkpoint ({}) cannot follow checkpoint {at}",
                cp.epoch
            ))),
        }
    }

    /// First half of applying the next checkpoint: a pre-copy round or the checkpoint that ends
    /// the sync on a syncing image; an incremental checkpoint or a quick resync on a consistent
    /// one. Checks it (kind, seq, origin, sizes) and decodes its pages; on a consistent image it
    /// then writes the redo journal, and when this returns Ok the checkpoint survives the backup
    /// process dying, so it may be acknowledged. A syncing image protects nothing yet: no
    /// journal (the checkpoint that ends its sync is acknowledged after the promotion).
    pub fn stage(&mut self, cp: &Checkpoint, origin: Origin) -> Result<Staged, BackupError> {
        let state = self.check_next(cp, origin)?;
        let mut meta = ReplicaMeta {
            seq: cp.epoch,
            state,
            ..self.meta.clone()
        };
        let ends_sync = self.meta.syncing() && !meta.syncing();
        if ends_sync {
            meta.disk_len = disk_len_of(&decode_state(&meta.state)?);
        } else if !meta.syncing() {
            let len = disk_len_of(&decode_state(&meta.state)?);
            if len != meta.disk_len {
                return Err(BackupError::Apply(format!(
                    "checkpoint {} has a disk of {len} bytes, the image {}",
                    cp.epoch, meta.disk_len
                )));
            }
        }
        let (gfns, pages, ranges) = self.decode_pages(cp)?;
        self.check_disk(cp)?;
        if ends_sync
            && cp
                .disk
                .iter()
                .any(|(o, d)| o + d.len() as u64 > meta.disk_len)
        {
            return Err(BackupError::Apply("disk write beyond the disk".into()));
        }
        let mut j = Journal {
            seq: cp.epoch,
            base: self.base,
            meta,
            data: journal_bytes(&pages, &ranges),
            gfns,
            ranges,
            disk: cp.disk.clone(),
        };
        let journaled = !self.meta.syncing();
        if journaled {
            self.write_journal(&mut j)?;
        }
        Ok(Staged {
            journal: Box::new(j),
            pages,
            ends_sync,
            journaled,
        })
    }

    /// Writes `j` into the next slot of the ring. The checkpoint that slot holds must be in
    /// the image files first: [`complete`](Self::complete) flushes when the ring is full, so
    /// the flush here only runs if a caller staged without completing.
    fn write_journal(&mut self, j: &mut Journal) -> Result<(), BackupError> {
        if self.unflushed >= journal::SLOTS {
            self.flush()?;
        }
        j.base = self.base;
        let slot = (self.records % journal::SLOTS as u64) as usize;
        let path = journal::slot_path(&self.dir, slot);
        if self.slots.len() < journal::SLOTS {
            self.slots.resize_with(journal::SLOTS, || None);
        }
        if self.slots[slot].is_none() {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            let len = f.metadata().map_err(io(&path))?.len();
            self.slots[slot] = Some((f, len));
        }
        if let Some((f, len)) = self.slots[slot].as_mut() {
            j.write_to(f, len, &path)?;
        }
        self.records += 1;
        self.unflushed += 1;
        Ok(())
    }

    /// Second half: writes the staged checkpoint into the image files — a small journaled one
    /// into the write-back, written in place at the next flush (when the journal ring is full).
    pub fn complete(&mut self, s: Staged) -> Result<(), BackupError> {
        if s.journaled && s.small() {
            let j = s.journal;
            self.wb.add(&j.gfns, &s.pages, j.disk);
            self.meta = j.meta;
            if self.unflushed >= journal::SLOTS {
                self.flush()?;
            }
            return Ok(());
        }
        self.complete_through(s)
    }

    /// Whether the next [`complete`](Self::complete) flushes more than the loop should write
    /// (`crate::applier` then runs it on the blocking thread).
    pub(crate) fn heavy_flush_due(&self) -> bool {
        self.unflushed >= journal::SLOTS && self.wb.bytes() > crate::applier::INLINE_FLUSH
    }

    /// Second half, written through: what waits in the write-back first, then the checkpoint.
    pub fn complete_through(&mut self, s: Staged) -> Result<(), BackupError> {
        self.flush()?;
        let j = s.journal;
        self.write_in_place(&j.gfns, &s.pages, &j.disk)?;
        if s.ends_sync {
            self.size_disk(j.meta.disk_len)?;
        }
        self.meta = j.meta;
        self.base = self.meta.seq;
        self.unflushed = 0;
        Ok(())
    }

    /// Writes what waits in the write-back into the image files: they then hold the last
    /// completed checkpoint.
    pub fn flush(&mut self) -> Result<(), BackupError> {
        if !self.wb.is_empty() {
            let runs = self.wb.runs();
            let mp = self.dir.join(snapshot::MEMORY_FILE);
            for (gfn, bytes) in &runs.pages {
                self.mem
                    .write_all_at(bytes, gfn * PAGE as u64)
                    .map_err(io(&mp))?;
            }
            self.write_in_place(&[], &[], &runs.disk)?;
            self.wb.clear();
        }
        self.base = self.meta.seq;
        self.unflushed = 0;
        Ok(())
    }

    /// Gives the disk file its final size once the state says what it is.
    fn size_disk(&mut self, len: u64) -> Result<(), BackupError> {
        let dp = self.dir.join(snapshot::DISK_FILE);
        match (&self.disk, len) {
            (Some(d), n) if n > 0 => d.set_len(n).map_err(io(&dp)),
            (Some(_), _) => {
                self.disk = None;
                std::fs::remove_file(&dp).map_err(io(&dp))
            }
            (None, 0) => Ok(()),
            (None, n) => {
                self.disk = Some(create_sized(&dp, n)?);
                Ok(())
            }
        }
    }

    /// Makes the image files durable (before `replica.bin` may point at them).
    pub(crate) fn sync_files(&self) -> Result<(), BackupError> {
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        self.mem.sync_all().map_err(io(&mp))?;
        if let Some(d) = &self.disk {
            let dp = self.dir.join(snapshot::DISK_FILE);
            d.sync_all().map_err(io(&dp))?;
        }
        Ok(())
    }

    /// Writes `replica.bin` atomically and durably: temporary file, fsync, rename, fsync of
    /// the directory.
    pub(crate) fn save_meta(&self) -> Result<(), BackupError> {
        let bytes = format::encode(&self.meta)?;
        let tmp = self.dir.join(".replica.bin.tmp");
        let f = create_sized(&tmp, 0)?;
        f.write_all_at(&bytes, 0).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let dst = self.dir.join(REPLICA_FILE);
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        promote::sync_dir(&self.dir)
    }

    /// The image's files now live in `dir` (after promotion renamed them there; the open
    /// files follow their inodes). Journals start over.
    pub(crate) fn rehome(&mut self, dir: &Path) {
        self.dir = dir.to_path_buf();
        self.slots = Vec::new();
        self.records = 0;
        self.unflushed = 0;
        self.base = self.meta.seq;
    }

    /// Writes a journal record's pages into the memory file, one at a time: a page
    /// journaled as ranges is the file's version with the ranges' bytes laid over it (see
    /// [`journal`]'s module docs for why that is the page as of the record, in a redo in
    /// order).
    fn redo_pages(&self, j: &Journal) -> Result<(), BackupError> {
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        let mut page = vec![0u8; PAGE];
        let mut at = 0;
        for (i, gfn) in j.gfns.iter().enumerate() {
            let off = gfn
                .checked_mul(PAGE as u64)
                .filter(|o| o + PAGE as u64 <= self.meta.mem_size)
                .ok_or_else(|| {
                    BackupError::Apply(format!(
                        "journal of checkpoint {}: page {gfn} beyond guest RAM",
                        j.seq
                    ))
                })?;
            let bytes = |at: usize, len: usize| {
                j.data.get(at..at + len).ok_or_else(|| {
                    BackupError::Apply(format!("journal of checkpoint {}: short", j.seq))
                })
            };
            match j.page_ranges(i) {
                None => {
                    page.copy_from_slice(bytes(at, PAGE)?);
                    at += PAGE;
                }
                Some(ranges) => {
                    self.mem.read_exact_at(&mut page, off).map_err(io(&mp))?;
                    for &(o, l) in ranges {
                        let (o, l) = (usize::from(o), usize::from(l));
                        page[o..o + l].copy_from_slice(bytes(at, l)?);
                        at += l;
                    }
                }
            }
            self.mem.write_all_at(&page, off).map_err(io(&mp))?;
        }
        Ok(())
    }

    /// Redoes journaled checkpoints, oldest first (idempotent), and records the last one's
    /// facts in `replica.bin`.
    fn redo(&mut self, js: Vec<Journal>) -> Result<(), BackupError> {
        for j in js {
            if j.meta.mem_size != self.meta.mem_size || j.meta.disk_len != self.meta.disk_len {
                return Err(BackupError::Apply(format!(
                    "journal of checkpoint {} is for {} bytes of RAM and {} of disk, the image \
                     has {} and {}",
                    j.seq, j.meta.mem_size, j.meta.disk_len, self.meta.mem_size, self.meta.disk_len
                )));
            }
            self.redo_pages(&j)?;
            self.write_in_place(&[], &[], &j.disk)?;
            self.meta = j.meta;
        }
        self.save_meta()
    }
}

/// What the journal keeps of whole `pages`: each one's `ranges`' bytes, or all of it.
fn journal_bytes(pages: &[u8], ranges: &[Option<journal::Ranges>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (page, r) in pages.chunks_exact(PAGE).zip(ranges) {
        match r {
            Some(r) => {
                for &(o, l) in r {
                    out.extend_from_slice(&page[usize::from(o)..usize::from(o) + usize::from(l)]);
                }
            }
            None => out.extend_from_slice(page),
        }
    }
    out
}

fn usable_state(cp: &Checkpoint) -> Result<Vec<u8>, BackupError> {
    match &cp.state {
        Some((v, s)) if *v == format::FORMAT_VERSION && !s.is_empty() => Ok(s.clone()),
        Some((v, s)) if *v == format::FORMAT_VERSION => Err(BackupError::Apply(format!(
            "checkpoint {} carries an empty state ({} bytes)",
            cp.epoch,
            s.len()
        ))),
        Some((v, _)) => Err(BackupError::Apply(format!(
            "state format {v} not supported"
        ))),
        None => Err(BackupError::Apply(format!(
            "checkpoint {} carries no state",
            cp.epoch
        ))),
    }
}

fn disk_len_of(vm: &VmState) -> u64 {
    vm.blk.as_ref().map_or(0, |b| {
        b.device.sectors * vmm::devices::virtio::blk::SECTOR_SIZE
    })
}

/// `replica.bin` of `dir`.
pub fn read_meta(dir: &Path) -> Result<ReplicaMeta, BackupError> {
    let mp = dir.join(REPLICA_FILE);
    let bytes = std::fs::read(&mp).map_err(io(&mp))?;
    format::decode(&bytes).map_err(|err| BackupError::Meta { path: mp, err })
}

/// True if `dir` is (or is becoming) a backup's replica image: it has `replica.bin` or a side
/// image (`incoming/`).
pub fn is_replica(dir: &Path) -> bool {
    dir.join(REPLICA_FILE).exists() || promote::incoming(dir).exists()
}

mod lifecycle;
pub use lifecycle::*;
