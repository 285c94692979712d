//! `vmatrix clone <image-dir> --clones N`: N clones of one VM image on this host, without a
//! manager (docs/clones.md).
//!
//! The command freezes the image's checkpoint once into a clone base (`base.rs`), then starts
//! every clone as its own `vmatrix clone-vm` process (`vm.rs`) with a new identity
//! (`identity.rs`): generation id, MAC, address, tap, console, control socket and disk delta.
//! All clones map the base's guest memory copy-on-write from the same file, so N clones cost
//! what they write. It prints one JSON line per clone, then a summary line once every clone
//! answers on its KV port, and supervises them until SIGINT/SIGTERM: a clone that dies is
//! reported and the others go on. At the end it stops the clones and removes what it made
//! (deltas, the taps it created, the base) unless `--keep`.

pub mod base;
pub(crate) mod identity;
mod standby;
pub mod vm;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

pub use vm::CloneVmArgs;

/// Flags of `vmatrix clone`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The VM image: a snapshot directory or a backup's replica image (never changed).
    pub image_dir: PathBuf,
    /// How many clones.
    #[arg(long, default_value_t = 1)]
    pub clones: u32,
    /// Address of the first clone (a.b.c.d/len); clone i gets the i-th next one.
    #[arg(long)]
    pub ip: String,
    /// Gateway for the clones (default: the parent's).
    #[arg(long)]
    pub gw: Option<Ipv4Addr>,
    /// Working directory: the base, and per clone its console, control socket and disk delta.
    #[arg(long, default_value = "clones")]
    pub work: PathBuf,
    /// Clone names are <prefix><i>.
    #[arg(long, default_value = "clone")]
    pub name_prefix: String,
    /// Clone i uses tap <tap-prefix><i>.
    #[arg(long, default_value = "vc")]
    pub tap_prefix: String,
    /// Create the taps that do not exist on this bridge (and remove them at the end).
    #[arg(long)]
    pub bridge: Option<String>,
    /// How long to wait for every clone to answer on its KV port (0: do not wait).
    #[arg(long, default_value_t = 10_000)]
    pub ready_timeout_ms: u64,
    /// Keep the work directory and the taps when the clones end.
    #[arg(long)]
    pub keep: bool,
}

/// One clone as the command reports it.
#[derive(Serialize, Debug)]
struct Started {
    name: String,
    pid: u32,
    ip: Ipv4Addr,
    tap: String,
    generation: u64,
    mac: String,
    control: PathBuf,
    console: PathBuf,
    startup_ms: f64,
    build_ms: f64,
}

/// The summary line.
#[derive(Serialize, Debug)]
struct Summary {
    clones: usize,
    /// Base frozen (or verified), ms from the command's start.
    base_ms: f64,
    /// Taps created (`--bridge`).
    taps_ms: f64,
    /// Every clone process started (spawned).
    spawned_ms: f64,
    /// Every clone process built its VM.
    built_ms: f64,
    /// Every clone answered on its KV port (null: not waited for).
    ready_ms: Option<f64>,
    /// The first clone answered.
    first_ready_ms: Option<f64>,
}

struct Running {
    info: Started,
    child: Child,
    delta: PathBuf,
    done: bool,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs the clones until SIGINT/SIGTERM.
pub fn main(a: CloneArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    if a.clones == 0 || a.clones > 1000 {
        bail!("--clones must be 1..=1000");
    }
    let (first_ip, prefix) = identity::parse_cidr(&a.ip).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    let work = std::fs::canonicalize(&a.work)?;
    let base_dir = work.join("base");
    let meta = match base::reuse(&a.image_dir, &base_dir) {
        Some(m) => m,
        None => base::prepare(&a.image_dir, &base_dir)?,
    };
    let base_ms = ms(t0);
    let parent_config = String::from_utf8_lossy(&meta.state.platform.config).into_owned();
    let port = port_of(&parent_config);
    let taps: Vec<String> = (0..a.clones)
        .map(|i| format!("{}{i}", a.tap_prefix))
        .collect();
    let created = match &a.bridge {
        Some(br) => create_taps(&taps, br)?,
        None => Vec::new(),
    };
    let taps_ms = ms(t0);
    let stop = Arc::new(AtomicBool::new(false));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(s, stop.clone()).context("signal handler")?;
    }
    let spawned = spawn_all(
        &a,
        &work,
        &base_dir,
        &taps,
        &parent_config,
        first_ip,
        prefix,
    );
    let spawned = spawned.and_then(|c| {
        let t = ms(t0);
        read_all_built(c, &work).map(|c| (c, t))
    });
    let (mut clones, spawned_ms) = match spawned {
        Ok(c) => c,
        Err(e) => {
            cleanup(&a, &work, &created, &mut []);
            return Err(e);
        }
    };
    let built_ms = ms(t0);
    for c in &clones {
        println!("{}", serde_json::to_string(&c.info)?);
    }
    let (first_ready_ms, ready_ms) = match a.ready_timeout_ms {
        0 => (None, None),
        t => {
            let addrs: Vec<SocketAddr> = clones
                .iter()
                .map(|c| SocketAddr::from((c.info.ip, port)))
                .collect();
            let (first, all) = wait_ready(&addrs, Duration::from_millis(t), &stop, t0);
            if all.is_none() && !stop.load(Ordering::SeqCst) {
                tracing::warn!("not every clone answered within {t} ms");
            }
            (first, all)
        }
    };
    let s = Summary {
        clones: clones.len(),
        base_ms,
        taps_ms,
        spawned_ms,
        built_ms,
        ready_ms,
        first_ready_ms,
    };
    println!("{}", serde_json::to_string(&s)?);
    supervise(&mut clones, &stop);
    cleanup(&a, &work, &created, &mut clones);
    Ok(ExitCode::SUCCESS)
}

