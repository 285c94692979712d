//! The agents' clones, modelled on the real agent (`vmatrix/src/cluster/agent/clones.rs`):
//!
//! - **Bases**: for every VM the manager lists in the host's `bases` whose primary runs here
//!   (alive and answering: a stalled one takes no snapshot) or whose backup runs here with a
//!   committed image (exported), a base is made from it on a thread of its own (here: ready
//!   20–200 ms later, lost if the host crashes first, failed if the source died or its term
//!   changed meanwhile) whenever the newest base is not of the source's term. Bases are on disk: they survive a crash (a restarted agent adopts
//!   them). A base no clone uses is removed unless it is the newest of a VM still wanted here
//!   (listed in `bases` or with a clone assigned). (The real agent also refreshes a base every
//!   60 s; a run here is shorter than that.)
//! - **Copies**: every host but the fourth serves its bases (its report's `base_port`); for a
//!   VM its assignment lists in `fetch`, a host with no base, or one of an older term than the
//!   first source's, copies one (20–500 ms) from the first of the sources that is up and holds
//!   one by then (failed if none does, or one time in eight at random; none tried for a
//!   second after a failure; with a base here, none begun within 2 s of the last, as the real
//!   agent's `refresh / 2`); in one seed of four every copy is refused (certificates that do
//!   not cover the VM, say). A clone whose base is being made or copied, or is to be copied,
//!   with no try failed since the last success, waits unreported; after a failure it is
//!   reported blocked, also while the next try runs (as the real agent).
//! - **Clones**: one process per clone assigned here, started from the newest base; none while
//!   a base is being made for it; "blocked" (reported dead: no base of its VM on this host)
//!   when there is no base and none is wanted. A clone answers (`running`) 5–55 ms after its
//!   start; one that exited is started again after a second while it is still assigned; one
//!   no longer assigned is stopped (at once here: the real agent drains it and waits up to its
//!   stop grace). Processes die with their host. Nothing of this runs before the agent's
//!   first assignment since it started (its bases stay until the manager says what it wants).

use std::time::Duration;

use failover::model::{BaseObservation, CloneObservation};

use super::world::{Sim, VM};

/// How long a clone that exited waits before its agent starts it again (as the real agent).
pub const RESTART_AFTER: Duration = Duration::from_secs(1);

/// The base server port host `i` reports (the fourth host serves none).
pub fn base_port(i: usize) -> u16 {
    if i == 3 {
        0
    } else {
        7400
    }
}

/// One clone process on a host.
#[derive(Debug, Clone)]
pub struct SimClone {
    pub vm: String,
    /// The guest config it was started with (its address).
    pub config: String,
    pub alive: bool,
    /// When its VM answers on its control socket.
    pub running_at: Duration,
    pub exit: Option<String>,
    pub exited_at: Option<Duration>,
    /// The base it started from (its id) and that base's term.
    pub base: u64,
    pub base_term: u64,
}

impl SimClone {
    pub fn running(&self, now: Duration) -> bool {
        self.alive && self.running_at <= now
    }
}

/// A frozen checkpoint of the VM on a host's disk.
#[derive(Debug, Clone, Copy)]
pub struct SimBase {
    pub id: u64,
    pub term: u64,
    pub made: Duration,
}

impl Sim {
    /// One clone round of host `i`'s agent (after its VM processes were reconciled).
    pub fn clone_round(&mut self, i: usize) {
        self.collect_base(i);
        self.collect_copy(i);
        if self.hosts[i].want.bases.iter().any(|v| v == VM) {
            self.keep_base_warm(i);
        }
        self.keep_copy(i);
        self.stop_unassigned_clones(i);
        self.start_assigned_clones(i);
        self.remove_unused_bases(i);
    }

    /// What this host can make a base from: its primary, alive and answering (a snapshot),
    /// else its live backup's committed image (an export): the term of either.
    fn local_source(&self, i: usize) -> Option<u64> {
        let h = &self.hosts[i];
        let primary = h.primary.as_ref();
        let primary = primary.filter(|p| p.alive && p.stalled_since.is_none());
        // (As the agent: a live backup whose image is of the term it was told.)
        let told = h.want.vms.get(VM).and_then(|a| match a.role {
            failover::model::Role::Backup { min_term } => Some(min_term),
            _ => None,
        });
        let backup = h.backup.as_ref().filter(|b| b.alive).and(h.image);
        let backup = backup.filter(|im| Some(im.term) == told);
        primary.map(|p| p.term).or(backup.map(|im| im.term))
    }

