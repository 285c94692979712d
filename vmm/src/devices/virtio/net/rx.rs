//! The network receive thread: waits for frames on the backend and for receive buffers from
//! the guest, and moves frames into guest memory under the device lock.
//!
//! Quiescing: while `paused` is set the thread touches neither guest memory nor the backend;
//! [`RxThread::quiesce`] takes the device lock once after setting it, so when it returns no
//! receive is in progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{Net, NetBackend};
use crate::devices::virtio::mmio::MmioTransport;
use crate::{Error, Result};

/// Handle to a running receive thread.
pub struct RxThread {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl RxThread {
    /// Starts the thread for `dev`, wiring its receive-buffer kick. With `paused` the thread
    /// starts quiesced: it touches nothing until [`RxThread::resume`].
    pub fn spawn<B: NetBackend + 'static>(
        dev: Arc<Mutex<MmioTransport<Net<B>>>>,
        paused: bool,
    ) -> Result<Self> {
        let kick =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Host(format!("eventfd: {e}")))?);
        let tap_fd = {
            let mut t = dev.lock().unwrap_or_else(|p| p.into_inner());
            t.with_device_unchecked(|n| n.set_rx_kick(kick.clone()));
            t.device().backend_fd()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(paused));
        let (k, s, p) = (kick.clone(), stop.clone(), paused.clone());
        let handle = std::thread::Builder::new()
            .name("net-rx".into())
            .spawn(move || rx_loop(dev, tap_fd, k, s, p))
            .map_err(|e| Error::Host(format!("spawning net-rx thread: {e}")))?;
        Ok(RxThread {
            kick,
            stop,
            paused,
            handle: Some(handle),
        })
    }

    /// Stops touching guest memory; returns once no receive is in progress.
    pub fn quiesce<B: NetBackend>(&self, dev: &Mutex<MmioTransport<Net<B>>>) {
        self.paused.store(true, Ordering::SeqCst);
        drop(dev.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Lets the thread receive again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _ = self.kick.write(1);
    }
}

impl Drop for RxThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kick.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn rx_loop<B: NetBackend>(
    dev: Arc<Mutex<MmioTransport<Net<B>>>>,
    tap_fd: Option<i32>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
) {
    let mut want_tap = true;
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd {
                fd: kick.as_raw_fd_(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if want_tap { tap_fd.unwrap_or(-1) } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call;
        // negative fds are ignored by poll(2).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let _ = kick.read();
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if paused.load(Ordering::SeqCst) {
            want_tap = false;
            continue;
        }
        let mut t = dev.lock().unwrap_or_else(|p| p.into_inner());
        if paused.load(Ordering::SeqCst) {
            want_tap = false;
            continue;
        }
        if t.is_active() {
            let _ = t.with_device(|net, queues, mem| net.receive(queues, mem));
            want_tap = t.device().rx_has_buffers();
        } else {
            want_tap = false;
        }
    }
}

trait RawFdExt {
    fn as_raw_fd_(&self) -> i32;
}
impl RawFdExt for EventFd {
    fn as_raw_fd_(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.as_raw_fd()
    }
}
