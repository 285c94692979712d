//! The seeded, deterministic fault schedule of a run.
//!
//! [`generate`] turns a seed, a run duration, the enabled fault kinds, the cluster's shape and
//! the timing parameters into a list of timed faults, one at a time: a warm-up, then each fault
//! from its start to its heal, then a quiet gap of at least `quiet_ns` so the system can recover
//! before the next, and a final heal of everything at the end of the run. Targets are roles
//! resolved by the runner at injection time ([`Role`]).
//!
//! The same inputs give the same schedule on every machine and every version of this crate:
//! the generator is [`rng::Xoshiro256`] (pinned, with golden tests), draws happen in a fixed
//! order, and [`GENERATOR_VERSION`] is recorded in the schedule and must be bumped if that ever
//! has to change. The schedule is written to the run directory as `schedule.json`;
//! [`replay_command`] prints the command that runs it again. Run `i` of `--runs N` uses the seed
//! [`run_seed`]`(seed, i)`, so a failing run replays alone with `--seed <its seed> --runs 1`.

mod fault;
pub mod rng;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use fault::{Fault, FaultKind, FaultListError, FaultSet, LinkRef, Role, GROUPS};
use rng::Xoshiro256;

/// The version of the generation algorithm; part of every schedule.
pub const GENERATOR_VERSION: u32 = 1;

/// What the cluster looks like, for choosing targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterShape {
    /// Protected VMs (each event names one by index).
    pub vms: u8,
    /// Backups per VM.
    pub backups: u8,
    /// Hosts holding no instance of a VM.
    pub spares: u8,
}

impl Default for ClusterShape {
    /// Three hosts: a primary, a backup, a spare for re-protection.
    fn default() -> Self {
        ClusterShape {
            vms: 1,
            backups: 1,
            spares: 1,
        }
    }
}

/// The schedule's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// No fault before this (the workload warms up).
    pub first_ns: u64,
    /// Least time without any fault between two faults, and before the final heal.
    pub quiet_ns: u64,
    /// Shortest fault (start to heal).
    pub min_fault_ns: u64,
    /// Longest fault.
    pub max_fault_ns: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            first_ns: 2_000_000_000,
            quiet_ns: 2_000_000_000,
            min_fault_ns: 300_000_000,
            max_fault_ns: 4_000_000_000,
        }
    }
}

/// Everything a schedule is generated from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// The seed.
    pub seed: u64,
    /// The run's length; the final heal is at its end.
    pub duration_ns: u64,
    /// The kinds that may be drawn.
    pub faults: FaultSet,
    /// The cluster.
    pub shape: ClusterShape,
    /// The timing.
    pub timing: Timing,
}

impl ScheduleConfig {
    /// The configuration `vmatrix chaos run --seed --duration --faults` means: default shape
    /// and timing.
    pub fn new(seed: u64, duration: Duration, faults: FaultSet) -> ScheduleConfig {
        ScheduleConfig {
            seed,
            duration_ns: duration_ns(duration),
            faults,
            shape: ClusterShape::default(),
            timing: Timing::default(),
        }
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledEvent {
    /// Its number in the schedule, from 0.
    pub index: u32,
    /// When it is injected (ns since the run's start).
    pub start_ns: u64,
    /// When it is healed (stall ended, partition removed, killed host restarted, ...).
    pub end_ns: u64,
    /// Which VM's roles it targets (index modulo the number of VMs).
    pub vm: u8,
    /// What.
    pub fault: Fault,
}

/// A run's fault schedule, as written to `schedule.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// [`GENERATOR_VERSION`] of the code that generated it.
    pub generator: u32,
    /// What it was generated from.
    pub config: ScheduleConfig,
    /// The faults, by start time, not overlapping.
    pub events: Vec<ScheduledEvent>,
    /// When everything is healed (again) and the liveness phase starts: the run's end.
    pub final_heal_ns: u64,
}

impl Schedule {
    /// How many faults of each kind.
    pub fn counts_by_kind(&self) -> BTreeMap<FaultKind, usize> {
        let mut counts = BTreeMap::new();
        for e in &self.events {
            *counts.entry(e.fault.kind()).or_insert(0) += 1;
        }
        counts
    }

    /// The command that replays this run alone.
    pub fn replay_command(&self) -> String {
        replay_command(
            self.config.seed,
            1,
            Duration::from_nanos(self.config.duration_ns),
            &self.config.faults,
        )
    }
}

/// What the runner really did for one scheduled event (a line of `faults.jsonl`): the target
/// it resolved and the times it acted, which may differ from the plan by a few ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injection {
    /// The [`ScheduledEvent::index`].
    pub event: u32,
    /// Its kind.
    pub kind: FaultKind,
    /// The resolved target, for a person (`"host b (primary of web)"`).
    pub target: String,
    /// When it was injected.
    pub start_ns: u64,
    /// When it was healed, if it was.
    pub end_ns: Option<u64>,
    /// Anything that went differently (skipped, no spare, command failed, ...).
    pub note: Option<String>,
}

