//! Host file operations behind snapshots and working disks: where a sparse file holds data
//! (`SEEK_DATA`/`SEEK_HOLE`), a copy-on-write clone of a file (`FICLONE`, a reflink: instant,
//! and the two files share blocks until either is written), and an in-kernel copy of only the
//! data regions (`copy_file_range`), which keeps holes as holes.
//!
//! [`make_working_disk`] builds the disk a restored VM writes to from a disk image that must stay
//! as it is: a clone where the file system can (btrfs, XFS), otherwise a copy of the data.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::format::SnapshotError;

/// How [`make_working_disk`] made the working disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkingDisk {
    /// A copy-on-write clone (reflink) of the source: no data was copied.
    Cloned,
    /// A copy of the source's data regions (`bytes` of them); holes stay holes.
    Copied {
        /// Bytes of data copied.
        bytes: u64,
    },
}

/// Data regions `(start, end)` of the first `len` bytes of a sparse file, from `SEEK_DATA` /
/// `SEEK_HOLE` (the whole range where the file system does not report holes).
pub fn data_regions(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0i64;
    while (off as u64) < len {
        // SAFETY: lseek on an fd we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `off`. Any other error (EINVAL where the file system does
            // not tell, EIO): the rest counts as data, never as zeros that were not read.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((off as u64, len));
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        out.push((data as u64, (end as u64).min(len)));
        off = end;
    }
    out
}

/// A CRC32 hasher of `n` zero bytes, in O(log n) combines (for a sparse file's holes: a hole
/// of a GiB costs microseconds, not a read of a GiB of zeros).
pub fn zeros_crc(n: u64) -> crc32fast::Hasher {
    const BLOCK: usize = 4096;
    let mut out = crc32fast::Hasher::new();
    let mut block = crc32fast::Hasher::new();
    block.update(&[0u8; BLOCK]);
    let mut k = n / BLOCK as u64;
    while k > 0 {
        if k & 1 == 1 {
            out.combine(&block);
        }
        let b = block.clone();
        block.combine(&b);
        k >>= 1;
    }
    out.update(&[0u8; BLOCK][..(n % BLOCK as u64) as usize]);
    out
}

/// Reads the data `regions` (sorted `(start, end)`) of the first `len` bytes of a sparse file
/// through `read`, `buf.len()` bytes at a time, handing each piece to `on(offset, bytes)`;
/// returns the CRC32 state of all `len` bytes, holes counted as zeros without being read.
pub fn walk_sparse<E>(
    len: u64,
    regions: &[(u64, u64)],
    buf: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    mut on: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<crc32fast::Hasher, E> {
    let mut all = crc32fast::Hasher::new();
    let mut at = 0u64;
    for &(start, end) in regions {
        let (start, end) = (start.max(at), end.min(len));
        if start >= end {
            continue;
        }
        all.combine(&zeros_crc(start - at));
        let mut off = start;
        while off < end {
            let n = (buf.len() as u64).min(end - off) as usize;
            read(off, &mut buf[..n])?;
            all.update(&buf[..n]);
            on(off, &buf[..n])?;
            off += n as u64;
        }
        at = end;
    }
    all.combine(&zeros_crc(len - at.min(len)));
    Ok(all)
}

/// Makes `dst` a copy-on-write clone of `src` (`FICLONE`). Fails with `EOPNOTSUPP`, `EXDEV` or
/// `EINVAL` where the file system cannot (ext4, tmpfs, two file systems).
pub fn clone_file(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument and reads no memory of ours; both fds
    // are open for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Copies `len` bytes at `off` from `src` to the same offset of `dst`, in the kernel.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (mut from, mut to) = (off as i64, off as i64);
    let mut left = len;
    while left > 0 {
        let n = left.min(1 << 30) as usize;
        // SAFETY: both fds are open; the offsets are plain integers the kernel reads and
        // advances (they point at our own stack variables, alive for the call).
        let done = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut from, dst.as_raw_fd(), &mut to, n, 0)
        };
        match done {
            d if d > 0 => left -= d as u64,
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the source ends before byte {}", off + len),
                ))
            }
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// Copies the data regions of the first `len` bytes of `src` into `dst` (already `len` bytes
/// long and all holes), in the kernel; returns the bytes copied.
pub fn copy_data(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    let mut bytes = 0;
    for (start, end) in data_regions(src, len) {
        copy_range(src, dst, start, end - start)?;
        bytes += end - start;
    }
    Ok(bytes)
}

/// True if two files' metadata are of the same file (device and inode).
pub fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Makes room for a new file at `dst`, made from `src`: `src`'s own path is refused, and
/// whatever is at `dst` is unlinked, never truncated (it may be another name of `src`, such as
/// a link left by an earlier start: writing through it would change `src`).
pub(crate) fn replace_target(src: &Path, dst: &Path) -> Result<(), SnapshotError> {
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(SnapshotError::io(p));
    if std::fs::symlink_metadata(dst).is_err() {
        return Ok(());
    }
    if canon(src)? == canon(dst)? {
        return Err(SnapshotError::Invalid {
            part: super::Part::Disk,
            why: format!(
                "the working disk {} is {} itself",
                dst.display(),
                src.display()
            ),
        });
    }
    std::fs::remove_file(dst).map_err(SnapshotError::io(dst))
}

fn create_new(dst: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(SnapshotError::io(dst))
}

