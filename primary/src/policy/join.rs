//! How backups join a session: the events of each backup's protocol session (ready with its
//! committed position, acknowledged, failed — a refusal for a stale term fences the primary),
//! and from the position in its `Welcome` whether a backup gets a quick resync or a full sync,
//! at session start and when it joins a running one. See the parent module.

use std::sync::atomic::Ordering;
use std::time::Instant;

use protocol::message::{RefuseCode, RESYNC_VERSION};
use protocol::{ProtocolError, SenderEvent};

use super::{Backup, Join, Phase, Policy, MAX_RESYNC, MAX_RESYNC_RUNNING};

impl Policy<'_> {
    /// How a backup that welcomed us is brought up to date: a quick resync if its position is
    /// of this history and what changed since is not too big for one checkpoint. At session
    /// start the bound is `MAX_RESYNC` (beyond it the pre-copied full sync, in slices, is the
    /// better way); in a running session a full sync is one long pause, so a resync is kept up
    /// to `MAX_RESYNC_RUNNING` (well inside the receiver's staging bound).
    pub(super) fn join_for(&self, b: &Backup, running: bool) -> Join {
        let Some(c) = b.committed else {
            return Join::Full;
        };
        if b.version < RESYNC_VERSION || !self.st.history.can_resync(&c) {
            return Join::Full;
        }
        let bytes = self.st.history.resync_bytes(c.seq, self.cfg.guest.1);
        let limit = match running {
            true => MAX_RESYNC_RUNNING,
            false => MAX_RESYNC,
        };
        if bytes <= limit {
            return Join::Resync(c.seq);
        }
        tracing::info!(
            "backup {}: {} MiB changed since its checkpoint {}: a full sync instead of a quick resync",
            b.name,
            bytes >> 20,
            c.seq
        );
        Join::Full
    }

    /// Joins decided when a backup welcomed us are checked again at the capture that serves
    /// them: much may have changed meanwhile (a full sync of another backup ran).
    pub(super) fn refresh_joins(&mut self) {
        if self.phase != Phase::Protected {
            return;
        }
        for i in 0..self.backups.len() {
            if matches!(self.backups[i].join, Join::Resync(_)) && self.backups[i].ready() {
                let j = self.join_for(&self.backups[i], true);
                self.backups[i].join = j;
            }
        }
    }

    pub(super) fn on_event(&mut self, i: usize, e: SenderEvent, _now: Instant) {
        match e {
            SenderEvent::Ready {
                version,
                committed,
                data_ports,
            } => {
                if !data_ports.is_empty()
                    && self.cfg.data_connections
                    && version >= protocol::message::DATA_CONN_VERSION
                {
                    self.commands.push_back(super::Command::OpenData {
                        backup: i,
                        ports: data_ports,
                    });
                }
                let b = &mut self.backups[i];
                b.version = version;
                b.committed = committed;
                let pos = committed.map_or("nothing".into(), |c| {
                    format!(
                        "checkpoint {} of term {} (history {:x})",
                        c.seq, c.term, c.history
                    )
                });
                tracing::info!(
                    "backup {} ready (protocol v{version}); it holds {pos}",
                    b.name
                );
                if let Some(c) = committed.filter(|c| c.term > self.cfg.term) {
                    tracing::error!(
                        "backup {} holds a checkpoint of term {}, newer than ours ({}): fenced",
                        self.backups[i].name,
                        c.term,
                        self.cfg.term
                    );
                    self.fenced.get_or_insert(Some(c.term));
                    return;
                }
                if self.phase != Phase::Start {
                    let j = self.join_for(&self.backups[i], true);
                    self.backups[i].join = j;
                }
            }
            SenderEvent::Acked { epoch, latency } => {
                self.backups[i].acked = Some(epoch);
                self.stats
                    .ack_latency_us
                    .store(latency.as_micros() as u64, Ordering::Relaxed);
            }
            SenderEvent::Resending { epoch, reason } => tracing::warn!(
                "backup {}: resending from checkpoint {epoch}: {reason}",
                self.backups[i].name
            ),
            SenderEvent::Failed(e) => {
                if let ProtocolError::Refused {
                    code: RefuseCode::StaleTerm,
                    detail,
                } = &e
                {
                    let term = crate::fence::term_in_refusal(detail);
                    tracing::error!(
                        "backup {} refused our term {} as stale ({detail}): fenced",
                        self.backups[i].name,
                        self.cfg.term
                    );
                    self.fenced.get_or_insert(term);
                }
                self.fail_backup(i, &e.to_string());
            }
        }
    }

    /// `required` backups welcomed the session: quick resyncs if every ready one can have
    /// one, else a full sync for all — unless some can resync and the guest is small enough
    /// for a one-pause full capture ([`MAX_RESYNC`], or pre-copy is off): then those resync
    /// and the others get a full sync from the same first capture (a backup added to a
    /// protected primary's set does not cost the others a full sync).
    pub(super) fn choose_sync(&mut self, now: Instant) {
        let ready: Vec<usize> = (0..self.backups.len())
            .filter(|&i| self.backups[i].ready())
            .collect();
        let joins: Vec<Join> = ready
            .iter()
            .map(|&i| self.join_for(&self.backups[i], false))
            .collect();
        self.sync_started = now;
        let resyncs = joins
            .iter()
            .filter(|j| matches!(j, Join::Resync(_)))
            .count();
        let (pages, disk) = self.cfg.guest;
        let one_pause = self.cfg.precopy_rounds == 0
            || pages * protocol::page::PAGE as u64 + disk <= MAX_RESYNC;
        if resyncs > 0 && (resyncs == joins.len() || one_pause) {
            for (&i, j) in ready.iter().zip(joins) {
                self.backups[i].join = j;
            }
            tracing::info!(
                "{resyncs} of {} ready backups hold a checkpoint of this history: quick resync{}",
                ready.len(),
                match ready.len() - resyncs {
                    0 => String::new(),
                    n => format!(", {n} by a full sync from the same capture"),
                }
            );
            self.phase = Phase::Protected;
            self.tick = now;
            return;
        }
        for b in self.backups.iter_mut().filter(|b| b.ready()) {
            b.join = Join::InStep;
        }
        self.stats.sync_rounds.store(0, Ordering::Relaxed);
        self.phase = match self.cfg.precopy_rounds {
            0 => Phase::FinalSync,
            _ => Phase::PreCopy {
                round: 0,
                slice: 0,
                last_pages: None,
                pages: 0,
            },
        };
    }
}
