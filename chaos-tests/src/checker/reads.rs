//! Cheap direct checks of every read, each a proof of a violation on its own.
//!
//! The linearizability search finds all of these too, but these name the read and the write
//! involved directly, in O(n log n), whatever the search's budget:
//!
//! - **never written**: an ok get returned a value no set of the key wrote;
//! - **failed write**: it returned the value of a set reported `fail` (so it was applied);
//! - **future read**: it completed before the set of its value was invoked;
//! - **stale read**: an ok set `w` was acknowledged before the get was invoked, and the value
//!   read is older than `w`: absent, or written by a set that completed before `w` was invoked.
//!   (Touching times count as concurrent, never as a violation.)

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::history::Op;

/// What is wrong with a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadAnomalyKind {
    /// A value no set of the key wrote.
    NeverWritten,
    /// The value of a failed set.
    FailedWrite,
    /// A value whose set was invoked after the read completed.
    FutureRead,
    /// A value older than a set acknowledged before the read was invoked.
    StaleRead,
}

/// One bad read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAnomaly {
    /// What is wrong.
    pub kind: ReadAnomalyKind,
    /// The get.
    pub read: Op,
    /// The set of the value read, if there is one.
    pub write: Option<Op>,
    /// For a stale read: the acknowledged set it missed.
    pub newer: Option<Op>,
}

/// Checks every ok get of one key's ops.
pub fn check_reads(ops: &[&Op]) -> Vec<ReadAnomaly> {
    let mut writes: HashMap<&str, &Op> = HashMap::new();
    for op in ops {
        if let Some(v) = op.written() {
            writes.insert(v, op);
        }
    }
    // Ok sets by completion; `newest[i]` = the one invoked last among the first i + 1.
    let mut acked: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|op| op.is_set() && op.is_ok())
        .collect();
    acked.sort_by_key(|op| op.complete_ns);
    let mut newest: Vec<&Op> = Vec::with_capacity(acked.len());
    for op in &acked {
        let best = match newest.last() {
            Some(prev) if prev.invoke_ns >= op.invoke_ns => *prev,
            _ => op,
        };
        newest.push(best);
    }
    let mut out = Vec::new();
    for read in ops.iter().copied() {
        let Some(value) = read.read() else { continue };
        let write = value.and_then(|v| writes.get(v).copied());
        let anomaly = |kind, newer: Option<&Op>| ReadAnomaly {
            kind,
            read: read.clone(),
            write: write.cloned(),
            newer: newer.cloned(),
        };
        match (value, write) {
            (Some(_), None) => out.push(anomaly(ReadAnomalyKind::NeverWritten, None)),
            (Some(_), Some(w)) if w.is_fail() => {
                out.push(anomaly(ReadAnomalyKind::FailedWrite, None))
            }
            (Some(_), Some(w)) if w.invoke_ns > read.complete_ns => {
                out.push(anomaly(ReadAnomalyKind::FutureRead, None))
            }
            _ => {
                // The newest set acknowledged strictly before the read was invoked.
                let n = acked.partition_point(|op| op.complete_ns < read.invoke_ns);
                let Some(newer) = n.checked_sub(1).map(|i| newest[i]) else {
                    continue;
                };
                let stale = match write {
                    None => true,
                    // An unknown set has an open end: it is never older than anything.
                    Some(w) => w.is_ok() && w.complete_ns < newer.invoke_ns,
                };
                if stale {
                    out.push(anomaly(ReadAnomalyKind::StaleRead, Some(newer)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{failed, get, set, unknown};

    fn kinds(ops: &[Op]) -> Vec<ReadAnomalyKind> {
        let refs: Vec<&Op> = ops.iter().collect();
        check_reads(&refs).into_iter().map(|a| a.kind).collect()
    }

    #[test]
    fn good_reads_pass() {
        let h = [
            get(9, 1, "k", None, (0, 5)),
            set(1, 1, "k", "a", (10, 20)),
            set(1, 2, "k", "b", (30, 40)),
            // Concurrent with b: either value.
            get(2, 1, "k", Some("a"), (35, 45)),
            get(2, 2, "k", Some("b"), (46, 50)),
            // c is unknown: it may apply any time after 60.
            unknown(set(3, 1, "k", "c", (60, 61))),
            get(2, 3, "k", Some("c"), (100, 110)),
        ];
        assert!(kinds(&h).is_empty(), "{:?}", kinds(&h));
    }

    #[test]
    fn a_stale_read_names_the_write_it_missed() {
        let h = [
            set(1, 1, "k", "a", (10, 20)),
            set(1, 2, "k", "b", (30, 40)),
            get(2, 1, "k", Some("a"), (41, 45)),
        ];
        let refs: Vec<&Op> = h.iter().collect();
        let a = check_reads(&refs);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, ReadAnomalyKind::StaleRead);
        assert_eq!(a[0].write.as_ref().unwrap().written(), Some("a"));
        assert_eq!(a[0].newer.as_ref().unwrap().written(), Some("b"));
        // Absent after an acknowledged set is stale too.
        let h = [
            set(1, 1, "k", "a", (10, 20)),
            get(2, 1, "k", None, (21, 25)),
        ];
        assert_eq!(kinds(&h), vec![ReadAnomalyKind::StaleRead]);
        // The newest acknowledged set is the one invoked last, not completed last.
        let h = [
            set(1, 1, "k", "a", (10, 100)),
            set(1, 2, "k", "b", (50, 60)),
            set(1, 3, "k", "x", (0, 5)),
            get(2, 1, "k", Some("x"), (101, 105)),
        ];
        let refs: Vec<&Op> = h.iter().collect();
        let a = check_reads(&refs);
        assert_eq!(a[0].newer.as_ref().unwrap().written(), Some("b"));
    }

    #[test]
    fn never_written_failed_and_future_reads() {
        let h = [
            get(2, 1, "k", Some("nope"), (0, 5)),
            failed(set(1, 1, "k", "f", (10, 20))),
            get(2, 2, "k", Some("f"), (30, 35)),
            get(2, 3, "k", Some("later"), (40, 45)),
            set(1, 2, "k", "later", (50, 60)),
        ];
        assert_eq!(
            kinds(&h),
            vec![
                ReadAnomalyKind::NeverWritten,
                ReadAnomalyKind::FailedWrite,
                ReadAnomalyKind::FutureRead
            ]
        );
    }
}
