//! What `vmatrix bench` runs its measurements on: a scratch directory with the cluster's
//! certificates, a tap device in this namespace for the guest (host 10.78.<n>.1, guest
//! 10.78.<n>.2), and VMs started in this process — unprotected, or protected by a primary
//! epoch loop replicating to a backup served in this process over loopback QUIC with mutual TLS.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmm::devices::serial::ConsoleOut;
use vmm::{Vm, VmConfig};

/// Scratch directory, certificates and the guest's tap; removed on drop.
pub struct BenchEnv {
    pub dir: PathBuf,
    pub guest: PathBuf,
    pub tap: String,
    pub index: u32,
    pub mem_mib: u64,
    /// The lock on `index` (see [`claim`]).
    _claim: std::fs::File,
}

/// Claims benchmark index `i` for this environment: an exclusive `flock` on a file of its own,
/// released with the file (or by the kernel when the process dies); `None` if another holds it.
fn claim(i: u32) -> Option<std::fs::File> {
    let dir = std::env::temp_dir().join("vmatrix-bench-claims");
    std::fs::create_dir_all(&dir).ok()?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{i}.lock")))
        .ok()?;
    f.try_lock().ok()?;
    Some(f)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip(8)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl BenchEnv {
    /// Creates the scratch directory, the certificates and a tap on a free 10.78.<n>.0/24.
    pub fn new(guest: PathBuf, mem_mib: u64) -> anyhow::Result<BenchEnv> {
        if !Path::new("/dev/kvm").exists() {
            bail!("/dev/kvm is missing: benchmarks need real KVM");
        }
        if !guest.is_file() {
            bail!(
                "guest ELF {} not found (build it with scripts/build-guest.sh, or pass --guest)",
                guest.display()
            );
        }
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .context("running ip(8)")?;
        let used = String::from_utf8_lossy(&used.stdout).to_string();
        // An index is claimed by a lock file held for the environment's life (two benchmarks
        // starting at once — tests run in parallel — both found the same subnet free, and one
        // deleted the other's new tap); a tap of a claimed-free index is a dead run's.
        let (index, claim) = (200..=250)
            .filter(|i| !used.contains(&format!(" 10.78.{i}.")))
            .find_map(|i| claim(i).map(|c| (i, c)))
            .context("no free 10.78.200-250.0/24 subnet for the benchmark's tap")?;
        let tap = format!("vmxbench{index}");
        let _ = ip(&["link", "del", &tap]);
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ip(&["addr", "add", &format!("10.78.{index}.1/24"), "dev", &tap])?;
        ip(&["link", "set", &tap, "up"])?;
        let dir =
            std::env::temp_dir().join(format!("vmatrix-bench-{}-{index}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = dir.join("pki");
        transport::certs::init_ca(&pki)?;
        for h in ["primary", "backup"] {
            transport::certs::issue(&pki, h)?;
        }
        Ok(BenchEnv {
            dir,
            guest,
            tap,
            index,
            mem_mib,
            _claim: claim,
        })
    }

    /// The guest's KV address.
    pub fn guest_addr(&self) -> SocketAddr {
        SocketAddr::from(([10, 78, self.index as u8, 2], 7000))
    }

    /// This host's identity `host` from the scratch certificates.
    pub fn identity(&self, host: &str) -> anyhow::Result<transport::certs::Identity> {
        Ok(transport::certs::load(&self.dir.join("pki"), host)?)
    }

    /// A fresh VM (not started) on a new zeroed disk named `name`.
    pub fn vm(&self, name: &str) -> anyhow::Result<Arc<Vm>> {
        let disk = self.dir.join(format!("{name}.img"));
        std::fs::File::create(&disk)?.set_len(16 << 20)?;
        let console = std::fs::File::create(self.dir.join(format!("{name}.console")))?;
        Ok(Arc::new(Vm::new(VmConfig {
            guest_elf: self.guest.clone(),
            mem_mib: self.mem_mib,
            disk: Some(disk),
            tap: Some(self.tap.clone()),
            mac: [0x02, 0x78, 0x6d, 0x00, 0x00, 0x02],
            guest_config: format!("ip=10.78.{0}.2/24,gw=10.78.{0}.1,port=7000", self.index),
            console: ConsoleOut::new(Box::new(console)),
            dirty_log: true,
            generation: 1,
        })?))
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.tap]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A line-protocol client of the guest's KV service.
pub struct Kv {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Kv {
    /// Connects, retrying until `timeout` (the guest may be booting, or its output held until
    /// the initial sync is acknowledged).
    pub fn connect(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Kv> {
        let t = Instant::now();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    return Ok(Kv {
                        w: s.try_clone()?,
                        r: BufReader::new(s),
                    });
                }
                Err(e) if t.elapsed() > timeout => {
                    return Err(e).with_context(|| format!("guest at {addr} never answered"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// One request, its answer.
    pub fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
        self.send(line)?;
        self.recv()
    }

    /// Sends a request without waiting for its answer (pipelining).
    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.w.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }

    /// The next answer.
    pub fn recv(&mut self) -> anyhow::Result<String> {
        let mut s = String::new();
        if self.r.read_line(&mut s)? == 0 {
            bail!("connection closed");
        }
        Ok(s.trim_end().to_string())
    }
}

/// Whether [`Protection::default`] asks for the dirty ring (`bench replication --dirty-source`).
static DEFAULT_RING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Protected VMs of this bench use the dirty ring unless told otherwise (`--dirty-source`).
pub fn set_default_ring(on: bool) {
    DEFAULT_RING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`Protection::default`] runs the backup's apply path real-time (`--backup-rt`).
static DEFAULT_BACKUP_RT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Protected VMs of this bench have real-time backups (`vmatrix backup --rt-apply`).
pub fn set_default_backup_rt(on: bool) {
    DEFAULT_BACKUP_RT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Settings of a protected VM.
#[derive(Debug, Clone, Copy)]
pub struct Protection {
    pub epoch_us: u64,
    pub min_epoch_us: u64,
    pub max_output_delay_ms: u64,
    pub early_checkpoints: bool,
    /// When pauses run at real-time priority (`Vm::set_rt_pause`; `auto`, as `vmatrix
    /// primary`, by default).
    pub rt_pause: vmm::rt::RtMode,
    /// KVM's dirty ring as the harvest source (`vmm::dirty_ring`), where KVM has it.
    pub dirty_ring: bool,
    /// Busy epochs copy their pages early (`--epoch-precopy`).
    pub epoch_precopy: bool,
    /// The CPU of the vCPU thread and that of the replication loop (`--vcpu-cpus`,
    /// `--loop-cpus`).
    pub pin: Option<(usize, usize)>,
    /// Pause buffers locked in RAM (`--lock-buffers`).
    pub lock_buffers: bool,
    /// The backup's apply path at real-time priority (`vmatrix backup --rt-apply`).
    pub backup_rt: bool,
}

impl Default for Protection {
    fn default() -> Self {
        Protection {
            epoch_us: 20_000,
            min_epoch_us: 10_000,
            max_output_delay_ms: 200,
            early_checkpoints: true,
            rt_pause: vmm::rt::RtMode::Auto,
            dirty_ring: DEFAULT_RING.load(std::sync::atomic::Ordering::Relaxed),
            epoch_precopy: true,
            pin: None,
            lock_buffers: true,
            backup_rt: DEFAULT_BACKUP_RT.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A running VM, protected or not; stopped on drop.
pub struct RunningVm {
    pub vm: Arc<Vm>,
    pub stats: Option<Arc<primary::Stats>>,
    /// The backup's export requests (a protected VM).
    pub exports: Option<backup::Exports>,
    /// The backup's counters (a protected VM).
    pub backup_stats: Option<Arc<backup::BackupStats>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    threads: Vec<JoinHandle<()>>,
}

impl RunningVm {
    /// An unprotected VM.
    pub fn plain(env: &BenchEnv, name: &str) -> anyhow::Result<RunningVm> {
        let vm = env.vm(name)?;
        vm.start()?;
        Ok(RunningVm {
            vm,
            stats: None,
            exports: None,
            backup_stats: None,
            stop: None,
            threads: Vec::new(),
        })
    }

    /// A VM protected by a primary epoch loop and a backup, both in this process.
    pub fn protected(env: &BenchEnv, name: &str, p: Protection) -> anyhow::Result<RunningVm> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let bcfg = backup::BackupConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            image_dir: env.dir.join(format!("{name}-image")),
            identity: env.identity("backup")?,
            cluster_id: 1,
            vm_id: "vm".into(),
            quic: transport::QuicConfig::default(),
            stats: Arc::new(backup::BackupStats::default()),
            exports: backup::Exports::default(),
            data_sockets: 1,
            data_ports: Vec::new(),
        };
        let exports = bcfg.exports.clone();
        let backup_stats = bcfg.stats.clone();
        let brx = stop_rx.clone();
        let threads = crate::rt::Threads {
            cpus: None,
            realtime: p.backup_rt,
        };
        let backup_thread = crate::rt::spawn_with("bench-backup", threads, async move {
            if let Err(e) = backup::serve(bcfg, brx, Some(ready_tx)).await {
                eprintln!("bench backup: {e}");
            }
        })?;
        let backup_addr = ready_rx
            .blocking_recv()
            .context("the benchmark's backup did not start")?;
        vmm::dirty_ring::prefer(p.dirty_ring);
        let vm = env.vm(name);
        vmm::dirty_ring::prefer(false);
        let vm = vm?;
        vm.hold_output_from_start();
        vm.set_rt_pause(p.rt_pause);
        vm.set_lock_buffers(p.lock_buffers);
        let cfg = primary::PrimaryConfig {
            epoch: Duration::from_micros(p.epoch_us),
            min_epoch: Duration::from_micros(p.min_epoch_us),
            max_output_delay: Duration::from_millis(p.max_output_delay_ms),
            backups: vec![(backup_addr, "backup".into())],
            required: 1,
            identity: env.identity("primary")?,
            cluster_id: 1,
            vm_id: "vm".into(),
            term: 1,
            lanes: 2,
            window: 4,
            quic: transport::QuicConfig::default(),
            encode: protocol::page::EncodeOptions::default(),
            early_checkpoints: p.early_checkpoints,
            precopy_rounds: 8,
            drop_after: Duration::from_secs(1),
            data_connections: true,
            epoch_precopy: p.epoch_precopy,
        };
        if let Some((vcpu, _)) = p.pin {
            vm.pin_vcpu(&[vcpu]).context("pinning the vCPU thread")?;
        }
        vm.start()?;
        let stats = Arc::new(primary::Stats::default());
        let (vm2, st2) = (vm.clone(), stats.clone());
        let mut state = primary::PrimaryState::new(&vm, cfg.term, cfg.encode);
        let threads = crate::rt::Threads {
            cpus: p.pin.map(|p| vec![p.1]),
            realtime: false,
        };
        let stopping = stop_rx.clone();
        let primary_thread = crate::rt::spawn_with("bench-primary", threads, async move {
            match primary::run(vm2, cfg, st2, &mut state, stop_rx).await {
                // (The VM stops right after the loop is told to: a capture it was taking then
                // fails, which is no error of the run.)
                Err(e) if *stopping.borrow() => tracing::debug!("bench primary, stopping: {e}"),
                Err(e) => eprintln!("bench primary: {e}"),
                Ok(()) => {}
            }
        })?;
        Ok(RunningVm {
            vm,
            stats: Some(stats),
            exports: Some(exports),
            backup_stats: Some(backup_stats),
            stop: Some(stop_tx),
            threads: vec![primary_thread, backup_thread],
        })
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        self.vm.stop();
        let _ = self.vm.wait();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
