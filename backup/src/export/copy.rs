//! The copying of an export (see the parent module): the destination's files, the pass over
//! the image's data regions, the rounds over what checkpoints wrote meanwhile, and the
//! snapshot's description written last.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use protocol::page::PAGE;
use vmm::snapshot;

use super::tracker::{Tracker, BLOCK};
use super::{FINAL_PAGES, MAX_ROUNDS};
use crate::image::{io, ReplicaMeta};
use crate::BackupError;

/// Bytes copied between two checks of cancellation (and the largest run copied at once).
const CHUNK: u64 = 4 << 20;

/// The source and destination files of an export.
pub(super) struct Files {
    pub(super) dst: PathBuf,
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
    pub(super) fn open(
        src: &Path,
        dst: &Path,
        mem_size: u64,
        disk_len: u64,
    ) -> Result<Files, BackupError> {
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
                return Err(BackupError::Export("the export was cancelled".into()));
            }
            let n = (end - off).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], off).map_err(io(&p))?;
            dst.write_all_at(&buf[..n], off).map_err(io(&p))?;
            off += n as u64;
        }
        Ok(end.saturating_sub(start))
    }

    /// Copies recorded pages and disk blocks (sorted), adjacent ones as one run; returns the
    /// bytes copied.
    pub(super) fn copy_recorded(
        &self,
        pages: &[u64],
        blocks: &[u64],
        cancel: &AtomicBool,
    ) -> Result<u64, BackupError> {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut bytes = 0;
        for (disk, units, unit, limit) in [
            (false, pages, PAGE as u64, self.mem_size),
            (true, blocks, BLOCK, self.disk_len),
        ] {
            for (first, last) in runs(units) {
                let (start, end) = (first * unit, ((last + 1) * unit).min(limit));
                if start < end {
                    bytes += self.copy_range(disk, (start, end), &mut buf, cancel)?;
                }
            }
        }
        Ok(bytes)
    }
}

/// Runs `(first, last)` of consecutive numbers in a sorted list.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &n in sorted {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => out.push((n, n)),
        }
    }
    out
}

/// What the copying thread hands to the final step.
pub(super) struct Passed {
    pub(super) files: Files,
    /// The export's generation in the tracker.
    pub(super) gen: u64,
    pub(super) rounds: u64,
    pub(super) bytes: u64,
}

/// The pass over the image's data regions, then [`rounds`].
pub(super) fn pass(
    files: Files,
    tracker: &Tracker,
    gen: u64,
    cancel: &AtomicBool,
) -> Result<Passed, BackupError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bytes = 0;
    let mem = (false, Some(&files.src_mem), files.mem_size);
    let disk = (true, files.src_disk.as_ref(), files.disk_len);
    for (is_disk, f, len) in [mem, disk] {
        let Some(f) = f else { continue };
        for region in snapshot::files::data_regions(f, len) {
            bytes += files.copy_range(is_disk, region, &mut buf, cancel)?;
        }
    }
    let p = Passed {
        files,
        gen,
        rounds: 0,
        bytes,
    };
    rounds(p, tracker, cancel)
}

/// Copies what checkpoints wrote since, while more than [`FINAL_PAGES`] are recorded (at most
/// [`MAX_ROUNDS`] rounds).
pub(super) fn rounds(
    mut p: Passed,
    tracker: &Tracker,
    cancel: &AtomicBool,
) -> Result<Passed, BackupError> {
    let mut n = 0;
    while tracker.pending(p.gen) > FINAL_PAGES && n < MAX_ROUNDS {
        let (pages, blocks) = tracker.take(p.gen)?;
        p.bytes += p.files.copy_recorded(&pages, &blocks, cancel)?;
        p.rounds += 1;
        n += 1;
    }
    Ok(p)
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

/// Syncs the frozen files and writes their `snapshot.bin`, unless cancelled first (any of
/// `cancel`: the backup stopping, the requester gone).
pub(super) fn snapshot_of(
    p: &Passed,
    meta: &ReplicaMeta,
    cancel: &[&AtomicBool],
) -> Result<(u64, u32), BackupError> {
    let f = &p.files;
    let cancelled = || match cancel.iter().any(|c| c.load(Ordering::Relaxed)) {
        true => Err(BackupError::Export(
            "the backup stopped or was promoted during the export".into(),
        )),
        false => Ok(()),
    };
    let mp = f.dst.join(snapshot::MEMORY_FILE);
    f.mem.sync_all().map_err(io(&mp))?;
    if let Some(d) = &f.disk {
        let dp = f.dst.join(snapshot::DISK_FILE);
        d.sync_all().map_err(io(&dp))?;
    }
    cancelled()?;
    let r = write_snapshot(&f.dst, f.mem_size, f.disk_len, &meta.state)?;
    cancelled()?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_join_consecutive_numbers() {
        assert_eq!(super::runs(&[]), vec![]);
        assert_eq!(
            super::runs(&[1, 2, 3, 7, 9, 10]),
            vec![(1, 3), (7, 7), (9, 10)]
        );
    }
}
