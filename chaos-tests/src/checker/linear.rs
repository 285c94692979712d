//! Per-key linearizability of a register with unique values.
//!
//! The search is Wing & Gong's, with Lowe's just-in-time linearization and memoization, as
//! Porcupine and Knossos do it: the history becomes a list of call and return entries sorted by
//! time (a call before a return at the same instant, so touching ops count as concurrent); the
//! search walks the list, linearizes a call whose op the register allows now (lifting the call
//! and its return out of the list), backtracks when it reaches the return of an op it has not
//! linearized, and never explores twice a configuration it has seen: the pair (set of linearized
//! ops, register value). The set is kept as a 128-bit Zobrist fingerprint (one random word per
//! op, xor-ed in and out), so a memo entry costs a few words whatever the history's length; two
//! different sets share a fingerprint with probability about 2^-128 per pair.
//!
//! Outcomes enter the model so:
//! - `fail` ops never happened: they are left out;
//! - an `unknown` get observed nothing: left out;
//! - an `unknown` set may have happened at any time after its invoke (its end is open). If no
//!   ok get read its value, it is equivalent to one that never happened (any linearization
//!   without it stays valid with it placed last) and is left out; otherwise it must have taken
//!   effect before the first such read completed, which becomes its end.
//!
//! The register starts absent (`None`): the runner uses keys no earlier run wrote.
//!
//! Two facts of a register with unique values cut the search down, without losing any
//! linearization: a set is never linearized while a get of the current value is still pending
//! (the value could never come back for it), and the values of sets no get read are one single
//! state for the memo (so the order of unobserved overwrites is explored once). Without them
//! thirty concurrent sets followed by a get of the first one take 2^30 configurations; with them
//! a few hundred steps.
//!
//! When a key fails, `minimize` shrinks the history to a small sub-history that still fails:
//! it removes whole "units" (a set together with every get that read its value, or a lone get),
//! which keeps every sub-history's verdict honest (a linearization of the whole restricted to the
//! remaining units is still one), first by cutting the latest units off (the failure is monotone
//! in prefixes of units ordered by their end), then by removing chunks, then single units, and
//! last single gets (removing a read never makes a history fail).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::zones;
use crate::history::{Op, OpKind, Outcome};
use crate::schedule::rng::SplitMix64;

/// A value id no set of the key wrote.
pub(super) const UNWRITTEN: u32 = u32::MAX;
/// The value of a set no ok get read. All such values are one state: nothing can tell them
/// apart (no read ever matches them), and merging them lets the memo see that the order of
/// writes nobody observed does not matter.
pub(super) const DEAD: u32 = u32::MAX - 1;
/// Zone conflicts tried as counter-examples before the whole search.
const MAX_ZONE_CANDIDATES: usize = 8;
/// End of the doubly linked entry list.
const NIL: usize = usize::MAX;

/// The answer of the linearizability search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Linearizability {
    /// A linearization exists.
    Linearizable,
    /// None exists: the history is a violation.
    NotLinearizable,
    /// The search budget ran out first: not a pass.
    Unknown,
}

/// A small sub-history of one key that is not linearizable on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterExample {
    /// Its ops, by invoke time.
    pub ops: Vec<Op>,
    /// Whether no single unit (a set and its readers, or a lone get) and no single get can be
    /// removed from it without it becoming linearizable (false if the minimization ran out of
    /// budget).
    pub minimal: bool,
}

/// The result for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLinearizability {
    /// The key.
    pub key: String,
    /// The answer.
    pub result: Linearizability,
    /// Ops of the key in the history.
    pub ops: usize,
    /// Ops that entered the search (see the module's doc for those left out).
    pub searched_ops: usize,
    /// Search steps taken.
    pub steps: u64,
    /// On failure, the ops involved.
    pub counter_example: Option<CounterExample>,
}

/// Budgets of the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearizabilityConfig {
    /// Search steps per key before the answer is [`Linearizability::Unknown`].
    pub max_steps: u64,
    /// Searches the counter-example minimization may run per failing key.
    pub max_minimize_checks: u32,
}

