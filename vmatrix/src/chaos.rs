//! `vmatrix chaos run|report`: the chaos suite (`docs/chaos.md`). A thin layer over the
//! `chaos-tests` crate's runner: flags, Ctrl-C, one summary line per run, the exit status.
//!
//! Exit status of `run`: 0 when every run passed; 1 when a run failed, was inconclusive or could
//! not be carried out (an inconclusive run proves nothing, so it does not pass: a sweep that
//! cannot say "no violation" must not look green); 130 on Ctrl-C (after cleaning up).
//! `report` re-checks and re-renders a run directory, with the same status for its verdict;
//! `summary` prints a soak's figures as Markdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chaos_tests::checker::VerdictOutcome;
use chaos_tests::runner::{self, RunResult, RunnerConfig, RunnerError, Sweep};
use chaos_tests::schedule::{parse_duration, FaultSet};
use clap::{Args, Subcommand};

/// `vmatrix chaos <what>`.
#[derive(Subcommand, Debug)]
pub enum ChaosCmd {
    /// Seeded runs on a real cluster on this machine: faults, clients, checks, a report each.
    Run(RunArgs),
    /// Check a run directory again and re-render its report.html.
    Report(ReportArgs),
    /// A soak's figures (Markdown) from the run directories under an --out directory.
    Summary(SummaryArgs),
}

/// `vmatrix chaos summary`.
#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// Directories holding run directories (a run's --out), or run directories.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
}

/// `vmatrix chaos run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The first run's seed (run i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many runs.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Each run's fault phase (then the heal and the liveness phase), e.g. 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = parse_dur)]
    pub duration: Duration,
    /// Fault kinds and groups, '-' removes (e.g. kill,partition,-kill-manager). Default: every
    /// kind this runner supports.
    #[arg(long)]
    pub faults: Option<String>,
    /// Where the run directories go (<out>/seed-<seed>).
    #[arg(long, default_value = "build/chaos")]
    pub out: PathBuf,
    /// Protected VMs (1: one tap per host).
    #[arg(long, default_value_t = 1)]
    pub vms: u8,
    /// Hosts (3..=5).
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Workload clients.
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// Go on after a run that did not pass.
    #[arg(long)]
    pub keep_going: bool,
    /// Keep the hosts' images and disks of passing runs too (kept for the others).
    #[arg(long)]
    pub keep_work: bool,
    /// The test guest ELF.
    #[arg(
        long,
        env = "VMATRIX_GUEST",
        default_value = "guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"
    )]
    pub guest: PathBuf,
    /// Print the runner's log (also in <run dir>/runner.log) as it goes.
    #[arg(long, short)]
    pub verbose: bool,
    /// Inject at the planned times even when the VM has not recovered from the previous fault
    /// (by default the runner waits up to 30 s for it to be protected again and moves the rest
    /// of the schedule by the wait). With one backup, a crash before re-protection is a double
    /// fault whose designed outcome is a VM that stays down.
    #[arg(long)]
    pub no_settle: bool,
}

/// `vmatrix chaos report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run directory.
    pub dir: PathBuf,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Runs a chaos command.
pub fn main(cmd: ChaosCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ChaosCmd::Run(a) => run(a),
        ChaosCmd::Report(a) => report(a),
        ChaosCmd::Summary(a) => summary(a),
    }
}

fn summary(a: SummaryArgs) -> anyhow::Result<ExitCode> {
    let mut dirs = Vec::new();
    for d in &a.dirs {
        match d.join(chaos_tests::run_dir::SCHEDULE_FILE).is_file() {
            true => dirs.push(d.clone()),
            false => dirs.extend(runner::summary::run_dirs(d)),
        }
    }
    anyhow::ensure!(!dirs.is_empty(), "no run directory under {:?}", a.dirs);
    print!("{}", runner::summary::SoakSummary::of(&dirs).markdown());
    Ok(ExitCode::SUCCESS)
}

fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let v = runner::run::check(&a.dir).with_context(|| format!("{}", a.dir.display()))?;
    println!(
        "{:?}: {}",
        v.outcome,
        a.dir.join(chaos_tests::run_dir::REPORT_FILE).display()
    );
    for r in &v.reasons {
        println!("  {r}");
    }
    Ok(match v.outcome {
        VerdictOutcome::Pass => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Flags of a replay beyond what the schedule's own command says.
fn extra_flags(a: &RunArgs) -> String {
    let mut s = String::new();
    if a.hosts != 3 {
        s.push_str(&format!(" --hosts {}", a.hosts));
    }
    if a.clients != 4 {
        s.push_str(&format!(" --clients {}", a.clients));
    }
    if a.mem_mib != 64 {
        s.push_str(&format!(" --mem-mib {}", a.mem_mib));
    }
    if a.no_settle {
        s.push_str(" --no-settle");
    }
    s
}

fn print_run(r: &RunResult, extra: &str) {
    println!("{}", r.summary_line());
    if !r.passed() {
        for reason in &r.reasons {
            println!("    {reason}");
        }
        println!("    replay: {}{extra}", r.replay);
    }
}

fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let faults = match &a.faults {
        Some(list) => FaultSet::parse(list)?,
        None => runner::default_faults(),
    };
    let vmatrix = std::env::current_exe().context("the vmatrix binary's path")?;
    let guest = std::path::absolute(&a.guest).context("the guest's path")?;
    let mut cfg = RunnerConfig::new(vmatrix, guest, a.out.clone());
    cfg.hosts = a.hosts;
    cfg.vms = a.vms;
    cfg.mem_mib = a.mem_mib;
    cfg.workload.clients = a.clients;
    cfg.keep_work = a.keep_work;
    cfg.verbose = a.verbose;
    if a.no_settle {
        cfg.settle = None;
    }
    // Ctrl-C (or SIGTERM) asks the runner to stop and clean up; a second one exits at once
    // (the next run cleans up what is left).
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&cfg.interrupt))?;
        signal_hook::flag::register(sig, Arc::clone(&cfg.interrupt))?;
    }
    let sweep = Sweep {
        seed: a.seed,
        runs: a.runs,
        duration: a.duration,
        faults,
        keep_going: a.keep_going,
    };
    let extra = extra_flags(&a);
    let results = match runner::run_sweep(&cfg, &sweep, |r| print_run(r, &extra)) {
        Ok(r) => r,
        Err(RunnerError::Interrupted) => {
            eprintln!("vmatrix chaos: interrupted; everything the run created was removed");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    let count = |o: VerdictOutcome| {
        results
            .iter()
            .filter(|r| r.outcome == runner::RunOutcome::Checked(o))
            .count()
    };
    let (pass, fail, unsure) = (
        count(VerdictOutcome::Pass),
        count(VerdictOutcome::Fail),
        count(VerdictOutcome::Inconclusive),
    );
    let errors = results.len() - pass - fail - unsure;
    println!(
        "{} run(s): {pass} passed, {fail} failed, {unsure} inconclusive, {errors} not carried out; {} acknowledged writes, {} lost, {} split-brain intervals, {} faults injected",
        results.len(),
        results.iter().map(|r| r.acked).sum::<u64>(),
        results.iter().map(|r| r.lost).sum::<usize>(),
        results.iter().map(|r| r.split_brain).sum::<usize>(),
        results.iter().map(|r| r.injected).sum::<usize>(),
    );
    Ok(
        match pass == results.len() && results.len() == a.runs as usize {
            true => ExitCode::SUCCESS,
            false => ExitCode::from(1),
        },
    )
}
