//! Drain before stop (issue 11; docs/clones.md, "Drain before stop"): the manager's side.
//!
//! - **Attach**: a load balancer's driver (`vmatrix lb serve`) attaches to a VM with a lease
//!   (`PUT /v1/vms/{name}/balancer`, [`Manager::attach_balancer`]) and renews it every round.
//!   The attachment is persisted in the VM's record ([`Balancer`]); the lease is not: a
//!   restarted manager counts it from its own start. No renewal within the lease: detached
//!   (`balancer` event), and every draining clone of the VM is stopped at once.
//! - **Scale-down with a balancer**: a surplus slot whose clone runs is kept as `draining`
//!   (persisted in its [`CloneSlot`](crate::clones::CloneSlot)): still assigned to its host
//!   (it runs), not serving, not placed again, its slot — so its address — taken by nobody.
//!   Without a balancer (or a clone that does not run) it is stopped at once, as before.
//! - **Drained**: the driver, having taken the clone out of the service and seen its last
//!   connection end, says so (`PUT /v1/vms/{name}/clones/{slot}/drained`,
//!   [`Manager::clone_drained`]); the slot is removed and its host's next assignment no longer
//!   lists the clone, so its agent stops it (`clone_stopped`). A report for a slot that does
//!   not exist or does not drain is refused and changes nothing.
//! - **Limits**: a drain longer than [`ManagerConfig::drain_limit`](super::ManagerConfig)
//!   (counted from the manager's start after a restart), a detached balancer or a clone that
//!   exited stop it anyway.
//! - **Scale-up during a drain**: a draining slot below the new count goes back into service
//!   (the same clone, still running and warm): no second clone ever takes its address.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ApiError, Manager};
use crate::clones::{clone_name, Balancer};
use crate::event::EventKind;
use crate::model::VmRecord;

/// Body of `PUT /v1/vms/{name}/clones/{slot}/drained`: how the drain ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainedReport {
    /// Its last connection ended (false: the driver gave up with some still open).
    pub drained: bool,
    /// Connections still open when it reported.
    #[serde(default)]
    pub active_left: u32,
    /// How long the driver drained it, ms.
    #[serde(default)]
    pub waited_ms: u64,
}

/// What is not persisted.
#[derive(Debug, Default)]
pub(crate) struct DrainTracker {
    /// VM → when its driver last renewed its lease.
    renewed: BTreeMap<String, Duration>,
    /// Clone name → when this manager first saw it draining.
    since: BTreeMap<String, Duration>,
}

