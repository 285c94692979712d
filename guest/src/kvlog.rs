//! The key-value write log on the virtio-blk disk.
//!
//! ```text
//! sector 0      superblock: "VMXKVLG1", version u32, crc32 u32 (over the first 12 bytes)
//! byte 4096..   records, back to back (not sector aligned):
//!               magic u32 "KVR1" | seq u32 | key_len u8 | val_len u8 | 0u16 | crc32 u32
//!               | key | value      (crc over the 12 header bytes before it, key and value)
//! ```
//! Replay stops at the first record whose magic, length, sequence number or CRC is wrong: that
//! is a torn write (crash mid-write) or the end of the log. Before accepting new writes the
//! driver zeroes the region one batch long after the tail, so a stale record from a torn batch
//! can never reappear after newer records.

use alloc::vec;
use alloc::vec::Vec;

use crate::blk::{BlkError, VirtioBlk, SECTOR};

/// Byte offset of the first record.
pub const LOG_START: u64 = 4096;
/// Record magic ("KVR1" little-endian).
pub const REC_MAGIC: u32 = 0x3152_564b;
/// Record header length.
pub const REC_HDR: usize = 16;
/// Largest record.
pub const MAX_REC: usize = REC_HDR + 255 + 255;
/// Largest batch written at once.
pub const MAX_BATCH: usize = 64 * 1024;
const SB_MAGIC: &[u8; 8] = b"VMXKVLG1";
const SB_VERSION: u32 = 1;
const CHUNK: usize = 64 * 1024;

/// Appends the encoding of one record to `out`.
pub fn encode(seq: u32, key: &[u8], val: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&REC_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(key.len() as u8);
    out.push(val.len() as u8);
    out.extend_from_slice(&[0, 0]);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start..start + 12]);
    h.update(key);
    h.update(val);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(val);
}

/// Result of decoding at one position.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record: sequence number, key range, value range, total length.
    Record {
        /// Sequence number.
        seq: u32,
        /// Key bytes.
        key: core::ops::Range<usize>,
        /// Value bytes.
        val: core::ops::Range<usize>,
        /// Encoded length.
        len: usize,
    },
    /// No record here (zeros or not a record).
    End,
    /// A record header is here but the record is incomplete or fails its CRC.
    Torn,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Decodes the record at the start of `b`.
pub fn decode(b: &[u8]) -> Decoded {
    if b.len() < 4 || u32_at(b, 0) != REC_MAGIC {
        return Decoded::End;
    }
    if b.len() < REC_HDR {
        return Decoded::Torn;
    }
    let (kl, vl) = (usize::from(b[8]), usize::from(b[9]));
    if kl == 0 || vl == 0 || b[10] != 0 || b[11] != 0 {
        return Decoded::Torn;
    }
    let len = REC_HDR + kl + vl;
    if b.len() < len {
        return Decoded::Torn;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..12]);
    h.update(&b[REC_HDR..len]);
    if h.finalize() != u32_at(b, 12) {
        return Decoded::Torn;
    }
    Decoded::Record {
        seq: u32_at(b, 4),
        key: REC_HDR..REC_HDR + kl,
        val: REC_HDR + kl..len,
        len,
    }
}

/// What replay found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replay {
    /// Records applied.
    pub records: u64,
    /// A torn record was found (and dropped) at the tail.
    pub torn: bool,
    /// Byte offset of the tail.
    pub tail: u64,
}

/// Why an append was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    /// The batch is full: commit first.
    BatchFull,
    /// The disk is full.
    DiskFull,
}

/// The open log.
pub struct Log {
    blk: VirtioBlk,
    tail: u64,
    next_seq: u32,
    tail_sector: [u8; SECTOR as usize],
    batch: Vec<u8>,
    batch_records: u32,
    disk_bytes: u64,
}

impl Log {
    /// Opens (formatting a zeroed disk) and replays the log, calling `apply` per record.
    pub fn open(
        mut blk: VirtioBlk,
        mut apply: impl FnMut(&[u8], &[u8]),
    ) -> Result<(Log, Replay), &'static str> {
        let disk_bytes = blk.sectors * SECTOR;
        if disk_bytes < LOG_START + MAX_BATCH as u64 + SECTOR {
            return Err("disk too small for the KV log (needs at least 72 KiB)");
        }
        let mut sb = [0u8; SECTOR as usize];
        blk.read(0, &mut sb)
            .map_err(|_| "cannot read the superblock")?;
        if sb.iter().all(|&b| b == 0) {
            sb[..8].copy_from_slice(SB_MAGIC);
            sb[8..12].copy_from_slice(&SB_VERSION.to_le_bytes());
            let crc = crc32fast::hash(&sb[..12]);
            sb[12..16].copy_from_slice(&crc.to_le_bytes());
            blk.write(0, &sb)
                .map_err(|_| "cannot write the superblock")?;
            blk.flush().map_err(|_| "cannot flush the superblock")?;
        } else if &sb[..8] != SB_MAGIC || crc32fast::hash(&sb[..12]) != u32_at(&sb, 12) {
            return Err(
                "the disk is not a vmatrix KV log (bad superblock); refusing to overwrite it",
            );
        } else if u32_at(&sb, 8) != SB_VERSION {
            return Err("unsupported KV log version");
        }

