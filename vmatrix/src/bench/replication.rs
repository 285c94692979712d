//! `vmatrix bench replication`: the figures of docs/BENCHMARKS.md's replication section, all
//! from one run so ratios are meaningful on a shared, noisy machine:
//! - raw quinn throughput on loopback (the link's capacity);
//! - pause per checkpoint (p50/p99/max), epochs/s, checkpoint bandwidth and its share of raw
//!   quinn, for the idle guest and CHURN at 1k, 10k and 50k pages/s;
//! - epochs per second at 1 ms epochs, idle and under KV writes;
//! - KV throughput and latency, unprotected vs protected, closed-loop and pipelined clients;
//!   and, to separate the capture's cost from the replication's, the unprotected VM with
//!   captures alone (no network, no backup) at the rates early checkpoints reach.
//!
//! Prints Markdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::harness::{BenchEnv, Kv, Protection, RunningVm};

/// How long each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub settle: Duration,
    pub measure: Duration,
    pub probe_bytes: u64,
    pub kv_ops: usize,
}

impl Timing {
    pub fn full() -> Self {
        Timing {
            settle: Duration::from_secs(1),
            measure: Duration::from_secs(4),
            probe_bytes: 256 << 20,
            kv_ops: 300,
        }
    }
    pub fn quick() -> Self {
        Timing {
            settle: Duration::from_millis(300),
            measure: Duration::from_millis(700),
            probe_bytes: 32 << 20,
            kv_ops: 30,
        }
    }
}

pub(super) fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// `clients` connections doing `ops` SETs each: (ops/s, p50, p99).
pub(super) fn kv_load(
    addr: SocketAddr,
    clients: usize,
    ops: usize,
) -> anyhow::Result<(f64, Duration, Duration)> {
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut kv = Kv::connect(addr, Duration::from_secs(10))?;
                (0..ops)
                    .map(|i| {
                        let t = Instant::now();
                        let r = kv.cmd(&format!("SET c{c}k{} v{i}", i % 32))?;
                        anyhow::ensure!(r == "OK", "SET answered {r}");
                        Ok(t.elapsed())
                    })
                    .collect()
            })
        })
        .collect();
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a KV client panicked"))??,
        );
    }
    let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
    lat.sort();
    Ok((rate, pct(&lat, 0.5), pct(&lat, 0.99)))
}

