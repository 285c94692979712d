//! # primary — the protected VM's side of continuous replication
//!
//! The epoch loop ([`run`]): connect to the backup (QUIC, mutual TLS), send the initial sync
//! (checkpoint 0: every non-zero page, the disk, the state; output commit armed in the same
//! pause), then every epoch pause the VM, capture dirty pages, disk writes and state, resume at
//! once, and stream the checkpoint; when the backup acknowledges checkpoint N, release the
//! guest's network output of epoch N. If checkpoints pile up (window full) the epoch is simply
//! extended: nothing grows without bound, and output stays held.

#![forbid(unsafe_code)]

pub mod encode;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::message::Kind;
use protocol::page::EncodeOptions;
use protocol::{ProtocolError, Sender, SenderConfig, SenderEvent};
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
    /// Epoch length.
    pub epoch: Duration,
    /// Backup address.
    pub backup: SocketAddr,
    /// Host name in the backup's certificate.
    pub backup_name: String,
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
}

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
}

async fn flush(s: &mut Sender, link: &mut PrimaryLink) -> Result<(), PrimaryError> {
    while let Some((lane, f)) = s.poll_transmit() {
        link.send(lane, &f).await?;
    }
    Ok(())
}

/// Replicates `vm` (already started) to the backup until `stop` turns true or the backup is lost.
pub async fn run(
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PrimaryError> {
    let ep = quic::client(&cfg.identity, &cfg.quic)?;
    // The backup may still be starting: retry for a while before giving up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match quic::connect(&ep, cfg.backup, &cfg.backup_name).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::info!("backup not reachable yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (mut link, mut rx) = PrimaryLink::open(conn, cfg.lanes).await?;
    let mut scfg = SenderConfig::new(cfg.cluster_id, &cfg.vm_id, cfg.term);
    scfg.lanes = cfg.lanes;
    scfg.window = cfg.window;
    scfg.idle_timeout = Duration::from_millis(cfg.quic.idle_timeout_ms.max(500) * 3);
    let mut s = Sender::new(scfg);
    s.start(Instant::now());
    flush(&mut s, &mut link).await?;
    let mut shadow = encode::Shadow::new(cfg.encode);
    let mut next_epoch = 0u64;
    let mut tick = tokio::time::Instant::now();
    loop {
        let deadline = s.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(f)) => {
                    if let Err(e) = s.handle_frame(Instant::now(), &f) {
                        tracing::warn!("frame from backup: {e}");
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(PrimaryError::BackupLost("connection closed".into())),
            },
            _ = tokio::time::sleep_until(tick), if s.is_ready() => {
                tick += cfg.epoch;
                let now = tokio::time::Instant::now();
                if tick < now {
                    tick = now + cfg.epoch;
                }
                if s.can_send() {
                    let kind = if next_epoch == 0 { CaptureKind::Full } else { CaptureKind::Incremental };
                    let cap = vm.capture_epoch(kind)?;
                    let pk = if next_epoch == 0 { Kind::Sync } else { Kind::Incremental };
                    let cp = shadow.checkpoint(next_epoch, pk, &cap);
                    stats.last_pause_us.store(cap.pause.as_micros() as u64, Ordering::Relaxed);
                    stats.max_pause_us.fetch_max(cap.pause.as_micros() as u64, Ordering::Relaxed);
                    stats.pages.fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
                    stats.bytes.fetch_add(cp.data_bytes(), Ordering::Relaxed);
                    s.send_checkpoint(Instant::now(), cp)?;
                    next_epoch += 1;
                    stats.epochs.store(next_epoch, Ordering::Relaxed);
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                s.handle_timeout(Instant::now());
            }
            _ = stop.changed() => {
                s.close(Instant::now(), "primary stopping");
                let _ = flush(&mut s, &mut link).await;
                return Ok(());
            }
        }
        while let Some(e) = s.poll_event() {
            match e {
                SenderEvent::Ready { version, .. } => {
                    tracing::info!("backup ready (protocol v{version})")
                }
                SenderEvent::Acked { epoch, latency } => {
                    let n = vm.release_output(epoch);
                    stats.acked.store(epoch + 1, Ordering::Relaxed);
                    stats
                        .ack_latency_us
                        .store(latency.as_micros() as u64, Ordering::Relaxed);
                    stats.released_frames.fetch_add(n as u64, Ordering::Relaxed);
                }
                SenderEvent::Resending { epoch, reason } => {
                    tracing::warn!("resending from checkpoint {epoch}: {reason}")
                }
                SenderEvent::Failed(e) => return Err(PrimaryError::BackupLost(e.to_string())),
            }
        }
        flush(&mut s, &mut link).await?;
    }
}
