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

mod driver;
pub mod encode;
pub mod epoch;
pub mod fence;
pub mod history;
mod peer;
pub mod policy;
pub mod reply_path;
pub mod stall;
mod writer;

pub use fence::{Fence, Fenced};
pub use policy::{Command, Policy, PolicyConfig};

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::page::EncodeOptions;
use protocol::ProtocolError;

use tokio::sync::watch;
use transport::certs::Identity;
use transport::QuicConfig;
use vmm::Vm;

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
    /// A thread of the primary could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A backup holds a newer term than ours: this primary is fenced and releases no output
    /// again.
    #[error("fenced by term {}", .term.map_or("(not said)".to_string(), |t| t.to_string()))]
    Fenced {
        /// The newer term, if the backup said.
        term: Option<u64>,
    },
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
    /// Spread data streams over the data connections a backup offers in its `Welcome` (each
    /// to a socket of its own on the backup: more cores on the receive path).
    pub data_connections: bool,
    /// Copy a busy epoch's dirty pages while the guest runs, shortly before its pause, so
    /// the pause copies only those dirtied since (`Vm::precopy_epoch`).
    pub epoch_precopy: bool,
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
            guest: (0, 0),
            slice: (policy::SLICE_PAGES, policy::SLICE_DISK),
            data_connections: self.data_connections,
            epoch_precopy: self
                .epoch_precopy
                .then_some(policy::EPOCH_PRECOPY_MIN_PAGES),
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
    /// Stalls of this process noticed ([`stall`]).
    pub stalls: AtomicU64,
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
    /// Backups in step with the session (they get every checkpoint).
    pub in_step: AtomicU64,
    /// Checkpoint as soon as possible, as if guest output waited (a handover is waiting for a
    /// checkpoint of the paused guest).
    pub hurry: std::sync::atomic::AtomicBool,
    /// Dirty pages copied early, while the guest ran (`Command::PreCopyEpoch`).
    pub early_pages: AtomicU64,
    /// Where the latency output commit adds to a reply goes (see [`reply_path`]).
    pub reply_path: reply_path::ReplyPath,
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

/// Clears the VM's output waker (and its pause at output) when the loop ends, however it ends.
struct WakerGuard<'a>(&'a Vm);

impl Drop for WakerGuard<'_> {
    fn drop(&mut self) {
        self.0.set_output_waker(None);
        self.0.set_pause_at_output(false);
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

    /// Output commit was turned off (the VM runs unprotected, with the failover manager's
    /// grant): the output epochs recorded belong to the held output that is gone, and the next
    /// session holds output again from epoch 0.
    pub fn output_unheld(&mut self) {
        self.history.closes.clear();
        self.history.released = None;
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
/// the [`Policy`]'s; this loop (see [`driver`]) executes its commands and moves frames.
pub async fn run(
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    state: &mut PrimaryState,
    stop: watch::Receiver<bool>,
) -> Result<(), PrimaryError> {
    run_fenced(vm, cfg, stats, state, stop, Arc::new(Fence::default())).await
}

/// [`run`] with a [`Fence`] shared with whoever may fence this primary: every release of
/// guest output goes through it, and a backup that refuses the primary for a stale term (or
/// welcomes it with a committed image of a newer term) fences it; the session then ends with
/// [`PrimaryError::Fenced`]. The session's first sync (or resync) starts holding guest output
/// if the VM was running unprotected (see [`Command::HoldOutput`]).
pub async fn run_fenced(
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    state: &mut PrimaryState,
    stop: watch::Receiver<bool>,
    fence: Arc<Fence>,
) -> Result<(), PrimaryError> {
    // The VM says when output starts waiting (early checkpoints end the epoch then).
    let output_waiting = Arc::new(tokio::sync::Notify::new());
    let clock = Arc::new(reply_path::OutputClock::new());
    if cfg.early_checkpoints {
        let (n, c) = (output_waiting.clone(), clock.clone());
        vm.set_output_waker(Some(Arc::new(move || {
            c.mark();
            n.notify_one();
        })));
    }
    let _waker = WakerGuard(&vm);
    let history = state.history.id;
    let mut pc = cfg.policy();
    pc.guest = (vm.mem_size() / protocol::page::PAGE as u64, vm.disk_len());
    let p = Policy::new(pc, state, stats.clone(), Instant::now());
    driver::Driver::new(vm.clone(), cfg, stats, history, fence)?
        .run(p, (output_waiting, clock), stop)
        .await
}
