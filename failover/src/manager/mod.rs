//! The manager's decisions as a sans-IO state machine.
//!
//! Inputs: agents' hellos and reports (heartbeats), lost connections, API calls, and time
//! (`tick`). Outputs ([`Output`], in order): `Persist` (the driver makes it durable before it acts
//! on anything after it), `Assign` (a host's whole assignment, sent to its agent) and `Event`.
//!
//! The rules (docs/failover.md):
//! - **Two signals**: a VM's primary is failed when its host's agent has been silent for longer
//!   than `detect` *and* every backup that can be heard says checkpoints stopped arriving for
//!   longer than `detect`; or at once when the primary's own agent reports its process exited.
//!   A manager that merely lost its own link to a healthy primary hears the backups say
//!   checkpoints still arrive, and does nothing.
//! - **Fenced promotion**: the term is raised and persisted before any agent hears of it; the
//!   chosen backup is the most advanced among those synced at the current term (they hold
//!   everything released); the others are told the new term, the old primary's host is told to
//!   run nothing of the VM.
//! - **Re-protection**: whenever a running VM has fewer backups than asked, a backup is placed
//!   on the least loaded other host; it counts as synced only once the primary reports itself
//!   protected with exactly that set.

mod clones;
mod detect;
mod drain;
mod fetch;
mod handover;
mod limits;
mod place;
mod promote;
mod retry;
mod view;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use clones::{CloneView, ClonesView, ScaleRequest};
pub use drain::DrainedReport;
pub use limits::UsageView;
pub use retry::RETRY_LIMIT;
pub use view::{BackupView, HostView, VmView};

use crate::event::{Event, EventKind};
use crate::model::{
    Assignment, Assignments, BackupSlot, BackupTarget, ClusterState, HostId, Phase, Report, Role,
    Source, VmRecord, VmSpec,
};

/// Longest a new primary (booted or promoted) may take to be seen running before the VM is
/// reported down.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// How often the driver should call [`Manager::tick`].
pub const TICK: Duration = Duration::from_millis(5);

/// Timing of the manager's rules.
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// Silence (of the primary's host and of the checkpoints at its backups) after which the
    /// primary is failed.
    pub detect: Duration,
    /// Silence of a backup's host after which the backup is replaced.
    pub backup_lost: Duration,
    /// A primary whose host's agent speaks but which has not answered that agent for this
    /// long (hung, stopped, stuck in the kernel) is failed, if its backups also say that
    /// checkpoints stopped (for longer than `detect`).
    pub hung: Duration,
    /// Longest a scaled-down clone drains on the load balancer before it is stopped anyway.
    pub drain_limit: Duration,
    /// A placed clone its host reports but not running for this long is placed on another
    /// host, and that host avoided for the VM three times as long (`fetch::stuck_clones`); an
    /// exporter asked for a base this long without one has the primary make its own.
    pub clone_stuck: Duration,
}

/// Default [`ManagerConfig::drain_limit`].
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            detect: Duration::from_millis(60),
            backup_lost: Duration::from_millis(1500),
            hung: Duration::from_millis(1000),
            drain_limit: DRAIN_LIMIT,
            clone_stuck: Duration::from_secs(20),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Make this state durable before acting on any later output.
    Persist(ClusterState),
    /// Send this host's agent its whole assignment.
    Assign {
        /// The host.
        host: HostId,
        /// What it must run.
        assignments: Assignments,
    },
    /// Log this.
    Event(Event),
}

/// Something the manager was told by an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An agent connected (or reconnected).
    Hello {
        /// Its host.
        host: HostId,
        /// Its replication address.
        repl_ip: String,
        /// Memory it offers, MiB.
        capacity_mib: u64,
    },
    /// A heartbeat with the host's VM processes.
    Report {
        /// Its host.
        host: HostId,
        /// What it runs.
        report: Report,
    },
    /// The agent's connection closed.
    Gone {
        /// Its host.
        host: HostId,
    },
}

