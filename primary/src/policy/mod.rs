//! The primary's replication policy as a state machine without I/O, in the shape of the
//! protocol crate (quinn-proto style): inputs in (`handle_*`), commands, frames and a timer out
//! (`poll_command`, `poll_transmit`, `poll_timeout`), time passed in. The async loop in
//! `lib.rs` only executes commands (connect, capture, release, close) and moves frames; the
//! seeded simulations in `tests/policy_sim.rs` drive the same code with a simulated guest,
//! simulated backups and virtual time.
//!
//! What it decides:
//! - **Connections**: every backup is connected in the background and reconnected once a
//!   second after a failure; a session starts once `required` backups have welcomed it, and the
//!   others join the running session when they come.
//! - **How a backup is brought up to date**, from the committed position in its `Welcome`: at
//!   session start, if every ready backup's position is a checkpoint of this history and term
//!   ([`History::can_resync`]), each gets a **quick resync** at the first capture ([`Kind::Resync`]:
//!   the pages and disk chunks changed since its position, and the state); otherwise all get a
//!   **full sync** (pre-copy rounds while the guest runs, then one short pause), which the backup
//!   builds in a side image — except that when some can resync and the guest is small enough
//!   for one pause (`MAX_RESYNC`), those resync and the others get a full sync from the same
//!   first capture. A backup joining a running session gets a quick resync if it can, else a
//!   full sync from a full capture.
//! - **Epochs**: when to capture (the adaptive tick, or early when guest output waits), with at
//!   most `window` checkpoints in flight per backup (a full window extends the epoch).
//! - **Output commit**: guest output of the epochs a checkpoint closed is released once
//!   `required` backups acknowledged it; acknowledgements of pre-copy rounds release nothing.
//! - **Slow backups**: one whose window stays full for `drop_after` while more than `required`
//!   others keep up is dropped (it rejoins by quick resync).
//! - **Fencing**: a backup that refuses the session for a stale term (or welcomes it with a
//!   committed image of a newer term) means a newer primary exists: the policy releases nothing
//!   more and reports [`Policy::fenced`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::message::Position;
use protocol::{Sender, SenderConfig};
use vmm::CaptureKind;

use crate::{epoch, PrimaryState, Stats};
use crate::{EARLY_MIN_GAP, REJOIN_DELAY};

/// The most a quick resync may carry: it is one checkpoint, staged whole and applied in one go
/// by the backup (whose loop stops answering meanwhile); beyond it a full sync is sent, pre-copied
/// in 64 MiB slices.
const MAX_RESYNC: u64 = 256 << 20;

/// The most a quick resync may carry into a running session, where the alternative is a full
/// sync in one pause (half the receiver's 4 GiB staging bound).
const MAX_RESYNC_RUNNING: u64 = 2 << 30;

/// A stall at least this long is logged as a warning (a stop of the process, most likely);
/// shorter ones only at debug level (a busy host's scheduling, a CPU quota).
const LOUD_STALL: Duration = Duration::from_millis(250);

/// How long an unacknowledged checkpoint waits before it is resent (see `handle_connected`).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the policy needs to know (a part of [`crate::PrimaryConfig`]).
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Backup names (their index is the backup's number in commands and inputs).
    pub backups: Vec<String>,
    /// Backups that must acknowledge a checkpoint before its output is released.
    pub required: usize,
    /// Cluster id, VM id and term for the protocol.
    pub cluster_id: u64,
    /// VM id.
    pub vm_id: String,
    /// Term.
    pub term: u64,
    /// Data lanes per connection.
    pub lanes: u8,
    /// Checkpoints in flight per backup.
    pub window: u64,
    /// The protocol's silence timeout.
    pub idle_timeout: Duration,
    /// Epoch lengths: base, shortest, longest.
    pub epoch: (Duration, Duration, Duration),
    /// End epochs early when guest output waits.
    pub early_checkpoints: bool,
    /// Most pre-copy rounds of a full sync (0: one pause).
    pub precopy_rounds: u32,
    /// See the module docs.
    pub drop_after: Duration,
    /// Guest RAM in pages and disk bytes (to cut pre-copy round 0 in slices).
    pub guest: (u64, u64),
    /// Pages and disk bytes per slice of pre-copy round 0 ([`SLICE_PAGES`], [`SLICE_DISK`]).
    pub slice: (u64, u64),
    /// Use the data connections a backup offers ([`Command::OpenData`]).
    pub data_connections: bool,
    /// Copy an epoch's pages early ([`Command::PreCopyEpoch`]) after an epoch of at least
    /// this many pages ([`EPOCH_PRECOPY_MIN_PAGES`]); None: never.
    pub epoch_precopy: Option<usize>,
}

