//! The manager's rules for clone bases copied between hosts (issue 11; docs/clones.md,
//! "Clones on any host").
//!
//! A base is made where the VM's image is: by its backups (an export, no pause) or, when it has
//! none that can, by its primary (a snapshot). A host that runs nothing of the VM gets one by
//! copying it from a host that holds one: every agent serves its bases on its replication
//! address (`Report::base_port`), to agents only (mutual TLS, agent role). So clones can run on
//! any live host with room:
//!
//! - **Can fetch**: a host whose agent serves bases (so it is new enough to fetch) while
//!   another live host serving bases holds a base of the VM or makes one.
//! - **Assignment**: a host with clone slots of a VM it makes no base of gets a
//!   [`BaseFetch`] naming the hosts it can copy from, the best first (the newest term, then
//!   the hosts that make theirs, then by name). The list holds no age (it would change every
//!   report and so the assignment); the agent refreshes a copied base every `refresh`.
//! - **Placement** prefers hosts holding a base, then those making one, then those that must
//!   copy one (seconds, not milliseconds: the base travels first), each by room.
//! - **A slot that cannot start** (its clone reported but not running — dead, blocked with no
//!   base, or crashing — for `clone_stuck` (20 s) on end, or not reported at all by a host that
//!   reports for six times as long) is re-placed on another host, and its old host is avoided
//!   for that VM three times as long.
//! - **Exports that never come**: when the VM's exporters were asked for a base `clone_stuck`
//!   ago and none holds one, its primary's host makes one (a snapshot), for clones there and
//!   for every copier.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Manager;
use crate::clones::{clone_name, BaseFetch, BaseSource};
use crate::event::EventKind;
use crate::model::{Assignments, HostId, VmRecord};

impl Manager {
    /// `ip:port` of `host`'s base server (None: it serves none, or its address is unknown).
    pub(super) fn base_addr(&self, host: &str) -> Option<String> {
        let h = self.hosts.get(host)?;
        let ip: std::net::IpAddr = h.repl_ip.parse().ok()?;
        (h.report.base_port != 0)
            .then(|| std::net::SocketAddr::new(ip, h.report.base_port).to_string())
    }

    /// The hosts other than `host` that `host` can copy a base of the VM from, the best first.
    pub(super) fn base_sources(&self, host: &str, rec: &VmRecord) -> Vec<BaseSource> {
        let vm = &rec.spec.name;
        let mut out: Vec<(BaseSource, bool)> = self
            .hosts
            .iter()
            .filter(|(n, h)| n.as_str() != host && h.connected && !h.down)
            .filter_map(|(n, h)| {
                let b = h.report.bases.iter().find(|b| &b.vm == vm)?;
                let addr = self.base_addr(n)?;
                let src = BaseSource {
                    host: n.clone(),
                    addr,
                    term: b.term,
                };
                Some((src, self.makes_base(n, rec)))
            })
            .collect();
        out.sort_by(|(a, am), (b, bm)| {
            (b.term, bm)
                .cmp(&(a.term, am))
                .then_with(|| a.host.cmp(&b.host))
        });
        out.into_iter().map(|(s, _)| s).collect()
    }

    /// Whether `host` can get a base of the VM by copying one (see the module docs).
    pub(super) fn can_fetch(&self, host: &str, rec: &VmRecord) -> bool {
        if self.base_addr(host).is_none() {
            return false;
        }
        let makers_serve = self
            .hosts
            .iter()
            .filter(|(n, h)| n.as_str() != host && h.connected && !h.down)
            .any(|(n, _)| self.makes_base(n, rec) && self.base_addr(n).is_some());
        makers_serve || !self.base_sources(host, rec).is_empty()
    }

    /// Adds a [`BaseFetch`] to the assignment of every host with clone slots of a VM it makes
    /// no base of.
    pub(super) fn fetch_assignments(&self, all: &mut BTreeMap<HostId, Assignments>) {
        for (name, rec) in &self.state.vms {
            let mut hosts: Vec<&HostId> = rec.clones.placed.iter().map(|s| &s.host).collect();
            hosts.sort();
            hosts.dedup();
            let copiers = hosts
                .into_iter()
                .filter(|h| !self.makes_base(h, rec) && self.base_addr(h).is_some());
            for h in copiers {
                // (Empty while the first base is being made elsewhere: the host waits for it.)
                let sources = self.base_sources(h, rec);
                all.entry(h.clone()).or_default().fetch.push(BaseFetch {
                    vm: name.clone(),
                    sources,
                });
            }
        }
    }