/// The KV port of a config string (the guest's default: 7000).
fn port_of(config: &str) -> u16 {
    config
        .split(',')
        .filter_map(|i| i.trim().strip_prefix("port="))
        .find_map(|p| p.parse().ok())
        .unwrap_or(7000)
}

/// Creates the missing taps as ports of `bridge`, up, with one `ip -batch` process; returns
/// the ones it created.
fn create_taps(taps: &[String], bridge: &str) -> anyhow::Result<Vec<String>> {
    let missing: Vec<String> = taps
        .iter()
        .filter(|t| !Path::new("/sys/class/net").join(t).exists())
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let script: String = missing
        .iter()
        .map(|t| format!("tuntap add dev {t} mode tap\nlink set {t} master {bridge} up\n"))
        .collect();
    run_ip_batch(&script).context("creating the clones' taps")?;
    Ok(missing)
}

fn run_ip_batch(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    if let Some(mut i) = ip.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = ip.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One clone to start: what it is told and reported as.
struct Plan {
    info: Started,
    config: String,
    delta: PathBuf,
}

/// How many clone processes are spawned at once.
const SPAWN_AT_ONCE: usize = 4;

/// Starts every clone process, [`SPAWN_AT_ONCE`] at a time: `spawn` returns only once the
/// child has exec'd (~10 ms each here under load: one after the other, 32 clones spent
/// ~370 ms spawning), and all 32 at once did no better on 2 busy cores (measured).
fn spawn_all(
    a: &CloneArgs,
    work: &Path,
    base_dir: &Path,
    taps: &[String],
    parent_config: &str,
    first_ip: Ipv4Addr,
    prefix: u8,
) -> anyhow::Result<Vec<Running>> {
    let exe = std::env::current_exe().context("the vmatrix binary")?;
    let mut plans = Vec::new();
    for (i, tap) in taps.iter().enumerate() {
        let name = format!("{}{i}", a.name_prefix);
        let ip = identity::nth_ip(first_ip, i as u32)
            .ok_or_else(|| anyhow::anyhow!("no address for clone {i} after {first_ip}"))?;
        plans.push(Plan {
            config: identity::config_for(parent_config, ip, prefix, a.gw),
            delta: work.join(format!("{name}.delta")),
            info: Started {
                pid: 0,
                ip,
                tap: tap.clone(),
                generation: identity::random_u64(),
                mac: identity::mac_string(&identity::mac_for(ip)),
                control: work.join(format!("{name}.sock")),
                console: work.join(format!("{name}.log")),
                startup_ms: 0.0,
                build_ms: 0.0,
                name,
            },
        });
    }
    let mut results: Vec<anyhow::Result<Running>> = Vec::new();
    let mut plans = plans.into_iter().peekable();
    while plans.peek().is_some() {
        let batch: Vec<Plan> = plans.by_ref().take(SPAWN_AT_ONCE).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .into_iter()
                .map(|p| {
                    let exe = &exe;
                    s.spawn(move || spawn_one(exe, base_dir, work, p))
                })
                .collect();
            for h in handles {
                results.push(
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("spawning thread panicked"))),
                );
            }
        });
    }
    let mut out = Vec::new();
    let mut failed = None;
    for r in results {
        match r {
            Ok(c) => out.push(c),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        stop_all(&mut out);
        return Err(e);
    }
    Ok(out)
}

