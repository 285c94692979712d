//! The simulated world: hosts with their disks and VM processes, the manager and its store,
//! and the messages between them (a [`Sim`], stepped by [`Sim::step`] in `faults.rs`).
//!
//! Hosts run simulated VM processes (a primary that checkpoints every 10 ms to its backups and
//! releases output once every backup in its set acknowledged; backups that keep an image of
//! `(term, version)` on the host's disk, which survives crashes). The manager is the real
//! [`Manager`] with an in-memory store.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use failover::agent::Applied;
use failover::manager::{Input, Manager, ManagerConfig, Output};
use failover::model::{Assignments, BackupTarget, ProcRole, Report, VmObservation, VmSpec};
use failover::store::{MemStore, Store};

use super::clones::{SimBase, SimClone};
use super::rng::Rng;

/// One step of virtual time.
pub const STEP: Duration = Duration::from_millis(1);
/// The protected VM's name.
pub const VM: &str = "web";

#[derive(Debug, Clone)]
pub struct PrimaryProc {
    pub term: u64,
    pub history: u64,
    pub version: u64,
    pub backups: Vec<String>,
    pub alive: bool,
    pub exit: Option<String>,
    /// Per backup host: the version it acknowledged of this history.
    pub acked: BTreeMap<String, u64>,
    pub released: u64,
    pub handed_over: bool,
    /// SIGSTOPped (hung) since: no checkpoint, no answer to its agent.
    pub stalled_since: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct BackupProc {
    pub alive: bool,
    pub last_heard: Option<Duration>,
}

/// A backup's image on a host's disk: survives crashes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Image {
    pub history: u64,
    pub term: u64,
    pub version: u64,
}

#[derive(Debug, Default)]
pub struct Host {
    pub up: bool,
    pub primary: Option<PrimaryProc>,
    pub backup: Option<BackupProc>,
    pub image: Option<Image>,
    /// The backup's persisted lowest term (on disk).
    pub min_term: u64,
    /// The agent's `promote-term` marker (on disk): a primary of this term was promoted here.
    pub promote_marker: Option<u64>,
    /// A promoted primary starting: it consumes the image and runs at this time (lost if the
    /// host crashes first).
    pub starting: Option<(Duration, u64, Vec<BackupTarget>)>,
    pub applied: BTreeMap<String, Applied>,
    pub want: Assignments,
    /// Manager link: down since (None: up).
    pub cut_since: Option<Duration>,
    pub connected: bool,
    /// The agent must open a new connection (say hello) once it can reach the manager.
    pub needs_hello: bool,
    /// Messages in flight from the manager, with delivery time.
    pub inbox: VecDeque<(Duration, Assignments)>,
    /// Clone processes by name (gone with a crash).
    pub clones: BTreeMap<String, SimClone>,
    /// Clone bases on disk (survive crashes), the newest last.
    pub bases: Vec<SimBase>,
    /// A base being made: its term and when it is ready (gone with a crash).
    pub making: Option<(u64, Duration)>,
    /// A base being copied from other hosts: the sources (indexes, the best first) and when
    /// the copy ends (gone with a crash).
    pub copying: Option<(Vec<usize>, Duration)>,
    /// When making or copying a base last failed (none is copied for a second after, as the
    /// real agent; cleared by a success).
    pub copy_failed: Option<Duration>,
    /// When the last copy began (with a base here, none is begun within 2 s of it).
    pub copied_at: Option<Duration>,
    /// Clones assigned that cannot start (no base here), with why (the agent's memory).
    pub blocked: BTreeMap<String, String>,
    /// The agent received an assignment since it started (before it, the real agent leaves
    /// its clones and bases alone).
    pub assigned: bool,
}

