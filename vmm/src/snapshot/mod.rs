//! Snapshots: a VM as a directory, and back.
//!
//! ```text
//! <dir>/snapshot.bin   framed metadata + all vCPU and device state (format.rs)
//! <dir>/memory.bin     guest RAM: sparse full image, or packed dirty pages of a diff
//! <dir>/disk.img       full copy of the disk (full snapshots, or a diff whose write log overflowed)
//! <dir>/disk.delta     the guest's disk writes since the parent (diff snapshots)
//! ```
//! `snapshot.bin` is written last (via a temporary name and `rename`), so a directory without it
//! is an incomplete snapshot and is refused. Every part carries a CRC32 that is checked before
//! any VM is built. See docs/snapshot.md.

pub mod disk;
pub mod files;
pub mod format;
pub mod memory;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::platform::PlatformPersist;
use crate::devices::serial::SerialPersist;
use crate::devices::virtio::blk::BlkPersist;
use crate::devices::virtio::net::NetPersist;
use crate::devices::virtio::persist::TransportPersist;
use crate::vcpu_state::VcpuState;
pub use disk::DiskPart;
pub use format::{Part, SnapshotError};
pub use memory::MemoryPart;

/// File names.
pub const META_FILE: &str = "snapshot.bin";
/// Memory part.
pub const MEMORY_FILE: &str = "memory.bin";
/// Full disk part.
pub const DISK_FILE: &str = "disk.img";
/// Disk delta part.
pub const DELTA_FILE: &str = "disk.delta";
/// Longest diff chain accepted.
pub const MAX_CHAIN: usize = 256;

/// Everything about the VM except memory and disk contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The vCPU.
    pub vcpu: VcpuState,
    /// COM1.
    pub serial: SerialPersist,
    /// The platform device (clock, config, generation).
    pub platform: PlatformPersist,
    /// virtio-net, if present.
    pub net: Option<TransportPersist<NetPersist>>,
    /// virtio-blk, if present.
    pub blk: Option<TransportPersist<BlkPersist>>,
}

/// Link from a diff to the snapshot it is relative to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Directory of the parent: relative to the diff's own directory (so a chain can be moved
    /// or copied as a whole), or absolute (snapshots written before that rule, or on another
    /// filesystem root).
    pub dir: PathBuf,
    /// Its id.
    pub id: u64,
}

