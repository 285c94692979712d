//! A soak's figures from its run directories (`vmatrix chaos summary <out dir>`): runs by
//! verdict, faults of each kind (injected and skipped), operations, acknowledged writes, lost
//! writes, split-brain intervals, and per fault kind the time clients waited to be served
//! again, and for faults that made the manager fail over, the time to the decision (term
//! change) and to the VM protected again. Markdown, for `docs/RELIABILITY.md`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::checker::{Verdict, VerdictOutcome};
use crate::report::html::percentile;
use crate::report::{parse_manager_events, TimelineEvent};
use crate::run_dir::{self, RunInfo};
use crate::schedule::{FaultKind, Injection};

/// What a set of runs amounts to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoakSummary {
    /// Run directories read.
    pub runs: usize,
    /// Runs passed, failed, inconclusive, not checked.
    pub verdicts: [usize; 4],
    /// Faults injected, by kind.
    pub injected: BTreeMap<FaultKind, usize>,
    /// Faults skipped (target not there), by kind.
    pub skipped: BTreeMap<FaultKind, usize>,
    /// Client operations.
    pub ops: u64,
    /// Acknowledged writes.
    pub acked: u64,
    /// Keys that lost an acknowledged write.
    pub lost: usize,
    /// Bad reads.
    pub bad_reads: usize,
    /// Split-brain intervals, and their total time.
    pub split_brain: (usize, u64),
    /// Per kind, ns from injection until clients were served again (faults with an outage).
    pub serve_again: BTreeMap<FaultKind, Vec<u64>>,
    /// Per kind, faults during which clients saw no outage.
    pub no_outage: BTreeMap<FaultKind, usize>,
    /// Per kind, ns from injection to the manager's term change (failovers).
    pub failover: BTreeMap<FaultKind, Vec<u64>>,
    /// Per kind, ns from injection to the VM protected again after that term change.
    pub reprotected: BTreeMap<FaultKind, Vec<u64>>,
    /// Runs that did not pass: directory, seed, reasons.
    pub not_passed: Vec<(PathBuf, u64, Vec<String>)>,
}