pub struct Sim {
    pub rng: Rng,
    pub now: Duration,
    pub hosts: Vec<Host>,
    pub names: Vec<String>,
    /// Primary↔backup links cut (by host index pair, unordered).
    pub cuts: Vec<(usize, usize)>,
    pub mgr: Manager,
    pub mgr_up: bool,
    pub store: MemStore,
    /// Reports in flight to the manager (delivery time, input).
    pub to_mgr: VecDeque<(Duration, Input)>,
    pub next_history: u64,
    // Checks.
    pub max_term_seen: u64,
    /// Per term: the image version it was promoted from.
    pub floors: BTreeMap<u64, u64>,
    /// Highest version released per term.
    pub released: BTreeMap<u64, u64>,
    /// Newest term whose primary released output.
    pub newest_releasing: u64,
    pub promotions: u32,
    pub log: Vec<String>,
    /// Ids of clone bases.
    pub next_base: u64,
    /// Every copy of a base is refused (the hosts' certificates do not cover the VM, say): in
    /// one seed of four, so that copies that keep failing are exercised.
    pub copies_refused: bool,
    /// When kept (Some), every persist and event the manager output, for a test's checks.
    pub outputs: Option<Vec<Output>>,
    /// When outputs are kept: each host's last report delivered to this manager and when.
    pub reports: BTreeMap<String, (Duration, Report)>,
    /// When outputs are kept: `reports` as they were at each persist kept, in order.
    pub persist_reports: Vec<BTreeMap<String, (Duration, Report)>>,
}

pub fn cfg() -> ManagerConfig {
    ManagerConfig {
        detect: Duration::from_millis(60),
        backup_lost: Duration::from_millis(1500),
        hung: Duration::from_millis(1000),
        // (Short, so that a run of a few seconds sees slots re-placed and hosts avoided; longer
        // than a killed clone's restart, 1 s.)
        clone_stuck: Duration::from_millis(1500),
        ..ManagerConfig::default()
    }
}

impl Sim {
    pub fn new(seed: u64, hosts: usize) -> Sim {
        let names: Vec<String> = (0..hosts).map(|i| format!("h{i}")).collect();
        let mut s = Sim {
            rng: Rng::from_seed(seed),
            now: Duration::ZERO,
            hosts: (0..hosts)
                .map(|_| Host {
                    up: true,
                    ..Host::default()
                })
                .collect(),
            names,
            cuts: Vec::new(),
            mgr: Manager::new(cfg(), Default::default(), Duration::ZERO),
            mgr_up: true,
            store: MemStore::default(),
            to_mgr: VecDeque::new(),
            next_history: 1,
            max_term_seen: 0,
            floors: BTreeMap::new(),
            released: BTreeMap::new(),
            newest_releasing: 0,
            promotions: 0,
            log: Vec::new(),
            next_base: 0,
            copies_refused: seed.is_multiple_of(4),
            outputs: None,
            reports: BTreeMap::new(),
            persist_reports: Vec::new(),
        };
        for i in 0..hosts {
            s.hello(i);
        }
        for _ in 0..20 {
            s.step();
        }
        let spec = VmSpec {
            name: VM.into(),
            mem_mib: 64,
            disk_mib: 64,
            guest_config: String::new(),
            backups: if hosts > 2 { 2 } else { 1 },
            hosts: vec![],
            port: 7100,
        };
        s.mgr.create(s.now, spec).expect("create");
        s.drive_manager();
        s
    }

    pub fn note(&mut self, what: String) {
        self.log
            .push(format!("{:>6} ms  {what}", self.now.as_millis()));
    }

    pub fn hello(&mut self, i: usize) {
        self.hosts[i].connected = true;
        let host = self.names[i].clone();
        let input = Input::Hello {
            host,
            repl_ip: format!("10.0.0.{i}"),
            capacity_mib: 4096,
        };
        self.to_mgr
            .push_back((self.now + Duration::from_millis(1), input));
    }