/// `clients` connections each keeping `depth` SETs in flight until `ops` are answered: ops/s.
fn kv_pipelined(addr: SocketAddr, clients: usize, depth: usize, ops: usize) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut kv = Kv::connect(addr, Duration::from_secs(10))?;
                let (mut sent, mut done) = (0, 0);
                while done < ops {
                    while sent < ops && sent - done < depth {
                        kv.send(&format!("SET p{c}k{} v{sent}", sent % 32))?;
                        sent += 1;
                    }
                    let r = kv.recv()?;
                    anyhow::ensure!(r == "OK", "SET answered {r}");
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut n = 0;
    for w in workers {
        n += w
            .join()
            .map_err(|_| anyhow::anyhow!("a KV client panicked"))??;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Runs `load` while another thread captures an epoch of `vm` every `period` (captures are
/// thrown away); returns the load's result, the number of captures and their mean pause (µs).
fn with_captures<T>(
    vm: &RunningVm,
    period: Duration,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64, u128)> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (v, st) = (vm.vm.clone(), stop.clone());
    let h = std::thread::spawn(move || {
        let (mut n, mut total) = (0u64, 0u128);
        while !st.load(Ordering::Relaxed) {
            if let Ok(c) = v.capture_epoch(vmm::CaptureKind::Incremental) {
                n += 1;
                total += c.pause.as_micros();
            }
            std::thread::sleep(period);
        }
        (n, total / u128::from(n.max(1)))
    });
    let r = load();
    stop.store(true, Ordering::Relaxed);
    let (n, mean) = h
        .join()
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?;
    Ok((r?, n, mean))
}

/// Counters at one moment.
struct Snap {
    at: Instant,
    epochs: u64,
    pages: u64,
    bytes: u64,
}

fn snap(s: &primary::Stats) -> Snap {
    Snap {
        at: Instant::now(),
        epochs: s.epochs.load(Ordering::Relaxed),
        pages: s.pages.load(Ordering::Relaxed),
        bytes: s.bytes.load(Ordering::Relaxed),
    }
}

/// Starts a measurement window: pause percentiles and the maximum cover only what follows.
pub(super) fn reset_pauses(s: &primary::Stats) {
    s.max_pause_us.store(0, Ordering::Relaxed);
    if let Ok(mut r) = s.recent_pauses.lock() {
        r.clear();
    }
}

pub(super) fn wait_protected(s: &primary::Stats) -> anyhow::Result<()> {
    let t = Instant::now();
    while !s.protected.load(Ordering::Relaxed) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the initial sync was not acknowledged within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs the whole benchmark and prints it.
pub fn run(env: &BenchEnv, t: Timing) -> anyhow::Result<()> {
    let quinn = raw_quinn(env, &t)?;
    pauses_under_churn(env, &t, quinn)?;
    epoch_rate_fast(env, &t)?;
    kv_protected_vs_unprotected(env, &t)
}

/// Prints the title and the raw quinn throughput of this run (bytes/s), the yardstick of the
/// checkpoint bandwidth.
fn raw_quinn(env: &BenchEnv, t: &Timing) -> anyhow::Result<f64> {
    println!(
        "## Continuous replication (`vmatrix bench replication`; primary, backup and clients on this machine, QUIC over loopback, {} MiB guest)\n",
        env.mem_mib
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let quinn = rt.block_on(transport::probe::raw_quinn_throughput(
        &env.identity("backup")?,
        "backup",
        &env.identity("primary")?,
        t.probe_bytes,
    ))?;
    drop(rt);
    println!(
        "Raw quinn on loopback, same run: {:.0} MB/s (one stream, mutual TLS).\n",
        quinn / 1e6
    );

    Ok(quinn)
}

/// Pauses and bandwidth under CHURN, fixed 20 ms epochs.
fn pauses_under_churn(env: &BenchEnv, t: &Timing, quinn: f64) -> anyhow::Result<()> {
    let vm = RunningVm::protected(
        env,
        "churn",
        Protection {
            min_epoch_us: 20_000,
            early_checkpoints: false,
            ..Protection::default()
        },
    )?;
    let stats = vm.stats.clone().context("protected VM without stats")?;
    let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(30))?;
    wait_protected(&stats)?;
    println!("### Pause per checkpoint, epoch rate and bandwidth (20 ms epochs)\n");
    println!("| workload | pause p50 | pause p99 | pause max | checkpoints/s | changed pages sent/s | checkpoint data | share of raw quinn | ack latency (last) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, churn) in [
        ("idle", "CHURN 0 0"),
        ("CHURN 1k pages/s", "CHURN 2048 1"),
        ("CHURN 10k pages/s", "CHURN 2048 10"),
        ("CHURN 50k pages/s", "CHURN 2048 50"),
    ] {
        anyhow::ensure!(kv.cmd(churn)? == "OK", "{churn} refused");
        std::thread::sleep(t.settle);
        reset_pauses(&stats);
        let a = snap(&stats);
        std::thread::sleep(t.measure);
        let b = snap(&stats);
        let secs = (b.at - a.at).as_secs_f64();
        let (p50, p99) = stats.pause_percentiles();
        let bw = (b.bytes - a.bytes) as f64 / secs;
        println!(
            "| {name} | {p50} µs | {p99} µs | {} µs | {:.0} | {:.0} | {:.2} MB/s | {:.2} % | {} µs |",
            stats.max_pause_us.load(Ordering::Relaxed),
            (b.epochs - a.epochs) as f64 / secs,
            (b.pages - a.pages) as f64 / secs,
            bw / 1e6,
            100.0 * bw / quinn,
            stats.ack_latency_us.load(Ordering::Relaxed),
        );
    }
    kv.cmd("CHURN 0 0")?;
    drop(kv);
    drop(vm);

    Ok(())
}

/// Epoch length of the epoch-rate measurement: 0.3 ms, so the rate is bounded by the pause
/// path and the sender, not by the epoch (Stratus' figure is ~2,500 checkpoints per second).
const EPOCH_US: u64 = 300;

/// Epoch rate at [`EPOCH_US`] epochs, idle and under KV writes.
fn epoch_rate_fast(env: &BenchEnv, t: &Timing) -> anyhow::Result<()> {
    let vm = RunningVm::protected(
        env,
        "fast",
        Protection {
            epoch_us: EPOCH_US,
            min_epoch_us: EPOCH_US,
            max_output_delay_ms: 1,
            early_checkpoints: false,
            rt_pause: vmm::rt::RtMode::Off,
            ..Protection::default()
        },
    )?;
    let stats = vm.stats.clone().context("protected VM without stats")?;
    drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
    wait_protected(&stats)?;
    std::thread::sleep(t.settle);
    reset_pauses(&stats);
    let a = snap(&stats);
    std::thread::sleep(t.measure);
    let b = snap(&stats);
    let idle = (b.epochs - a.epochs) as f64 / (b.at - a.at).as_secs_f64();
    let (ip50, ip99) = stats.pause_percentiles();
    reset_pauses(&stats);
    let a = snap(&stats);
    let (rate, _, _) = kv_load(env.guest_addr(), 4, t.kv_ops)?;
    let b = snap(&stats);
    let loaded = (b.epochs - a.epochs) as f64 / (b.at - a.at).as_secs_f64();
    let (lp50, lp99) = stats.pause_percentiles();
    drop(vm);
    println!(
        "\n### Epoch rate at {} ms epochs\n",
        EPOCH_US as f64 / 1000.0
    );
    println!("| load | checkpoints/s | pause p50 | pause p99 |\n|---|---|---|---|");
    println!("| idle guest | {idle:.0} | {ip50} µs | {ip99} µs |");
    println!("| 4 KV clients writing ({rate:.0} SETs/s) | {loaded:.0} | {lp50} µs | {lp99} µs |");

    Ok(())
}

/// One pipelined run: its label, SETs/s and what replication did meanwhile.
type Pipelined = (String, f64, String);

/// KV service, protected vs unprotected, same run: closed-loop and pipelined clients.
fn kv_protected_vs_unprotected(env: &BenchEnv, t: &Timing) -> anyhow::Result<()> {
    println!("\n### KV service, protected vs unprotected (same run)\n");
    println!("| setup | clients | SETs/s | p50 | p99 | throughput vs unprotected |\n|---|---|---|---|---|---|");
    let loads = [(1usize, t.kv_ops), (16, t.kv_ops / 3 + 1)];
    let mut base = Vec::new();
    let depth = 32;
    let mut pipelined = Vec::new();
    {
        let vm = RunningVm::plain(env, "plain")?;
        drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
        for (c, ops) in loads {
            let (r, p50, p99) = kv_load(env.guest_addr(), c, ops)?;
            println!(
                "| unprotected | {c} | {r:.0} | {} | {} | 1.00× |",
                ms(p50),
                ms(p99)
            );
            base.push(r);
        }
        let r = kv_pipelined(env.guest_addr(), 16, depth, t.kv_ops * 4)?;
        pipelined.push(("unprotected".to_string(), r, "-".to_string()));
        // The capture alone (pause, state, dirty pages; no network, no backup) at the rates
        // early checkpoints reach: separates its cost from the cost of replicating.
        for period in [2500u64, 1000] {
            let (r, n, mean) = with_captures(&vm, Duration::from_micros(period), || {
                kv_pipelined(env.guest_addr(), 16, depth, t.kv_ops * 4)
            })?;
            pipelined.push((
                format!("unprotected + capture only, every {period} µs"),
                r,
                format!("{n} captures, mean pause {mean} µs"),
            ));
        }
        drop(vm);
    }
    protected_kv(env, t, (&loads, &base), depth, &mut pipelined)?;
    println!("\n16 clients, each keeping {depth} SETs in flight (pipelined):\n");
    println!("| setup | SETs/s | throughput vs unprotected | replication during the run |\n|---|---|---|---|");
    let unprotected = pipelined.first().map_or(1.0, |p| p.1);
    for (label, r, detail) in &pipelined {
        println!("| {label} | {r:.0} | {:.2}× | {detail} |", r / unprotected);
    }
    Ok(())
}

/// The protected half of [`kv_protected_vs_unprotected`]: closed loop against `base` (the
/// unprotected SETs/s of each load), then pipelined (pushed to `pipelined`).
fn protected_kv(
    env: &BenchEnv,
    t: &Timing,
    (loads, base): (&[(usize, usize)], &[f64]),
    depth: usize,
    pipelined: &mut Vec<Pipelined>,
) -> anyhow::Result<()> {
    for (label, early) in [
        ("protected, fixed 20 ms epochs", false),
        ("protected (default: early checkpoints)", true),
    ] {
        let vm = RunningVm::protected(
            env,
            if early { "early" } else { "kv" },
            Protection {
                early_checkpoints: early,
                ..Protection::default()
            },
        )?;
        let stats = vm.stats.clone().context("protected VM without stats")?;
        drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
        wait_protected(&stats)?;
        for (i, &(c, ops)) in loads.iter().enumerate() {
            let (r, p50, p99) = kv_load(env.guest_addr(), c, ops)?;
            println!(
                "| {label} | {c} | {r:.0} | {} | {} | {:.2}× |",
                ms(p50),
                ms(p99),
                r / base[i]
            );
        }
        reset_pauses(&stats);
        let a = snap(&stats);
        let r = kv_pipelined(env.guest_addr(), 16, depth, t.kv_ops * 4)?;
        let b = snap(&stats);
        let (p50, p99) = stats.pause_percentiles();
        let secs = (b.at - a.at).as_secs_f64();
        let detail = format!(
            "{:.0} checkpoints/s, {:.0} pages each, pause p50 {p50} µs / p99 {p99} µs, ack {} µs",
            (b.epochs - a.epochs) as f64 / secs,
            (b.pages - a.pages) as f64 / (b.epochs - a.epochs).max(1) as f64,
            stats.ack_latency_us.load(Ordering::Relaxed)
        );
        pipelined.push((label.to_string(), r, detail));
        drop(vm);
    }
    Ok(())
}
