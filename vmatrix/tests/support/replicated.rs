//! Replication fixtures of the integration tests: a protected primary with its backups
//! (`Replicated`), a UDP proxy that damages replication traffic (`CorruptingProxy`), and the
//! replica-equals-primary check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

/// A primary and a backup inside one test network: certificates, the backup process (listening
/// on 127.0.0.1:7100 in the namespace) and the primary process with the guest.
pub struct Replicated {
    pub dir: PathBuf,
    pub backup: Option<Child>,
    /// Further backups (index 1..), when started with `start_n`.
    pub more: Vec<Child>,
    pub primary: VmProc,
    /// The guest's RAM (32 MiB unless started with `start_sized`).
    pub mem_mib: u64,
}

impl Replicated {
    /// `start` with a control socket (`<dir>/ctl.sock`): waits for the guest and the socket;
    /// returns the pair, a KV client and the socket.
    pub fn start_controlled(net: &TestNet, dir: &Path) -> (Replicated, KvClient, PathBuf) {
        let sock = dir.join("ctl.sock");
        let mut r = Replicated::start(net, dir, &["--control", sock.to_str().unwrap()]);
        let kv = r.wait_ready(Duration::from_secs(20));
        wait_socket(&sock, Duration::from_secs(5));
        (r, kv, sock)
    }

    /// Like `start`, with a guest of `mem_mib` MiB.
    pub fn start_sized(net: &TestNet, dir: &Path, mem_mib: u64, extra: &[&str]) -> Replicated {
        let listen = [net.backup_listen(0)];
        Self::start_with_mem(net, dir, &listen, &listen, mem_mib, extra)
    }

    /// Starts a backup and a protected primary; `extra` goes to `vmatrix primary`.
    pub fn start(net: &TestNet, dir: &Path, extra: &[&str]) -> Replicated {
        Self::start_n(net, dir, 1, extra)
    }

    /// Starts `n` backups (backup `i` listens on `net.backup_listen(i)`, image `image` for the first
    /// and `image<i>` for the others) and a protected primary.
    pub fn start_n(net: &TestNet, dir: &Path, n: usize, extra: &[&str]) -> Replicated {
        let listen: Vec<String> = (0..n).map(|i| net.backup_listen(i)).collect();
        Self::start_at(net, dir, &listen, &listen, extra)
    }

    /// Like `start_n`, with backup `i` listening on `listen[i]` and the primary connecting to
    /// `connect[i]` (e.g. through a proxy).
    pub fn start_at(
        net: &TestNet,
        dir: &Path,
        listen: &[String],
        connect: &[String],
        extra: &[&str],
    ) -> Replicated {
        Self::start_with_mem(net, dir, listen, connect, 32, extra)
    }

    fn start_with_mem(
        net: &TestNet,
        dir: &Path,
        listen: &[String],
        connect: &[String],
        mem_mib: u64,
        extra: &[&str],
    ) -> Replicated {
        let n = listen.len();
        let pki = dir.join("pki");
        let ps = pki.to_str().unwrap().to_string();
        let out = Command::new(vmatrix_bin())
            .args(["certs", "init", &ps])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for host in ["backup", "backup1", "backup2", "primary"] {
            let out = Command::new(vmatrix_bin())
                .args(["certs", "issue", &ps, "--host", host])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let backup = Self::spawn_backup(net, dir, extra, 0, &listen[0]);
        let more: Vec<Child> = (1..n)
            .map(|i| Self::spawn_backup(net, dir, extra, i, &listen[i]))
            .collect();
        make_disk(&dir.join("disk.img"), 16);
        let primary = Self::spawn_primary_in(
            net,
            dir,
            &connect[..n],
            (mem_mib, extra),
            "primary-console.log",
        );
        Replicated {
            dir: dir.to_path_buf(),
            backup: Some(backup),
            more,
            primary,
            mem_mib,
        }
    }

    /// Starts `vmatrix primary` on `<dir>/disk.img`, connecting to the backups at `connect`.
    fn spawn_primary_in(
        net: &TestNet,
        dir: &Path,
        connect: &[String],
        (mem_mib, extra): (u64, &[&str]),
        console: &str,
    ) -> VmProc {
        let mut args = vm_args("primary", net, &dir.join("disk.img"), mem_mib);
        args.extend([
            "--certs".into(),
            dir.join("pki").into(),
            "--host".into(),
            "primary".into(),
        ]);
        for (i, to) in connect.iter().enumerate() {
            args.push("--backup".into());
            args.push(format!("{}@{to}", Self::backup_name(i)).into());
        }
        args.extend(extra.iter().map(|a| a.into()));
        args.push("--log".into());
        args.push("primary=debug,transport=debug,info".into());
        VmProc::spawn_args(net, &dir.join(console), &args)
    }

    /// Starts a new primary (a new history: it boots the guest from the same disk) connecting
    /// to backup 0, after the previous one was killed; its console is `<console>`.
    pub fn new_primary(&mut self, net: &TestNet, extra: &[&str], console: &str) {
        let connect = [net.backup_listen(0)];
        let sized = (self.mem_mib, extra);
        self.primary = Self::spawn_primary_in(net, &self.dir, &connect, sized, console);
    }

    /// SIGKILL the first backup (see `respawn_backup`).
    pub fn kill_backup(&mut self) {
        if let Some(mut b) = self.backup.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
    }

    fn backup_name(i: usize) -> String {
        if i == 0 {
            "backup".into()
        } else {
            format!("backup{i}")
        }
    }

    /// Control socket of backup `i`.
    pub fn backup_socket(&self, i: usize) -> PathBuf {
        Self::backup_socket_in(&self.dir, i)
    }

    fn backup_socket_in(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("backup{i}.sock"))
    }

