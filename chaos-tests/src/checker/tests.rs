//! Whole-verdict tests: hand-built histories that must pass and that must fail, and property
//! tests against a simulated register.

use proptest::prelude::*;

use super::*;
use crate::history::tests::{failed, get, set, unknown};
use crate::history::{OpKind, Outcome};
use crate::schedule::rng::Xoshiro256;

const MS: u64 = 1_000_000;

fn finals(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect()
}

fn healthy() -> LivenessObservation {
    LivenessObservation {
        heal_ns: 100 * MS,
        protected_ns: Some(150 * MS),
        answering_ns: Some(101 * MS),
    }
}

fn frames(host: &str, from_ms: u64, to_ms: u64) -> Vec<GuestFrame> {
    (from_ms..=to_ms)
        .map(|t| GuestFrame {
            time_ns: t * MS,
            host: host.into(),
            term: None,
        })
        .collect()
}

fn verdict(
    history: &[Op],
    fin: &BTreeMap<String, Option<String>>,
    frames: &[GuestFrame],
) -> Verdict {
    let input = CheckInput {
        history,
        finals: fin,
        frames,
        liveness: Some(healthy()),
        faults: &[],
    };
    check(&input, &CheckConfig::default()).unwrap()
}

/// Two clients on two keys, a concurrent overwrite, an unknown set, a failed get.
fn good_history() -> Vec<Op> {
    vec![
        set(1, 1, "x", "x1", (0, 10)),
        get(2, 1, "x", Some("x1"), (11, 20)),
        set(1, 2, "x", "x2", (30, 50)),
        set(2, 2, "x", "x3", (35, 45)),
        get(1, 3, "x", Some("x2"), (60, 70)),
        set(1, 4, "y", "y1", (60, 75)),
        unknown(set(2, 3, "y", "y2", (80, 90))),
        failed(get(2, 4, "y", None, (95, 95))),
        get(1, 5, "y", Some("y1"), (96, 99)),
    ]
}

#[test]
fn a_good_run_passes() {
    let mut f = frames("a", 0, 40);
    f.extend(frames("b", 60, 99));
    let v = verdict(
        &good_history(),
        &finals(&[("x", Some("x2")), ("y", Some("y2"))]),
        &f,
    );
    assert_eq!(v.outcome, VerdictOutcome::Pass, "{:?}", v.reasons);
    assert!(v.reasons.is_empty());
    assert_eq!(v.ops.total, 9);
    assert_eq!(v.ops.acknowledged_writes, 4);
    assert_eq!(v.ops.unknown, 1);
    assert_eq!(v.ops.fail, 1);
    assert_eq!(v.ops.keys, 2);
    assert_eq!(v.linearizability.linearizable_keys, 2);
}

#[test]
fn a_lost_write_fails() {
    let v = verdict(
        &good_history(),
        &finals(&[("x", Some("x1")), ("y", Some("y1"))]),
        &[],
    );
    assert_eq!(v.outcome, VerdictOutcome::Fail);
    assert_eq!(v.lost.violations.len(), 1);
    assert_eq!(v.lost.violations[0].key, "x");
    assert_eq!(v.lost.violations[0].found.as_deref(), Some("x1"));
    assert_eq!(v.reasons, vec!["1 key(s) lost an acknowledged write"]);
}

#[test]
fn a_stale_read_fails_both_ways() {
    let mut h = good_history();
    h.push(get(3, 1, "x", Some("x1"), (80, 85)));
    let v = verdict(&h, &finals(&[("x", Some("x2")), ("y", Some("y1"))]), &[]);
    assert_eq!(v.outcome, VerdictOutcome::Fail);
    assert!(v.lost.passed());
    assert_eq!(v.read_anomaly_counts[&ReadAnomalyKind::StaleRead], 1);
    assert_eq!(v.linearizability.result, Linearizability::NotLinearizable);
    let problem = &v.linearizability.problems[0];
    assert_eq!(problem.key, "x");
    let ce = problem.counter_example.as_ref().unwrap();
    assert!(ce.ops.iter().any(|op| op.client == 3), "{ce:?}");
    // Set x1, a later set, and the stale read.
    assert!(ce.minimal);
    assert_eq!(ce.ops.len(), 3, "{ce:?}");
}