    pub fn idx(&self, host: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == host)
            .expect("known host")
    }

    /// Runs the manager's outputs: persist first, then sends.
    pub fn drive_manager(&mut self) {
        while let Some(o) = self.mgr.poll_output() {
            match o {
                Output::Persist(st) => {
                    if let Some(o) = self.outputs.as_mut() {
                        o.push(Output::Persist(st.clone()));
                        self.persist_reports.push(self.reports.clone());
                    }
                    for (n, r) in &st.vms {
                        let old = self.store.state.vms.get(n).map_or(0, |r| r.term);
                        assert!(r.term >= old, "term of {n} went down: {old} → {}", r.term);
                    }
                    self.store.save(&st).unwrap();
                }
                Output::Assign { host, assignments } => {
                    let i = self.idx(&host);
                    let delay = Duration::from_millis(1 + self.rng.below(3));
                    self.hosts[i]
                        .inbox
                        .push_back((self.now + delay, assignments));
                }
                Output::Event(e) => {
                    if let Some(o) = self.outputs.as_mut() {
                        o.push(Output::Event(e.clone()));
                    }
                    self.note(format!("event {:?} {:?} {}", e.kind, e.host, e.detail))
                }
            }
        }
    }

    pub fn link_up(&self, a: usize, b: usize) -> bool {
        self.hosts[a].up
            && self.hosts[b].up
            && !self
                .cuts
                .iter()
                .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
    }

    pub fn observe(&self, i: usize) -> Vec<VmObservation> {
        let h = &self.hosts[i];
        let mut v = Vec::new();
        // A promotion that a crash cut short: the marker names the term and the image is still
        // unconsumed (the real agent finds the same on disk).
        if let (None, None, Some(t)) = (&h.primary, &h.starting, h.promote_marker) {
            if h.image.is_some_and(|im| im.term < t) {
                v.push(VmObservation::unstarted_primary(VM, t));
            }
        }
        // A promoted primary whose process runs is reported alive before its guest starts (as
        // the real agent does).
        if let (None, Some((_, term, backups))) = (&h.primary, &h.starting) {
            v.push(VmObservation {
                vm: VM.into(),
                role: ProcRole::Primary,
                alive: true,
                exit: None,
                term: *term,
                image_term: 0,
                seq: None,
                protected: false,
                backup_hosts: backups.iter().map(|b| b.host.clone()).collect(),
                output_held: false,
                silent_ms: Some(0),
                handed_over: false,
                never_ran: false,
            });
        }
        if let Some(p) = &h.primary {
            let acked = p
                .backups
                .iter()
                .map(|b| p.acked.get(b).copied())
                .collect::<Option<Vec<_>>>();
            v.push(VmObservation {
                vm: VM.into(),
                role: ProcRole::Primary,
                alive: p.alive,
                exit: p.exit.clone(),
                term: p.term,
                image_term: 0,
                seq: acked.as_ref().and_then(|a| a.iter().min().copied()),
                protected: !p.backups.is_empty() && acked.is_some(),
                backup_hosts: p.backups.clone(),
                output_held: !p.backups.is_empty(),
                silent_ms: Some(
                    p.stalled_since
                        .map_or(0, |t| self.now.saturating_sub(t).as_millis() as u64),
                ),
                handed_over: p.handed_over,
                // (As the real agent: the marker names its term and the image is whole.)
                never_ran: !p.alive
                    && h.promote_marker == Some(p.term)
                    && h.image.is_some_and(|im| im.term < p.term),
            });
        }
        if let Some(b) = &h.backup {
            v.push(VmObservation {
                vm: VM.into(),
                role: ProcRole::Backup,
                alive: b.alive,
                exit: None,
                term: h.min_term,
                image_term: h.image.map_or(0, |im| im.term),
                seq: h.image.map(|im| im.version),
                protected: false,
                backup_hosts: vec![],
                output_held: false,
                silent_ms: b
                    .last_heard
                    .map(|t| self.now.saturating_sub(t).as_millis() as u64),
                handed_over: false,
                never_ran: false,
            });
        }
        v
    }
}
