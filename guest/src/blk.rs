//! virtio-blk driver: synchronous read, write and flush. The VMM completes a request during
//! the doorbell exit, so each request costs one exit; the driver still waits for the used ring
//! to be safe against an asynchronous device.

use alloc::boxed::Box;

use crate::platform;
use crate::virtio::{Transport, Virtqueue, F_NEXT, F_WRITE};

/// Sector size.
pub const SECTOR: u64 = 512;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// A block request failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkError {
    /// The device reported an I/O error.
    Io,
    /// The device does not support the request.
    Unsupported,
    /// The device needs a reset (it found our request malformed).
    DeviceFailed,
    /// The request is outside the disk.
    OutOfRange,
}

#[repr(C)]
struct Header {
    rtype: u32,
    reserved: u32,
    sector: u64,
}

/// The block device.
pub struct VirtioBlk {
    t: Transport,
    vq: Virtqueue,
    hdr: Box<Header>,
    status: Box<u8>,
    /// Capacity in sectors.
    pub sectors: u64,
    flush_supported: bool,
}

impl VirtioBlk {
    /// Initialises the device at `t`.
    pub fn new(t: Transport) -> Result<Self, &'static str> {
        let features = t.init(F_FLUSH)?;
        let vq = t.setup_queue(0, 8)?;
        let sectors = u64::from(t.config32(0)) | (u64::from(t.config32(4)) << 32);
        t.driver_ok()?;
        Ok(VirtioBlk {
            t,
            vq,
            hdr: Box::new(Header {
                rtype: 0,
                reserved: 0,
                sector: 0,
            }),
            status: Box::new(0xff),
            sectors,
            flush_supported: features & F_FLUSH != 0,
        })
    }

    fn request(
        &mut self,
        rtype: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> Result<(), BlkError> {
        self.hdr.rtype = rtype;
        self.hdr.sector = sector;
        // SAFETY: the device writes this byte; volatile so the read below is not folded.
        unsafe { core::ptr::write_volatile(&mut *self.status, 0xff) };
        let hdr_addr = &*self.hdr as *const Header as u64;
        let status_addr = &*self.status as *const u8 as u64;
        match data {
            Some((addr, len, device_writes)) => {
                self.vq.set_desc(0, hdr_addr, 16, F_NEXT, 1);
                self.vq.set_desc(
                    1,
                    addr,
                    len,
                    F_NEXT | if device_writes { F_WRITE } else { 0 },
                    2,
                );
                self.vq.set_desc(2, status_addr, 1, F_WRITE, 0);
            }
            None => {
                self.vq.set_desc(0, hdr_addr, 16, F_NEXT, 2);
                self.vq.set_desc(2, status_addr, 1, F_WRITE, 0);
            }
        }
        self.vq.push(0);
        self.t.notify(0);
        while self.vq.pop_used().is_none() {
            if self.t.status() & crate::virtio::S_NEEDS_RESET != 0 {
                return Err(BlkError::DeviceFailed);
            }
            platform::wait(100_000);
        }
        // SAFETY: the device has completed the request.
        match unsafe { core::ptr::read_volatile(&*self.status) } {
            0 => Ok(()),
            2 => Err(BlkError::Unsupported),
            _ => Err(BlkError::Io),
        }
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        let n = (len as u64).div_ceil(SECTOR);
        if len == 0
            || !(len as u64).is_multiple_of(SECTOR)
            || sector.checked_add(n).is_none_or(|e| e > self.sectors)
        {
            return Err(BlkError::OutOfRange);
        }
        Ok(())
    }

    /// Reads whole sectors into `buf`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        let r = self.request(
            T_IN,
            sector,
            Some((buf.as_mut_ptr() as u64, buf.len() as u32, true)),
        );
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        r
    }

    /// Writes whole sectors from `buf`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        self.request(
            T_OUT,
            sector,
            Some((buf.as_ptr() as u64, buf.len() as u32, false)),
        )
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.flush_supported {
            return Ok(());
        }
        self.request(T_FLUSH, 0, None)
    }
}