/// An epoch's early copy ([`Command::PreCopyEpoch`]) is asked for only after an epoch of at
/// least this many pages: below it the pause's copy is short anyway (~0.1 ms), and the early
/// harvest costs a pass over the dirty log while the guest runs.
pub const EPOCH_PRECOPY_MIN_PAGES: usize = 256;

/// The early copy runs this fraction of the epoch before its end (a quarter: the pages dirtied
/// in the last quarter are copied in the pause, the rest before).
pub const EPOCH_PRECOPY_LEAD: u32 = 4;

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Connect backup `i`; report [`Policy::handle_connected`] or
    /// [`Policy::handle_connect_failed`].
    Connect(usize),
    /// A pre-copy pass while the guest runs; report [`Policy::handle_precopy`]. Round 0 goes
    /// in slices (`Vm::precopy_start` for the first, which restarts tracking, then
    /// `Vm::precopy_slice`), each a checkpoint of its own, so nothing ever holds a whole big
    /// guest; later rounds copy what was dirtied meanwhile (`Vm::precopy_pass`).
    PreCopy {
        /// Round number within this full sync.
        round: u32,
        /// For round 0: the slice (guest frames, disk bytes), and whether it is the first.
        slice: Option<Slice>,
    },
    /// Pause and capture (`Vm::capture_epoch_with`); report [`Policy::handle_capture`].
    Capture {
        /// Full or incremental.
        kind: CaptureKind,
        /// Disk ranges to read in the same pause (quick resyncs).
        disk_ranges: Vec<(u64, u64)>,
    },
    /// Hold guest output from now on if it is not held yet (`Vm::hold_output_from_start`):
    /// asked for before every capture, so a VM that ran unprotected (the failover manager's
    /// grant) holds every frame the guest sends after the first capture that carries state
    /// (output sent before is in that state; pre-copy rounds carry none). A no-op for a VM
    /// that holds output already.
    HoldOutput,
    /// Release guest output of every epoch up to this one.
    Release(u64),
    /// Close the connection of backup `i` (once what was queued for it is sent).
    Close(usize),
    /// Copy the pages this epoch dirtied so far while the guest runs (`Vm::precopy_epoch`),
    /// so that its capture's pause copies only those dirtied since; nothing to report.
    PreCopyEpoch,
    /// Open data connections to backup `i` at these ports of its address (its `Welcome`
    /// offered them) and spread its data streams over them too; a port that cannot be reached
    /// is left out (its streams stay on the session's connection).
    OpenData {
        /// The backup.
        backup: usize,
        /// Its data ports.
        ports: Vec<u16>,
    },
}

/// One slice of pre-copy round 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// Guest frame numbers to copy (the non-zero pages among them).
    pub pages: std::ops::Range<u64>,
    /// Disk bytes to copy (the non-zero 64 KiB chunks among them).
    pub disk: std::ops::Range<u64>,
    /// The first slice (tracking restarts with it).
    pub first: bool,
}

/// Guest pages per slice of pre-copy round 0 (64 MiB).
pub const SLICE_PAGES: u64 = 16 << 10;
/// Disk bytes per slice of pre-copy round 0.
pub const SLICE_DISK: u64 = 64 << 20;

