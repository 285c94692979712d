//! The policy's slow-backup rule: a backup whose window stays full for `drop_after`, while
//! enough others could carry the session, is dropped (it rejoins by quick resync). See the
//! parent module.

use std::time::Instant;

use super::{Command, Join, Policy};

impl Policy<'_> {
    /// A backup whose window has stayed full for `drop_after` while more than `required`
    /// others keep up is dropped.
    /// Notes since when each backup in step has had its window full.
    pub(super) fn note_behind(&mut self, now: Instant) {
        let window = self.cfg.window;
        for b in self.backups.iter_mut() {
            let behind = b.active()
                && b.sender
                    .as_ref()
                    .is_some_and(|s| s.in_flight() as u64 >= window);
            b.behind_since = match (behind, b.behind_since) {
                (false, _) => None,
                (true, None) => Some(now),
                (true, since) => since,
            };
        }
    }

    /// Backups that could carry the session without a slow one: those in step and those ready
    /// to join at the next capture.
    pub(super) fn could_serve(&self) -> usize {
        self.backups
            .iter()
            .filter(|b| b.active() || b.ready_to_join())
            .count()
    }

    /// When a backup that stays behind is to be dropped (None: none can be).
    pub(super) fn drop_deadline(&self) -> Option<Instant> {
        if self.could_serve() <= self.required() {
            return None;
        }
        self.backups
            .iter()
            .filter(|b| b.active())
            .filter_map(|b| b.behind_since.map(|t| t + self.cfg.drop_after))
            .min()
    }

    pub(super) fn drop_slow(&mut self, now: Instant) {
        self.note_behind(now);
        if self.could_serve() <= self.required() {
            return;
        }
        let after = self.cfg.drop_after;
        let slow = self
            .backups
            .iter()
            .position(|b| b.active() && b.behind_since.is_some_and(|t| now - t >= after));
        if let Some(i) = slow {
            let b = &mut self.backups[i];
            tracing::warn!(
                "backup {} is not keeping up (window full for {} ms); dropping it",
                b.name,
                after.as_millis()
            );
            if let Some(s) = b.sender.as_mut() {
                s.close(now, "not keeping up");
            }
            b.behind_since = None;
            b.join = Join::Welcome;
            self.commands.push_back(Command::Close(i));
        }
    }
}
