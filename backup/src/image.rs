//! The replica image a backup keeps: guest memory and disk as files, plus the latest state.
//!
//! ```text
//! <dir>/memory.bin   guest RAM as of the last applied checkpoint (sparse, full size)
//! <dir>/disk.img     the disk as of the last applied checkpoint
//! <dir>/replica.bin  last applied epoch, term, sizes and the vCPU/device state (CRC-framed)
//! ```
//! Only complete, verified checkpoints (from the protocol's receiver) are applied, in epoch
//! order. [`finalize`] turns the image into a snapshot directory (`snapshot.bin`) that
//! `vmatrix restore` starts.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protocol::page::{decode, PAGE};
use protocol::{Checkpoint, Kind};
use serde::{Deserialize, Serialize};
use vmm::snapshot::{self, format, DiskPart, SnapshotMeta, VmState};

use crate::BackupError;

/// Persistent facts about the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaMeta {
    /// Last applied checkpoint.
    pub epoch: u64,
    /// Term of the session that sent it.
    pub term: u64,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Disk size (0: no disk).
    pub disk_len: u64,
    /// `VmState`, postcard-encoded.
    pub state: Vec<u8>,
}

/// An open replica image.
pub struct ReplicaImage {
    dir: PathBuf,
    mem: File,
    disk: Option<File>,
    meta: ReplicaMeta,
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
    /// Starts a new image from an initial-sync checkpoint (replacing any old image in `dir`).
    pub fn create(dir: &Path, term: u64, cp: &Checkpoint) -> Result<ReplicaImage, BackupError> {
        if cp.kind != Kind::Sync {
            return Err(BackupError::Apply(format!(
                "checkpoint {} is not an initial sync",
                cp.epoch
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for f in [snapshot::META_FILE, "disk-live.img"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let (format_v, state) = cp
            .state
            .clone()
            .ok_or_else(|| BackupError::Apply("initial sync without state".into()))?;
        if format_v != format::FORMAT_VERSION {
            return Err(BackupError::Apply(format!(
                "state format {format_v} not supported"
            )));
        }
        let vm_state = decode_state(&state)?;
        let disk_len = vm_state.blk.as_ref().map_or(0, |b| {
            b.device.sectors * vmm::devices::virtio::blk::SECTOR_SIZE
        });
        let mp = dir.join(snapshot::MEMORY_FILE);
        let mem = File::create(&mp).map_err(io(&mp))?;
        mem.set_len(cp.mem_size).map_err(io(&mp))?;
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mp)
            .map_err(io(&mp))?;
        let disk = if disk_len > 0 {
            let dp = dir.join(snapshot::DISK_FILE);
            let d = File::create(&dp).map_err(io(&dp))?;
            d.set_len(disk_len).map_err(io(&dp))?;
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&dp)
                    .map_err(io(&dp))?,
            )
        } else {
            None
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
        };
        img.write_content(cp)?;
        img.meta.epoch = cp.epoch;
        img.meta.state = state;
        img.save_meta()?;
        Ok(img)
    }

    /// Last applied epoch.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    fn write_content(&mut self, cp: &Checkpoint) -> Result<(), BackupError> {
        if cp.mem_size != self.meta.mem_size {
            return Err(BackupError::Apply("guest RAM size changed".into()));
        }
        let mp = self.dir.join(snapshot::MEMORY_FILE);
        let mut old = vec![0u8; PAGE];
        for (gfn, data) in &cp.pages {
            let off = gfn * PAGE as u64;
            if off + PAGE as u64 > self.meta.mem_size {
                return Err(BackupError::Apply(format!("page {gfn} beyond guest RAM")));
            }
            self.mem.read_exact_at(&mut old, off).map_err(io(&mp))?;
            let new = decode(*gfn, data, Some(&old))?;
            self.mem.write_all_at(&new, off).map_err(io(&mp))?;
        }
        if !cp.disk.is_empty() {
            let dp = self.dir.join(snapshot::DISK_FILE);
            let d = self
                .disk
                .as_ref()
                .ok_or_else(|| BackupError::Apply("disk writes for a VM without a disk".into()))?;
            for (off, data) in &cp.disk {
                if off + data.len() as u64 > self.meta.disk_len {
                    return Err(BackupError::Apply(format!(
                        "disk write at {off} beyond the disk"
                    )));
                }
                d.write_all_at(data, *off).map_err(io(&dp))?;
            }
        }
        Ok(())
    }

    /// Applies the next incremental checkpoint.
    pub fn apply(&mut self, cp: &Checkpoint) -> Result<(), BackupError> {
        if cp.epoch != self.meta.epoch + 1 {
            return Err(BackupError::Apply(format!(
                "checkpoint {} does not follow {}",
                cp.epoch, self.meta.epoch
            )));
        }
        let state = match &cp.state {
            Some((v, s)) if *v == format::FORMAT_VERSION => s.clone(),
            _ => {
                return Err(BackupError::Apply(
                    "checkpoint without a usable state".into(),
                ))
            }
        };
        decode_state(&state)?;
        self.write_content(cp)?;
        self.meta.epoch = cp.epoch;
        self.meta.state = state;
        self.save_meta()
    }

    fn save_meta(&self) -> Result<(), BackupError> {
        let bytes = format::encode(&self.meta)?;
        let tmp = self.dir.join(".replica.bin.tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        let dst = self.dir.join("replica.bin");
        std::fs::rename(&tmp, &dst).map_err(io(&dst))
    }
}

/// Turns the replica image in `dir` into a full snapshot of its last applied checkpoint.
pub fn finalize(dir: &Path) -> Result<u64, BackupError> {
    let mp = dir.join("replica.bin");
    let bytes = std::fs::read(&mp).map_err(io(&mp))?;
    let meta: ReplicaMeta = format::decode(&bytes)?;
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