/// Where a backup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Not connected, or its `Welcome` has not arrived.
    Welcome,
    /// Gets every checkpoint of the session.
    InStep,
    /// Needs a quick resync from its committed seq, at the next capture.
    Resync(u64),
    /// Needs a full sync, from a full capture.
    Full,
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `required` backups to welcome the session.
    Start,
    /// Pre-copy round `round` (slice `slice` of it, for round 0) is next.
    PreCopy {
        /// The round.
        round: u32,
        /// The next slice of round 0.
        slice: u64,
        /// Pages the previous round found.
        last_pages: Option<usize>,
        /// Pages this round found so far.
        pages: usize,
    },
    /// The next capture ends the full sync (or is the one-pause full sync).
    FinalSync,
    /// Protected: incremental epochs.
    Protected,
}

/// One backup as the policy sees it.
#[derive(Debug)]
pub struct Backup {
    /// Its name (in its certificate).
    pub name: String,
    /// The protocol's sender for the current connection (None: not connected).
    pub sender: Option<Sender>,
    /// Highest seq it acknowledged in this connection.
    pub acked: Option<u64>,
    /// Negotiated protocol version.
    pub version: u16,
    /// Where it stands.
    pub join: Join,
    /// Its committed position, from its `Welcome`.
    pub committed: Option<Position>,
    /// Since when its window has been full.
    behind_since: Option<Instant>,
    connecting: bool,
    last_attempt: Option<Instant>,
}

impl Backup {
    fn new(name: &str) -> Self {
        Backup {
            name: name.to_string(),
            sender: None,
            acked: None,
            version: 0,
            join: Join::Welcome,
            committed: None,
            behind_since: None,
            connecting: false,
            last_attempt: None,
        }
    }

    /// Connected and its session not failed.
    pub fn alive(&self) -> bool {
        self.sender.as_ref().is_some_and(|s| !s.is_failed())
    }

    fn ready(&self) -> bool {
        self.sender.as_ref().is_some_and(|s| s.is_ready())
    }

    /// Alive and in step.
    pub fn active(&self) -> bool {
        self.alive() && self.join == Join::InStep
    }

    fn ready_to_join(&self) -> bool {
        self.ready() && matches!(self.join, Join::Resync(_) | Join::Full)
    }
}

/// A capture the policy asked for, and why.
#[derive(Debug, Clone, Copy)]
struct Plan {
    one_pause_sync: bool,
    full_join: bool,
    early: bool,
}

/// See the module docs.
pub struct Policy<'a> {
    cfg: PolicyConfig,
    st: &'a mut PrimaryState,
    stats: Arc<Stats>,
    /// The backups, by index.
    pub backups: Vec<Backup>,
    /// Where the session stands.
    pub phase: Phase,
    commands: VecDeque<Command>,
    /// A pre-copy pass or capture was requested and not reported yet.
    pending: Option<Plan>,
    /// This session's first consistent checkpoint.
    base: Option<u64>,
    precopied: bool,
    protected_logged: bool,
    sync_started: Instant,
    last_capture: Instant,
    last_pause: Duration,
    tick: Instant,
    epochs: epoch::EpochController,
    /// Pages of the last capture, and whether this epoch's early copy was asked for.
    epoch_pages: (usize, bool),
    output_waiting: bool,
    failed: Option<String>,
    fenced: Option<Option<u64>>,
    /// After a stall of this process: only acknowledgements of checkpoints from this seq on
    /// release output ([`Policy::handle_stall`]).
    fresh_from: Option<u64>,
}

