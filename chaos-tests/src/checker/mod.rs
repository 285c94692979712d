//! The checkers, and the [`Verdict`] that aggregates them.
//!
//! - [`lost`]: no acknowledged write lost (final values after the heal against the history);
//! - [`reads`]: cheap direct proofs of bad reads (never written, failed write, future, stale);
//! - [`linear`]: per-key linearizability of the register (a real search, with a budget);
//! - [`split_brain`]: at most one host emitting guest frames at a time;
//! - [`liveness`]: protected and answering again after the heal; recovery time per fault.
//!
//! [`check`] runs all of them on a [`CheckInput`] and returns a [`Verdict`], which is plain
//! serializable data (`verdict.json` in the run directory). A verdict is `pass` only when every
//! check ran to the end and found nothing; a search out of budget or a key not read back makes
//! it `inconclusive`, never `pass`.

pub mod linear;
pub mod liveness;
pub mod lost;
pub mod reads;
pub mod split_brain;
mod zones;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::history::{InvalidOp, Op};
pub use linear::{CounterExample, KeyLinearizability, Linearizability, LinearizabilityConfig};
pub use liveness::{
    FaultWindow, Liveness, LivenessBounds, LivenessObservation, LivenessProblem, Outage,
    RecoveryTime,
};
pub use lost::{LostKind, LostWrite, LostWrites};
pub use reads::{ReadAnomaly, ReadAnomalyKind};
pub use split_brain::{GuestFrame, SplitBrain, SplitBrainConfig, SplitBrainInterval};

/// Read anomalies listed at most in a verdict (all are counted).
const MAX_ANOMALIES: usize = 100;

/// The checks' parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckConfig {
    /// The linearizability search's budgets.
    pub linearizability: LinearizabilityConfig,
    /// The split-brain check's windows.
    pub split_brain: SplitBrainConfig,
    /// The liveness bounds.
    pub liveness: LivenessBounds,
    /// Gaps in acknowledged operations longer than this are outages (default 50 ms).
    pub outage_gap_ns: Option<u64>,
}

/// Default [`CheckConfig::outage_gap_ns`].
pub const DEFAULT_OUTAGE_GAP_NS: u64 = 50_000_000;

/// What the runner collected.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    /// Every operation of the clients.
    pub history: &'a [Op],
    /// Every key's value read after the heal (`None` = absent).
    pub finals: &'a BTreeMap<String, Option<String>>,
    /// Guest frames seen on the clients' LAN.
    pub frames: &'a [GuestFrame],
    /// What was seen after the heal (`None`: not observed; the verdict cannot pass).
    pub liveness: Option<LivenessObservation>,
    /// The faults as injected, for recovery times.
    pub faults: &'a [FaultWindow],
}

/// A history the checkers cannot work on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Two ops with the same (client, op id).
    #[error("client {client} used op id {op} twice")]
    DuplicateOpId {
        /// Client.
        client: u32,
        /// Op id.
        op: u64,
    },
    /// Two sets of the same value: reads could not be attributed.
    #[error("value {value:?} written twice (by client {first:?} and {second:?} as (client, op))")]
    DuplicateValue {
        /// The value.
        value: String,
        /// First set, (client, op).
        first: (u32, u64),
        /// Second set.
        second: (u32, u64),
    },
    /// An op that cannot be real.
    #[error("client {client} op {op}: {error}")]
    InvalidOp {
        /// Client.
        client: u32,
        /// Op id.
        op: u64,
        /// What.
        error: InvalidOp,
    },
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictOutcome {
    /// Every check ran to the end and found nothing.
    Pass,
    /// A check found a violation.
    Fail,
    /// No violation found, but a check could not finish (budget, keys not read, no liveness
    /// observation).
    Inconclusive,
}

/// Operation counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCounts {
    /// All ops.
    pub total: u64,
    /// Sets.
    pub sets: u64,
    /// Gets.
    pub gets: u64,
    /// Answered.
    pub ok: u64,
    /// Definitely not applied.
    pub fail: u64,
    /// May or may not have applied.
    pub unknown: u64,
    /// Acknowledged sets.
    pub acknowledged_writes: u64,
    /// Distinct keys.
    pub keys: u64,
}

/// The linearizability check over all keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearizabilitySummary {
    /// `NotLinearizable` if any key is, else `Unknown` if any key is, else `Linearizable`.
    pub result: Linearizability,
    /// Keys checked.
    pub keys: usize,
    /// Keys per answer.
    pub linearizable_keys: usize,
    /// Keys out of budget.
    pub unknown_keys: usize,
    /// Keys that are not linearizable.
    pub failed_keys: usize,
    /// Search steps over all keys.
    pub steps: u64,
    /// The keys that did not pass, with their counter-examples.
    pub problems: Vec<KeyLinearizability>,
}

/// Everything the checks found: `verdict.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The overall answer.
    pub outcome: VerdictOutcome,
    /// Why it is not a pass, one line each, for a person.
    pub reasons: Vec<String>,
    /// Operation counts.
    pub ops: OpCounts,
    /// Lost acknowledged writes.
    pub lost: LostWrites,
    /// Bad reads (the first 100).
    pub read_anomalies: Vec<ReadAnomaly>,
    /// Bad reads by kind (all of them).
    pub read_anomaly_counts: BTreeMap<ReadAnomalyKind, usize>,
    /// Per-key linearizability.
    pub linearizability: LinearizabilitySummary,
    /// At most one serving primary.
    pub split_brain: SplitBrain,
    /// After the heal (`None`: not observed).
    pub liveness: Option<Liveness>,
    /// Client-visible gaps in service.
    pub outages: Vec<Outage>,
    /// Per fault, the time to serve again.
    pub recovery: Vec<RecoveryTime>,
}

