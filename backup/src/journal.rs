//! The backup's redo journal: a checkpoint's decoded effect on the committed image (new page
//! contents, disk writes, and the image's facts after it, state included), written before the
//! image files are touched. The checkpoint is durable — and acknowledged — once its journal is
//! written.
//!
//! ```text
//! magic "VMXJRNL\0" | version u32 | total_len u64 | seq u64 | meta_len u64 | pages u64 | disk u64
//! meta (ReplicaMeta, snapshot-format framed)
//! pages × (gfn u64, 4096 bytes)
//! disk  × (offset u64, len u64, bytes)
//! crc32 u32 over the total_len - 4 bytes before it      (anything after total_len is ignored)
//! ```
//! Two slot files, `journal-0.bin` and `journal-1.bin`, alternate: each checkpoint goes into the
//! slot the previous one did not use, overwritten in place (no file is created, renamed or
//! deleted per checkpoint). Slots alternate rather than follow the seq's parity because seqs
//! jump (a quick resync from 40 to 57): the slot of the previous checkpoint is never the one
//! being written. Checkpoints are applied one at a time, so when checkpoint N's journal is
//! written, the previous one is entirely in the image files: the newest verifying slot (highest
//! seq, of the image's history) is all recovery needs ([`crate::image::recover`]) — redo its
//! writes (idempotent) and take its facts — and if N's write was torn by the process dying, the
//! other slot still holds the previous checkpoint. `replica.bin` is therefore only rewritten
//! when an image is promoted, recovered or finalized; the journals are removed then (except
//! after the recovery of an image fenced beyond its term, whose stale slots stay: see
//! [`crate::image::recover_locked`]). A slot is read only as far as its record's length.
//!
//! The slots are not fsynced: they protect against the backup process dying, not against the
//! backup host losing its page cache (then the replica is lost with the host and rebuilt by a
//! new full sync).

use std::path::{Path, PathBuf};

use protocol::page::PAGE;

use crate::image::ReplicaMeta;
use crate::BackupError;

const MAGIC: &[u8; 8] = b"VMXJRNL\0";
/// Version 2: the meta carries the history id and the seq.
const VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 8 * 5;
/// Names of the two journal slots in the image directory.
pub const SLOT_FILES: [&str; 2] = ["journal-0.bin", "journal-1.bin"];

/// One checkpoint's effect on the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The checkpoint's seq.
    pub seq: u64,
    /// The image's facts after it.
    pub meta: ReplicaMeta,
    /// Guest frame numbers of `data`.
    pub gfns: Vec<u64>,
    /// New page contents, 4 KiB each, in `gfns` order.
    pub data: Vec<u8>,
    /// Disk writes (offset, bytes), in order.
    pub disk: Vec<(u64, Vec<u8>)>,
}

/// Why a journal file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    /// Shorter than its header or its declared contents.
    #[error("journal truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Not a journal.
    #[error("bad journal magic")]
    Magic,
    /// Written by another format version.
    #[error("journal version {0} is not supported")]
    Version(u32),
    /// Damaged.
    #[error("journal CRC32 mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// CRC in the file.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// Contents do not add up.
    #[error("malformed journal: {0}")]
    Malformed(String),
}