/// Why an API call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No such VM or host.
    #[error("not found: {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("already exists: {0}")]
    Exists(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// It cannot be done now (no host, no synced backup, another operation under way).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// What an agent last told the manager.
#[derive(Debug, Clone)]
pub(crate) struct HostState {
    pub(crate) repl_ip: String,
    pub(crate) connected: bool,
    pub(crate) last_seen: Duration,
    pub(crate) report: Report,
    /// A report arrived on the current connection (before it, the host's VMs are unknown).
    pub(crate) reported: bool,
    pub(crate) sent: Option<Assignments>,
    pub(crate) down: bool,
    /// When it was last heard again after a gap of more than half the detection timeout (its
    /// host, or the path to it, stalled): what its backups say of their silence counts only
    /// from then (see `detect::checkpoints_stopped`).
    pub(crate) resumed_at: Option<Duration>,
    /// Memory it offers to VMs, MiB (its hello): room for clones.
    pub(crate) capacity_mib: u64,
    /// By VM: the term of the committed image its backup last reported alive, and when
    /// (what it can export as a clone base; `clones::runs_synced_backup`).
    pub(crate) exportable: BTreeMap<String, (u64, Duration)>,
}

/// Counters for the metrics page.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Promotions after a detected failure.
    pub failovers: u64,
    /// Promotions asked for by a user (failover or migration).
    pub switchovers: u64,
    /// Last detection time: last sign of life of the primary to the decision, ms.
    pub last_detect_ms: Option<u64>,
    /// Last promotion time: decision to the new primary reported running, ms.
    pub last_promote_ms: Option<u64>,
}

/// The manager.
#[derive(Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    state: ClusterState,
    /// What was last handed out for persisting (every change is compared with it).
    persisted: ClusterState,
    hosts: BTreeMap<HostId, HostState>,
    started: Duration,
    out: VecDeque<Output>,
    /// When each promotion was decided (for its duration).
    promoting_since: BTreeMap<String, Duration>,
    /// When each handover began (not persisted: a restarted manager gives it a new limit).
    handover_since: BTreeMap<String, Duration>,
    /// When each start (boot or promotion) began to be watched.
    starting_since: BTreeMap<String, Duration>,
    /// Planned migrations: VM → target host (not persisted: a restart forgets them).
    migrations: BTreeMap<String, HostId>,
    /// VMs currently known protected / reported down (for transition events).
    protected: BTreeSet<String>,
    down: BTreeSet<String>,
    counters: Counters,
    last_decide: Duration,
    /// When each VM's last retried promotion was decided (see `retry`).
    last_retry: BTreeMap<String, Duration>,
    /// When the primary of each VM's current term was first seen running.
    running_since: BTreeMap<String, Duration>,
    /// (VM, host): when a backup there last joined the VM's set.
    added_at: BTreeMap<(String, HostId), Duration>,
    /// (VM, backup host): since when the running primary has had it in its set while the
    /// backup never heard from it, and when that was last seen (see
    /// `detect::drop_lost_backups`).
    unheard_since: BTreeMap<(String, HostId), (Duration, Duration)>,
    /// (VM, host): a backup there was dropped because its link to the primary failed, until
    /// then; re-protection prefers other hosts meanwhile.
    shunned: BTreeMap<(String, HostId), Duration>,
    /// Autoscalers and clone events (see `clones`).
    clone_tracker: clones::CloneTracker,
    /// Balancers' leases and drains' start times (see `drain`).
    drains: drain::DrainTracker,
}

