//! The runner: `vmatrix chaos run` on this machine, for real.
//!
//! One run ([`run::run_one`]) writes its schedule, brings up a cluster of hosts as network
//! namespaces ([`cluster`]), the manager and an agent per host as real processes ([`procs`]),
//! creates the protected VM through the manager's API ([`api`]), captures every frame the guest
//! sends on the clients' LAN with the host it came from ([`capture`]), runs the workload clients
//! ([`workload`]), injects each scheduled fault at its time and heals it at its end ([`faults`],
//! [`nft`]), heals everything, observes liveness, reads every key back, tears the cluster down
//! and checks and renders the run directory with the crate's core. [`run_sweep`] runs several
//! seeds. Everything it creates is removed on every exit path (a guard's `Drop`, Ctrl-C through
//! [`RunnerConfig::interrupt`]), and what a crashed runner left behind is removed at the next
//! start ([`leftovers`]).

pub mod api;
pub mod capture;
pub mod cluster;
pub mod faults;
pub mod leftovers;
pub mod nft;
pub mod procs;
pub mod run;
pub mod summary;
pub mod timeline;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::checker::VerdictOutcome;
use crate::history::HistoryError;
use crate::report::ReportError;
use crate::run_dir::RunDirError;
use crate::schedule::{FaultKind, FaultSet, ScheduleError};

/// Errors of the runner (an error is not a verdict: the run could not be carried out).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// Which.
        what: String,
        /// Its error output.
        detail: String,
    },
    /// Every network index is locked or in use.
    #[error("no free network index (1..=250 all locked in the temporary directory or in use)")]
    NoFreeIndex,
    /// The manager's API answered badly or not at all.
    #[error("manager API: {0}")]
    Api(String),
    /// Something did not happen in time.
    #[error("{what} not within {after:?}: {detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
        /// The last thing seen.
        detail: String,
    },
    /// The run directory could not be read or written.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// The report could not be rendered.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The history could not be written.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The schedule could not be generated.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Ctrl-C (or the caller's interrupt flag).
    #[error("interrupted")]
    Interrupted,
    /// A configuration the runner cannot run.
    #[error("{0}")]
    Config(String),
}

impl RunnerError {
    /// An I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunnerError + '_ {
        move |source| RunnerError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A spawn error of `what`.
    pub fn spawn(what: &str) -> impl FnOnce(std::io::Error) -> RunnerError + '_ {
        move |source| RunnerError::Spawn {
            what: what.to_string(),
            source,
        }
    }
}

/// The fault kinds this runner can inject on this machine.
pub const SUPPORTED: [FaultKind; 20] = [
    FaultKind::KillPrimaryHost,
    FaultKind::KillBackupHost,
    FaultKind::KillManager,
    FaultKind::KillVm,
    FaultKind::StallPrimaryHost,
    FaultKind::StallBackupHost,
    FaultKind::StallManager,
    FaultKind::StallVm,
    FaultKind::IsolateHost,
    FaultKind::CutPrimaryFromManager,
    FaultKind::CutPrimaryFromBackups,
    FaultKind::OneWayDrop,
    FaultKind::LinkDelay,
    FaultKind::LinkLoss,
    FaultKind::LinkDuplicate,
    FaultKind::LinkReorder,
    FaultKind::DiskFull,
    FaultKind::CrashInCheckpoint,
    FaultKind::CrashInSync,
    FaultKind::Swizzle,
];

/// Why a kind is not supported, for the error message and the docs.
pub fn unsupported_reason(kind: FaultKind) -> Option<&'static str> {
    (!SUPPORTED.contains(&kind)).then_some("not implemented by this runner")
}

/// The default `--faults`: every supported kind.
pub fn default_faults() -> FaultSet {
    SUPPORTED.into_iter().collect()
}

/// Refuses a fault set with kinds the runner cannot inject (rather than silently skipping them).
pub fn check_supported(faults: &FaultSet) -> Result<(), RunnerError> {
    let bad: Vec<String> = faults
        .kinds()
        .into_iter()
        .filter_map(|k| unsupported_reason(k).map(|why| format!("{k} ({why})")))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(RunnerError::Config(format!(
        "fault kinds this runner cannot inject: {}; the default set is {}",
        bad.join("; "),
        default_faults()
    )))
}

/// How the workload clients behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Clients, each on its own connection.
    pub clients: u32,
    /// Keys every client reads and writes (overwritten constantly).
    pub shared_keys: u32,
    /// Keys of each client alone.
    pub own_keys: u32,
    /// Pause between two ops of a client.
    pub pace: Duration,
    /// A request unanswered for this long is `unknown` (the connection is dropped).
    pub op_timeout: Duration,
    /// A connection not made within this is a `fail` (nothing was sent).
    pub connect_timeout: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            clients: 4,
            shared_keys: 3,
            own_keys: 3,
            pace: Duration::from_millis(20),
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// What every run of a sweep shares.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The `vmatrix` binary (manager, agents, VM processes).
    pub vmatrix: PathBuf,
    /// The guest ELF.
    pub guest: PathBuf,
    /// Where run directories go (`<out>/seed-<seed>`).
    pub out: PathBuf,
    /// Hosts (3..=5).
    pub hosts: usize,
    /// Protected VMs (1: `cluster.sh` gives each host one tap).
    pub vms: u8,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// The clients.
    pub workload: WorkloadConfig,
    /// How long the liveness phase waits for the VM to be protected and answering.
    pub liveness_wait: Duration,
    /// Keep the hosts' state directories (images, disks) of passing runs too.
    pub keep_work: bool,
    /// Echo the runner's log (`runner.log`) to stderr.
    pub verbose: bool,
    /// Before each fault, wait up to this long for the VM to be protected again (moving the
    /// rest of the schedule); `None`: inject at the planned times whatever the state.
    pub settle: Option<Duration>,
    /// Set by Ctrl-C: the run stops, cleans up and returns [`RunnerError::Interrupted`].
    pub interrupt: Arc<AtomicBool>,
}

