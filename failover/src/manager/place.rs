//! Placement: the least loaded live host that may run a VM.

use std::time::Duration;

use super::Manager;
use crate::model::{HostId, VmSpec};

impl Manager {
    /// Instances (primaries and backups) assigned to `host`.
    pub(crate) fn load(&self, host: &str) -> usize {
        self.state
            .vms
            .values()
            .map(|r| {
                usize::from(r.primary.as_deref() == Some(host))
                    + r.backups.iter().filter(|b| b.host == host).count()
            })
            .sum()
    }

    /// The least loaded live host allowed for `spec`, not in `exclude` (ties: by name).
    pub(crate) fn pick_host(
        &self,
        now: Duration,
        spec: &VmSpec,
        exclude: &[HostId],
    ) -> Option<HostId> {
        self.hosts
            .iter()
            .filter(|(n, h)| h.connected && !h.down && self.fresh(now, n))
            .filter(|(n, _)| spec.allows(n) && !exclude.contains(n))
            .map(|(n, _)| (self.load(n), n.clone()))
            .min()
            .map(|(_, n)| n)
    }
}