impl Manager {
    /// A manager resuming from `state` (loaded from the store) at time `now`.
    pub fn new(cfg: ManagerConfig, state: ClusterState, now: Duration) -> Manager {
        Manager {
            cfg,
            persisted: state.clone(),
            state,
            hosts: BTreeMap::new(),
            started: now,
            out: VecDeque::new(),
            promoting_since: BTreeMap::new(),
            handover_since: BTreeMap::new(),
            starting_since: BTreeMap::new(),
            migrations: BTreeMap::new(),
            protected: BTreeSet::new(),
            down: BTreeSet::new(),
            counters: Counters::default(),
            last_decide: Duration::ZERO,
            last_retry: BTreeMap::new(),
            running_since: BTreeMap::new(),
            added_at: BTreeMap::new(),
            unheard_since: BTreeMap::new(),
            shunned: BTreeMap::new(),
            clone_tracker: clones::CloneTracker::default(),
            drains: drain::DrainTracker::default(),
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The state as last decided.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Handles an agent's input.
    pub fn handle(&mut self, now: Duration, input: Input) {
        match input {
            Input::Hello {
                host,
                repl_ip,
                capacity_mib,
            } => {
                if repl_ip.parse::<std::net::IpAddr>().is_err() {
                    let detail =
                        format!("refused: replication address '{repl_ip}' is not an IP address");
                    self.event(now, EventKind::HostDown, None, Some(&host), None, detail);
                    return;
                }
                let h = self.hosts.entry(host.clone()).or_insert(HostState {
                    repl_ip: repl_ip.clone(),
                    connected: true,
                    last_seen: now,
                    report: Report::default(),
                    reported: false,
                    sent: None,
                    down: false,
                    resumed_at: None,
                    capacity_mib,
                    exportable: BTreeMap::new(),
                });
                if now.saturating_sub(h.last_seen) > self.cfg.detect / 2 {
                    h.resumed_at = Some(now);
                }
                h.repl_ip = repl_ip;
                h.capacity_mib = capacity_mib;
                h.connected = true;
                h.last_seen = now;
                h.reported = false;
                // A new connection gets its whole assignment again.
                h.sent = None;
                let was_down = std::mem::replace(&mut h.down, false);
                self.event(now, EventKind::HostUp, None, Some(&host), None, {
                    if was_down {
                        "agent back".to_string()
                    } else {
                        "agent connected".to_string()
                    }
                });
            }
            Input::Report { host, report } => {
                if let Some(h) = self.hosts.get_mut(&host) {
                    if now.saturating_sub(h.last_seen) > self.cfg.detect / 2 {
                        h.resumed_at = Some(now);
                    }
                    h.last_seen = now;
                    for o in &report.vms {
                        if o.role == crate::model::ProcRole::Backup && o.alive && o.seq.is_some() {
                            h.exportable.insert(o.vm.clone(), (o.image_term, now));
                        }
                    }
                    h.report = report;
                    h.reported = true;
                    if std::mem::replace(&mut h.down, false) {
                        self.event(
                            now,
                            EventKind::HostUp,
                            None,
                            Some(&host),
                            None,
                            "heartbeats again".into(),
                        );
                    }
                }
            }
            Input::Gone { host } => {
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.connected = false;
                }
            }
        }
        self.decide(now);
    }

    /// Lets time pass: detection and timeouts.
    pub fn tick(&mut self, now: Duration) {
        self.decide(now);
    }

    /// If the manager itself was not run for a while (more than half the detection timeout
    /// between two decisions: its host stalled), the silence it could not hear is not held
    /// against the hosts.
    fn forgive_own_stall(&mut self, now: Duration) {
        let gap = now.saturating_sub(self.last_decide);
        if self.last_decide > Duration::ZERO && gap > self.cfg.detect / 2 {
            for h in self.hosts.values_mut() {
                h.last_seen = (h.last_seen + gap).min(now);
            }
        }
        self.last_decide = now;
    }

    /// Creates and places a VM.
    pub fn create(&mut self, now: Duration, spec: VmSpec) -> Result<(), ApiError> {
        spec.validate().map_err(ApiError::Invalid)?;
        if self.state.vms.contains_key(&spec.name) {
            return Err(ApiError::Exists(spec.name));
        }
        // (A VM's backups bind its port and the next one: the next one must not be another
        // VM's port, nor this port another's next one.)
        let neighbour = self.state.vms.values().find(|r| {
            spec.data_port() == Some(r.spec.port) || r.spec.data_port() == Some(spec.port)
        });
        if let Some(r) = neighbour {
            return Err(ApiError::Invalid(format!(
                "port {}: VM {} uses port {} (a VM's backups listen on its port and the next)",
                spec.port, r.spec.name, r.spec.port
            )));
        }
        let primary = self
            .pick_host(now, &spec, &[])
            .ok_or_else(|| ApiError::Unavailable("no live host may run it".into()))?;
        let term = self.state.retired.get(&spec.name).map_or(1, |t| t + 1);
        let mut rec = VmRecord {
            spec: spec.clone(),
            term,
            phase: Phase::Creating,
            primary: Some(primary.clone()),
            started: false,
            backups: Vec::new(),
            handover_to: None,
            retries: 0,
            clones: Default::default(),
            limits: Default::default(),
        };
        self.reprotect(now, &mut rec);
        let hosts: Vec<&str> = rec.backups.iter().map(|b| b.host.as_str()).collect();
        let detail = format!("primary on {primary}, backups on {hosts:?}");
        self.state.vms.insert(spec.name.clone(), rec);
        self.event(
            now,
            EventKind::Created,
            Some(&spec.name),
            Some(&primary),
            Some(term),
            detail,
        );
        self.decide(now);
        Ok(())
    }

    /// Deletes a VM: every host stops its processes.
    pub fn delete(&mut self, now: Duration, name: &str) -> Result<(), ApiError> {
        let Some(rec) = self.state.vms.remove(name) else {
            return Err(ApiError::NotFound(name.into()));
        };
        self.state.retired.insert(name.into(), rec.term);
        for m in [
            &mut self.promoting_since,
            &mut self.handover_since,
            &mut self.starting_since,
        ] {
            m.remove(name);
        }
        self.protected.remove(name);
        self.down.remove(name);
        self.migrations.remove(name);
        self.last_retry.remove(name);
        self.running_since.remove(name);
        self.added_at.retain(|(vm, _), _| vm != name);
        self.unheard_since.retain(|(vm, _), _| vm != name);
        self.shunned.retain(|(vm, _), _| vm != name);
        self.event(
            now,
            EventKind::Deleted,
            Some(name),
            None,
            None,
            "deleted".into(),
        );
        self.decide(now);
        Ok(())
    }

    /// Promotes a synced backup (`to`, or the most advanced) although the primary may be alive.
    pub fn failover(
        &mut self,
        now: Duration,
        name: &str,
        to: Option<&str>,
    ) -> Result<u64, ApiError> {
        let rec = self.record(name)?;
        if rec.phase != Phase::Running {
            return Err(ApiError::Unavailable(format!("{name} is {:?}", rec.phase)));
        }
        let cand = self.candidate(now, &rec, to).ok_or_else(|| {
            ApiError::Unavailable(match to {
                Some(h) => format!("{h} is not a live backup synced at term {}", rec.term),
                None => format!("no live backup synced at term {}", rec.term),
            })
        })?;
        self.counters.switchovers += 1;
        let term = self.promote(now, name, &cand, "requested".into());
        self.decide(now);
        Ok(term)
    }

    /// Moves a VM's primary to `to`: a backup is started there if there is none, and once it
    /// is synced the VM fails over to it.
    pub fn migrate(&mut self, now: Duration, name: &str, to: &str) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        if rec.phase != Phase::Running {
            return Err(ApiError::Unavailable(format!("{name} is {:?}", rec.phase)));
        }
        if rec.primary.as_deref() == Some(to) {
            return Err(ApiError::Invalid(format!("{name} already runs on {to}")));
        }
        if !self.fresh(now, to) || !rec.spec.allows(to) {
            return Err(ApiError::Unavailable(format!(
                "{to} is not a live host allowed for {name}"
            )));
        }
        if !rec.backups.iter().any(|b| b.host == to) {
            rec.backups.push(BackupSlot {
                host: to.into(),
                synced_term: None,
            });
            self.event(
                now,
                EventKind::BackupAdded,
                Some(name),
                Some(to),
                Some(rec.term),
                "migration target".into(),
            );
            self.state.vms.insert(name.into(), rec);
        }
        self.migrations.insert(name.into(), to.into());
        self.decide(now);
        Ok(())
    }

