//! Taking snapshots of a running VM.
//!
//! Everything that must be consistent is captured in one pause: vCPU and device state, the
//! changes since the previous snapshot (dirty pages of both sources and disk writes, harvested
//! and fanned out to every consumer — replication too — so neither takes them from the other,
//! `crate::dirty`), the dirty pages themselves (copied to a staging buffer for a diff), and the
//! disk (the writes since the last snapshot, or a full copy). A diff
//! snapshot's pause is therefore only harvest + copy of the dirty pages + state capture; files
//! are written after the VM has resumed. A full snapshot writes memory and disk while paused.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{lock, Vm};
use crate::devices::virtio::blk::DiskWrites;
use crate::dirty::{Consumer, Pending};
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
    /// The writes since the previous snapshot (kept with the changes taken), disk length.
    Delta(u64),
}

fn capture_err(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Capture(e.to_string())
}

impl Vm {
    /// Captures vCPU and device state. The VM must be paused.
    pub fn capture_state(&self) -> Result<VmState, SnapshotError> {
        // Read by the vCPU itself before it parked at guest output, if it is still parked
        // since (`crate::vcpu`); else by the ioctls now.
        let vcpu = match self.control.take_parked_state() {
            Some(st) => st,
            None => vcpu_state::capture(
                &lock(&self.vcpu),
                &self.msr_indices,
                self.control.regs_in_run_page(),
                &self.tsc_khz,
            )
            .map_err(capture_err)?,
        };
        Ok(VmState {
            vcpu,
            serial: lock(&self.devices.serial).save(),
            platform: lock(&self.devices.platform).save(),
            net: self.devices.net.as_ref().map(|n| lock(n).save()),
            blk: self.devices.blk.as_ref().map(|b| lock(b).save()),
        })
    }

    /// Writes a snapshot of this VM into `dir` (created if needed; must not hold one already).
    /// A running VM is paused for the capture and resumed; a paused VM stays paused.
    ///
    /// A diff holds what changed since the previous snapshot, replication checkpoints taken
    /// meanwhile notwithstanding, and takes nothing from them (`crate::dirty`). If the snapshot
    /// fails, its changes stay pending for the next one.
    pub fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotStats, SnapshotError> {
        // One snapshot at a time: each takes the changes since the one before.
        let mut last = lock(&self.last_snapshot);
        std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir))?;
        if dir.join(snapshot::META_FILE).exists() {
            return Err(SnapshotError::Capture(format!(
                "{} already holds a snapshot",
                dir.display()
            )));
        }
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(last.clone().ok_or_else(|| {
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
        let (state, staged, staged_disk, changes) = captured?;
        match self.write_snapshot(dir, parent, state, staged, staged_disk, &changes.disk) {
            Ok((written, pages, checksum)) => {
                let id = written.id;
                *last = Some(written);
                Ok(SnapshotStats {
                    id,
                    pause,
                    pages,
                    total: t0.elapsed(),
                    memory_checksum: checksum,
                })
            }
            Err(e) => {
                self.give_back(Consumer::Snapshots, changes);
                Err(e)
            }
        }
    }

    /// The part of a snapshot done after the resume: the files. Returns the new snapshot (its
    /// id and absolute directory), the number of pages stored and the memory checksum (full
    /// snapshots).
    fn write_snapshot(
        &self,
        dir: &Path,
        parent: Option<ParentRef>,
        state: VmState,
        staged: Staged,
        staged_disk: Option<StagedDisk>,
        writes: &DiskWrites,
    ) -> Result<(ParentRef, u64, Option<u32>), SnapshotError> {
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
            Some(StagedDisk::Delta(len)) => {
                Some(disk::write_delta(writes, len, &dir.join(DELTA_FILE))?)
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
        Ok((ParentRef { dir: here, id }, pages, checksum))
    }

    /// The part of a snapshot done while paused. Returns, with what it staged, the changes it
    /// took (to give back if the snapshot fails later; a delta's writes are in them).
    #[allow(clippy::type_complexity)]
    fn capture_paused(
        &self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<(VmState, Staged, Option<StagedDisk>, Pending), SnapshotError> {
        let state = self.capture_state()?;
        // The snapshot chain's changes since the previous snapshot (replication checkpoints
        // taken meanwhile took nothing from them); a full snapshot starts the chain afresh.
        let changes = self
            .take_changes(Consumer::Snapshots, false)
            .map_err(capture_err)?;
        match self.stage(dir, kind, &changes) {
            Ok((staged, staged_disk)) => Ok((state, staged, staged_disk, changes)),
            Err(e) => {
                self.give_back(Consumer::Snapshots, changes);
                Err(e)
            }
        }
    }

    /// Copies what a snapshot needs while paused, given the changes since the previous one.
    fn stage(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        changes: &Pending,
    ) -> Result<(Staged, Option<StagedDisk>), SnapshotError> {
        let staged = match kind {
            SnapshotKind::Full => {
                let (memory, checksum) =
                    memory::write_full(&self.mem, self.mem_size, &dir.join(MEMORY_FILE))?;
                Staged::Full { memory, checksum }
            }
            SnapshotKind::Diff => {
                let pages = changes.page_list(self.mem_size / crate::layout::PAGE_SIZE);
                memory::stage_pages(&self.mem, &pages, &mut lock(&self.staging))?;
                Staged::Diff { pages }
            }
        };
        let staged_disk = match &self.devices.blk {
            Some(b) => {
                let t = lock(b);
                let len = t.device().sectors() * crate::devices::virtio::blk::SECTOR_SIZE;
                match kind {
                    SnapshotKind::Diff if !changes.disk.overflowed => Some(StagedDisk::Delta(len)),
                    _ => {
                        let raw = t.device().disk().raw().ok_or_else(|| {
                            SnapshotError::Capture(
                                "a clone's copy-on-write disk cannot be copied into a full \
                                 snapshot (not supported yet)"
                                    .into(),
                            )
                        })?;
                        Some(StagedDisk::Full(disk::write_full(
                            raw,
                            &dir.join(DISK_FILE),
                        )?))
                    }
                }
            }
            None => None,
        };
        Ok((staged, staged_disk))
    }
}