/// A schedule that cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Faults need a VM to target.
    #[error("the cluster shape has no VM")]
    NoVm,
    /// Backup-targeted faults need a backup.
    #[error("fault {0} needs at least one backup per VM")]
    NeedsBackup(FaultKind),
    /// `min_fault_ns > max_fault_ns` or a zero quiet gap.
    #[error("bad timing: {0}")]
    Timing(&'static str),
}

/// The seed of run `run` (from 0) of a sweep started with `base`.
pub fn run_seed(base: u64, run: u32) -> u64 {
    base.wrapping_add(u64::from(run))
}

/// Generates the schedule of `cfg` (see the module's doc).
pub fn generate(cfg: &ScheduleConfig) -> Result<Schedule, ScheduleError> {
    validate(cfg)?;
    let t = &cfg.timing;
    let mut rng = Xoshiro256::seed_from(cfg.seed);
    let kinds = cfg.faults.kinds();
    let mut events = Vec::new();
    let mut at = t.first_ns;
    // Millisecond granularity keeps the file readable; draws are in a fixed order.
    let ms = |ns: u64| ns / 1_000_000;
    while !kinds.is_empty() {
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let length = rng.range(ms(t.min_fault_ns), ms(t.max_fault_ns)) * 1_000_000;
        let vm = rng.below(u64::from(cfg.shape.vms)) as u8;
        let fault = draw_fault(kind, &cfg.shape, length, &mut rng);
        let end = at.saturating_add(length);
        if end.saturating_add(t.quiet_ns) > cfg.duration_ns {
            break;
        }
        events.push(ScheduledEvent {
            index: events.len() as u32,
            start_ns: at,
            end_ns: end,
            vm,
            fault,
        });
        at = end + t.quiet_ns + rng.below(ms(t.quiet_ns) + 1) * 1_000_000;
    }
    Ok(Schedule {
        generator: GENERATOR_VERSION,
        config: cfg.clone(),
        events,
        final_heal_ns: cfg.duration_ns,
    })
}

fn validate(cfg: &ScheduleConfig) -> Result<(), ScheduleError> {
    if cfg.shape.vms == 0 {
        return Err(ScheduleError::NoVm);
    }
    if cfg.shape.backups == 0 {
        let needs = [
            FaultKind::KillBackupHost,
            FaultKind::StallBackupHost,
            FaultKind::CutPrimaryFromBackups,
            FaultKind::LinkDelay,
            FaultKind::LinkLoss,
            FaultKind::LinkDuplicate,
            FaultKind::LinkReorder,
            FaultKind::DiskFull,
            FaultKind::CrashInSync,
        ];
        if let Some(&k) = needs.iter().find(|&&k| cfg.faults.contains(k)) {
            return Err(ScheduleError::NeedsBackup(k));
        }
    }
    let t = &cfg.timing;
    if t.min_fault_ns > t.max_fault_ns {
        return Err(ScheduleError::Timing("min_fault_ns > max_fault_ns"));
    }
    if t.quiet_ns < 1_000_000 {
        return Err(ScheduleError::Timing("quiet_ns under 1 ms"));
    }
    Ok(())
}

/// A VM role: the primary or one of the backups.
fn vm_role(shape: &ClusterShape, rng: &mut Xoshiro256) -> Role {
    match rng.below(u64::from(shape.backups) + 1) {
        0 => Role::Primary,
        i => Role::Backup { index: i as u8 - 1 },
    }
}

/// Every role of the cluster that has a host or process: primary, backups, spares, manager.
fn all_roles(shape: &ClusterShape, with_spares: bool) -> Vec<Role> {
    let mut roles = vec![Role::Primary];
    roles.extend((0..shape.backups).map(|index| Role::Backup { index }));
    if with_spares {
        roles.extend((0..shape.spares).map(|index| Role::Spare { index }));
    }
    roles.push(Role::Manager);
    roles
}