    fn record(&self, name: &str) -> Result<VmRecord, ApiError> {
        self.state
            .vms
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(name.into()))
    }

    /// Runs every rule, then persists and sends what changed (in that order).
    fn decide(&mut self, now: Duration) {
        self.forgive_own_stall(now);
        self.note_hosts_down(now);
        let names: Vec<String> = self.state.vms.keys().cloned().collect();
        for name in names {
            self.decide_vm(now, &name);
        }
        self.decide_clones(now);
        if self.state != self.persisted {
            self.persisted = self.state.clone();
            self.out.push_back(Output::Persist(self.state.clone()));
        }
        self.send_assignments();
    }

    fn decide_vm(&mut self, now: Duration, name: &str) {
        let Some(mut rec) = self.state.vms.get(name).cloned() else {
            return;
        };
        match rec.phase {
            Phase::Creating | Phase::Promoting => self.watch_start(now, &mut rec),
            Phase::Running => {
                self.drop_lost_backups(now, &mut rec);
                self.drop_surplus_backup(now, &mut rec);
                self.mark_synced(now, &mut rec);
            }
            Phase::Handover => {
                self.watch_handover(now, name, &rec);
                return;
            }
        }
        if rec.phase == Phase::Running || rec.phase == Phase::Promoting {
            self.reprotect(now, &mut rec);
        }
        self.state.vms.insert(name.into(), rec.clone());
        if rec.phase == Phase::Running {
            if let Some(to) = self.migrations.get(name).cloned() {
                if self.candidate(now, &rec, Some(&to)).is_some() {
                    self.migrations.remove(name);
                    self.start_handover(now, name, &to);
                    return;
                }
            }
            // A primary counts as running once its process runs, before its guest's start: one
            // that died before the start (its image still whole) is promoted again.
            if let Some(p) = rec.primary.clone() {
                let o = self.primary_obs(&p, &rec).cloned();
                if o.is_some_and(|o| self.retry_unstarted(now, &rec, &p, &o).is_some()) {
                    return;
                }
            }
            if let Some(why) = self.primary_failed(now, &rec) {
                match self.candidate(now, &rec, None) {
                    Some(c) => {
                        self.counters.failovers += 1;
                        // Figure only: the primary's last sign of life to this decision.
                        let seen = rec
                            .primary
                            .as_deref()
                            .and_then(|p| self.hosts.get(p))
                            .map_or(self.started, |h| h.last_seen);
                        self.counters.last_detect_ms =
                            Some(now.saturating_sub(seen).as_millis() as u64);
                        self.promote(now, name, &c, why);
                    }
                    None => self.report_down(now, &rec, why),
                }
                return;
            }
            // (Creating/Promoting clear it themselves once their primary runs.)
            self.down.remove(name);
        }
    }

    /// A backup beyond what the spec asks for (a migration target whose migration was
    /// abandoned or forgotten by a restart) leaves the set, the last added first.
    fn drop_surplus_backup(&mut self, now: Duration, rec: &mut VmRecord) {
        if self.migrations.contains_key(&rec.spec.name) {
            return;
        }
        while rec.backups.len() > rec.spec.backups as usize {
            let Some(b) = rec.backups.pop() else {
                return;
            };
            self.event(
                now,
                EventKind::BackupLost,
                Some(&rec.spec.name),
                Some(&b.host),
                Some(rec.term),
                "surplus backup (no migration to it any more) leaves the set".into(),
            );
        }
    }

    /// Adds backups on the least loaded other hosts until the VM has as many as asked.
    fn reprotect(&mut self, now: Duration, rec: &mut VmRecord) {
        while rec.backups.len() < rec.spec.backups as usize {
            let mut exclude: Vec<HostId> = rec.backups.iter().map(|b| b.host.clone()).collect();
            exclude.extend(rec.primary.clone());
            // A host whose link to the primary just failed only if no other host may take it.
            let name = rec.spec.name.clone();
            self.shunned.retain(|_, until| *until > now);
            let shunned: Vec<HostId> = self
                .shunned
                .keys()
                .filter(|(vm, _)| *vm == name)
                .map(|(_, h)| h.clone())
                .collect();
            let avoid: Vec<HostId> = exclude.iter().chain(&shunned).cloned().collect();
            let pick = self
                .pick_host(now, &rec.spec, &avoid)
                .or_else(|| self.pick_host(now, &rec.spec, &exclude));
            let Some(h) = pick else {
                return;
            };
            rec.backups.push(BackupSlot {
                host: h.clone(),
                synced_term: None,
            });
            self.added_at.insert((name.clone(), h.clone()), now);
            if rec.phase != Phase::Creating {
                self.event(
                    now,
                    EventKind::BackupAdded,
                    Some(&rec.spec.name),
                    Some(&h),
                    Some(rec.term),
                    "re-protection: a new backup syncs from the primary".into(),
                );
            }
        }
    }

    fn event(
        &mut self,
        now: Duration,
        kind: EventKind,
        vm: Option<&str>,
        host: Option<&str>,
        term: Option<u64>,
        detail: String,
    ) {
        self.out.push_back(Output::Event(Event {
            at_ms: now.as_millis() as u64,
            kind,
            vm: vm.map(str::to_string),
            host: host.map(str::to_string),
            term,
            detail,
        }));
    }

    /// Every host's assignment, derived from the records.
    pub fn assignments(&self) -> BTreeMap<HostId, Assignments> {
        let mut all: BTreeMap<HostId, Assignments> = BTreeMap::new();
        for h in self.hosts.keys() {
            all.entry(h.clone()).or_default();
        }
        for (name, rec) in &self.state.vms {
            let targets: Vec<BackupTarget> = rec
                .backups
                .iter()
                .map(|b| BackupTarget {
                    host: b.host.clone(),
                    addr: self.backup_addr(&b.host, rec.spec.port).unwrap_or_default(),
                })
                .collect();
            if let Some(p) = &rec.primary {
                let source = match (rec.phase, rec.started) {
                    (_, true) => Source::Running,
                    (Phase::Promoting, false) => Source::Promote,
                    _ => Source::Boot,
                };
                let role = Role::Primary {
                    term: rec.term,
                    source,
                    backups: targets,
                    handover: rec.phase == Phase::Handover,
                };
                all.entry(p.clone()).or_default().vms.insert(
                    name.clone(),
                    Assignment {
                        spec: rec.spec.clone(),
                        role,
                    },
                );
            }
            for b in &rec.backups {
                let role = Role::Backup { min_term: rec.term };
                all.entry(b.host.clone()).or_default().vms.insert(
                    name.clone(),
                    Assignment {
                        spec: rec.spec.clone(),
                        role,
                    },
                );
            }
        }
        self.clone_assignments(&mut all);
        self.limit_assignments(&mut all);
        all
    }

    /// `ip:port` of a backup on `host` (None while the host's address is unknown, e.g. after
    /// a manager restart before its agent said hello).
    fn backup_addr(&self, host: &str, port: u16) -> Option<String> {
        let ip: std::net::IpAddr = self.hosts.get(host)?.repl_ip.parse().ok()?;
        Some(std::net::SocketAddr::new(ip, port).to_string())
    }

    /// Sends each connected host its assignment when it differs from what it was last sent.
    /// One that names a backup whose address is not known yet is held back (the host keeps
    /// its previous one): a primary is never given a backup set it would have to change again
    /// a moment later. A host that does not come back leaves the set after `backup_lost`.
    fn send_assignments(&mut self) {
        for (host, a) in self.assignments() {
            let incomplete = a.vms.values().any(|x| {
                matches!(&x.role, Role::Primary { backups, .. } if backups.iter().any(|b| b.addr.is_empty()))
            });
            let Some(h) = self.hosts.get_mut(&host) else {
                continue;
            };
            if incomplete {
                continue;
            }
            if h.connected && h.sent.as_ref() != Some(&a) {
                h.sent = Some(a.clone());
                self.out.push_back(Output::Assign {
                    host,
                    assignments: a,
                });
            }
        }
    }
}