impl<'a> Policy<'a> {
    /// A new session of the history in `st`.
    pub fn new(
        cfg: PolicyConfig,
        st: &'a mut PrimaryState,
        stats: Arc<Stats>,
        now: Instant,
    ) -> Self {
        let backups = cfg.backups.iter().map(|n| Backup::new(n)).collect();
        let (base, min, max) = cfg.epoch;
        Policy {
            st,
            stats,
            backups,
            phase: Phase::Start,
            commands: VecDeque::new(),
            pending: None,
            base: None,
            precopied: false,
            protected_logged: false,
            sync_started: now,
            last_capture: now,
            last_pause: Duration::ZERO,
            tick: now,
            epochs: epoch::EpochController::new(base, min, max),
            epoch_pages: (0, false),
            output_waiting: false,
            failed: None,
            fenced: None,
            fresh_from: None,
            cfg,
        }
    }

    fn required(&self) -> usize {
        self.cfg.required.clamp(1, self.backups.len().max(1))
    }

    /// The next command for the loop.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next frame for backup `i`: (lane, bytes); `now` is when it leaves.
    pub fn poll_transmit(&mut self, i: usize, now: Instant) -> Option<(u8, Vec<u8>)> {
        self.backups.get_mut(i)?.sender.as_mut()?.poll_transmit(now)
    }

    /// The lane of backup `i`'s next frame, if one waits.
    pub fn next_lane(&self, i: usize) -> Option<u8> {
        self.backups
            .get(i)
            .and_then(|b| b.sender.as_ref())
            .and_then(|s| s.next_lane())
    }

    /// The seq the next checkpoint will have.
    pub fn next_seq(&self) -> u64 {
        self.st.history.next_seq()
    }

    /// Why the session failed (too few backups remain), if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// A backup holds a newer term than ours (the term, if it said): this primary is fenced.
    /// Nothing is released from then on.
    pub fn fenced(&self) -> Option<Option<u64>> {
        self.fenced
    }

    /// Says goodbye to every connected backup (the loop flushes, then drops the links).
    pub fn close_all(&mut self, now: Instant, why: &str) {
        for b in self.backups.iter_mut().filter(|b| b.alive()) {
            if let Some(s) = b.sender.as_mut() {
                s.close(now, why);
            }
        }
    }

    /// This process was stopped (or not scheduled) for `gap`
    /// ([`crate::stall`]): a backup may have been promoted meanwhile, and acknowledgements it
    /// sent before that may still wait in the queues. So output is released only on
    /// acknowledgements of checkpoints captured from now on (one pending now may have paused
    /// before the stall, so not that one either): a promoted backup refuses those, which fences
    /// this primary.
    pub fn handle_stall(&mut self, gap: Duration) {
        let fresh = self.next_seq() + u64::from(self.pending.is_some());
        if self.fresh_from.is_none_or(|f| f < fresh) {
            self.fresh_from = Some(fresh);
        }
        // A release given before the stall and not carried out yet would leave now, its lease
        // counted from this input: it waits too (a later release covers its frames).
        let before = self.commands.len();
        self.commands.retain(|c| !matches!(c, Command::Release(_)));
        if self.commands.len() < before {
            self.st.history.released = None;
        }
        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        // (Short ones are mostly a busy host's scheduling: counted, not shouted.)
        if gap >= LOUD_STALL {
            tracing::warn!(
                "this process stalled for {gap:?}: output waits for checkpoint {fresh} \
                 (acknowledgements from before the stall release nothing)"
            );
        } else {
            tracing::debug!("stalled for {gap:?}: output waits for checkpoint {fresh}");
        }
    }

    /// The guest has output waiting for a checkpoint (or not any more).
    pub fn set_output_waiting(&mut self, waiting: bool) {
        self.output_waiting = waiting;
    }

