//! A promotion whose primary never ran its guest is tried again from the same image.
//!
//! The agent reports a dead primary of the record's term as `never_ran` when the image it was
//! promoted from is still unconsumed on its host: a VM consumes the image it takes over, durably,
//! right before its guest's first instruction, so that primary released nothing, and the image
//! still holds everything the term before released. Its host crashed between the promotion's
//! marker and the guest's start, say, and came back. Without this the VM stayed down for good
//! although its newest state sat on that host untouched (a chaos soak finding: see
//! docs/RELIABILITY.md). The same host is promoted again at term + 1 (a term is never started
//! twice on a host), at most [`RETRY_LIMIT`] times in a row, so a promotion that fails the same
//! way every time ends as a VM reported down rather than a loop.

use std::time::Duration;

use super::Manager;
use crate::model::{VmObservation, VmRecord};

/// Promotions of one VM retried in a row (each at a new term) before it is left down.
pub const RETRY_LIMIT: u32 = 3;

/// Least time between two retries, times the retries made (a transient failure — the image
/// locked a moment, a tap not ready — does not use them all up in a few agent rounds).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

impl Manager {
    /// For the dead primary `o` of `rec`'s term on `host` (starting, or already counted as
    /// running: a primary is seen alive from its process's start, before its guest's): promotes
    /// `host` again if `o` never ran and its host speaks, the retries are not used up and the
    /// backoff has passed. Returns the record as it is now if it did.
    pub(crate) fn retry_unstarted(
        &mut self,
        now: Duration,
        rec: &VmRecord,
        host: &str,
        o: &VmObservation,
    ) -> Option<VmRecord> {
        if o.alive || !o.never_ran || o.term != rec.term || !self.fresh(now, host) {
            return None;
        }
        let name = rec.spec.name.clone();
        if rec.retries >= RETRY_LIMIT {
            return None;
        }
        let wait = RETRY_BACKOFF * rec.retries;
        if self
            .last_retry
            .get(&name)
            .is_some_and(|t| now.saturating_sub(*t) < wait)
        {
            return None;
        }
        let tries = rec.retries + 1;
        let mut counted = rec.clone();
        counted.retries = tries;
        self.state.vms.insert(name.clone(), counted);
        self.last_retry.insert(name.clone(), now);
        let why = format!(
            "the primary of term {} on {host} never ran its guest ({}): the image it was \
             promoted from is still whole there, so it is promoted again (retry {} of {})",
            rec.term,
            o.exit.as_deref().unwrap_or("its host restarted"),
            tries,
            RETRY_LIMIT
        );
        self.starting_since.remove(&name);
        self.down.remove(&name);
        self.promote(now, &name, host, why);
        self.state.vms.get(&name).cloned()
    }
}
