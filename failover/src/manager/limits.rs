//! Per-VM resource limits: set by the user (persisted in the VM's record), handed to every
//! host running a process of the VM, and shown with what its agents report of their use.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ApiError, Manager};
use crate::event::EventKind;
use crate::limits::{Limits, ProcUsage, UsageOf};
use crate::model::{Assignments, HostId, VmRecord};

/// One process's use of its limits, as `vmatrix vm show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    /// Its host.
    pub host: String,
    /// "primary", "backup" or the clone's name.
    pub process: String,
    /// What its agent measured.
    pub usage: ProcUsage,
}

impl Manager {
    /// Sets a VM's resource limits (all zero: none); agents apply them to running processes
    /// at once.
    pub fn set_limits(
        &mut self,
        now: Duration,
        name: &str,
        limits: Limits,
    ) -> Result<(), ApiError> {
        let mut rec = self.record(name)?;
        limits
            .validate(rec.spec.mem_mib)
            .map_err(ApiError::Invalid)?;
        if rec.limits == limits {
            return Ok(());
        }
        rec.limits = limits;
        self.state.vms.insert(name.into(), rec);
        let detail = format!("limits: {limits}");
        self.event(now, EventKind::Limited, Some(name), None, None, detail);
        self.decide(now);
        Ok(())
    }

    /// Adds the limits of every VM with a process (or clone) on a host to its assignment.
    pub(super) fn limit_assignments(&self, all: &mut BTreeMap<HostId, Assignments>) {
        for a in all.values_mut() {
            let names = a.vms.keys().chain(a.clones.iter().map(|c| &c.vm));
            let limits: BTreeMap<String, Limits> = names
                .filter_map(|n| {
                    let rec = self.state.vms.get(n)?;
                    (!rec.limits.is_none()).then(|| (n.clone(), rec.limits))
                })
                .collect();
            a.limits = limits;
        }
    }

    /// What the agents last reported of a VM's processes' use of their limits.
    pub(super) fn usage_view(&self, r: &VmRecord) -> Vec<UsageView> {
        let mut out = Vec::new();
        for (host, h) in &self.hosts {
            for u in h.report.usage.iter().filter(|u| u.vm == r.spec.name) {
                let process = match &u.of {
                    UsageOf::Vm(role) => format!("{role:?}").to_lowercase(),
                    UsageOf::Clone(c) => c.clone(),
                };
                out.push(UsageView {
                    host: host.clone(),
                    process,
                    usage: u.clone(),
                });
            }
        }
        out
    }
}
