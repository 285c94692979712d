//! Every frame the guest sends on the clients' LAN, with the host whose port it came from.
//!
//! A bridge-family nftables rule in the runner's namespace ([`super::nft::install_capture`])
//! logs each frame entering the LAN bridge from a host's port to an nflog group, with the host's
//! name as the log prefix; `tcpdump -i nflog:<group>` writes them to a pcap file. A capture on
//! nflog survives what a capture on an interface does not: a crashed host's links go down and
//! come back, and tcpdump on a veth would stop at the first "interface went down". [`parse`]
//! reads the pcap (link type NFLOG: TLVs with the prefix and the MAC header), keeps the frames
//! whose source MAC is the guest's and turns them into [`GuestFrame`]s on the run's clock.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::process::Signal;

use super::procs::signal;
use super::RunnerError;
use crate::checker::GuestFrame;

/// The default guest MAC of `vmatrix run`/`primary` (used if the runner could not learn it).
pub const DEFAULT_GUEST_MAC: [u8; 6] = [0x02, 0x78, 0x6d, 0x00, 0x00, 0x02];

/// A running capture.
#[derive(Debug)]
pub struct Capture {
    /// The tcpdump process.
    pub child: Child,
    /// Its pcap file.
    pub pcap: PathBuf,
}

/// Starts tcpdump on nflog `group`, writing `pcap`; returns once it listens.
pub fn start(group: u16, pcap: &Path, log: &Path) -> Result<Capture, RunnerError> {
    use std::os::unix::process::CommandExt;
    let err = std::fs::File::create(log).map_err(RunnerError::io(log))?;
    let child = Command::new("tcpdump")
        .arg("-i")
        .arg(format!("nflog:{group}"))
        .args(["-U", "-Z", "root", "-w"])
        .arg(pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(RunnerError::spawn("tcpdump (apt-get install tcpdump)"))?;
    let mut cap = Capture {
        child,
        pcap: pcap.to_path_buf(),
    };
    for _ in 0..100 {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains("listening on")) {
            return Ok(cap);
        }
        if let Ok(Some(st)) = cap.child.try_wait() {
            return Err(RunnerError::Command {
                what: "tcpdump".into(),
                detail: format!(
                    "{st}: {}",
                    std::fs::read_to_string(log).unwrap_or_default().trim()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cap.stop();
    Err(RunnerError::Timeout {
        what: "tcpdump listening".into(),
        after: Duration::from_secs(5),
        detail: std::fs::read_to_string(log).unwrap_or_default(),
    })
}

impl Capture {
    /// Stops tcpdump (SIGTERM: it flushes and exits), SIGKILL after 3 s.
    pub fn stop(&mut self) {
        let _ = signal(self.child.id(), Signal::TERM);
        for _ in 0..60 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// The guest's MAC as the runner's namespace learnt it (ARP) on the LAN bridge.
pub fn learn_guest_mac(bridge: &str, guest_ip: &str) -> Option<[u8; 6]> {
    let out = Command::new("ip")
        .args(["neigh", "show", guest_ip, "dev", bridge])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "lladdr")?;
    parse_mac(words.get(i + 1)?)
}

/// A pcap file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pcap: {0}")]
pub struct PcapError(pub String);

/// One logged frame: when (ns since the Unix epoch), the log prefix, the source MAC if the
/// MAC header was logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NflogFrame {
    /// Capture time, ns since the Unix epoch.
    pub unix_ns: u64,
    /// The nft log prefix (the host's name).
    pub prefix: String,
    /// The Ethernet source address.
    pub src: Option<[u8; 6]>,
}

/// Link type of nflog captures.
const LINKTYPE_NFLOG: u32 = 239;
/// NFLOG TLV types.
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_PREFIX: u16 = 10;
const NFULA_HWHEADER: u16 = 16;

/// Parses a pcap file of link type NFLOG. A record cut short at the end (tcpdump killed) ends
/// the list.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<NflogFrame>, PcapError> {
    if bytes.len() < 24 {
        return Err(PcapError(format!("{} bytes: no header", bytes.len())));
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let (le, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        m => return Err(PcapError(format!("bad magic {m:#x}"))),
    };
    let u32_at = |b: &[u8], at: usize| {
        let a: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(bytes, 20) & 0x0fff_ffff;
    if linktype != LINKTYPE_NFLOG {
        return Err(PcapError(format!("link type {linktype}, not NFLOG")));
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let (sec, frac, incl) = (
            u64::from(u32_at(bytes, at)),
            u64::from(u32_at(bytes, at + 4)),
            u32_at(bytes, at + 8) as usize,
        );
        let data_at = at + 16;
        if data_at + incl > bytes.len() {
            break;
        }
        let unix_ns = sec * 1_000_000_000 + if nanos { frac } else { frac * 1000 };
        if let Some(f) = parse_nflog(&bytes[data_at..data_at + incl], unix_ns) {
            out.push(f);
        }
        at = data_at + incl;
    }
    Ok(out)
}

/// One NFLOG record: a 4-byte header, then TLVs (length and type in host order: little endian
/// here) padded to 4 bytes. The time is the kernel's stamp (`NFULA_TIMESTAMP`, seconds and
/// microseconds, big endian) when present: the pcap record's own time is when libpcap read the
/// batch, up to ~1.5 s later on a busy machine (nflog flushes its queue every second), which
/// would blur who sent first.
fn parse_nflog(rec: &[u8], unix_ns: u64) -> Option<NflogFrame> {
    let mut at = 4;
    let (mut prefix, mut src) = (None, None);
    let mut unix_ns = unix_ns;
    while at + 4 <= rec.len() {
        let len = usize::from(u16::from_le_bytes([rec[at], rec[at + 1]]));
        let ty = u16::from_le_bytes([rec[at + 2], rec[at + 3]]) & 0x7fff;
        if len < 4 || at + len > rec.len() {
            break;
        }
        let value = &rec[at + 4..at + len];
        match ty {
            NFULA_PREFIX => {
                let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                prefix = Some(String::from_utf8_lossy(&value[..end]).into_owned());
            }
            NFULA_HWHEADER if value.len() >= 12 => {
                src = value[6..12].try_into().ok();
            }
            NFULA_TIMESTAMP if value.len() >= 16 => {
                let sec = u64::from_be_bytes(value[0..8].try_into().expect("8 bytes"));
                let usec = u64::from_be_bytes(value[8..16].try_into().expect("8 bytes"));
                unix_ns = sec * 1_000_000_000 + usec * 1000;
            }
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Some(NflogFrame {
        unix_ns,
        prefix: prefix?,
        src,
    })
}

/// The guest's frames of a capture on the run's clock (frames before its start are setup and
/// left out).
pub fn guest_frames(frames: &[NflogFrame], mac: [u8; 6], start_unix_ns: u64) -> Vec<GuestFrame> {
    frames
        .iter()
        .filter(|f| f.src == Some(mac) && f.unix_ns >= start_unix_ns)
        .map(|f| GuestFrame {
            time_ns: f.unix_ns - start_unix_ns,
            host: f.prefix.clone(),
            term: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(ty: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(value);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn record(sec: u32, usec: u32, prefix: &str, src: [u8; 6]) -> Vec<u8> {
        record_stamped(sec, usec, prefix, src, None)
    }

    /// A record whose pcap time is `sec.usec` and whose kernel stamp is `stamp` (sec, usec).
    fn record_stamped(
        sec: u32,
        usec: u32,
        prefix: &str,
        src: [u8; 6],
        stamp: Option<(u64, u64)>,
    ) -> Vec<u8> {
        let mut data = vec![7, 0, 0, 77];
        data.extend(tlv(1, &[0x08, 0x00, 0, 0]));
        if let Some((s, u)) = stamp {
            let mut v = s.to_be_bytes().to_vec();
            v.extend_from_slice(&u.to_be_bytes());
            data.extend(tlv(NFULA_TIMESTAMP, &v));
        }
        data.extend(tlv(NFULA_PREFIX, format!("{prefix}\0").as_bytes()));
        let mut hw = vec![0xff; 6];
        hw.extend_from_slice(&src);
        hw.extend_from_slice(&[0x08, 0x06]);
        data.extend(tlv(NFULA_HWHEADER, &hw));
        let mut r = Vec::new();
        for v in [sec, usec, data.len() as u32, data.len() as u32] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend(data);
        r
    }

    #[test]
    fn parses_nflog_records_and_keeps_the_guests() {
        let mut pcap = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 262_144, LINKTYPE_NFLOG] {
            pcap.extend_from_slice(&v.to_le_bytes());
        }
        let guest = DEFAULT_GUEST_MAC;
        pcap.extend(record(100, 5, "a", guest));
        pcap.extend(record(100, 7, "b", [1, 2, 3, 4, 5, 6]));
        // Read by libpcap a second after the kernel stamped it: the stamp wins.
        pcap.extend(record_stamped(102, 0, "b", guest, Some((101, 0))));
        let cut = record(102, 0, "c", guest);
        pcap.extend(&cut[..cut.len() - 3]);
        let frames = parse_pcap(&pcap).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].prefix, "a");
        assert_eq!(frames[0].unix_ns, 100_000_005_000);
        let g = guest_frames(&frames, guest, 100_000_000_000);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].time_ns, g[0].host.as_str()), (5_000, "a"));
        assert_eq!((g[1].time_ns, g[1].host.as_str()), (1_000_000_000, "b"));
        assert!(parse_pcap(&pcap[..10]).is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:78:6d:00:00:02"), Some(DEFAULT_GUEST_MAC));
        assert_eq!(parse_mac("02:78:6d:00:00"), None);
        assert_eq!(parse_mac("zz:78:6d:00:00:02"), None);
    }
}
