//! `vmatrix bench replication --harvest`: what a harvest of the dirty pages costs by itself,
//! KVM's bitmap (with hot pages, the default) against its dirty ring (issue 12: "harvest cost
//! proportional to the pages dirtied, not to guest RAM"). The pause figures elsewhere hide it
//! under waking the vCPU and copying pages; here the VM (not protected: no backup, no copies)
//! is paused every 20 ms while its guest dirties a set number of pages per epoch, and only the
//! harvest is timed — `Vm::harvest_dirty` (the log read and reset: KVM's bitmap and its
//! clear, or the ring's new entries and `KVM_RESET_DIRTY_RINGS`, plus the devices' bitmap)
//! and the sorted page list a capture makes of it. Run it at several `--mem-mib` to see what
//! grows with guest RAM. (Its first version measured mostly malloc: the harvest then returned
//! whole-guest bitmaps, freed and faulted in afresh at each harvest of this loop; a harvest now
//! allocates only sets of the pages it found, `vmm::page_set`.)

use std::time::{Duration, Instant};

use super::harness::{BenchEnv, Kv};
use super::replication::{pct, Timing};

/// The guest's workloads: label, CHURN command (pages over 4,096, per millisecond).
const WORKLOADS: [(&str, &str); 3] = [
    ("idle", "CHURN 0 0"),
    ("100 pages per epoch", "CHURN 4096 5"),
    ("1,000 pages per epoch", "CHURN 4096 50"),
];

/// The gap between two pauses (a 20 ms epoch).
const EVERY: Duration = Duration::from_millis(20);

/// Runs the harvest A/B and prints a Markdown table.
pub fn run(env: &BenchEnv, t: &Timing, rounds: usize) -> anyhow::Result<()> {
    let n = (t.measure.as_millis() / EVERY.as_millis()).max(10) as usize;
    println!(
        "## The harvest alone (`vmatrix bench replication --harvest`; {} MiB guest, paused \
         every 20 ms, {n} harvests per row; {}-CPU host)\n",
        env.mem_mib,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| round | source | workload | pages per harvest | harvest p50 | harvest p99 |");
    println!("|---:|---|---|---:|---:|---:|");
    for r in 1..=rounds {
        for ring in [false, true] {
            source(env, (t.settle, n), r, ring)?;
        }
    }
    Ok(())
}

/// One source's rows of round `r`: a VM with it, each workload's harvests timed.
/// `(settle, n)`: the wait after a workload starts, the harvests per row.
fn source(env: &BenchEnv, how: (Duration, usize), r: usize, ring: bool) -> anyhow::Result<()> {
    vmm::dirty_ring::prefer(ring);
    let vm = env.vm("harvest");
    vmm::dirty_ring::prefer(false);
    let vm = vm?;
    vm.start()?;
    let r = rows(env, &vm, how, r);
    vm.stop();
    let _ = vm.wait();
    r
}

/// The rows of round `r` for running VM `vm`.
fn rows(
    env: &BenchEnv,
    vm: &vmm::Vm,
    (settle, n): (Duration, usize),
    r: usize,
) -> anyhow::Result<()> {
    let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(30))?;
    let name = vm.dirty_source();
    for (label, churn) in WORKLOADS {
        anyhow::ensure!(kv.cmd(churn)? == "OK", "{churn} refused");
        std::thread::sleep(settle);
        let (mut times, mut pages) = (Vec::with_capacity(n), 0usize);
        // (One harvest first: it takes what the settle dirtied.)
        for i in 0..=n {
            std::thread::sleep(EVERY);
            vm.pause().map_err(|e| anyhow::anyhow!("pausing: {e:?}"))?;
            let t0 = Instant::now();
            let got = vm.harvest_dirty().map(|d| d.page_list());
            let took = t0.elapsed();
            vm.resume();
            let list = got?;
            if i > 0 {
                times.push(took);
                pages += list.len();
            }
        }
        times.sort_unstable();
        println!(
            "| {r} | {name} | {label} | {} | {} µs | {} µs |",
            pages / n,
            pct(&times, 0.5).as_micros(),
            pct(&times, 0.99).as_micros()
        );
    }
    Ok(())
}
