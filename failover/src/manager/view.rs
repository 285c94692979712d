//! What the API shows of VMs and hosts: the persisted record joined with what the agents report.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Manager;
use crate::model::{Phase, ProcRole, VmRecord, VmSpec};

/// One backup as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupView {
    /// Its host.
    pub host: String,
    /// Synced at the current term (may be promoted).
    pub synced: bool,
    /// Committed seq it reports.
    pub seq: Option<u64>,
    /// Term of its committed image.
    pub image_term: u64,
}

/// One VM as shown by `vmatrix vm list/show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    /// Its spec.
    pub spec: VmSpec,
    /// Current term.
    pub term: u64,
    /// "starting", "promoting", "protected", "unprotected", "syncing", "unreachable" or "down".
    pub status: String,
    /// Primary's host.
    pub primary: Option<String>,
    /// Last checkpoint acknowledged by every backup, as the primary reports it.
    pub acked_seq: Option<u64>,
    /// Its backups.
    pub backups: Vec<BackupView>,
    /// Its clones (absent in answers of a manager built before clones).
    #[serde(default)]
    pub clones: super::ClonesView,
    /// Resource limits of each of its processes (absent in answers of older managers).
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Each process's use of them, as its agent last reported it.
    #[serde(default)]
    pub usage: Vec<super::UsageView>,
}

/// One host as shown by `vmatrix host list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// Replication address.
    pub repl_ip: String,
    /// The agent's connection is open.
    pub connected: bool,
    /// Since its last heartbeat, ms.
    pub silent_ms: u64,
    /// "up" or "down".
    pub status: String,
    /// VM instances assigned to it.
    pub instances: usize,
    /// Memory its agent offers to VMs, MiB (its hello; absent in answers of older managers).
    #[serde(default)]
    pub capacity_mib: u64,
    /// What is left of it for another instance or clone, MiB (negative: overcommitted).
    #[serde(default)]
    pub room_mib: i64,
}

impl Manager {
    /// Every VM.
    pub fn vms(&self, now: Duration) -> Vec<VmView> {
        self.state.vms.values().map(|r| self.view(now, r)).collect()
    }

    /// One VM.
    pub fn vm(&self, now: Duration, name: &str) -> Option<VmView> {
        self.state.vms.get(name).map(|r| self.view(now, r))
    }

    /// Every host an agent ever connected from (since this manager started).
    pub fn host_views(&self, now: Duration) -> Vec<HostView> {
        self.hosts
            .iter()
            .map(|(n, h)| HostView {
                name: n.clone(),
                repl_ip: h.repl_ip.clone(),
                connected: h.connected,
                silent_ms: now.saturating_sub(h.last_seen).as_millis() as u64,
                status: if self.fresh(now, n) { "up" } else { "down" }.into(),
                instances: self.load(n),
                capacity_mib: h.capacity_mib,
                room_mib: self.room_mib(n),
            })
            .collect()
    }

    fn view(&self, now: Duration, r: &VmRecord) -> VmView {
        let name = &r.spec.name;
        let pobs = r.primary.as_deref().and_then(|p| self.primary_obs(p, r));
        let backups = r
            .backups
            .iter()
            .map(|b| {
                let o = self.hosts.get(&b.host).and_then(|h| {
                    h.report
                        .vms
                        .iter()
                        .find(|o| &o.vm == name && o.role == ProcRole::Backup)
                });
                BackupView {
                    host: b.host.clone(),
                    synced: b.synced_term == Some(r.term),
                    seq: o.and_then(|o| o.seq),
                    image_term: o.map_or(0, |o| o.image_term),
                }
            })
            .collect::<Vec<_>>();
        let status = match r.phase {
            Phase::Creating | Phase::Promoting if self.down.contains(name) => "down",
            Phase::Creating => "starting",
            Phase::Promoting => "promoting",
            Phase::Handover => "migrating",
            Phase::Running if self.down.contains(name) => "down",
            Phase::Running if r.primary.as_deref().is_some_and(|p| !self.fresh(now, p)) => {
                "unreachable"
            }
            Phase::Running if r.backups.is_empty() => "unprotected",
            Phase::Running if self.protected.contains(name) => "protected",
            Phase::Running => "unprotected (syncing)",
        };
        VmView {
            spec: r.spec.clone(),
            term: r.term,
            status: status.into(),
            primary: r.primary.clone(),
            acked_seq: pobs.and_then(|o| o.seq),
            backups,
            clones: self.clones_view(now, r),
            limits: r.limits,
            usage: self.usage_view(r),
        }
    }
}
