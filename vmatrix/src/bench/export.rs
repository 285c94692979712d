//! `vmatrix bench export`: what a clone base costs the protected service, made either way —
//! the backup exporting its committed checkpoint while it keeps applying (`backup::export`) or
//! the primary taking a full snapshot (one capture pause) — against no base being made, in the
//! same run. A protected VM (primary and backup in this process, loopback QUIC) has `--fill-mib`
//! of its RAM written first and then dirties pages in the background (CHURN) while one client
//! measures `SET` latency (each answer waits for its checkpoint's acknowledgement: output
//! commit); the three phases are interleaved, `--rounds` times each, so a noisy host weighs on
//! all of them alike.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::harness::{BenchEnv, Kv, Protection, RunningVm};

/// `vmatrix bench export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Flags shared by the benchmarks (`--guest`, `--mem-mib`, `--quick`).
    #[command(flatten)]
    pub common: super::BenchArgs,
    /// Guest RAM written before measuring (what a base has to copy), MiB.
    #[arg(long, default_value_t = 128)]
    pub fill_mib: u64,
    /// Background page dirtying while measuring, pages per ms (CHURN).
    #[arg(long, default_value_t = 10)]
    pub churn: u64,
    /// Rounds of the three phases.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Pause between two bases, ms (0: back to back, the worst case; an agent refreshes a
    /// base every 60 s).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

/// What makes bases during a phase.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Maker {
    None,
    Export,
    Snapshot,
}

/// One base made: total time, and how long the service was held (the apply loop for an
/// export, the guest for a snapshot), µs; bytes written.
struct Made {
    total: Duration,
    held_us: u64,
    bytes: u64,
}

/// A phase's figures.
#[derive(Default)]
struct Phase {
    lat: Vec<Duration>,
    made: Vec<Made>,
    secs: f64,
}

fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Makes bases back to back into `dir` until `stop` (each removed once made).
fn make_bases(
    vm: &RunningVm,
    maker: Maker,
    dir: &Path,
    stop: &AtomicBool,
    interval: Duration,
) -> Vec<Made> {
    let mut made = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) && maker != Maker::None {
        if n > 0 {
            std::thread::sleep(interval);
        }
        n += 1;
        let d = dir.join(format!("base-{n}"));
        let t0 = Instant::now();
        let m = match (maker, &vm.exports) {
            (Maker::Export, Some(x)) => {
                x.export(d.clone(), Duration::from_secs(60)).map(|e| Made {
                    total: t0.elapsed(),
                    held_us: e.held_us,
                    bytes: e.bytes,
                })
            }
            _ => {
                let s = vm.vm.snapshot(&d, vmm::SnapshotKind::Full);
                s.map(|s| Made {
                    total: t0.elapsed(),
                    held_us: s.pause.as_micros() as u64,
                    bytes: s.pages * 4096,
                })
                .map_err(|e| backup::BackupError::Apply(e.to_string()))
            }
        };
        let _ = std::fs::remove_dir_all(&d);
        match m {
            Ok(m) => made.push(m),
            Err(e) => eprintln!("{maker:?}: {e}"),
        }
    }
    made
}

/// One phase: `secs` of closed-loop SETs while `maker` makes bases.
fn phase(
    vm: &RunningVm,
    env: &BenchEnv,
    maker: Maker,
    secs: f64,
    interval: Duration,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let dir = env.dir.join("bases");
    std::fs::create_dir_all(&dir)?;
    let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(10))?;
    let (made, lat) = std::thread::scope(|s| -> anyhow::Result<_> {
        let maker_t = s.spawn(|| make_bases(vm, maker, &dir, &stop, interval));
        let t0 = Instant::now();
        let mut lat = Vec::new();
        let mut i = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            let r = kv.cmd(&format!("SET k{} v{i}", i % 64))?;
            anyhow::ensure!(r == "OK", "SET answered {r}");
            lat.push(t.elapsed());
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let made = maker_t
            .join()
            .map_err(|_| anyhow::anyhow!("the base maker panicked"))?;
        Ok((made, lat))
    })?;
    Ok(Phase { lat, made, secs })
}