/// Starts one `vmatrix clone-vm` process.
fn spawn_one(exe: &Path, base_dir: &Path, work: &Path, p: Plan) -> anyhow::Result<Running> {
    let Plan {
        info,
        config,
        delta,
    } = p;
    let _ = std::fs::remove_file(&delta);
    let stderr = std::fs::File::create(work.join(format!("{}.stderr", info.name)))?;
    let child = Command::new(exe)
        .arg("clone-vm")
        .arg("--base")
        .arg(base_dir)
        .args(["--name", &info.name, "--tap", &info.tap])
        .args(["--guest-config", &config])
        .args(["--generation", &info.generation.to_string()])
        .arg("--delta")
        .arg(&delta)
        .arg("--control")
        .arg(&info.control)
        .arg("--console-log")
        .arg(&info.console)
        .env(vm::SPAWNED_ENV, vm::unix_ns().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting a clone process")?;
    Ok(Running {
        info: Started {
            pid: child.id(),
            ..info
        },
        child,
        delta,
        done: false,
    })
}

/// Reads the line each clone prints once its VM is built (stops them all if one failed).
fn read_all_built(mut out: Vec<Running>, work: &Path) -> anyhow::Result<Vec<Running>> {
    let mut failed = None;
    for r in out.iter_mut() {
        match read_built(&mut r.child) {
            Ok((startup, build)) => {
                r.info.startup_ms = startup;
                r.info.build_ms = build;
            }
            Err(e) => {
                let log = std::fs::read_to_string(work.join(format!("{}.stderr", r.info.name)))
                    .unwrap_or_default();
                r.done = matches!(r.child.try_wait(), Ok(Some(_)));
                failed.get_or_insert(anyhow::anyhow!(
                    "clone {}: {e}: {}",
                    r.info.name,
                    log.trim()
                ));
            }
        }
    }
    if let Some(e) = failed {
        stop_all(&mut out);
        return Err(e);
    }
    Ok(out)
}

/// Reads the clone's "built" line; its start-up and build times.
fn read_built(child: &mut Child) -> anyhow::Result<(f64, f64)> {
    let Some(stdout) = child.stdout.take() else {
        bail!("no stdout");
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.is_empty() {
        let st = child.wait()?;
        bail!("exited ({st}) before its VM was built");
    }
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("unexpected output {line:?}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok((f("startup_ms"), f("build_ms")))
}

/// Waits until every address accepts a TCP connection; (first, all) in ms since `t0`.
fn wait_ready(
    addrs: &[SocketAddr],
    limit: Duration,
    stop: &AtomicBool,
    t0: Instant,
) -> (Option<f64>, Option<f64>) {
    let until = Instant::now() + limit;
    let mut ready = vec![false; addrs.len()];
    let mut first = None;
    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
        for (i, a) in addrs.iter().enumerate() {
            if !ready[i] && TcpStream::connect_timeout(a, Duration::from_millis(10)).is_ok() {
                ready[i] = true;
                first.get_or_insert_with(|| ms(t0));
            }
        }
        if ready.iter().all(|&r| r) {
            return (first, Some(ms(t0)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (first, None)
}

/// Until SIGINT/SIGTERM: reports clones that end; the others go on.
fn supervise(clones: &mut [Running], stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        for c in clones.iter_mut().filter(|c| !c.done) {
            if let Ok(Some(st)) = c.child.try_wait() {
                c.done = true;
                // A clone killed -9 could not remove its delta.
                let _ = std::fs::remove_file(&c.delta);
                eprintln!(
                    "vmatrix clone: {} (pid {}) ended: {st}",
                    c.info.name, c.info.pid
                );
            }
        }
        if clones.iter().all(|c| c.done) {
            eprintln!("vmatrix clone: every clone ended");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to every clone still running, then waits for them (SIGKILL after 5 s).
fn stop_all(clones: &mut [Running]) {
    for c in clones.iter().filter(|c| !c.done) {
        if let Some(pid) = rustix::process::Pid::from_raw(c.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    for c in clones.iter_mut().filter(|c| !c.done) {
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= until => {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        c.done = true;
    }
}

/// Stops the clones and removes what the command made (unless `--keep`).
fn cleanup(a: &CloneArgs, work: &Path, created: &[String], clones: &mut [Running]) {
    stop_all(clones);
    for c in clones.iter() {
        let _ = std::fs::remove_file(&c.delta);
    }
    if a.keep {
        return;
    }
    if !created.is_empty() {
        let script: String = created.iter().map(|t| format!("link del {t}\n")).collect();
        if let Err(e) = run_ip_batch(&script) {
            tracing::warn!("removing the clones' taps: {e}");
        }
    }
    // Only what this command made: the base (its own copies, never the image's files) and
    // each clone's files.
    let _ = std::fs::remove_dir_all(work.join("base"));
    for c in clones.iter() {
        for ext in ["log", "stderr", "sock"] {
            let _ = std::fs::remove_file(work.join(format!("{}.{ext}", c.info.name)));
        }
    }
}
