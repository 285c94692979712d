//! The virtio-net device model: queue 0 receives, queue 1 transmits. Every frame carries the
//! 12-byte `virtio_net_hdr_v1`; no offloads are offered, so the header is all zeros except
//! `num_buffers = 1` on receive.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::super::chain;
use super::super::{DeviceError, VirtioDevice, F_VERSION_1, TYPE_NET};
use super::commit::OutputCommit;
use crate::memory::GuestMem;

/// Length of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
const F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
/// Largest frame we move (header + 64 KiB), bounding host buffers.
const MAX_FRAME: usize = NET_HDR_LEN + 65_550;

/// Where frames go to and come from.
pub trait NetBackend: Send {
    /// Sends one Ethernet frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Receives one frame; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// File descriptor to poll for readability, if any.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// Frame counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Frames the backend refused.
    pub tx_errors: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames dropped because the guest buffer was too small.
    pub rx_dropped: u64,
}

/// A network device.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: [u8; 6],
    queue_sizes: [u16; 2],
    rx_kick: Option<Arc<EventFd>>,
    rx_has_buffers: bool,
    stats: NetStats,
    frame: Vec<u8>,
    commit: Option<OutputCommit>,
    /// The transmit ring was left unprocessed because the output buffer was full.
    tx_blocked: bool,
    /// Called when output starts waiting for a checkpoint (first held frame of an epoch).
    output_waker: Option<OutputWaker>,
    /// Drop transmitted frames whose Ethernet source is not this device's MAC (a clone: the
    /// guest may still send with its parent's identity until it sees its new generation).
    source_filter: bool,
    /// Frames dropped by the source filter (not part of the VM state).
    foreign_dropped: u64,
}

/// Callback for "guest output is waiting for a checkpoint" (may run on the vCPU thread).
pub type OutputWaker = Arc<dyn Fn() + Send + Sync>;