    /// Backup `i` is connected (a new connection): its session starts with `Hello`.
    pub fn handle_connected(&mut self, i: usize, history: u64, now: Instant) {
        let cfg = &self.cfg;
        let mut scfg = SenderConfig::new(cfg.cluster_id, &cfg.vm_id, cfg.term);
        scfg.history = history;
        scfg.lanes = cfg.lanes;
        scfg.window = cfg.window;
        scfg.idle_timeout = cfg.idle_timeout;
        // QUIC's streams are reliable: an acknowledgement is late because the backup is busy
        // (applying a big checkpoint), not lost. Resending then would only double the work;
        // a slow backup fills its window and is dropped by `drop_slow` instead. Refusals
        // (CRC, sequence, apply failed) still resend at once.
        scfg.ack_timeout = ACK_TIMEOUT;
        let mut sender = Sender::new(scfg);
        sender.start(now);
        let b = &mut self.backups[i];
        b.connecting = false;
        b.sender = Some(sender);
        b.acked = None;
        b.join = Join::Welcome;
        b.behind_since = None;
        tracing::info!("backup {} connected", b.name);
    }

    /// Connecting backup `i` failed.
    pub fn handle_connect_failed(&mut self, i: usize, why: &str) {
        let b = &mut self.backups[i];
        b.connecting = false;
        tracing::info!("backup {} unreachable: {why}", b.name);
        self.check_live();
    }

    /// A frame from backup `i`.
    pub fn handle_frame(&mut self, i: usize, bytes: &[u8], now: Instant) {
        let Some(s) = self.backups[i].sender.as_mut() else {
            return;
        };
        if let Err(e) = s.handle_frame(now, bytes) {
            tracing::warn!("frame from backup {}: {e}", self.backups[i].name);
        }
        self.after_input(now);
    }

    /// The connection of backup `i` failed.
    pub fn handle_link_error(&mut self, i: usize, why: &str, now: Instant) {
        self.fail_backup(i, why);
        self.after_input(now);
    }

    fn fail_backup(&mut self, i: usize, why: &str) {
        let b = &mut self.backups[i];
        if b.sender.take().is_some() {
            tracing::error!("backup {} lost: {why}", b.name);
            self.commands.push_back(Command::Close(i));
        }
        b.join = Join::Welcome;
        b.acked = None;
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut earliest = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        for b in &self.backups {
            earliest(b.sender.as_ref().and_then(|s| s.poll_timeout()));
            if !b.alive() && !b.connecting {
                earliest(Some(
                    b.last_attempt
                        .map_or(self.sync_started, |a| a + REJOIN_DELAY),
                ));
            }
        }
        if self.pending.is_none() && self.all_ready() {
            earliest(self.wake());
        }
        t
    }

    /// Timers: the protocol's, reconnects, epochs.
    pub fn handle_timeout(&mut self, now: Instant) {
        for b in self.backups.iter_mut() {
            if let Some(s) = b.sender.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
        }
        for i in 0..self.backups.len() {
            let b = &mut self.backups[i];
            let due = b.last_attempt.is_none_or(|a| now >= a + REJOIN_DELAY);
            if !b.alive() && !b.connecting && due {
                b.connecting = true;
                b.last_attempt = Some(now);
                self.commands.push_back(Command::Connect(i));
            }
        }
        if self.pending.is_none() && self.all_ready() && self.wake().is_some_and(|w| w <= now) {
            self.on_wake(now);
        }
        self.after_input(now);
    }

    /// Protocol events, releases and the live count, after any input.
    fn after_input(&mut self, now: Instant) {
        for i in 0..self.backups.len() {
            while let Some(e) = self.backups[i].sender.as_mut().and_then(|s| s.poll_event()) {
                self.on_event(i, e, now);
            }
        }
        self.note_behind(now);
        self.release();
        self.check_live();
    }

    /// Every backup that gates the next step has accepted the session (and, to start it, at
    /// least `required` have: the others join when they come).
    fn all_ready(&self) -> bool {
        let start = self.phase == Phase::Start;
        let ready = self.backups.iter().filter(|b| b.ready()).count();
        self.backups
            .iter()
            .filter(|b| b.active() || (start && b.alive()))
            .all(|b| b.ready())
            && (!start || ready >= self.required())
    }