impl Manager {
    /// A load balancer's driver attaches to `name` (or renews its lease).
    pub fn attach_balancer(
        &mut self,
        now: Duration,
        name: &str,
        b: Balancer,
    ) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        b.validate().map_err(ApiError::Invalid)?;
        // One driver per VM: another one's attachment (another VIP) stands while its lease
        // holds (two drivers would take turns rewriting it, persisted each time).
        if let Some(other) = rec.clones.balancer.as_ref().filter(|o| o.vip != b.vip) {
            if self.balancer_attached(now, &rec) {
                return Err(ApiError::Exists(format!(
                    "{name} has a load balancer attached at {} until its lease runs out",
                    other.vip
                )));
            }
        }
        self.drains.renewed.insert(name.into(), now);
        if rec.clones.balancer.as_ref() != Some(&b) {
            let detail = format!(
                "attached: load balancer at {} (lease {} ms); scale-down drains",
                b.vip, b.lease_ms
            );
            rec.clones.balancer = Some(b);
            self.state.vms.insert(name.into(), rec);
            self.event(now, EventKind::Balancer, Some(name), None, None, detail);
            self.decide(now);
        }
        Ok(())
    }

    /// The driver detaches (it stops): draining clones stop at once.
    pub fn detach_balancer(&mut self, now: Duration, name: &str) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        self.drains.renewed.remove(name);
        if rec.clones.balancer.take().is_some() {
            self.state.vms.insert(name.into(), rec);
            let detail = "detached: the driver said so".to_string();
            self.event(now, EventKind::Balancer, Some(name), None, None, detail);
            self.decide(now);
        }
        Ok(())
    }

    /// The driver drained the clone of slot `slot` of `name`: it is stopped.
    pub fn clone_drained(
        &mut self,
        now: Duration,
        name: &str,
        slot: u32,
        report: DrainedReport,
    ) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        let cname = clone_name(name, slot);
        let Some(pos) = rec.clones.placed.iter().position(|s| s.index == slot) else {
            return Err(ApiError::NotFound(format!("{name} has no clone {cname}")));
        };
        if !rec.clones.placed[pos].draining {
            return Err(ApiError::Invalid(format!(
                "{cname} is not draining (it serves): nothing to stop"
            )));
        }
        let s = rec.clones.placed.remove(pos);
        self.drains.since.remove(&cname);
        self.clone_tracker.running.remove(&cname);
        let how = match report.drained {
            true => format!("drained in {} ms", report.waited_ms),
            false => format!(
                "the driver gave up after {} ms with {} connections open",
                report.waited_ms, report.active_left
            ),
        };
        let (term, why) = (Some(rec.term), format!("{cname}: {how}, then stopped"));
        self.state.vms.insert(name.into(), rec);
        self.event(
            now,
            EventKind::CloneStopped,
            Some(name),
            Some(&s.host),
            term,
            why,
        );
        self.decide(now);
        Ok(())
    }

    /// Whether `rec` has a driver whose lease holds.
    pub(super) fn balancer_attached(&self, now: Duration, rec: &VmRecord) -> bool {
        let Some(b) = &rec.clones.balancer else {
            return false;
        };
        let renewed = self
            .drains
            .renewed
            .get(&rec.spec.name)
            .copied()
            .unwrap_or(self.started);
        now.saturating_sub(renewed) <= Duration::from_millis(b.lease_ms)
    }

    /// Detaches a driver whose lease ran out.
    pub(super) fn expire_balancer(&mut self, now: Duration, rec: &mut VmRecord) {
        if rec.clones.balancer.is_none() || self.balancer_attached(now, rec) {
            return;
        }
        let b = rec.clones.balancer.take().expect("checked");
        self.drains.renewed.remove(&rec.spec.name);
        let detail = format!(
            "detached: no renewal from the load balancer at {} for {} ms",
            b.vip, b.lease_ms
        );
        let vm = rec.spec.name.clone();
        self.event(now, EventKind::Balancer, Some(&vm), None, None, detail);
    }

    /// Starts draining surplus slot `index` if a driver is attached and its clone runs;
    /// false: stop it at once.
    pub(super) fn start_drain(&mut self, now: Duration, rec: &mut VmRecord, index: u32) -> bool {
        let cname = clone_name(&rec.spec.name, index);
        let Some(pos) = rec.clones.placed.iter().position(|s| s.index == index) else {
            return false;
        };
        let host = rec.clones.placed[pos].host.clone();
        let runs = self
            .clone_obs(&host, &cname)
            .is_some_and(|o| o.alive && o.running);
        if !runs || !self.balancer_attached(now, rec) {
            return false;
        }
        rec.clones.placed[pos].draining = true;
        self.drains.since.insert(cname.clone(), now);
        let vip = rec.clones.balancer.as_ref().map_or("", |b| b.vip.as_str());
        let why = format!(
            "{cname}: scaled down to {}; draining on the load balancer at {vip} (limit {} ms)",
            rec.clones.desired,
            self.cfg.drain_limit.as_millis()
        );
        let (vm, term) = (rec.spec.name.clone(), Some(rec.term));
        self.event(
            now,
            EventKind::CloneDraining,
            Some(&vm),
            Some(&host),
            term,
            why,
        );
        true
    }

    /// Every draining slot: back into service below the count; stopped if the driver
    /// detached, the limit passed or the clone exited.
    pub(super) fn watch_drains(&mut self, now: Duration, rec: &mut VmRecord) {
        let name = rec.spec.name.clone();
        let attached = self.balancer_attached(now, rec);
        let mut stop = Vec::new();
        for i in 0..rec.clones.placed.len() {
            let s = rec.clones.placed[i].clone();
            if !s.draining {
                continue;
            }
            let cname = clone_name(&name, s.index);
            let since = *self.drains.since.entry(cname.clone()).or_insert(now);
            let exited = self.clone_obs(&s.host, &cname).filter(|o| !o.alive);
            let why = if s.index < rec.clones.desired {
                rec.clones.placed[i].draining = false;
                self.drains.since.remove(&cname);
                let why = format!(
                    "{cname}: back in service (scaled up to {} while it drained)",
                    rec.clones.desired
                );
                let term = Some(rec.term);
                self.event(
                    now,
                    EventKind::CloneDraining,
                    Some(&name),
                    Some(&s.host),
                    term,
                    why,
                );
                continue;
            } else if !attached {
                "the load balancer detached: stopped without waiting".to_string()
            } else if now.saturating_sub(since) > self.cfg.drain_limit {
                format!(
                    "drain limit of {} ms passed: stopped with its connections",
                    self.cfg.drain_limit.as_millis()
                )
            } else if let Some(o) = exited {
                format!("{} while draining", o.exit.as_deref().unwrap_or("exited"))
            } else {
                continue;
            };
            stop.push((s.index, s.host, why));
        }
        for (index, host, why) in stop {
            rec.clones.placed.retain(|s| s.index != index);
            let cname = clone_name(&name, index);
            self.drains.since.remove(&cname);
            self.clone_tracker.running.remove(&cname);
            let why = format!("{cname}: {why}");
            self.event(
                now,
                EventKind::CloneStopped,
                Some(&name),
                Some(&host),
                Some(rec.term),
                why,
            );
        }
    }

    /// Forgets what concerns VMs and clones that are gone.
    pub(super) fn prune_drains(&mut self) {
        let vms = &self.state.vms;
        self.drains.renewed.retain(|vm, _| vms.contains_key(vm));
        self.drains.since.retain(|c, _| {
            vms.values().any(|r| {
                r.clones
                    .placed
                    .iter()
                    .any(|s| s.draining && clone_name(&r.spec.name, s.index) == *c)
            })
        });
    }
}
