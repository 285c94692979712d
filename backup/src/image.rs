//! The replica image a backup keeps: guest memory and disk as files, plus the latest state.
//!
//! ```text
//! <dir>/memory.bin   guest RAM as of the last applied checkpoint (sparse, full size)
//! <dir>/disk.img     the disk as of the last applied checkpoint
//! <dir>/replica.bin  last applied epoch, term, sizes and the vCPU/device state (CRC-framed)
//! <dir>/journal-{0,1}.bin  the redo journal of the last two checkpoints (see [`journal`])
//! ```
//! Only complete, verified checkpoints (from the protocol's receiver) are applied, in epoch
//! order, in two steps: [`ReplicaImage::stage`] decodes the pages and writes the journal (the
//! checkpoint is now durable and may be acknowledged), [`ReplicaImage::complete`] writes the
//! image files in place. A backup killed at any moment leaves an image [`recover`] brings to the
//! last journaled checkpoint; `replica.bin` is rewritten only at creation, at the end of the
//! initial sync and by [`recover`]/[`finalize`].
//!
//! An image created by pre-copy rounds (no state yet) is *syncing*: it holds pages but no
//! consistent checkpoint until the first checkpoint with state arrives; [`finalize`] refuses it.
//! [`finalize`] turns the image into a snapshot directory (`snapshot.bin`) that
//! `vmatrix restore` starts.
//!
//! [`journal`]: crate::journal

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protocol::page::{decode, PAGE};
use protocol::{Checkpoint, Kind};
use serde::{Deserialize, Serialize};
use vmm::snapshot::{self, format, DiskPart, SnapshotMeta, VmState};

use crate::journal::{self, Journal};
use crate::BackupError;

/// Largest disk a pre-copy round may write to before the state tells the real size (1 TiB).
const MAX_SYNC_DISK: u64 = 1 << 40;

/// Persistent facts about the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeta {
    /// Last applied checkpoint.
    pub epoch: u64,
    /// Term of the session that sent it.
    pub term: u64,
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
}

/// An open replica image.
pub struct ReplicaImage {
    dir: PathBuf,
    mem: File,
    disk: Option<File>,
    meta: ReplicaMeta,
    slots: [Option<File>; 2],
}

