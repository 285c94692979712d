//! `vmatrix bench replication --kv`: the KV service's closed-loop clients, unprotected vs
//! protected (default settings), alternating for `--rounds`, and where the latency output
//! commit adds to a reply goes (`primary::reply_path`): the loop's wake-up after the guest's
//! first held frame, the capture, encoding and hand-over to QUIC, the wait for the backup's
//! acknowledgement, and the release. Prints Markdown.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;

use super::harness::{BenchEnv, Kv, Protection, RunningVm};
use super::replication::{kv_load, ms, wait_protected, Timing};
use vmm::rt::RtMode;

/// One round's figures: (1-client p50, 16-client SETs/s) unprotected and protected, and the
/// protected one-client run's reply path (stage means).
struct Round {
    plain: (Duration, f64),
    protected: (Duration, f64),
    path: Option<[Duration; 5]>,
    counted: u64,
    /// Checkpoints per second during the 16-client run.
    cps: f64,
    /// Mean time on the backup from a complete checkpoint to its acknowledgement (journal).
    durable: Duration,
    /// Pauses at guest output during the one-client run: taken, adopted, expired.
    at_output: [u64; 3],
}

/// Runs `rounds` rounds and prints the tables.
pub fn run(
    env: &BenchEnv,
    t: &Timing,
    rounds: usize,
    (rt, busy): (RtMode, usize),
) -> anyhow::Result<()> {
    let one = t.kv_ops;
    // 16 × 600 SETs: about a second protected (16 × 101 was ~0.2 s, too short to be more
    // than a rough figure on a shared host).
    let sixteen = t.kv_ops * 2;
    println!("\n### KV service: one client's added latency, where it goes, and 16 clients\n");
    let mut changed = Vec::new();
    if rt != RtMode::Auto {
        changed.push(format!("`--rt-pause {}`", rt.name()));
    }
    if Protection::default().dirty_ring {
        changed.push("`--dirty-source ring`".to_string());
    }
    if Protection::default().backup_rt {
        changed.push("a real-time backup (`--rt-apply`)".to_string());
    }
    if busy > 0 {
        changed.push(format!("{busy} CPU-bound neighbours running throughout"));
    }
    let settings = match changed.is_empty() {
        true => "default settings".to_string(),
        false => format!("default settings but {}", changed.join(" and ")),
    };
    println!("{rounds} rounds, unprotected then protected ({settings}); one client does {one} closed-loop SETs, 16 clients {sixteen} each.\n");
    let mut all = Vec::new();
    for _ in 0..rounds {
        let plain = {
            let _vm = RunningVm::plain(env, "plain")?;
            drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
            let (_, p50, _) = kv_load(env.guest_addr(), 1, one)?;
            let (r16, _, _) = kv_load(env.guest_addr(), 16, sixteen)?;
            (p50, r16)
        };
        let p = Protection {
            rt_pause: rt,
            ..Protection::default()
        };
        let vm = RunningVm::protected(env, "reply", p)?;
        let stats = vm.stats.clone().context("protected VM without stats")?;
        drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
        wait_protected(&stats)?;
        let before = stats.reply_path.snapshot();
        let bs = vm
            .backup_stats
            .clone()
            .context("protected VM without backup stats")?;
        let durable_sum = |bs: &backup::BackupStats| {
            (bs.durable_ns.0.load(Relaxed), bs.durable_ns.1.load(Relaxed))
        };
        let b0 = durable_sum(&bs);
        let o0 = vm.vm.output_pauses();
        let (_, p50, _) = kv_load(env.guest_addr(), 1, one)?;
        let o1 = vm.vm.output_pauses();
        let at_output = [
            o1.taken - o0.taken,
            o1.adopted - o0.adopted,
            o1.expired - o0.expired,
        ];
        let path = stats.reply_path.means(before);
        let b1 = durable_sum(&bs);
        let durable = Duration::from_nanos((b1.0 - b0.0) / (b1.1 - b0.1).max(1));
        let counted = stats.reply_path.count() - before.1;
        let e0 = (stats.epochs.load(Relaxed), std::time::Instant::now());
        let (r16, _, _) = kv_load(env.guest_addr(), 16, sixteen)?;
        let cps = (stats.epochs.load(Relaxed) - e0.0) as f64 / e0.1.elapsed().as_secs_f64();
        drop(vm);
        all.push(Round {
            plain,
            protected: (p50, r16),
            path,
            counted,
            durable,
            cps,
            at_output,
        });
    }
    print_rounds(&all);
    Ok(())
}

