//! Promotion: a backup's host is told to run the primary of a new term (persisted first), and
//! the start is watched until that primary runs — or the VM is reported down (or, when the
//! primary never ran its guest, promoted again: `retry`).

use std::time::Duration;

use super::{Manager, START_LIMIT};
use crate::event::EventKind;
use crate::model::{Phase, VmRecord};

impl Manager {
    /// Promotes `cand` at term + 1: persisted (by `decide`) before any assignment leaves.
    pub(crate) fn promote(&mut self, now: Duration, name: &str, cand: &str, why: String) -> u64 {
        let Some(mut rec) = self.state.vms.get(name).cloned() else {
            return 0;
        };
        let old = rec.primary.clone();
        self.event(
            now,
            EventKind::Detected,
            Some(name),
            old.as_deref(),
            Some(rec.term),
            why,
        );
        rec.term += 1;
        self.event(
            now,
            EventKind::TermChanged,
            Some(name),
            Some(cand),
            Some(rec.term),
            format!(
                "term {} → {}: only the primary on {cand} may release output",
                rec.term - 1,
                rec.term
            ),
        );
        rec.phase = Phase::Promoting;
        rec.handover_to = None;
        self.running_since.remove(name);
        self.unheard_since.retain(|(vm, _), _| vm != name);
        rec.primary = Some(cand.to_string());
        rec.started = false;
        rec.backups.retain(|b| b.host != cand);
        // The new primary starts unprotected: nobody else holds what it will release.
        for b in &mut rec.backups {
            b.synced_term = None;
        }
        self.reprotect(now, &mut rec);
        let term = rec.term;
        self.state.vms.insert(name.into(), rec);
        self.promoting_since.insert(name.into(), now);
        self.protected.remove(name);
        self.event(
            now,
            EventKind::Promoting,
            Some(name),
            Some(cand),
            Some(term),
            "resuming from its last committed checkpoint".into(),
        );
        term
    }

    /// Creating/Promoting → Running once the primary of the term reports itself alive.
    /// If it never does — its process exited, its host went silent for `backup_lost`, or
    /// nothing ran within [`START_LIMIT`] — the VM is down, said once: nothing else holds
    /// what that primary may have released, so nothing else is started.
    pub(crate) fn watch_start(&mut self, now: Duration, rec: &mut VmRecord) {
        let Some(p) = rec.primary.clone() else {
            return;
        };
        let since = *self
            .starting_since
            .entry(rec.spec.name.clone())
            .or_insert(now);
        let o = self.primary_obs(&p, rec).cloned();
        if let Some(again) = o
            .as_ref()
            .and_then(|o| self.retry_unstarted(now, rec, &p, o))
        {
            *rec = again;
            return;
        }
        if !o.as_ref().is_some_and(|o| o.alive) {
            let silent = now.saturating_sub(self.last_seen_at(&p));
            let why = match &o {
                Some(o) => Some(format!(
                    "the primary of term {} on {p} exited before it ran ({})",
                    rec.term,
                    o.exit.as_deref().unwrap_or("unknown")
                )),
                None if silent > self.cfg.backup_lost => Some(format!(
                    "{p} went silent while starting the primary of term {}",
                    rec.term
                )),
                None if now.saturating_sub(since) > START_LIMIT => Some(format!(
                    "no primary of term {} runs on {p} after {} s",
                    rec.term,
                    START_LIMIT.as_secs()
                )),
                None => None,
            };
            if let Some(why) = why {
                self.report_down(now, rec, why);
            }
            return;
        }
        self.starting_since.remove(&rec.spec.name);
        self.down.remove(&rec.spec.name);
        self.running_since.insert(rec.spec.name.clone(), now);
        rec.phase = Phase::Running;
        rec.started = true;
        let since = self.promoting_since.remove(&rec.spec.name);
        let ms = since.map(|s| now.saturating_sub(s).as_millis() as u64);
        if ms.is_some() {
            self.counters.last_promote_ms = ms;
        }
        let detail = match ms {
            Some(ms) => format!("primary runs on {p} ({ms} ms after the decision)"),
            None => format!("primary runs on {p}"),
        };
        self.event(
            now,
            EventKind::PrimaryRunning,
            Some(&rec.spec.name),
            Some(&p),
            Some(rec.term),
            detail,
        );
    }
}
