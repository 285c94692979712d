//! A tap device opened through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`, non-blocking).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use super::device::NetBackend;
use crate::{Error, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap interface `name`.
    pub fn open(name: &str) -> Result<Tap> {
        let err = |why: String| Error::Tap {
            name: name.to_string(),
            why,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(err(format!(
                "an interface name is 1 to {} characters without '/'",
                libc::IFNAMSIZ - 1
            )));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(err(format!(
                "no such interface; create it first: ip tuntap add dev {name} mode tap"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err(format!("cannot open /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open tun fd and `req` is a properly sized, initialised ifreq
        // that outlives the call; the kernel writes at most sizeof(ifreq) bytes into it.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or the tap belongs to another user)",
                Some(libc::EBUSY) => " (another process has it open)",
                Some(libc::EINVAL) => " (it is not a tap device)",
                _ => "",
            };
            return Err(err(format!("TUNSETIFF failed: {e}{hint}")));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until frames written to the tap can reach its network, at most `limit`; false if
    /// they still cannot. Opening a tap turns its carrier on, but the kernel applies that
    /// asynchronously (linkwatch): the interface's operstate leaves "down", and a bridge it is a
    /// port of starts forwarding (port state 3) some milliseconds later — longer on a busy host
    /// (measured here: ~2 ms idle). Until then every frame is dropped: a restored guest's
    /// gratuitous ARP, its first replies. The VM waits for this before its guest runs.
    pub fn wait_carrier(&self, limit: Duration) -> bool {
        let base = std::path::Path::new("/sys/class/net").join(&self.name);
        let read = |f: &str| {
            std::fs::read_to_string(base.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let until = Instant::now() + limit;
        loop {
            let up = read("operstate").is_none_or(|s| s != "down");
            let forwarding = read("brport/state").is_none_or(|s| s == "3");
            if up && forwarding {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
