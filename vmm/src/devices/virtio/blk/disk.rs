//! What a virtio-blk device reads and writes: a raw disk file, or a copy-on-write overlay
//! (a clone's disk).
//!
//! An [`Overlay`] reads a shared, never-written **base** file and keeps the clone's own writes
//! in a **delta** file of the same size, sparse, at the same offsets, with a bitmap of the
//! 4 KiB blocks written (in memory: the delta lives and dies with its clone). A read takes
//! each block from the delta if its bit is set, else from the base; a write of part of a block
//! not yet written first copies that block from the base (read-modify-write), so a block is
//! always whole in the one file that holds it. A new overlay costs one empty sparse file,
//! whatever the disk's size; it grows by what the clone writes. A flush is `fdatasync` of the
//! delta (the base never changes).
//!
//! Both implement [`FileExt`], so device code and captures read either kind the same way.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Block size of the overlay's bitmap.
pub const OVERLAY_BLOCK: u64 = 4096;

/// The storage behind a block device.
pub enum Disk {
    /// A raw disk file, read and written in place.
    Raw(File),
    /// A copy-on-write overlay over a shared base.
    Overlay(Overlay),
}

impl From<File> for Disk {
    fn from(f: File) -> Disk {
        Disk::Raw(f)
    }
}

impl Disk {
    /// Size in bytes.
    pub fn len(&self) -> std::io::Result<u64> {
        match self {
            Disk::Raw(f) => Ok(f.metadata()?.len()),
            Disk::Overlay(o) => Ok(o.len),
        }
    }

    /// True for a disk of zero bytes.
    pub fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Makes written data durable (the delta's, for an overlay).
    pub fn sync_data(&self) -> std::io::Result<()> {
        match self {
            Disk::Raw(f) => f.sync_data(),
            Disk::Overlay(o) => o.delta.sync_data(),
        }
    }

    /// The raw file, if this is one (a whole-disk copy reads it directly).
    pub fn raw(&self) -> Option<&File> {
        match self {
            Disk::Raw(f) => Some(f),
            Disk::Overlay(_) => None,
        }
    }

    /// The overlay, if this is one.
    pub fn overlay(&self) -> Option<&Overlay> {
        match self {
            Disk::Raw(_) => None,
            Disk::Overlay(o) => Some(o),
        }
    }
}

impl FileExt for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Disk::Raw(f) => f.read_at(buf, offset),
            Disk::Overlay(o) => o.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Disk::Raw(f) => f.write_at(buf, offset),
            Disk::Overlay(o) => o.write_at(buf, offset),
        }
    }
}

/// A copy-on-write overlay (see the module docs).
pub struct Overlay {
    base: File,
    delta: File,
    len: u64,
    /// One bit per [`OVERLAY_BLOCK`]: the block is in the delta.
    written: Vec<AtomicU64>,
}

fn beyond(offset: u64, len: usize, size: u64) -> bool {
    offset.checked_add(len as u64).is_none_or(|end| end > size)
}

