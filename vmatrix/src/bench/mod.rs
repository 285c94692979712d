//! `vmatrix bench`: benchmarks that run from the installed binary (no source tree or cargo
//! needed), on real KVM, a real tap device and real QUIC. They print Markdown tables for
//! docs/BENCHMARKS.md.

mod busy;
mod clones;
mod copy;
mod export;
mod harness;
mod harvest;
mod hog;
mod lb;
mod pauses;
mod replication;
mod reply;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// `vmatrix bench <what>`.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Continuous replication: pauses, epoch rate, bandwidth vs raw quinn, KV protected vs not;
    /// with `--busy N`, pauses beside N CPU-bound neighbours, ordinary vs real-time vs
    /// automatic pause path.
    Replication(ReplicationArgs),
    /// Clones (`vmatrix clone`): time until N clones answer, memory per clone.
    Clones(clones::ClonesArgs),
    /// One address (`vmatrix lb`): read throughput through the VIP vs replicas behind it.
    Lb(lb::LbArgs),
    /// Clone bases beside a protected VM: a backup's export vs a primary's snapshot vs none.
    Export(export::ExportArgs),
    /// A clone base copied between two agents' base servers vs raw quinn (same run).
    Copy(copy::CopyArgs),
}

/// Flags shared by the benchmarks.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The test guest ELF.
    #[arg(
        long,
        default_value = "guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"
    )]
    pub guest: PathBuf,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 32)]
    pub mem_mib: u64,
    /// Short measurements (a smoke run; the figures are noisy).
    #[arg(long)]
    pub quick: bool,
}

/// Flags of `vmatrix bench replication`.
#[derive(Args, Debug)]
pub struct ReplicationArgs {
    /// Flags shared by the benchmarks.
    #[command(flatten)]
    pub common: BenchArgs,
    /// Measure on a busy host instead: this many CPU-bound neighbours run meanwhile, and the
    /// pause path is measured at ordinary and at real-time priority, and real-time once pauses
    /// wait for the scheduler (`--rt-pause auto`), alternating.
    #[arg(long, default_value_t = 0)]
    pub busy: usize,
    /// Rounds of the busy-host (or harvest source) measurement.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measure the harvest sources instead: KVM's bitmap with hot pages vs its dirty ring
    /// (beside `--busy N` neighbours if given).
    #[arg(long)]
    pub dirty_sources: bool,
    /// With `--busy`: a second protected VM (its guest dirtying 1,000 pages/s) runs beside the
    /// measured one.
    #[arg(long)]
    pub second_vm: bool,
    /// Measure the harvest of the dirty pages alone instead: KVM's bitmap (hot pages) vs its
    /// dirty ring, idle and at 100 and 1,000 pages per epoch, at this `--mem-mib`.
    #[arg(long)]
    pub harvest: bool,
    /// Measure beside a CPU-hog VM instead: stopped, without a limit, and capped by its
    /// cgroup at this many CPUs (e.g. 0.5), alternating.
    #[arg(long)]
    pub hog_vm: Option<f64>,
    /// Measure the KV service's reply path instead: one client's added latency and where it
    /// goes, and 16 closed-loop clients, unprotected vs protected, alternating for `--rounds`.
    #[arg(long)]
    pub kv: bool,
    /// With `--kv`: run only one long 16-client phase, this many SETs per client, and print
    /// its checkpoint rate and stage means — a steady load to attach `perf` or read `/proc`
    /// during (docs/BENCHMARKS.md, "Hot pages within a window"). Protected unless `--plain`.
    #[arg(long, requires = "kv")]
    pub kv_hold: Option<usize>,
    /// With `--kv-hold`: the VM unprotected.
    #[arg(long, requires = "kv_hold")]
    pub plain: bool,
    /// With `--kv` or `--hog-vm`: when the protected VM's pauses run at real-time priority (as
    /// `vmatrix primary --rt-pause`).
    #[arg(
        long,
        value_name = "auto|on|off",
        default_value = "auto",
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    pub rt_pause: vmm::rt::RtMode,
    /// The harvest source of every protected VM the bench starts (as `vmatrix primary
    /// --dirty-source`; `--dirty-sources` and `--harvest` measure both whatever this says).
    #[arg(long, value_enum, default_value = "bitmap")]
    pub dirty_source: crate::replicate::DirtySource,
    /// The backups of the bench's protected VMs run their apply path at real-time priority
    /// (as `vmatrix backup --rt-apply`).
    #[arg(long)]
    pub backup_rt: bool,
}

/// Runs a benchmark.
pub fn main(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Replication(a) => {
            let env = harness::BenchEnv::new(a.common.guest, a.common.mem_mib)?;
            harness::set_default_ring(a.dirty_source == crate::replicate::DirtySource::Ring);
            harness::set_default_backup_rt(a.backup_rt);
            // (`--kv` beside `--busy N` neighbours: they run for the whole bench.)
            let _hogs = match a.kv && a.busy > 0 {
                true => Some(busy::Hogs::start(a.busy)?),
                false => None,
            };
            let timing = match a.common.quick {
                true => replication::Timing::quick(),
                false => replication::Timing::full(),
            };
            anyhow::ensure!(
                !a.second_vm || a.busy > 0,
                "--second-vm goes with --busy N (the busy-host measurement)"
            );
            anyhow::ensure!(
                a.rt_pause == vmm::rt::RtMode::Auto || a.kv || a.hog_vm.is_some(),
                "--rt-pause goes with --kv or --hog-vm"
            );
            match a.busy {
                _ if a.hog_vm.is_some() => {
                    let cpus = a.hog_vm.unwrap_or(0.5).clamp(0.01, 64.0);
                    let rounds = a.rounds.max(1);
                    hog::run(&env, &timing, (cpus * 1000.0) as u32, rounds, a.rt_pause)?
                }
                _ if a.kv && a.kv_hold.is_some() => {
                    let p = (!a.plain).then_some(harness::Protection {
                        rt_pause: a.rt_pause,
                        ..Default::default()
                    });
                    reply::hold(&env, a.kv_hold.unwrap_or(600), p)?
                }
                _ if a.kv => reply::run(&env, &timing, a.rounds.max(1), (a.rt_pause, a.busy))?,
                _ if a.harvest => harvest::run(&env, &timing, a.rounds.max(1))?,
                _ if a.dirty_sources => busy::sources(&env, &timing, a.rounds.max(1), a.busy)?,
                0 => replication::run(&env, timing)?,
                n => busy::run(&env, &timing, n, a.rounds.max(1), a.second_vm)?,
            }
        }
        BenchCmd::Clones(a) => clones::run(a)?,
        BenchCmd::Lb(a) => lb::run(a)?,
        BenchCmd::Export(a) => export::run(a)?,
        BenchCmd::Copy(a) => copy::run(a)?,
    }
    Ok(ExitCode::SUCCESS)
}