/// Checks the same-history rules no single line can: unique op ids, unique set values.
pub fn validate_history(history: &[Op]) -> Result<(), CheckError> {
    let mut ids = HashMap::with_capacity(history.len());
    let mut values: HashMap<&str, (u32, u64)> = HashMap::new();
    for op in history {
        op.validate().map_err(|error| CheckError::InvalidOp {
            client: op.client,
            op: op.op,
            error,
        })?;
        if ids.insert((op.client, op.op), ()).is_some() {
            return Err(CheckError::DuplicateOpId {
                client: op.client,
                op: op.op,
            });
        }
        if let Some(v) = op.written() {
            if let Some(&first) = values.get(v) {
                return Err(CheckError::DuplicateValue {
                    value: v.to_string(),
                    first,
                    second: (op.client, op.op),
                });
            }
            values.insert(v, (op.client, op.op));
        }
    }
    Ok(())
}

/// The ops grouped by key.
pub fn by_key(history: &[Op]) -> BTreeMap<&str, Vec<&Op>> {
    let mut out: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        out.entry(op.key.as_str()).or_default().push(op);
    }
    out
}

/// Runs every check.
pub fn check(input: &CheckInput<'_>, cfg: &CheckConfig) -> Result<Verdict, CheckError> {
    validate_history(input.history)?;
    let keys = by_key(input.history);
    let lost = lost::check_lost_writes(&keys, input.finals);
    let mut anomalies = Vec::new();
    let mut problems = Vec::new();
    let mut lin = LinearizabilitySummary {
        result: Linearizability::Linearizable,
        keys: keys.len(),
        linearizable_keys: 0,
        unknown_keys: 0,
        failed_keys: 0,
        steps: 0,
        problems: Vec::new(),
    };
    for (key, ops) in &keys {
        anomalies.extend(reads::check_reads(ops));
        let r = linear::check_key(key, ops, &cfg.linearizability);
        lin.steps += r.steps;
        match r.result {
            Linearizability::Linearizable => lin.linearizable_keys += 1,
            Linearizability::Unknown => lin.unknown_keys += 1,
            Linearizability::NotLinearizable => lin.failed_keys += 1,
        }
        if r.result != Linearizability::Linearizable {
            problems.push(r);
        }
    }
    lin.result = if lin.failed_keys > 0 {
        Linearizability::NotLinearizable
    } else if lin.unknown_keys > 0 {
        Linearizability::Unknown
    } else {
        Linearizability::Linearizable
    };
    lin.problems = problems;
    let mut anomaly_counts = BTreeMap::new();
    for a in &anomalies {
        *anomaly_counts.entry(a.kind).or_insert(0) += 1;
    }
    anomalies.truncate(MAX_ANOMALIES);
    let outages = liveness::outages(
        input.history,
        cfg.outage_gap_ns.unwrap_or(DEFAULT_OUTAGE_GAP_NS),
    );
    let mut verdict = Verdict {
        outcome: VerdictOutcome::Pass,
        reasons: Vec::new(),
        ops: count_ops(input.history, keys.len()),
        lost,
        read_anomalies: anomalies,
        read_anomaly_counts: anomaly_counts,
        linearizability: lin,
        split_brain: split_brain::check_split_brain(input.frames, &cfg.split_brain),
        liveness: input
            .liveness
            .map(|o| liveness::check_liveness(o, cfg.liveness)),
        recovery: liveness::recovery_times(input.faults, &outages),
        outages,
    };
    judge(&mut verdict);
    Ok(verdict)
}

fn count_ops(history: &[Op], keys: usize) -> OpCounts {
    let mut c = OpCounts {
        keys: keys as u64,
        ..OpCounts::default()
    };
    for op in history {
        c.total += 1;
        if op.is_set() {
            c.sets += 1;
        } else {
            c.gets += 1;
        }
        if op.is_ok() {
            c.ok += 1;
            c.acknowledged_writes += u64::from(op.is_set());
        } else if op.is_fail() {
            c.fail += 1;
        } else {
            c.unknown += 1;
        }
    }
    c
}

/// Sets the outcome and its reasons from the parts.
fn judge(v: &mut Verdict) {
    let mut fail = Vec::new();
    let mut unsure = Vec::new();
    if !v.lost.violations.is_empty() {
        fail.push(format!(
            "{} key(s) lost an acknowledged write",
            v.lost.violations.len()
        ));
    }
    if !v.lost.unread_keys.is_empty() {
        unsure.push(format!(
            "{} key(s) with acknowledged writes were not read after the heal",
            v.lost.unread_keys.len()
        ));
    }
    for (kind, n) in &v.read_anomaly_counts {
        fail.push(format!("{n} read(s): {kind:?}"));
    }
    let lin = &v.linearizability;
    if lin.failed_keys > 0 {
        fail.push(format!("{} key(s) not linearizable", lin.failed_keys));
    }
    if lin.unknown_keys > 0 {
        unsure.push(format!(
            "{} key(s): linearizability search out of budget",
            lin.unknown_keys
        ));
    }
    if !v.split_brain.passed() {
        fail.push(format!(
            "{} split-brain interval(s), {} ns in all",
            v.split_brain.intervals_total, v.split_brain.split_brain_ns
        ));
    }
    match &v.liveness {
        None => unsure.push("liveness not observed".into()),
        Some(l) => fail.extend(l.problems.iter().map(|p| format!("liveness: {p:?}"))),
    }
    v.outcome = if !fail.is_empty() {
        VerdictOutcome::Fail
    } else if !unsure.is_empty() {
        VerdictOutcome::Inconclusive
    } else {
        VerdictOutcome::Pass
    };
    fail.extend(unsure);
    v.reasons = fail;
}

#[cfg(test)]
mod tests;
