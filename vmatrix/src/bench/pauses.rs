//! Pauses collected from a protected VM's counters during a measurement, and pooled over the
//! rounds of a bench (`--busy`, `--dirty-sources`, `--hog-vm`): a row's p99 rests on the ~200
//! pauses of its 4 s, the pooled table's on every round's.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Every pause of the next `d` (µs; drained from `stats.recent_pauses`, which keeps the last
/// 200, often enough to miss none) and the checkpoints per second meanwhile.
pub(super) fn collect(stats: &primary::Stats, d: Duration) -> (Vec<u32>, f64) {
    let take = || {
        let mut r = stats
            .recent_pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.drain(..).collect::<Vec<u32>>()
    };
    take();
    let (t0, e0) = (Instant::now(), stats.epochs.load(Ordering::Relaxed));
    let mut out = Vec::new();
    while t0.elapsed() < d {
        std::thread::sleep((d - t0.elapsed()).min(Duration::from_millis(500)));
        out.extend(take());
    }
    let epochs = stats.epochs.load(Ordering::Relaxed) - e0;
    (out, epochs as f64 / t0.elapsed().as_secs_f64())
}

/// The `p` quantile of `v` (nearest rank), sorting it.
pub(super) fn quantile(v: &mut [u32], p: f64) -> u32 {
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n => v[((n - 1) as f64 * p).round() as usize],
    }
}

/// The pauses of every round, per condition (a pause path, a harvest source, a hog's limit)
/// and workload.
pub(super) struct Pool {
    conditions: Vec<String>,
    workloads: Vec<String>,
    pauses: Vec<Vec<u32>>,
}

impl Pool {
    pub(super) fn new(conditions: Vec<String>, workloads: &[&str]) -> Pool {
        let n = conditions.len() * workloads.len();
        Pool {
            conditions,
            workloads: workloads.iter().map(|w| w.to_string()).collect(),
            pauses: vec![Vec::new(); n],
        }
    }

    /// Names condition `c` (as its rows did).
    pub(super) fn relabel(&mut self, c: usize, label: String) {
        if let Some(l) = self.conditions.get_mut(c) {
            *l = label;
        }
    }

    /// Adds the pauses of condition `c` under each workload (in order) of one round.
    pub(super) fn add(&mut self, c: usize, per_workload: Vec<Vec<u32>>) {
        debug_assert_eq!(per_workload.len(), self.workloads.len());
        for (w, v) in per_workload.into_iter().enumerate() {
            if let Some(p) = self.pauses.get_mut(c * self.workloads.len() + w) {
                p.extend(v);
            }
        }
    }

    /// Prints the pooled table: `what` heads the conditions' column; with a `baseline`
    /// condition (its index and name), each p99 over the baseline's under the same workload.
    pub(super) fn print(&mut self, rounds: usize, what: &str, baseline: Option<(usize, &str)>) {
        println!("\nEvery round's pauses pooled per condition (rounds: {rounds}):\n");
        let ratio = baseline.map_or(String::new(), |(_, name)| format!(" p99 ÷ {name} |"));
        let dashes = if baseline.is_some() { "---:|" } else { "" };
        println!("| {what} | workload | pauses | p50 | p99 |{ratio}");
        println!("|---|---|---:|---:|---:|{dashes}");
        let n = self.workloads.len();
        let p99s: Vec<u32> = self.pauses.iter_mut().map(|v| quantile(v, 0.99)).collect();
        for (c, label) in self.conditions.iter().enumerate() {
            for (w, name) in self.workloads.iter().enumerate() {
                let i = c * n + w;
                let p50 = quantile(&mut self.pauses[i], 0.5);
                let cell = baseline.map_or(String::new(), |(b, _)| {
                    let base = f64::from(p99s[b * n + w].max(1));
                    format!(" {:.2}× |", f64::from(p99s[i]) / base)
                });
                println!(
                    "| {label} | {name} | {} | {p50} µs | {} µs |{cell}",
                    self.pauses[i].len(),
                    p99s[i]
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_and_pools_keep_rounds_apart_by_condition() {
        assert_eq!(quantile(&mut [], 0.5), 0);
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), 51);
        assert_eq!(quantile(&mut v, 0.99), 99);
        let mut p = Pool::new(vec!["a".into(), "b".into()], &["idle", "busy"]);
        p.add(1, vec![vec![1, 2], vec![3]]);
        p.add(1, vec![vec![4], vec![]]);
        p.add(0, vec![vec![9], vec![]]);
        assert_eq!(p.pauses, vec![vec![9], vec![], vec![1, 2, 4], vec![3]]);
    }
}