impl Default for LinearizabilityConfig {
    fn default() -> Self {
        LinearizabilityConfig {
            max_steps: 2_000_000,
            max_minimize_checks: 400,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// A set of a value id ([`DEAD`] if no get read it).
    Write(u32),
    /// An ok get of a value id (`None`: absent; [`UNWRITTEN`]: no set wrote it).
    Read(Option<u32>),
}

/// An op as the search sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LinOp {
    pub(super) call: u64,
    pub(super) ret: u64,
    pub(super) action: Action,
    /// Its index in the ops given to [`prepare`].
    pub(super) src: usize,
}

/// Checks one key's ops (all of them the same key's; any order).
pub fn check_key(key: &str, ops: &[&Op], cfg: &LinearizabilityConfig) -> KeyLinearizability {
    let prepared = prepare(ops);
    let mut result = KeyLinearizability {
        key: key.to_string(),
        result: Linearizability::Linearizable,
        ops: ops.len(),
        searched_ops: prepared.len(),
        steps: 0,
        counter_example: None,
    };
    // Fast path for failures: a few ops the zones say conflict, confirmed by the search.
    for candidate in zones::candidates(&prepared, MAX_ZONE_CANDIDATES) {
        let mut sub: Vec<&Op> = candidate.iter().map(|&i| ops[prepared[i].src]).collect();
        // Failed sets of values read here: not in the search, but they explain it.
        let read: HashSet<&str> = sub.iter().filter_map(|op| op.read().flatten()).collect();
        sub.extend(
            ops.iter()
                .filter(|op| op.is_fail() && op.written().is_some_and(|v| read.contains(v))),
        );
        let (answer, steps) = search(&prepare(&sub), cfg.max_steps);
        result.steps += steps;
        if answer == Linearizability::NotLinearizable {
            result.result = answer;
            result.counter_example = Some(minimize(&sub, cfg.max_steps, cfg.max_minimize_checks));
            return result;
        }
    }
    let (answer, steps) = search(&prepared, cfg.max_steps);
    result.result = answer;
    result.steps += steps;
    if answer == Linearizability::NotLinearizable {
        result.counter_example = Some(minimize(ops, cfg.max_steps, cfg.max_minimize_checks));
    }
    result
}

/// The ops as the search sees them (see the module's doc).
fn prepare(ops: &[&Op]) -> Vec<LinOp> {
    let mut ids: HashMap<&str, u32> = HashMap::new();
    for op in ops.iter().filter(|op| !op.is_fail()) {
        if let Some(v) = op.written() {
            let next = ids.len() as u32;
            ids.entry(v).or_insert(next);
        }
    }
    // The earliest completion of an ok get of each value: the latest end of its unknown set.
    let mut first_read_end: HashMap<u32, u64> = HashMap::new();
    for op in ops {
        if let Some(Some(v)) = op.read() {
            if let Some(&id) = ids.get(v) {
                let end = first_read_end.entry(id).or_insert(op.complete_ns);
                *end = (*end).min(op.complete_ns);
            }
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    for (src, op) in ops.iter().enumerate() {
        let (ret, action) = match (&op.kind, &op.outcome) {
            (_, Outcome::Fail { .. }) | (OpKind::Get, Outcome::Unknown { .. }) => continue,
            (OpKind::Get, Outcome::Ok { read }) => {
                let id = read
                    .as_deref()
                    .map(|v| ids.get(v).copied().unwrap_or(UNWRITTEN));
                (op.complete_ns, Action::Read(id))
            }
            (OpKind::Set { value }, Outcome::Ok { .. }) => {
                let id = ids[&**value];
                let id = if first_read_end.contains_key(&id) {
                    id
                } else {
                    DEAD
                };
                (op.complete_ns, Action::Write(id))
            }
            (OpKind::Set { value }, Outcome::Unknown { .. }) => {
                let id = ids[&**value];
                match first_read_end.get(&id) {
                    None => continue,
                    Some(&end) => (end.max(op.invoke_ns), Action::Write(id)),
                }
            }
        };
        out.push(LinOp {
            call: op.invoke_ns,
            ret,
            action,
            src,
        });
    }
    out
}

/// The register, and how many reads of each value are not linearized yet.
struct Register {
    state: Option<u32>,
    /// Index 0: reads of absent; `id + 1`: reads of value `id`.
    pending_reads: Vec<u32>,
}

impl Register {
    fn new(ops: &[LinOp]) -> Register {
        let mut pending_reads = Vec::new();
        for op in ops {
            if let Action::Read(r) = op.action {
                if let Some(slot) = Register::slot(r) {
                    if pending_reads.len() <= slot {
                        pending_reads.resize(slot + 1, 0);
                    }
                    pending_reads[slot] += 1;
                }
            }
        }
        Register {
            state: None,
            pending_reads,
        }
    }

    fn slot(value: Option<u32>) -> Option<usize> {
        match value {
            None => Some(0),
            Some(UNWRITTEN | DEAD) => None,
            Some(id) => Some(id as usize + 1),
        }
    }

    fn pending(&self, value: Option<u32>) -> u32 {
        Register::slot(value)
            .and_then(|s| self.pending_reads.get(s).copied())
            .unwrap_or(0)
    }

    /// The state after `action`, or `None` if it cannot be linearized now. A write is refused
    /// while reads of the current value are pending: values are unique and never come back,
    /// so those reads could never be linearized after it.
    fn after(&self, action: Action) -> Option<Option<u32>> {
        match action {
            Action::Write(v) => (self.pending(self.state) == 0).then_some(Some(v)),
            Action::Read(r) => (r == self.state).then_some(self.state),
        }
    }

    /// Linearizes `action` (which [`Register::after`] allowed) leading to `state`.
    fn apply(&mut self, action: Action, state: Option<u32>) {
        if let Action::Read(r) = action {
            if let Some(s) = Register::slot(r) {
                self.pending_reads[s] -= 1;
            }
        }
        self.state = state;
    }

    /// Undoes [`Register::apply`] of `action`, back to `state`.
    fn undo(&mut self, action: Action, state: Option<u32>) {
        if let Action::Read(r) = action {
            if let Some(s) = Register::slot(r) {
                self.pending_reads[s] += 1;
            }
        }
        self.state = state;
    }
}

/// The call/return entries as a doubly linked list with a head sentinel (node 0).
struct Entries {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// For each node (but the head): its op and whether it is the call.
    op: Vec<usize>,
    is_call: Vec<bool>,
    /// For each op: its return node.
    ret_node: Vec<usize>,
}

impl Entries {
    fn new(ops: &[LinOp]) -> Entries {
        let mut ev: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            ev.push((op.call, false, i));
            ev.push((op.ret, true, i));
        }
        ev.sort_unstable();
        let len = ev.len() + 1;
        let mut e = Entries {
            next: (1..=len).map(|n| if n == len { NIL } else { n }).collect(),
            prev: (0..len).map(|n| n.wrapping_sub(1)).collect(),
            op: vec![NIL; len],
            is_call: vec![false; len],
            ret_node: vec![NIL; ops.len()],
        };
        e.prev[0] = NIL;
        for (k, &(_, is_ret, op)) in ev.iter().enumerate() {
            let node = k + 1;
            e.op[node] = op;
            e.is_call[node] = !is_ret;
            if is_ret {
                e.ret_node[op] = node;
            }
        }
        e
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        let ret = self.ret_node[self.op[call]];
        let (p, n) = (self.prev[call], self.next[call]);
        self.next[p] = n;
        self.prev[n] = p;
        let (p, n) = (self.prev[ret], self.next[ret]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Puts back what the matching [`Entries::lift`] took out (in reverse order of lifting).
    fn unlift(&mut self, call: usize) {
        let ret = self.ret_node[self.op[call]];
        let (p, n) = (self.prev[ret], self.next[ret]);
        self.next[p] = ret;
        if n != NIL {
            self.prev[n] = ret;
        }
        let (p, n) = (self.prev[call], self.next[call]);
        self.next[p] = call;
        self.prev[n] = call;
    }
}

/// Runs the search; returns the answer and the steps it took.
fn search(ops: &[LinOp], max_steps: u64) -> (Linearizability, u64) {
    let mut entries = Entries::new(ops);
    let mut rng = SplitMix64::new(0x6c69_6e65_6172_697a);
    let zobrist: Vec<u128> = ops
        .iter()
        .map(|_| (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
        .collect();
    let mut cache: HashSet<(u128, Option<u32>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u32>)> = Vec::new();
    let mut register = Register::new(ops);
    let mut linearized: u128 = 0;
    let mut entry = entries.next[0];
    let mut steps = 0u64;
    while entries.next[0] != NIL {
        steps += 1;
        if steps > max_steps {
            return (Linearizability::Unknown, steps - 1);
        }
        let op = entries.op[entry];
        if entries.is_call[entry] {
            if let Some(new_state) = register.after(ops[op].action) {
                let fingerprint = linearized ^ zobrist[op];
                if cache.insert((fingerprint, new_state)) {
                    stack.push((entry, register.state));
                    register.apply(ops[op].action, new_state);
                    linearized = fingerprint;
                    entries.lift(entry);
                    entry = entries.next[0];
                    continue;
                }
            }
            entry = entries.next[entry];
        } else {
            // The return of an op not linearized yet: undo the latest choice.
            let Some((call, old)) = stack.pop() else {
                return (Linearizability::NotLinearizable, steps);
            };
            let op = entries.op[call];
            register.undo(ops[op].action, old);
            linearized ^= zobrist[op];
            entries.unlift(call);
            entry = entries.next[call];
        }
    }
    (Linearizability::Linearizable, steps)
}

/// The whole search alone, without the zones' fast path (for tests that compare them).
#[cfg(test)]
pub(crate) fn search_only(ops: &[&Op], max_steps: u64) -> Linearizability {
    search(&prepare(ops), max_steps).0
}

/// Whether the zones propose any candidate (for tests that compare them with the search).
#[cfg(test)]
pub(crate) fn zones_propose(ops: &[&Op]) -> bool {
    !zones::candidates(&prepare(ops), 1).is_empty()
}

/// Groups the ops into removable units: each set with the ok gets that read its value; each
/// other ok get alone. Ops that never affect the search (failed or unknown gets) are dropped.
fn units<'a>(ops: &[&'a Op]) -> Vec<Vec<&'a Op>> {
    let mut by_value: HashMap<&str, usize> = HashMap::new();
    let mut units: Vec<Vec<&Op>> = Vec::new();
    for op in ops {
        if let Some(v) = op.written() {
            by_value.insert(v, units.len());
            units.push(vec![op]);
        }
    }
    for op in ops {
        match op.read() {
            Some(Some(v)) if by_value.contains_key(v) => units[by_value[v]].push(op),
            Some(_) => units.push(vec![op]),
            None => {}
        }
    }
    units.sort_by_key(|u| (u.iter().map(|op| op.complete_ns).max(), u[0].invoke_ns));
    units
}

/// Runs searches on sub-histories made of units, within a number of searches.
struct Shrinker {
    max_steps: u64,
    checks_left: u32,
    /// No search ran out of steps.
    decisive: bool,
}

impl Shrinker {
    /// Whether the units together fail (an exhausted budget counts as not failing); `None`
    /// when no search is left.
    fn fails(&mut self, units: &[&Vec<&Op>]) -> Option<bool> {
        let flat: Vec<&Op> = units.iter().flat_map(|u| u.iter().copied()).collect();
        self.fails_ops(&flat)
    }

    /// Whether these ops together fail (see [`Shrinker::fails`]).
    fn fails_ops(&mut self, ops: &[&Op]) -> Option<bool> {
        self.checks_left = self.checks_left.checked_sub(1)?;
        let (result, _) = search(&prepare(ops), self.max_steps);
        self.decisive &= result != Linearizability::Unknown;
        Some(result == Linearizability::NotLinearizable)
    }
}

/// A small failing sub-history of `ops`, which must fail (see the module's doc).
pub(crate) fn minimize(ops: &[&Op], max_steps: u64, max_checks: u32) -> CounterExample {
    let units = units(ops);
    let all: Vec<&Vec<&Op>> = units.iter().collect();
    let mut s = Shrinker {
        max_steps,
        checks_left: max_checks,
        decisive: true,
    };
    // The shortest failing prefix (binary search: failure is monotone in prefixes).
    let (mut lo, mut hi) = (1usize, all.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match s.fails(&all[..mid]) {
            Some(true) => hi = mid,
            Some(false) => lo = mid + 1,
            None => break,
        }
    }
    let Some((last, rest)) = all[..hi].split_last() else {
        return CounterExample {
            ops: Vec::new(),
            minimal: false,
        };
    };
    // Chunks, then single units. The prefix's last unit is in every failing subset: keep it.
    let mut kept: Vec<&Vec<&Op>> = rest.to_vec();
    let mut chunk = kept.len().div_ceil(2).max(1);
    let mut complete = true;
    'shrink: loop {
        let mut i = 0;
        while i < kept.len() {
            let end = (i + chunk).min(kept.len());
            let mut trial: Vec<&Vec<&Op>> = kept[..i].iter().chain(&kept[end..]).copied().collect();
            trial.push(last);
            match s.fails(&trial) {
                Some(true) => {
                    kept.drain(i..end);
                }
                Some(false) => i = end,
                None => {
                    complete = false;
                    break 'shrink;
                }
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    kept.push(last);
    // Then single gets: removing a read alone never makes a history fail.
    let mut left: Vec<&Op> = kept.iter().flat_map(|u| u.iter().copied()).collect();
    let mut i = left.len();
    while complete && i > 0 {
        i -= 1;
        if left[i].is_set() {
            continue;
        }
        let trial: Vec<&Op> = left[..i].iter().chain(&left[i + 1..]).copied().collect();
        match s.fails_ops(&trial) {
            Some(true) => {
                left.remove(i);
            }
            Some(false) => {}
            None => complete = false,
        }
    }
    let mut out: Vec<Op> = left.into_iter().cloned().collect();
    out.sort_by_key(|op| (op.invoke_ns, op.complete_ns, op.client, op.op));
    CounterExample {
        ops: out,
        minimal: complete && s.decisive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{failed, get, set, unknown};

    fn check(ops: &[Op]) -> KeyLinearizability {
        let refs: Vec<&Op> = ops.iter().collect();
        check_key("k", &refs, &LinearizabilityConfig::default())
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        let h = [
            get(1, 1, "k", None, (0, 5)),
            set(1, 2, "k", "a", (10, 20)),
            get(2, 1, "k", Some("a"), (21, 30)),
            // b and c overlap.
            set(1, 3, "k", "b", (40, 60)),
            set(2, 2, "k", "c", (45, 55)),
            get(3, 1, "k", Some("b"), (50, 58)),
            get(3, 2, "k", Some("c"), (70, 80)),
        ];
        // Only one order works: b, read b, then c (its point in (50, 55]), read c.
        let r = check(&h);
        assert_eq!(r.result, Linearizability::Linearizable, "{r:?}");
        assert!(r.counter_example.is_none());
    }

    #[test]
    fn a_stale_read_fails_with_a_small_counter_example() {
        let mut h = vec![
            set(1, 1, "k", "a", (10, 20)),
            set(1, 2, "k", "b", (30, 40)),
            get(2, 1, "k", Some("a"), (50, 60)),
        ];
        // Unrelated noise before and after.
        for i in 0..20 {
            h.push(set(
                3,
                i,
                "k",
                &format!("n{i}"),
                (1000 + i * 10, 1005 + i * 10),
            ));
            h.push(get(
                4,
                i,
                "k",
                Some(&format!("n{i}")),
                (1006 + i * 10, 1008 + i * 10),
            ));
        }
        let r = check(&h);
        assert_eq!(r.result, Linearizability::NotLinearizable);
        let ce = r.counter_example.unwrap();
        assert!(ce.minimal);
        let values: Vec<_> = ce.ops.iter().map(|op| (op.client, op.op)).collect();
        assert_eq!(values, vec![(1, 1), (1, 2), (2, 1)], "{ce:?}");
    }

    #[test]
    fn reading_a_value_never_written_or_failed_fails() {
        let h = [
            set(1, 1, "k", "a", (0, 10)),
            get(2, 1, "k", Some("zz"), (20, 30)),
        ];
        assert_eq!(check(&h).result, Linearizability::NotLinearizable);
        let h = [
            failed(set(1, 1, "k", "a", (0, 10))),
            get(2, 1, "k", Some("a"), (20, 30)),
        ];
        let r = check(&h);
        assert_eq!(r.result, Linearizability::NotLinearizable);
        assert_eq!(r.counter_example.unwrap().ops.len(), 2);
    }

    #[test]
    fn reading_absent_after_an_acknowledged_set_fails() {
        let h = [set(1, 1, "k", "a", (0, 10)), get(2, 1, "k", None, (20, 30))];
        assert_eq!(check(&h).result, Linearizability::NotLinearizable);
    }

    #[test]
    fn a_read_from_the_future_fails() {
        let h = [
            get(2, 1, "k", Some("a"), (0, 10)),
            set(1, 1, "k", "a", (20, 30)),
        ];
        assert_eq!(check(&h).result, Linearizability::NotLinearizable);
    }

    #[test]
    fn unknown_sets_may_apply_late_or_never() {
        // Never read: as if it never happened.
        let h = [
            unknown(set(1, 1, "k", "a", (0, 10))),
            get(2, 1, "k", None, (20, 30)),
        ];
        assert_eq!(check(&h).result, Linearizability::Linearizable);
        // Applied long after the client gave up.
        let h = [
            unknown(set(1, 1, "k", "a", (0, 10))),
            set(1, 2, "k", "b", (20, 30)),
            get(2, 1, "k", Some("b"), (40, 50)),
            get(2, 2, "k", Some("a"), (60, 70)),
        ];
        assert_eq!(check(&h).result, Linearizability::Linearizable);
        // But it cannot come back once it was overwritten after being seen.
        let h = [
            unknown(set(1, 1, "k", "a", (0, 10))),
            get(2, 1, "k", Some("a"), (15, 18)),
            set(1, 2, "k", "b", (20, 30)),
            get(2, 2, "k", Some("a"), (60, 70)),
        ];
        assert_eq!(check(&h).result, Linearizability::NotLinearizable);
    }

    #[test]
    fn failed_and_unknown_gets_are_ignored() {
        let h = [
            set(1, 1, "k", "a", (0, 10)),
            failed(get(2, 1, "k", None, (20, 30))),
            unknown(get(2, 2, "k", None, (40, 50))),
        ];
        let r = check(&h);
        assert_eq!(r.result, Linearizability::Linearizable);
        assert_eq!(r.searched_ops, 1);
    }

    #[test]
    fn many_concurrent_sets_stay_cheap_both_ways() {
        let mut h = Vec::new();
        for i in 0..30 {
            h.push(set(i, 1, "k", &format!("v{i}"), (0, 1000)));
        }
        h.push(get(99, 1, "k", Some("v0"), (2000, 2001)));
        let r = check(&h);
        assert_eq!(r.result, Linearizability::Linearizable);
        assert!(r.steps < 10_000, "{} steps", r.steps);
        // v1 was overwritten by v0 (it was read first), yet read again: impossible.
        h.push(get(99, 2, "k", Some("v1"), (2010, 2011)));
        let r = check(&h);
        assert_eq!(
            r.result,
            Linearizability::NotLinearizable,
            "{} steps",
            r.steps
        );
        assert!(r.steps < 100_000, "{} steps", r.steps);
        let ce = r.counter_example.unwrap();
        assert_eq!(ce.ops.len(), 4, "{ce:?}");
    }

    #[test]
    fn touching_ops_count_as_concurrent() {
        let h = [
            set(1, 1, "k", "a", (10, 20)),
            get(2, 1, "k", None, (20, 30)),
        ];
        assert_eq!(check(&h).result, Linearizability::Linearizable);
    }

    #[test]
    fn an_exhausted_budget_is_unknown_not_a_pass() {
        // Many concurrent sets and reads of them: more than 3 steps are needed.
        let mut h = Vec::new();
        for i in 0..30 {
            h.push(set(i, 1, "k", &format!("v{i}"), (0, 1000)));
        }
        h.push(get(99, 1, "k", Some("v0"), (2000, 2001)));
        let refs: Vec<&Op> = h.iter().collect();
        let cfg = LinearizabilityConfig {
            max_steps: 3,
            max_minimize_checks: 10,
        };
        let r = check_key("k", &refs, &cfg);
        assert_eq!(r.result, Linearizability::Unknown);
        assert_eq!(r.steps, 3);
        assert_eq!(check(&h).result, Linearizability::Linearizable);
    }

    #[test]
    fn the_entry_list_lifts_and_unlifts() {
        let ops = [
            LinOp {
                call: 0,
                ret: 10,
                action: Action::Write(0),
                src: 0,
            },
            LinOp {
                call: 5,
                ret: 6,
                action: Action::Read(None),
                src: 1,
            },
        ];
        let mut e = Entries::new(&ops);
        let walk = |e: &Entries| {
            let mut v = Vec::new();
            let mut n = e.next[0];
            while n != NIL {
                v.push((e.op[n], e.is_call[n]));
                n = e.next[n];
            }
            v
        };
        let before = walk(&e);
        assert_eq!(before, vec![(0, true), (1, true), (1, false), (0, false)]);
        e.lift(2);
        assert_eq!(walk(&e), vec![(0, true), (0, false)]);
        e.lift(1);
        assert!(walk(&e).is_empty());
        e.unlift(1);
        e.unlift(2);
        assert_eq!(walk(&e), before);
    }
}
