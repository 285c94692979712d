//! The agents of the simulated hosts: each round delivers the manager's assignments, runs the
//! real [`failover::agent::reconcile`] and carries its actions out on the simulated processes,
//! then reports to the manager.

use std::collections::BTreeMap;
use std::time::Duration;

use failover::agent::{reconcile, Action, Applied};
use failover::manager::Input;
use failover::model::{BackupTarget, ProcRole};

use super::world::{BackupProc, Image, PrimaryProc, Sim, VM};

impl Sim {
    /// One agent round on host `i`: deliver assignments, reconcile, report.
    pub fn agent_step(&mut self, i: usize) {
        if !self.hosts[i].up {
            return;
        }
        let link_ok = self.hosts[i].cut_since.is_none();
        while link_ok
            && self.hosts[i]
                .inbox
                .front()
                .is_some_and(|(t, _)| *t <= self.now)
        {
            let (_, a) = self.hosts[i].inbox.pop_front().unwrap();
            self.hosts[i].want = a;
            self.hosts[i].assigned = true;
        }
        if link_ok && self.hosts[i].needs_hello && self.mgr_up {
            self.hosts[i].needs_hello = false;
            self.hello(i);
        }
        self.start_promoted(i);
        let obs = self.observe(i);
        let actions = reconcile(&self.hosts[i].want, &obs, &self.hosts[i].applied);
        for a in actions {
            self.act(i, a);
        }
        if self.hosts[i].assigned {
            self.clone_round(i);
        }
        if self.now.as_millis() % 10 == (i as u128) % 10 && link_ok && self.hosts[i].connected {
            let (clones, bases) = self.observe_clones(i);
            let report = failover::model::Report {
                vms: self.observe(i),
                clones,
                bases,
                base_port: super::clones::base_port(i),
                usage: vec![],
            };
            let delay = Duration::from_millis(1 + self.rng.below(4));
            let host = self.names[i].clone();
            self.to_mgr
                .push_back((self.now + delay, Input::Report { host, report }));
        }
    }

    /// A promoted primary whose start is due consumes the image and runs (or exits at once if
    /// there is no image).
    pub fn start_promoted(&mut self, i: usize) {
        let Some((ready, term, backups)) = self.hosts[i].starting.clone() else {
            return;
        };
        if ready > self.now {
            return;
        }
        // Now and then the host dies right before the guest's start (a chaos soak's finding).
        if self.rng.chance(50) && self.hosts.iter().filter(|h| h.up).count() > 1 {
            self.note(format!(
                "FAULT crash host {} before its promoted guest runs",
                self.names[i]
            ));
            self.crash_host(i);
            return;
        }
        self.hosts[i].starting = None;
        // Now and then the process fails before its start gate (the image stays whole).
        if self.rng.chance(30) {
            let mut p = self.new_primary(term, 0, &backups);
            p.alive = false;
            p.exit = Some("failed before its guest ran".into());
            self.note(format!(
                "primary on {} failed before its guest ran",
                self.names[i]
            ));
            self.hosts[i].primary = Some(p);
            return;
        }
        match self.hosts[i].image {
            Some(im) => {
                let floor = im.version;
                // Every version released by older terms must be in this image.
                for (&t, &v) in &self.released {
                    assert!(t >= term || v <= floor, "promotion at term {term} from version {floor} loses version {v} released at term {t}");
                }
                self.floors.insert(term, floor);
                self.promotions += 1;
                let p = self.new_primary(term, floor, &backups);
                self.hosts[i].primary = Some(p);
                self.hosts[i].image = None; // the image now runs
            }
            None => {
                let mut p = self.new_primary(term, 0, &backups);
                p.alive = false;
                p.exit = Some("no image to promote".into());
                self.hosts[i].primary = Some(p);
            }
        }
    }

    pub fn new_primary(
        &mut self,
        term: u64,
        version: u64,
        backups: &[BackupTarget],
    ) -> PrimaryProc {
        self.next_history += 1;
        PrimaryProc {
            term,
            history: self.next_history,
            version,
            backups: backups.iter().map(|b| b.host.clone()).collect(),
            alive: true,
            exit: None,
            acked: BTreeMap::new(),
            released: version,
            handed_over: false,
            stalled_since: None,
        }
    }