    /// Whether `host` is avoided for the VM's clones (a slot was re-placed away from it).
    pub(super) fn avoided(&self, now: Duration, host: &str, vm: &str) -> bool {
        self.clone_tracker
            .avoid
            .get(&(vm.to_string(), host.to_string()))
            .is_some_and(|until| now < *until)
    }

    /// Slots whose clone its host has reported, but not running, for `clone_stuck` on end
    /// (dead, blocked with no base, or in a crash loop), or has not reported at all for six
    /// times as long (a clone waiting for its first base is not reported; a silent host is
    /// `drop_lost_clones`' case): the host cannot start it. Returns them (index, host, why)
    /// and avoids the host for the VM.
    pub(super) fn stuck_clones(
        &mut self,
        now: Duration,
        rec: &VmRecord,
    ) -> Vec<(u32, HostId, String)> {
        let vm = rec.spec.name.clone();
        let mut out = Vec::new();
        for s in rec.clones.placed.iter().filter(|s| !s.draining) {
            let cname = clone_name(&vm, s.index);
            let fresh = self.fresh(now, &s.host);
            let obs = self.clone_obs(&s.host, &cname).filter(|_| fresh);
            // (Not reported by a host that reports: it waits for a base that never comes, or
            // never started it. Six times as long: a big base's first copy is not reported
            // while it runs.)
            let (why, limit) = match obs {
                Some(o) if o.running => (None, Duration::ZERO),
                Some(o) => (
                    Some(o.exit.clone().unwrap_or_else(|| "not running".into())),
                    self.cfg.clone_stuck,
                ),
                None if fresh && self.hosts.get(&s.host).is_some_and(|h| h.reported) => (
                    Some("never reported there".to_string()),
                    self.cfg.clone_stuck * 6,
                ),
                None => (None, Duration::ZERO),
            };
            let Some(why) = why else {
                self.clone_tracker.dead_since.remove(&cname);
                continue;
            };
            let since = *self
                .clone_tracker
                .dead_since
                .entry(cname.clone())
                .or_insert(now);
            if now.saturating_sub(since) < limit {
                continue;
            }
            let avoid = self.cfg.clone_stuck * 3;
            self.clone_tracker.dead_since.remove(&cname);
            self.clone_tracker
                .avoid
                .insert((vm.clone(), s.host.clone()), now + avoid);
            let why = format!(
                "cannot start there for {} ms ({why}); that host is avoided for {} ms",
                limit.as_millis(),
                avoid.as_millis()
            );
            out.push((s.index, s.host.clone(), why));
        }
        self.clone_tracker.avoid.retain(|_, until| now < *until);
        out
    }

    /// Notes whether the VM's exporters (its synced backups' hosts) have been asked for a base
    /// for `clone_stuck` without any of them holding one: then its primary's host makes its
    /// own rather than wait to copy theirs (`makes_base`).
    pub(super) fn note_exporters(&mut self, now: Duration, rec: &VmRecord) {
        let vm = &rec.spec.name;
        let exporters = self.exporters(rec);
        let delivered = exporters.iter().any(|h| self.holds_base(h, vm));
        let t = &mut self.clone_tracker;
        if !rec.clones.wants_base() || exporters.is_empty() || delivered {
            t.asked.remove(vm);
            t.late.remove(vm);
            return;
        }
        let since = *t.asked.entry(vm.clone()).or_insert(now);
        if now.saturating_sub(since) >= self.cfg.clone_stuck {
            t.late.insert(vm.clone());
        }
    }

    /// A `scaled` event saying where a slot's base comes from, when it is copied.
    pub(super) fn note_fetch_placement(&mut self, now: Duration, rec: &VmRecord, host: &str) {
        if self.makes_base(host, rec) || self.holds_base(host, &rec.spec.name) {
            return;
        }
        let from: Vec<String> = self
            .base_sources(host, rec)
            .into_iter()
            .map(|s| s.host)
            .collect();
        let why = match from.is_empty() {
            true => format!("{host} copies a base once one is made"),
            false => format!("{host} copies a base from {}", from.join(" or ")),
        };
        let vm = rec.spec.name.clone();
        self.event(now, EventKind::Scaled, Some(&vm), Some(host), None, why);
    }
}
