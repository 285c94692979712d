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
pub mod history;
mod peer;
pub mod policy;

pub use policy::{Command, Policy, PolicyConfig};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::page::EncodeOptions;
use protocol::ProtocolError;

use tokio::sync::watch;
use transport::certs::Identity;
use transport::{quic, PrimaryLink, QuicConfig};
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
    /// Term (from the failover manager; `--term`, 1 by default, without one). The same as
    /// the [`PrimaryState`]'s.
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
    /// A backup whose window stays full this long, while more than `required` others keep
    /// up, is dropped (it rejoins by quick resync).
    pub drop_after: Duration,
}

impl PrimaryConfig {
    /// What the policy needs of it.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            backups: self.backups.iter().map(|b| b.1.clone()).collect(),
            required: self.required,
            cluster_id: self.cluster_id,
            vm_id: self.vm_id.clone(),
            term: self.term,
            lanes: self.lanes,
            window: self.window,
            // A dead backup is found by QUIC's own idle timeout (keep-alives run in quinn's
            // tasks); this one is for a backup whose connection lives but which stopped
            // answering, and must outlast a long apply (a full sync's first round of GiBs).
            idle_timeout: Duration::from_millis(self.quic.idle_timeout_ms * 3)
                .max(Duration::from_secs(5)),
            epoch: (self.epoch, self.min_epoch, self.max_output_delay),
            early_checkpoints: self.early_checkpoints,
            precopy_rounds: self.precopy_rounds,
            drop_after: self.drop_after,
        }
    }
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

/// What a primary keeps across replication sessions (reconnects): its history — checkpoint
/// identity and the record of changes behind quick resyncs — and the shadow copy of every page
/// the backups hold.
pub struct PrimaryState {
    /// See [`history::History`].
    pub history: history::History,
    shadow: encode::Shadow,
}

impl PrimaryState {
    /// A new history for `vm` at `term`.
    pub fn new(vm: &Vm, term: u64, encode: EncodeOptions) -> Self {
        let h = history::History::new(history::History::random_id(), term, vm.mem_size());
        Self::with_history(h, encode)
    }

    /// State around an existing history (simulations build one without a VM).
    pub fn with_history(history: history::History, encode: EncodeOptions) -> Self {
        PrimaryState {
            history,
            shadow: encode::Shadow::new(encode),
        }
    }
}