    pub fn act(&mut self, i: usize, a: Action) {
        self.note(format!("{} does {a:?}", self.names[i]));
        match a {
            Action::BootPrimary { term, backups, .. } => {
                let p = self.new_primary(term, 0, &backups);
                self.hosts[i].applied.insert(
                    VM.into(),
                    Applied {
                        backups: Some(backups),
                        promoting: None,
                        handover: None,
                    },
                );
                self.hosts[i].primary = Some(p);
            }
            Action::Promote { term, backups, .. } => {
                let h = &mut self.hosts[i];
                h.applied.insert(
                    VM.into(),
                    Applied {
                        backups: Some(backups.clone()),
                        promoting: Some(term),
                        handover: None,
                    },
                );
                // (The real agent's marker refuses a second start of a term.)
                if h.promote_marker.is_some_and(|t| t >= term) {
                    let mut p = self.new_primary(term, 0, &backups);
                    (p.alive, p.exit) = (false, Some("refusing to start term again".into()));
                    self.hosts[i].primary = Some(p);
                    return;
                }
                h.promote_marker = Some(term);
                h.min_term = h.min_term.max(term);
                h.backup = None;
                // The new primary consumes the image and runs a little later (on a busy
                // machine, much later now and then).
                let ms = match self.rng.chance(100) {
                    true => 100 + self.rng.below(400),
                    false => self.rng.below(30),
                };
                let ready = self.now + Duration::from_millis(ms);
                self.hosts[i].starting = Some((ready, term, backups));
            }
            Action::StartBackup { min_term, .. } => {
                let h = &mut self.hosts[i];
                h.min_term = h.min_term.max(min_term);
                h.backup = Some(BackupProc {
                    alive: true,
                    last_heard: None,
                });
            }
            Action::SetBackups { backups, .. } => {
                let h = &mut self.hosts[i];
                if let Some(p) = h.primary.as_mut() {
                    p.backups = backups.iter().map(|b| b.host.clone()).collect();
                    p.acked.clear();
                }
                // (A primary whose process runs, its guest not started yet, gets it too.)
                if let Some((_, _, set)) = h.starting.as_mut() {
                    *set = backups.clone();
                }
                h.applied.entry(VM.into()).or_default().backups = Some(backups);
            }
            Action::Handover { term, .. } => {
                self.hosts[i].applied.entry(VM.into()).or_default().handover = Some(term);
                self.handover(i);
            }
            Action::FenceBackup { term, .. } => {
                self.hosts[i].min_term = self.hosts[i].min_term.max(term);
            }
            Action::Stop { role, .. } => match role {
                ProcRole::Primary => {
                    self.hosts[i].primary = None;
                    self.hosts[i].starting = None;
                }
                ProcRole::Backup => self.hosts[i].backup = None,
            },
        }
    }

    /// The primary on host `i` pauses its guest, sends a last checkpoint and stops once every
    /// backup acknowledged it (here at once, if every backup can be reached).
    pub fn handover(&mut self, i: usize) {
        let Some(mut p) = self.hosts[i].primary.clone().filter(|p| p.alive) else {
            return;
        };
        let reach: Vec<usize> = p.backups.iter().map(|b| self.idx(b)).collect();
        let all = reach.iter().all(|&j| {
            self.link_up(i, j)
                && self.hosts[j].backup.as_ref().is_some_and(|b| b.alive)
                && self.hosts[j].min_term <= p.term
                && self.hosts[j].image.is_none_or(|im| im.term <= p.term)
        });
        if !all || p.backups.is_empty() {
            return; // the manager gives up after its limit; the primary runs on
        }
        p.version += 1;
        for &j in &reach {
            self.hosts[j].image = Some(Image {
                history: p.history,
                term: p.term,
                version: p.version,
            });
            self.hosts[j].backup.as_mut().unwrap().last_heard = Some(self.now);
        }
        for b in p.backups.clone() {
            p.acked.insert(b, p.version);
        }
        if p.version > p.released {
            p.released = p.version;
            self.release(p.term, p.version);
        }
        p.alive = false;
        p.handed_over = true;
        p.exit = Some("exit code 4 (handed over)".into());
        self.note(format!(
            "{} handed over at version {}",
            self.names[i], p.version
        ));
        self.hosts[i].primary = Some(p);
    }
}