        let mut replay = Replay::default();
        let mut win: Vec<u8> = Vec::new();
        let mut win_off = LOG_START;
        let mut off = LOG_START;
        let mut expect = 1u32;
        loop {
            let rel = (off - win_off) as usize;
            let have_end = win_off + win.len() as u64;
            if win.len() - rel < MAX_REC && have_end < disk_bytes {
                let keep_from = (off / SECTOR * SECTOR - win_off) as usize;
                win.drain(..keep_from);
                win_off += keep_from as u64;
                let n = (CHUNK as u64).min(disk_bytes - have_end) as usize;
                let at = win.len();
                win.resize(at + n, 0);
                blk.read(have_end / SECTOR, &mut win[at..])
                    .map_err(|_| "cannot read the log")?;
                continue;
            }
            match decode(&win[rel..]) {
                Decoded::Record { seq, key, val, len } if seq == expect => {
                    apply(
                        &win[rel + key.start..rel + key.end],
                        &win[rel + val.start..rel + val.end],
                    );
                    replay.records += 1;
                    expect = expect.wrapping_add(1);
                    off += len as u64;
                }
                Decoded::End => break,
                _ => {
                    replay.torn = true;
                    break;
                }
            }
        }
        replay.tail = off;
        let mut tail_sector = [0u8; SECTOR as usize];
        let base = off / SECTOR * SECTOR;
        let rel = (base - win_off) as usize;
        let prefix = (off - base) as usize;
        tail_sector[..prefix].copy_from_slice(&win[rel..rel + prefix]);

        let mut log = Log {
            blk,
            tail: off,
            next_seq: expect,
            tail_sector,
            batch: Vec::new(),
            batch_records: 0,
            disk_bytes,
        };
        log.scrub_after_tail()
            .map_err(|_| "cannot scrub the log tail")?;
        Ok((log, replay))
    }

    /// Zeroes one batch length after the tail (keeping the tail sector's prefix).
    fn scrub_after_tail(&mut self) -> Result<(), BlkError> {
        let base = self.tail / SECTOR * SECTOR;
        let len = ((MAX_BATCH as u64 + 2 * SECTOR).min(self.disk_bytes - base) / SECTOR * SECTOR)
            as usize;
        let mut buf = vec![0u8; len];
        let prefix = (self.tail - base) as usize;
        buf[..prefix].copy_from_slice(&self.tail_sector[..prefix]);
        self.blk.write(base / SECTOR, &buf)?;
        self.blk.flush()
    }

    /// Adds a record to the current batch.
    pub fn append(&mut self, key: &[u8], val: &[u8]) -> Result<(), AppendError> {
        let n = REC_HDR + key.len() + val.len();
        if self.tail + (self.batch.len() + n) as u64 + SECTOR > self.disk_bytes {
            return Err(AppendError::DiskFull);
        }
        if self.batch.len() + n > MAX_BATCH {
            return Err(AppendError::BatchFull);
        }
        encode(self.next_seq, key, val, &mut self.batch);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.batch_records += 1;
        Ok(())
    }

    /// Records waiting in the batch.
    pub fn pending(&self) -> u32 {
        self.batch_records
    }

    /// Writes the batch and flushes. On failure the batch is dropped and the caller must undo
    /// its effects.
    pub fn commit(&mut self) -> Result<(), BlkError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let base = self.tail / SECTOR * SECTOR;
        let prefix = (self.tail - base) as usize;
        let total = prefix + self.batch.len();
        let padded = total.div_ceil(SECTOR as usize) * SECTOR as usize;
        let mut buf = vec![0u8; padded];
        buf[..prefix].copy_from_slice(&self.tail_sector[..prefix]);
        buf[prefix..total].copy_from_slice(&self.batch);
        let r = self
            .blk
            .write(base / SECTOR, &buf)
            .and_then(|_| self.blk.flush());
        let records = self.batch_records;
        self.batch.clear();
        self.batch_records = 0;
        if let Err(e) = r {
            self.next_seq = self.next_seq.wrapping_sub(records);
            return Err(e);
        }
        self.tail = base + total as u64;
        let last = (total / SECTOR as usize) * SECTOR as usize;
        self.tail_sector = [0u8; SECTOR as usize];
        self.tail_sector[..total - last].copy_from_slice(&buf[last..total]);
        Ok(())
    }

    /// Reads raw sectors (diagnostics).
    pub fn read_raw(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.blk.read(sector, buf)
    }

    /// Byte offset of the tail.
    pub fn tail(&self) -> u64 {
        self.tail
    }
}
