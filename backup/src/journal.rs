//! The backup's redo journal: a checkpoint's decoded effect on the committed image (new page
//! contents, disk writes, and the image's facts after it, state included), written before the
//! image files are touched. The checkpoint is durable — and acknowledged — once its journal
//! record is written.
//!
//! ```text
//! magic "VMXJRNL\0" | version u32 | total_len u64 | seq u64 | base u64 | history u64
//!   | meta_len u64 | pages u64 | disk u64
//! meta (ReplicaMeta, snapshot-format framed)
//! pages × (gfn u64, n u16, page)   page: 4096 bytes if n = 0xffff (the whole page), else
//!                                    n × (offset u16, len u16), then those ranges' bytes
//! disk  × (offset u64, len u64, bytes)
//! crc32 u32 over the total_len - 4 bytes before it      (anything after total_len is ignored)
//! ```
//! **A ring of [`SLOTS`] slot files**, `journal-0.bin` … `journal-15.bin`, each overwritten in
//! place (no file is created, renamed or deleted per checkpoint): the n-th record the image
//! writes goes into slot n mod [`SLOTS`]. A small checkpoint's writes wait in memory after its
//! record ([`crate::write_back`]) and reach the image files once per ring, so the image files
//! may lag the journal by up to [`SLOTS`] checkpoints. The rule that makes this safe: **a slot
//! is overwritten only when the checkpoint it holds, and so every earlier one, is in the image
//! files** (the image flushes its waiting writes when the ring is full). `base` is the seq of
//! the newest checkpoint entirely in the image files when the record was written.
//!
//! Recovery ([`to_redo`], [`crate::image::recover`]) takes the newest record that verifies
//! (highest seq of the image's history), N, and redoes in seq order every verifying record of
//! the history with a seq in (N's base, N] — and newer than `replica.bin` — then takes N's
//! facts. Why that is the image as of N: everything up to N's base is in the files; the later
//! records present are redone oldest first, so a page ends with its newest version. A record
//! missing from that range was overwritten, which the rule allows only once it was in the
//! files; and the ring overwrites its oldest record first, so no record older than a missing
//! one is redone over it. A record torn by the process dying fails its CRC: it was never
//! acknowledged and is ignored; the record it was written over was in the files already,
//! and every record it needs to be redone after still is. Redoing is idempotent. Seqs jump (a quick resync from 40 to 57); only their order matters.
//!
//! `replica.bin` is only rewritten when an image is promoted, recovered or finalized; the slots
//! are removed then (except after the recovery of an image fenced beyond its term, whose stale
//! slots stay: see [`crate::image::recover_locked`]). A slot is read only as far as its
//! record's length; recovery reads each slot's header first and the records it redoes whole.
//!
//! **Only the bytes a checkpoint changed.** A page that came as an XOR delta is journaled as
//! the byte ranges the delta names (`protocol::page::changed_ranges`) with their new contents:
//! every other byte is as the page's previous version left it. A 16-client KV load's
//! checkpoints change a few bytes of each of ~40 pages; whole pages made each record ~158 KB,
//! now 10.6 KB, written before the acknowledgement (docs/BENCHMARKS.md, "Journal only what changed").
//! Redoing ranges is idempotent (they hold new bytes, not deltas), and a page redone record
//! after record ends right: a byte in some record's range ends with the newest of them, a byte
//! in none is the same in every version since the base, so whatever version the file holds
//! (the base's, or a newer one a flush cut short wrote) has it.
//!
//! Version 2 records (two alternating slots, no `base` or `history` in the header, whole pages:
//! everything before a record was in the files when it was written) are still read, with a
//! base of their seq − 1: only the newest of them is redone.
//!
//! The slots are not fsynced: they protect against the backup process dying, not against the
//! backup host losing its page cache (then the replica is lost with the host and rebuilt by a
//! new full sync).

use std::path::{Path, PathBuf};

use protocol::page::PAGE;

use crate::image::ReplicaMeta;
use crate::BackupError;

const MAGIC: &[u8; 8] = b"VMXJRNL\0";
/// Version 3: the header carries the record's base and history (a ring of [`SLOTS`] slots).
const VERSION: u32 = 3;
/// Version 2: two alternating slots; still read.
const VERSION_2: u32 = 2;
const HEADER: usize = 8 + 4 + 8 * 7;
/// Range count of a page journaled whole.
const WHOLE: u16 = u16::MAX;

