//! Lost acknowledged writes: after the heal, does every key hold what it must?
//!
//! For each key the runner reads the final value once everything is healed. That value is
//! allowed when it is the value of a set that could have been the last one applied:
//!
//! - an `ok` set that no other `ok` set follows in real time (no `ok` set was invoked after it
//!   completed): the last acknowledged write, or one concurrent with it;
//! - an `unknown` set: its end is open, so it may have been applied at any time after its
//!   invoke, at or after the last acknowledged write included;
//! - absent (`None`) only if no set of the key was acknowledged.
//!
//! Anything else is a violation: the key is absent, holds a superseded value, a value whose set
//! failed, or a value never written. A key with acknowledged sets that the runner did not read
//! is reported as unread (the check could not be made).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::Op;

/// The most allowed values a violation lists.
const MAX_LISTED: usize = 16;

/// What the key held instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostKind {
    /// The key is absent.
    Absent,
    /// The value of a set that a later acknowledged set superseded.
    Superseded,
    /// The value of a set that failed (it must not have been applied).
    FailedWrite,
    /// A value no set of this key wrote.
    NeverWritten,
}

/// One key that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrite {
    /// The key.
    pub key: String,
    /// What it held instead.
    pub kind: LostKind,
    /// The value read after the heal (`None` = absent).
    pub found: Option<String>,
    /// The value of the last acknowledged set (the `ok` set invoked last).
    pub last_acknowledged: Option<String>,
    /// Allowed values (at most 16 listed).
    pub allowed: Vec<String>,
    /// How many values were allowed.
    pub allowed_total: usize,
}

/// The lost-write check's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrites {
    /// Keys checked (read after the heal and written or read in the history).
    pub keys_checked: usize,
    /// Acknowledged sets in the history.
    pub acknowledged_writes: usize,
    /// Violations.
    pub violations: Vec<LostWrite>,
    /// Keys with acknowledged sets that were not read after the heal.
    pub unread_keys: Vec<String>,
}

impl LostWrites {
    /// Whether nothing was lost and every key that must be read was.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.unread_keys.is_empty()
    }
}

/// Checks the final values against the history (ops grouped by key).
pub fn check_lost_writes(
    by_key: &BTreeMap<&str, Vec<&Op>>,
    finals: &BTreeMap<String, Option<String>>,
) -> LostWrites {
    let mut out = LostWrites::default();
    let keys: BTreeSet<&str> = by_key
        .keys()
        .copied()
        .chain(finals.keys().map(String::as_str))
        .collect();
    for key in keys {
        let ops = by_key.get(key).map(Vec::as_slice).unwrap_or_default();
        let acked = ops.iter().filter(|op| op.is_set() && op.is_ok()).count();
        out.acknowledged_writes += acked;
        let Some(found) = finals.get(key) else {
            if acked > 0 {
                out.unread_keys.push(key.to_string());
            }
            continue;
        };
        out.keys_checked += 1;
        if let Some(v) = check_key(key, ops, found.as_deref()) {
            out.violations.push(v);
        }
    }
    out
}

/// The violation of one key, if any.
fn check_key(key: &str, ops: &[&Op], found: Option<&str>) -> Option<LostWrite> {
    let sets: Vec<&Op> = ops.iter().copied().filter(|op| op.is_set()).collect();
    let last_acked = sets
        .iter()
        .filter(|op| op.is_ok())
        .max_by_key(|op| (op.invoke_ns, op.complete_ns));
    let bound = last_acked.map(|op| op.invoke_ns);
    let allowed: Vec<&str> = sets
        .iter()
        .filter(|op| match bound {
            _ if op.is_fail() => false,
            _ if op.is_unknown() => true,
            Some(b) => op.complete_ns >= b,
            None => true,
        })
        .filter_map(|op| op.written())
        .collect();
    let kind = match found {
        None if last_acked.is_none() => return None,
        Some(v) if allowed.contains(&v) => return None,
        None => LostKind::Absent,
        Some(v) => match sets.iter().find(|op| op.written() == Some(v)) {
            None => LostKind::NeverWritten,
            Some(op) if op.is_fail() => LostKind::FailedWrite,
            Some(_) => LostKind::Superseded,
        },
    };
    Some(LostWrite {
        key: key.to_string(),
        kind,
        found: found.map(str::to_string),
        last_acknowledged: last_acked.and_then(|op| op.written()).map(str::to_string),
        allowed: allowed
            .iter()
            .take(MAX_LISTED)
            .map(|v| v.to_string())
            .collect(),
        allowed_total: allowed.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{failed, get, set, unknown};

    fn run(ops: &[Op], finals: &[(&str, Option<&str>)]) -> LostWrites {
        let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in ops {
            by_key.entry(op.key.as_str()).or_default().push(op);
        }
        let finals = finals
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        check_lost_writes(&by_key, &finals)
    }

    fn history() -> Vec<Op> {
        vec![
            set(1, 1, "k", "a", (0, 10)),
            set(1, 2, "k", "b", (20, 30)),
            // c is concurrent with b; d was in flight when the client gave up.
            set(2, 1, "k", "c", (25, 40)),
            unknown(set(3, 1, "k", "d", (5, 8))),
            failed(set(3, 2, "k", "e", (50, 50))),
            get(4, 1, "k", Some("b"), (60, 70)),
        ]
    }

    #[test]
    fn the_last_acknowledged_or_an_in_flight_value_passes() {
        for v in ["b", "c", "d"] {
            let r = run(&history(), &[("k", Some(v))]);
            assert!(r.passed(), "{v}: {r:?}");
            assert_eq!(r.keys_checked, 1);
            assert_eq!(r.acknowledged_writes, 3);
        }
        // Nothing acknowledged: absent or an unknown value.
        let h = [unknown(set(1, 1, "x", "u", (0, 5)))];
        assert!(run(&h, &[("x", None)]).passed());
        assert!(run(&h, &[("x", Some("u"))]).passed());
    }

    #[test]
    fn a_lost_write_is_reported_with_expected_and_found() {
        let cases = [
            (None, LostKind::Absent),
            (Some("a"), LostKind::Superseded),
            (Some("e"), LostKind::FailedWrite),
            (Some("zz"), LostKind::NeverWritten),
        ];
        for (found, kind) in cases {
            let r = run(&history(), &[("k", found)]);
            assert_eq!(r.violations.len(), 1, "{found:?}");
            let v = &r.violations[0];
            assert_eq!(v.kind, kind);
            assert_eq!(v.found.as_deref(), found);
            assert_eq!(v.last_acknowledged.as_deref(), Some("c"));
            assert_eq!(v.allowed, vec!["b", "c", "d"]);
            assert_eq!(v.allowed_total, 3);
        }
    }

    #[test]
    fn unread_and_unknown_keys() {
        let r = run(&history(), &[]);
        assert_eq!(r.unread_keys, vec!["k"]);
        assert!(!r.passed());
        // A key read after the heal that no op touched must be absent.
        let r = run(&history(), &[("k", Some("b")), ("ghost", Some("boo"))]);
        assert_eq!(r.violations[0].key, "ghost");
        assert_eq!(r.violations[0].kind, LostKind::NeverWritten);
        assert!(run(&history(), &[("k", Some("b")), ("ghost", None)]).passed());
    }
}
