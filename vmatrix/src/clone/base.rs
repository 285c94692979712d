//! A clone base: one checkpoint, frozen, that every clone on this host starts from.
//!
//! ```text
//! <work>/base/clone-base.bin   what the clones need: the checkpoint's state, sizes, where its
//!                              memory and disk are, where it came from (CRC-framed, written last)
//! <work>/base/memory.bin       guest RAM (only if it had to be frozen, see below)
//! <work>/base/disk.img         the disk (idem)
//! ```
//! From a **snapshot directory** the chain is verified once (every CRC), here, not by every
//! clone. A single full snapshot is never rewritten, so its own `memory.bin` and `disk.img` are
//! used as they are (nothing is copied). A chain of diffs is materialized once into the base.
//!
//! From a **backup's replica image** the image is locked for the time it takes to copy it:
//! recovered to its committed checkpoint as a backup or a restore would, then `memory.bin` and
//! `disk.img` are frozen into the base (a reflink where the file system can, else a sparse
//! copy of their data), and the lock is released. The copy is needed because a backup started
//! on the image later writes `memory.bin` in place, and a `MAP_PRIVATE` mapping still sees
//! such writes in every page the clone has not written itself. The image is never taken over
//! and nothing of it is consumed. An image a running backup holds is refused
//! ([`BaseError::InUse`]): that backup writes it in place between its checkpoints; a clone of
//! a live VM starts from a snapshot that backup exports (`vmatrix ctl <backup sock> snapshot`,
//! `backup::export`: the apply loop is held for the last ~1–3 ms only) or its primary takes
//! (`vmatrix ctl <sock> snapshot`: one capture pause).

use std::fs::File;
use std::path::{Path, PathBuf};

use backup::image;
use backup::{BackupError, ImageLock};
use serde::{Deserialize, Serialize};
use vmm::snapshot::{self, files, format, SnapshotError, VmState};

/// Name of the base's description in its directory.
pub const BASE_FILE: &str = "clone-base.bin";

/// Why a clone base cannot be made or read (the image is untrusted input).
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// Neither a snapshot nor a replica image.
    #[error("{dir}: not a VM image (no snapshot.bin and no replica.bin)")]
    NotAnImage {
        /// The directory.
        dir: PathBuf,
    },
    /// A running backup holds the replica image.
    #[error(
        "{dir}: a running backup holds this replica image and writes it in place; clone from \
         a snapshot it exports (vmatrix ctl <backup socket> snapshot <dir>: no pause, \
         replication goes on), of the primary (vmatrix ctl <socket> snapshot <dir>) or of a \
         stopped backup"
    )]
    InUse {
        /// The directory.
        dir: PathBuf,
    },
    /// The replica image is unusable (no committed checkpoint, wrong sizes, bad state...).
    #[error("replica image {dir}: {err}")]
    Replica {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        err: BackupError,
    },
    /// The snapshot (or the base's own description) is unusable.
    #[error("{what}: {err}")]
    Snapshot {
        /// What was being read or written.
        what: String,
        /// What is wrong.
        err: SnapshotError,
    },
    /// The image's VM has no state a clone can start from.
    #[error("{0}")]
    Invalid(String),
}

fn snap_err(what: impl Into<String>) -> impl FnOnce(SnapshotError) -> BaseError {
    let what = what.into();
    move |err| BaseError::Snapshot { what, err }
}

/// Where a base's checkpoint came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A snapshot (the last of a chain), by id.
    Snapshot {
        /// Snapshot id.
        id: u64,
    },
    /// A replica image's committed checkpoint.
    Replica {
        /// History id.
        history: u64,
        /// Term.
        term: u64,
        /// Seq.
        seq: u64,
    },
}

/// `clone-base.bin`: everything a clone process reads before it builds its VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseMeta {
    /// The image directory the base was made from.
    pub source: PathBuf,
    /// Its checkpoint.
    pub origin: Origin,
    /// Guest RAM image (absolute), `mem_size` bytes; never written while clones run.
    pub memory: PathBuf,
    /// Guest RAM size.
    pub mem_size: u64,
    /// The disk (absolute), if the VM has one; never written.
    pub disk: Option<PathBuf>,
    /// The checkpoint's vCPU and device state.
    pub state: VmState,
    /// When the base was made (Unix ms).
    pub created_unix_ms: u64,
}

/// Makes a clone base in `base_dir` (created; must not hold a base) from `image_dir`.
pub fn prepare(image_dir: &Path, base_dir: &Path) -> Result<BaseMeta, BaseError> {
    let io = |p: &Path| snap_err(p.display().to_string());
    let image_dir = std::fs::canonicalize(image_dir)
        .map_err(SnapshotError::io(image_dir))
        .map_err(io(image_dir))?;
    std::fs::create_dir_all(base_dir)
        .map_err(SnapshotError::io(base_dir))
        .map_err(io(base_dir))?;
    let base_dir = std::fs::canonicalize(base_dir)
        .map_err(SnapshotError::io(base_dir))
        .map_err(io(base_dir))?;
    let meta = if image::is_replica(&image_dir) {
        from_replica(&image_dir, &base_dir)?
    } else if image_dir.join(snapshot::META_FILE).exists() {
        from_snapshot(&image_dir, &base_dir)?
    } else {
        return Err(BaseError::NotAnImage { dir: image_dir });
    };
    write(&base_dir, &meta)?;
    Ok(meta)
}