#[test]
fn a_never_written_read_fails() {
    let mut h = good_history();
    h.push(get(3, 1, "y", Some("forged"), (100, 110)));
    let v = verdict(&h, &finals(&[("x", Some("x2")), ("y", Some("y1"))]), &[]);
    assert_eq!(v.outcome, VerdictOutcome::Fail);
    assert_eq!(v.read_anomalies[0].kind, ReadAnomalyKind::NeverWritten);
    assert_eq!(v.linearizability.failed_keys, 1);
}

#[test]
fn a_non_monotonic_read_only_the_search_sees() {
    // b before c (real time); c is seen, then b again: no single read is stale on its own
    // (c's set is unknown), but no order explains both reads.
    let h = [
        set(1, 1, "k", "b", (30, 40)),
        unknown(set(3, 1, "k", "c", (60, 61))),
        get(2, 3, "k", Some("c"), (100, 110)),
        get(2, 4, "k", Some("b"), (120, 130)),
    ];
    let v = verdict(&h, &finals(&[("k", Some("c"))]), &[]);
    assert!(v.read_anomalies.is_empty());
    assert_eq!(v.linearizability.result, Linearizability::NotLinearizable);
    assert_eq!(v.outcome, VerdictOutcome::Fail);
}

#[test]
fn split_brain_fails() {
    let mut f = frames("a", 0, 60);
    f.extend(frames("b", 40, 99));
    let v = verdict(
        &good_history(),
        &finals(&[("x", Some("x2")), ("y", Some("y1"))]),
        &f,
    );
    assert_eq!(v.outcome, VerdictOutcome::Fail);
    assert_eq!(v.split_brain.split_brain_ns, 20 * MS);
    assert!(v.reasons[0].contains("split-brain"), "{:?}", v.reasons);
}

#[test]
fn out_of_budget_unread_or_unobserved_is_inconclusive() {
    let h = good_history();
    let fin = finals(&[("x", Some("x2")), ("y", Some("y1"))]);
    let mut cfg = CheckConfig::default();
    cfg.linearizability.max_steps = 1;
    let input = CheckInput {
        history: &h,
        finals: &fin,
        frames: &[],
        liveness: Some(healthy()),
        faults: &[],
    };
    let v = check(&input, &cfg).unwrap();
    assert_eq!(v.outcome, VerdictOutcome::Inconclusive);
    assert_eq!(v.linearizability.result, Linearizability::Unknown);
    let fin = finals(&[("y", Some("y1"))]);
    let v = verdict(&h, &fin, &[]);
    assert_eq!(v.outcome, VerdictOutcome::Inconclusive);
    assert_eq!(v.lost.unread_keys, vec!["x"]);
    let input = CheckInput {
        liveness: None,
        finals: &finals(&[("x", Some("x2")), ("y", Some("y1"))]),
        ..input
    };
    let v = check(&input, &CheckConfig::default()).unwrap();
    assert_eq!(v.outcome, VerdictOutcome::Inconclusive);
    assert_eq!(v.reasons, vec!["liveness not observed"]);
}

#[test]
fn histories_that_cannot_be_checked_are_errors() {
    let h = [set(1, 1, "k", "a", (0, 1)), set(2, 1, "k", "a", (2, 3))];
    assert!(matches!(
        validate_history(&h),
        Err(CheckError::DuplicateValue { .. })
    ));
    let h = [set(1, 1, "k", "a", (0, 1)), get(1, 1, "k", None, (2, 3))];
    assert_eq!(
        validate_history(&h),
        Err(CheckError::DuplicateOpId { client: 1, op: 1 })
    );
}

