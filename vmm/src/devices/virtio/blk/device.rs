//! The virtio-blk device model.
//!
//! Requests are processed synchronously when the guest notifies the queue: the guest's
//! doorbell exit returns with the request complete, so a write followed by a flush costs two
//! exits and the flush is a real `fdatasync` of the disk file.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};

use super::super::chain::{self, Chain};
use super::super::{DeviceError, VirtioDevice, F_VERSION_1, TYPE_BLOCK};
use super::disk::Disk;
use crate::memory::GuestMem;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device id string.
pub const BLK_ID_LEN: usize = 20;
const QUEUE_SIZE: u16 = 256;
const F_FLUSH: u64 = 1 << 9;
const HDR_LEN: u64 = 16;
/// Largest data transfer of one request the device accepts (guards host allocations).
const MAX_TRANSFER: u64 = 4 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest amount of write data recorded between two harvests (and kept for each consumer of
/// changes between two of its captures, `crate::dirty::ChangeTracker`); beyond it the record is
/// dropped and the next capture must copy the whole disk.
pub const MAX_RECORDED: u64 = 256 << 20;

/// Guest writes recorded since the last capture, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiskWrites {
    /// (byte offset, data), in the order the guest wrote them.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Total bytes in `writes`.
    pub bytes: u64,
    /// More than `MAX_RECORDED` bytes were written: `writes` is incomplete.
    pub overflowed: bool,
}

/// A block device on a raw file or a copy-on-write overlay ([`Disk`]).
pub struct Block {
    disk: Disk,
    sectors: u64,
    id: [u8; BLK_ID_LEN],
    queue_sizes: [u16; 1],
    recording: Option<DiskWrites>,
    /// Requests completed, for status and tests.
    pub completed: u64,
    /// Fault injection: this many upcoming write requests fail with an I/O error without
    /// touching the file (tests of the guest's error paths; not part of the VM state).
    pub fail_writes: u32,
}

