//! `vmatrix bench replication --busy N`: checkpoint pauses on a busy host (issue 12). N
//! CPU-bound neighbours (shell busy loops, separate processes, as other tenants' work would
//! be) run for the whole measurement; a protected VM (primary and backup in this process over
//! loopback QUIC, fixed 20 ms epochs) is measured idle and under CHURN, with the pause path at
//! ordinary priority (`--rt-pause off`), at real-time priority (`on`), real-time once pauses
//! are seen waiting for the scheduler (`auto`, the default; `Vm::set_rt_pause`), and real-time
//! with the vCPU and the replication loop pinned to CPUs of their own (`Vm::pin_vcpu`,
//! `--loop-cpus`), alternating, several rounds: the same host, the same minutes, the same
//! neighbours.
//!
//! `--dirty-sources`: the harvest from KVM's bitmap (with hot pages) against KVM's dirty ring,
//! alternating, idle and under CHURN (up to 1,000 pages per epoch), on a quiet host or beside
//! `--busy N` neighbours, with the default pause path (`--rt-pause auto`).
//!
//! Both print each round's rows, then every round's pauses pooled per pause path (or source)
//! and workload (`bench/pauses.rs`): a row's p99 is the 3rd-highest of its ~200 pauses, the
//! pooled one rests on all rounds'. The conditions' order rotates from round to round.

use std::process::{Child, Command, Stdio};

use anyhow::Context;

use super::harness::{BenchEnv, Kv, Protection, RunningVm};
use super::pauses::{collect, quantile, Pool};
use super::replication::{wait_protected, Timing};

/// CPU-bound neighbours, killed on drop.
pub(super) struct Hogs(Vec<Child>);

