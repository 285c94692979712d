//! At most one serving primary, from the guest frames seen on the clients' LAN.
//!
//! The runner captures every frame sent from the guest's MAC on the clients' LAN and notes the
//! host (bridge port) it came from, and the term that host's instance was at when it knows it.
//! With output commit and fencing, those frames come from one host at a time: the serving
//! primary, then after a failover the promoted one. Two hosts emitting guest frames at the same
//! time means two instances released output: split brain.
//!
//! Each host's frames are grouped into activity intervals (frames closer than `merge_gap_ns`
//! belong together). Two intervals of different hosts that overlap are a split-brain interval,
//! except a hand-over within the tolerance: an overlap no longer than `tolerance_ns` where one
//! interval ends and the other begins (frames captured at different points can be reordered by
//! a little). An interval of one host that the other's activity brackets, by more than the
//! tolerance on both sides, is never tolerated (the old host spoke in the middle of the new
//! one's service), even if it is a single frame: it counts 0 ns but is listed.
//!
//! What this does not see: output that never reached the LAN (a fenced primary that stopped in
//! time is the point), and two instances on the same host port.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Split-brain intervals listed at most.
const MAX_LISTED: usize = 1000;

/// One guest frame seen on the clients' LAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFrame {
    /// When (ns since the run's start).
    pub time_ns: u64,
    /// The host (or bridge port) it came from.
    pub host: String,
    /// The term of that host's instance, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
}

/// The split-brain check's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBrainConfig {
    /// Frames of one host closer than this are one activity interval.
    pub merge_gap_ns: u64,
    /// Overlaps at a hand-over up to this long are tolerated.
    pub tolerance_ns: u64,
}

impl Default for SplitBrainConfig {
    fn default() -> Self {
        SplitBrainConfig {
            merge_gap_ns: 200_000_000,
            tolerance_ns: 2_000_000,
        }
    }
}

/// Two hosts emitting guest frames at the same time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBrainInterval {
    /// Start of the overlap.
    pub start_ns: u64,
    /// End of the overlap.
    pub end_ns: u64,
    /// The two hosts (in name order).
    pub hosts: [String; 2],
    /// Frames each of them sent within the overlap.
    pub frames: [u64; 2],
    /// Terms each of them was at within the overlap, when known.
    pub terms: [Vec<u64>; 2],
}

/// The split-brain check's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBrain {
    /// Frames examined.
    pub frames: u64,
    /// Frames by host.
    pub frames_by_host: BTreeMap<String, u64>,
    /// The intervals (the first 1000).
    pub intervals: Vec<SplitBrainInterval>,
    /// How many intervals there were.
    pub intervals_total: usize,
    /// Total time during which two hosts served (union of the intervals).
    pub split_brain_ns: u64,
}

impl SplitBrain {
    /// Whether no two hosts served at once.
    pub fn passed(&self) -> bool {
        self.intervals_total == 0
    }
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    host: usize,
    start: u64,
    end: u64,
}

/// Checks the frames (any order).
pub fn check_split_brain(frames: &[GuestFrame], cfg: &SplitBrainConfig) -> SplitBrain {
    // Per host, its frames' (time, term) sorted.
    let mut by_host: BTreeMap<&str, Vec<(u64, Option<u64>)>> = BTreeMap::new();
    for f in frames {
        by_host
            .entry(&f.host)
            .or_default()
            .push((f.time_ns, f.term));
    }
    let hosts: Vec<&str> = by_host.keys().copied().collect();
    let times: Vec<Vec<(u64, Option<u64>)>> = by_host
        .into_values()
        .map(|mut v| {
            v.sort_unstable();
            v
        })
        .collect();
    let mut activity = Vec::new();
    for (host, ts) in times.iter().enumerate() {
        let mut current: Option<Activity> = None;
        for &(t, _) in ts {
            match &mut current {
                Some(a) if t - a.end <= cfg.merge_gap_ns => a.end = t,
                _ => {
                    activity.extend(current.take());
                    current = Some(Activity {
                        host,
                        start: t,
                        end: t,
                    });
                }
            }
        }
        activity.extend(current);
    }
    activity.sort_by_key(|a| (a.start, a.end, a.host));
    let mut out = SplitBrain {
        frames: frames.len() as u64,
        frames_by_host: hosts
            .iter()
            .zip(&times)
            .map(|(h, t)| (h.to_string(), t.len() as u64))
            .collect(),
        ..SplitBrain::default()
    };
    let mut spans = Vec::new();
    for (i, a) in activity.iter().enumerate() {
        for b in activity[i + 1..].iter().take_while(|b| b.start <= a.end) {
            if a.host == b.host || tolerated(a, b, cfg.tolerance_ns) {
                continue;
            }
            let (start, end) = (b.start, a.end.min(b.end));
            spans.push((start, end));
            out.intervals_total += 1;
            if out.intervals.len() < MAX_LISTED {
                out.intervals
                    .push(interval(&hosts, &times, a.host, b.host, start, end));
            }
        }
    }
    out.split_brain_ns = union_length(spans);
    out
}