impl<B: NetBackend> Net<B> {
    /// A device on `backend` with the given MAC address.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            rx_kick: None,
            rx_has_buffers: true,
            stats: NetStats::default(),
            frame: vec![0u8; MAX_FRAME],
            commit: None,
            tx_blocked: false,
            output_waker: None,
            source_filter: false,
            foreign_dropped: 0,
        }
    }

    /// Sets the callback run when output starts waiting for a checkpoint.
    pub fn set_output_waker(&mut self, w: Option<OutputWaker>) {
        self.output_waker = w;
    }

    /// Starts holding output: frames transmitted from now on belong to `epoch`.
    pub fn enable_output_commit(&mut self, epoch: u64, max_bytes: usize) {
        self.commit = Some(OutputCommit::new(epoch, max_bytes));
    }

    /// Stops holding output; frames still held are sent.
    pub fn disable_output_commit(&mut self) {
        if let Some(mut c) = self.commit.take() {
            for f in c.release(u64::MAX) {
                self.send_now(&f);
            }
        }
    }

    /// Closes the current output epoch (VM paused); returns it.
    pub fn advance_output_epoch(&mut self) -> Option<u64> {
        self.commit.as_mut().map(OutputCommit::advance)
    }

    /// Sends held frames of epochs up to `upto` — each only if it leaves before `not_after`
    /// (a release is authorized by acknowledgements received at a moment: a process stopped
    /// between that moment and the send, e.g. by SIGSTOP, may have been superseded by a newer
    /// term meanwhile, so a late frame is dropped, as a network may drop it, rather than sent
    /// beside the new primary's) — then, if the transmit ring was blocked on a full buffer,
    /// processes it again. Returns the number of frames sent.
    pub fn release_output(
        &mut self,
        upto: u64,
        not_after: Option<std::time::Instant>,
        queues: &mut [Queue],
        mem: &GuestMem,
    ) -> Result<usize, DeviceError> {
        let frames = match &mut self.commit {
            Some(c) => c.release(upto),
            None => return Ok(0),
        };
        let mut sent = 0;
        for f in &frames {
            if not_after.is_some_and(|t| std::time::Instant::now() > t) {
                continue;
            }
            self.send_now(f);
            sent += 1;
        }
        if sent < frames.len() {
            tracing::warn!(
                "{} released frames dropped: the release came too late after its acknowledgement",
                frames.len() - sent
            );
        }
        if self.tx_blocked {
            self.tx_blocked = false;
            if let Some(q) = queues.get_mut(TX as usize) {
                self.transmit(q, mem)?;
            }
        }
        Ok(sent)
    }

    /// True if output of the current epoch waits for a checkpoint not yet taken.
    pub fn output_waiting(&self) -> bool {
        self.commit
            .as_ref()
            .is_some_and(OutputCommit::current_epoch_waiting)
    }

    /// (frames, bytes) held, and the current output epoch, if output commit is on.
    pub fn held_output(&self) -> Option<(usize, usize, u64)> {
        self.commit.as_ref().map(|c| {
            let (f, b) = c.held();
            (f, b, c.epoch())
        })
    }

    fn send_now(&mut self, data: &[u8]) {
        match self.backend.send(data) {
            Ok(()) => self.stats.tx_frames += 1,
            Err(e) => {
                self.stats.tx_errors += 1;
                tracing::debug!("virtio-net: tx dropped: {e}");
            }
        }
    }

    /// MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Changes the MAC (a standby clone taking its identity): what the guest reads from the
    /// config space, and what the source filter lets through, from now on.
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
    }

    /// From now on, drop every transmitted frame whose Ethernet source address is not this
    /// device's MAC, and every received unicast frame addressed to another MAC (counted,
    /// [`Net::foreign_dropped`]). A clone's device has a new MAC: whatever the guest sends with
    /// its parent's identity before it re-identifies never leaves the host, and nothing sent
    /// to its parent (a frame the bridge floods to every port) reaches it.
    pub fn set_source_filter(&mut self, on: bool) {
        self.source_filter = on;
    }

    /// Frames the source filter dropped (sent and received).
    pub fn foreign_dropped(&self) -> u64 {
        self.foreign_dropped
    }

    /// Restores counters after a snapshot.
    pub(super) fn restore_counters(&mut self, stats: NetStats, rx_has_buffers: bool) {
        self.stats = stats;
        self.rx_has_buffers = rx_has_buffers;
    }

    /// Event written whenever the guest adds receive buffers.
    pub fn set_rx_kick(&mut self, kick: Arc<EventFd>) {
        self.rx_kick = Some(kick);
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The backend's pollable fd.
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.backend.raw_fd()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Backend access (tests).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Whether the last receive pass ended with guest buffers still available.
    pub fn rx_has_buffers(&self) -> bool {
        self.rx_has_buffers
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMem) -> Result<bool, DeviceError> {
        let size = q.size();
        while let Some(dc) = q.pop_descriptor_chain(mem) {
            let c = chain::validate(dc, mem, size)?;
            if c.writable_len() != 0 {
                return Err(DeviceError::Direction {
                    head: c.head,
                    why: "transmit chain has device-writable buffers",
                });
            }
            let len = c.readable_len();
            if len < NET_HDR_LEN as u64 || len > MAX_FRAME as u64 {
                return Err(DeviceError::Malformed {
                    head: c.head,
                    why: format!(
                        "transmit chain of {len} bytes (header is {NET_HDR_LEN}, max {MAX_FRAME})"
                    ),
                });
            }
            let frame_len = len as usize - NET_HDR_LEN;
            if let Some(commit) = &self.commit {
                if !commit.has_room(frame_len) {
                    // Output buffer full: leave the chain in the ring until a release.
                    q.go_to_previous_position();
                    self.tx_blocked = true;
                    break;
                }
            }
            let data = c.read(mem, NET_HDR_LEN as u64, frame_len)?;
            if self.source_filter && data.get(6..12) != Some(&self.mac[..]) {
                self.foreign_dropped += 1;
                q.add_used(mem, c.head, 0).map_err(DeviceError::queue(TX))?;
                continue;
            }
            match &mut self.commit {
                Some(commit) => {
                    tracing::trace!("tx held {} bytes", data.len());
                    if commit.hold(data) {
                        if let Some(w) = &self.output_waker {
                            w();
                        }
                    }
                }
                None => self.send_now(&data),
            }
            q.add_used(mem, c.head, 0).map_err(DeviceError::queue(TX))?;
        }
        // Transmit completions need no wake-up: the driver reclaims them when it next sends.
        Ok(false)
    }

    /// Moves waiting frames from the backend into guest receive buffers. Returns true if any
    /// buffer was used.
    pub fn receive(&mut self, queues: &mut [Queue], mem: &GuestMem) -> Result<bool, DeviceError> {
        let Some(q) = queues.get_mut(RX as usize) else {
            return Ok(false);
        };
        let size = q.size();
        let mut used = false;
        loop {
            let Some(dc) = q.pop_descriptor_chain(mem) else {
                // Out of buffers: ask the guest to notify us when it adds some, then look once
                // more to close the race with a buffer added just now.
                if q.enable_notification(mem).map_err(DeviceError::queue(RX))? {
                    continue;
                }
                self.rx_has_buffers = false;
                return Ok(used);
            };
            let c = chain::validate(dc, mem, size)?;
            if c.readable_len() != 0 {
                return Err(DeviceError::Direction {
                    head: c.head,
                    why: "receive chain has device-readable buffers",
                });
            }
            let n = match self.backend.recv(&mut self.frame[NET_HDR_LEN..]) {
                Ok(n) => n,
                Err(e) => {
                    // Nothing waiting (or a backend error): give the chain back.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::debug!("virtio-net: rx backend error: {e}");
                    }
                    q.go_to_previous_position();
                    q.disable_notification(mem)
                        .map_err(DeviceError::queue(RX))?;
                    self.rx_has_buffers = true;
                    return Ok(used);
                }
            };
            if self.source_filter
                && !addressed_to(&self.frame[NET_HDR_LEN..NET_HDR_LEN + n], &self.mac)
            {
                // (Unicast for another MAC, flooded by the bridge: not for this clone. A standby
                // still holds its parent's connections and would take a client's request for
                // the parent as its own.)
                self.foreign_dropped += 1;
                q.go_to_previous_position();
                continue;
            }
            let total = NET_HDR_LEN + n;
            let written = if c.writable_len() >= total as u64 {
                self.frame[..NET_HDR_LEN].fill(0);
                // num_buffers = 1
                self.frame[10] = 1;
                c.write(mem, 0, &self.frame[..total])?;
                self.stats.rx_frames += 1;
                tracing::trace!("rx {} bytes", n);
                total as u32
            } else {
                self.stats.rx_dropped += 1;
                0
            };
            q.add_used(mem, c.head, written)
                .map_err(DeviceError::queue(RX))?;
            used = true;
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mac.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self) {
        self.rx_has_buffers = true;
        if let Some(k) = &self.rx_kick {
            let _ = k.write(1);
        }
    }
    fn reset(&mut self) {
        self.rx_has_buffers = true;
    }

    fn process_queue(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &GuestMem,
    ) -> Result<bool, DeviceError> {
        match index {
            RX => {
                self.rx_has_buffers = true;
                if let Some(k) = &self.rx_kick {
                    let _ = k.write(1);
                }
                Ok(false)
            }
            TX => match queues.get_mut(TX as usize) {
                Some(q) => self.transmit(q, mem),
                None => Ok(false),
            },
            _ => Ok(false),
        }
    }
}

/// Whether an Ethernet frame is for `mac`: addressed to it, or to a group (broadcast,
/// multicast).
fn addressed_to(frame: &[u8], mac: &[u8; 6]) -> bool {
    match frame.get(..6) {
        Some(dst) => dst[0] & 1 == 1 || dst == mac,
        None => false,
    }
}
