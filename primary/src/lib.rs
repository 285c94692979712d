//! # primary — the protected VM's side of continuous replication
//!
//! The epoch loop ([`run`]): connect to the backups (QUIC, mutual TLS) and send the initial
//! sync, then every epoch pause the VM, capture dirty pages, disk writes and state, resume at
//! once, and stream the checkpoint; when the backups acknowledge checkpoint N, release the
//! guest's network output of the epoch N closed. If checkpoints pile up (window full) the epoch
//! is simply extended: nothing grows without bound, and output stays held.
//!
//! The initial sync is pre-copy (protocol v2): round 0 copies every non-zero page and the disk
//! while the guest runs, each later round the pages dirtied meanwhile, until the dirty set is
//! small or stops shrinking; then one short pause captures the rest with the state. Checkpoints
//! 0..k-1 are those rounds, checkpoint k the first consistent one; output held since boot is
//! released when k is acknowledged. Without pre-copy (`precopy_rounds = 0`, or a v1 backup)
//! checkpoint 0 is a full sync taken in one pause.

#![forbid(unsafe_code)]

pub mod encode;
pub mod epoch;
mod peer;

use peer::{releasable, Peer};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::message::Kind;
use protocol::page::EncodeOptions;
use protocol::{ProtocolError, SenderEvent};

use tokio::sync::watch;
use transport::certs::Identity;
use transport::{quic, QuicConfig};
use vmm::{CaptureKind, Vm};

/// Typed errors of the primary.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// Transport failure.
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    /// Protocol failure (including the backup refusing us).
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// Capturing an epoch failed.
    #[error("capture: {0}")]
    Capture(#[from] vmm::snapshot::SnapshotError),
    /// The backup went away.
    #[error("backup lost: {0}")]
    BackupLost(String),
}

/// Primary settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// Epoch length (the base of the adaptive length).
    pub epoch: Duration,
    /// Shortest epoch.
    pub min_epoch: Duration,
    /// Longest epoch: the cap on how long guest output may wait for its checkpoint.
    pub max_output_delay: Duration,
    /// Backups: address and the host name in its certificate.
    pub backups: Vec<(SocketAddr, String)>,
    /// Backups that must acknowledge a checkpoint before its output is released (1..=all).
    pub required: usize,
    /// This host's certificates.
    pub identity: Identity,
    /// Cluster id.
    pub cluster_id: u64,
    /// VM id.
    pub vm_id: String,
    /// Term (from the failover manager; 1 without one).
    pub term: u64,
    /// Data streams.
    pub lanes: u8,
    /// Unacknowledged checkpoints allowed in flight.
    pub window: u64,
    /// QUIC timers.
    pub quic: QuicConfig,
    /// Page encodings for incremental checkpoints.
    pub encode: EncodeOptions,
    /// End an epoch early when guest output is waiting: at once if no checkpoint is in flight,
    /// else after `EARLY_MIN_GAP` (and four pauses) since the last capture. Lower reply latency
    /// at the cost of more, smaller checkpoints; the CLI's default.
    pub early_checkpoints: bool,
    /// Most pre-copy rounds of the initial sync (0: a one-pause full sync).
    pub precopy_rounds: u32,
}

/// Shortest time between the start of two early checkpoints while one is in flight.
const EARLY_MIN_GAP: Duration = Duration::from_millis(1);

/// Shortest time between two attempts to reconnect a failed backup.
const REJOIN_DELAY: Duration = Duration::from_secs(1);

/// Pre-copy ends once a round finds at most this many dirty pages (1 MiB).
pub const PRECOPY_CONVERGED: usize = 256;

/// Counters, readable while the loop runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Checkpoints sent.
    pub epochs: AtomicU64,
    /// Highest acknowledged checkpoint + 1 (0: none).
    pub acked: AtomicU64,
    /// Last pause, µs.
    pub last_pause_us: AtomicU64,
    /// Longest pause, µs.
    pub max_pause_us: AtomicU64,
    /// Dirty pages sent.
    pub pages: AtomicU64,
    /// Checkpoint data bytes sent (encoded pages, disk, state).
    pub bytes: AtomicU64,
    /// Last ack latency, µs.
    pub ack_latency_us: AtomicU64,
    /// Frames of guest output released.
    pub released_frames: AtomicU64,
    /// Current epoch length, µs.
    pub epoch_us: AtomicU64,
    /// The most recent pauses, µs (at most `RECENT` of them).
    pub recent_pauses: std::sync::Mutex<std::collections::VecDeque<u32>>,
    /// Initial sync: rounds sent so far (pre-copy rounds plus the final capture).
    pub sync_rounds: AtomicU64,
    /// Initial sync: checkpoint bytes queued for the backups.
    pub sync_queued_bytes: AtomicU64,
    /// Initial sync: bytes handed to QUIC so far.
    pub sync_sent_bytes: AtomicU64,
    /// The initial sync is acknowledged: the VM is protected.
    pub protected: std::sync::atomic::AtomicBool,
}