impl RunnerConfig {
    /// The defaults for `vmatrix` and `guest`.
    pub fn new(vmatrix: PathBuf, guest: PathBuf, out: PathBuf) -> RunnerConfig {
        RunnerConfig {
            vmatrix,
            guest,
            out,
            hosts: 3,
            vms: 1,
            mem_mib: 64,
            workload: WorkloadConfig::default(),
            liveness_wait: Duration::from_secs(60),
            keep_work: false,
            verbose: false,
            settle: Some(Duration::from_secs(30)),
            interrupt: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether Ctrl-C was pressed.
    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    /// Checks what the runner can do.
    pub fn validate(&self) -> Result<(), RunnerError> {
        if !(3..=cluster::MAX_HOSTS).contains(&self.hosts) {
            return Err(RunnerError::Config(format!(
                "--hosts must be 3..={} (a primary, a backup, a spare at least), not {}",
                cluster::MAX_HOSTS,
                self.hosts
            )));
        }
        if self.vms != 1 {
            return Err(RunnerError::Config(
                "--vms must be 1: each host namespace has one tap for one guest (cluster.sh)"
                    .into(),
            ));
        }
        if self.workload.clients == 0 {
            return Err(RunnerError::Config("--clients must be at least 1".into()));
        }
        for (what, p) in [
            ("vmatrix binary", &self.vmatrix),
            ("guest ELF", &self.guest),
        ] {
            if !p.is_file() {
                return Err(RunnerError::Config(format!(
                    "{what} {} not found",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Checked: the verdict.
    Checked(VerdictOutcome),
    /// Could not be carried out (the error); nothing was checked.
    Error(String),
}

/// One run's result, for the summary line.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Its number in the sweep.
    pub run: u32,
    /// Its seed.
    pub seed: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// Verdict or error.
    pub outcome: RunOutcome,
    /// The verdict's reasons (empty on a pass).
    pub reasons: Vec<String>,
    /// Faults injected (not skipped).
    pub injected: usize,
    /// Operations, acknowledged writes, lost writes, split-brain intervals.
    pub ops: u64,
    /// Acknowledged writes.
    pub acked: u64,
    /// Keys that lost an acknowledged write.
    pub lost: usize,
    /// Split-brain intervals.
    pub split_brain: usize,
    /// The command that replays it alone.
    pub replay: String,
    /// Wall-clock seconds it took.
    pub took_s: f64,
}

impl RunResult {
    /// Whether it passed.
    pub fn passed(&self) -> bool {
        self.outcome == RunOutcome::Checked(VerdictOutcome::Pass)
    }

    /// One line for a person.
    pub fn summary_line(&self) -> String {
        let what = match &self.outcome {
            RunOutcome::Checked(VerdictOutcome::Pass) => "PASS".to_string(),
            RunOutcome::Checked(VerdictOutcome::Fail) => "FAIL".to_string(),
            RunOutcome::Checked(VerdictOutcome::Inconclusive) => "INCONCLUSIVE".to_string(),
            RunOutcome::Error(e) => format!("ERROR ({e})"),
        };
        format!(
            "run {} seed {}: {what} — {} faults, {} ops, {} acknowledged writes, {} lost, {} split-brain intervals, {:.0} s; {}",
            self.run,
            self.seed,
            self.injected,
            self.ops,
            self.acked,
            self.lost,
            self.split_brain,
            self.took_s,
            self.dir.join(crate::run_dir::REPORT_FILE).display()
        )
    }
}

/// A sweep: `runs` runs from `seed` (run `i` uses `run_seed(seed, i)`), each `duration` long.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The first seed.
    pub seed: u64,
    /// How many runs.
    pub runs: u32,
    /// Each run's length (faults; the liveness phase comes after).
    pub duration: Duration,
    /// The kinds.
    pub faults: FaultSet,
    /// Go on after a run that did not pass.
    pub keep_going: bool,
}

/// Runs a sweep, calling `on_run` after each run; stops after the first run that did not pass
/// unless `keep_going`, and at once on Ctrl-C.
pub fn run_sweep(
    cfg: &RunnerConfig,
    sweep: &Sweep,
    mut on_run: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, RunnerError> {
    cfg.validate()?;
    check_supported(&sweep.faults)?;
    leftovers::clean_leftovers(&mut |line| eprintln!("{line}"));
    let mut results = Vec::new();
    for i in 0..sweep.runs {
        if cfg.interrupted() {
            return Err(RunnerError::Interrupted);
        }
        let seed = crate::schedule::run_seed(sweep.seed, i);
        let r = run::run_seed(cfg, i, seed, sweep.duration, &sweep.faults)?;
        on_run(&r);
        let passed = r.passed();
        results.push(r);
        if !passed && !sweep.keep_going {
            break;
        }
    }
    Ok(results)
}