/// Replicates `vm` (already started) to the backups until `stop` turns true or too few backups
/// remain to release output. Called again after a failure with the same `state`, it brings
/// backups that hold a checkpoint of this history up to date by quick resync. The decisions are
/// the [`Policy`]'s; this loop executes its commands and moves frames.
pub async fn run(
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    state: &mut PrimaryState,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PrimaryError> {
    let ep = quic::client(&cfg.identity, &cfg.quic)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    type Connected = (usize, u64, Result<PrimaryLink, PrimaryError>);
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Connected>(16);
    // The VM says when output starts waiting (early checkpoints end the epoch then).
    let output_waiting = Arc::new(tokio::sync::Notify::new());
    if cfg.early_checkpoints {
        let n = output_waiting.clone();
        vm.set_output_waker(Some(Arc::new(move || n.notify_one())));
    }
    let _waker = WakerGuard(&vm);
    let history = state.history.id;
    let mut links: Vec<Option<(u64, PrimaryLink)>> = cfg.backups.iter().map(|_| None).collect();
    let mut generation = 0u64;
    let mut p = Policy::new(cfg.policy(), state, stats.clone(), Instant::now());
    let mut to_close = Vec::new();
    let mut work: Option<Work> = None;
    loop {
        p.set_output_waiting(cfg.early_checkpoints && vm.output_waiting());
        while let Some(c) = p.poll_command() {
            match c {
                Command::Connect(i) => {
                    generation += 1;
                    let (ep, tx, ct, g) = (ep.clone(), tx.clone(), conn_tx.clone(), generation);
                    let (addr, name) = cfg.backups[i].clone();
                    let (lanes, vm_id) = (cfg.lanes, cfg.vm_id.clone());
                    tokio::spawn(async move {
                        let r = peer::connect(&ep, (addr, &name), &vm_id, lanes, (i, g), &tx).await;
                        let _ = ct.send((i, g, r)).await;
                    });
                }
                // Long work (a pre-copy pass scans all memory, a full capture copies it) runs on
                // a blocking thread while this loop goes on answering frames and timers, so
                // heartbeats keep flowing (the policy asks for nothing else meanwhile).
                Command::PreCopy { round } => {
                    let vm = vm.clone();
                    work = Some(tokio::task::spawn_blocking(move || match round {
                        0 => (true, vm.precopy_start()),
                        _ => (true, vm.precopy_pass()),
                    }));
                }
                Command::Capture {
                    kind: CaptureKind::Full,
                    disk_ranges,
                } => {
                    let vm = vm.clone();
                    work = Some(tokio::task::spawn_blocking(move || {
                        (
                            false,
                            vm.capture_epoch_with(CaptureKind::Full, &disk_ranges),
                        )
                    }));
                }
                Command::Capture { kind, disk_ranges } => {
                    match vm.capture_epoch_with(kind, &disk_ranges) {
                        Ok(cap) => p.handle_capture(&cap, Instant::now()),
                        Err(e) => {
                            p.handle_capture_failed(&e.to_string());
                            return Err(e.into());
                        }
                    }
                }
                Command::Release(e) => {
                    let n = vm.release_output(e);
                    tracing::trace!("{n} frames of output epoch {e} released");
                    stats.released_frames.fetch_add(n as u64, Ordering::Relaxed);
                }
                Command::Close(i) => to_close.push(i),
            }
        }
        let counter = p.syncing().then_some(&stats.sync_sent_bytes);
        flush(&mut p, &mut links, counter).await;
        for i in to_close.drain(..) {
            if let Some((_, l)) = links[i].take() {
                l.close(
                    quic::code::SESSION_FAILED,
                    "session over: failed or dropped",
                );
            }
        }
        if let Some(why) = p.failed() {
            return Err(PrimaryError::BackupLost(why.to_string()));
        }
        // Frames still queued (a big checkpoint is sent a slice per turn, so the loop keeps
        // answering frames and timers meanwhile): come straight back.
        let deadline = match p.has_transmits() {
            true => Some(tokio::time::Instant::now()),
            false => p.poll_timeout().map(tokio::time::Instant::from_std),
        };
        tokio::select! {
            f = rx.recv() => match f {
                // Frames of a connection that has since been replaced are dropped.
                Some((i, g, _)) if links[i].as_ref().map(|l| l.0) != Some(g) => {}
                Some((i, _, Ok(f))) => p.handle_frame(i, &f, Instant::now()),
                Some((i, _, Err(e))) => {
                    if let Some((_, l)) = links[i].take() {
                        l.close(quic::code::SESSION_FAILED, &e.to_string());
                    }
                    p.handle_link_error(i, &e.to_string(), Instant::now());
                }
                None => return Err(PrimaryError::BackupLost("every connection closed".into())),
            },
            Some((i, g, r)) = conn_rx.recv() => match r {
                Ok(link) => {
                    links[i] = Some((g, link));
                    p.handle_connected(i, history, Instant::now());
                }
                Err(e) => p.handle_connect_failed(i, &e.to_string()),
            },
            // (A wake-up due now must not go through the timer: its resolution is 1 ms.)
            _ = async {
                match deadline {
                    Some(d) if d <= tokio::time::Instant::now() => {}
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => p.handle_timeout(Instant::now()),
            done = async {
                match work.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            } => {
                work = None;
                match done {
                    Ok((true, Ok(cap))) => p.handle_precopy(&cap, Instant::now()),
                    Ok((false, Ok(cap))) => p.handle_capture(&cap, Instant::now()),
                    Ok((_, Err(e))) => {
                        p.handle_capture_failed(&e.to_string());
                        return Err(e.into());
                    }
                    Err(e) => {
                        p.handle_capture_failed(&e.to_string());
                        return Err(PrimaryError::BackupLost(format!("capture task: {e}")));
                    }
                }
            }
            // Output started waiting: look again (see `Policy::wake`).
            _ = output_waiting.notified(), if cfg.early_checkpoints => {}
            _ = stop.changed() => {
                p.close_all(Instant::now(), "primary stopping");
                flush(&mut p, &mut links, None).await;
                for (_, l) in links.iter_mut().filter_map(Option::take) {
                    l.close(quic::code::SHUTDOWN, "primary stopping");
                }
                return Ok(());
            }
        }
    }
}

/// Most bytes sent to one backup per turn of the loop.
const FLUSH_BYTES: usize = 8 << 20;

/// A pre-copy pass (true) or a full capture (false) on a blocking thread.
type Work = tokio::task::JoinHandle<(
    bool,
    Result<vmm::EpochCapture, vmm::snapshot::SnapshotError>,
)>;

/// Sends what the policy queued for every connected backup; a link that fails is reported.
async fn flush(
    p: &mut Policy<'_>,
    links: &mut [Option<(u64, PrimaryLink)>],
    counter: Option<&AtomicU64>,
) {
    for (i, slot) in links.iter_mut().enumerate() {
        let Some((_, link)) = slot else {
            continue;
        };
        let mut err = None;
        let mut budget = FLUSH_BYTES;
        while budget > 0 {
            let Some((lane, f)) = p.poll_transmit(i, Instant::now()) else {
                break;
            };
            budget = budget.saturating_sub(f.len());
            if let Err(e) = link.send(lane, &f).await {
                err = Some(e);
                break;
            }
            if let Some(c) = counter {
                c.fetch_add(f.len() as u64, Ordering::Relaxed);
            }
        }
        if let Some(e) = err {
            if let Some((_, l)) = slot.take() {
                l.close(quic::code::SESSION_FAILED, &e.to_string());
            }
            p.handle_link_error(i, &e.to_string(), Instant::now());
        }
    }
}
