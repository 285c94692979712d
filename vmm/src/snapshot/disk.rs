//! The disk part of a snapshot: a full sparse copy of the disk file (`disk.img`), or the guest's
//! writes since the parent snapshot (`disk.delta`: records `offset u64 | len u32 | data`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::format::{Part, SnapshotError};
use crate::devices::virtio::blk::DiskWrites;

const CHUNK: usize = 1 << 20;
/// Largest single write record (the block device's own transfer limit).
const MAX_RECORD: u64 = 4 << 20;

/// Description of the disk part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskPart {
    /// `disk.img`: the whole disk.
    Full {
        /// Disk length in bytes.
        len: u64,
        /// CRC32 over all of it.
        crc: u32,
    },
    /// `disk.delta`: writes since the parent, applied in order.
    Delta {
        /// Disk length in bytes.
        len: u64,
        /// Number of records.
        records: u64,
        /// File length.
        file_len: u64,
        /// CRC32 over the file.
        crc: u32,
    },
}

/// Copies `len` bytes of `src` to a new sparse file at `dst`, returning the CRC of the content.
pub fn copy_sparse(src: &File, len: u64, dst: &Path) -> Result<u32, SnapshotError> {
    let out = File::create(dst).map_err(SnapshotError::io(dst))?;
    out.set_len(len).map_err(SnapshotError::io(dst))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (CHUNK as u64).min(len - off) as usize;
        src.read_exact_at(&mut buf[..n], off)
            .map_err(SnapshotError::io(dst))?;
        h.update(&buf[..n]);
        if buf[..n]
            .chunks(64)
            .any(|c| c.iter().fold(0u8, |a, &b| a | b) != 0)
        {
            out.write_all_at(&buf[..n], off)
                .map_err(SnapshotError::io(dst))?;
        }
        off += n as u64;
    }
    Ok(h.finalize())
}

/// Writes the full disk part.
pub fn write_full(src: &File, dst: &Path) -> Result<DiskPart, SnapshotError> {
    let len = src.metadata().map_err(SnapshotError::io(dst))?.len();
    let crc = copy_sparse(src, len, dst)?;
    Ok(DiskPart::Full { len, crc })
}

/// Writes the recorded guest writes as a delta.
pub fn write_delta(w: &DiskWrites, len: u64, dst: &Path) -> Result<DiskPart, SnapshotError> {
    let mut out = Vec::with_capacity(w.bytes as usize + w.writes.len() * 12);
    for (off, data) in &w.writes {
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    std::fs::write(dst, &out).map_err(SnapshotError::io(dst))?;
    Ok(DiskPart::Delta {
        len,
        records: w.writes.len() as u64,
        file_len: out.len() as u64,
        crc: crc32fast::hash(&out),
    })
}

fn crc_check(part: Part, stored: u32, computed: u32) -> Result<(), SnapshotError> {
    if stored != computed {
        return Err(SnapshotError::Crc {
            part,
            stored,
            computed,
        });
    }
    Ok(())
}

fn check_len(part: Part, path: &Path, expected: u64) -> Result<(), SnapshotError> {
    let got = std::fs::metadata(path)
        .map_err(SnapshotError::io(path))?
        .len();
    if got < expected {
        return Err(SnapshotError::Truncated {
            part,
            expected,
            got,
        });
    }
    if got > expected {
        return Err(SnapshotError::Invalid {
            part,
            why: format!("{got} bytes, expected {expected}"),
        });
    }
    Ok(())
}

/// Parses and checks a delta file: every record inside the disk, counts as described.
pub fn read_delta(path: &Path, part: &DiskPart) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
    let DiskPart::Delta {
        len,
        records,
        file_len,
        crc,
    } = part
    else {
        return Err(SnapshotError::Chain("expected a disk delta".into()));
    };
    check_len(Part::DiskDelta, path, *file_len)?;
    let data = std::fs::read(path).map_err(SnapshotError::io(path))?;
    crc_check(Part::DiskDelta, *crc, crc32fast::hash(&data))?;
    let bad = |why: String| SnapshotError::Invalid {
        part: Part::DiskDelta,
        why,
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        if data.len() - pos < 12 {
            return Err(bad(format!("record header truncated at byte {pos}")));
        }
        let mut ob = [0u8; 8];
        ob.copy_from_slice(&data[pos..pos + 8]);
        let off = u64::from_le_bytes(ob);
        let n = u64::from(u32::from_le_bytes([
            data[pos + 8],
            data[pos + 9],
            data[pos + 10],
            data[pos + 11],
        ]));
        pos += 12;
        if n > MAX_RECORD || (data.len() - pos) < n as usize {
            return Err(bad(format!(
                "record of {n} bytes at byte {pos} is too long"
            )));
        }
        if off.checked_add(n).is_none_or(|e| e > *len) {
            return Err(bad(format!(
                "write at {off} (+{n}) is outside the {len}-byte disk"
            )));
        }
        out.push((off, data[pos..pos + n as usize].to_vec()));
        pos += n as usize;
    }
    if out.len() as u64 != *records {
        return Err(bad(format!("{} records, expected {records}", out.len())));
    }
    Ok(out)
}

/// CRC32 of the first `len` bytes of a file.
pub fn file_crc(path: &Path, len: u64) -> Result<u32, SnapshotError> {
    let f = File::open(path).map_err(SnapshotError::io(path))?;
    let got = f.metadata().map_err(SnapshotError::io(path))?.len();
    if got < len {
        // (A short file's tail is not zeros: it is missing.)
        return Err(SnapshotError::Truncated {
            part: Part::Disk,
            expected: len,
            got,
        });
    }
    // Only the data regions are read: holes are zeros.
    let regions = super::files::data_regions(&f, len);
    let all = super::files::walk_sparse(
        len,
        &regions,
        &mut vec![0u8; CHUNK],
        |off, buf| f.read_exact_at(buf, off).map_err(SnapshotError::io(path)),
        |_, _| Ok(()),
    )?;
    Ok(all.finalize())
}

/// Verifies a full `disk.img`.
pub fn verify_full(path: &Path, part: &DiskPart) -> Result<(), SnapshotError> {
    let DiskPart::Full { len, crc } = part else {
        return Err(SnapshotError::Chain("expected a full disk".into()));
    };
    check_len(Part::Disk, path, *len)?;
    crc_check(Part::Disk, *crc, file_crc(path, *len)?)
}

/// Builds the working disk at `out` from a verified full disk and the deltas after it.
pub fn materialize(
    base: &Path,
    len: u64,
    deltas: &[Vec<(u64, Vec<u8>)>],
    out: &Path,
) -> Result<(), SnapshotError> {
    let src = File::open(base).map_err(SnapshotError::io(base))?;
    // A new file: `out` may be another name of `base` (never truncated through it).
    super::files::replace_target(base, out)?;
    copy_sparse(&src, len, out)?;
    let f = OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(SnapshotError::io(out))?;
    for d in deltas {
        for (off, data) in d {
            f.write_all_at(data, *off).map_err(SnapshotError::io(out))?;
        }
    }
    f.sync_all().map_err(SnapshotError::io(out))?;
    Ok(())
}