#[test]
fn verdicts_round_trip_through_json() {
    let mut h = good_history();
    h.push(get(3, 1, "x", Some("x1"), (80, 85)));
    let v = verdict(&h, &finals(&[("x", Some("x1"))]), &frames("a", 0, 5));
    let json = serde_json::to_string_pretty(&v).unwrap();
    assert!(json.contains("\"stale_read\": 1"), "{json}");
    assert_eq!(serde_json::from_str::<Verdict>(&json).unwrap(), v);
}

/// A history of a real register: each op takes effect at one point inside its interval (an
/// unknown set possibly after the client gave up, or never), reads return the value then.
/// Returns the history and the final value of each key.
fn simulate(
    seed: u64,
    clients: u32,
    ops_per_client: u64,
    keys: u32,
) -> (Vec<Op>, BTreeMap<String, Option<String>>) {
    let mut rng = Xoshiro256::seed_from(seed);
    // (point, op index): when each applied op takes effect.
    let mut points: Vec<(u64, usize)> = Vec::new();
    let mut history = Vec::new();
    for client in 0..clients {
        let mut t = rng.below(50);
        for n in 0..ops_per_client {
            let key = format!("k{}", rng.below(u64::from(keys)));
            let invoke = t + rng.below(20);
            let complete = invoke + rng.range(1, 120);
            let is_set = rng.chance(500);
            let outcome = match rng.below(10) {
                0 => Outcome::Fail {
                    error: "refused".into(),
                },
                1 => Outcome::Unknown {
                    error: "timeout".into(),
                },
                _ => Outcome::Ok { read: None },
            };
            let applied = match outcome {
                Outcome::Fail { .. } => false,
                Outcome::Unknown { .. } => is_set && rng.chance(500),
                Outcome::Ok { .. } => true,
            };
            if applied {
                // An unknown set may land long after the client gave up.
                let end = if matches!(outcome, Outcome::Unknown { .. }) {
                    complete + 500
                } else {
                    complete
                };
                points.push((rng.range(invoke, end) * 2, history.len()));
            }
            history.push(Op {
                client,
                op: n,
                key,
                kind: if is_set {
                    OpKind::Set {
                        value: format!("c{client}-{n}"),
                    }
                } else {
                    OpKind::Get
                },
                invoke_ns: invoke,
                complete_ns: complete,
                outcome,
            });
            t = complete + rng.below(30);
        }
    }
    points.sort_unstable();
    let mut register: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (_, i) in points {
        let op = &mut history[i];
        let cell = register.entry(op.key.clone()).or_insert(None);
        match &op.kind {
            OpKind::Set { value } => *cell = Some(value.clone()),
            OpKind::Get => op.outcome = Outcome::Ok { read: cell.clone() },
        }
    }
    for k in 0..keys {
        register.entry(format!("k{k}")).or_insert(None);
    }
    (history, register)
}

/// Makes one read stale: an ok get after two sequential ok sets now returns the older value.
/// Appends such a triple if the history has none.
fn inject_stale_read(history: &mut Vec<Op>) -> String {
    let ok_sets: Vec<&Op> = history.iter().filter(|o| o.is_set() && o.is_ok()).collect();
    let mut target = None;
    'find: for (i, r) in history.iter().enumerate() {
        if r.read().is_none() {
            continue;
        }
        for old in ok_sets.iter().filter(|w| w.key == r.key) {
            for new in ok_sets.iter().filter(|w| w.key == r.key) {
                if old.complete_ns < new.invoke_ns && new.complete_ns < r.invoke_ns {
                    target = Some((i, old.written().unwrap().to_string()));
                    break 'find;
                }
            }
        }
    }
    if let Some((i, value)) = target {
        history[i].outcome = Outcome::Ok { read: Some(value) };
        return history[i].key.clone();
    }
    let end = history.iter().map(|o| o.complete_ns).max().unwrap_or(0);
    history.push(set(99, 1, "k0", "old", (end + 10, end + 20)));
    history.push(set(99, 2, "k0", "new", (end + 30, end + 40)));
    history.push(get(99, 3, "k0", Some("old"), (end + 50, end + 60)));
    "k0".into()
}