/// `--kv-hold N`: one 16-client phase of `n` SETs per client, protected (with `protection`) or
/// not, announced on stderr when it starts (with the process id) so a profiler can attach, and
/// its figures after.
pub fn hold(env: &BenchEnv, n: usize, protection: Option<Protection>) -> anyhow::Result<()> {
    let protected = protection.is_some();
    let vm = match protection {
        Some(p) => RunningVm::protected(env, "hold", p)?,
        None => RunningVm::plain(env, "hold")?,
    };
    drop(Kv::connect(env.guest_addr(), Duration::from_secs(30))?);
    if let Some(stats) = &vm.stats {
        wait_protected(stats)?;
    }
    let before = vm.stats.as_ref().map(|s| s.reply_path.snapshot());
    let e0 = vm.stats.as_ref().map_or(0, |s| s.epochs.load(Relaxed));
    let pages0 = vm.stats.as_ref().map_or(0, |s| s.pages.load(Relaxed));
    eprintln!("16 clients start (pid {})", std::process::id());
    let o0 = vm.vm.output_pauses();
    let t0 = std::time::Instant::now();
    let (r16, p50, p99) = kv_load(env.guest_addr(), 16, n)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "16 clients × {n} SETs, {}: {r16:.0} SETs/s, p50 {}, p99 {}, {secs:.2} s",
        if protected {
            "protected"
        } else {
            "unprotected"
        },
        ms(p50),
        ms(p99)
    );
    if let (Some(stats), Some(before)) = (&vm.stats, before) {
        let epochs = (stats.epochs.load(Relaxed) - e0).max(1);
        let cps = epochs as f64 / secs;
        let pages = (stats.pages.load(Relaxed) - pages0) as f64 / epochs as f64;
        println!(
            "checkpoints/s {cps:.0} ({:.1} SETs, {pages:.0} pages each)",
            r16 / cps.max(1.0)
        );
        if let Some(p) = stats.reply_path.means(before) {
            let stages = primary::reply_path::STAGES.iter().zip(p.iter());
            let cells: Vec<String> = stages.map(|(n, &d)| format!("{n} {}", us(d))).collect();
            println!("stage means under this load: {}", cells.join(", "));
        }
        let (boosted, episodes) = vm.vm.rt_counts();
        println!("pauses at real-time priority: {boosted} (turned on {episodes} times)");
        let o1 = vm.vm.output_pauses();
        println!(
            "pauses at output: {} taken, {} adopted, {} expired; captures with the parked state: {}",
            o1.taken - o0.taken,
            o1.adopted - o0.adopted,
            o1.expired - o0.expired,
            o1.state_reads - o0.state_reads,
        );
    }
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

fn print_rounds(all: &[Round]) {
    println!("| round | 1 client p50, unprotected → protected | added | 16 clients SETs/s, unprotected → protected | ratio | checkpoints/s (SETs each) |");
    println!("|---|---|---|---|---|---|");
    for (i, r) in all.iter().enumerate() {
        let added = r.protected.0.as_secs_f64() - r.plain.0.as_secs_f64();
        println!(
            "| {} | {} → {} | {:+.2} ms | {:.0} → {:.0} | {:.2}× | {:.0} ({:.1}) |",
            i + 1,
            ms(r.plain.0),
            ms(r.protected.0),
            added * 1e3,
            r.plain.1,
            r.protected.1,
            r.protected.1 / r.plain.1.max(1.0),
            r.cps,
            r.protected.1 / r.cps.max(1.0)
        );
    }
    println!("\nWhere a protected reply's extra time goes (means over the one-client run's checkpoints that released output, each alone in flight):\n");
    let head = primary::reply_path::STAGES.join(" | ");
    println!("| round | checkpoints | {head} | sum | of ack: backup's journal | pauses at output: taken / adopted / expired |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in all.iter().enumerate() {
        let Some(p) = r.path else {
            println!("| {} | 0 | - | - | - | - | - | - | - | - |", i + 1);
            continue;
        };
        let cells: Vec<String> = p.iter().map(|&d| us(d)).collect();
        let [t, a, e] = r.at_output;
        println!(
            "| {} | {} | {} | {} | {} | {t} / {a} / {e} |",
            i + 1,
            r.counted,
            cells.join(" | "),
            us(p.iter().sum()),
            us(r.durable)
        );
    }
}
