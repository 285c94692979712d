//! The policy's second half: what it does with a capture (the checkpoint for the backups in
//! step, the full syncs and quick resyncs of those joining), output release, and the live
//! count. See the parent module.

use std::sync::atomic::Ordering;
use std::time::Instant;

use protocol::message::Kind;
use vmm::EpochCapture;

use super::{Join, Phase, Policy};

impl Policy<'_> {
    /// The result of a [`super::Command::Capture`]: builds and sends checkpoint `seq` to the
    /// backups in step, and the full sync or quick resync of any backup joining at it.
    pub fn handle_capture(&mut self, cap: &EpochCapture, now: Instant) {
        let Some(plan) = self.pending.take() else {
            return;
        };
        let seq = self.st.history.take_seq();
        let cp = if plan.one_pause_sync {
            self.st.shadow.checkpoint(seq, Kind::Sync, cap)
        } else if plan.full_join {
            self.st.shadow.incremental_from_full(seq, cap)
        } else {
            self.st.shadow.checkpoint(seq, Kind::Incremental, cap)
        };
        self.record(seq, cap);
        self.st.history.closes.insert(seq, cap.epoch);
        self.send_to_active(&cp, now);
        if self.phase == Phase::Protected {
            self.send_joins(seq, cap, plan.full_join, now);
        }
        if self.phase == Phase::FinalSync {
            let live = self.backups.iter().filter(|b| b.active()).count() as u64;
            self.stats
                .sync_queued_bytes
                .fetch_add(cp.data_bytes() * live, Ordering::Relaxed);
            self.stats.sync_rounds.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "full sync: final pause {} µs, {} pages, checkpoint {seq} carries the state",
                cap.pause.as_micros(),
                cap.pages.len()
            );
            self.phase = Phase::Protected;
        }
        self.base.get_or_insert(seq);
        let pause = cap.pause.as_micros() as u64;
        let stats = &self.stats;
        stats.last_pause_us.store(pause, Ordering::Relaxed);
        stats.max_pause_us.fetch_max(pause, Ordering::Relaxed);
        stats.record_pause(pause);
        stats
            .pages
            .fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(cp.data_bytes(), Ordering::Relaxed);
        stats.epochs.store(seq + 1, Ordering::Relaxed);
        self.last_capture = now;
        self.last_pause = cap.pause;
        // (A full capture's pages are all of RAM, not an epoch's.)
        let busy = if cap.changes.is_some() {
            0
        } else {
            cap.pages.len()
        };
        self.epoch_pages = (busy, false);
        tracing::trace!(
            "checkpoint {seq}: {} pages, pause {} µs",
            cap.pages.len(),
            cap.pause.as_micros()
        );
        self.next_tick(now, plan.early, Some(cap.pages.len()));
        self.after_input(now);
    }

    /// Sends the backups joining at checkpoint `seq` their full sync (from the full capture)
    /// or quick resync; from the next checkpoint on they are in step.
    fn send_joins(&mut self, seq: u64, cap: &EpochCapture, full_join: bool, now: Instant) {
        let sync = full_join.then(|| self.st.shadow.sync_for_joining(seq, cap));
        for i in 0..self.backups.len() {
            if !self.backups[i].ready_to_join() {
                continue;
            }
            let cp = match (self.backups[i].join, &sync) {
                (Join::Full, Some(s)) => s.clone(),
                (Join::Resync(from), _) => {
                    let gfns = self.st.history.pages_since(from);
                    self.st.shadow.resync(seq, from, &gfns, cap)
                }
                _ => continue,
            };
            let b = &mut self.backups[i];
            tracing::info!(
                "backup {} joins at checkpoint {seq}: {} of {} pages, {:.1} MiB, in a {} µs pause",
                b.name,
                match cp.kind {
                    Kind::Resync { from } => format!("quick resync from checkpoint {from}"),
                    _ => "full sync".to_string(),
                },
                cp.pages.len(),
                cp.data_bytes() as f64 / (1 << 20) as f64,
                cap.pause.as_micros()
            );
            let r = b.sender.as_mut().map(|s| s.send_checkpoint(now, cp));
            match r {
                Some(Ok(())) => b.join = Join::InStep,
                Some(Err(e)) => self.fail_backup(i, &e.to_string()),
                None => {}
            }
        }
    }

    /// The highest checkpoint acknowledged by at least `required` live backups.
    fn releasable(&self) -> Option<u64> {
        let mut acks: Vec<u64> = self
            .backups
            .iter()
            .filter(|b| b.alive())
            .filter_map(|b| b.acked)
            .collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        acks.get(self.required().checked_sub(1)?).copied()
    }

    /// Releases the output of every checkpoint enough backups acknowledged.
    pub(super) fn release(&mut self) {
        self.stats.in_step.store(
            self.backups.iter().filter(|b| b.active()).count() as u64,
            Ordering::Relaxed,
        );
        if self.fenced.is_some() {
            return;
        }
        let Some(c) = self.releasable() else {
            return;
        };
        // Acks of pre-copy rounds (before the session's first consistent checkpoint) mean the
        // backups hold no consistent image yet: they release nothing.
        if self.base.is_none_or(|b| c < b) {
            return;
        }
        self.stats.acked.store(c + 1, Ordering::Relaxed);
        // After a stall, only a checkpoint captured since vouches for the backups' liveness as
        // backups (`handle_stall`).
        match self.fresh_from {
            Some(f) if c < f => return,
            Some(_) => self.fresh_from = None,
            None => {}
        }
        let h = &mut self.st.history;
        let e = h.closes.range(..=c).next_back().map(|(_, e)| *e);
        h.closes = h.closes.split_off(&(c + 1));
        let Some(e) = e.filter(|e| h.released.is_none_or(|r| *e > r)) else {
            return;
        };
        h.released = Some(e);
        if !self.protected_logged {
            self.protected_logged = true;
            tracing::info!("protected: checkpoint {c} acknowledged");
            self.stats.protected.store(true, Ordering::Relaxed);
        }
        self.commands.push_back(super::Command::Release(e));
    }

    /// Fails the session if fewer than `required` backups remain (while it starts, backups
    /// still being connected count).
    pub(super) fn check_live(&mut self) {
        let start = self.phase == Phase::Start;
        let live = self
            .backups
            .iter()
            .filter(|b| b.alive() || (start && b.connecting))
            .count();
        if live >= self.required() || self.failed.is_some() {
            return;
        }
        // Before the first connection attempts are made, nothing is lost yet.
        if start && self.backups.iter().any(|b| b.last_attempt.is_none()) {
            return;
        }
        self.failed = Some(format!(
            "{live} of the {} backups needed are reachable",
            self.required()
        ));
    }

    /// True while a full sync or the session's first resync is not yet acknowledged.
    pub fn syncing(&self) -> bool {
        self.phase != Phase::Protected || !self.protected_logged
    }
}