    /// Image directory of backup `i`.
    pub fn image_dir(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.dir.join("image")
        } else {
            self.dir.join(format!("image{i}"))
        }
    }

    fn spawn_backup(net: &TestNet, dir: &Path, extra: &[&str], i: usize, listen: &str) -> Child {
        let image = if i == 0 {
            dir.join("image")
        } else {
            dir.join(format!("image{i}"))
        };
        let log = if i == 0 {
            dir.join("backup.log")
        } else {
            dir.join(format!("backup{i}.log"))
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &net.backup_ns()])
            .arg(vmatrix_bin())
            .args([
                "backup",
                "--log",
                "backup=debug,transport=debug,protocol=debug,info",
            ])
            .args(["--listen", listen, "--host", &Self::backup_name(i)])
            .arg("--certs")
            .arg(dir.join("pki"))
            .arg("--image-dir")
            .arg(image)
            .arg("--control")
            .arg(Self::backup_socket_in(dir, i));
        if let Some(k) = extra.iter().position(|a| *a == "--idle-timeout-ms") {
            c.args(&extra[k..k + 2]);
        }
        c.stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn backup")
    }

    /// Starts the first backup again (after it was killed), on its address and image directory
    /// (its log is appended to).
    pub fn respawn_backup(&mut self, net: &TestNet) {
        self.respawn_backup_with(net, &[]);
    }

    /// `respawn_backup` with extra flags (e.g. `--idle-timeout-ms`).
    pub fn respawn_backup_with(&mut self, net: &TestNet, extra: &[&str]) {
        assert!(self.backup.is_none(), "the first backup is still running");
        let listen = net.backup_listen(0);
        self.backup = Some(Self::spawn_backup(net, &self.dir, extra, 0, &listen));
    }

    /// SIGTERM backup `i` (1..) and wait; returns its image.
    pub fn finalize_more(&mut self, i: usize) -> PathBuf {
        let b = &mut self.more[i - 1];
        let _ = Command::new("kill")
            .args(["-TERM", &b.id().to_string()])
            .status();
        assert!(b.wait().unwrap().success());
        self.image_dir(i)
    }

    /// Kills backup `i` (1..) with SIGKILL and starts it again on its address and image.
    pub fn kill_and_respawn_more(
        &mut self,
        net: &TestNet,
        i: usize,
        before_respawn: impl FnOnce(),
    ) {
        let b = &mut self.more[i - 1];
        let _ = b.kill();
        let _ = b.wait();
        before_respawn();
        let listen = net.backup_listen(i);
        self.more[i - 1] = Self::spawn_backup(net, &self.dir, &[], i, &listen);
    }

    /// Sends a signal to backup `i` (1..).
    pub fn signal_more(&self, i: usize, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.more[i - 1].id().to_string()])
            .status();
    }

    /// SIGTERM the backup and wait: its image becomes a snapshot of the last applied checkpoint.
    pub fn finalize_backup(&mut self) -> PathBuf {
        if let Some(mut b) = self.backup.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &b.id().to_string()])
                .status();
            let st = b.wait().unwrap();
            assert!(
                st.success(),
                "backup exit: {st}; log:\n{}",
                std::fs::read_to_string(self.dir.join("backup.log")).unwrap_or_default()
            );
        }
        self.dir.join("image")
    }

    /// Waits for the protected guest; on failure the panic shows the primary's and the
    /// backup's logs.
    pub fn wait_ready(&mut self, timeout: Duration) -> KvClient {
        match self.primary.try_wait_ready(timeout) {
            Ok(c) => c,
            Err(e) => panic!("{e}\nbackup log:\n{}", self.backup_log()),
        }
    }

    /// The backup's log so far.
    pub fn backup_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("backup.log")).unwrap_or_default()
    }

    /// Sends a signal to the backup process.
    pub fn signal_backup(&self, sig: &str) {
        if let Some(b) = &self.backup {
            let _ = Command::new("kill")
                .args([sig, &b.id().to_string()])
                .status();
        }
    }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        for mut b in self.backup.take().into_iter().chain(self.more.drain(..)) {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

/// A UDP proxy in the test process that corrupts traffic: it forwards datagrams between the
/// first client that talks to it and `upstream`, flipping one bit in `flip` of them and
/// truncating `cut` of them (fractions), with a seeded generator. Stops when dropped.
pub struct CorruptingProxy {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub damaged: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CorruptingProxy {
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        flip: f64,
        cut: f64,
        seed: u64,
    ) -> CorruptingProxy {
        use std::net::UdpSocket;
        use std::sync::atomic::AtomicBool;
        let front = UdpSocket::bind(listen).expect("bind proxy");
        let back = UdpSocket::bind((listen.ip(), 0)).expect("bind proxy upstream side");
        back.connect(upstream).unwrap();
        front.set_nonblocking(true).unwrap();
        back.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let damaged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, dm) = (stop.clone(), damaged.clone());
        let handle = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut rnd = move || rng.next();
            let mut damage = move |b: &mut Vec<u8>| {
                let p = (rnd() % 10_000) as f64 / 10_000.0;
                if p < flip && !b.is_empty() {
                    let i = (rnd() as usize) % b.len();
                    b[i] ^= 1 << (rnd() % 8);
                    dm.fetch_add(1, Ordering::Relaxed);
                } else if p < flip + cut && b.len() > 1 {
                    let n = (rnd() as usize) % b.len();
                    b.truncate(n);
                    dm.fetch_add(1, Ordering::Relaxed);
                }
            };
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let mut idle = true;
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    client = Some(from);
                    let mut d = buf[..n].to_vec();
                    damage(&mut d);
                    let _ = back.send(&d);
                }
                if let Ok(n) = back.recv(&mut buf) {
                    idle = false;
                    if let Some(c) = client {
                        let mut d = buf[..n].to_vec();
                        damage(&mut d);
                        let _ = front.send_to(&d, c);
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        CorruptingProxy {
            addr,
            stop,
            damaged,
            handle: Some(handle),
        }
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Pauses the primary's guest, waits until a checkpoint taken after the pause is acknowledged,
/// kills the primary and finalizes the backup: the backup's memory checksum and disk must equal
/// the primary's at that checkpoint.
pub fn assert_backup_equals_primary(r: &mut Replicated, sock: &Path) {
    // Pause the primary's guest: the epoch loop keeps checkpointing the (now still) VM.
    ctl(sock, &["pause"]);
    let c1 = json_field(&ctl(sock, &["checksum"]), "memory_crc32").unwrap();
    // Wait until a checkpoint taken after the pause has been acknowledged.
    let epochs_at_pause: u64 = json_field(&ctl(sock, &["status"]), "epochs")
        .unwrap()
        .parse()
        .unwrap();
    let t = Instant::now();
    loop {
        let st = ctl(sock, &["status"]);
        let acked: Option<u64> = json_field(&st, "acked_epoch").and_then(|a| a.parse().ok());
        if acked.is_some_and(|a| a > epochs_at_pause) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no checkpoint after the pause was acknowledged: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The paused primary's memory (small guests), kept to name the pages that differ if the
    // checksums do.
    let at_pause = r.dir.join("primary-at-pause");
    let snap = match r.mem_mib <= 256 {
        true => ctl_try(sock, &["snapshot", at_pause.to_str().unwrap()])
            .unwrap_or_else(|e| format!("(snapshot failed: {e})")),
        false => "(not taken: a big guest)".to_string(),
    };
    r.primary.kill9();
    let image = r.finalize_backup();
    let meta = vmm::snapshot::read_meta(&image).unwrap();
    let c2 = meta.memory_checksum.unwrap().to_string();
    if c1 != c2 {
        panic!(
            "backup memory differs from the primary's at its last checkpoint ({c1} vs {c2}); \
             snapshot: {snap}; {}",
            differing_pages(&at_pause, &image)
        );
    }
    let primary_disk = std::fs::read(r.dir.join("disk.img")).unwrap();
    let backup_disk = std::fs::read(image.join("disk.img")).unwrap();
    assert!(
        primary_disk == backup_disk,
        "backup disk equals the primary's disk"
    );
}

/// The pages in which two raw memory images (`<dir>/memory.bin`) differ: how many, and the
/// first few with how many of their bytes differ.
pub fn differing_pages(a: &Path, b: &Path) -> String {
    let read = |d: &Path| std::fs::read(d.join(vmm::snapshot::MEMORY_FILE));
    let (x, y) = match (read(a), read(b)) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => return format!("cannot compare images: {:?} / {:?}", x.err(), y.err()),
    };
    let pages = x.len().max(y.len()).div_ceil(4096);
    let page = |v: &[u8], i: usize| {
        let at = (i * 4096).min(v.len());
        let mut p = v[at..(at + 4096).min(v.len())].to_vec();
        p.resize(4096, 0);
        p
    };
    let mut diff = Vec::new();
    for i in 0..pages {
        let (p, q) = (page(&x, i), page(&y, i));
        if p != q {
            let bytes = p.iter().zip(&q).filter(|(u, v)| u != v).count();
            let first = p.iter().zip(&q).position(|(u, v)| u != v).unwrap_or(0);
            diff.push(format!(
                "page {i:#x}: {bytes} bytes from +{first:#x} ({:#04x} vs {:#04x})",
                p[first], q[first]
            ));
        }
    }
    let n = diff.len();
    diff.truncate(24);
    format!("{n} pages differ: {}", diff.join(", "))
}
