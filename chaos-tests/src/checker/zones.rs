//! Zones: a fast way to find where a register history with unique values goes wrong.
//!
//! For each value, its cluster is its set and every get that read it (the initial absent value
//! has a virtual set at time 0). With `f` the earliest completion and `s` the latest invoke in
//! the cluster, the cluster's zone is *forward* `[f, s]` when `f < s` (a time during which the
//! value must have been the register's, since someone had finished writing or reading it and
//! someone else still read it afterwards) and *backward* `[s, f]` otherwise. Gibbons & Korach
//! (and Golab, Li & Shah's Δ-atomicity) show a history whose reads are mapped to unique writes
//! is linearizable exactly when no two forward zones overlap, no backward zone lies inside a
//! forward zone, and no read precedes its write.
//!
//! This module only *proposes*: each conflict it finds becomes a small sub-history (the two
//! clusters) that the search in [`super::linear`] must confirm before anything is reported, so
//! a boundary case of the theorem (touching times, open-ended sets) can never produce a false
//! failure. What it buys is speed where the search is slowest: a failing history with many
//! concurrent writes, whose exhaustive search would take exponential time, is refuted by the
//! search on a handful of ops.

use std::collections::BTreeMap;

use super::linear::{Action, LinOp, DEAD, UNWRITTEN};

/// One cluster's zone.
#[derive(Debug, Clone)]
struct Zone {
    /// Start and end of the zone.
    from: u64,
    to: u64,
    /// Indices (into the prepared ops) of the cluster's members.
    members: Vec<usize>,
}

/// Up to `limit` small sets of op indices (into `ops`) that the zones say cannot be
/// linearized together.
pub(super) fn candidates(ops: &[LinOp], limit: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    // Clusters by value: `None` is the initial absent value.
    let mut clusters: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    let mut dead = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op.action {
            Action::Read(Some(UNWRITTEN)) => out.push(vec![i]),
            Action::Read(v) => clusters.entry(v).or_default().push(i),
            Action::Write(DEAD) => dead.push(i),
            Action::Write(v) => clusters.entry(Some(v)).or_default().push(i),
        }
    }
    let mut forward = Vec::new();
    let mut backward = Vec::new();
    for (value, members) in clusters {
        let write = members
            .iter()
            .copied()
            .find(|&i| matches!(ops[i].action, Action::Write(_)));
        // A read that completed before its set began.
        if let Some(w) = write {
            if let Some(&r) = members.iter().find(|&&r| ops[r].ret < ops[w].call) {
                out.push(vec![w, r]);
            }
        }
        // Real times are shifted by one so that the initial value's virtual set, at 0, comes
        // before every op.
        let virtual_set = value.is_none().then_some(0);
        let f = members
            .iter()
            .map(|&i| ops[i].ret.saturating_add(1))
            .chain(virtual_set)
            .min();
        let s = members
            .iter()
            .map(|&i| ops[i].call.saturating_add(1))
            .chain(virtual_set)
            .max();
        let (Some(f), Some(s)) = (f, s) else { continue };
        let zone = |from, to| Zone { from, to, members };
        if f < s {
            forward.push(zone(f, s));
        } else {
            backward.push(zone(s, f));
        }
    }
    for i in dead {
        backward.push(Zone {
            from: ops[i].call.saturating_add(1),
            to: ops[i].ret.saturating_add(1),
            members: vec![i],
        });
    }
    forward.sort_by_key(|z| (z.from, z.to));
    overlapping_forward(&forward, &mut out);
    inside_forward(&forward, &backward, &mut out);
    out.truncate(limit);
    out
}

/// Pairs of forward zones that overlap (each zone against the one reaching furthest before it).
fn overlapping_forward(forward: &[Zone], out: &mut Vec<Vec<usize>>) {
    let mut furthest: Option<&Zone> = None;
    for z in forward {
        if let Some(prev) = furthest {
            if z.from < prev.to {
                out.push(union(prev, z));
            }
        }
        if furthest.is_none_or(|p| z.to > p.to) {
            furthest = Some(z);
        }
    }
}

/// Backward zones that lie strictly inside a forward zone.
fn inside_forward(forward: &[Zone], backward: &[Zone], out: &mut Vec<Vec<usize>>) {
    // For each prefix of the forward zones (by start), the one reaching furthest.
    let mut reach: Vec<usize> = Vec::with_capacity(forward.len());
    for (i, z) in forward.iter().enumerate() {
        let best = match reach.last() {
            Some(&b) if forward[b].to >= z.to => b,
            _ => i,
        };
        reach.push(best);
    }
    for b in backward {
        let n = forward.partition_point(|f| f.from < b.from);
        if let Some(&fi) = n.checked_sub(1).and_then(|i| reach.get(i)) {
            if b.to < forward[fi].to {
                out.push(union(&forward[fi], b));
            }
        }
    }
}

fn union(a: &Zone, b: &Zone) -> Vec<usize> {
    let mut v: Vec<usize> = a.members.iter().chain(&b.members).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, action: Action) -> LinOp {
        LinOp {
            call,
            ret,
            action,
            src: 0,
        }
    }

    #[test]
    fn finds_each_kind_of_conflict() {
        use Action::*;
        // Stale read: the set of b lies inside a's forward zone.
        let ops = [
            op(10, 20, Write(0)),
            op(30, 40, Write(DEAD)),
            op(50, 60, Read(Some(0))),
        ];
        assert_eq!(candidates(&ops, 8), vec![vec![0, 1, 2]]);
        // Two values each read after both were written, one after the other.
        let ops = [
            op(0, 100, Write(0)),
            op(0, 100, Write(1)),
            op(200, 201, Read(Some(0))),
            op(210, 211, Read(Some(1))),
        ];
        assert_eq!(candidates(&ops, 8), vec![vec![0, 1, 2, 3]]);
        // Absent read after an acknowledged set; a read of nothing; a read from the future.
        let ops = [op(0, 10, Write(DEAD)), op(20, 30, Read(None))];
        assert_eq!(candidates(&ops, 8), vec![vec![0, 1]]);
        let ops = [op(0, 10, Read(Some(UNWRITTEN)))];
        assert_eq!(candidates(&ops, 8), vec![vec![0]]);
        let ops = [op(0, 10, Read(Some(0))), op(20, 30, Write(0))];
        assert_eq!(candidates(&ops, 8)[0], vec![1, 0]);
    }

    #[test]
    fn a_good_history_has_no_conflict() {
        use Action::*;
        let ops = [
            op(0, 5, Read(None)),
            op(10, 20, Write(0)),
            op(21, 30, Read(Some(0))),
            op(40, 60, Write(DEAD)),
            op(45, 55, Write(1)),
            op(50, 58, Read(Some(1))),
        ];
        assert!(candidates(&ops, 8).is_empty());
    }
}