impl Block {
    /// A device on `file`; `id` is what GET_ID returns (truncated/padded to 20 bytes).
    pub fn new(file: File, id: &str) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut idb = [0u8; BLK_ID_LEN];
        let n = id.len().min(BLK_ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            disk: Disk::Raw(file),
            sectors: len / SECTOR_SIZE,
            id: idb,
            queue_sizes: [QUEUE_SIZE],
            recording: None,
            completed: 0,
            fail_writes: 0,
        })
    }

    /// A device with a raw 20-byte id (restore path; the caller checked the size).
    pub(super) fn with_id(disk: Disk, id: [u8; BLK_ID_LEN]) -> Self {
        let sectors = disk.len().map(|l| l / SECTOR_SIZE).unwrap_or(0);
        Block {
            disk,
            sectors,
            id,
            queue_sizes: [QUEUE_SIZE],
            recording: None,
            completed: 0,
            fail_writes: 0,
        }
    }

    /// The GET_ID string.
    pub fn id(&self) -> [u8; BLK_ID_LEN] {
        self.id
    }

    /// The disk (for copying it into a snapshot while the VM is paused).
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Starts (or restarts) recording guest writes; returns what was recorded so far.
    pub fn take_writes(&mut self) -> Option<DiskWrites> {
        self.recording.replace(DiskWrites::default())
    }

    fn record(&mut self, offset: u64, data: &[u8]) {
        if let Some(r) = &mut self.recording {
            if r.overflowed {
                return;
            }
            r.bytes += data.len() as u64;
            if r.bytes > MAX_RECORDED {
                r.overflowed = true;
                r.writes = Vec::new();
            } else {
                r.writes.push((offset, data.to_vec()));
            }
        }
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn malformed(head: u16, why: impl Into<String>) -> DeviceError {
        DeviceError::Malformed {
            head,
            why: why.into(),
        }
    }

    /// Executes one validated request; returns the number of bytes written to the guest.
    fn execute(&mut self, c: &Chain, mem: &GuestMem) -> Result<u32, DeviceError> {
        let head = c.head;
        if c.readable_len() < HDR_LEN {
            return Err(Self::malformed(
                head,
                "request header shorter than 16 bytes",
            ));
        }
        if c.writable_len() < 1 {
            return Err(DeviceError::Direction {
                head,
                why: "no device-writable status byte",
            });
        }
        let hdr = c.read(mem, 0, HDR_LEN as usize)?;
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sb);
        let data_out = c.readable_len() - HDR_LEN;
        let data_in = c.writable_len() - 1;
        let (status, written) = match rtype {
            T_IN => {
                if data_out != 0 {
                    return Err(DeviceError::Direction {
                        head,
                        why: "read request carries device-readable data buffers",
                    });
                }
                if data_in == 0 || !data_in.is_multiple_of(SECTOR_SIZE) || data_in > MAX_TRANSFER {
                    return Err(Self::malformed(
                        head,
                        format!("read data length {data_in} is not a non-zero multiple of 512 up to 4 MiB"),
                    ));
                }
                if !self.in_range(sector, data_in) {
                    (S_IOERR, 0)
                } else {
                    let mut buf = vec![0u8; data_in as usize];
                    match self.disk.read_exact_at(&mut buf, sector * SECTOR_SIZE) {
                        Ok(()) => {
                            c.write(mem, 0, &buf)?;
                            (S_OK, data_in as u32)
                        }
                        Err(e) => {
                            tracing::warn!("virtio-blk: read at sector {sector} failed: {e}");
                            (S_IOERR, 0)
                        }
                    }
                }
            }
            T_OUT => {
                if data_in != 0 {
                    return Err(DeviceError::Direction {
                        head,
                        why: "write request carries device-writable data buffers",
                    });
                }
                if data_out == 0 || !data_out.is_multiple_of(SECTOR_SIZE) || data_out > MAX_TRANSFER
                {
                    return Err(Self::malformed(
                        head,
                        format!("write data length {data_out} is not a non-zero multiple of 512 up to 4 MiB"),
                    ));
                }
                if !self.in_range(sector, data_out) {
                    (S_IOERR, 0)
                } else if self.fail_writes > 0 {
                    self.fail_writes -= 1;
                    tracing::warn!("virtio-blk: injected write failure at sector {sector}");
                    (S_IOERR, 0)
                } else {
                    let buf = c.read(mem, HDR_LEN, data_out as usize)?;
                    match self.disk.write_all_at(&buf, sector * SECTOR_SIZE) {
                        Ok(()) => {
                            self.record(sector * SECTOR_SIZE, &buf);
                            (S_OK, 0)
                        }
                        Err(e) => {
                            tracing::warn!("virtio-blk: write at sector {sector} failed: {e}");
                            (S_IOERR, 0)
                        }
                    }
                }
            }
            T_FLUSH => match self.disk.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = c.write(mem, 0, &self.id[..(data_in as usize).min(BLK_ID_LEN)])?;
                (S_OK, n as u32)
            }
            _ => (S_UNSUPP, 0),
        };
        // The status byte is the last writable byte.
        c.write(mem, c.writable_len() - 1, &[status])?;
        self.completed += 1;
        Ok(written + 1)
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_add(len / SECTOR_SIZE)
            .is_some_and(|end| end <= self.sectors)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_FLUSH
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity (u64, in sectors) at offset 0.
        let cfg = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self) {}
    fn reset(&mut self) {}

    fn process_queue(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &GuestMem,
    ) -> Result<bool, DeviceError> {
        let Some(q) = queues.get_mut(index as usize) else {
            return Ok(false);
        };
        let size = q.size();
        let mut used = false;
        while let Some(dc) = q.pop_descriptor_chain(mem) {
            let c = chain::validate(dc, mem, size)?;
            let len = self.execute(&c, mem)?;
            q.add_used(mem, c.head, len)
                .map_err(DeviceError::queue(index))?;
            used = true;
        }
        Ok(used)
    }
}
