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

/// A network namespace with a tap for one guest (`scripts/netns.sh`), or two "hosts" joined by
/// a replication veth and a clients' LAN bridge (`scripts/hosts.sh`); removed on drop.
pub struct TestNet {
    pub name: String,
    pub index: u32,
    two_hosts: bool,
}

impl TestNet {
    /// Creates a fresh namespace with a unique subnet. Indices are claimed with lock files
    /// (O_EXCL), so test processes running at the same time never share a namespace.
    pub fn new() -> TestNet {
        Self::up("netns.sh", "vmxt", false)
    }

    /// Two hosts (namespaces `<name>a` for the primary, `<name>b` for the backup), each with a
    /// tap on a bridge to the clients' LAN; replication runs over their own veth pair.
    pub fn two_hosts() -> TestNet {
        Self::up("hosts.sh", "vmxh", true)
    }

    fn up(script: &str, prefix: &str, two_hosts: bool) -> TestNet {
        require_kvm();
        let index = claim_index();
        let name = format!("{prefix}{index}");
        let st = Command::new(root().join("scripts").join(script))
            .args(["up", &name, &index.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
        assert!(st.success(), "scripts/{script} up {name} {index} failed");
        TestNet {
            name,
            index,
            two_hosts,
        }
    }

    /// Namespace a VM (or the primary) runs in.
    pub fn ns(&self) -> String {
        match self.two_hosts {
            true => format!("{}a", self.name),
            false => self.name.clone(),
        }
    }

    /// Namespace the backups run in (and a failed-over VM).
    pub fn backup_ns(&self) -> String {
        match self.two_hosts {
            true => format!("{}b", self.name),
            false => self.name.clone(),
        }
    }

    /// Where backup `i` listens.
    pub fn backup_listen(&self, i: usize) -> String {
        match self.two_hosts {
            true => format!("10.79.{}.2:{}", self.index, 7100 + i),
            false => format!("127.0.0.1:{}", 7100 + i),
        }
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
        let script = match self.two_hosts {
            true => "scripts/hosts.sh",
            false => "scripts/netns.sh",
        };
        let _ = Command::new(root().join(script))
            .args(["down", &self.name])
            .status();
        release_index(self.index);
    }
}

fn lock_path(index: u32) -> PathBuf {
    std::env::temp_dir().join(format!("vmatrix-test-net-{index}.lock"))
}

/// Claims a free network index (1..=250) for this process.
fn claim_index() -> u32 {
    let start = (std::process::id() * 7 + NEXT_INDEX.fetch_add(1, Ordering::SeqCst)) % 250;
    for k in 0..250 {
        let index = 1 + (start + k) % 250;
        let p = lock_path(index);
        // A lock left by a crashed run more than 10 minutes ago is stale.
        if let Ok(m) = std::fs::metadata(&p) {
            if m.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > Duration::from_secs(600))
            {
                let _ = std::fs::remove_file(&p);
            }
        }
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .is_ok()
        {
            // An interface left behind by something else (a crashed run, a manual experiment)
            // may hold this subnet; packets would be routed there instead of to our guest.
            if subnet_in_use(index) {
                eprintln!(
                    "test network index {index}: subnet already in use on this host, skipping"
                );
                continue;
            }
            return index;
        }
    }
    panic!(
        "no free test network index (all 250 locked in {})",
        std::env::temp_dir().display()
    );
}

/// Whether an interface of this namespace already has an address in 10.77.<index>.0/24 or
/// 10.78.<index>.0/24 (the subnets the test networks use). The lock stays taken so the index
/// is not retried by this or another test process.
fn subnet_in_use(index: u32) -> bool {
    let Ok(out) = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let (a, b) = (format!(" 10.77.{index}."), format!(" 10.78.{index}."));
    text.lines().any(|l| l.contains(&a) || l.contains(&b))
}

fn release_index(index: u32) {
    let _ = std::fs::remove_file(lock_path(index));
}

/// A small deterministic generator (xorshift64) for seeded, replayable tests. The seed must
/// not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Creates a zeroed disk image of `mib` MiB.
pub fn make_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// `vmatrix <cmd> --guest .. --disk <disk> --tap tap0 --mem-mib <mib> --guest-config ..` for a
/// guest in `net` (`cmd` is `run` or `primary`).
pub fn vm_args(cmd: &str, net: &TestNet, disk: &Path, mem_mib: u64) -> Vec<std::ffi::OsString> {
    vec![
        cmd.into(),
        "--guest".into(),
        guest_elf().into(),
        "--disk".into(),
        disk.into(),
        "--tap".into(),
        "tap0".into(),
        "--mem-mib".into(),
        mem_mib.to_string().into(),
        "--guest-config".into(),
        net.guest_config().into(),
    ]
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
        Self::spawn_with(net, disk, console, mem_mib, &[])
    }

