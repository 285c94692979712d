//! `vmatrix bench clones`: how fast `vmatrix clone` brings N clones to answer, and what each
//! costs in memory, on real KVM and taps.
//!
//! Set-up: a bridge in this namespace (host side 10.78.<n>.1/24), a parent VM (`vmatrix run`,
//! its own process) with some KV data, a full snapshot of it, the parent stopped. Then for
//! each N: `vmatrix clone <snapshot> --clones N --bridge <br>` is started and the benchmark
//! connects to every clone's KV port itself, timing from the command's start to the first and
//! to the last clone answering a `GET` with the parent's value; then it reads every clone's
//! `/proc/<pid>/smaps`: the process's RSS and private pages, and the guest RAM mapping's
//! resident and private (written) pages. It also measures the two ways to give a clone its
//! disk (a copy of the base's data vs an overlay) and the cost of a process per clone.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::harness::Kv;

/// Flags of `vmatrix bench clones`.
#[derive(clap::Args, Debug)]
pub struct ClonesArgs {
    /// The test guest ELF.
    #[arg(
        long,
        default_value = "guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"
    )]
    pub guest: PathBuf,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Clone counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    pub counts: Vec<u32>,
    /// Rounds per count (the figures are the median).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

/// The bridge and scratch directory; removed on drop.
struct Env {
    dir: PathBuf,
    bridge: String,
    index: u32,
    exe: PathBuf,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("ip(8)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Env {
    fn new() -> anyhow::Result<Env> {
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()?;
        let used = String::from_utf8_lossy(&used.stdout).to_string();
        let index = (200..=250)
            .find(|i| !used.contains(&format!(" 10.78.{i}.")))
            .context("no free 10.78.200-250.0/24 subnet")?;
        let bridge = format!("vclbr{index}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "link",
            "set",
            &bridge,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("10.78.{index}.1/24"),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        let dir = std::env::temp_dir().join(format!("vmatrix-bench-clones-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Env {
            dir,
            bridge,
            index,
            exe: std::env::current_exe()?,
        })
    }

    fn addr(&self, host: u32) -> SocketAddr {
        SocketAddr::from(([10, 78, self.index as u8, host as u8], 7000))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // The taps the rounds kept (`--keep`).
        let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("vcl{}-", self.index)))
                    .collect()
            })
            .unwrap_or_default();
        for t in taps {
            let _ = ip(&["link", "del", &t]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        let _ = ip(&["link", "del", &format!("vclp{}", self.index)]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Boots the parent, writes data, snapshots it, stops it; the snapshot directory.
fn parent_snapshot(env: &Env, a: &ClonesArgs) -> anyhow::Result<PathBuf> {
    let tap = format!("vclp{}", env.index);
    let _ = ip(&["link", "del", &tap]);
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ip(&["link", "set", &tap, "master", &env.bridge, "up"])?;
    let disk = env.dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let sock = env.dir.join("parent.sock");
    let config = format!(
        "ip=10.78.{}.2/24,gw=10.78.{}.1,port=7000",
        env.index, env.index
    );
    let mut parent = Command::new(&env.exe)
        .arg("run")
        .arg("--guest")
        .arg(&a.guest)
        .arg("--disk")
        .arg(&disk)
        .args(["--tap", &tap, "--mem-mib", &a.mem_mib.to_string()])
        .args(["--guest-config", &config])
        .arg("--control")
        .arg(&sock)
        .arg("--console-log")
        .arg(env.dir.join("parent.log"))
        .stderr(Stdio::null())
        .spawn()?;
    let r = (|| {
        let mut kv = Kv::connect(env.addr(2), Duration::from_secs(20))?;
        for i in 0..1000 {
            kv.cmd(&format!("SET key{i} value-{i}-{}", "x".repeat(64)))?;
        }
        let snap = env.dir.join("snap");
        let out = Command::new(&env.exe)
            .arg("ctl")
            .arg(&sock)
            .arg("snapshot")
            .arg(&snap)
            .output()?;
        if !out.status.success() {
            bail!("snapshot: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(snap)
    })();
    let _ = Command::new(&env.exe)
        .arg("ctl")
        .arg(&sock)
        .arg("stop")
        .output();
    let _ = parent.wait();
    r
}

/// One run of N clones.
#[derive(Debug, Clone, Default)]
struct Round {
    first_ms: f64,
    all_ms: f64,
    /// The command's own figures: base ready, every VM built, every clone answered.
    base_ms: f64,
    taps_ms: f64,
    spawned_ms: f64,
    built_ms: f64,
    /// Mean over clones: process start-up (spawn → main) and build inside the process, ms.
    startup_ms: f64,
    build_ms: f64,
    /// Mean over clones, KiB: process RSS, process private (unique) pages, guest RAM
    /// mapping resident, guest RAM mapping private (written).
    rss: f64,
    private: f64,
    ram_rss: f64,
    ram_private: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Sums of `keys` (KiB) in /proc/<pid>/smaps over mappings whose line matches `only`.
fn smaps_kib(pid: u32, only: Option<&str>, keys: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut sums = vec![0u64; keys.len()];
    let mut inside = only.is_none();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = only.is_none_or(|o| line.trim_end().ends_with(o));
            continue;
        }
        if !inside {
            continue;
        }
        for (k, s) in keys.iter().zip(sums.iter_mut()) {
            if let Some(v) = line.strip_prefix(k) {
                *s += v
                    .trim_start_matches(':')
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    sums
}

fn one_round(env: &Env, snap: &Path, n: u32) -> anyhow::Result<Round> {
    let work = env.dir.join(format!("w{n}"));
    // (A clone's MAC follows from its address: the host's neighbour entries of the previous
    // round stay right, as a load balancer's would.)
    let t0 = Instant::now();
    let mut cmd = Command::new(&env.exe)
        .arg("clone")
        .arg(snap)
        .args(["--clones", &n.to_string()])
        .args(["--ip", &format!("10.78.{}.10/24", env.index)])
        .args([
            "--bridge",
            &env.bridge,
            "--tap-prefix",
            &format!("vcl{}-", env.index),
        ])
        .arg("--work")
        .arg(&work)
        .arg("--keep")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let r = measure(env, &mut cmd, n, t0);
    let _ = Command::new("kill")
        .args(["-TERM", &cmd.id().to_string()])
        .status();
    let _ = cmd.wait();
    r
}

/// Polls every clone (a thread each) until it answers a GET with the parent's value; ms
/// since `t0`.
fn poll(addr: SocketAddr, t0: Instant) -> Option<f64> {
    let until = t0 + Duration::from_secs(30);
    while Instant::now() < until {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut w = match s.try_clone() {
                Ok(w) => w,
                Err(_) => continue,
            };
            let mut line = String::new();
            let asked = std::io::Write::write_all(&mut w, b"GET key7\n").is_ok();
            if asked
                && BufReader::new(s).read_line(&mut line).is_ok()
                && line.starts_with("VALUE value-7-")
            {
                return Some(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Waits for every clone to answer; then reads the command's lines and every clone's memory.
fn measure(env: &Env, cmd: &mut Child, n: u32, t0: Instant) -> anyhow::Result<Round> {
    let mut r = Round::default();
    let pollers: Vec<_> = (0..n)
        .map(|i| {
            let a = env.addr(10 + i);
            std::thread::spawn(move || poll(a, t0))
        })
        .collect();
    let mut times = Vec::new();
    for p in pollers {
        match p.join().ok().flatten() {
            Some(t) => times.push(t),
            None => bail!("not every clone answered within 30 s"),
        }
    }
    r.first_ms = times.iter().copied().fold(f64::MAX, f64::min);
    r.all_ms = times.iter().copied().fold(0.0, f64::max);
    let out = BufReader::new(cmd.stdout.take().context("stdout")?);
    let mut pids = Vec::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if v.get("clones").is_some() {
            r.base_ms = v["base_ms"].as_f64().unwrap_or(0.0);
            r.taps_ms = v["taps_ms"].as_f64().unwrap_or(0.0);
            r.spawned_ms = v["spawned_ms"].as_f64().unwrap_or(0.0);
            r.built_ms = v["built_ms"].as_f64().unwrap_or(0.0);
            break;
        }
        pids.push(v["pid"].as_u64().unwrap_or(0) as u32);
        r.build_ms += v["build_ms"].as_f64().unwrap_or(0.0) / f64::from(n);
        r.startup_ms += v["startup_ms"].as_f64().unwrap_or(0.0) / f64::from(n);
    }
    for pid in &pids {
        let p = smaps_kib(*pid, None, &["Rss", "Private_Dirty", "Private_Clean"]);
        let m = smaps_kib(*pid, Some("memory.bin"), &["Rss", "Private_Dirty"]);
        r.rss += p[0] as f64 / f64::from(n);
        r.private += (p[1] + p[2]) as f64 / f64::from(n);
        r.ram_rss += m[0] as f64 / f64::from(n);
        r.ram_private += m[1] as f64 / f64::from(n);
    }
    Ok(r)
}

/// Giving a clone its disk: copying the base's data vs an overlay, for a 256 MiB disk with
/// 64 MiB of data.
fn disk_choice(env: &Env) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let base = env.dir.join("disk-base.img");
    let f = std::fs::File::create(&base)?;
    f.set_len(256 << 20)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for i in 0..64u64 {
        f.write_all_at(&chunk, i * (4 << 20))?;
    }
    f.sync_all()?;
    let copy = env.dir.join("disk-copy.img");
    let t = Instant::now();
    vmm::snapshot::files::make_working_disk(&base, 256 << 20, &copy)?;
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    let delta = env.dir.join("disk.delta");
    let t = Instant::now();
    let o = vmm::devices::virtio::blk::Overlay::new(
        std::fs::File::open(&base)?,
        std::fs::File::create_new(&delta)?,
    )?;
    let overlay_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(o);
    for p in [&base, &copy, &delta] {
        let _ = std::fs::remove_file(p);
    }
    Ok((copy_ms, overlay_ms))
}

/// Runs the benchmark and prints Markdown.
pub fn run(a: ClonesArgs) -> anyhow::Result<()> {
    if !a.guest.is_file() {
        bail!(
            "guest ELF {} not found (scripts/build-guest.sh)",
            a.guest.display()
        );
    }
    let env = Env::new()?;
    let snap = parent_snapshot(&env, &a)?;
    let mut all = Vec::new();
    for &n in &a.counts {
        // The first round makes the base and the taps; the next ones reuse them (`--keep`).
        let mut rounds = Vec::new();
        for _ in 0..a.rounds.max(2) {
            rounds.push(one_round(&env, &snap, n)?);
        }
        all.push((n, rounds));
    }
    println!(
        "Clones of a {} MiB guest (1000 keys); times in ms from the command's start. \
         cold: the first run (base verified, taps created); warm: median of {} more runs \
         (base and taps kept with --keep).\n",
        a.mem_mib,
        a.rounds.max(2) - 1
    );
    println!("| clones | run | first answers | all answer | base ready | taps made | processes spawned | all VMs built | per clone: spawn → main | per clone: build |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, rounds) in &all {
        let row = |label: &str, rs: &[Round]| {
            let med = |f: fn(&Round) -> f64| median(rs.iter().map(f).collect());
            println!(
                "| {n} | {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                med(|r| r.first_ms),
                med(|r| r.all_ms),
                med(|r| r.base_ms),
                med(|r| r.taps_ms),
                med(|r| r.spawned_ms),
                med(|r| r.built_ms),
                med(|r| r.startup_ms),
                med(|r| r.build_ms),
            );
        };
        row("cold", &rounds[..1]);
        row("warm", &rounds[1..]);
    }
    println!(
        "\nMemory per clone (mean over clones, median of the warm runs), guest RAM {} MiB:\n",
        a.mem_mib
    );
    println!("| clones | process RSS | process private (unique) | guest RAM resident | guest RAM private (written) |");
    println!("|---:|---:|---:|---:|---:|");
    for (n, rounds) in &all {
        let med = |f: fn(&Round) -> f64| median(rounds[1..].iter().map(f).collect()) / 1024.0;
        println!(
            "| {n} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB |",
            med(|r| r.rss),
            med(|r| r.private),
            med(|r| r.ram_rss),
            med(|r| r.ram_private),
        );
    }
    let (copy_ms, overlay_ms) = disk_choice(&env)?;
    println!("\nA clone's disk (256 MiB, 64 MiB of data): copy of the data {copy_ms:.1} ms, overlay {overlay_ms:.3} ms.");
    Ok(())
}
