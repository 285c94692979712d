//! One replication session of the epoch loop: the backups connected by one call of
//! [`crate::run`], and what the loop does on each wake-up — choose how each backup is brought up
//! to date, pre-copy rounds, captures, releases, drops and rejoins. The async loop in `lib.rs`
//! only waits for input and hands it here.
//!
//! How a backup is brought up to date, from the committed position in its `Welcome`:
//! - at session start, if every backup's position is a checkpoint of this primary's history and
//!   term ([`History::can_resync`]), each gets a **quick resync** at the first capture: the
//!   pages and disk chunks changed since its position, with the state, in one checkpoint
//!   ([`Kind::Resync`]); otherwise all get a **full sync** (pre-copy rounds, then one short pause),
//!   which the backup builds in a side image, so its committed image survives until the new one
//!   is consistent;
//! - a backup that reconnects while the session runs joins at the next capture: by quick resync
//!   if it can, else by a full sync from a full capture (one pause).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::message::{Kind, RESYNC_VERSION};
use protocol::{ProtocolError, SenderEvent};
use vmm::{CaptureKind, EpochCapture, Vm};

use crate::peer::{self, releasable, FrameTx, Join, Peer};
use crate::{epoch, PrimaryConfig, PrimaryError, PrimaryState, Stats};
use crate::{EARLY_MIN_GAP, PRECOPY_CONVERGED, REJOIN_DELAY};

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for every backup's `Welcome`, to choose between quick resyncs and a full sync.
    Start,
    /// Pre-copy round `round` is next, while the guest runs.
    PreCopy {
        round: u32,
        last_pages: Option<usize>,
    },
    /// The next capture is the full sync's final pause (or the one-pause full sync).
    FinalSync,
    /// Protected: incremental epochs.
    Protected,
}

/// A reconnect attempt's result: (backup index, the new peer or why not).
pub(crate) type JoinResult = (usize, Result<Peer, PrimaryError>);

/// See the module docs.
pub(crate) struct Session<'a> {
    pub vm: &'a Arc<Vm>,
    pub cfg: &'a PrimaryConfig,
    pub stats: &'a Stats,
    pub st: &'a mut PrimaryState,
    pub peers: Vec<Peer>,
    pub phase: Phase,
    required: usize,
    /// This session's first consistent checkpoint: acks of earlier seqs (pre-copy rounds)
    /// release nothing.
    base: Option<u64>,
    /// Pre-copy rounds were sent in this session (the final capture is then incremental).
    precopied: bool,
    protected_logged: bool,
    sync_started: Instant,
    last_capture: tokio::time::Instant,
    last_pause: Duration,
    pub tick: tokio::time::Instant,
    epochs: epoch::EpochController,
    reconnecting: Vec<bool>,
    last_attempt: Vec<Instant>,
    generation: u64,
}

impl<'a> Session<'a> {
    pub fn new(
        vm: &'a Arc<Vm>,
        cfg: &'a PrimaryConfig,
        stats: &'a Stats,
        st: &'a mut PrimaryState,
        peers: Vec<Peer>,
    ) -> Self {
        let n = peers.len();
        Session {
            vm,
            cfg,
            stats,
            st,
            peers,
            phase: Phase::Start,
            required: cfg.required.clamp(1, cfg.backups.len().max(1)),
            base: None,
            precopied: false,
            protected_logged: false,
            sync_started: Instant::now(),
            last_capture: tokio::time::Instant::now(),
            last_pause: Duration::ZERO,
            tick: tokio::time::Instant::now(),
            epochs: epoch::EpochController::new(cfg.epoch, cfg.min_epoch, cfg.max_output_delay),
            reconnecting: vec![false; n],
            // The first attempts go at once.
            last_attempt: vec![
                Instant::now()
                    .checked_sub(REJOIN_DELAY)
                    .unwrap_or_else(Instant::now);
                n
            ],
            generation: 0,
        }
    }

    /// Every backup that gates the next step has accepted the session (and, to start it, at
    /// least `required` have: the others join when they come).
    pub fn all_ready(&self) -> bool {
        let start = self.phase == Phase::Start;
        let ready = self
            .peers
            .iter()
            .filter(|p| p.alive() && p.sender.is_ready())
            .count();
        self.peers
            .iter()
            .filter(|p| p.active() || (start && p.alive()))
            .all(|p| p.sender.is_ready())
            && (!start || ready >= self.required)
    }

    fn idle(&self) -> bool {
        self.peers
            .iter()
            .filter(|p| p.active())
            .all(|p| p.sender.in_flight() == 0)
    }

