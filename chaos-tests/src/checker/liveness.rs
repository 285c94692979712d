//! Liveness and recovery: after the final heal the VM must be protected again and answer within
//! bounds; and, per fault, how long clients waited before the service answered again.
//!
//! The runner observes the first time after the heal that the manager reports the VM protected
//! and the first time a fresh client request is answered; [`check_liveness`] holds them against
//! [`LivenessBounds`]. [`outages`] finds the gaps in the clients' acknowledged operations (no op
//! completed ok for longer than a threshold) and [`recovery_times`] attributes them to faults:
//! the time from a fault's injection to the end of the first outage that overlaps it.

use serde::{Deserialize, Serialize};

use crate::history::Op;
use crate::schedule::{FaultKind, Injection, Schedule};

/// What the runner saw after the final heal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessObservation {
    /// When everything was healed.
    pub heal_ns: u64,
    /// When the manager first reported the VM protected at or after the heal (`None`: never,
    /// before the runner gave up).
    pub protected_ns: Option<u64>,
    /// When a request sent at or after the heal was first answered (`None`: never).
    pub answering_ns: Option<u64>,
}

/// How soon after the heal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessBounds {
    /// Protected again within this.
    pub protected_within_ns: u64,
    /// Answering within this.
    pub answering_within_ns: u64,
}

impl Default for LivenessBounds {
    fn default() -> Self {
        LivenessBounds {
            protected_within_ns: 30_000_000_000,
            answering_within_ns: 10_000_000_000,
        }
    }
}

/// A liveness bound missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum LivenessProblem {
    /// Never seen protected.
    NeverProtected,
    /// Protected, but later than the bound.
    ProtectedLate {
        /// After the heal.
        after_ns: u64,
    },
    /// Never answered.
    NeverAnswered,
    /// Answered, but later than the bound.
    AnsweredLate {
        /// After the heal.
        after_ns: u64,
    },
}

/// The liveness check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    /// What was seen.
    pub observed: LivenessObservation,
    /// Against what.
    pub bounds: LivenessBounds,
    /// Protected this long after the heal (0 if it already was).
    pub protected_after_ns: Option<u64>,
    /// Answering this long after the heal.
    pub answering_after_ns: Option<u64>,
    /// Bounds missed.
    pub problems: Vec<LivenessProblem>,
}

impl Liveness {
    /// Whether every bound held.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Holds the observation against the bounds.
pub fn check_liveness(observed: LivenessObservation, bounds: LivenessBounds) -> Liveness {
    let after = |t: Option<u64>| t.map(|t| t.saturating_sub(observed.heal_ns));
    let protected_after_ns = after(observed.protected_ns);
    let answering_after_ns = after(observed.answering_ns);
    let mut problems = Vec::new();
    match protected_after_ns {
        None => problems.push(LivenessProblem::NeverProtected),
        Some(a) if a > bounds.protected_within_ns => {
            problems.push(LivenessProblem::ProtectedLate { after_ns: a })
        }
        Some(_) => {}
    }
    match answering_after_ns {
        None => problems.push(LivenessProblem::NeverAnswered),
        Some(a) if a > bounds.answering_within_ns => {
            problems.push(LivenessProblem::AnsweredLate { after_ns: a })
        }
        Some(_) => {}
    }
    Liveness {
        observed,
        bounds,
        protected_after_ns,
        answering_after_ns,
        problems,
    }
}

/// A time with no acknowledged operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// The last ok completion before it.
    pub start_ns: u64,
    /// The first ok completion after it.
    pub end_ns: u64,
}

/// The gaps longer than `min_gap_ns` between consecutive ok completions (any client, any key).
pub fn outages(history: &[Op], min_gap_ns: u64) -> Vec<Outage> {
    let mut done: Vec<u64> = history
        .iter()
        .filter(|op| op.is_ok())
        .map(|op| op.complete_ns)
        .collect();
    done.sort_unstable();
    done.windows(2)
        .filter(|w| w[1] - w[0] > min_gap_ns)
        .map(|w| Outage {
            start_ns: w[0],
            end_ns: w[1],
        })
        .collect()
}

/// A fault's window, as injected (or planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// The scheduled event's index.
    pub event: u32,
    /// Its kind.
    pub kind: FaultKind,
    /// Injected.
    pub start_ns: u64,
    /// Healed.
    pub end_ns: u64,
}

