//! The manager's clone rules (issue 11; docs/clones.md, "Clones through the manager").
//!
//! - **Desired count** (persisted in the VM's record): set by `scale` (the API, the CLI) or by
//!   the VM's autoscaler (`crate::scaler`, fed by `load_sample`); each change is a `scaled`
//!   event saying why.
//! - **Slots**: clone `i` of a VM has slot `i` (its name `<vm>-c<i>` and its address, the
//!   `i`-th after the VM's `first_ip`, so its MAC too). Slots `0..desired` are placed; a slot
//!   at or above the count is removed (`clone_stopped`: its agent stops it) — or, while a load
//!   balancer's driver is attached, kept as `draining` until the driver says its connections
//!   ended (`clone_draining`, then `clone_stopped`; see `super::drain`).
//! - **Placement**: a live host allowed for the VM, with room (its hello's capacity minus
//!   `mem_mib` per primary or backup assigned to it and [`CLONE_SHARE_MIB`] per clone), that
//!   can start a clone now or soon: it reports a clone base of the VM, makes one (`makes_base`:
//!   its synced backup exports one, or its primary snapshots, only when needed), or can copy
//!   one from another host (`super::fetch`). Hosts holding a base first, then those making
//!   one, then those copying, each by most room; hosts avoided for the VM (a slot stuck there)
//!   are not taken. No such host: the slot waits (said once).
//! - **Independence**: clones take no role and no term; promotion, re-protection and
//!   migration never look at them, and a failover of the parent leaves them where they run.
//! - **Loss**: a clone whose host has been silent for `backup_lost` is re-placed; so is one
//!   reported dead by a host that holds no base of its VM any more (it cannot restart it
//!   there), or one its host has reported but not running for `clone_stuck` on end
//!   (`super::fetch`). Any other dead clone is restarted by its agent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ApiError, Manager};
use crate::clones::{
    clone_config, clone_name, slot_ip, AutoscaleSpec, Balancer, CloneAssignment, CloneSlot,
    CLONE_SHARE_MIB, MAX_CLONES,
};
use crate::event::EventKind;
use crate::model::{Assignments, HostId, Phase, VmRecord};
use crate::scaler::Scaler;

/// Body of `PUT /v1/vms/{name}/clones`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// Clones wanted.
    pub count: u32,
    /// Address of slot 0 (`a.b.c.d/len`); needed once, kept after.
    #[serde(default)]
    pub ip: Option<String>,
    /// Keep a base warm with no clone (None: unchanged).
    #[serde(default)]
    pub warm: Option<bool>,
}

/// The manager's clone bookkeeping that is not persisted.
#[derive(Debug, Default)]
pub(crate) struct CloneTracker {
    /// Autoscalers by VM (their samples; the settings are in the record).
    scalers: BTreeMap<String, Scaler>,
    /// Clones seen running (a `clone_started` event each time one starts running).
    pub(super) running: BTreeSet<String>,
    /// Slots said to be waiting for a host (said once).
    waiting: BTreeSet<String>,
    /// When each VM last had a slot placed (for an address change, see `set_first_ip`).
    placed_at: BTreeMap<String, Duration>,
    /// Since when each placed clone has been reported dead (see `fetch::stuck_clones`).
    pub(super) dead_since: BTreeMap<String, Duration>,
    /// (VM, host) pairs avoided until then: a slot of the VM was re-placed away from the host.
    pub(super) avoid: BTreeMap<(String, HostId), Duration>,
    /// VMs whose exporters were asked for a base and hold none yet, since when; and those
    /// asked for longer than `clone_stuck` (see `fetch::note_exporters`).
    pub(super) asked: BTreeMap<String, Duration>,
    pub(super) late: BTreeSet<String>,
}