/// Makes `dst` (replaced, see [`make_working_disk`]) a copy-on-write clone of `src`; false, and
/// no `dst`, where the file system cannot clone.
pub fn try_clone(src: &Path, dst: &Path) -> Result<bool, SnapshotError> {
    let from = File::open(src).map_err(SnapshotError::io(src))?;
    replace_target(src, dst)?;
    let to = create_new(dst)?;
    if clone_file(&from, &to).is_ok() {
        return Ok(true);
    }
    drop(to);
    std::fs::remove_file(dst).map_err(SnapshotError::io(dst))?;
    Ok(false)
}

/// Creates (or replaces: the old file at `dst` is unlinked, never written) `dst` as a working
/// disk with the first `len` bytes of `src`: a clone where the file system allows it, else a
/// copy of the data regions (sparse). `src` is never written. Not fsynced: the VM's own
/// flushes make its disk durable.
pub fn make_working_disk(src: &Path, len: u64, dst: &Path) -> Result<WorkingDisk, SnapshotError> {
    let from = File::open(src).map_err(SnapshotError::io(src))?;
    let have = from.metadata().map_err(SnapshotError::io(src))?.len();
    if have < len {
        return Err(SnapshotError::Truncated {
            part: super::Part::Disk,
            expected: len,
            got: have,
        });
    }
    if have == len && try_clone(src, dst)? {
        return Ok(WorkingDisk::Cloned);
    }
    replace_target(src, dst)?;
    let to = create_new(dst)?;
    to.set_len(len).map_err(SnapshotError::io(dst))?;
    let bytes = copy_data(&from, &to, len).map_err(SnapshotError::io(dst))?;
    Ok(WorkingDisk::Copied { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_working_disk_has_the_same_bytes_and_keeps_the_holes() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src.img"), d.path().join("dst.img"));
        let f = File::create(&src).unwrap();
        let len = 8u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[0xa5; 8192], 4096).unwrap();
        f.write_all_at(&[0x5a; 100], (6 << 20) + 17).unwrap();
        // An old file at dst is replaced.
        std::fs::write(&dst, vec![1u8; 1 << 20]).unwrap();
        let how = make_working_disk(&src, len, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        if let WorkingDisk::Copied { bytes } = how {
            // Only what the file system stores was copied (a block or two per write, or all
            // of it where holes are not reported).
            assert!(
                bytes < len || data_regions(&f, len) == vec![(0, len)],
                "{bytes}"
            );
        }
        // The working disk is independent of its source.
        let w = OpenOptions::new().write(true).open(&dst).unwrap();
        w.write_all_at(&[7; 512], 0).unwrap();
        assert_eq!(std::fs::read(&src).unwrap()[..512], [0u8; 512]);
    }

    #[test]
    fn the_source_is_never_written_through_its_own_or_another_name() {
        let d = tempfile::tempdir().unwrap();
        let (src, link) = (d.path().join("src.img"), d.path().join("link.img"));
        std::fs::write(&src, [9u8; 4096]).unwrap();
        assert!(make_working_disk(&src, 4096, &src).is_err());
        assert_eq!(std::fs::read(&src).unwrap(), [9u8; 4096]);
        // Another name of the source is replaced, not written through.
        std::fs::hard_link(&src, &link).unwrap();
        make_working_disk(&src, 4096, &link).unwrap();
        let w = OpenOptions::new().write(true).open(&link).unwrap();
        use std::os::unix::fs::FileExt;
        w.write_all_at(&[1; 16], 0).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), [9u8; 4096]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// A sparse file's CRC and memory description read only its data regions, and equal
        /// a read of every byte (holes as zeros): zero pages written as data, holes of any
        /// length, a tail hole, a file without holes.
        #[test]
        fn sparse_crcs_equal_a_full_read(
            writes in proptest::collection::vec((0u64..2048, 1usize..20000, 0u8..3), 0..12),
            pages in 64u64..2048,
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("f.img");
            let f = File::create(&p).unwrap();
            let len = pages * 4096;
            f.set_len(len).unwrap();
            for (page, n, fill) in writes {
                let off = (page % pages) * 4096 + (n as u64 % 3000);
                let n = n.min((len - off) as usize);
                f.write_all_at(&vec![fill; n], off).unwrap();
            }
            let all = std::fs::read(&p).unwrap();
            proptest::prop_assert_eq!(
                crate::snapshot::disk::file_crc(&p, len).unwrap(),
                crc32fast::hash(&all)
            );
            let (part, crc) = crate::snapshot::memory::describe_file(&p, len).unwrap();
            proptest::prop_assert_eq!(crc, crc32fast::hash(&all));
            // The extents are the non-zero pages, their CRC that of their bytes.
            let nonzero: Vec<u64> = (0..pages)
                .filter(|i| all[(*i * 4096) as usize..][..4096].iter().any(|b| *b != 0))
                .collect();
            let crate::snapshot::memory::MemoryPart::Full { extents, crc } = part else {
                panic!("a full part");
            };
            let listed: Vec<u64> = extents.iter().flat_map(|(f, c)| *f..*f + *c).collect();
            proptest::prop_assert_eq!(&listed, &nonzero);
            let mut h = crc32fast::Hasher::new();
            for i in &nonzero {
                h.update(&all[(*i * 4096) as usize..][..4096]);
            }
            proptest::prop_assert_eq!(crc, h.finalize());
        }
    }

    #[test]
    fn zeros_crc_is_the_crc_of_zeros() {
        for n in [0u64, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 20] {
            assert_eq!(
                zeros_crc(n).finalize(),
                crc32fast::hash(&vec![0u8; n as usize]),
                "{n}"
            );
        }
    }

    #[test]
    fn a_short_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.img");
        std::fs::write(&src, [1u8; 100]).unwrap();
        let e = make_working_disk(&src, 4096, &d.path().join("dst.img")).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
    }
}