/// Byte ranges `(offset, len)` of a page.
pub type Ranges = Vec<(u16, u16)>;
/// A record's pages: frame numbers, journaled bytes, ranges (see [`Journal`]).
pub(crate) type Pages = (Vec<u64>, Vec<u8>, Vec<Option<Ranges>>);
/// Disk writes (offset, bytes), in order.
type DiskWrites = Vec<(u64, Vec<u8>)>;
const HEADER_2: usize = 8 + 4 + 8 * 5;
/// Slot files in the ring.
pub const SLOTS: usize = 16;
/// A slot file longer than this (it once held a big checkpoint) is cut to its record's length
/// when a record of less than half of it is written over it.
const SHRINK_OVER: u64 = 4 << 20;

/// One checkpoint's effect on the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The checkpoint's seq.
    pub seq: u64,
    /// Seq of the newest checkpoint entirely in the image files when this was written.
    pub base: u64,
    /// The image's facts after it.
    pub meta: ReplicaMeta,
    /// Guest frame numbers of the pages.
    pub gfns: Vec<u64>,
    /// The pages' journaled bytes, in `gfns` order: 4 KiB for a page journaled whole, else
    /// the new bytes of its ranges, one range after the other (as compact as the record, so
    /// reading one back allocates no more than it holds).
    pub data: Vec<u8>,
    /// For each page, the byte ranges `(offset, len)` journaled (None, or no entry: the whole
    /// page).
    pub ranges: Vec<Option<Ranges>>,
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

/// What a record's header says (not verified: a hint for choosing which records to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    seq: u64,
    /// None in a version 2 record (its history is in its meta).
    history: Option<u64>,
}