    /// Like `spawn`, with extra `vmatrix run` arguments (e.g. `--control`).
    pub fn spawn_with(
        net: &TestNet,
        disk: &Path,
        console: &Path,
        mem_mib: u64,
        extra: &[&str],
    ) -> VmProc {
        let mut args = vm_args("run", net, disk, mem_mib);
        args.extend(extra.iter().map(|a| a.into()));
        Self::spawn_args(net, console, &args)
    }

    /// `vmatrix restore <dir> --tap tap0` inside `net`, with extra arguments.
    pub fn restore(net: &TestNet, dir: &Path, console: &Path, extra: &[&str]) -> VmProc {
        Self::restore_in(net, &net.ns(), dir, console, extra)
    }

    /// `vmatrix restore <dir> --tap tap0` inside namespace `ns` of `net` (e.g. the backup's host).
    pub fn restore_in(
        net: &TestNet,
        ns: &str,
        dir: &Path,
        console: &Path,
        extra: &[&str],
    ) -> VmProc {
        let mut args: Vec<std::ffi::OsString> =
            vec!["restore".into(), dir.into(), "--tap".into(), "tap0".into()];
        args.extend(extra.iter().map(|a| a.into()));
        Self::spawn_in(net, ns, console, &args)
    }

    /// Runs `vmatrix <args> --console-log <console>` inside `net`.
    pub fn spawn_args(net: &TestNet, console: &Path, args: &[std::ffi::OsString]) -> VmProc {
        Self::spawn_in(net, &net.ns(), console, args)
    }

    /// Runs `vmatrix <args> --console-log <console>` inside namespace `ns` of `net`.
    pub fn spawn_in(
        net: &TestNet,
        ns: &str,
        console: &Path,
        args: &[std::ffi::OsString],
    ) -> VmProc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(vmatrix_bin())
            .args(args)
            .arg("--console-log")
            .arg(console)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmatrix");
        // Keep stderr drained into <console>.stderr so a chatty process never blocks on a pipe.
        if let Some(mut e) = child.stderr.take() {
            let path = console.with_extension("stderr");
            std::thread::spawn(move || {
                if let Ok(mut f) = std::fs::File::create(path) {
                    let _ = std::io::copy(&mut e, &mut f);
                }
            });
        }
        VmProc {
            child,
            console: console.to_path_buf(),
            addr: net.guest_addr(),
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.console.with_extension("stderr")).unwrap_or_default()
    }

    /// Waits for the process to exit; returns success and its stderr.
    pub fn wait_output(mut self) -> (bool, String) {
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        std::thread::sleep(Duration::from_millis(50));
        (ok, self.stderr_text())
    }

    /// Waits until the KV port answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> KvClient {
        self.try_wait_ready(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until the KV port answers; the error describes what the process said.
    pub fn try_wait_ready(&mut self, timeout: Duration) -> Result<KvClient, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "vmatrix exited early with {st}; stderr:\n{}\nconsole:\n{}",
                    self.stderr_text(),
                    std::fs::read_to_string(&self.console).unwrap_or_default()
                ));
            }
            if let Ok(c) = KvClient::connect(self.addr) {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "guest did not answer on {} within {timeout:?}; stderr:\n{}\nconsole:\n{}",
                    self.addr,
                    self.stderr_text(),
                    std::fs::read_to_string(&self.console).unwrap_or_default()
                ));
            }
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