impl Hogs {
    pub(super) fn start(n: usize) -> anyhow::Result<Hogs> {
        let mut v = Vec::new();
        for _ in 0..n {
            let c = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a CPU-bound neighbour (sh)")?;
            v.push(c);
        }
        Ok(Hogs(v))
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A second protected VM on the host (its own tap; primary and backup in this process),
/// its guest dirtying 1,000 pages per second, for the whole measurement.
struct SecondVm {
    _vm: RunningVm,
    _env: BenchEnv,
}

impl SecondVm {
    fn start(guest: &std::path::Path, mem_mib: u64) -> anyhow::Result<SecondVm> {
        let env = BenchEnv::new(guest.to_path_buf(), mem_mib)?;
        // (Its pauses on the default path: two pause paths compete.)
        let p = Protection::default();
        let vm = RunningVm::protected(&env, "second", p)?;
        let stats = vm.stats.clone().context("protected VM without stats")?;
        let mut kv = Kv::connect(env.guest_addr(), std::time::Duration::from_secs(30))?;
        wait_protected(&stats)?;
        anyhow::ensure!(
            kv.cmd("CHURN 2048 1")? == "OK",
            "the second VM refused CHURN"
        );
        Ok(SecondVm { _vm: vm, _env: env })
    }
}

/// Runs the busy-host pause A/B and prints a Markdown table; `second`: a second protected VM
/// runs beside the measured one.
pub fn run(
    env: &BenchEnv,
    t: &Timing,
    busy: usize,
    rounds: usize,
    second: bool,
) -> anyhow::Result<()> {
    let also = if second {
        " and a second protected VM (CHURN 1k pages/s)"
    } else {
        ""
    };
    println!(
        "## Pauses on a busy host (`vmatrix bench replication --busy {busy}{}`; {} MiB guest, 20 \
         ms epochs, {busy} CPU-bound neighbours{also} on this {}-CPU host)\n",
        if second { " --second-vm" } else { "" },
        env.mem_mib,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _second = match second {
        true => Some(SecondVm::start(&env.guest, env.mem_mib)?),
        false => None,
    };
    println!(
        "| round | pause path | workload | pause p50 | pause p99 | pause max | checkpoints/s |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|");
    let _hogs = Hogs::start(busy)?;
    let paths = [
        "ordinary",
        "real-time",
        "real-time when slow (default)",
        "real-time, pinned",
    ];
    let mut pool = Pool::new(paths.map(String::from).to_vec(), &WORKLOADS.map(|w| w.0));
    for r in 1..=rounds {
        // (The last: the vCPU on the last CPU, the replication loop on the first.)
        let cpus = vmm::affinity::cpus_of(0).unwrap_or_default();
        let (first, last) = (
            cpus.first().copied().unwrap_or(0),
            cpus.last().copied().unwrap_or(0),
        );
        use vmm::rt::RtMode;
        let how = [
            ("busy", RtMode::Off, None),
            ("busy-rt", RtMode::On, None),
            ("busy-auto", RtMode::Auto, None),
            ("busy-pin", RtMode::On, Some((last, first))),
        ];
        for k in 0..how.len() {
            // (The order rotates from round to round: drift of the host is not one path's.)
            let c = (k + r - 1) % how.len();
            let (name, rt, pin) = how[c];
            let p = Protection {
                rt_pause: rt,
                pin,
                ..Protection::default()
            };
            pool.add(c, rows(env, t, (r, name, paths[c]), p, &WORKLOADS)?.1);
        }
    }
    pool.print(rounds, "pause path", None);
    Ok(())
}

/// The measured guest's workloads (50 pages per ms over 4,096: 1,000 distinct pages in each
/// 20 ms epoch).
const WORKLOADS: [(&str, &str); 3] = [
    ("idle", "CHURN 0 0"),
    ("CHURN 1k pages/s", "CHURN 2048 1"),
    ("1,000 pages per epoch", "CHURN 4096 50"),
];

/// One VM of a round, fixed 20 ms epochs, `p`'s pause path and harvest source: an unmeasured
/// settle phase (the backup applies the initial sync meanwhile), then one table row per
/// workload, labelled `round | label` (`{source}` in it: the VM's harvest source). Returns the
/// label as printed and the pauses of each workload.
pub(super) fn rows(
    env: &BenchEnv,
    t: &Timing,
    (r, name, label): (usize, &str, &str),
    p: Protection,
    workloads: &[(&str, &str)],
) -> anyhow::Result<(String, Vec<Vec<u32>>)> {
    let p = Protection {
        min_epoch_us: 20_000,
        early_checkpoints: false,
        ..p
    };
    let vm = RunningVm::protected(env, name, p)?;
    let label = label.replace("{source}", vm.vm.dirty_source());
    let stats = vm.stats.clone().context("protected VM without stats")?;
    let mut kv = Kv::connect(env.guest_addr(), std::time::Duration::from_secs(30))?;
    wait_protected(&stats)?;
    // (An unmeasured phase: the backup applies the initial sync.)
    anyhow::ensure!(kv.cmd("CHURN 0 0")? == "OK", "CHURN refused");
    std::thread::sleep(t.settle + t.measure);
    let mut out = Vec::new();
    for (name, churn) in workloads {
        anyhow::ensure!(kv.cmd(churn)? == "OK", "{churn} refused");
        std::thread::sleep(t.settle);
        let (mut v, rate) = collect(&stats, t.measure);
        let (p50, p99) = (quantile(&mut v, 0.5), quantile(&mut v, 0.99));
        let max = v.last().copied().unwrap_or(0);
        println!("| {r} | {label} | {name} | {p50} µs | {p99} µs | {max} µs | {rate:.0} |");
        out.push(v);
    }
    Ok((label, out))
}

/// Pauses with the bitmap vs the ring as the harvest source (and the ring without early copies
/// of busy epochs), alternating; a Markdown table. With `busy` CPU-bound neighbours running
/// meanwhile (and the default pause path, `--rt-pause auto`).
pub fn sources(env: &BenchEnv, t: &Timing, rounds: usize, busy: usize) -> anyhow::Result<()> {
    println!(
        "## Harvest source: KVM's bitmap (hot pages) vs its dirty ring (`vmatrix bench \
         replication --dirty-sources --busy {busy}`; {} MiB guest, 20 ms epochs, {busy} CPU-bound \
         neighbours on this {}-CPU host)\n",
        env.mem_mib,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| round | source | workload | pause p50 | pause p99 | pause max | checkpoints/s |");
    println!("|---:|---|---|---:|---:|---:|---:|");
    let _hogs = Hogs::start(busy)?;
    let labels = ["bitmap", "ring", "ring, no early copy"];
    let mut pool = Pool::new(labels.map(String::from).to_vec(), &WORKLOADS.map(|w| w.0));
    for r in 1..=rounds {
        // The ring also without early copies of busy epochs (`--epoch-precopy false`).
        let how = [(false, true), (true, true), (true, false)];
        for k in 0..how.len() {
            let c = (k + r - 1) % how.len();
            let (ring, early) = how[c];
            let p = Protection {
                dirty_ring: ring,
                // (The default pause path, `--rt-pause auto`.)
                rt_pause: vmm::rt::RtMode::Auto,
                epoch_precopy: early,
                ..Protection::default()
            };
            let name = if ring { "ring" } else { "bitmap" };
            let label = if early {
                "{source}"
            } else {
                "{source}, no early copy"
            };
            // (Labelled with the source the VM got: the bitmap where KVM has no ring.)
            let (label, pauses) = rows(env, t, (r, name, label), p, &WORKLOADS)?;
            pool.relabel(c, label);
            pool.add(c, pauses);
        }
    }
    pool.print(rounds, "source", None);
    Ok(())
}