impl FaultWindow {
    /// The windows as planned.
    pub fn from_schedule(schedule: &Schedule) -> Vec<FaultWindow> {
        schedule
            .events
            .iter()
            .map(|e| FaultWindow {
                event: e.index,
                kind: e.fault.kind(),
                start_ns: e.start_ns,
                end_ns: e.end_ns,
            })
            .collect()
    }

    /// The windows as injected; one never healed ends at `heal_ns` (the final heal).
    pub fn from_injections(injections: &[Injection], heal_ns: u64) -> Vec<FaultWindow> {
        injections
            .iter()
            .map(|i| FaultWindow {
                event: i.event,
                kind: i.kind,
                start_ns: i.start_ns,
                end_ns: i.end_ns.unwrap_or(heal_ns).max(i.start_ns),
            })
            .collect()
    }
}

/// How long clients waited after one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryTime {
    /// The fault.
    pub fault: FaultWindow,
    /// From its injection to the end of the first outage overlapping it; `None` if no outage
    /// overlapped it (clients saw no gap).
    pub serve_again_ns: Option<u64>,
}

/// The recovery time of each fault (outages from [`outages`], both sorted by time).
pub fn recovery_times(faults: &[FaultWindow], outages: &[Outage]) -> Vec<RecoveryTime> {
    faults
        .iter()
        .map(|&fault| RecoveryTime {
            fault,
            serve_again_ns: outages
                .iter()
                .find(|o| o.start_ns <= fault.end_ns && o.end_ns >= fault.start_ns)
                .map(|o| o.end_ns.saturating_sub(fault.start_ns)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{get, set, unknown};

    const S: u64 = 1_000_000_000;

    #[test]
    fn liveness_bounds() {
        let b = LivenessBounds::default();
        let ok = check_liveness(
            LivenessObservation {
                heal_ns: 100 * S,
                protected_ns: Some(99 * S),
                answering_ns: Some(101 * S),
            },
            b,
        );
        assert!(ok.passed());
        assert_eq!(ok.protected_after_ns, Some(0));
        assert_eq!(ok.answering_after_ns, Some(S));
        let late = check_liveness(
            LivenessObservation {
                heal_ns: 0,
                protected_ns: Some(31 * S),
                answering_ns: None,
            },
            b,
        );
        assert_eq!(
            late.problems,
            vec![
                LivenessProblem::ProtectedLate { after_ns: 31 * S },
                LivenessProblem::NeverAnswered
            ]
        );
        let never = check_liveness(
            LivenessObservation {
                heal_ns: 0,
                protected_ns: None,
                answering_ns: Some(11 * S),
            },
            b,
        );
        assert_eq!(
            never.problems,
            vec![
                LivenessProblem::NeverProtected,
                LivenessProblem::AnsweredLate { after_ns: 11 * S }
            ]
        );
    }

    #[test]
    fn outages_are_attributed_to_faults() {
        let mut h = Vec::new();
        // Ok ops every 10 ms, except between 1.0 s and 1.4 s; an unknown op inside does not
        // count as service.
        for i in 0..300u64 {
            let t = i * 10_000_000;
            if (1_000_000_001..1_400_000_000).contains(&t) {
                continue;
            }
            h.push(set(1, i, "k", &format!("v{i}"), (t, t)));
        }
        h.push(unknown(get(
            2,
            1,
            "k",
            None,
            (1_100_000_000, 1_200_000_000),
        )));
        let o = outages(&h, 50_000_000);
        assert_eq!(
            o,
            vec![Outage {
                start_ns: 1_000_000_000,
                end_ns: 1_400_000_000
            }]
        );
        let faults = [
            FaultWindow {
                event: 0,
                kind: FaultKind::KillPrimaryHost,
                start_ns: 1_005_000_000,
                end_ns: 2_000_000_000,
            },
            FaultWindow {
                event: 1,
                kind: FaultKind::LinkDelay,
                start_ns: 2_500_000_000,
                end_ns: 2_600_000_000,
            },
        ];
        let r = recovery_times(&faults, &o);
        assert_eq!(r[0].serve_again_ns, Some(395_000_000));
        assert_eq!(r[1].serve_again_ns, None);
    }
}