/// Runs the benchmark and prints its tables.
pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let env = BenchEnv::new(a.common.guest.clone(), a.common.mem_mib)?;
    let vm = RunningVm::protected(&env, "export", Protection::default())?;
    if let Some(s) = &vm.stats {
        super::replication::wait_protected(s)?;
    }
    let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(10))?;
    // Write `fill` MiB of guest RAM once (CHURN over that many pages at 1,000 pages/ms).
    let pages = a.fill_mib * 256;
    kv.cmd(&format!("CHURN {pages} 1000"))?;
    std::thread::sleep(Duration::from_millis(pages / 1000 + 500));
    // The fill's checkpoints (up to all of it at once) reach the backup before anything is
    // measured; then the background dirtying starts, and a phase runs unmeasured.
    kv.cmd("CHURN 0 0")?;
    std::thread::sleep(Duration::from_secs(2));
    kv.cmd(&format!("CHURN 2048 {}", a.churn))?;
    let secs = if a.common.quick { 1.0 } else { 4.0 };
    phase(&vm, &env, Maker::None, 1.0, Duration::ZERO)?;
    let mut all = [Phase::default(), Phase::default(), Phase::default()];
    let makers = [Maker::None, Maker::Export, Maker::Snapshot];
    for _ in 0..a.rounds.max(1) {
        for (i, m) in makers.iter().enumerate() {
            let p = phase(&vm, &env, *m, secs, Duration::from_millis(a.interval_ms))?;
            all[i].lat.extend(p.lat);
            all[i].made.extend(p.made);
            all[i].secs += p.secs;
        }
    }
    kv.cmd("CHURN 0 0")?;
    print(&a, &mut all);
    Ok(())
}

fn print(a: &ExportArgs, all: &mut [Phase; 3]) {
    println!(
        "\n**Clone bases beside a protected VM** ({} MiB guest, {} MiB written, CHURN {} \
         pages/ms in the background, a base every {} ms after the last, {} rounds of each \
         phase, interleaved)\n",
        a.common.mem_mib, a.fill_mib, a.churn, a.interval_ms, a.rounds
    );
    println!("| bases made by | SETs/s | SET p50 | SET p99 | SET max | bases | base total p50 | held p50 | held max | copied per base |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let base_rate = all[0].lat.len() as f64 / all[0].secs.max(1e-9);
    for (name, p) in [
        "nothing (baseline)",
        "the backup (export)",
        "the primary (snapshot)",
    ]
    .iter()
    .zip(all.iter_mut())
    {
        p.lat.sort();
        let rate = p.lat.len() as f64 / p.secs.max(1e-9);
        let mut totals: Vec<Duration> = p.made.iter().map(|m| m.total).collect();
        totals.sort();
        let mut held: Vec<u64> = p.made.iter().map(|m| m.held_us).collect();
        held.sort();
        let bytes = p.made.iter().map(|m| m.bytes).sum::<u64>() / p.made.len().max(1) as u64;
        println!(
            "| {name} | {rate:.0} ({:.2}×) | {} | {} | {} | {} | {} | {} µs | {} µs | {:.0} MiB |",
            rate / base_rate.max(1e-9),
            ms(pct(&p.lat, 0.5)),
            ms(pct(&p.lat, 0.99)),
            ms(p.lat.last().copied().unwrap_or_default()),
            p.made.len(),
            ms(pct(&totals, 0.5)),
            pct(&held, 0.5),
            held.last().copied().unwrap_or_default(),
            bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "\n\"held\": for an export, how long the backup's apply loop waited for its final \
         step (the primary's next acknowledgement waits that long; its guest runs on); for a \
         snapshot, the guest's pause."
    );
}