/// The path that leads from directory `from` to `to` (both absolute): `../a/b` style, or `to`
/// itself if they share nothing but the root.
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    use std::path::Component;
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return to.to_path_buf();
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The contents of `snapshot.bin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Random id, referenced by children.
    pub id: u64,
    /// Parent (diff snapshots only).
    pub parent: Option<ParentRef>,
    /// Wall-clock time of capture (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// The memory part.
    pub memory: MemoryPart,
    /// CRC32 of all of guest RAM at capture (full snapshots).
    pub memory_checksum: Option<u32>,
    /// The disk part, if the VM has a disk.
    pub disk: Option<DiskPart>,
    /// vCPU and devices.
    pub vm: VmState,
}

impl SnapshotMeta {
    /// True for a diff snapshot.
    pub fn is_diff(&self) -> bool {
        self.parent.is_some()
    }
}

/// Writes `snapshot.bin` atomically.
pub fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let bytes = format::encode(meta)?;
    let tmp = dir.join(".snapshot.bin.tmp");
    std::fs::write(&tmp, &bytes).map_err(SnapshotError::io(&tmp))?;
    let f = std::fs::File::open(&tmp).map_err(SnapshotError::io(&tmp))?;
    f.sync_all().map_err(SnapshotError::io(&tmp))?;
    let dst = dir.join(META_FILE);
    std::fs::rename(&tmp, &dst).map_err(SnapshotError::io(&dst))
}

/// Reads and checks `snapshot.bin` of `dir`.
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let path = dir.join(META_FILE);
    if !path.exists() {
        return Err(SnapshotError::Missing {
            part: Part::Meta,
            dir: dir.to_path_buf(),
        });
    }
    let len = std::fs::metadata(&path)
        .map_err(SnapshotError::io(&path))?
        .len();
    if len > format::MAX_META_LEN + 64 {
        return Err(SnapshotError::TooLarge {
            part: Part::Meta,
            len,
            max: format::MAX_META_LEN,
        });
    }
    let bytes = std::fs::read(&path).map_err(SnapshotError::io(&path))?;
    let meta: SnapshotMeta = format::decode(&bytes)?;
    if meta.mem_size == 0
        || !meta.mem_size.is_multiple_of(crate::layout::PAGE_SIZE)
        || meta.mem_size > crate::layout::MAX_MEM_MIB << 20
    {
        return Err(SnapshotError::Invalid {
            part: Part::Meta,
            why: format!("guest RAM size {} is not valid", meta.mem_size),
        });
    }
    memory::check_part(&meta.memory, meta.mem_size)?;
    match (&meta.memory, meta.is_diff()) {
        (MemoryPart::Full { .. }, false) | (MemoryPart::Diff { .. }, true) => {}
        _ => {
            return Err(SnapshotError::Invalid {
                part: Part::Meta,
                why: "memory part does not match the snapshot kind".into(),
            })
        }
    }
    Ok(meta)
}

/// One verified link of a chain.
#[derive(Debug, Clone)]
pub struct Link {
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: SnapshotMeta,
}

/// Follows parents from `dir` back to a full snapshot and returns the chain base first.
/// Checks ids, sizes and lengths, and verifies the CRC of every memory and disk part.
pub fn load_chain(dir: &Path) -> Result<Vec<Link>, SnapshotError> {
    let mut chain = Vec::new();
    let mut cur = dir.to_path_buf();
    let mut expect_id = None;
    loop {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::Chain(format!(
                "longer than {MAX_CHAIN} snapshots"
            )));
        }
        let meta = read_meta(&cur)?;
        if let Some(id) = expect_id {
            if meta.id != id {
                return Err(SnapshotError::Chain(format!(
                    "{} has id {:#x}, its child expects {id:#x}",
                    cur.display(),
                    meta.id
                )));
            }
        }
        let parent = meta.parent.clone();
        chain.push(Link {
            dir: cur.clone(),
            meta,
        });
        match parent {
            Some(p) => {
                expect_id = Some(p.id);
                cur = match p.dir.is_relative() {
                    true => cur.join(p.dir),
                    false => p.dir,
                };
            }
            None => break,
        }
    }
    chain.reverse();
    let mem_size = chain[0].meta.mem_size;
    for l in &chain {
        if l.meta.mem_size != mem_size {
            return Err(SnapshotError::Chain(
                "guest RAM size changes along the chain".into(),
            ));
        }
        memory::verify(&l.dir.join(MEMORY_FILE), &l.meta.memory, mem_size)?;
        match &l.meta.disk {
            Some(p @ DiskPart::Full { .. }) => disk::verify_full(&l.dir.join(DISK_FILE), p)?,
            Some(p @ DiskPart::Delta { .. }) => {
                disk::read_delta(&l.dir.join(DELTA_FILE), p)?;
            }
            None => {}
        }
    }
    if chain[0]
        .meta
        .disk
        .as_ref()
        .is_some_and(|d| matches!(d, DiskPart::Delta { .. }))
    {
        return Err(SnapshotError::Chain(
            "the base snapshot has only a disk delta".into(),
        ));
    }
    Ok(chain)
}

/// Guest RAM as of the last link of a verified chain: the base image mapped copy-on-write, the
/// diffs applied in order, the device dirty bitmap cleared.
pub fn restore_memory(chain: &[Link]) -> Result<crate::memory::GuestMem, SnapshotError> {
    let base = chain
        .first()
        .ok_or_else(|| SnapshotError::Chain("empty chain".into()))?;
    let mem = memory::map_full(&base.dir.join(MEMORY_FILE), base.meta.mem_size)?;
    for l in &chain[1..] {
        if let MemoryPart::Diff { pages, .. } = &l.meta.memory {
            memory::apply_diff(&mem, &l.dir.join(MEMORY_FILE), pages)?;
        }
    }
    crate::dirty::reset_device_bitmap(&mem);
    Ok(mem)
}

/// Writes the disk as of the last link of a verified chain to `out`: the last full copy, then
/// every later delta. Returns false (and writes nothing) if the VM had no disk.
pub fn restore_disk(chain: &[Link], out: &Path) -> Result<bool, SnapshotError> {
    let Some(base) = chain
        .iter()
        .rposition(|l| matches!(l.meta.disk, Some(DiskPart::Full { .. })))
    else {
        return match chain.iter().any(|l| l.meta.disk.is_some()) {
            true => Err(SnapshotError::Chain("no full disk in the chain".into())),
            false => Ok(false),
        };
    };
    let Some(DiskPart::Full { len, .. }) = chain[base].meta.disk else {
        return Err(SnapshotError::Chain("no full disk in the chain".into()));
    };
    let mut deltas = Vec::new();
    for l in &chain[base + 1..] {
        if let Some(p) = &l.meta.disk {
            deltas.push(disk::read_delta(&l.dir.join(DELTA_FILE), p)?);
        }
    }
    disk::materialize(&chain[base].dir.join(DISK_FILE), len, &deltas, out)?;
    Ok(true)
}

/// A fresh snapshot id.
pub fn new_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of time and pid: unique enough to link parents and children.
    let mut z = t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_between_snapshot_directories() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(
            r("/s/chain/diff1", "/s/chain/full0"),
            PathBuf::from("../full0")
        );
        assert_eq!(
            r("/s/a/diff", "/s/b/c/full"),
            PathBuf::from("../../b/c/full")
        );
        assert_eq!(r("/s/a", "/s/a"), PathBuf::from("."));
        assert_eq!(r("/x/diff", "/y/full"), PathBuf::from("/y/full"));
    }
}