    /// A base whose making finished joins the host's bases (if its snapshot could be taken).
    fn collect_base(&mut self, i: usize) {
        let Some((term, ready)) = self.hosts[i].making else {
            return;
        };
        if ready > self.now {
            return;
        }
        self.hosts[i].making = None;
        if self.local_source(i) != Some(term) {
            self.hosts[i].copy_failed = Some(self.now);
            self.note(format!(
                "{}: base of term {term} failed (no primary or backup of that term)",
                self.names[i]
            ));
            return;
        }
        self.next_base += 1;
        let b = SimBase {
            id: self.next_base,
            term,
            made: self.now,
        };
        self.note(format!(
            "{}: base {} of term {term} ready",
            self.names[i], b.id
        ));
        self.hosts[i].copy_failed = None;
        self.hosts[i].bases.push(b);
    }

    fn keep_base_warm(&mut self, i: usize) {
        let Some(term) = self.local_source(i) else {
            return;
        };
        let h = &self.hosts[i];
        if h.making.is_some() || h.bases.last().is_some_and(|b| b.term == term) {
            return;
        }
        let ready = self.now + Duration::from_millis(20 + self.rng.below(180));
        self.hosts[i].making = Some((term, ready));
    }

    /// Starts copying a base if the host's assignment lists a source with a newer one.
    fn keep_copy(&mut self, i: usize) {
        let h = &self.hosts[i];
        let Some(f) = h.want.fetch.iter().find(|f| f.vm == VM) else {
            return;
        };
        let Some(best) = f.sources.first() else {
            return;
        };
        let backoff = h
            .copy_failed
            .is_some_and(|t| self.now < t + Duration::from_secs(1));
        let have = h.bases.last();
        let fresh = have.is_some_and(|b| b.term >= best.term);
        let recent = have.is_some()
            && h.copied_at
                .is_some_and(|t| self.now < t + Duration::from_secs(2));
        if h.copying.is_some() || h.making.is_some() || backoff || fresh || recent {
            return;
        }
        let sources: Vec<usize> = f.sources.iter().map(|s| self.idx(&s.host)).collect();
        let ready = self.now + Duration::from_millis(20 + self.rng.below(480));
        self.hosts[i].copied_at = Some(self.now);
        self.hosts[i].copying = Some((sources, ready));
    }

    /// A copy that ended: a base from the first source that is up and holds one.
    fn collect_copy(&mut self, i: usize) {
        let Some((sources, ready)) = self.hosts[i].copying.clone() else {
            return;
        };
        if ready > self.now {
            return;
        }
        self.hosts[i].copying = None;
        let src = sources
            .iter()
            .copied()
            .find(|s| self.hosts[*s].up && !self.hosts[*s].bases.is_empty());
        let refused = self.copies_refused;
        let src = src.filter(|_| self.rng.below(8) != 0 && !refused);
        let Some(src) = src else {
            self.hosts[i].copy_failed = Some(self.now);
            let why = if refused { " (refused)" } else { "" };
            self.note(format!("{}: copy of a base failed{why}", self.names[i]));
            return;
        };
        self.hosts[i].copy_failed = None;
        let term = self.hosts[src].bases.last().map_or(0, |b| b.term);
        self.next_base += 1;
        let b = SimBase {
            id: self.next_base,
            term,
            made: self.now,
        };
        self.note(format!(
            "{}: base {} of term {term} copied from {}",
            self.names[i], b.id, self.names[src]
        ));
        self.hosts[i].bases.push(b);
    }