    /// Every backup in step has room in its window for another checkpoint.
    fn room(&self) -> bool {
        self.backups
            .iter()
            .filter(|b| b.active())
            .all(|b| b.sender.as_ref().is_some_and(|s| s.can_send()))
    }

    fn idle(&self) -> bool {
        self.backups
            .iter()
            .filter(|b| b.active())
            .all(|b| b.sender.as_ref().is_none_or(|s| s.in_flight() == 0))
    }

    /// When the policy acts next (None: only input wakes it).
    fn wake(&self) -> Option<Instant> {
        // A full window waits for acknowledgements (input), not for time — but wakes to drop
        // a backup that stays behind too long.
        let full = matches!(self.phase, Phase::FinalSync | Phase::Protected) && !self.room();
        if full {
            return self.drop_deadline();
        }
        // Nobody to send a checkpoint to: no capture (the session fails or a backup comes).
        if self.phase == Phase::Protected && self.could_serve() == 0 {
            return None;
        }
        match self.phase {
            Phase::Start | Phase::FinalSync => Some(self.last_capture.min(self.tick)),
            // Pre-copy rounds go one at a time, each once the previous one is acknowledged.
            // Later slices of round 0 go as soon as every backup has room for one.
            Phase::PreCopy {
                round: 0, slice, ..
            } if slice > 0 && self.room() => Some(self.last_capture.min(self.tick)),
            Phase::PreCopy { .. } if self.idle() => Some(self.last_capture.min(self.tick)),
            Phase::PreCopy { .. } => None,
            // Early checkpoint (COLO-style): output of this epoch is waiting, so end the epoch
            // now rather than at `tick` — at once if nothing is in flight, else (pipelined)
            // once `early_gap` has passed since the last capture, leaving the guest time to run.
            Phase::Protected if self.cfg.early_checkpoints && self.output_waiting => {
                let gap = EARLY_MIN_GAP.max(self.last_pause * 4);
                match self.idle() {
                    true => Some(self.last_capture.min(self.tick)),
                    false => Some(self.tick.min(self.last_capture + gap)),
                }
            }
            Phase::Protected => Some(self.precopy_at().map_or(self.tick, |p| p.min(self.tick))),
        }
    }

    /// Whether guest output that starts waiting now would be captured at once: early
    /// checkpoints in a protected session, nothing in flight, room and nothing pending. The
    /// driver then arms the VM to pause at that output itself (`Vm::set_pause_at_output`), so
    /// the capture needs no kick.
    pub fn captures_on_output(&self) -> bool {
        self.cfg.early_checkpoints
            && self.phase == Phase::Protected
            && self.pending.is_none()
            && self.all_ready()
            && self.could_serve() > 0
            && self.room()
            && self.idle()
    }

    /// When this epoch's early copy is due, if it gets one: a protected session, the last
    /// epoch busy, no early checkpoint coming (output waiting), not asked for yet.
    fn precopy_at(&self) -> Option<Instant> {
        let early = self.cfg.early_checkpoints && self.output_waiting;
        let (pages, asked) = self.epoch_pages;
        let min = self.cfg.epoch_precopy?;
        if asked || early || pages < min {
            return None;
        }
        Some(self.tick - self.epochs.current() / EPOCH_PRECOPY_LEAD)
    }

    fn on_wake(&mut self, now: Instant) {
        match self.phase {
            Phase::Start => {
                self.choose_sync(now);
                // Act at once in the new phase.
                if self.all_ready() && self.wake().is_some_and(|w| w <= now) {
                    self.on_wake(now);
                }
            }
            Phase::PreCopy { round, slice, .. } => {
                self.pending = Some(Plan {
                    one_pause_sync: false,
                    full_join: false,
                    early: false,
                });
                let (sp, sd) = self.cfg.slice;
                let slice = (round == 0).then(|| Slice {
                    pages: slice * sp..(slice + 1) * sp,
                    disk: slice * sd..(slice + 1) * sd,
                    first: slice == 0,
                });
                self.commands.push_back(Command::PreCopy { round, slice });
            }
            Phase::Protected if now < self.tick && self.precopy_at().is_some_and(|p| p <= now) => {
                self.epoch_pages.1 = true;
                self.commands.push_back(Command::PreCopyEpoch);
            }
            Phase::FinalSync | Phase::Protected => self.epoch_end(now),
        }
    }

