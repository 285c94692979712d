//! The memory part of a snapshot.
//!
//! - **Full:** `memory.bin` is a raw image of guest RAM with holes for zero pages (a sparse
//!   file). Restore maps it `MAP_PRIVATE`, so restore time does not grow with guest size: only
//!   pages the guest touches are read, copy-on-write keeps the file intact. The CRC covers the
//!   non-zero runs (`extents`), which are all that is read to verify it.
//! - **Diff:** `memory.bin` holds the pages dirtied since the parent, packed in `pages` order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::format::{Part, SnapshotError};
use crate::device_bitmap::DeviceBitmap;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestMem;

const PAGE: usize = PAGE_SIZE as usize;
const CHUNK: usize = 1 << 20;

/// Description of `memory.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryPart {
    /// Sparse raw image; `extents` are (first page, page count) runs holding data.
    Full {
        /// Runs of non-zero pages.
        extents: Vec<(u64, u64)>,
        /// CRC32 over the data of all extents, in order.
        crc: u32,
    },
    /// Packed dirty pages.
    Diff {
        /// Page numbers, strictly increasing.
        pages: Vec<u64>,
        /// CRC32 over the whole file.
        crc: u32,
    },
}

/// True if the page is all zeros (the inner fold over 64 bytes vectorises).
fn is_zero(p: &[u8]) -> bool {
    p.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Walks a memory image of `mem_size` bytes read through `read` (1 MiB at a time), finding the
/// runs of non-zero pages. Each run is handed to `on_run(offset, bytes)`. Returns the memory
/// part (extents and the CRC of their data) and the CRC32 of the whole image.
fn scan(
    mem_size: u64,
    read: impl FnMut(u64, &mut [u8]) -> Result<(), SnapshotError>,
    on_run: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<(MemoryPart, u32), SnapshotError> {
    scan_regions(mem_size, &[(0, mem_size)], read, on_run)
}

/// [`scan`] of only the `regions` (sorted, page-aligned `(start, end)`) that may hold data:
/// the rest reads as zeros and counts in the whole image's CRC without being read.
fn scan_regions(
    mem_size: u64,
    regions: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), SnapshotError>,
    mut on_run: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<(MemoryPart, u32), SnapshotError> {
    let mut data = crc32fast::Hasher::new();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let all = super::files::walk_sparse(
        mem_size,
        regions,
        &mut vec![0u8; CHUNK],
        &mut read,
        |off, buf| scan_chunk(off, buf, &mut on_run, &mut data, &mut extents),
    )?;
    Ok((
        MemoryPart::Full {
            extents,
            crc: data.finalize(),
        },
        all.finalize(),
    ))
}

/// The non-zero page runs of one chunk read at `off`.
fn scan_chunk(
    off: u64,
    buf: &[u8],
    on_run: &mut impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    data: &mut crc32fast::Hasher,
    extents: &mut Vec<(u64, u64)>,
) -> Result<(), SnapshotError> {
    let n = buf.len();
    let mut run: Option<usize> = None;
    for p in 0..=n / PAGE {
        let nonzero = p < n / PAGE && !is_zero(&buf[p * PAGE..(p + 1) * PAGE]);
        match (nonzero, run) {
            (true, None) => run = Some(p),
            (false, Some(s)) => {
                let bytes = &buf[s * PAGE..p * PAGE];
                on_run(off + (s * PAGE) as u64, bytes)?;
                data.update(bytes);
                let first = (off / PAGE_SIZE) + s as u64;
                match extents.last_mut() {
                    Some((f, c)) if *f + *c == first => *c += (p - s) as u64,
                    _ => extents.push((first, (p - s) as u64)),
                }
                run = None;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes all of guest RAM as a sparse image. Returns the part description and the CRC32 of
/// the whole of RAM (zero pages included), which identifies the memory state.
pub fn write_full(
    mem: &GuestMem,
    mem_size: u64,
    path: &Path,
) -> Result<(MemoryPart, u32), SnapshotError> {
    let file = File::create(path).map_err(SnapshotError::io(path))?;
    file.set_len(mem_size).map_err(SnapshotError::io(path))?;
    scan(
        mem_size,
        |off, buf| {
            mem.read_slice(buf, crate::memory::ram_addr(off))
                .map_err(|e| SnapshotError::Capture(format!("reading guest memory: {e}")))
        },
        |off, bytes| {
            file.write_all_at(bytes, off)
                .map_err(SnapshotError::io(path))
        },
    )
}

/// Describes an existing raw memory image file (a backup's replica) as the memory part of a
/// full snapshot: its non-zero extents, their CRC, and the CRC of all of it.
/// Only its data regions are read (`SEEK_DATA`): its holes are zeros.
pub fn describe_file(path: &Path, mem_size: u64) -> Result<(MemoryPart, u32), SnapshotError> {
    let f = open_checked(path, mem_size)?;
    let regions: Vec<(u64, u64)> = super::files::data_regions(&f, mem_size)
        .into_iter()
        .map(|(s, e)| (s / PAGE_SIZE * PAGE_SIZE, e.div_ceil(PAGE_SIZE) * PAGE_SIZE))
        .collect();
    scan_regions(
        mem_size,
        &regions,
        |off, buf| f.read_exact_at(buf, off).map_err(SnapshotError::io(path)),
        |_, _| Ok(()),
    )
}

/// Copies `pages` out of guest memory into `out` (done while the VM is paused). `out` is a
/// staging buffer kept across snapshots: growing it faults in fresh host pages, which costs more
/// than the copy itself, so it only ever grows.
pub fn stage_pages(mem: &GuestMem, pages: &[u64], out: &mut Vec<u8>) -> Result<(), SnapshotError> {
    let need = pages.len() * PAGE;
    if out.len() < need {
        out.resize(need, 0);
    }
    for (i, &pfn) in pages.iter().enumerate() {
        mem.read_slice(
            &mut out[i * PAGE..(i + 1) * PAGE],
            crate::memory::page_addr(pfn),
        )
        .map_err(|e| SnapshotError::Capture(format!("reading page {pfn}: {e}")))?;
    }
    Ok(())
}

/// Writes staged pages as a diff `memory.bin`.
pub fn write_diff(
    path: &Path,
    pages: Vec<u64>,
    staged: &[u8],
) -> Result<MemoryPart, SnapshotError> {
    std::fs::write(path, staged).map_err(SnapshotError::io(path))?;
    Ok(MemoryPart::Diff {
        pages,
        crc: crc32fast::hash(staged),
    })
}

fn invalid(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        part: Part::Memory,
        why: why.into(),
    }
}

/// Checks the description against the RAM size: in range, ordered, no overlap.
pub fn check_part(part: &MemoryPart, mem_size: u64) -> Result<(), SnapshotError> {
    let pages = mem_size / PAGE_SIZE;
    match part {
        MemoryPart::Full { extents, .. } => {
            let mut next = 0u64;
            for &(first, count) in extents {
                if count == 0 || first < next || first.checked_add(count).is_none_or(|e| e > pages)
                {
                    return Err(invalid(format!(
                        "extent ({first}, {count}) out of order or out of range"
                    )));
                }
                next = first + count;
            }
        }
        MemoryPart::Diff { pages: list, .. } => {
            if list.windows(2).any(|w| w[0] >= w[1]) || list.last().is_some_and(|&p| p >= pages) {
                return Err(invalid("page list out of order or out of range"));
            }
        }
    }
    Ok(())
}

fn open_checked(path: &Path, expected: u64) -> Result<File, SnapshotError> {
    let f = File::open(path).map_err(SnapshotError::io(path))?;
    let len = f.metadata().map_err(SnapshotError::io(path))?.len();
    if len < expected {
        return Err(SnapshotError::Truncated {
            part: Part::Memory,
            expected,
            got: len,
        });
    }
    if len > expected {
        return Err(invalid(format!("{len} bytes, expected {expected}")));
    }
    Ok(f)
}

/// Verifies `memory.bin` against its description (reads only the stored data).
pub fn verify(path: &Path, part: &MemoryPart, mem_size: u64) -> Result<(), SnapshotError> {
    check_part(part, mem_size)?;
    let (stored, computed) = match part {
        MemoryPart::Full { extents, crc } => {
            let f = open_checked(path, mem_size)?;
            let mut h = crc32fast::Hasher::new();
            let mut buf = vec![0u8; CHUNK];
            for &(first, count) in extents {
                let mut off = first * PAGE_SIZE;
                let end = (first + count) * PAGE_SIZE;
                while off < end {
                    let n = (CHUNK as u64).min(end - off) as usize;
                    f.read_exact_at(&mut buf[..n], off)
                        .map_err(SnapshotError::io(path))?;
                    h.update(&buf[..n]);
                    off += n as u64;
                }
            }
            let computed = h.finalize();
            if *crc == computed {
                check_holes(&f, path, extents, mem_size)?;
            }
            (*crc, computed)
        }
        MemoryPart::Diff { pages, crc } => {
            open_checked(path, pages.len() as u64 * PAGE_SIZE)?;
            let data = std::fs::read(path).map_err(SnapshotError::io(path))?;
            (*crc, crc32fast::hash(&data))
        }
    };
    if stored != computed {
        return Err(SnapshotError::Crc {
            part: Part::Memory,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Pages outside the extents must be zero: a flipped bit in a hole would otherwise go unseen.
/// Only data the file system stores there is read.
fn check_holes(
    f: &File,
    path: &Path,
    extents: &[(u64, u64)],
    mem_size: u64,
) -> Result<(), SnapshotError> {
    let in_extent = |pfn: u64| {
        let i = extents.partition_point(|&(first, _)| first <= pfn);
        i > 0 && pfn < extents[i - 1].0 + extents[i - 1].1
    };
    let mut page = vec![0u8; PAGE];
    for (start, end) in super::files::data_regions(f, mem_size) {
        let mut pfn = start / PAGE_SIZE;
        while pfn * PAGE_SIZE < end.min(mem_size) {
            if !in_extent(pfn) {
                f.read_exact_at(&mut page, pfn * PAGE_SIZE)
                    .map_err(SnapshotError::io(path))?;
                if !is_zero(&page) {
                    return Err(invalid(format!("page {pfn} holds data but is not listed")));
                }
            }
            pfn += 1;
        }
    }
    Ok(())
}

/// Maps a raw image of guest RAM (a full `memory.bin`, or a backup's replica memory file)
/// copy-on-write (`MAP_PRIVATE`) as guest RAM: a page is read from the file when it is first
/// touched, a write copies it, and the file itself is never written. The file must be exactly
/// `mem_size` bytes (a page beyond its end could not be read). Device writes are tracked by the
/// region's bitmap, vCPU writes by KVM's dirty log on the slot, as for anonymous memory.
pub fn map_full(path: &Path, mem_size: u64) -> Result<GuestMem, SnapshotError> {
    let file = open_checked(path, mem_size)?;
    let mut regions = Vec::new();
    // One mapping per RAM range, at its offset in the image (`crate::layout::ram_ranges`).
    for r in crate::layout::ram_ranges(mem_size) {
        let size = usize::try_from(r.len)
            .map_err(|_| invalid(format!("{mem_size} bytes do not fit this host")))?;
        let f = file.try_clone().map_err(SnapshotError::io(path))?;
        let region = MmapRegionBuilder::new_with_bitmap(size, DeviceBitmap::new(size))
            .with_file_offset(FileOffset::new(f, r.off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Capture(format!("mapping {}: {e}", path.display())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or_else(|| SnapshotError::Capture("guest RAM region overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Capture(format!("guest memory: {e}")))
}

/// Writes the pages of a verified diff into guest memory.
pub fn apply_diff(mem: &GuestMem, path: &Path, pages: &[u64]) -> Result<(), SnapshotError> {
    let data = std::fs::read(path).map_err(SnapshotError::io(path))?;
    if data.len() != pages.len() * PAGE {
        return Err(invalid("diff length changed since verification"));
    }
    for (i, &pfn) in pages.iter().enumerate() {
        mem.write_slice(
            &data[i * PAGE..(i + 1) * PAGE],
            crate::memory::page_addr(pfn),
        )
        .map_err(|e| invalid(format!("page {pfn}: {e}")))?;
    }
    Ok(())
}

/// CRC32 of all of guest RAM.
pub fn checksum(mem: &GuestMem, mem_size: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < mem_size {
        let n = (CHUNK as u64).min(mem_size - off) as usize;
        if mem
            .read_slice(&mut buf[..n], crate::memory::ram_addr(off))
            .is_err()
        {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize()
}
