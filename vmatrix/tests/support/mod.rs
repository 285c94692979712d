//! Shared helpers of the integration tests and benchmarks: real KVM, real network namespaces
//! and tap devices (via `scripts/netns.sh`), real `vmatrix` processes, real TCP clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `vmatrix` binary under test.
pub fn vmatrix_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmatrix"))
}

/// Fails with a clear message unless this host can run VMs.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need real KVM (nested virtualization on)"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: these tests need tap devices"
    );
}

/// The test guest ELF (built by scripts/build-guest.sh).
pub fn guest_elf() -> PathBuf {
    let p = std::env::var_os("VMATRIX_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            root().join("guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest")
        });
    assert!(
        p.is_file(),
        "guest ELF {} not found: build it with scripts/build-guest.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a tap for one guest, removed on drop.
pub struct TestNet {
    pub name: String,
    pub index: u32,
}

impl TestNet {
    /// Creates a fresh namespace with a unique subnet.
    pub fn new() -> TestNet {
        require_kvm();
        let n = NEXT_INDEX.fetch_add(1, Ordering::SeqCst);
        let index = 1 + (std::process::id() * 7 + n) % 250;
        let name = format!("vmxt{index}");
        let st = Command::new(root().join("scripts/netns.sh"))
            .args(["up", &name, &index.to_string()])
            .status()
            .expect("run scripts/netns.sh");
        assert!(st.success(), "scripts/netns.sh up {name} {index} failed");
        TestNet { name, index }
    }

    /// Guest address of the KV service.
    pub fn guest_addr(&self) -> SocketAddr {
        format!("10.77.{}.2:7000", self.index).parse().unwrap()
    }

    /// The `--guest-config` string for this network.
    pub fn guest_config(&self) -> String {
        format!("ip=10.77.{0}.2/24,gw=10.77.{0}.1,port=7000", self.index)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/netns.sh"))
            .args(["down", &self.name])
            .status();
    }
}

/// Creates a zeroed disk image of `mib` MiB.
pub fn make_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// A `vmatrix run` process inside a test network.
pub struct VmProc {
    pub child: Child,
    pub console: PathBuf,
    pub addr: SocketAddr,
}

impl VmProc {
    /// Boots the guest on `disk` inside `net`.
    pub fn spawn(net: &TestNet, disk: &Path, console: &Path, mem_mib: u64) -> VmProc {
        let child = Command::new("ip")
            .args(["netns", "exec", &net.name])
            .arg(vmatrix_bin())
            .arg("run")
            .arg("--guest")
            .arg(guest_elf())
            .arg("--disk")
            .arg(disk)
            .args(["--tap", "tap0", "--mem-mib", &mem_mib.to_string()])
            .args(["--guest-config", &net.guest_config()])
            .arg("--console-log")
            .arg(console)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmatrix run");
        VmProc {
            child,
            console: console.to_path_buf(),
            addr: net.guest_addr(),
        }
    }

    /// Waits until the KV port answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> KvClient {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "vmatrix exited early with {st}; console:\n{}",
                    std::fs::read_to_string(&self.console).unwrap_or_default()
                );
            }
            if let Ok(c) = KvClient::connect(self.addr) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "guest did not answer on {} within {timeout:?}; console:\n{}",
                self.addr,
                std::fs::read_to_string(&self.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no cleanup: a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The console output so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A line-protocol client.
pub struct KvClient {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl KvClient {
    /// Connects with a short timeout.
    pub fn connect(addr: SocketAddr) -> std::io::Result<KvClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        Ok(KvClient {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Changes how long a response may take.
    pub fn set_timeout(&mut self, t: Duration) {
        let _ = self.w.set_read_timeout(Some(t));
    }

    /// Sends one request, returns the response line without its newline.
    pub fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.w.write_all(format!("{line}\n").as_bytes())?;
        let mut resp = String::new();
        let n = self.r.read_line(&mut resp)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(resp.trim_end().to_string())
    }
}

/// Record layout of the guest's disk log (see guest/src/kvlog.rs), parsed independently.
pub mod log {
    pub const LOG_START: usize = 4096;
    pub const REC_MAGIC: u32 = 0x3152_564b;

    /// (offset, length, key, value) of each valid record, in order.
    pub fn records(disk: &[u8]) -> Vec<(usize, usize, String, String)> {
        let mut out = Vec::new();
        let mut off = LOG_START;
        let mut seq = 1u32;
        while off + 16 <= disk.len() {
            let b = &disk[off..];
            let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            if u32_at(0) != REC_MAGIC || u32_at(4) != seq {
                break;
            }
            let (kl, vl) = (b[8] as usize, b[9] as usize);
            let len = 16 + kl + vl;
            if b.len() < len {
                break;
            }
            let mut h = crc32fast::Hasher::new();
            h.update(&b[..12]);
            h.update(&b[16..len]);
            if h.finalize() != u32_at(12) {
                break;
            }
            let k = String::from_utf8_lossy(&b[16..16 + kl]).into_owned();
            let v = String::from_utf8_lossy(&b[16 + kl..len]).into_owned();
            out.push((off, len, k, v));
            off += len;
            seq += 1;
        }
        out
    }
}