/// Sends one `vmatrix ctl` request; returns its JSON answer (one line) or panics with the
/// error.
pub fn ctl(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(vmatrix_bin())
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .expect("run vmatrix ctl");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "vmatrix ctl {args:?} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A VM (64 MiB, a 16 MiB disk, a control socket) in `net`, given `commands` (each answered
/// `OK`), and a full snapshot of it in `<dir>/snap`: (its process, a client, the snapshot).
pub fn vm_with_snapshot(
    net: &TestNet,
    dir: &Path,
    commands: &[String],
) -> (VmProc, KvClient, PathBuf) {
    let disk = dir.join("disk.img");
    make_disk(&disk, 16);
    let sock = dir.join("vm.sock");
    let mut vm = VmProc::spawn_with(
        net,
        &disk,
        &dir.join("parent.log"),
        64,
        &["--control", sock.to_str().unwrap()],
    );
    let mut parent = vm.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    for c in commands {
        assert_eq!(parent.cmd(c).unwrap(), "OK", "{c}");
    }
    let snap = dir.join("snap");
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    (vm, parent, snap)
}

/// Waits until a control socket accepts connections.
pub fn wait_socket(socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "control socket {} never came up",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of `key=` in a `key=value ...` line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// The value of `key` in a control socket's JSON answer, as text (a string's content, a
/// number or a bool as written); None when it is missing or null.
pub fn json_field(answer: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(answer).ok()?;
    match v.get(key)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// One raw HTTP/1.1 request on a control socket (no client library: what curl would send);
/// the status code and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let sent = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A server may answer (413) and close before the whole body is sent: read its answer.
    if let Err(e) = sent {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "sending: {e}");
    }
    // (After such an early answer the kernel reports the unread body as a reset once the
    // answer has been read.)
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !bytes.is_empty() => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    let reply = String::from_utf8_lossy(&bytes).into_owned();
    let code = reply
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {reply}"));
    let body = reply.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (code, body)
}

/// A tap in the test's own network namespace with the host at 10.78.<index>.1/24 (for
/// in-process VMs, which open the tap from this namespace). Removed on drop.
pub struct HostTap {
    pub name: String,
    pub index: u32,
}

impl HostTap {
    pub fn new() -> HostTap {
        require_kvm();
        let index = claim_index();
        let name = format!("vmxht{index}");
        let _ = Command::new("ip").args(["link", "del", &name]).status();
        for args in [
            vec!["tuntap", "add", "dev", &name, "mode", "tap"],
            vec!["link", "set", &name, "up"],
        ] {
            assert!(
                Command::new("ip").args(&args).status().unwrap().success(),
                "ip {args:?}"
            );
        }
        let addr = format!("10.78.{index}.1/24");
        assert!(Command::new("ip")
            .args(["addr", "add", &addr, "dev", &name])
            .status()
            .unwrap()
            .success());
        HostTap { name, index }
    }

    pub fn guest_addr(&self) -> SocketAddr {
        format!("10.78.{}.2:7000", self.index).parse().unwrap()
    }

    pub fn guest_config(&self) -> String {
        format!("ip=10.78.{0}.2/24,gw=10.78.{0}.1,port=7000", self.index)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
        release_index(self.index);
    }
}

/// Connects to a guest, retrying until `timeout`.
pub fn connect_retry(addr: SocketAddr, timeout: Duration) -> KvClient {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(c) = KvClient::connect(addr) {
            return c;
        }
        assert!(Instant::now() < deadline, "guest at {addr} never answered");
        std::thread::sleep(Duration::from_millis(20));
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

pub mod cgroups;
pub mod clones;
pub mod cluster;
mod faults;
pub mod lb;
pub mod managed;
mod procs;
mod replicated;
#[allow(unused_imports)]
pub use faults::*;
#[allow(unused_imports)]
pub use procs::*;
#[allow(unused_imports)]
pub use replicated::*;