/// Whether the overlap of `a` and `b` (`a` starting first, overlapping) is a hand-over.
fn tolerated(a: &Activity, b: &Activity, tolerance: u64) -> bool {
    let overlap = a.end.min(b.end) - b.start;
    let bracketed = b.start > a.start + tolerance && b.end + tolerance < a.end;
    overlap <= tolerance && !bracketed
}

fn interval(
    hosts: &[&str],
    times: &[Vec<(u64, Option<u64>)>],
    a: usize,
    b: usize,
    start: u64,
    end: u64,
) -> SplitBrainInterval {
    let (a, b) = if hosts[a] <= hosts[b] { (a, b) } else { (b, a) };
    let within = |h: usize| {
        let ts = &times[h];
        let from = ts.partition_point(|&(t, _)| t < start);
        let to = ts.partition_point(|&(t, _)| t <= end);
        let terms: BTreeSet<u64> = ts[from..to].iter().filter_map(|&(_, term)| term).collect();
        ((to - from) as u64, terms.into_iter().collect::<Vec<_>>())
    };
    let (fa, ta) = within(a);
    let (fb, tb) = within(b);
    SplitBrainInterval {
        start_ns: start,
        end_ns: end,
        hosts: [hosts[a].to_string(), hosts[b].to_string()],
        frames: [fa, fb],
        terms: [ta, tb],
    }
}

/// The length of the union of closed spans.
fn union_length(mut spans: Vec<(u64, u64)>) -> u64 {
    spans.sort_unstable();
    let mut total = 0;
    let mut current: Option<(u64, u64)> = None;
    for (s, e) in spans {
        match &mut current {
            Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
            _ => {
                if let Some((cs, ce)) = current {
                    total += ce - cs;
                }
                current = Some((s, e));
            }
        }
    }
    total + current.map_or(0, |(s, e)| e - s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Frames every 10 ms from `host` over `[from_ms, to_ms]`.
    fn stream(host: &str, from_ms: u64, to_ms: u64, term: u64) -> Vec<GuestFrame> {
        (from_ms..=to_ms)
            .step_by(10)
            .map(|t| GuestFrame {
                time_ns: t * MS,
                host: host.into(),
                term: Some(term),
            })
            .collect()
    }

    fn check(frames: &[GuestFrame]) -> SplitBrain {
        check_split_brain(frames, &SplitBrainConfig::default())
    }

    #[test]
    fn a_clean_failover_passes() {
        // a serves, dies at 1000 ms; b serves from 1300 ms; a hand-over with 1 ms of
        // reordering is tolerated too.
        let mut f = stream("a", 0, 1000, 1);
        f.extend(stream("b", 1300, 3000, 2));
        f.extend(stream("c", 3001, 4000, 3));
        f.push(GuestFrame {
            time_ns: 3001 * MS + MS / 2,
            host: "b".into(),
            term: Some(2),
        });
        let r = check(&f);
        assert!(r.passed(), "{r:?}");
        assert_eq!(r.split_brain_ns, 0);
        assert_eq!(r.frames_by_host["a"], 101);
    }

    #[test]
    fn two_hosts_serving_at_once_is_split_brain() {
        let mut f = stream("a", 0, 2000, 1);
        f.extend(stream("b", 1500, 3000, 2));
        let r = check(&f);
        assert_eq!(r.intervals_total, 1);
        let i = &r.intervals[0];
        assert_eq!((i.start_ns, i.end_ns), (1500 * MS, 2000 * MS));
        assert_eq!(i.hosts, ["a".to_string(), "b".to_string()]);
        assert_eq!(i.frames, [51, 51]);
        assert_eq!(i.terms, [vec![1], vec![2]]);
        assert_eq!(r.split_brain_ns, 500 * MS);
    }

    #[test]
    fn a_single_stray_frame_inside_another_hosts_service_is_caught() {
        let mut f = stream("b", 0, 2000, 2);
        f.push(GuestFrame {
            time_ns: 1000 * MS + 3,
            host: "a".into(),
            term: None,
        });
        let r = check(&f);
        assert_eq!(r.intervals_total, 1, "{r:?}");
        // Frames within the (zero-length) overlap: a's stray one only.
        assert_eq!(r.intervals[0].frames, [1, 0]);
        assert!(r.intervals[0].terms.iter().all(Vec::is_empty));
        assert_eq!(r.split_brain_ns, 0);
        assert!(!r.passed());
    }

    #[test]
    fn overlaps_of_three_hosts_add_up_as_a_union() {
        let mut f = stream("a", 0, 1000, 1);
        f.extend(stream("b", 500, 1000, 1));
        f.extend(stream("c", 800, 1200, 1));
        let r = check(&f);
        assert_eq!(r.intervals_total, 3);
        assert_eq!(r.split_brain_ns, 500 * MS);
        assert_eq!(union_length(vec![(0, 10), (5, 7), (20, 30)]), 20);
    }

    #[test]
    fn nothing_seen_passes() {
        assert!(check(&[]).passed());
    }
}