impl Journal {
    /// The file image of this journal; refuses one whose pages, ranges and bytes disagree.
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        let meta = vmm::snapshot::format::encode(&self.meta)?;
        let disk_bytes: usize = self.disk.iter().map(|d| 16 + d.1.len()).sum();
        let page_bytes = self.data.len()
            + (0..self.gfns.len())
                .map(|i| 10 + 4 * self.page_ranges(i).map_or(0, |r| r.len()))
                .sum::<usize>();
        let total = HEADER + meta.len() + page_bytes + disk_bytes + 4;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for v in [
            total as u64,
            self.seq,
            self.base,
            self.meta.history,
            meta.len() as u64,
            self.gfns.len() as u64,
            self.disk.len() as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&meta);
        let mut at = 0;
        for (i, gfn) in self.gfns.iter().enumerate() {
            out.extend_from_slice(&gfn.to_le_bytes());
            let len = match self.page_ranges(i) {
                Some(r) => {
                    if r.len() >= usize::from(WHOLE)
                        || r.iter().any(|&(o, l)| o as usize + l as usize > PAGE)
                    {
                        return Err(self.bad(format!("page {gfn}: ranges {r:?}")));
                    }
                    out.extend_from_slice(&(r.len() as u16).to_le_bytes());
                    for (o, l) in r {
                        out.extend_from_slice(&o.to_le_bytes());
                        out.extend_from_slice(&l.to_le_bytes());
                    }
                    r.iter().map(|x| usize::from(x.1)).sum()
                }
                None => {
                    out.extend_from_slice(&WHOLE.to_le_bytes());
                    PAGE
                }
            };
            let bytes = self.data.get(at..at + len);
            out.extend_from_slice(bytes.ok_or_else(|| self.bad(format!("page {gfn}: bytes")))?);
            at += len;
        }
        if at != self.data.len() {
            return Err(self.bad(format!("{} bytes for pages of {at}", self.data.len())));
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

    /// The ranges journaled of page `i` (None: the whole page).
    pub fn page_ranges(&self, i: usize) -> Option<&Ranges> {
        self.ranges.get(i).and_then(|r| r.as_ref())
    }

    fn bad(&self, why: String) -> BackupError {
        BackupError::Apply(format!("journal of checkpoint {}: {why}", self.seq))
    }

    /// Parses a journal file, checking magic, version, lengths and CRC before anything else.
    pub fn decode(bytes: &[u8]) -> Result<Journal, JournalError> {
        let have = bytes.len() as u64;
        if bytes.len() < HEADER_2 + 4 {
            return Err(JournalError::Truncated {
                need: (HEADER_2 + 4) as u64,
                have,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(JournalError::Magic);
        }
        let mut r = Reader { b: bytes, at: 8 };
        let version = r.u32()?;
        let header = match version {
            VERSION => HEADER,
            VERSION_2 => HEADER_2,
            v => return Err(JournalError::Version(v)),
        };
        let total = r.u64()?;
        if total < (header + 4) as u64 {
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
        // A version 2 record is its own base: everything before it was in the files.
        let (base, history) = match version {
            VERSION => (r.u64()?, Some(r.u64()?)),
            _ => (seq.saturating_sub(1), None),
        };
        let meta_len = r.u64()?;
        let pages = r.u64()?;
        let disks = r.u64()?;
        let meta: ReplicaMeta = vmm::snapshot::format::decode(r.take(meta_len)?)
            .map_err(|e| JournalError::Malformed(format!("meta: {e}")))?;
        if history.is_some_and(|h| h != meta.history) || base >= seq {
            return Err(JournalError::Malformed(format!(
                "header (seq {seq}, base {base}, history {history:#x?}) disagrees with its meta \
                 (history {:#x})",
                meta.history
            )));
        }
        let whole = version == VERSION_2;
        let ((gfns, data, ranges), disk) = Self::decode_writes(&mut r, pages, disks, whole)?;
        Ok(Journal {
            seq,
            base,
            meta,
            gfns,
            data,
            ranges,
            disk,
        })
    }

    /// The pages and disk writes after the meta, to the end of `r` (`whole`: version 2's
    /// pages, 4 KiB each without a range count). Nothing is allocated beyond what the record
    /// holds.
    fn decode_writes(
        r: &mut Reader<'_>,
        pages: u64,
        disks: u64,
        whole: bool,
    ) -> Result<(Pages, DiskWrites), JournalError> {
        let left = (r.b.len() - r.at) as u64;
        let page_min = if whole { 8 + PAGE as u64 } else { 10 };
        if pages.saturating_mul(page_min) > left || disks.saturating_mul(16) > left {
            return Err(JournalError::Malformed(format!(
                "{pages} pages and {disks} disk writes do not fit in {left} bytes"
            )));
        }
        let mut gfns = Vec::with_capacity(pages as usize);
        let mut data = Vec::new();
        let mut ranges = Vec::with_capacity(pages as usize);
        for _ in 0..pages {
            gfns.push(r.u64()?);
            let n = match whole {
                true => WHOLE,
                false => r.u16()?,
            };
            ranges.push(Self::decode_page(r, n, &mut data)?);
        }
        let mut disk = Vec::with_capacity(disks as usize);
        for _ in 0..disks {
            let off = r.u64()?;
            let len = r.u64()?;
            disk.push((off, r.take(len)?.to_vec()));
        }
        if r.at != r.b.len() {
            return Err(JournalError::Malformed(format!(
                "{} bytes after the last record",
                r.b.len() - r.at
            )));
        }
        Ok(((gfns, data, ranges), disk))
    }

    /// One page's journaled bytes onto `data`: the whole page (`n` = [`WHOLE`]) or `n`
    /// ranges.
    fn decode_page(
        r: &mut Reader<'_>,
        n: u16,
        data: &mut Vec<u8>,
    ) -> Result<Option<Ranges>, JournalError> {
        if n == WHOLE {
            data.extend_from_slice(r.take(PAGE as u64)?);
            return Ok(None);
        }
        let mut ranges = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let (o, l) = (r.u16()?, r.u16()?);
            if usize::from(o) + usize::from(l) > PAGE {
                return Err(JournalError::Malformed(format!(
                    "a range of {l} bytes at {o} in a page"
                )));
            }
            ranges.push((o, l));
        }
        for &(_, l) in &ranges {
            data.extend_from_slice(r.take(u64::from(l))?);
        }
        Ok(Some(ranges))
    }

    /// Writes the journal over slot file `slot`, whose length is `*slot_len` (bytes beyond the
    /// record stay but are ignored; a slot far longer than the record is cut).
    pub fn write_to(
        &self,
        slot: &std::fs::File,
        slot_len: &mut u64,
        path: &Path,
    ) -> Result<(), BackupError> {
        use std::os::unix::fs::FileExt;
        let bytes = self.encode()?;
        let io = |err| BackupError::Io {
            path: path.to_path_buf(),
            err,
        };
        slot.write_all_at(&bytes, 0).map_err(io)?;
        let len = bytes.len() as u64;
        if *slot_len > SHRINK_OVER && len < *slot_len / 2 {
            slot.set_len(len).map_err(io)?;
            *slot_len = len;
        }
        *slot_len = (*slot_len).max(len);
        Ok(())
    }
}

/// Slot file number `slot` (of [`SLOTS`]) in `dir`.
pub fn slot_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("journal-{}.bin", slot % SLOTS))
}

/// The journal slot files in `dir` (`journal-*.bin`: those of another ring size too).
fn slot_files(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let io = |err| BackupError::Io {
        path: dir.to_path_buf(),
        err,
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for e in entries {
        let name = e.map_err(io)?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("journal-") && name.ends_with(".bin") {
            out.push(dir.join(&*name));
        }
    }
    out.sort();
    Ok(out)
}

/// The records of history `history` in `dir` that recovery redoes, oldest first, for an image
/// whose `replica.bin` records seq `after` (see the module docs): the newest verifying record
/// N and every verifying one in (N's base, N] newer than `after`. Empty if nothing is newer.
/// Damaged slots and records of another history are reported and skipped.
pub fn to_redo(dir: &Path, history: u64, after: u64) -> Result<Vec<Journal>, BackupError> {
    let mut heads = Vec::new();
    for p in slot_files(dir)? {
        match peek(&p) {
            Ok(Some(h)) if h.history.is_some_and(|x| x != history) => tracing::warn!(
                "{}: checkpoint {} of history {:#x}, not the image's {history:#x}; ignoring it",
                p.display(),
                h.seq,
                h.history.unwrap_or(0)
            ),
            Ok(Some(h)) if h.seq > after => heads.push((h.seq, p)),
            Ok(Some(_)) => {}
            Ok(None) => tracing::warn!("{}: not a journal record; ignoring it", p.display()),
            Err(err) => return Err(BackupError::Io { path: p, err }),
        }
    }
    // Newest first, until the newest verifying record's base.
    heads.sort_by_key(|h| std::cmp::Reverse(h.0));
    let mut out: Vec<Journal> = Vec::new();
    for (seq, p) in heads {
        if out.first().is_some_and(|n| seq <= n.base) {
            break;
        }
        let bytes = read_slot(&p).map_err(|err| BackupError::Io {
            path: p.clone(),
            err,
        })?;
        match Journal::decode(&bytes) {
            Ok(j) if j.meta.history != history => tracing::warn!(
                "{}: checkpoint {} of history {:#x}, not the image's {history:#x}; ignoring it",
                p.display(),
                j.seq,
                j.meta.history
            ),
            Ok(j) if j.seq != seq => tracing::warn!(
                "{}: its header says checkpoint {seq}, its record {}; ignoring it",
                p.display(),
                j.seq
            ),
            Ok(j) => out.push(j),
            Err(e) => tracing::warn!("{}: {e}; ignoring it", p.display()),
        }
    }
    out.reverse();
    Ok(out)
}

/// The header of slot file `p` (None: not a journal record of a known version).
fn peek(p: &Path) -> std::io::Result<Option<Head>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p)?;
    let len = f.metadata()?.len();
    let mut head = [0u8; HEADER];
    let n = head.len().min(len as usize);
    f.read_exact_at(&mut head[..n], 0)?;
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
    if n < HEADER_2 || &head[..8] != MAGIC {
        return Ok(None);
    }
    match u32::from_le_bytes([head[8], head[9], head[10], head[11]]) {
        VERSION if n == HEADER => Ok(Some(Head {
            seq: u64_at(20),
            history: Some(u64_at(36)),
        })),
        VERSION_2 => Ok(Some(Head {
            seq: u64_at(20),
            history: None,
        })),
        _ => Ok(None),
    }
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

/// Removes every journal slot of `dir`.
pub fn remove(dir: &Path) -> Result<(), BackupError> {
    for p in slot_files(dir)? {
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
    fn u16(&mut self) -> Result<u16, JournalError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
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
        // Page 3 whole, page 17 as three ranges (one byte, none, 96 bytes).
        let mut data = vec![0u8; PAGE + 1 + 96];
        data[5] = 7;
        data[PAGE] = 3;
        data[PAGE + 50] = 9;
        Journal {
            seq: 9,
            base: 8,
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
            ranges: vec![None, Some(vec![(9, 1), (100, 0), (4000, 96)])],
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
        let p = slot_path(d.path(), 0);
        let j = sample();
        let b = j.encode().unwrap();
        let mut big = vec![0xee; 1 << 20];
        big[..b.len()].copy_from_slice(&b);
        std::fs::write(&p, &big).unwrap();
        assert_eq!(read_slot(&p).unwrap().len(), b.len());
        assert_eq!(to_redo(d.path(), 0x5eed, 0).unwrap(), vec![j]);
        // A header that claims more than the file holds is a truncated journal.
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(to_redo(d.path(), 0x5eed, 0).unwrap().is_empty());
        // Not a journal at all: read whole, refused.
        std::fs::write(&p, [1u8; 7]).unwrap();
        assert!(to_redo(d.path(), 0x5eed, 0).unwrap().is_empty());
    }

    /// Record `seq` of history 0x5eed with base `base`, one page filled with `seq`.
    fn rec(seq: u64, base: u64) -> Journal {
        let mut j = sample();
        j.seq = seq;
        j.base = base;
        j.meta.seq = seq;
        j.gfns = vec![seq];
        j.data = vec![seq as u8; PAGE];
        j.ranges = vec![None];
        j
    }

    fn put(dir: &Path, slot: usize, j: &Journal) {
        std::fs::write(slot_path(dir, slot), j.encode().unwrap()).unwrap();
    }

    fn seqs(js: Vec<Journal>) -> Vec<u64> {
        js.into_iter().map(|j| j.seq).collect()
    }

    #[test]
    fn recovery_redoes_the_records_after_the_newest_ones_base_in_order() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        assert!(to_redo(dir, 0x5eed, 0).unwrap().is_empty(), "no slots");
        // A ring where 5, 6, 8 (seqs jump) wait for a flush (base 4); slots in any order.
        for (slot, j) in [(3, rec(8, 4)), (1, rec(5, 4)), (2, rec(6, 4))] {
            put(dir, slot, &j);
        }
        // 3 and 4 are in the files (an older record of the ring and one of another history).
        put(dir, 0, &rec(3, 2));
        let mut other = rec(50, 49);
        other.meta.history = 0xbad;
        put(dir, 4, &other);
        assert_eq!(seqs(to_redo(dir, 0x5eed, 0).unwrap()), vec![5, 6, 8]);
        // replica.bin already records 5: only what is newer.
        assert_eq!(seqs(to_redo(dir, 0x5eed, 5).unwrap()), vec![6, 8]);
        assert!(to_redo(dir, 0x5eed, 8).unwrap().is_empty());
        // After a flush, 9's base is 8: only 9 is redone (5, 6, 8 are in the files).
        put(dir, 5, &rec(9, 8));
        assert_eq!(seqs(to_redo(dir, 0x5eed, 0).unwrap()), vec![9]);
        // 9 torn by the process dying: back to 5, 6, 8.
        let b = rec(9, 8).encode().unwrap();
        std::fs::write(slot_path(dir, 5), &b[..b.len() / 2]).unwrap();
        assert_eq!(seqs(to_redo(dir, 0x5eed, 0).unwrap()), vec![5, 6, 8]);
        // A torn write over the ring's oldest record after a flush (10 over 3's slot, 9 never
        // written): 5, 6, 8 are redone, and nothing older than them is missing.
        let b = rec(10, 8).encode().unwrap();
        std::fs::write(slot_path(dir, 0), &b[..b.len() - 1]).unwrap();
        assert_eq!(seqs(to_redo(dir, 0x5eed, 0).unwrap()), vec![5, 6, 8]);
        // Another history's records are never taken.
        assert_eq!(seqs(to_redo(dir, 0xbad, 0).unwrap()), vec![50]);
        remove(dir).unwrap();
        assert!(slot_files(dir).unwrap().is_empty());
    }

    /// Version 2's encoding (two alternating slots): no base or history in the header, whole
    /// pages.
    fn encode_v2(j: &Journal) -> Vec<u8> {
        let meta = vmm::snapshot::format::encode(&j.meta).unwrap();
        let mut body = meta.clone();
        for (i, gfn) in j.gfns.iter().enumerate() {
            body.extend_from_slice(&gfn.to_le_bytes());
            body.extend_from_slice(&j.data[i * PAGE..(i + 1) * PAGE]);
        }
        for (off, d) in &j.disk {
            body.extend_from_slice(&off.to_le_bytes());
            body.extend_from_slice(&(d.len() as u64).to_le_bytes());
            body.extend_from_slice(d);
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION_2.to_le_bytes());
        let total = (HEADER_2 + body.len() + 4) as u64;
        let counts = [meta.len(), j.gfns.len(), j.disk.len()].map(|n| n as u64);
        for v in [total, j.seq].into_iter().chain(counts) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn a_version_2_record_is_read_as_its_own_base() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut j = rec(41, 0);
        let b = encode_v2(&j);
        j.base = 40;
        assert_eq!(Journal::decode(&b).unwrap(), j);
        // The two slots of a version 2 backup: only the newest is redone.
        std::fs::write(dir.join("journal-0.bin"), encode_v2(&rec(40, 0))).unwrap();
        std::fs::write(dir.join("journal-1.bin"), &b).unwrap();
        assert_eq!(seqs(to_redo(dir, 0x5eed, 0).unwrap()), vec![41]);
    }

    #[test]
    fn a_slot_far_longer_than_its_record_is_cut() {
        let d = tempfile::tempdir().unwrap();
        let p = slot_path(d.path(), 0);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut big = rec(5, 4);
        big.gfns = (0..2000).collect();
        big.data = vec![1; 2000 * PAGE];
        let mut len = 0;
        big.write_to(&f, &mut len, &p).unwrap();
        let big_len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, big_len);
        let small = rec(6, 5);
        small.write_to(&f, &mut len, &p).unwrap();
        let now = std::fs::metadata(&p).unwrap().len();
        assert!(now < big_len / 2 && now == len, "{now} of {big_len}");
        assert_eq!(to_redo(d.path(), 0x5eed, 0).unwrap(), vec![small]);
    }