fn from_snapshot(dir: &Path, base_dir: &Path) -> Result<BaseMeta, BaseError> {
    let what = format!("snapshot {}", dir.display());
    let chain = snapshot::load_chain(dir).map_err(snap_err(&what))?;
    let Some(tail) = chain.last() else {
        return Err(BaseError::Invalid(format!("{what}: an empty chain")));
    };
    let mem_size = tail.meta.mem_size;
    let (memory, disk) = if chain.len() == 1 {
        let disk = tail
            .meta
            .disk
            .as_ref()
            .map(|_| tail.dir.join(snapshot::DISK_FILE));
        (tail.dir.join(snapshot::MEMORY_FILE), disk)
    } else {
        materialize(&chain, base_dir).map_err(snap_err(&what))?
    };
    let state = tail.meta.vm.clone();
    Ok(BaseMeta {
        source: dir.to_path_buf(),
        origin: Origin::Snapshot { id: tail.meta.id },
        memory: abs(memory)?,
        mem_size,
        disk: disk.map(abs).transpose()?,
        state,
        created_unix_ms: snapshot::now_unix_ms(),
    })
}

fn abs(p: PathBuf) -> Result<PathBuf, BaseError> {
    std::fs::canonicalize(&p)
        .map_err(SnapshotError::io(&p))
        .map_err(snap_err(p.display().to_string()))
}

/// A diff chain as one memory file and one disk in the base directory.
fn materialize(
    chain: &[snapshot::Link],
    base_dir: &Path,
) -> Result<(PathBuf, Option<PathBuf>), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let first = &chain[0];
    let mem_size = first.meta.mem_size;
    let memory = base_dir.join(snapshot::MEMORY_FILE);
    files::make_working_disk(&first.dir.join(snapshot::MEMORY_FILE), mem_size, &memory)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .map_err(SnapshotError::io(&memory))?;
    for l in &chain[1..] {
        if let snapshot::MemoryPart::Diff { pages, .. } = &l.meta.memory {
            let p = l.dir.join(snapshot::MEMORY_FILE);
            let data = std::fs::read(&p).map_err(SnapshotError::io(&p))?;
            if data.len() != pages.len() * 4096 {
                return Err(SnapshotError::Chain(format!(
                    "{}: changed since it was verified",
                    p.display()
                )));
            }
            for (i, pfn) in pages.iter().enumerate() {
                f.write_all_at(&data[i * 4096..(i + 1) * 4096], pfn * 4096)
                    .map_err(SnapshotError::io(&memory))?;
            }
        }
    }
    let disk = base_dir.join(snapshot::DISK_FILE);
    let has_disk = snapshot::restore_disk(chain, &disk)?;
    Ok((memory, has_disk.then_some(disk)))
}

fn from_replica(dir: &Path, base_dir: &Path) -> Result<BaseMeta, BaseError> {
    let rep = |err| BaseError::Replica {
        dir: dir.to_path_buf(),
        err,
    };
    let lock = match ImageLock::acquire(dir) {
        Ok(l) => l,
        Err(BackupError::InUse { .. }) => {
            return Err(BaseError::InUse {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(rep(e)),
    };
    let meta = image::committed_locked(&lock).map_err(rep)?;
    let state = meta.vm_state().map_err(rep)?;
    let what = format!("freezing {}", dir.display());
    let memory = base_dir.join(snapshot::MEMORY_FILE);
    files::make_working_disk(&dir.join(snapshot::MEMORY_FILE), meta.mem_size, &memory)
        .map_err(snap_err(&what))?;
    let disk = match meta.disk_len {
        0 => None,
        n => {
            let d = base_dir.join(snapshot::DISK_FILE);
            files::make_working_disk(&dir.join(snapshot::DISK_FILE), n, &d)
                .map_err(snap_err(&what))?;
            Some(d)
        }
    };
    drop(lock);
    Ok(BaseMeta {
        source: dir.to_path_buf(),
        origin: Origin::Replica {
            history: meta.history,
            term: meta.term,
            seq: meta.seq,
        },
        memory,
        mem_size: meta.mem_size,
        disk,
        state,
        created_unix_ms: snapshot::now_unix_ms(),
    })
}

/// Writes `clone-base.bin` atomically (temporary name, then rename).
fn write(base_dir: &Path, meta: &BaseMeta) -> Result<(), BaseError> {
    let what = format!("writing the clone base in {}", base_dir.display());
    let bytes = format::encode(meta).map_err(snap_err(&what))?;
    let tmp = base_dir.join(".clone-base.bin.tmp");
    let dst = base_dir.join(BASE_FILE);
    std::fs::write(&tmp, bytes)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &dst))
        .map_err(SnapshotError::io(&dst))
        .map_err(snap_err(&what))
}

/// A base already in `base_dir` for the same snapshot (a clone base is made once and may be
/// kept, `vmatrix clone --keep`): the snapshot's id is read again (its `snapshot.bin` only;
/// a snapshot is never rewritten, and its memory and disk were verified when the base was
/// made). Never for a replica image: its checkpoint may have moved on.
pub fn reuse(image_dir: &Path, base_dir: &Path) -> Option<BaseMeta> {
    let meta = read(base_dir).ok()?;
    let Origin::Snapshot { id } = meta.origin else {
        return None;
    };
    let same = std::fs::canonicalize(image_dir).ok()? == meta.source
        && !image::is_replica(image_dir)
        && snapshot::read_meta(image_dir).ok()?.id == id
        && meta.memory.exists()
        && meta.disk.as_ref().is_none_or(|d| d.exists());
    same.then_some(meta)
}

/// Reads and checks `clone-base.bin` of `base_dir`.
pub fn read(base_dir: &Path) -> Result<BaseMeta, BaseError> {
    let p = base_dir.join(BASE_FILE);
    let what = format!("clone base {}", p.display());
    let bytes = std::fs::read(&p)
        .map_err(SnapshotError::io(&p))
        .map_err(snap_err(&what))?;
    format::decode(&bytes).map_err(snap_err(&what))
}