/// One clone as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneView {
    /// Its name.
    pub name: String,
    /// Its slot.
    pub index: u32,
    /// Where it runs.
    pub host: String,
    /// Its address (with prefix).
    pub ip: String,
    /// `starting`, `running`, `draining` (scaled down, waiting for its connections to end on
    /// the load balancer), `exited (…)` or `unreachable`.
    pub state: String,
    /// Scaled down and draining (whatever its host's freshness makes `state` say); absent in
    /// answers of a manager built before draining.
    #[serde(default)]
    pub draining: bool,
}

/// A VM's clones as the API shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClonesView {
    /// How many should run.
    pub desired: u32,
    /// Address of slot 0.
    pub first_ip: Option<String>,
    /// A base is kept warm even with no clone.
    pub warm: bool,
    /// Autoscaling settings.
    pub autoscale: Option<AutoscaleSpec>,
    /// The latest load sample.
    pub load: Option<f64>,
    /// Every placed clone.
    pub instances: Vec<CloneView>,
    /// The load balancer's driver attached (absent in answers of a manager built before it).
    #[serde(default)]
    pub balancer: Option<Balancer>,
}

impl Manager {
    /// Sets a VM's clone count (and, once, the address of its first clone).
    pub fn scale(&mut self, now: Duration, name: &str, req: ScaleRequest) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        if req.count > MAX_CLONES {
            return Err(ApiError::Invalid(format!(
                "count {} > {MAX_CLONES}",
                req.count
            )));
        }
        self.set_first_ip(now, &mut rec, req.ip.as_deref(), req.count)?;
        if let Some(w) = req.warm {
            rec.clones.warm = w;
        }
        let from = rec.clones.desired;
        rec.clones.desired = req.count;
        self.state.vms.insert(name.into(), rec);
        if let Some(s) = self.clone_tracker.scalers.get_mut(name) {
            s.changed(now);
        }
        if from != req.count {
            let why = format!("asked for: {from} → {} clones", req.count);
            self.event(now, EventKind::Scaled, Some(name), None, None, why);
        }
        self.decide(now);
        Ok(())
    }

    /// Checks (and sets) the address of slot 0: needed before any clone, changed only while
    /// none is placed, none was for `backup_lost` (nor since this manager started) and no host
    /// heard within `backup_lost` reports one still running. A running clone keeps its address:
    /// an agent that still runs `web-c0` when `web-c0` is assigned to it again keeps that
    /// process (it may get the assignment without it and the one with it in one round, or
    /// have started it just before, unreported), so a slot placed back at a new address would
    /// serve the old one. Within `backup_lost` every host either applied the assignment
    /// without it and reported so, or is silent and must say hello again, whose assignment
    /// comes before it can hold a slot again.
    fn set_first_ip(
        &self,
        now: Duration,
        rec: &mut VmRecord,
        ip: Option<&str>,
        count: u32,
    ) -> Result<(), ApiError> {
        if let Some(ip) = ip {
            slot_ip(ip, 0).map_err(ApiError::Invalid)?;
            if rec.clones.first_ip.as_deref() != Some(ip) && !rec.clones.placed.is_empty() {
                return Err(ApiError::Invalid(format!(
                    "{} has clones from {}: scale to 0 before changing the address",
                    rec.spec.name,
                    rec.clones.first_ip.as_deref().unwrap_or("?")
                )));
            }
            let changes = rec.clones.first_ip.as_deref() != Some(ip);
            if let Some((host, clone)) = self.live_clone(now, &rec.spec.name).filter(|_| changes) {
                return Err(ApiError::Unavailable(format!(
                    "{clone} still runs on {host} at its old address: wait until it stopped \
                     before changing the address"
                )));
            }
            let placed_at = self.clone_tracker.placed_at.get(&rec.spec.name);
            let since = now.saturating_sub(placed_at.copied().unwrap_or(self.started));
            if changes && rec.clones.first_ip.is_some() && since <= self.cfg.backup_lost {
                return Err(ApiError::Unavailable(format!(
                    "{} had clones at its old address {} ms ago: wait {} ms before changing it",
                    rec.spec.name,
                    since.as_millis(),
                    self.cfg.backup_lost.as_millis()
                )));
            }
            rec.clones.first_ip = Some(ip.to_string());
        }
        let max = count.max(rec.clones.autoscale.as_ref().map_or(0, |a| a.max));
        match &rec.clones.first_ip {
            None if max > 0 => Err(ApiError::Invalid(
                "the first clone's address (ip, a.b.c.d/len) is needed".into(),
            )),
            Some(first) if max > 0 => slot_ip(first, max - 1)
                .map(|_| ())
                .map_err(ApiError::Invalid),
            _ => Ok(()),
        }
    }

    /// Sets (or with None, ends) a VM's autoscaling.
    pub fn autoscale(
        &mut self,
        now: Duration,
        name: &str,
        spec: Option<AutoscaleSpec>,
        ip: Option<String>,
    ) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        if let Some(s) = &spec {
            s.validate().map_err(ApiError::Invalid)?;
        }
        rec.clones.autoscale = spec.clone();
        let count = rec.clones.desired;
        self.set_first_ip(now, &mut rec, ip.as_deref(), count)?;
        let detail = match &spec {
            Some(s) => format!(
                "autoscaling on: {:.1} per replica, {}..={} clones, cool-down up {} ms, down {} ms",
                s.target, s.min, s.max, s.up_cooldown_ms, s.down_cooldown_ms
            ),
            None => "autoscaling off".into(),
        };
        self.state.vms.insert(name.into(), rec);
        self.event(now, EventKind::Scaled, Some(name), None, None, detail);
        self.decide(now);
        Ok(())
    }

    /// A load sample of a VM (its load balancer's figure: connections or requests per second
    /// over the primary and its clones), for its autoscaler.
    pub fn load_sample(&mut self, now: Duration, name: &str, load: f64) -> Result<(), ApiError> {
        let rec = self.record(name)?;
        if !load.is_finite() || load < 0.0 {
            return Err(ApiError::Invalid(format!(
                "load {load} is not a number >= 0"
            )));
        }
        let Some(spec) = rec.clones.autoscale else {
            return Err(ApiError::Invalid(format!("{name} has no autoscaling")));
        };
        self.clone_tracker
            .scalers
            .entry(name.into())
            .or_insert_with(|| Scaler::new(spec))
            .sample(now, load);
        self.decide(now);
        Ok(())
    }

    /// Every VM's clone rules (called by `decide` after the VMs' own rules).
    pub(crate) fn decide_clones(&mut self, now: Duration) {
        let names: Vec<String> = self.state.vms.keys().cloned().collect();
        self.clone_tracker.scalers.retain(|n, _| names.contains(n));
        for name in names {
            let Some(mut rec) = self.state.vms.get(&name).cloned() else {
                continue;
            };
            self.autoscale_step(now, &mut rec);
            self.note_exporters(now, &rec);
            self.expire_balancer(now, &mut rec);
            self.drop_lost_clones(now, &mut rec);
            self.watch_drains(now, &mut rec);
            self.drop_surplus_clones(now, &mut rec);
            self.place_clones(now, &mut rec);
            self.note_started_clones(now, &rec);
            if !rec.clones.placed.is_empty() {
                self.clone_tracker.placed_at.insert(name.clone(), now);
            }
            self.state.vms.insert(name, rec);
        }
        self.prune_drains();
        let placed: BTreeSet<String> = self
            .state
            .vms
            .values()
            .flat_map(|r| {
                r.clones
                    .placed
                    .iter()
                    .map(|s| clone_name(&r.spec.name, s.index))
            })
            .collect();
        self.clone_tracker
            .dead_since
            .retain(|c, _| placed.contains(c));
        let vms: BTreeSet<String> = self.state.vms.keys().cloned().collect();
        self.clone_tracker.asked.retain(|v, _| vms.contains(v));
        self.clone_tracker.late.retain(|v| vms.contains(v));
    }

    fn autoscale_step(&mut self, now: Duration, rec: &mut VmRecord) {
        let name = rec.spec.name.clone();
        let Some(spec) = rec.clones.autoscale.clone() else {
            self.clone_tracker.scalers.remove(&name);
            return;
        };
        let s = self
            .clone_tracker
            .scalers
            .entry(name.clone())
            .or_insert_with(|| Scaler::new(spec.clone()));
        if s.spec() != &spec {
            s.set_spec(spec);
        }
        if let Some(d) = s.decide(now, rec.clones.desired) {
            s.changed(now);
            rec.clones.desired = d.desired;
            let why = format!("autoscaler: {}", d.reason);
            self.event(now, EventKind::Scaled, Some(&name), None, None, why);
        }
    }

    /// Slots whose host is lost, or whose clone died where no base of its VM is left.
    fn drop_lost_clones(&mut self, now: Duration, rec: &mut VmRecord) {
        let name = rec.spec.name.clone();
        let mut stopped = Vec::new();
        for s in &rec.clones.placed {
            let cname = clone_name(&name, s.index);
            // (A host unknown since this manager started counts from its start.)
            let silent = now.saturating_sub(self.last_seen_at(&s.host));
            if silent > self.cfg.backup_lost {
                stopped.push((s.index, s.host.clone(), "its host went silent".to_string()));
                continue;
            }
            let dead = self.clone_obs(&s.host, &cname).filter(|o| !o.alive);
            if let Some(o) = dead.filter(|_| !self.can_hold_base(&s.host, rec)) {
                let exit = o.exit.as_deref().unwrap_or("exited");
                let why = format!("{exit}; no base of {name} is left on that host");
                stopped.push((s.index, s.host.clone(), why));
            }
        }
        for stuck in self.stuck_clones(now, rec) {
            if !stopped.iter().any(|(i, _, _)| *i == stuck.0) {
                stopped.push(stuck);
            }
        }
        for (index, host, why) in stopped {
            rec.clones.placed.retain(|s| s.index != index);
            let cname = clone_name(&name, index);
            self.clone_tracker.running.remove(&cname);
            let (term, why) = (
                Some(rec.term),
                format!("{cname}: {why}; re-placed if still wanted"),
            );
            self.event(
                now,
                EventKind::CloneStopped,
                Some(&name),
                Some(&host),
                term,
                why,
            );
        }
    }

    /// Slots at or above the count, the highest first: drained first while a load balancer's
    /// driver is attached and the clone runs, else stopped at once.
    fn drop_surplus_clones(&mut self, now: Duration, rec: &mut VmRecord) {
        let desired = rec.clones.desired;
        rec.clones.placed.sort_by_key(|s| s.index);
        let surplus: Vec<u32> = rec
            .clones
            .placed
            .iter()
            .rev()
            .filter(|s| s.index >= desired && !s.draining)
            .map(|s| s.index)
            .collect();
        for index in surplus {
            if self.start_drain(now, rec, index) {
                continue;
            }
            let cname = clone_name(&rec.spec.name, index);
            self.clone_tracker.running.remove(&cname);
            let Some(pos) = rec.clones.placed.iter().position(|s| s.index == index) else {
                continue;
            };
            let s = rec.clones.placed.remove(pos);
            let how = match rec.clones.balancer {
                Some(_) => "not running: nothing to drain",
                None => "no load balancer attached: not drained",
            };
            let why = format!("{cname}: scaled down to {desired} ({how}); stopped");
            let (vm, term) = (rec.spec.name.clone(), Some(rec.term));
            self.event(
                now,
                EventKind::CloneStopped,
                Some(&vm),
                Some(&s.host),
                term,
                why,
            );
        }
    }

    /// Places every missing slot below the count.
    fn place_clones(&mut self, now: Duration, rec: &mut VmRecord) {
        let Some(first) = rec.clones.first_ip.clone() else {
            return;
        };
        for index in 0..rec.clones.desired {
            if rec.clones.placed.iter().any(|s| s.index == index) {
                continue;
            }
            let cname = clone_name(&rec.spec.name, index);
            if slot_ip(&first, index).is_err() {
                break;
            }
            let Some(host) = self.pick_clone_host(now, rec) else {
                if self.clone_tracker.waiting.insert(cname.clone()) {
                    let why = format!(
                        "{cname} waits: no live host with room holds a base of {} or runs its \
                         primary",
                        rec.spec.name
                    );
                    let vm = rec.spec.name.clone();
                    self.event(now, EventKind::Scaled, Some(&vm), None, None, why);
                }
                break;
            };
            // Never two VMs with one address: the slot's last clone may still run on another
            // host (its scale-down or drain not yet applied there, its process not yet gone).
            if let Some(other) = self.clone_alive_elsewhere(now, &cname, &host) {
                if self.clone_tracker.waiting.insert(cname.clone()) {
                    let why = format!(
                        "{cname} waits: its previous process still runs on {other} (same \
                         address)"
                    );
                    let vm = rec.spec.name.clone();
                    self.event(now, EventKind::Scaled, Some(&vm), None, None, why);
                }
                continue;
            }
            self.clone_tracker.waiting.remove(&cname);
            self.note_fetch_placement(now, rec, &host);
            rec.clones.placed.push(CloneSlot {
                index,
                host: host.clone(),
                draining: false,
            });
            // (Counted at once: the next slot sees this one's share.)
            self.state.vms.insert(rec.spec.name.clone(), rec.clone());
        }
    }

    /// `clone_started` once a placed clone reports its VM running.
    fn note_started_clones(&mut self, now: Duration, rec: &VmRecord) {
        for s in rec.clones.placed.iter().filter(|s| !s.draining) {
            let cname = clone_name(&rec.spec.name, s.index);
            let running = self
                .clone_obs(&s.host, &cname)
                .is_some_and(|o| o.alive && o.running);
            if !running {
                self.clone_tracker.running.remove(&cname);
                continue;
            }
            if self.clone_tracker.running.insert(cname.clone()) {
                let ip = rec
                    .clones
                    .first_ip
                    .as_deref()
                    .and_then(|f| slot_ip(f, s.index).ok())
                    .map_or_else(String::new, |(ip, _)| ip.to_string());
                let why = format!("{cname} serves on {ip}");
                let (vm, term) = (rec.spec.name.clone(), Some(rec.term));
                self.event(
                    now,
                    EventKind::CloneStarted,
                    Some(&vm),
                    Some(&s.host),
                    term,
                    why,
                );
            }
        }
    }

    /// The clones hosts heard within `backup_lost` last reported alive, with their host:
    /// whatever the slots say, they may still run there.
    fn recent_live_clones(
        &self,
        now: Duration,
    ) -> impl Iterator<Item = (&str, &crate::model::CloneObservation)> {
        self.hosts
            .iter()
            .filter(move |(n, _)| now.saturating_sub(self.last_seen_at(n)) <= self.cfg.backup_lost)
            .flat_map(|(n, h)| h.report.clones.iter().map(move |o| (n.as_str(), o)))
            .filter(|(_, o)| o.alive)
    }

    /// A host other than `host` that last reported clone `cname` alive (heard within
    /// `backup_lost`).
    fn clone_alive_elsewhere(&self, now: Duration, cname: &str, host: &str) -> Option<String> {
        self.recent_live_clones(now)
            .find(|(n, o)| *n != host && o.name == cname)
            .map(|(n, _)| n.to_string())
    }

    /// A clone of `vm` last reported alive (its host and name; heard within `backup_lost`).
    fn live_clone(&self, now: Duration, vm: &str) -> Option<(&str, &str)> {
        self.recent_live_clones(now)
            .find(|(_, o)| o.vm == vm)
            .map(|(n, o)| (n, o.name.as_str()))
    }

    pub(super) fn clone_obs(
        &self,
        host: &str,
        cname: &str,
    ) -> Option<&crate::model::CloneObservation> {
        self.hosts
            .get(host)?
            .report
            .clones
            .iter()
            .find(|o| o.name == cname)
    }

    /// Whether `host` holds a base of the VM, can make one ([`Self::makes_base`]) or can copy
    /// one from another host (`fetch::can_fetch`).
    fn can_hold_base(&self, host: &str, rec: &VmRecord) -> bool {
        self.holds_base(host, &rec.spec.name)
            || self.makes_base(host, rec)
            || self.can_fetch(host, rec)
    }

    /// Whether `host` is where a base of the VM is made: the hosts of its backups synced at
    /// its term (each exports its committed checkpoint: no pause of the guest, ~0.4 ms of its
    /// apply loop), or its primary's host only when needed (a snapshot: a pause of the guest
    /// of tens of ms per 100 MiB, measured — so not while a backup can export): the VM has no
    /// backup that can, or clones run there already (their restarts need a base) or a slot
    /// waits that no such backup's host has room for, and the primary's host cannot copy the
    /// base a backup's host makes (`fetch`: its agent or theirs serves no bases).
    pub(super) fn makes_base(&self, host: &str, rec: &VmRecord) -> bool {
        if self.runs_synced_backup(host, rec) {
            return true;
        }
        if !self.runs_primary(host, rec) {
            return false;
        }
        let exporters = self.exporters(rec);
        let runs_here = rec.clones.placed.iter().any(|s| s.host == host);
        let waiting = (rec.clones.placed.len() as u32) < rec.clones.desired;
        let no_room = exporters
            .iter()
            .all(|h| self.room_mib(h) < CLONE_SHARE_MIB as i64);
        // The exporters were asked for a base for long and none came (their exports fail):
        // the primary's host makes one, for its own clones and for every copier.
        if self.clone_tracker.late.contains(&rec.spec.name) {
            return true;
        }
        let copies =
            self.base_addr(host).is_some() && exporters.iter().any(|h| self.base_addr(h).is_some());
        exporters.is_empty() || ((runs_here || (waiting && no_room)) && !copies)
    }

    /// Whether `host` runs a backup of the VM synced at its current term while its primary
    /// runs, which its host reported alive with a committed image of this term within
    /// `backup_lost` of its last report: it can export it. (`synced_term` alone stays set
    /// until a promotion, also while the backup restarts empty or re-syncs: its agent could
    /// make no base, and a clone placed there would wait. The grace of `backup_lost` keeps a
    /// backup restarting in place from handing base-making to the primary, a pause, for a
    /// report or two.)
    /// The hosts of the VM's backups that export its bases ([`Self::runs_synced_backup`]).
    pub(super) fn exporters<'a>(&self, rec: &'a VmRecord) -> Vec<&'a str> {
        rec.backups
            .iter()
            .map(|b| b.host.as_str())
            .filter(|h| self.runs_synced_backup(h, rec))
            .collect()
    }

    pub(super) fn runs_synced_backup(&self, host: &str, rec: &VmRecord) -> bool {
        let reported = self.hosts.get(host).is_some_and(|h| {
            !h.down
                && h.exportable.get(&rec.spec.name).is_some_and(|(term, at)| {
                    *term == rec.term && h.last_seen.saturating_sub(*at) <= self.cfg.backup_lost
                })
        });
        reported
            && rec.started
            && rec.phase == Phase::Running
            && rec
                .backups
                .iter()
                .any(|b| b.host == host && b.synced_term == Some(rec.term))
    }

    pub(super) fn holds_base(&self, host: &str, vm: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| h.report.bases.iter().any(|b| b.vm == vm))
    }

    fn runs_primary(&self, host: &str, rec: &VmRecord) -> bool {
        rec.primary.as_deref() == Some(host) && rec.started && rec.phase == Phase::Running
    }

    /// Memory left on `host` for one more instance, MiB (negative: overcommitted).
    pub(crate) fn room_mib(&self, host: &str) -> i64 {
        let cap = self.hosts.get(host).map_or(0, |h| h.capacity_mib);
        let used: u64 = self
            .state
            .vms
            .values()
            .map(|r| {
                let here = usize::from(r.primary.as_deref() == Some(host))
                    + r.backups.iter().filter(|b| b.host == host).count();
                let clones = r.clones.placed.iter().filter(|s| s.host == host).count();
                here as u64 * r.spec.mem_mib + clones as u64 * CLONE_SHARE_MIB
            })
            .sum();
        cap as i64 - used as i64
    }

    fn pick_clone_host(&self, now: Duration, rec: &VmRecord) -> Option<HostId> {
        self.hosts
            .iter()
            .filter(|(n, h)| h.connected && !h.down && h.reported && self.fresh(now, n))
            .filter(|(n, _)| rec.spec.allows(n) && !self.avoided(now, n, &rec.spec.name))
            .filter(|(n, _)| self.can_hold_base(n, rec))
            .map(|(n, _)| (n, self.room_mib(n)))
            .filter(|(_, room)| *room >= CLONE_SHARE_MIB as i64)
            .max_by_key(|(n, room)| {
                let holds = self.holds_base(n, &rec.spec.name);
                (
                    holds,
                    // (Among hosts holding none: one that makes its own before one that copies.)
                    holds || self.makes_base(n, rec),
                    *room,
                    std::cmp::Reverse(*n),
                )
            })
            .map(|(n, _)| n.clone())
    }

    /// Adds the clones and the warm bases to every host's assignment.
    pub(crate) fn clone_assignments(&self, all: &mut BTreeMap<HostId, Assignments>) {
        for (name, rec) in &self.state.vms {
            if rec.clones.wants_base() {
                let hosts = rec
                    .backups
                    .iter()
                    .map(|b| &b.host)
                    .chain(rec.primary.as_ref());
                for h in hosts.filter(|h| self.makes_base(h, rec)) {
                    all.entry(h.clone()).or_default().bases.push(name.clone());
                }
            }
            let Some(first) = rec.clones.first_ip.as_deref() else {
                continue;
            };
            for s in &rec.clones.placed {
                let Ok((ip, len)) = slot_ip(first, s.index) else {
                    continue;
                };
                all.entry(s.host.clone())
                    .or_default()
                    .clones
                    .push(CloneAssignment {
                        name: clone_name(name, s.index),
                        vm: name.clone(),
                        index: s.index,
                        guest_config: clone_config(&rec.spec.guest_config, ip, len),
                        mem_mib: rec.spec.mem_mib,
                    });
            }
        }
        self.fetch_assignments(all);
    }

    /// A VM's clones as shown.
    pub(crate) fn clones_view(&self, now: Duration, rec: &VmRecord) -> ClonesView {
        let instances = rec
            .clones
            .placed
            .iter()
            .map(|s| {
                let name = clone_name(&rec.spec.name, s.index);
                let o = self.clone_obs(&s.host, &name);
                let state = match o {
                    _ if !self.fresh(now, &s.host) => "unreachable".to_string(),
                    Some(o) if o.alive && s.draining => "draining".into(),
                    Some(o) if o.alive && o.running => "running".into(),
                    Some(o) if !o.alive => {
                        format!("exited ({})", o.exit.as_deref().unwrap_or("?"))
                    }
                    _ => "starting".into(),
                };
                let ip = rec
                    .clones
                    .first_ip
                    .as_deref()
                    .and_then(|f| slot_ip(f, s.index).ok())
                    .map_or_else(String::new, |(ip, len)| format!("{ip}/{len}"));
                CloneView {
                    name,
                    index: s.index,
                    host: s.host.clone(),
                    ip,
                    state,
                    draining: s.draining,
                }
            })
            .collect();
        ClonesView {
            desired: rec.clones.desired,
            first_ip: rec.clones.first_ip.clone(),
            warm: rec.clones.warm,
            autoscale: rec.clones.autoscale.clone(),
            load: self
                .clone_tracker
                .scalers
                .get(&rec.spec.name)
                .and_then(|s| s.last_load()),
            instances,
            balancer: rec.clones.balancer.clone(),
        }
    }
}