    #[test]
    fn a_journal_whose_ranges_and_bytes_disagree_is_not_encoded() {
        let mut j = sample();
        j.data.pop();
        assert!(j.encode().is_err(), "bytes short");
        let mut j = sample();
        j.data.push(0);
        assert!(j.encode().is_err(), "bytes left over");
        let mut j = sample();
        j.ranges[1] = Some(vec![(4090, 10)]);
        assert!(j.encode().is_err(), "a range past the page");
        let mut j = sample();
        j.ranges[1] = Some(vec![(0, 0); usize::from(WHOLE)]);
        assert!(j.encode().is_err(), "as many ranges as mean a whole page");
    }

    #[test]
    fn a_page_count_far_beyond_the_bytes_allocates_nothing_big() {
        // 100,000 pages of no ranges: 10 bytes each, a valid record of ~1 MB whose pages
        // hold nothing (nothing like 100,000 × 4 KiB is allocated to read it).
        let mut j = sample();
        j.gfns = (0..100_000).collect();
        j.ranges = vec![Some(vec![]); 100_000];
        j.data = Vec::new();
        let b = j.encode().unwrap();
        assert!(b.len() < 1_100_000);
        let back = Journal::decode(&b).unwrap();
        assert!(back.data.is_empty() && back.gfns.len() == 100_000);
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
        fn mutated_records_with_a_good_crc_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
            let mut b = sample().encode().unwrap();
            let n = b.len() - 4;
            for (at, x) in flips {
                b[12 + at % (n - 12)] ^= x;
            }
            let keep = 20 + cut % (b.len() - 20);
            b.truncate(keep.max(HEADER + 4));
            let n = b.len() - 4;
            let total = (b.len() as u64).to_le_bytes();
            b[12..20].copy_from_slice(&total);
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(j) = Journal::decode(&b) {
                // What decodes encodes back (its pages, ranges and bytes agree).
                prop_assert!(j.encode().is_ok());
            }
        }

        #[test]
        fn valid_header_with_huge_counts_is_refused(pages in any::<u64>(), disks in any::<u64>()) {
            let mut b = sample().encode().unwrap();
            b[52..60].copy_from_slice(&pages.to_le_bytes());
            b[60..68].copy_from_slice(&disks.to_le_bytes());
            let n = b.len() - 4;
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            if (pages, disks) != (2, 2) {
                prop_assert!(Journal::decode(&b).is_err());
            }
        }
    }
}