/// Pauses kept for percentiles.
pub const RECENT: usize = 200;

impl Stats {
    fn record_pause(&self, us: u64) {
        if let Ok(mut r) = self.recent_pauses.lock() {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(us.min(u64::from(u32::MAX)) as u32);
        }
    }

    /// (p50, p99) of the recent pauses, µs.
    pub fn pause_percentiles(&self) -> (u32, u32) {
        let mut v: Vec<u32> = self
            .recent_pauses
            .lock()
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        if v.is_empty() {
            return (0, 0);
        }
        v.sort_unstable();
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (at(0.5), at(0.99))
    }
}

/// Clears the VM's output waker when the loop ends, however it ends.
struct WakerGuard<'a>(&'a Vm);

impl Drop for WakerGuard<'_> {
    fn drop(&mut self) {
        self.0.set_output_waker(None);
    }
}

/// Where the initial sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Pre-copy round `round` is next, while the guest runs.
    PreCopy {
        round: u32,
        last_pages: Option<usize>,
    },
    /// The next capture is the initial sync's final pause (or the one-pause full sync).
    FinalSync,
    /// Protected: incremental epochs.
    Protected,
}

/// Replicates `vm` (already started) to the backups until `stop` turns true or too few backups
/// remain to release output.
pub async fn run(
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PrimaryError> {
    let required = cfg.required.clamp(1, cfg.backups.len().max(1));
    let ep = quic::client(&cfg.identity, &cfg.quic)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let mut peers = Vec::new();
    for (i, (addr, name)) in cfg.backups.iter().enumerate() {
        peers.push(peer::connect(&ep, &cfg, (*addr, name), i, 0, &tx).await?);
    }
    // Failed backups are reconnected in the background and join the running session.
    let (join_tx, mut join_rx) =
        tokio::sync::mpsc::channel::<(usize, Result<Peer, PrimaryError>)>(16);
    let mut reconnecting = vec![false; peers.len()];
    let mut last_attempt = vec![Instant::now(); peers.len()];
    let mut generation = 0u64;
    let mut shadow = encode::Shadow::new(cfg.encode);
    let mut next_epoch = 0u64;
    // Checkpoints before `base` are pre-copy rounds (they close no output epoch).
    let mut base = 0u64;
    // Output epoch each unacknowledged checkpoint closed (the VM's output epochs run on across
    // sessions, so they are recorded, not derived from checkpoint numbers).
    let mut closes: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut phase = match cfg.precopy_rounds {
        0 => Phase::FinalSync,
        _ => Phase::PreCopy {
            round: 0,
            last_pages: None,
        },
    };
    let mut sync_started = Instant::now();
    let mut last_capture = tokio::time::Instant::now();
    let mut last_pause = Duration::ZERO;
    // The VM says when output starts waiting (early checkpoints end the epoch then).
    let output_waiting = Arc::new(tokio::sync::Notify::new());
    if cfg.early_checkpoints {
        let n = output_waiting.clone();
        vm.set_output_waker(Some(Arc::new(move || n.notify_one())));
    }
    let _waker = WakerGuard(&vm);
    let mut released: Option<u64> = None;
    let mut epochs = epoch::EpochController::new(cfg.epoch, cfg.min_epoch, cfg.max_output_delay);
    let mut tick = tokio::time::Instant::now();
    loop {
        let deadline = peers
            .iter()
            .filter(|p| p.alive())
            .filter_map(|p| p.sender.poll_timeout())
            .min()
            .map(tokio::time::Instant::from_std);
        // A backup joining the running session does not gate the others.
        let all_ready = peers
            .iter()
            .filter(|p| p.active())
            .all(|p| p.sender.is_ready());
        let idle = peers
            .iter()
            .filter(|p| p.active())
            .all(|p| p.sender.in_flight() == 0);
        if phase == Phase::Protected {
            for (i, p) in peers.iter().enumerate() {
                if p.alive() || reconnecting[i] || last_attempt[i].elapsed() < REJOIN_DELAY {
                    continue;
                }
                reconnecting[i] = true;
                last_attempt[i] = Instant::now();
                generation += 1;
                let (ep, cfg, tx, jt) = (ep.clone(), cfg.clone(), tx.clone(), join_tx.clone());
                let (addr, name) = cfg.backups[i].clone();
                let g = generation;
                tokio::spawn(async move {
                    let r = peer::connect(&ep, &cfg, (addr, &name), i, g, &tx).await;
                    let _ = jt.send((i, r)).await;
                });
            }
        }
        let wake = match phase {
            // Pre-copy rounds go one at a time, each as soon as the previous one is acknowledged.
            Phase::PreCopy { .. } if idle => Some(tokio::time::Instant::now()),
            Phase::PreCopy { .. } => None,
            Phase::FinalSync => Some(tokio::time::Instant::now()),
            // Early checkpoint (COLO-style): output of this epoch is waiting, so end the epoch
            // now rather than at `tick` — at once if nothing is in flight, else (pipelined)
            // once `early_gap` has passed since the last capture, leaving the guest time to run.
            Phase::Protected if cfg.early_checkpoints && vm.output_waiting() => {
                let gap = EARLY_MIN_GAP.max(last_pause * 4);
                match idle {
                    true => Some(tokio::time::Instant::now()),
                    false => Some(tick.min(last_capture + gap)),
                }
            }
            Phase::Protected => Some(tick),
        };
        tokio::select! {
            f = rx.recv() => match f {
                // Frames of a connection that has since been replaced are dropped.
                Some((i, g, _)) if peers[i].generation != g => {}
                Some((i, _, Ok(f))) => {
                    if let Err(e) = peers[i].sender.handle_frame(Instant::now(), &f) {
                        tracing::warn!("frame from backup {}: {e}", peers[i].name);
                    }
                }
                Some((i, _, Err(e))) => {
                    peers[i].failed = Some(e.to_string());
                }
                None => return Err(PrimaryError::BackupLost("every connection closed".into())),
            },
            Some((i, r)) = join_rx.recv() => {
                reconnecting[i] = false;
                match r {
                    Ok(mut p) => {
                        tracing::info!("backup {} reconnected; it joins with a new initial sync", p.name);
                        p.joining = true;
                        peers[i] = p;
                    }
                    Err(e) => tracing::info!("backup {} still unreachable: {e}", peers[i].name),
                }
            },
            // (A wake-up due now must not go through the timer: its resolution is 1 ms.)
            _ = async {
                match wake {
                    Some(w) if w <= tokio::time::Instant::now() => {}
                    Some(w) => tokio::time::sleep_until(w).await,
                    None => std::future::pending().await,
                }
            }, if all_ready => {
                if let Phase::PreCopy { round, last_pages } = phase {
                    if peers.iter().filter(|p| p.alive()).any(|p| p.version < protocol::message::PRECOPY_VERSION) {
                        tracing::info!("a backup speaks protocol v1: initial sync in one pause");
                        phase = Phase::FinalSync;
                        continue;
                    }
                    if round == 0 {
                        sync_started = Instant::now();
                    }
                    let cap = if round == 0 { vm.precopy_start()? } else { vm.precopy_pass()? };
                    let n = cap.pages.len();
                    let cp = shadow.checkpoint(next_epoch, Kind::PreCopy, &cap);
                    let bytes = cp.data_bytes();
                    let live = peers.iter().filter(|p| p.alive()).count() as u64;
                    stats.sync_queued_bytes.fetch_add(bytes * live, Ordering::Relaxed);
                    for p in peers.iter_mut().filter(|p| p.alive()) {
                        p.sender.send_checkpoint(Instant::now(), cp.clone())?;
                    }
                    tracing::info!(
                        "pre-copy round {round}: {n} pages, {} disk bytes, {:.1} MiB queued, {:.0} ms into the sync",
                        cp.disk.iter().map(|d| d.1.len()).sum::<usize>(),
                        bytes as f64 / (1 << 20) as f64,
                        sync_started.elapsed().as_secs_f64() * 1e3,
                    );
                    next_epoch += 1;
                    base = next_epoch;
                    stats.epochs.store(next_epoch, Ordering::Relaxed);
                    stats.sync_rounds.store(next_epoch, Ordering::Relaxed);
                    // Done after the last allowed round, or once the dirty set is small or
                    // stops shrinking by a tenth per round (the guest dirties as fast as we copy).
                    let converged = round + 1 >= cfg.precopy_rounds
                        || (round > 0
                            && (n <= PRECOPY_CONVERGED
                                || last_pages.is_some_and(|l| n * 10 > l * 9)));
                    phase = match converged {
                        true => Phase::FinalSync,
                        false => Phase::PreCopy { round: round + 1, last_pages: Some(n) },
                    };
                    for p in peers.iter_mut().filter(|p| p.alive()) {
                        if let Err(e) = p.flush_counting(Some(&stats.sync_sent_bytes)).await {
                            p.failed = Some(e.to_string());
                        }
                    }
                    continue;
                }
                let now = tokio::time::Instant::now();
                // Before `tick` only an early checkpoint wakes us (`wake` checked its condition).
                let early = phase == Phase::Protected && now < tick;
                let mut captured = None;
                let live = peers.iter().filter(|p| p.active()).count();
                // A backup whose window stays full would gate everyone: drop it while enough
                // others remain (it rejoins with a new initial sync).
                if live > required {
                    for p in peers.iter_mut().filter(|p| p.active() && !p.sender.can_send()) {
                        if p.sender.in_flight() as u64 >= cfg.window && live > required {
                            tracing::warn!("backup {} is not keeping up; dropping it", p.name);
                            p.sender.close(Instant::now(), "not keeping up");
                            let _ = p.flush().await;
                            p.failed = Some("not keeping up".into());
                            break;
                        }
                    }
                }
                if peers.iter().filter(|p| p.active()).all(|p| p.sender.can_send()) {
                    // A backup joining the session needs everything: this pause captures it
                    // all, and the others get the usual changes from the same capture.
                    let joining = phase == Phase::Protected && peers.iter().any(|p| p.ready_to_join());
                    let kind = if next_epoch == 0 || joining { CaptureKind::Full } else { CaptureKind::Incremental };
                    let cap = vm.capture_epoch(kind)?;
                    let cp = match (next_epoch, joining) {
                        (0, _) => shadow.checkpoint(0, Kind::Sync, &cap),
                        (_, true) => shadow.incremental_from_full(next_epoch, &cap),
                        _ => shadow.checkpoint(next_epoch, Kind::Incremental, &cap),
                    };
                    if joining {
                        let sync = shadow.sync_for_joining(0, &cap);
                        for p in peers.iter_mut().filter(|p| p.ready_to_join()) {
                            tracing::info!(
                                "backup {} joins at checkpoint {next_epoch}: initial sync of {} pages in a {} µs pause",
                                p.name,
                                cap.pages.len(),
                                cap.pause.as_micros()
                            );
                            p.joining = false;
                            p.offset = next_epoch;
                            p.sender.send_checkpoint(Instant::now(), sync.clone())?;
                        }
                    }
                    closes.insert(next_epoch, cap.epoch);
                    if phase == Phase::FinalSync {
                        let live = peers.iter().filter(|p| p.alive()).count() as u64;
                        stats.sync_queued_bytes.fetch_add(cp.data_bytes() * live, Ordering::Relaxed);
                        stats.sync_rounds.store(next_epoch + 1, Ordering::Relaxed);
                        tracing::info!(
                            "initial sync: final pause {} µs, {} pages, checkpoint {next_epoch} carries the state",
                            cap.pause.as_micros(),
                            cap.pages.len()
                        );
                        phase = Phase::Protected;
                    }
                    stats.last_pause_us.store(cap.pause.as_micros() as u64, Ordering::Relaxed);
                    stats.max_pause_us.fetch_max(cap.pause.as_micros() as u64, Ordering::Relaxed);
                    stats.record_pause(cap.pause.as_micros() as u64);
                    stats.pages.fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
                    stats.bytes.fetch_add(cp.data_bytes(), Ordering::Relaxed);
                    // Everyone in step gets it; a backup that joined with this very capture
                    // already has it as its initial sync.
                    let in_step = |p: &Peer| p.active() && (p.offset < next_epoch || next_epoch == 0);
                    for p in peers.iter_mut().filter(|p| in_step(p)) {
                        p.send(Instant::now(), &cp)?;
                    }
                    next_epoch += 1;
                    stats.epochs.store(next_epoch, Ordering::Relaxed);
                    captured = Some(cap.pages.len());
                    last_capture = tokio::time::Instant::now();
                    last_pause = cap.pause;
                    tracing::trace!(
                        "checkpoint {} ({}): {} pages, pause {} µs",
                        next_epoch - 1,
                        if early { "early" } else { "tick" },
                        cap.pages.len(),
                        cap.pause.as_micros()
                    );
                }
                if early {
                    // The epoch was cut short for waiting output: start the next one now.
                    tick = tokio::time::Instant::now() + epochs.current();
                } else {
                    let len = epochs.update(captured);
                    stats.epoch_us.store(len.as_micros() as u64, Ordering::Relaxed);
                    // Ticks are scheduled from the previous tick, not from now: the timer's
                    // overshoot (up to 1 ms) does not accumulate, and a tick that is already
                    // due fires at once. Only after falling far behind (window full, a stall)
                    // does the schedule restart from now.
                    tick += len;
                    let now = tokio::time::Instant::now();
                    if tick + len * 4 < now {
                        tick = now + len;
                    }
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                for p in peers.iter_mut().filter(|p| p.alive()) {
                    p.sender.handle_timeout(Instant::now());
                }
            }
            // Output started waiting: wake up to look again (see `wake`).
            _ = output_waiting.notified(), if cfg.early_checkpoints => {}
            _ = stop.changed() => {
                for p in peers.iter_mut().filter(|p| p.alive()) {
                    p.sender.close(Instant::now(), "primary stopping");
                    let _ = p.flush().await;
                }
                return Ok(());
            }
        }
        for p in peers.iter_mut() {
            while let Some(e) = p.sender.poll_event() {
                match e {
                    SenderEvent::Ready { version, .. } => {
                        p.version = version;
                        tracing::info!("backup {} ready (protocol v{version})", p.name)
                    }
                    SenderEvent::Acked { epoch, latency } => {
                        p.acked = Some(epoch + p.offset);
                        stats
                            .ack_latency_us
                            .store(latency.as_micros() as u64, Ordering::Relaxed);
                    }
                    SenderEvent::Resending { epoch, reason } => {
                        tracing::warn!(
                            "backup {}: resending from checkpoint {epoch}: {reason}",
                            p.name
                        )
                    }
                    SenderEvent::Failed(e) => {
                        tracing::error!("backup {} lost: {e}", p.name);
                        p.failed = Some(e.to_string());
                    }
                }
            }
        }
        if let Some(c) = releasable(&peers, required) {
            stats.acked.store(c + 1, Ordering::Relaxed);
            // Checkpoint `c` is safe: output of the epochs it (and those before it) closed may
            // leave; pre-copy rounds close none.
            let e = closes.range(..=c).next_back().map(|(_, e)| *e);
            closes = closes.split_off(&(c + 1));
            if let Some(e) = e.filter(|_| phase == Phase::Protected && c >= base) {
                if released.is_none_or(|r| e > r) {
                    if released.is_none() {
                        tracing::info!(
                            "protected: initial sync acknowledged after {:.0} ms",
                            sync_started.elapsed().as_secs_f64() * 1e3
                        );
                        stats.protected.store(true, Ordering::Relaxed);
                    }
                    let n = vm.release_output(e);
                    tracing::trace!(
                        "checkpoint {c} acknowledged: {n} frames of output epoch {e} released"
                    );
                    released = Some(e);
                    stats.released_frames.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let live = peers.iter().filter(|p| p.alive()).count();
        if live < required {
            let why: Vec<String> = peers
                .iter()
                .filter_map(|p| p.failed.as_ref().map(|f| format!("{}: {f}", p.name)))
                .collect();
            return Err(PrimaryError::BackupLost(why.join("; ")));
        }
        let counter =
            (phase != Phase::Protected || released.is_none()).then_some(&stats.sync_sent_bytes);
        for p in peers.iter_mut().filter(|p| p.alive()) {
            if let Err(e) = p.flush_counting(counter).await {
                p.failed = Some(e.to_string());
            }
        }
    }
}
