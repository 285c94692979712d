//! The policy's pre-copy rounds: what it does with a pass (round 0 in slices, later rounds of
//! what was dirtied meanwhile), and what every capture records for later quick resyncs. See the
//! parent module.

use std::sync::atomic::Ordering;
use std::time::Instant;

use protocol::message::Kind;
use protocol::Checkpoint;
use vmm::EpochCapture;

use super::{Phase, Policy};
use crate::PRECOPY_CONVERGED;

impl Policy<'_> {
    /// The result of a [`Command::PreCopy`].
    pub fn handle_precopy(&mut self, cap: &EpochCapture, now: Instant) {
        let Phase::PreCopy {
            round,
            slice,
            last_pages,
            pages,
        } = self.phase
        else {
            return;
        };
        self.pending = None;
        let n = cap.pages.len();
        let seq = self.st.history.take_seq();
        // Round 0 copies what is there; only what changed since the previous capture (its
        // first slice's `changes`) is a change. Later rounds copy what changed.
        match (round, &cap.changes) {
            (0, Some(ch)) => self.st.history.record(seq, &ch.dirty, &ch.disk),
            (0, None) => {}
            _ => self.st.history.record(seq, &cap.pages, &cap.disk),
        }
        let cp = match round {
            0 => self.st.shadow.precopy_slice(seq, slice == 0, cap),
            _ => self.st.shadow.checkpoint(seq, Kind::PreCopy, cap),
        };
        let bytes = cp.data_bytes();
        let live = self.backups.iter().filter(|b| b.active()).count() as u64;
        self.stats
            .sync_queued_bytes
            .fetch_add(bytes * live, Ordering::Relaxed);
        self.send_to_active(&cp, now);
        let slices = self.slices();
        tracing::info!(
            "pre-copy round {round}{} (checkpoint {seq}): {n} pages, {} disk bytes, {:.1} MiB queued, {:.0} ms into the sync",
            match round {
                0 if slices > 1 => format!(", slice {} of {slices}", slice + 1),
                _ => String::new(),
            },
            cp.disk.iter().map(|d| d.1.len()).sum::<usize>(),
            bytes as f64 / (1 << 20) as f64,
            now.saturating_duration_since(self.sync_started).as_secs_f64() * 1e3,
        );
        self.precopied = true;
        self.last_capture = now;
        self.stats
            .epochs
            .store(self.st.history.next_seq(), Ordering::Relaxed);
        let n = pages + n;
        if round == 0 && slice + 1 < slices {
            self.phase = Phase::PreCopy {
                round,
                slice: slice + 1,
                last_pages,
                pages: n,
            };
            self.after_input(now);
            return;
        }
        self.stats
            .sync_rounds
            .store(u64::from(round) + 1, Ordering::Relaxed);
        // Done after the last allowed round, or once the dirty set is small or stops
        // shrinking by a tenth per round (the guest dirties as fast as we copy).
        let converged = round + 1 >= self.cfg.precopy_rounds
            || (round > 0
                && (n <= PRECOPY_CONVERGED || last_pages.is_some_and(|l| n * 10 > l * 9)));
        self.phase = match converged {
            true => Phase::FinalSync,
            false => Phase::PreCopy {
                round: round + 1,
                slice: 0,
                last_pages: Some(n),
                pages: 0,
            },
        };
        self.after_input(now);
    }

    /// Slices of pre-copy round 0 for this guest.
    pub(super) fn slices(&self) -> u64 {
        let (pages, disk) = self.cfg.guest;
        let (sp, sd) = self.cfg.slice;
        pages
            .div_ceil(sp.max(1))
            .max(disk.div_ceil(sd.max(1)))
            .max(1)
    }

    pub(super) fn send_to_active(&mut self, cp: &Checkpoint, now: Instant) {
        for i in 0..self.backups.len() {
            if !self.backups[i].active() {
                continue;
            }
            let r = self.backups[i]
                .sender
                .as_mut()
                .map(|s| s.send_checkpoint(now, cp.clone()));
            if let Some(Err(e)) = r {
                self.fail_backup(i, &e.to_string());
            }
        }
    }

    /// Records what checkpoint `seq` (captured as `cap`) changed, for later quick resyncs.
    pub(super) fn record(&mut self, seq: u64, cap: &EpochCapture) {
        let h = &mut self.st.history;
        match &cap.changes {
            // A full capture lists every non-zero page; what changed is in `changes`.
            Some(ch) => h.record(seq, &ch.dirty, &ch.disk),
            None => h.record(seq, &cap.pages, &cap.disk),
        }
    }
}