    /// The end of an epoch: ask for a capture if every backup in step has room, else extend.
    fn epoch_end(&mut self, now: Instant) {
        let early = self.phase == Phase::Protected && now < self.tick;
        self.drop_slow(now);
        if !self.room() {
            // (`wake` only gets here to drop a slow backup; the epoch goes on until acks come.)
            return;
        }
        self.refresh_joins();
        let protected = self.phase == Phase::Protected;
        let one_pause_sync = self.phase == Phase::FinalSync && !self.precopied;
        // Backups join only a protected session (during a full sync they wait for its end).
        let full_join = protected
            && self
                .backups
                .iter()
                .any(|b| b.ready_to_join() && b.join == Join::Full);
        let resync_from = self
            .backups
            .iter()
            .filter(|b| protected && b.ready_to_join())
            .filter_map(|b| match b.join {
                Join::Resync(f) => Some(f),
                _ => None,
            })
            .min();
        let kind = match one_pause_sync || full_join {
            true => CaptureKind::Full,
            false => CaptureKind::Incremental,
        };
        let disk_ranges = resync_from.map_or(Vec::new(), |f| self.st.history.disk_since(f));
        self.pending = Some(Plan {
            one_pause_sync,
            full_join,
            early,
        });
        // A VM that ran unprotected holds its output from the first capture that carries state
        // on (the driver enables it once, before this capture's pause): what it sent before is
        // part of that state, what it sends after waits for acknowledgements. Not from the
        // start of the sync: pre-copy rounds carry no state, and holding output through them
        // only made a promoted primary's clients wait for its new backup's whole sync.
        self.commands.push_back(Command::HoldOutput);
        self.commands
            .push_back(Command::Capture { kind, disk_ranges });
    }

    fn next_tick(&mut self, now: Instant, early: bool, captured: Option<usize>) {
        if early {
            // The epoch was cut short for waiting output: start the next one now.
            self.tick = now + self.epochs.current();
            return;
        }
        let len = self.epochs.update(captured);
        self.stats
            .epoch_us
            .store(len.as_micros() as u64, Ordering::Relaxed);
        // Ticks are scheduled from the previous tick, not from now: the timer's overshoot does
        // not accumulate. Only after falling far behind does it restart from now.
        self.tick += len;
        if self.tick + len * 4 < now {
            self.tick = now + len;
        }
        self.tick = self.tick.min(now + len);
    }

    /// A capture failed: no checkpoint; positions before now cannot be resynced any more
    /// (it may have taken changes it never recorded). The session fails.
    pub fn handle_capture_failed(&mut self, why: &str) {
        self.pending = None;
        self.st.history.forget_changes();
        self.failed = Some(format!("capture failed: {why}"));
    }
}

mod capture;
mod join;
mod precopy;
mod slow;

impl Drop for Policy<'_> {
    /// A session that ends with a capture asked for and not handed back (its dirty bits and disk
    /// writes are taken, not recorded), or in the middle of pre-copy round 0 (the shadow was
    /// cleared for the side image and is not whole yet), leaves the record of changes unable
    /// to vouch for earlier positions: the next session fully syncs the backups instead of
    /// resyncing them over a gap.
    fn drop(&mut self) {
        let mid_round0 = matches!(self.phase, Phase::PreCopy { round: 0, slice, .. } if slice > 0);
        if self.pending.is_some() || mid_round0 {
            tracing::info!("a full sync or capture was cut short: the next sync is a full one");
            self.st.history.forget_changes();
        }
    }
}