impl Journal {
    /// The file image of this journal.
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        let meta = vmm::snapshot::format::encode(&self.meta)?;
        let disk_bytes: usize = self.disk.iter().map(|d| 16 + d.1.len()).sum();
        let mut out =
            Vec::with_capacity(HEADER + meta.len() + self.gfns.len() * (8 + PAGE) + disk_bytes + 4);
        let total = HEADER + meta.len() + self.gfns.len() * (8 + PAGE) + disk_bytes + 4;
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for v in [
            total as u64,
            self.seq,
            meta.len() as u64,
            self.gfns.len() as u64,
            self.disk.len() as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&meta);
        for (i, gfn) in self.gfns.iter().enumerate() {
            out.extend_from_slice(&gfn.to_le_bytes());
            out.extend_from_slice(&self.data[i * PAGE..(i + 1) * PAGE]);
        }
        for (off, data) in &self.disk {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(data);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses a journal file, checking magic, version, lengths and CRC before anything else.
    pub fn decode(bytes: &[u8]) -> Result<Journal, JournalError> {
        let have = bytes.len() as u64;
        if bytes.len() < HEADER + 4 {
            return Err(JournalError::Truncated {
                need: (HEADER + 4) as u64,
                have,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(JournalError::Magic);
        }
        let mut r = Reader { b: bytes, at: 8 };
        let version = r.u32()?;
        if version != VERSION {
            return Err(JournalError::Version(version));
        }
        let total = r.u64()?;
        if total < (HEADER + 4) as u64 {
            return Err(JournalError::Malformed(format!("total length {total}")));
        }
        if total > have {
            return Err(JournalError::Truncated { need: total, have });
        }
        let (body, tail) = bytes[..total as usize].split_at(total as usize - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(JournalError::Crc { stored, computed });
        }
        let mut r = Reader { b: body, at: 20 };
        let seq = r.u64()?;
        let meta_len = r.u64()?;
        let pages = r.u64()?;
        let disks = r.u64()?;
        let meta = vmm::snapshot::format::decode(r.take(meta_len)?)
            .map_err(|e| JournalError::Malformed(format!("meta: {e}")))?;
        // Counts are bounded by what the file can hold before anything is allocated.
        let left = (body.len() - r.at) as u64;
        if pages.saturating_mul((8 + PAGE) as u64) > left || disks.saturating_mul(16) > left {
            return Err(JournalError::Malformed(format!(
                "{pages} pages and {disks} disk writes do not fit in {left} bytes"
            )));
        }
        let mut gfns = Vec::with_capacity(pages as usize);
        let mut data = Vec::with_capacity(pages as usize * PAGE);
        for _ in 0..pages {
            gfns.push(r.u64()?);
            data.extend_from_slice(r.take(PAGE as u64)?);
        }
        let mut disk = Vec::with_capacity(disks as usize);
        for _ in 0..disks {
            let off = r.u64()?;
            let len = r.u64()?;
            disk.push((off, r.take(len)?.to_vec()));
        }
        if r.at != body.len() {
            return Err(JournalError::Malformed(format!(
                "{} bytes after the last record",
                body.len() - r.at
            )));
        }
        Ok(Journal {
            seq,
            meta,
            gfns,
            data,
            disk,
        })
    }

    /// Writes the journal over slot file `slot` (bytes beyond it stay but are ignored).
    pub fn write_to(&self, slot: &std::fs::File, path: &Path) -> Result<(), BackupError> {
        use std::os::unix::fs::FileExt;
        let bytes = self.encode()?;
        slot.write_all_at(&bytes, 0).map_err(|err| BackupError::Io {
            path: path.to_path_buf(),
            err,
        })
    }
}

/// Slot file number `slot` (0 or 1) in `dir`.
pub fn slot_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(SLOT_FILES[slot % 2])
}

/// The newest journal of history `history` in `dir` that verifies (highest seq), if any.
/// Damaged slots are reported and skipped; records of another history are skipped.
pub fn newest(dir: &Path, history: u64) -> Result<Option<Journal>, BackupError> {
    let mut best: Option<Journal> = None;
    for name in SLOT_FILES {
        let p = dir.join(name);
        let bytes = match read_slot(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(BackupError::Io { path: p, err }),
        };
        match Journal::decode(&bytes) {
            Ok(j) if j.meta.history != history => tracing::warn!(
                "{}: checkpoint {} of history {:#x}, not the image's {history:#x}; ignoring it",
                p.display(),
                j.seq,
                j.meta.history
            ),
            Ok(j) if best.as_ref().is_none_or(|b| j.seq > b.seq) => best = Some(j),
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}; ignoring it", p.display()),
        }
    }
    Ok(best)
}

/// The bytes of slot file `p` that can belong to its journal: as many as its header says
/// (`total_len`), not what a longer, older journal left after it (a slot that once held a big
/// checkpoint, overwritten in place by small ones, would otherwise be read whole at every
/// recovery: hundreds of MiB on a promotion's path). A header that does not parse reads the
/// whole file, for [`Journal::decode`] to say why.
fn read_slot(p: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p)?;
    let len = f.metadata()?.len();
    let mut head = [0u8; 20];
    let n = head.len().min(len as usize);
    f.read_exact_at(&mut head[..n], 0)?;
    let total = match n == head.len() && &head[..8] == MAGIC {
        true => u64::from_le_bytes(head[12..20].try_into().unwrap_or_default()),
        false => len,
    };
    let mut buf = vec![0u8; total.min(len) as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Removes both journal slots of `dir`.
pub fn remove(dir: &Path) -> Result<(), BackupError> {
    for name in SLOT_FILES {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(BackupError::Io { path: p, err }),
        }
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], JournalError> {
        let end = (self.at as u64).saturating_add(n);
        if end > self.b.len() as u64 {
            return Err(JournalError::Truncated {
                need: end,
                have: self.b.len() as u64,
            });
        }
        let s = &self.b[self.at..end as usize];
        self.at = end as usize;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, JournalError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, JournalError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Journal {
        let mut data = vec![0u8; 2 * PAGE];
        data[5] = 7;
        data[PAGE + 9] = 3;
        Journal {
            seq: 9,
            meta: ReplicaMeta {
                history: 0x5eed,
                term: 2,
                seq: 9,
                mem_size: 1 << 20,
                disk_len: 1 << 16,
                state: vec![1, 2, 3],
            },
            gfns: vec![3, 17],
            data,
            disk: vec![(512, vec![9; 100]), (0, vec![])],
        }
    }

    #[test]
    fn round_trip() {
        let j = sample();
        assert_eq!(Journal::decode(&j.encode().unwrap()).unwrap(), j);
    }

    #[test]
    fn bytes_after_the_journal_are_ignored() {
        let j = sample();
        let mut b = j.encode().unwrap();
        b.extend_from_slice(&[0xee; 1000]);
        assert_eq!(Journal::decode(&b).unwrap(), j);
    }

    #[test]
    fn a_slot_is_read_only_as_far_as_its_journal() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(SLOT_FILES[0]);
        let j = sample();
        let b = j.encode().unwrap();
        let mut big = vec![0xee; 1 << 20];
        big[..b.len()].copy_from_slice(&b);
        std::fs::write(&p, &big).unwrap();
        assert_eq!(read_slot(&p).unwrap().len(), b.len());
        let got = newest(d.path(), 0x5eed).unwrap().unwrap();
        assert_eq!(got, j);
        // A header that claims more than the file holds is a truncated journal.
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(newest(d.path(), 0x5eed).unwrap().is_none());
        // Not a journal at all: read whole, refused.
        std::fs::write(&p, [1u8; 7]).unwrap();
        assert!(newest(d.path(), 0x5eed).unwrap().is_none());
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(
                Journal::decode(&bytes[..len]).is_err(),
                "truncated at {len}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Journal::decode(&b).is_err(), "bit flip in byte {i}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Journal::decode(&b);
        }

        #[test]
        fn valid_header_with_huge_counts_is_refused(pages in any::<u64>(), disks in any::<u64>()) {
            let mut b = sample().encode().unwrap();
            b[36..44].copy_from_slice(&pages.to_le_bytes());
            b[44..52].copy_from_slice(&disks.to_le_bytes());
            let n = b.len() - 4;
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            if (pages, disks) != (2, 2) {
                prop_assert!(Journal::decode(&b).is_err());
            }
        }
    }
}