impl Overlay {
    /// An overlay of `base` (opened read-only by the caller, never written) keeping writes in
    /// `delta`, which must be empty (a new file): it is sized to the base, sparse.
    pub fn new(base: File, delta: File) -> std::io::Result<Overlay> {
        let len = base.metadata()?.len();
        if delta.metadata()?.len() != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the overlay's delta file is not empty (a delta belongs to one clone)",
            ));
        }
        delta.set_len(len)?;
        let blocks = len.div_ceil(OVERLAY_BLOCK);
        let words = blocks.div_ceil(64) as usize;
        Ok(Overlay {
            base,
            delta,
            len,
            written: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Size in bytes (the base's).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty disk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks written by the clone so far (each holds [`OVERLAY_BLOCK`] bytes in the delta).
    pub fn blocks_written(&self) -> u64 {
        self.written
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    fn is_written(&self, block: u64) -> bool {
        let w = self.written[(block / 64) as usize].load(Ordering::Relaxed);
        w & (1 << (block % 64)) != 0
    }

    fn mark(&self, block: u64) {
        self.written[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Relaxed);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if beyond(offset, buf.len(), self.len) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let block = off / OVERLAY_BLOCK;
            let in_block = (OVERLAY_BLOCK - off % OVERLAY_BLOCK) as usize;
            let n = in_block.min(buf.len() - done);
            let src = match self.is_written(block) {
                true => &self.delta,
                false => &self.base,
            };
            src.read_exact_at(&mut buf[done..done + n], off)?;
            done += n;
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        if beyond(offset, buf.len(), self.len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "write beyond the end of the disk",
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let block = off / OVERLAY_BLOCK;
            let start = block * OVERLAY_BLOCK;
            let in_block = (start + OVERLAY_BLOCK - off) as usize;
            let n = in_block.min(buf.len() - done);
            let whole = off == start && n as u64 == OVERLAY_BLOCK.min(self.len - start);
            if !whole && !self.is_written(block) {
                // First write of part of this block: bring the rest of it from the base.
                let blen = OVERLAY_BLOCK.min(self.len - start) as usize;
                let mut b = vec![0u8; blen];
                self.base.read_exact_at(&mut b, start)?;
                let at = (off - start) as usize;
                b[at..at + n].copy_from_slice(&buf[done..done + n]);
                self.delta.write_all_at(&b, start)?;
            } else {
                self.delta.write_all_at(&buf[done..done + n], off)?;
            }
            self.mark(block);
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        f.as_file().write_all_at(&data, 0).unwrap();
        (f, data)
    }

    fn overlay(b: &tempfile::NamedTempFile) -> (tempfile::NamedTempFile, Disk) {
        let d = tempfile::NamedTempFile::new().unwrap();
        let base = File::open(b.path()).unwrap();
        let o = Overlay::new(base, d.reopen().unwrap()).unwrap();
        (d, Disk::Overlay(o))
    }

    #[test]
    fn reads_the_base_until_written_and_never_writes_it() {
        let (b, data) = base(5 * 4096 + 512);
        let (_d, disk) = overlay(&b);
        let mut got = vec![0u8; data.len()];
        disk.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, data);
        disk.write_all_at(&[0xaa; 512], 4096 + 512).unwrap();
        disk.write_all_at(&[0xbb; 512], 5 * 4096).unwrap(); // the short last block
        let mut want = data.clone();
        want[4096 + 512..4096 + 1024].fill(0xaa);
        want[5 * 4096..].fill(0xbb);
        disk.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        assert_eq!(std::fs::read(b.path()).unwrap(), data, "base untouched");
        assert_eq!(disk.overlay().unwrap().blocks_written(), 2);
        assert_eq!(disk.len().unwrap(), data.len() as u64);
        assert!(disk
            .write_all_at(&[0; 512], data.len() as u64 - 256)
            .is_err());
        assert!(disk
            .read_exact_at(&mut [0; 512], data.len() as u64)
            .is_err());
    }

    #[test]
    fn a_used_delta_is_refused() {
        let (b, _) = base(4096);
        let d = tempfile::NamedTempFile::new().unwrap();
        d.as_file().set_len(10).unwrap();
        let e = Overlay::new(File::open(b.path()).unwrap(), d.reopen().unwrap());
        assert!(e.is_err());
    }

    proptest! {
        #[test]
        fn behaves_like_a_private_copy(writes in proptest::collection::vec((0u64..40, 1usize..20, any::<u8>()), 1..30)) {
            let (b, data) = base(40 * 512);
            let (_d, disk) = overlay(&b);
            let mut model = data.clone();
            for (sector, n, v) in writes {
                let n = n.min(40 - sector as usize);
                if n == 0 { continue; }
                let off = sector * 512;
                disk.write_all_at(&vec![v; n * 512], off).unwrap();
                model[off as usize..off as usize + n * 512].fill(v);
            }
            let mut got = vec![0u8; model.len()];
            disk.read_exact_at(&mut got, 0).unwrap();
            prop_assert_eq!(got, model);
            prop_assert_eq!(std::fs::read(b.path()).unwrap(), data);
        }
    }
}