/// A checkpoint between [`ReplicaImage::stage`] and [`ReplicaImage::complete`].
pub struct Staged {
    journal: Journal,
    ends_sync: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |err| BackupError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn decode_state(bytes: &[u8]) -> Result<VmState, BackupError> {
    postcard::from_bytes(bytes)
        .map_err(|e| BackupError::Apply(format!("state does not decode: {e}")))
}

impl ReplicaImage {
    /// Starts a new image from an initial sync (`Sync`) or pre-copy round 0 (`PreCopy`),
    /// replacing any old image in `dir`.
    pub fn create(dir: &Path, term: u64, cp: &Checkpoint) -> Result<ReplicaImage, BackupError> {
        let (state, disk_len) = match cp.kind {
            Kind::Sync => {
                let state = usable_state(cp)?;
                let len = disk_len_of(&decode_state(&state)?);
                (state, len)
            }
            Kind::PreCopy if cp.epoch == 0 => (Vec::new(), 0),
            _ => {
                return Err(BackupError::Apply(format!(
                    "checkpoint {} does not start an image",
                    cp.epoch
                )))
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // The old image stops being one before any of its files change.
        for f in ["replica.bin", snapshot::META_FILE, "disk-live.img"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        journal::remove(dir)?;
        let mp = dir.join(snapshot::MEMORY_FILE);
        let mem = File::create(&mp).map_err(io(&mp))?;
        mem.set_len(cp.mem_size).map_err(io(&mp))?;
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mp)
            .map_err(io(&mp))?;
        // While syncing the disk's size is unknown: the file grows with the chunks written.
        let disk = match (cp.kind, disk_len) {
            (Kind::PreCopy, _) => Some(create_disk(dir, 0)?),
            (_, 0) => None,
            (_, n) => Some(create_disk(dir, n)?),
        };
        let mut img = ReplicaImage {
            dir: dir.to_path_buf(),
            mem,
            disk,
            meta: ReplicaMeta {
                epoch: 0,
                term,
                mem_size: cp.mem_size,
                disk_len,
                state: Vec::new(),
            },
            slots: [None, None],
        };
        let (gfns, data) = img.decode_pages(cp)?;
        img.check_disk(cp)?;
        img.write_in_place(&gfns, &data, &cp.disk)?;
        img.meta.epoch = cp.epoch;
        img.meta.state = state;
        img.save_meta()?;
        Ok(img)
    }

    /// True while no checkpoint with state has been applied (initial sync in progress).
    pub fn syncing(&self) -> bool {
        self.meta.syncing()
    }

    /// Last applied epoch.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// The new contents of the checkpoint's pages (decoded against the image's current ones).
    fn decode_pages(&self, cp: &Checkpoint) -> Result<(Vec<u64>, Vec<u8>), BackupError> {
        if cp.mem_size != self.meta.mem_size {
            return Err(BackupError::Apply("guest RAM size changed".into()));
        }
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        let mut old = vec![0u8; PAGE];
        let mut gfns = Vec::with_capacity(cp.pages.len());
        let mut data = Vec::with_capacity(cp.pages.len() * PAGE);
        for (gfn, enc) in &cp.pages {
            let off = gfn
                .checked_mul(PAGE as u64)
                .filter(|o| o + PAGE as u64 <= self.meta.mem_size)
                .ok_or_else(|| BackupError::Apply(format!("page {gfn} beyond guest RAM")))?;
            self.mem.read_exact_at(&mut old, off).map_err(io(&mp))?;
            data.extend_from_slice(&decode(*gfn, enc, Some(&old))?);
            gfns.push(*gfn);
        }
        Ok((gfns, data))
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
        for (i, gfn) in gfns.iter().enumerate() {
            self.mem
                .write_all_at(&data[i * PAGE..(i + 1) * PAGE], gfn * PAGE as u64)
                .map_err(io(&mp))?;
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
    pub fn apply(&mut self, cp: &Checkpoint) -> Result<(), BackupError> {
        let s = self.stage(cp)?;
        self.complete(s)
    }

    /// First half of applying the next checkpoint (a pre-copy round while syncing, else an
    /// incremental one; the first with state ends the sync): checks it, decodes its pages and,
    /// if the result is a consistent image, writes its redo journal. When this returns Ok the
    /// checkpoint survives the backup process dying, so it may be acknowledged.
    pub fn stage(&mut self, cp: &Checkpoint) -> Result<Staged, BackupError> {
        if cp.epoch != self.meta.epoch + 1 {
            return Err(BackupError::Apply(format!(
                "checkpoint {} does not follow {}",
                cp.epoch, self.meta.epoch
            )));
        }
        let state = match cp.kind {
            Kind::PreCopy if self.meta.syncing() => Vec::new(),
            Kind::Incremental => usable_state(cp)?,
            k => {
                return Err(BackupError::Apply(format!(
                    "a {k:?} checkpoint cannot follow checkpoint {}",
                    self.meta.epoch
                )))
            }
        };
        let mut meta = ReplicaMeta {
            epoch: cp.epoch,
            state,
            ..self.meta.clone()
        };
        let ends_sync = self.meta.syncing() && !meta.syncing();
        if ends_sync {
            meta.disk_len = disk_len_of(&decode_state(&meta.state)?);
        } else if !meta.syncing() {
            decode_state(&meta.state)?;
        }
        let (gfns, data) = self.decode_pages(cp)?;
        self.check_disk(cp)?;
        if ends_sync
            && cp
                .disk
                .iter()
                .any(|(o, d)| o + d.len() as u64 > meta.disk_len)
        {
            return Err(BackupError::Apply("disk write beyond the disk".into()));
        }
        let j = Journal {
            epoch: cp.epoch,
            meta,
            gfns,
            data,
            disk: cp.disk.clone(),
        };
        // While syncing there is nothing consistent to protect: no journal.
        if !j.meta.syncing() {
            let slot = (cp.epoch % 2) as usize;
            let path = journal::slot_path(&self.dir, cp.epoch);
            if self.slots[slot].is_none() {
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                self.slots[slot] = Some(f);
            }
            if let Some(f) = &self.slots[slot] {
                j.write_to(f, &path)?;
            }
        }
        Ok(Staged {
            journal: j,
            ends_sync,
        })
    }

    /// Second half: writes the staged checkpoint into the image files.
    pub fn complete(&mut self, s: Staged) -> Result<(), BackupError> {
        let j = s.journal;
        self.write_in_place(&j.gfns, &j.data, &j.disk)?;
        if s.ends_sync {
            self.size_disk(j.meta.disk_len)?;
        }
        self.meta = j.meta;
        if s.ends_sync {
            self.save_meta()?;
        }
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
                self.disk = Some(create_disk(&self.dir, n)?);
                Ok(())
            }
        }
    }

    fn save_meta(&self) -> Result<(), BackupError> {
        let bytes = format::encode(&self.meta)?;
        let tmp = self.dir.join(".replica.bin.tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        let dst = self.dir.join("replica.bin");
        std::fs::rename(&tmp, &dst).map_err(io(&dst))
    }
}

fn usable_state(cp: &Checkpoint) -> Result<Vec<u8>, BackupError> {
    match &cp.state {
        Some((v, s)) if *v == format::FORMAT_VERSION => Ok(s.clone()),
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

fn create_disk(dir: &Path, len: u64) -> Result<File, BackupError> {
    let dp = dir.join(snapshot::DISK_FILE);
    let d = File::create(&dp).map_err(io(&dp))?;
    d.set_len(len).map_err(io(&dp))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dp)
        .map_err(io(&dp))
}

fn read_meta(dir: &Path) -> Result<ReplicaMeta, BackupError> {
    let mp = dir.join("replica.bin");
    let bytes = std::fs::read(&mp).map_err(io(&mp))?;
    Ok(format::decode(&bytes)?)
}

/// Brings the image in `dir` to its last journaled checkpoint: redoes the newest verifying
/// journal's writes (idempotent: every earlier checkpoint is already in the files) and records
/// its facts in `replica.bin`. Returns the epoch redone, if any. A damaged slot was never
/// completed, so nothing of it reached the image files; it is ignored.
pub fn recover(dir: &Path) -> Result<Option<u64>, BackupError> {
    let meta = read_meta(dir)?;
    let Some(j) = journal::newest(dir)? else {
        journal::remove(dir)?;
        return Ok(None);
    };
    if j.epoch < meta.epoch || (j.epoch == meta.epoch && j.meta == meta) {
        // Not newer than what replica.bin records: nothing to redo.
        journal::remove(dir)?;
        return Ok(None);
    }
    if j.meta.mem_size != meta.mem_size {
        return Err(BackupError::Apply(format!(
            "journal of checkpoint {} is for {} bytes of RAM, the image has {}",
            j.epoch, j.meta.mem_size, meta.mem_size
        )));
    }
    let open = |name: &str| {
        let p = dir.join(name);
        OpenOptions::new().write(true).open(&p).map_err(io(&p))
    };
    let disk_path = dir.join(snapshot::DISK_FILE);
    let mut img = ReplicaImage {
        dir: dir.to_path_buf(),
        mem: open(snapshot::MEMORY_FILE)?,
        disk: match disk_path.exists() {
            true => Some(open(snapshot::DISK_FILE)?),
            false => None,
        },
        meta: j.meta.clone(),
        slots: [None, None],
    };
    img.write_in_place(&j.gfns, &j.data, &j.disk)?;
    img.size_disk(j.meta.disk_len)?;
    img.save_meta()?;
    journal::remove(dir)?;
    tracing::info!("image brought to checkpoint {} from its journal", j.epoch);
    Ok(Some(j.epoch))
}

/// Turns the replica image in `dir` into a full snapshot of its last applied checkpoint
/// (completing an interrupted one first, see [`recover`]).
pub fn finalize(dir: &Path) -> Result<u64, BackupError> {
    recover(dir)?;
    let meta = read_meta(dir)?;
    if meta.syncing() {
        return Err(BackupError::Apply(format!(
            "the initial sync of {} never completed (pre-copy round {} was the last applied): \
             there is no consistent checkpoint to start",
            dir.display(),
            meta.epoch
        )));
    }
    let vm = decode_state(&meta.state)?;
    let (memory, checksum) =
        snapshot::memory::describe_file(&dir.join(snapshot::MEMORY_FILE), meta.mem_size)?;
    let disk_part = if meta.disk_len > 0 {
        let crc = snapshot::disk::file_crc(&dir.join(snapshot::DISK_FILE), meta.disk_len)?;
        Some(DiskPart::Full {
            len: meta.disk_len,
            crc,
        })
    } else {
        None
    };
    let sm = SnapshotMeta {
        id: snapshot::new_id(),
        parent: None,
        created_unix_ms: snapshot::now_unix_ms(),
        mem_size: meta.mem_size,
        memory,
        memory_checksum: Some(checksum),
        disk: disk_part,
        vm,
    };
    snapshot::write_meta(dir, &sm)?;
    Ok(meta.epoch)
}