    /// The earliest protocol timer.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.peers
            .iter()
            .filter(|p| p.alive())
            .filter_map(|p| p.sender.poll_timeout())
            .min()
            .map(tokio::time::Instant::from_std)
    }

    /// When the loop should act next (None: only input wakes it).
    pub fn wake(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        match self.phase {
            Phase::Start | Phase::FinalSync => Some(now),
            // Pre-copy rounds go one at a time, each as soon as the previous one is acknowledged.
            Phase::PreCopy { .. } if self.idle() => Some(now),
            Phase::PreCopy { .. } => None,
            // Early checkpoint (COLO-style): output of this epoch is waiting, so end the epoch
            // now rather than at `tick` — at once if nothing is in flight, else (pipelined)
            // once `early_gap` has passed since the last capture, leaving the guest time to run.
            Phase::Protected if self.cfg.early_checkpoints && self.vm.output_waiting() => {
                let gap = EARLY_MIN_GAP.max(self.last_pause * 4);
                match self.idle() {
                    true => Some(now),
                    false => Some(self.tick.min(self.last_capture + gap)),
                }
            }
            Phase::Protected => Some(self.tick),
        }
    }

    /// Connects backups that are not connected (first connections, and failed or dropped
    /// backups once a second) in the background; they join the session when they welcome it.
    pub fn spawn_rejoins(
        &mut self,
        ep: &quinn::Endpoint,
        tx: &FrameTx,
        join_tx: &tokio::sync::mpsc::Sender<JoinResult>,
    ) {
        for i in 0..self.peers.len() {
            if self.peers[i].alive()
                || self.reconnecting[i]
                || self.last_attempt[i].elapsed() < REJOIN_DELAY
            {
                continue;
            }
            self.reconnecting[i] = true;
            self.last_attempt[i] = Instant::now();
            self.generation += 1;
            let (ep, cfg, tx, jt) = (ep.clone(), self.cfg.clone(), tx.clone(), join_tx.clone());
            let (addr, name) = cfg.backups[i].clone();
            let ids = (self.generation, self.st.history.id);
            tokio::spawn(async move {
                let r = peer::connect(&ep, &cfg, (addr, &name), i, ids, &tx).await;
                let _ = jt.send((i, r)).await;
            });
        }
    }

    /// A reconnect attempt finished.
    pub fn on_join(&mut self, (i, r): JoinResult) {
        self.reconnecting[i] = false;
        match r {
            Ok(p) => {
                tracing::info!(
                    "backup {} reconnected; it joins the running session",
                    p.name
                );
                self.peers[i] = p;
            }
            Err(e) => tracing::info!("backup {} still unreachable: {e}", self.peers[i].name),
        }
    }

    /// How a backup that just welcomed us is brought up to date.
    fn join_for(&self, p: &Peer) -> Join {
        match p.committed {
            Some(c) if p.version >= RESYNC_VERSION && self.st.history.can_resync(&c) => {
                Join::Resync(c.seq)
            }
            _ => Join::Full,
        }
    }

    /// Handles the protocol's events of every backup.
    pub fn poll_events(&mut self) {
        for i in 0..self.peers.len() {
            while let Some(e) = self.peers[i].sender.poll_event() {
                self.on_event(i, e);
            }
        }
    }

    fn on_event(&mut self, i: usize, e: SenderEvent) {
        match e {
            SenderEvent::Ready { version, committed } => {
                let p = &mut self.peers[i];
                p.version = version;
                p.committed = committed;
                let pos = committed.map_or("nothing".into(), |c| {
                    format!(
                        "checkpoint {} of term {} (history {:x})",
                        c.seq, c.term, c.history
                    )
                });
                tracing::info!(
                    "backup {} ready (protocol v{version}); it holds {pos}",
                    p.name
                );
                if self.phase != Phase::Start {
                    let j = self.join_for(&self.peers[i]);
                    self.peers[i].join = j;
                }
            }
            SenderEvent::Acked { epoch, latency } => {
                self.peers[i].acked = Some(epoch);
                self.stats
                    .ack_latency_us
                    .store(latency.as_micros() as u64, Ordering::Relaxed);
            }
            SenderEvent::Resending { epoch, reason } => tracing::warn!(
                "backup {}: resending from checkpoint {epoch}: {reason}",
                self.peers[i].name
            ),
            SenderEvent::Failed(e) => {
                tracing::error!("backup {} lost: {e}", self.peers[i].name);
                self.peers[i].failed = Some(e.to_string());
            }
        }
    }

    /// Every backup has welcomed us: quick resyncs if all can have one, else a full sync.
    fn choose_sync(&mut self) {
        // Backups still connecting (or whose Welcome is pending) join later, as rejoins do.
        let joins: Vec<Join> = self
            .peers
            .iter()
            .filter(|p| p.alive() && p.sender.is_ready())
            .map(|p| self.join_for(p))
            .collect();
        if !joins.is_empty() && joins.iter().all(|j| matches!(j, Join::Resync(_))) {
            for p in self
                .peers
                .iter_mut()
                .filter(|p| p.alive() && p.sender.is_ready())
            {
                if let Some(c) = p.committed {
                    p.join = Join::Resync(c.seq);
                }
            }
            tracing::info!("every backup holds a checkpoint of this history: quick resync");
            self.sync_started = Instant::now();
            self.phase = Phase::Protected;
            self.tick = tokio::time::Instant::now();
            return;
        }
        for p in self
            .peers
            .iter_mut()
            .filter(|p| p.alive() && p.sender.is_ready())
        {
            p.join = Join::InStep;
        }
        self.stats.sync_rounds.store(0, Ordering::Relaxed);
        self.phase = match self.cfg.precopy_rounds {
            0 => Phase::FinalSync,
            _ => Phase::PreCopy {
                round: 0,
                last_pages: None,
            },
        };
        self.sync_started = Instant::now();
    }

    /// The loop's timer fired (and every gating backup is ready).
    pub async fn on_wake(&mut self) -> Result<(), PrimaryError> {
        let r = match self.phase {
            Phase::Start => {
                self.choose_sync();
                Ok(())
            }
            Phase::PreCopy { round, last_pages } => self.precopy_round(round, last_pages).await,
            Phase::FinalSync | Phase::Protected => self.epoch_end().await,
        };
        if matches!(r, Err(PrimaryError::Capture(_))) {
            // A capture that failed half way may have taken dirty bits or disk writes it never
            // recorded: backups are fully synced from now on, never resynced over the gap.
            self.st.history.forget_changes();
        }
        r
    }

    /// One pre-copy round of a full sync, while the guest runs.
    async fn precopy_round(
        &mut self,
        round: u32,
        last_pages: Option<usize>,
    ) -> Result<(), PrimaryError> {
        let cap = if round == 0 {
            let cap = self.vm.precopy_start()?;
            self.st.shadow.clear();
            cap
        } else {
            self.vm.precopy_pass()?
        };
        let n = cap.pages.len();
        let seq = self.st.history.take_seq();
        self.record(seq, &cap);
        let cp = self.st.shadow.checkpoint(seq, Kind::PreCopy, &cap);
        let bytes = cp.data_bytes();
        let live = self.peers.iter().filter(|p| p.alive()).count() as u64;
        self.stats
            .sync_queued_bytes
            .fetch_add(bytes * live, Ordering::Relaxed);
        for p in self.peers.iter_mut().filter(|p| p.alive()) {
            p.sender.send_checkpoint(Instant::now(), cp.clone())?;
        }
        tracing::info!(
            "pre-copy round {round} (checkpoint {seq}): {n} pages, {} disk bytes, {:.1} MiB queued, {:.0} ms into the sync",
            cp.disk.iter().map(|d| d.1.len()).sum::<usize>(),
            bytes as f64 / (1 << 20) as f64,
            self.sync_started.elapsed().as_secs_f64() * 1e3,
        );
        self.precopied = true;
        self.stats
            .epochs
            .store(self.st.history.next_seq(), Ordering::Relaxed);
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
                last_pages: Some(n),
            },
        };
        for p in self.peers.iter_mut().filter(|p| p.alive()) {
            if let Err(e) = p.flush_counting(Some(&self.stats.sync_sent_bytes)).await {
                p.failed = Some(e.to_string());
            }
        }
        Ok(())
    }

    /// Records what checkpoint `seq` (captured as `cap`) changed, for later quick resyncs.
    fn record(&mut self, seq: u64, cap: &EpochCapture) {
        let h = &mut self.st.history;
        match &cap.changes {
            // A full capture lists every non-zero page; what changed is in `changes`. Pre-copy
            // round 0 (no state) also copies every page it lists, over a restarted tracking.
            Some(ch) => {
                h.record(seq, &ch.dirty, &ch.disk);
                if cap.state.is_empty() {
                    h.record(seq, &cap.pages, &cap.disk);
                }
            }
            None => h.record(seq, &cap.pages, &cap.disk),
        }
    }

    /// A backup whose window stays full would gate everyone: drop it once it has been behind
    /// for `drop_after` while enough others remain (it rejoins, by quick resync). A short
    /// hiccup (a slow fsync, a scheduling stall) only extends the epoch.
    async fn drop_slow(&mut self) {
        let now = Instant::now();
        let window = self.cfg.window;
        for p in self.peers.iter_mut().filter(|p| p.active()) {
            let behind = p.sender.in_flight() as u64 >= window;
            p.behind_since = match (behind, p.behind_since) {
                (false, _) => None,
                (true, None) => Some(now),
                (true, since) => since,
            };
        }
        let live = self.peers.iter().filter(|p| p.active()).count();
        if live <= self.required {
            return;
        }
        let after = self.cfg.drop_after;
        if let Some(p) = self
            .peers
            .iter_mut()
            .find(|p| p.active() && p.behind_since.is_some_and(|t| now - t >= after))
        {
            tracing::warn!(
                "backup {} is not keeping up (window full for {} ms); dropping it",
                p.name,
                after.as_millis()
            );
            p.sender.close(now, "not keeping up");
            let _ = p.flush().await;
            p.failed = Some("not keeping up".into());
            p.behind_since = None;
        }
    }

    /// The end of an epoch: capture and send a checkpoint (if the window allows), then
    /// schedule the next tick.
    async fn epoch_end(&mut self) -> Result<(), PrimaryError> {
        let now = tokio::time::Instant::now();
        // Before `tick` only an early checkpoint wakes us (`wake` checked its condition).
        let early = self.phase == Phase::Protected && now < self.tick;
        self.drop_slow().await;
        let mut captured = None;
        if self
            .peers
            .iter()
            .filter(|p| p.active())
            .all(|p| p.sender.can_send())
        {
            captured = Some(self.capture_and_send()?);
        }
        if early {
            // The epoch was cut short for waiting output: start the next one now.
            self.tick = tokio::time::Instant::now() + self.epochs.current();
        } else {
            let len = self.epochs.update(captured);
            self.stats
                .epoch_us
                .store(len.as_micros() as u64, Ordering::Relaxed);
            // Ticks are scheduled from the previous tick, not from now: the timer's overshoot
            // (up to 1 ms) does not accumulate, and a tick that is already due fires at once.
            // Only after falling far behind (window full, a stall) does it restart from now.
            self.tick += len;
            let now = tokio::time::Instant::now();
            if self.tick + len * 4 < now {
                self.tick = now + len;
            }
        }
        Ok(())
    }

    /// One pause: the checkpoint for the backups in step, and the full sync or quick resync of
    /// any backup joining at it. Returns the number of pages captured.
    fn capture_and_send(&mut self) -> Result<usize, PrimaryError> {
        let protected = self.phase == Phase::Protected;
        let one_pause_sync = self.phase == Phase::FinalSync && !self.precopied;
        let full_join = protected
            && self
                .peers
                .iter()
                .any(|p| p.ready_to_join() && p.join == Join::Full);
        let resync_from = self
            .peers
            .iter()
            // Backups join only a protected session (during a full sync they wait for its end).
            .filter(|p| protected && p.ready_to_join())
            .filter_map(|p| match p.join {
                Join::Resync(f) => Some(f),
                _ => None,
            })
            .min();
        let kind = match one_pause_sync || full_join {
            true => CaptureKind::Full,
            false => CaptureKind::Incremental,
        };
        let ranges = resync_from.map_or(Vec::new(), |f| self.st.history.disk_since(f));
        let cap = self.vm.capture_epoch_with(kind, &ranges)?;
        let seq = self.st.history.take_seq();
        let cp = if one_pause_sync {
            self.st.shadow.checkpoint(seq, Kind::Sync, &cap)
        } else if full_join {
            self.st.shadow.incremental_from_full(seq, &cap)
        } else {
            self.st.shadow.checkpoint(seq, Kind::Incremental, &cap)
        };
        self.record(seq, &cap);
        self.st.history.closes.insert(seq, cap.epoch);
        let now = Instant::now();
        for p in self.peers.iter_mut().filter(|p| p.active()) {
            p.send(now, &cp)?;
        }
        if protected {
            self.send_joins(seq, &cap, full_join)?;
        }
        if self.phase == Phase::FinalSync {
            let live = self.peers.iter().filter(|p| p.alive()).count() as u64;
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
        self.stats.last_pause_us.store(pause, Ordering::Relaxed);
        self.stats.max_pause_us.fetch_max(pause, Ordering::Relaxed);
        self.stats.record_pause(pause);
        self.stats
            .pages
            .fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(cp.data_bytes(), Ordering::Relaxed);
        self.stats.epochs.store(seq + 1, Ordering::Relaxed);
        self.last_capture = tokio::time::Instant::now();
        self.last_pause = cap.pause;
        tracing::trace!(
            "checkpoint {seq}: {} pages, pause {} µs",
            cap.pages.len(),
            cap.pause.as_micros()
        );
        Ok(cap.pages.len())
    }

    /// Sends the backups joining at checkpoint `seq` their full sync (from the full capture)
    /// or quick resync; from the next checkpoint on they are in step.
    fn send_joins(
        &mut self,
        seq: u64,
        cap: &EpochCapture,
        full_join: bool,
    ) -> Result<(), ProtocolError> {
        let now = Instant::now();
        let sync = full_join.then(|| self.st.shadow.sync_for_joining(seq, cap));
        for i in 0..self.peers.len() {
            if !self.peers[i].ready_to_join() {
                continue;
            }
            let cp = match (self.peers[i].join, &sync) {
                (Join::Full, Some(s)) => s.clone(),
                (Join::Resync(from), _) => {
                    let gfns = self.st.history.pages_since(from);
                    self.st.shadow.resync(seq, from, &gfns, cap)
                }
                _ => continue,
            };
            let p = &mut self.peers[i];
            tracing::info!(
                "backup {} joins at checkpoint {seq}: {} of {} pages, {:.1} MiB, in a {} µs pause",
                p.name,
                match cp.kind {
                    Kind::Resync { from } => format!("quick resync from checkpoint {from}"),
                    _ => "full sync".to_string(),
                },
                cp.pages.len(),
                cp.data_bytes() as f64 / (1 << 20) as f64,
                cap.pause.as_micros()
            );
            p.sender.send_checkpoint(now, cp)?;
            p.join = Join::InStep;
        }
        Ok(())
    }

    /// Releases the output of every checkpoint enough backups acknowledged.
    pub fn release(&mut self) {
        let Some(c) = releasable(&self.peers, self.required) else {
            return;
        };
        self.stats.acked.store(c + 1, Ordering::Relaxed);
        // Acks of pre-copy rounds (before the session's first consistent checkpoint) mean the
        // backups hold no consistent image yet: they release nothing.
        if self.base.is_none_or(|b| c < b) {
            return;
        }
        let h = &mut self.st.history;
        let e = h.closes.range(..=c).next_back().map(|(_, e)| *e);
        h.closes = h.closes.split_off(&(c + 1));
        let Some(e) = e.filter(|e| h.released.is_none_or(|r| *e > r)) else {
            return;
        };
        if !self.protected_logged {
            self.protected_logged = true;
            tracing::info!(
                "protected: checkpoint {c} acknowledged {:.0} ms after the session's sync began",
                self.sync_started.elapsed().as_secs_f64() * 1e3
            );
            self.stats.protected.store(true, Ordering::Relaxed);
        }
        let n = self.vm.release_output(e);
        tracing::trace!("checkpoint {c} acknowledged: {n} frames of output epoch {e} released");
        h.released = Some(e);
        self.stats
            .released_frames
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Fails the session if fewer than `required` backups remain (while it starts, backups
    /// still being connected count).
    pub fn check_live(&self) -> Result<(), PrimaryError> {
        let start = self.phase == Phase::Start;
        let live = (0..self.peers.len())
            .filter(|&i| self.peers[i].alive() || (start && self.reconnecting[i]))
            .count();
        if live >= self.required {
            return Ok(());
        }
        let why: Vec<String> = self
            .peers
            .iter()
            .filter_map(|p| p.failed.as_ref().map(|f| format!("{}: {f}", p.name)))
            .collect();
        Err(PrimaryError::BackupLost(why.join("; ")))
    }

    /// Sends what the protocol queued for every live backup.
    pub async fn flush_all(&mut self) {
        let syncing = self.phase != Phase::Protected || !self.protected_logged;
        let counter = syncing.then_some(&self.stats.sync_sent_bytes);
        for p in self.peers.iter_mut().filter(|p| p.alive()) {
            if let Err(e) = p.flush_counting(counter).await {
                p.failed = Some(e.to_string());
            }
        }
    }

    /// Says goodbye to every live backup.
    pub async fn close_all(&mut self, why: &str) {
        for p in self.peers.iter_mut().filter(|p| p.alive()) {
            p.sender.close(Instant::now(), why);
            let _ = p.flush().await;
        }
    }
}