/// Changes about one read in seven to a random value of the history, or to absent.
fn perturb_reads(history: &mut [Op], seed: u64) {
    let mut rng = Xoshiro256::seed_from(seed);
    let values: Vec<String> = history
        .iter()
        .filter_map(|o| o.written().map(str::to_string))
        .collect();
    for op in history.iter_mut() {
        if op.read().is_some() && rng.chance(150) {
            let read = if values.is_empty() || rng.chance(200) {
                None
            } else {
                Some(values[rng.below(values.len() as u64) as usize].clone())
            };
            op.outcome = Outcome::Ok { read };
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_simulated_register_always_checks_linearizable(
        seed in any::<u64>(), clients in 1u32..6, ops in 1u64..40, keys in 1u32..4,
    ) {
        let (history, fin) = simulate(seed, clients, ops, keys);
        let v = verdict(&history, &fin, &[]);
        prop_assert_eq!(v.linearizability.result, Linearizability::Linearizable, "{:?}", v.linearizability);
        prop_assert!(v.read_anomalies.is_empty(), "{:?}", v.read_anomalies);
        prop_assert!(v.lost.passed(), "{:?}", v.lost);
        prop_assert_eq!(v.outcome, VerdictOutcome::Pass);
    }

    #[test]
    fn an_injected_stale_read_always_fails(
        seed in any::<u64>(), clients in 1u32..6, ops in 1u64..40, keys in 1u32..4,
    ) {
        let (mut history, fin) = simulate(seed, clients, ops, keys);
        let key = inject_stale_read(&mut history);
        let v = verdict(&history, &fin, &[]);
        prop_assert_eq!(v.linearizability.result, Linearizability::NotLinearizable);
        prop_assert!(v.linearizability.problems.iter().any(|p| p.key == key));
        // The plain search, without the zones' fast path, finds it too.
        let keys = by_key(&history);
        prop_assert_eq!(
            linear::search_only(&keys[key.as_str()], 10_000_000),
            Linearizability::NotLinearizable
        );
        prop_assert!(v.read_anomaly_counts.contains_key(&ReadAnomalyKind::StaleRead));
        prop_assert_eq!(v.outcome, VerdictOutcome::Fail);
        // The counter-example fails on its own and is no bigger than the key's history.
        for p in &v.linearizability.problems {
            let ce = p.counter_example.as_ref().unwrap();
            let refs: Vec<&Op> = ce.ops.iter().collect();
            let again = linear::check_key(&p.key, &refs, &LinearizabilityConfig::default());
            prop_assert_eq!(again.result, Linearizability::NotLinearizable);
            prop_assert!(ce.ops.len() <= p.ops);
        }
    }

    /// The zones' fast path and the plain search give the same answer on arbitrary histories
    /// (a simulated register with some reads changed at random), and the zones propose a
    /// conflict exactly when the search fails: the theorem they rest on, checked.
    #[test]
    fn zones_and_the_search_agree(
        seed in any::<u64>(), clients in 1u32..5, ops in 1u64..16, keys in 1u32..3,
    ) {
        let (mut history, _) = simulate(seed, clients, ops, keys);
        perturb_reads(&mut history, seed);
        for (key, ops) in by_key(&history) {
            let plain = linear::search_only(&ops, 10_000_000);
            let fast = linear::check_key(key, &ops, &LinearizabilityConfig::default()).result;
            prop_assert_eq!(plain, fast);
            prop_assert_eq!(
                linear::zones_propose(&ops),
                plain == Linearizability::NotLinearizable
            );
        }
    }
}
