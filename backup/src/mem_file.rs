//! The replica's memory file, mapped for reading: the old contents of a checkpoint's pages
//! (what their XOR deltas apply to) are copied out of a shared file mapping instead of one
//! `pread` per page — on the acknowledgement's path, and on this project's hosts (nested
//! virtualisation) a system call costs microseconds: a 16-client KV load's checkpoints of ~40
//! pages each made ~40 of them on the backup's one runtime thread (docs/BENCHMARKS.md, "The
//! backup's memory file, mapped").
//!
//! Writes stay `pwrite`s (after the acknowledgement, on the apply thread): the file is sparse,
//! and a write through the mapping into a hole on a full disk kills the process (SIGBUS) where
//! `pwrite` returns `ENOSPC` to the image's error path (the chaos suite's `disk-full` fault).
//! Reading a hole through the mapping needs no space. The mapping comes from `vm-memory` (the
//! crate the VMM maps guest RAM with): its safe `MmapRegion::from_file` and volatile copies
//! keep `unsafe` out of this crate. The file is sized before it is mapped and never shrinks
//! while open (the image directory is locked by its backup), so no read reaches beyond its
//! end; an I/O error reading the file back in would still end the process (SIGBUS) — the
//! price of the mapping, as for any memory-mapped store.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// The memory file and its mapping.
pub(crate) struct MemFile {
    file: File,
    map: MmapRegion<()>,
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

impl MemFile {
    /// Maps `file`, which must be exactly `len` bytes long.
    pub(crate) fn map(file: File, len: u64) -> io::Result<MemFile> {
        let size = usize::try_from(len)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(format!("cannot map a memory file of {len} bytes")))?;
        let got = file.metadata()?.len();
        if got != len {
            return Err(invalid(format!(
                "memory file of {got} bytes, {len} expected"
            )));
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size)
            .map_err(|e| io::Error::other(format!("mapping the memory file: {e}")))?;
        Ok(MemFile { file, map })
    }

    fn slice(&self, off: u64, len: usize) -> io::Result<vm_memory::VolatileSlice<'_>> {
        let at = usize::try_from(off).map_err(|_| invalid(format!("offset {off}")))?;
        self.map
            .get_slice(at, len)
            .map_err(|e| invalid(format!("{len} bytes at {off}: {e}")))
    }

    /// Copies `buf.len()` bytes at `off` into `buf`.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.slice(off, buf.len())?.copy_to(buf);
        Ok(())
    }

    /// Writes `data` into the file at `off` (`pwrite`: a full disk is an error, not a signal).
    pub(crate) fn write_all_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.slice(off, data.len())?;
        self.file.write_all_at(data, off)
    }

    /// Makes what was written durable (`fsync` writes back the mapping's dirty pages too).
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_reach_the_file_and_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(3 * 4096).unwrap();
        f.write_all_at(&[7u8; 4096], 4096).unwrap();
        let m = MemFile::map(f, 3 * 4096).unwrap();
        let mut page = vec![0u8; 4096];
        m.read_exact_at(&mut page, 4096).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        m.write_all_at(&[9u8; 4096], 8192).unwrap();
        m.read_exact_at(&mut page, 8192).unwrap();
        assert!(
            page.iter().all(|&b| b == 9),
            "a write is seen through the mapping"
        );
        m.sync_all().unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert!(on_disk[8192..].iter().all(|&b| b == 9));
        assert!(m.read_exact_at(&mut page, 8193).is_err(), "past the end");
        assert!(m.write_all_at(&page, u64::MAX - 10).is_err());
        let short = File::open(&p).unwrap();
        assert!(MemFile::map(short, 4 * 4096).is_err(), "size mismatch");
        assert!(MemFile::map(File::open(&p).unwrap(), 0).is_err());
    }
}
