//! Failure detection from two signals, the choice of the backup to promote, and the backup
//! set's upkeep (lost backups out, synced backups marked).

use std::time::Duration;

use super::Manager;
use crate::event::EventKind;
use crate::model::{ProcRole, VmObservation, VmRecord};

/// How long a host whose backup was dropped for a failed link to the primary is avoided by
/// re-protection (another host is used if there is one).
pub(crate) const SHUN: Duration = Duration::from_secs(30);

/// What the heard backups say of the primary's checkpoints (`checkpoints_stopped`).
struct Stopped {
    /// Backups heard that say they stopped.
    witnesses: usize,
    /// The shortest silence among them, counted only from when each one's host was heard again
    /// after a stall (`Duration::MAX`: never heard).
    quietest: Duration,
    /// The shortest silence as the backups measured it.
    measured: Duration,
}

impl Manager {
    /// When `host` was last heard of (a host never heard of since this manager started counts
    /// from the start: a restart is not a detection).
    fn last_seen(&self, host: &str) -> Duration {
        self.hosts.get(host).map_or(self.started, |h| h.last_seen)
    }

    /// When `host` was last heard of (for other modules).
    pub(crate) fn last_seen_at(&self, host: &str) -> Duration {
        self.last_seen(host)
    }

    /// Whether `host`'s agent heartbeated within the detection timeout.
    pub(crate) fn fresh(&self, now: Duration, host: &str) -> bool {
        self.hosts.contains_key(host) && now.saturating_sub(self.last_seen(host)) <= self.cfg.detect
    }

    /// Age of `host`'s last report.
    fn report_age(&self, now: Duration, host: &str) -> Duration {
        now.saturating_sub(self.last_seen(host))
    }

    fn obs(&self, host: &str, vm: &str, role: ProcRole) -> Option<&VmObservation> {
        self.hosts
            .get(host)?
            .report
            .vms
            .iter()
            .find(|o| o.vm == vm && o.role == role)
    }

    /// A backup's observation from its host's current connection: a report from before the
    /// agent reconnected (it may have been restarted, its host revived) says nothing of now,
    /// so it neither witnesses nor makes a candidate.
    fn backup_obs(&self, host: &str, vm: &str) -> Option<&VmObservation> {
        self.hosts
            .get(host)
            .filter(|h| h.reported)
            .and(self.obs(host, vm, ProcRole::Backup))
    }

    /// The observation of the VM's primary of the record's term on `host`.
    pub(crate) fn primary_obs(&self, host: &str, rec: &VmRecord) -> Option<&VmObservation> {
        self.obs(host, &rec.spec.name, ProcRole::Primary)
            .filter(|o| o.term == rec.term)
    }

    /// Why the running primary is failed, if it is.
    pub(crate) fn primary_failed(&self, now: Duration, rec: &VmRecord) -> Option<String> {
        let p = rec.primary.as_deref()?;
        if self.fresh(now, p) {
            if !self.hosts.get(p).is_some_and(|h| h.reported) {
                return None; // (re)connected, no report yet
            }
            // Its own agent speaks: failed if the process is gone, or hung (not answering its
            // agent) while its backups say checkpoints stopped.
            return match self.primary_obs(p, rec) {
                // Handed over after the manager gave the migration up: stopped for good.
                Some(o) if o.handed_over => Some(format!(
                    "the primary on {p} handed over (its guest is stopped for good)"
                )),
                Some(o) if o.alive => self.primary_hung(now, p, rec, o),
                Some(o) => Some(format!(
                    "the primary's process on {p} exited ({})",
                    o.exit.as_deref().unwrap_or("unknown")
                )),
                None => Some(format!("host {p} runs no primary of term {}", rec.term)),
            };
        }
        // Its host is silent: the backups must agree that checkpoints stopped.
        let silent_host = self.report_age(now, p);
        // (None: checkpoints still arrive, only the manager's link is cut.)
        let Stopped {
            witnesses,
            quietest,
            measured,
        } = self.checkpoints_stopped(now, rec)?;
        if witnesses == 0 {
            // Nobody who could tell is heard: do nothing rather than guess. Except when the
            // primary's host and every backup's host, all heard by this manager, have all
            // been silent for longer than a lost backup's timeout: then no host that holds the
            // VM can run it now, and the VM is down (said once; it stays down while nobody can
            // tell, e.g. while a host that came back has not yet started its backup). Nothing
            // is promoted on this ground: a candidate must be a live backup, which would have
            // been a witness. (Hosts a restarted manager has not heard yet prove nothing: their
            // agents may take a while to reconnect.)
            let lost = self.cfg.backup_lost;
            let silent = |h: &str| self.hosts.contains_key(h) && self.report_age(now, h) > lost;
            let silent_backups: Vec<&str> = rec
                .backups
                .iter()
                .filter(|b| silent(&b.host))
                .map(|b| b.host.as_str())
                .collect();
            let all_silent = silent(p) && silent_backups.len() == rec.backups.len();
            if !all_silent && !self.down.contains(&rec.spec.name) {
                return None;
            }
            return Some(format!(
                "no heartbeat from {p} for {} ms, nor from its backups' hosts {silent_backups:?} \
                 for over {} ms",
                silent_host.as_millis(),
                lost.as_millis()
            ));
        }
        // The manager lost the primary's host well before its backups lost its checkpoints:
        // the primary ran on while cut from the manager (a partition: a crash stops both at
        // once), so a gap in its checkpoints is likelier a stall of a busy host than a death,
        // and it must last as long as a hung primary's (a chaos soak finding: 24 of 88 cuts of
        // a primary from the manager alone failed it over on a gap of 61-78 ms).
        // Backups that have never heard from this primary (a process just restarted, or new
        // after a failover) cannot tell a dead primary from a slow one: with only them to go
        // by, the primary's host must be silent as long as a hung primary (a soak saw the VM
        // called lost after stalls of 60-130 ms of a primary that ran on).
        if quietest == Duration::MAX && silent_host < self.cfg.hung {
            return None;
        }
        let cut_first = silent_host > measured.saturating_add(self.cfg.detect);
        if cut_first && quietest < self.cfg.hung {
            return None;
        }
        let quiet = if quietest == Duration::MAX {
            "never heard from it".to_string()
        } else {
            format!("silent for {} ms", quietest.as_millis())
        };
        Some(format!(
            "no heartbeat from {p} for {} ms and its backups say checkpoints stopped ({quiet})",
            silent_host.as_millis()
        ))
    }

