//! Planned migration: once the target backup is synced, the primary hands over (its guest
//! paused for good, a last checkpoint acknowledged by every backup, the VM stopped) and the
//! target is promoted from exactly that checkpoint. If the primary fails meanwhile, this is a
//! failover; if the handover does not complete in time, the primary runs on.

use std::time::Duration;

use super::Manager;
use crate::event::EventKind;
use crate::model::{Phase, VmRecord};

/// Longest wait for a primary to hand over before the migration is abandoned.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(5);

impl Manager {
    /// Running → Handover to `to` (a synced backup).
    pub(crate) fn start_handover(&mut self, now: Duration, name: &str, to: &str) {
        let Some(mut rec) = self.state.vms.get(name).cloned() else {
            return;
        };
        rec.phase = Phase::Handover;
        rec.handover_to = Some(to.to_string());
        let from = rec.primary.clone();
        self.event(
            now,
            EventKind::Handover,
            Some(name),
            from.as_deref(),
            Some(rec.term),
            format!("planned migration to {to}: the primary takes a last checkpoint of its paused guest"),
        );
        self.state.vms.insert(name.into(), rec);
        self.handover_since.insert(name.into(), now);
    }

    /// Handover → Promoting once the primary handed over (or failed); back to Running if it
    /// takes too long or the target is gone.
    pub(crate) fn watch_handover(&mut self, now: Duration, name: &str, rec: &VmRecord) {
        let Some(to) = rec.handover_to.clone() else {
            return self.abandon_handover(now, name, "no target".into());
        };
        let p = rec.primary.clone().unwrap_or_default();
        let obs = self.primary_obs(&p, rec).cloned();
        // Handed over = its guest is stopped for good and every backup holds its last
        // checkpoint: the target may start at once, even while the old process is still exiting.
        if obs.as_ref().is_some_and(|o| o.handed_over) {
            // Every backup holds the handed-over checkpoint (the primary answers only once
            // all of its set acknowledged it), so any live synced backup may take over: the
            // target if it can, else the most advanced other one (never a silent target).
            if let Some(c) = self
                .candidate(now, rec, Some(&to))
                .or_else(|| self.candidate(now, rec, None))
            {
                return self.switch_over(now, name, &p, &to, &c, obs.and_then(|o| o.seq));
            }
            // None heard right now: decided again at the next report; once the old process
            // has exited this is a failover (or the VM is down), below.
            if obs.as_ref().is_some_and(|o| o.alive) {
                return;
            }
        }
        if let Some(why) = self.primary_failed(now, rec) {
            self.handover_since.remove(name);
            if let Some(c) = self.candidate(now, rec, None) {
                self.counters.failovers += 1;
                self.promote(now, name, &c, why);
            } else {
                self.report_down(now, rec, why);
            }
            return;
        }
        let since = *self.handover_since.entry(name.into()).or_insert(now);
        if now.saturating_sub(since) > HANDOVER_LIMIT {
            self.abandon_handover(
                now,
                name,
                format!(
                    "{p} did not hand over within {} s",
                    HANDOVER_LIMIT.as_secs()
                ),
            );
        }
    }

    /// Promotes `c` (the target `to`, or another backup) after `p` handed over at `seq`.
    fn switch_over(
        &mut self,
        now: Duration,
        name: &str,
        p: &str,
        to: &str,
        c: &str,
        seq: Option<u64>,
    ) {
        self.handover_since.remove(name);
        self.counters.switchovers += 1;
        let seq = seq.map_or("?".into(), |s| s.to_string());
        let elsewhere = if c == to {
            String::new()
        } else {
            format!(" (target {to} not heard: {c} instead)")
        };
        self.promote(
            now,
            name,
            c,
            format!("planned migration: {p} handed over at checkpoint {seq}{elsewhere}"),
        );
    }

    fn abandon_handover(&mut self, now: Duration, name: &str, why: String) {
        self.handover_since.remove(name);
        if let Some(rec) = self.state.vms.get_mut(name) {
            rec.phase = Phase::Running;
            rec.handover_to = None;
            let term = rec.term;
            self.event(
                now,
                EventKind::Handover,
                Some(name),
                None,
                Some(term),
                format!("migration abandoned: {why}; the primary runs on"),
            );
        }
    }
}