/// The run directories under `out` (each holding a `schedule.json`), sorted.
pub fn run_dirs(out: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .map(|it| {
            it.flatten()
                .map(|e| e.path())
                .filter(|p| p.join(run_dir::SCHEDULE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

impl SoakSummary {
    /// Reads every run directory of `dirs`.
    pub fn of(dirs: &[PathBuf]) -> SoakSummary {
        let mut s = SoakSummary::default();
        for d in dirs {
            s.add(d);
        }
        s
    }

    fn add(&mut self, dir: &Path) {
        self.runs += 1;
        let verdict: Option<Verdict> =
            run_dir::read_json_if_present(&dir.join(run_dir::VERDICT_FILE)).unwrap_or(None);
        let run: Option<RunInfo> =
            run_dir::read_json_if_present(&dir.join(run_dir::RUN_FILE)).unwrap_or(None);
        self.verdicts[slot(verdict.as_ref().map(|v| v.outcome))] += 1;
        let injections = run_dir::read_json_lines::<Injection>(&dir.join(run_dir::INJECTIONS_FILE))
            .map(|l| l.items)
            .unwrap_or_default();
        for i in &injections {
            let skipped = i.note.as_deref().is_some_and(|n| n.starts_with("skipped:"));
            let map = match skipped {
                true => &mut self.skipped,
                false => &mut self.injected,
            };
            *map.entry(i.kind).or_default() += 1;
        }
        let Some(v) = verdict else {
            self.not_passed.push((
                dir.to_path_buf(),
                run.map_or(0, |r| r.seed),
                vec!["not checked".into()],
            ));
            return;
        };
        self.ops += v.ops.total;
        self.acked += v.ops.acknowledged_writes;
        self.lost += v.lost.violations.len();
        self.bad_reads += v.read_anomaly_counts.values().sum::<usize>();
        self.split_brain.0 += v.split_brain.intervals_total;
        self.split_brain.1 += v.split_brain.split_brain_ns;
        for r in &v.recovery {
            match r.serve_again_ns {
                Some(ns) => self.serve_again.entry(r.fault.kind).or_default().push(ns),
                None => *self.no_outage.entry(r.fault.kind).or_default() += 1,
            }
        }
        if v.outcome != VerdictOutcome::Pass {
            self.not_passed.push((
                dir.to_path_buf(),
                run.as_ref().map_or(0, |r| r.seed),
                v.reasons.clone(),
            ));
        }
        if let Some(run) = run {
            let bytes = std::fs::read(dir.join(run_dir::EVENTS_FILE)).unwrap_or_default();
            let events = parse_manager_events(&bytes, run.start_unix_ms).events;
            self.add_failovers(&injections, &events);
        }
    }

    /// For each injected fault, the first term change before the next fault, and the first
    /// `protected` after it.
    fn add_failovers(&mut self, injections: &[Injection], events: &[TimelineEvent]) {
        let mut starts: Vec<(u64, FaultKind)> = injections
            .iter()
            .filter(|i| !i.note.as_deref().is_some_and(|n| n.starts_with("skipped:")))
            .map(|i| (i.start_ns, i.kind))
            .collect();
        starts.sort();
        for (k, &(start, kind)) in starts.iter().enumerate() {
            let until = starts.get(k + 1).map_or(u64::MAX, |n| n.0);
            let within = |e: &&TimelineEvent| e.time_ns >= start && e.time_ns < until;
            let Some(change) = events
                .iter()
                .filter(within)
                .find(|e| e.kind == "term_changed")
            else {
                continue;
            };
            self.failover
                .entry(kind)
                .or_default()
                .push(change.time_ns - start);
            let protected = events
                .iter()
                .filter(within)
                .find(|e| e.kind == "protected" && e.time_ns >= change.time_ns);
            if let Some(p) = protected {
                self.reprotected
                    .entry(kind)
                    .or_default()
                    .push(p.time_ns - start);
            }
        }
    }

    /// The summary as Markdown.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let count = |o: Option<VerdictOutcome>| self.verdicts[slot(o)];
        let _ = writeln!(
            m,
            "| runs | passed | failed | inconclusive | not checked | operations | acknowledged writes | lost | bad reads | split-brain intervals |\n|---|---|---|---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({} ms) |\n",
            self.runs,
            count(Some(VerdictOutcome::Pass)),
            count(Some(VerdictOutcome::Fail)),
            count(Some(VerdictOutcome::Inconclusive)),
            count(None),
            self.ops,
            self.acked,
            self.lost,
            self.bad_reads,
            self.split_brain.0,
            self.split_brain.1 / 1_000_000
        );
        let _ = writeln!(
            m,
            "| fault | injected | skipped | clients served again after (p50 / p99 / max, ms) | no outage | failovers | term change after (p50 / p99 / max, ms) | protected again after (p50 / p99 / max, ms) |\n|---|---|---|---|---|---|---|---|"
        );
        let kinds: std::collections::BTreeSet<FaultKind> = self
            .injected
            .keys()
            .chain(self.skipped.keys())
            .copied()
            .collect();
        for k in kinds {
            let get = |m: &BTreeMap<FaultKind, usize>| m.get(&k).copied().unwrap_or(0);
            let _ = writeln!(
                m,
                "| {k} | {} | {} | {} | {} | {} | {} | {} |",
                get(&self.injected),
                get(&self.skipped),
                stats(self.serve_again.get(&k)),
                get(&self.no_outage),
                self.failover.get(&k).map_or(0, Vec::len),
                stats(self.failover.get(&k)),
                stats(self.reprotected.get(&k)),
            );
        }
        if !self.not_passed.is_empty() {
            let _ = writeln!(m, "\nRuns that did not pass:\n");
            for (dir, seed, reasons) in &self.not_passed {
                let _ = writeln!(
                    m,
                    "- seed {seed} (`{}`): {}",
                    dir.display(),
                    reasons.join("; ")
                );
            }
        }
        m
    }
}

/// The index of a verdict in [`SoakSummary::verdicts`].
fn slot(o: Option<VerdictOutcome>) -> usize {
    match o {
        Some(VerdictOutcome::Pass) => 0,
        Some(VerdictOutcome::Fail) => 1,
        Some(VerdictOutcome::Inconclusive) => 2,
        None => 3,
    }
}

/// "p50 / p99 / max" in ms, "-" for none.
fn stats(v: Option<&Vec<u64>>) -> String {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return "-".into();
    };
    let mut s = v.clone();
    s.sort_unstable();
    let ms = |ns: Option<u64>| ns.map_or("-".into(), |ns| format!("{}", ns / 1_000_000));
    format!(
        "{} / {} / {}",
        ms(percentile(&s, 50)),
        ms(percentile(&s, 99)),
        ms(s.last().copied())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_percentiles_in_ms() {
        assert_eq!(stats(None), "-");
        let v: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        assert_eq!(stats(Some(&v)), "50 / 99 / 100");
    }

    #[test]
    fn failovers_are_attributed_to_the_fault_before_them() {
        let inj = |start_ns, kind| Injection {
            event: 0,
            kind,
            target: String::new(),
            start_ns,
            end_ns: Some(start_ns + 1),
            note: None,
        };
        let ev = |time_ns, kind: &str| TimelineEvent {
            time_ns,
            kind: kind.into(),
            vm: None,
            host: None,
            term: None,
            text: String::new(),
        };
        let mut s = SoakSummary::default();
        s.add_failovers(
            &[
                inj(100, FaultKind::KillPrimaryHost),
                inj(1000, FaultKind::StallManager),
            ],
            &[
                ev(150, "detected"),
                ev(180, "term_changed"),
                ev(400, "protected"),
                ev(1200, "protected"),
            ],
        );
        assert_eq!(s.failover[&FaultKind::KillPrimaryHost], vec![80]);
        assert_eq!(s.reprotected[&FaultKind::KillPrimaryHost], vec![300]);
        assert!(!s.failover.contains_key(&FaultKind::StallManager));
    }
}
