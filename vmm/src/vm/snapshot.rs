//! Taking snapshots of a running VM.
//!
//! Everything that must be consistent is captured in one pause: vCPU and device state, the dirty
//! set (both sources, reset together), the dirty pages themselves (copied to a staging buffer for
//! a diff), and the disk (the write log since the last snapshot, or a full copy). A diff
//! snapshot's pause is therefore only harvest + copy of the dirty pages + state capture; files
//! are written after the VM has resumed. A full snapshot writes memory and disk while paused.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{lock, Vm};
use crate::persist::Persist;
use crate::snapshot::{
    self, disk, memory, DiskPart, ParentRef, SnapshotError, SnapshotMeta, VmState, DELTA_FILE,
    DISK_FILE, MEMORY_FILE,
};
use crate::vcpu_state;

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of memory and disk.
    Full,
    /// What changed since this VM's previous snapshot (or the snapshot it was restored from).
    Diff,
}

/// What a snapshot cost.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Id of the new snapshot.
    pub id: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Pages stored (dirty pages of a diff, non-zero pages of a full snapshot).
    pub pages: u64,
    /// Time until every file was written.
    pub total: Duration,
    /// CRC32 of all guest RAM (full snapshots).
    pub memory_checksum: Option<u32>,
}

enum Staged {
    Full {
        memory: memory::MemoryPart,
        checksum: u32,
    },
    Diff {
        pages: Vec<u64>,
    },
}

enum StagedDisk {
    Full(DiskPart),
    Delta(crate::devices::virtio::blk::DiskWrites, u64),
}

fn capture_err(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Capture(e.to_string())
}

impl Vm {
    /// Captures vCPU and device state. The VM must be paused.
    pub fn capture_state(&self) -> Result<VmState, SnapshotError> {
        let vcpu = lock(&self.vcpu);
        Ok(VmState {
            vcpu: vcpu_state::capture(&vcpu, &self.msr_indices).map_err(capture_err)?,
            serial: lock(&self.devices.serial).save(),
            platform: lock(&self.devices.platform).save(),
            net: self.devices.net.as_ref().map(|n| lock(n).save()),
            blk: self.devices.blk.as_ref().map(|b| lock(b).save()),
        })
    }

    /// Writes a snapshot of this VM into `dir` (created if needed; must not hold one already).
    /// A running VM is paused for the capture and resumed; a paused VM stays paused.
    pub fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotStats, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir))?;
        if dir.join(snapshot::META_FILE).exists() {
            return Err(SnapshotError::Capture(format!(
                "{} already holds a snapshot",
                dir.display()
            )));
        }
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(lock(&self.last_snapshot).clone().ok_or_else(|| {
                SnapshotError::Capture(
                    "a diff snapshot needs an earlier snapshot of this VM (take a full one first)"
                        .into(),
                )
            })?),
        };
        let t0 = Instant::now();
        // Pauses are counted: a snapshot of a paused VM leaves it paused.
        let must_resume = self.thread_running();
        if must_resume {
            self.pause().map_err(capture_err)?;
        }
        let captured = self.capture_paused(dir, kind);
        if must_resume {
            self.resume();
        }
        let pause = t0.elapsed();
        let (state, staged, staged_disk) = captured?;

        let id = snapshot::new_id();
        let (memory, checksum, pages) = match staged {
            Staged::Full { memory, checksum } => {
                let n = match &memory {
                    memory::MemoryPart::Full { extents, .. } => extents.iter().map(|e| e.1).sum(),
                    memory::MemoryPart::Diff { pages, .. } => pages.len() as u64,
                };
                (memory, Some(checksum), n)
            }
            Staged::Diff { pages } => {
                let n = pages.len() as u64;
                let staging = lock(&self.staging);
                let data = &staging[..pages.len() * crate::layout::PAGE_SIZE as usize];
                (
                    memory::write_diff(&dir.join(MEMORY_FILE), pages, data)?,
                    None,
                    n,
                )
            }
        };
        let disk = match staged_disk {
            Some(StagedDisk::Full(p)) => Some(p),
            Some(StagedDisk::Delta(w, len)) => {
                Some(disk::write_delta(&w, len, &dir.join(DELTA_FILE))?)
            }
            None => None,
        };
        // The parent is recorded relative to this snapshot's directory (a chain stays valid
        // when moved as a whole).
        let here = std::fs::canonicalize(dir).map_err(SnapshotError::io(dir))?;
        let parent = parent.map(|p| ParentRef {
            dir: snapshot::relative_path(&here, &p.dir),
            id: p.id,
        });
        let meta = SnapshotMeta {
            id,
            parent,
            created_unix_ms: snapshot::now_unix_ms(),
            mem_size: self.mem_size,
            memory,
            memory_checksum: checksum,
            disk,
            vm: state,
        };
        snapshot::write_meta(dir, &meta)?;
        let abs = std::fs::canonicalize(dir).map_err(SnapshotError::io(dir))?;
        *lock(&self.last_snapshot) = Some(ParentRef { dir: abs, id });
        Ok(SnapshotStats {
            id,
            pause,
            pages,
            total: t0.elapsed(),
            memory_checksum: checksum,
        })
    }

    /// The part of a snapshot done while paused.
    fn capture_paused(
        &self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<(VmState, Staged, Option<StagedDisk>), SnapshotError> {
        let state = self.capture_state()?;
        let dirty = self.harvest_dirty().map_err(capture_err)?;
        let staged = match kind {
            SnapshotKind::Full => {
                let (memory, checksum) =
                    memory::write_full(&self.mem, self.mem_size, &dir.join(MEMORY_FILE))?;
                Staged::Full { memory, checksum }
            }
            SnapshotKind::Diff => {
                let pages = dirty.page_list();
                memory::stage_pages(&self.mem, &pages, &mut lock(&self.staging))?;
                Staged::Diff { pages }
            }
        };
        let staged_disk = match &self.devices.blk {
            Some(b) => {
                let mut t = lock(b);
                let writes = t.with_device_unchecked(|d| d.take_writes());
                let len = t.device().sectors() * crate::devices::virtio::blk::SECTOR_SIZE;
                match (kind, writes) {
                    (SnapshotKind::Diff, Some(w)) if !w.overflowed => {
                        Some(StagedDisk::Delta(w, len))
                    }
                    _ => Some(StagedDisk::Full(disk::write_full(
                        t.device().file(),
                        &dir.join(DISK_FILE),
                    )?)),
                }
            }
            None => None,
        };
        Ok((state, staged, staged_disk))
    }
}