/// The parameters of one fault of `kind`, `length` ns long.
fn draw_fault(kind: FaultKind, shape: &ClusterShape, length: u64, rng: &mut Xoshiro256) -> Fault {
    let ms = 1_000_000u64;
    let backup = |rng: &mut Xoshiro256| rng.below(u64::from(shape.backups)) as u8;
    match kind {
        FaultKind::KillPrimaryHost => Fault::KillPrimaryHost,
        FaultKind::KillBackupHost => Fault::KillBackupHost {
            backup: backup(rng),
        },
        FaultKind::KillManager => Fault::KillManager,
        FaultKind::KillVm => Fault::KillVm {
            role: vm_role(shape, rng),
        },
        FaultKind::StallPrimaryHost => Fault::StallPrimaryHost,
        FaultKind::StallBackupHost => Fault::StallBackupHost {
            backup: backup(rng),
        },
        FaultKind::StallManager => Fault::StallManager,
        FaultKind::StallVm => Fault::StallVm {
            role: vm_role(shape, rng),
        },
        FaultKind::IsolateHost => {
            let roles = all_roles(shape, true);
            Fault::IsolateHost {
                role: roles[rng.below(roles.len() as u64) as usize],
            }
        }
        FaultKind::CutPrimaryFromManager => Fault::CutPrimaryFromManager,
        FaultKind::CutPrimaryFromBackups => Fault::CutPrimaryFromBackups,
        FaultKind::OneWayDrop => {
            let mut roles = all_roles(shape, false);
            rng.shuffle(&mut roles);
            Fault::OneWayDrop {
                from: roles[0],
                to: roles[1],
            }
        }
        FaultKind::LinkDelay => {
            let delay_ns = rng.range(1, 50) * ms;
            Fault::LinkDelay {
                backup: backup(rng),
                delay_ns,
                jitter_ns: rng.range(0, delay_ns / ms) * ms,
            }
        }
        FaultKind::LinkLoss => Fault::LinkLoss {
            backup: backup(rng),
            permille: rng.range(10, 300) as u16,
        },
        FaultKind::LinkDuplicate => Fault::LinkDuplicate {
            backup: backup(rng),
            permille: rng.range(10, 200) as u16,
        },
        FaultKind::LinkReorder => Fault::LinkReorder {
            backup: backup(rng),
            permille: rng.range(10, 200) as u16,
            delay_ns: rng.range(1, 20) * ms,
        },
        FaultKind::DiskFull => Fault::DiskFull {
            backup: backup(rng),
        },
        FaultKind::CrashInCheckpoint => Fault::CrashInCheckpoint {
            victim: vm_role(shape, rng),
        },
        FaultKind::CrashInSync => {
            let syncing = backup(rng);
            let victim = if rng.chance(500) {
                Role::Primary
            } else {
                Role::Backup { index: syncing }
            };
            Fault::CrashInSync { syncing, victim }
        }
        FaultKind::Swizzle => draw_swizzle(shape, length, rng),
    }
}

fn draw_swizzle(shape: &ClusterShape, length: u64, rng: &mut Xoshiro256) -> Fault {
    let roles = all_roles(shape, false);
    let mut links = Vec::new();
    for (i, &a) in roles.iter().enumerate() {
        for &b in &roles[i + 1..] {
            links.push(LinkRef { a, b });
        }
    }
    rng.shuffle(&mut links);
    let count = rng.range(links.len().min(2) as u64, links.len() as u64) as usize;
    links.truncate(count);
    let mut heal_order: Vec<u32> = (0..count as u32).collect();
    rng.shuffle(&mut heal_order);
    let steps = (2 * count).max(1) as u64;
    Fault::Swizzle {
        links,
        step_ns: length / steps / 1_000_000 * 1_000_000,
        heal_order,
    }
}

/// The exact command that runs `runs` runs from `seed` (run `i` with [`run_seed`]).
pub fn replay_command(seed: u64, runs: u32, duration: Duration, faults: &FaultSet) -> String {
    format!(
        "vmatrix chaos run --seed {seed} --runs {runs} --duration {} --faults {}",
        format_duration(duration),
        faults
    )
}

/// `duration` in ns, saturating.
pub fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad duration {0:?}: a whole number with a unit: ns, us, ms, s, m or h (e.g. 90s, 1500ms)")]
pub struct DurationError(pub String);

const UNITS: [(&str, u64); 6] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses `90s`, `1500ms`, `2m`, `1h`, `250us`, `10ns`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let scale = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, s)| *s)
        .ok_or_else(bad)?;
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(scale)
        .map(Duration::from_nanos)
        .ok_or_else(bad)
}

/// The shortest exact form [`parse_duration`] reads back (`90s`, `1500ms`, `0s`).
pub fn format_duration(duration: Duration) -> String {
    let ns = duration_ns(duration);
    if ns == 0 {
        return "0s".into();
    }
    let (unit, scale) = UNITS
        .iter()
        .find(|(_, s)| ns.is_multiple_of(*s))
        .expect("ns divides everything");
    format!("{}{unit}", ns / scale)
}

#[cfg(test)]
mod tests;