    /// The backups' side of detection: `None` if a live backup whose host is heard still gets
    /// checkpoints or heartbeats (within `detect`); else how many such witnesses say they
    /// stopped, and the shortest silence among them.
    fn checkpoints_stopped(&self, now: Duration, rec: &VmRecord) -> Option<Stopped> {
        let mut witnesses = 0;
        let mut quietest = Duration::MAX;
        let mut measured = Duration::MAX;
        for b in &rec.backups {
            if !self.fresh(now, &b.host) {
                continue;
            }
            let Some(o) = self.backup_obs(&b.host, &rec.spec.name) else {
                continue;
            };
            if !o.alive {
                continue;
            }
            witnesses += 1;
            // The backup's own measure (a report is at most a heartbeat or two old); not
            // extended by the report's age, so a manager that stalls does not make every
            // backup look silent. Counted only from when its host was last heard again after a
            // stall: a backup whose own host stalled (its process unscheduled) measures its
            // own stall as the primary's silence (a chaos soak finding: a primary merely cut
            // from the manager was failed over when its backup's host stalled for 63 ms).
            let since_resumed = self
                .hosts
                .get(&b.host)
                .and_then(|h| h.resumed_at)
                .map_or(Duration::MAX, |t| now.saturating_sub(t));
            let raw = o.silent_ms.map_or(Duration::MAX, Duration::from_millis);
            measured = measured.min(raw);
            let silent = match o.silent_ms {
                None => Duration::MAX,
                Some(_) => raw.min(since_resumed),
            };
            if silent <= self.cfg.detect {
                return None;
            }
            quietest = quietest.min(silent);
        }
        Some(Stopped {
            witnesses,
            quietest,
            measured,
        })
    }

    /// A primary whose agent speaks but which itself has not answered that agent for `hung`,
    /// while every heard backup says checkpoints stopped (at least one must say so: without a
    /// witness a slow primary is not told from a hung one). Its replacement is safe even if it
    /// wakes up later: the promoted backup and every other backup are fenced at the new term,
    /// so it can never have output acknowledged again, and its agent stops it.
    fn primary_hung(
        &self,
        now: Duration,
        p: &str,
        rec: &VmRecord,
        o: &VmObservation,
    ) -> Option<String> {
        let unanswered = Duration::from_millis(o.silent_ms?);
        if unanswered < self.cfg.hung {
            return None;
        }
        let Stopped {
            witnesses,
            quietest,
            ..
        } = self.checkpoints_stopped(now, rec)?;
        // (`quietest` is MAX when no witness ever heard from it: a primary still starting up,
        // or one whose backups never synced, is not called hung.)
        if witnesses == 0 || quietest < self.cfg.hung || quietest == Duration::MAX {
            return None;
        }
        Some(format!(
            "the primary on {p} has not answered its agent for {} ms and its backups say \
             checkpoints stopped (silent for {} ms): hung",
            unanswered.as_millis(),
            quietest.as_millis()
        ))
    }