    fn stop_unassigned_clones(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        let want = &h.want.clones;
        let gone: Vec<String> = h
            .clones
            .keys()
            .filter(|n| !want.iter().any(|c| &c.name == *n))
            .cloned()
            .collect();
        for name in &gone {
            h.clones.remove(name);
        }
        h.blocked.retain(|n, _| want.iter().any(|c| &c.name == n));
        for name in gone {
            self.note(format!("{} stops clone {name}", self.names[i]));
        }
    }

    fn start_assigned_clones(&mut self, i: usize) {
        let now = self.now;
        for a in self.hosts[i].want.clones.clone() {
            let h = &self.hosts[i];
            if let Some(c) = h.clones.get(&a.name) {
                if c.alive || c.exited_at.is_some_and(|t| now < t + RESTART_AFTER) {
                    continue;
                }
            }
            match h.bases.last().copied() {
                Some(b) => {
                    let ms = 5 + self.rng.below(50);
                    let h = &mut self.hosts[i];
                    h.blocked.remove(&a.name);
                    h.clones.insert(
                        a.name.clone(),
                        SimClone {
                            vm: a.vm.clone(),
                            config: a.guest_config.clone(),
                            alive: true,
                            running_at: now + Duration::from_millis(ms),
                            exit: None,
                            exited_at: None,
                            base: b.id,
                            base_term: b.term,
                        },
                    );
                    self.note(format!(
                        "{} starts clone {} (base {})",
                        self.names[i], a.name, b.id
                    ));
                }
                // Being made or copied, or to be copied, with no try failed since the last
                // success: it waits, unreported (as the real agent).
                None if h.copy_failed.is_none()
                    && (h.making.is_some()
                        || h.copying.is_some()
                        || h.want.fetch.iter().any(|f| f.vm == a.vm)) =>
                {
                    self.hosts[i].blocked.remove(&a.name);
                }
                None => {
                    let refused = self.copies_refused && h.copy_failed.is_some();
                    let why = format!(
                        "no clone base of {} on this host{}",
                        a.vm,
                        if refused { " (copies refused)" } else { "" }
                    );
                    self.hosts[i].blocked.insert(a.name.clone(), why);
                }
            }
        }
    }

    fn remove_unused_bases(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        let wanted =
            h.want.bases.iter().any(|v| v == VM) || h.want.clones.iter().any(|c| c.vm == VM);
        let newest = h.bases.len().saturating_sub(1);
        let old = std::mem::take(&mut h.bases);
        for (k, b) in old.into_iter().enumerate() {
            let used = h.clones.values().any(|c| c.base == b.id);
            if used || (wanted && k == newest) {
                h.bases.push(b);
            }
        }
    }

    /// What host `i`'s agent reports of its clones and bases.
    pub fn observe_clones(&self, i: usize) -> (Vec<CloneObservation>, Vec<BaseObservation>) {
        let h = &self.hosts[i];
        let mut clones: Vec<CloneObservation> = h
            .clones
            .iter()
            .map(|(name, c)| CloneObservation {
                name: name.clone(),
                vm: c.vm.clone(),
                alive: c.alive,
                running: c.running(self.now),
                exit: c.exit.clone(),
                base_term: c.base_term,
            })
            .collect();
        for (name, why) in &h.blocked {
            clones.push(CloneObservation {
                name: name.clone(),
                vm: VM.into(),
                alive: false,
                running: false,
                exit: Some(why.clone()),
                base_term: 0,
            });
        }
        let bases = h
            .bases
            .last()
            .map(|b| BaseObservation {
                vm: VM.into(),
                term: b.term,
                age_ms: self.now.saturating_sub(b.made).as_millis() as u64,
            })
            .into_iter()
            .collect();
        (clones, bases)
    }

    /// Kills one clone process on host `i` (its agent starts it again after a second).
    pub fn kill_clone(&mut self, i: usize) {
        let now = self.now;
        let n = self.hosts[i].clones.len() as u64;
        let k = self.rng.below(n) as usize;
        let Some((name, c)) = self.hosts[i].clones.iter_mut().nth(k) else {
            return;
        };
        if !c.alive {
            return;
        }
        c.alive = false;
        c.exit = Some("killed by signal 9".into());
        c.exited_at = Some(now);
        let what = format!("FAULT kill clone {name} on {}", self.names[i]);
        self.note(what);
    }
}
