//! virtio-net driver and its smoltcp `Device`.
//!
//! Receive buffers are posted once and reposted after smoltcp consumed them; transmit buffers
//! come from a free list refilled from the used ring. Doorbells are batched: [`VirtioNet::flush`]
//! rings at most one per queue per main-loop round.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{Transport, Virtqueue, F_WRITE};

const HDR: usize = 12;
const BUF: usize = 2048;
const QSIZE: u16 = 128;
const F_MAC: u64 = 1 << 5;
const RXQ: u32 = 0;
const TXQ: u32 = 1;

struct Rx {
    vq: Virtqueue,
    bufs: Vec<u8>,
    reposted: bool,
}

struct Tx {
    vq: Virtqueue,
    bufs: Vec<u8>,
    free: Vec<u16>,
    pending: bool,
}

fn read_mac(t: &Transport) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = t.config8(i as u64);
    }
    mac
}

/// The network device.
pub struct VirtioNet {
    t: Transport,
    rx: Rx,
    tx: Tx,
    /// MAC address from config space.
    pub mac: [u8; 6],
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
}

impl VirtioNet {
    /// Initialises the device at `t`.
    pub fn new(t: Transport) -> Result<Self, &'static str> {
        let features = t.init(F_MAC)?;
        let mut rx = Rx {
            vq: t.setup_queue(RXQ, QSIZE)?,
            bufs: Vec::new(),
            reposted: false,
        };
        let mut tx = Tx {
            vq: t.setup_queue(TXQ, QSIZE)?,
            bufs: Vec::new(),
            free: Vec::new(),
            pending: false,
        };
        rx.bufs = vec![0u8; BUF * usize::from(rx.vq.size())];
        tx.bufs = vec![0u8; BUF * usize::from(tx.vq.size())];
        for i in 0..rx.vq.size() {
            let addr = rx.bufs.as_ptr() as u64 + u64::from(i) * BUF as u64;
            rx.vq.set_desc(i, addr, BUF as u32, F_WRITE, 0);
            rx.vq.push(i);
        }
        tx.free = (0..tx.vq.size()).rev().collect();
        let mac = match features & F_MAC != 0 {
            true => read_mac(&t),
            false => [0x02, 0x00, 0x00, 0x00, 0x00, 0x01],
        };
        t.driver_ok()?;
        t.notify(RXQ);
        Ok(VirtioNet {
            t,
            rx,
            tx,
            mac,
            rx_frames: 0,
            tx_frames: 0,
        })
    }

    /// Reads the MAC again from config space (a clone's device has a new one).
    pub fn reread_mac(&mut self) -> [u8; 6] {
        self.mac = read_mac(&self.t);
        self.mac
    }

    /// Address and length of the receive buffers (written only by the device).
    pub fn rx_region(&self) -> (u64, usize) {
        (self.rx.bufs.as_ptr() as u64, self.rx.bufs.len())
    }

    /// Rings the doorbells this round needs.
    pub fn flush(&mut self) {
        if self.tx.pending {
            self.tx.pending = false;
            self.t.notify(TXQ);
        }
        if self.rx.reposted {
            self.rx.reposted = false;
            if !self.rx.vq.no_notify() {
                self.t.notify(RXQ);
            }
        }
    }
}

impl Tx {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.vq.pop_used() {
            self.free.push(id);
        }
    }
}

/// A received frame.
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
    frames: &'a mut u64,
}

/// A transmit slot.
pub struct TxToken<'a> {
    tx: &'a mut Tx,
    frames: &'a mut u64,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let start = usize::from(self.id) * BUF;
        let len = self.len.clamp(HDR, BUF);
        let r = f(&self.rx.bufs[start + HDR..start + len]);
        self.rx.vq.push(self.id);
        self.rx.reposted = true;
        *self.frames += 1;
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let id = self
            .tx
            .free
            .pop()
            .expect("transmit() checked for a free slot");
        let start = usize::from(id) * BUF;
        let len = len.min(BUF - HDR);
        self.tx.bufs[start..start + HDR].fill(0);
        let r = f(&mut self.tx.bufs[start + HDR..start + HDR + len]);
        let addr = self.tx.bufs.as_ptr() as u64 + start as u64;
        self.tx.vq.set_desc(id, addr, (HDR + len) as u32, 0, 0);
        self.tx.vq.push(id);
        self.tx.pending = true;
        *self.frames += 1;
        r
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        let (id, len) = self.rx.vq.pop_used()?;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len: len as usize,
                frames: &mut self.rx_frames,
            },
            TxToken {
                tx: &mut self.tx,
                frames: &mut self.tx_frames,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            // All slots in flight: ring the doorbell so the device drains them.
            self.flush();
            self.tx.reclaim();
            if self.tx.free.is_empty() {
                return None;
            }
        }
        Some(TxToken {
            tx: &mut self.tx,
            frames: &mut self.tx_frames,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(usize::from(QSIZE / 2));
        caps
    }
}