    /// The backup to promote: live, synced at the current term, holding an image of that term;
    /// the most advanced (highest seq), `to` if given.
    pub(crate) fn candidate(
        &self,
        now: Duration,
        rec: &VmRecord,
        to: Option<&str>,
    ) -> Option<String> {
        rec.backups
            .iter()
            .filter(|b| b.synced_term == Some(rec.term) && self.fresh(now, &b.host))
            .filter(|b| to.is_none_or(|t| t == b.host))
            .filter_map(|b| {
                let o = self.backup_obs(&b.host, &rec.spec.name)?;
                (o.alive && o.image_term == rec.term).then_some((o.seq?, b.host.clone()))
            })
            .max()
            .map(|(_, h)| h)
    }

    /// Backups whose host has been silent too long, or that have heard nothing from a primary
    /// that runs and answers (the link between them is cut), leave the set: the primary, which
    /// holds output until every backup of its set acknowledged, releases it again, unprotected
    /// until a replacement synced (persisted before the primary is told: one that comes back
    /// can never be promoted from its older image).
    pub(crate) fn drop_lost_backups(&mut self, now: Duration, rec: &mut VmRecord) {
        // Only for a primary that runs (it waits for them); when the primary is gone too, the
        // backups are the VM: they stay in the set until one comes back.
        let Some(p) = rec.primary.clone() else {
            return;
        };
        let Some(po) = self
            .primary_obs(&p, rec)
            .filter(|o| o.alive && self.fresh(now, &p))
        else {
            return;
        };
        // Answering its agent (a hung primary is failed over instead, see `primary_hung`).
        // And not protected by its whole set: a primary that says every backup is in step
        // contradicts a backup's silence (a stall of the backup's host, a stale report); on an
        // overloaded host that silence alone dropped a synced backup, and the next crash found
        // only its unsynced replacement (a crash soak finding).
        let answers = po
            .silent_ms
            .is_none_or(|ms| Duration::from_millis(ms) < self.cfg.hung)
            && !po.protected;
        let unheard = self.note_unheard(now, rec, &po.backup_hosts.clone());
        let running_for = now.saturating_sub(
            self.running_since
                .get(&rec.spec.name)
                .copied()
                .unwrap_or(self.started),
        );
        let lost: Vec<(String, String)> = rec
            .backups
            .iter()
            .filter_map(|b| {
                let age = self.report_age(now, &b.host);
                if age > self.cfg.backup_lost {
                    return Some((
                        b.host.clone(),
                        format!("no heartbeat for {} ms", age.as_millis()),
                    ));
                }
                if let Some(since) = unheard.get(&b.host).filter(|_| answers) {
                    let ms = now.saturating_sub(*since).as_millis();
                    return Some((
                        b.host.clone(),
                        format!(
                            "it has heard nothing from the primary on {p} in the {ms} ms the \
                             primary has had it in its set: the link between them is cut; the \
                             primary goes on without it"
                        ),
                    ));
                }
                let o = self.backup_obs(&b.host, &rec.spec.name)?;
                // (Counted only since this term's primary runs and since the backup joined the
                // set: before, the silence is the previous primary's, or the one for which it
                // was dropped, not a cut link to this one — a backup dropped and added again
                // was dropped again at once, in a loop, on its unchanged report.)
                let joined = self
                    .added_at
                    .get(&(rec.spec.name.clone(), b.host.clone()))
                    .map_or(running_for, |t| now.saturating_sub(*t));
                let heard = Duration::from_millis(o.silent_ms?)
                    .min(running_for)
                    .min(joined);
                (answers && o.alive && heard > self.cfg.backup_lost).then(|| {
                    (
                        b.host.clone(),
                        format!(
                            "nothing from the primary on {p} for {} ms while it runs: the link \
                             between them is cut; the primary goes on without it",
                            heard.as_millis()
                        ),
                    )
                })
            })
            .collect();
        for (h, why) in lost {
            rec.backups.retain(|b| b.host != h);
            let key = (rec.spec.name.clone(), h.clone());
            self.unheard_since.remove(&key);
            if !why.starts_with("no heartbeat") {
                self.shunned.insert(key, now + SHUN);
            }
            self.event(
                now,
                EventKind::BackupLost,
                Some(&rec.spec.name),
                Some(&h),
                Some(rec.term),
                why,
            );
        }
    }

    /// Backups that the running primary has had in its set (`in_set`, from its report) for
    /// longer than twice `backup_lost` without their ever hearing from it (alive, heard by the
    /// manager, `silent_ms` None): a link cut before their first session (the primary, which
    /// holds output from its first session on, retries every second; twice the timeout leaves
    /// room for a retry on a busy host). Keeps the clocks.
    fn note_unheard(
        &mut self,
        now: Duration,
        rec: &VmRecord,
        in_set: &[String],
    ) -> std::collections::BTreeMap<String, Duration> {
        let mut out = std::collections::BTreeMap::new();
        for b in &rec.backups {
            let key = (rec.spec.name.clone(), b.host.clone());
            let never = in_set.contains(&b.host)
                && self.fresh(now, &b.host)
                && self
                    .backup_obs(&b.host, &rec.spec.name)
                    .is_some_and(|o| o.alive && o.silent_ms.is_none());
            if !never {
                self.unheard_since.remove(&key);
                continue;
            }
            // (A clock is kept only while it is seen never heard decision after decision: one
            // left from an earlier stretch — the primary unheard meanwhile, a new primary, a
            // restarted backup process — starts over.)
            let (since, last) = self.unheard_since.entry(key).or_insert((now, now));
            if now.saturating_sub(*last) > self.cfg.detect {
                *since = now;
            }
            *last = now;
            let since = *since;
            if now.saturating_sub(since) > 2 * self.cfg.backup_lost {
                out.insert(b.host.clone(), since);
            }
        }
        out
    }

    /// Marks the set synced when the primary reports itself protected with exactly this set
    /// and every backup's own report confirms it: an image of the current term at or beyond
    /// the checkpoint the primary last had acknowledged (a primary's "protected" may still
    /// describe the session with its previous set for a moment after the set changed; a
    /// backup with a stale image of the same term never passes this).
    pub(crate) fn mark_synced(&mut self, now: Duration, rec: &mut VmRecord) {
        let name = rec.spec.name.clone();
        let Some(p) = rec.primary.clone() else {
            return;
        };
        let acked = self.primary_obs(&p, rec).and_then(|o| o.seq);
        let protected = self.fresh(now, &p)
            && self.primary_obs(&p, rec).is_some_and(|o| {
                let mut have = o.backup_hosts.clone();
                let mut want: Vec<String> = rec.backups.iter().map(|b| b.host.clone()).collect();
                have.sort();
                want.sort();
                o.alive && o.protected && !want.is_empty() && have == want
            });
        let confirmed = |m: &Manager, host: &str| {
            m.backup_obs(host, &name).is_some_and(|o| {
                o.alive && o.image_term == rec.term && acked.is_some_and(|a| o.seq >= Some(a))
            })
        };
        // Confirmed once per backup and term: later reports of backups lag the primary's.
        let all_synced = rec.backups.iter().all(|b| b.synced_term == Some(rec.term));
        // But every backup must still be heard and still hold an image of the term: a primary's
        // "protected" outlives a backup that died (its host down for seconds) or restarted from
        // nothing, and a "protected" VM whose only backup held nothing was crashed by the
        // chaos runner as a single fault (a crash-in-sync soak finding).
        let holds = |m: &Manager, host: &str| {
            m.report_age(now, host) <= m.cfg.backup_lost
                && m.backup_obs(host, &name)
                    .is_some_and(|o| o.alive && o.image_term == rec.term)
        };
        let holding = rec.backups.iter().all(|b| holds(self, &b.host));
        if !protected
            || !holding
            || !(all_synced || rec.backups.iter().all(|b| confirmed(self, &b.host)))
        {
            self.protected.remove(&name);
            return;
        }
        for b in &mut rec.backups {
            b.synced_term = Some(rec.term);
        }
        rec.retries = 0;
        if self.protected.insert(name.clone()) {
            let hosts: Vec<&str> = rec.backups.iter().map(|b| b.host.as_str()).collect();
            self.event(
                now,
                EventKind::Protected,
                Some(&name),
                Some(&p),
                Some(rec.term),
                format!("every backup holds it: {hosts:?}"),
            );
        }
    }

    /// The primary failed and no backup can take over: the VM stays down, said once.
    pub(crate) fn report_down(&mut self, now: Duration, rec: &VmRecord, why: String) {
        if self.down.insert(rec.spec.name.clone()) {
            self.event(
                now,
                EventKind::Lost,
                Some(&rec.spec.name),
                rec.primary.as_deref(),
                Some(rec.term),
                format!("{why}; no live backup holds term {}: the VM stays down until one does (it never starts from an older image)", rec.term),
            );
        }
    }

    /// Hosts silent past the detection timeout are noted once.
    pub(crate) fn note_hosts_down(&mut self, now: Duration) {
        let silent: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.down && now.saturating_sub(h.last_seen) > self.cfg.detect)
            .map(|(n, _)| n.clone())
            .collect();
        for h in silent {
            let ms = self.report_age(now, &h).as_millis();
            if let Some(s) = self.hosts.get_mut(&h) {
                s.down = true;
            }
            self.event(
                now,
                EventKind::HostDown,
                None,
                Some(&h),
                None,
                format!("no heartbeat for {ms} ms"),
            );
        }
    }
}
