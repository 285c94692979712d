//! The backup's network loop: one primary session at a time, all of them applying to the same
//! [`Replica`] (the committed image, and the side image of a full sync), which lives as long as
//! [`serve`] and holds the image directory's lock.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use protocol::{Checkpoint, Receiver, ReceiverConfig};
use tokio::sync::watch;
use transport::certs::Identity;
use transport::{BackupLink, QuicConfig, Server};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::image::Origin;
use crate::lock::ImageLock;
use crate::replica::{Failure, Replica};
use crate::stats::BackupStats;
use crate::BackupError;

/// Backup settings.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Replica image directory.
    pub image_dir: PathBuf,
    /// This host's certificates.
    pub identity: Identity,
    /// Cluster id the primary must present.
    pub cluster_id: u64,
    /// VM id the primary must present.
    pub vm_id: String,
    /// QUIC timers.
    pub quic: QuicConfig,
    /// Counters, shared with whoever reports them.
    pub stats: Arc<BackupStats>,
}

/// Serves primaries until `stop` turns true; then finalizes the committed image as a snapshot
/// of its checkpoint and returns that seq (None if there is no committed image: no full sync
/// ever completed). Takes the image directory's lock first ([`serve_locked`]).
pub async fn serve(
    cfg: BackupConfig,
    stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Option<u64>, BackupError> {
    let lock = ImageLock::acquire(&cfg.image_dir)?;
    serve_locked(cfg, lock, stop, ready).await
}

/// [`serve`] with the image directory's lock already held (`lock` must be of
/// `cfg.image_dir`). An existing image is recovered and becomes the committed image every
/// session starts from: its position is reported to each primary (which may then send a quick
/// resync from it), and its term is the lowest a primary may have.
pub async fn serve_locked(
    cfg: BackupConfig,
    lock: ImageLock,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Option<u64>, BackupError> {
    if lock.dir() != cfg.image_dir {
        return Err(BackupError::Apply(format!(
            "the lock held is of {}, not of the image directory {}",
            lock.dir().display(),
            cfg.image_dir.display()
        )));
    }
    let mut replica = Replica::open(lock)?;
    if let Some(p) = replica.position() {
        tracing::info!(
            "committed image: checkpoint {} (term {}, history {:#x})",
            p.seq,
            p.term,
            p.history
        );
        cfg.stats.applied.store(p.seq + 1, Ordering::Relaxed);
    }
    let server = Server::bind(cfg.listen, &cfg.identity, &cfg.quic)?;
    let addr = server.local_addr()?;
    tracing::info!("backup listening on {addr}");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    loop {
        tokio::select! {
            c = server.accept() => match c {
                Ok(conn) => {
                    let r = session(&cfg, conn, &mut replica, &mut stop).await;
                    if let Err(e) = replica.end_session() {
                        tracing::warn!("removing the abandoned side image: {e}");
                    }
                    let applied = replica.seq().map_or(0, |s| s + 1);
                    cfg.stats.applied.store(applied, Ordering::Relaxed);
                    match r {
                        Ok(()) => {}
                        Err(Failure::Fatal(e)) => {
                            server.close();
                            tracing::error!("{e}; stopping (recovery redoes it)");
                            return Err(e);
                        }
                        Err(e) => tracing::warn!("session ended: {e}"),
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            },
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    server.close();
    let seq = replica.finalize()?;
    if let Some(s) = seq {
        tracing::info!("image finalized at checkpoint {s}");
    }
    Ok(seq)
}

async fn session(
    cfg: &BackupConfig,
    conn: quinn::Connection,
    replica: &mut Replica,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let (mut link, mut rx) = BackupLink::accept(conn)
        .await
        .map_err(|e| Failure::Session(e.into()))?;
    let stats = &cfg.stats;
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    let r = session_loop(cfg, &mut link, &mut rx, replica, stop).await;
    stats.connected.store(false, Ordering::Relaxed);
    stats.syncing.store(false, Ordering::Relaxed);
    r
}

async fn session_loop(
    cfg: &BackupConfig,
    link: &mut BackupLink,
    rx: &mut transport::FrameRx,
    replica: &mut Replica,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let mut rcfg = ReceiverConfig::new(cfg.cluster_id, &cfg.vm_id);
    rcfg.committed = replica.position();
    rcfg.min_term = rcfg.committed.map_or(0, |p| p.term);
    let mut r = Receiver::new(rcfg);
    // The primary and seq of the checkpoint that opened the session's stream.
    let mut opener: Option<(Origin, u64)> = None;
    loop {
        let deadline = r.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(f)) => {
                    tracing::trace!("frame of {} bytes", f.len());
                    if let Err(e) = r.handle_frame(Instant::now(), &f) {
                        tracing::warn!("refused frame: {e}");
                    }
                }
                Some(Err(e)) => return Err(Failure::Session(e.into())),
                None => break,
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                r.handle_timeout(Instant::now());
            }
            _ = stop.changed() => break,
        }
        while let Some(cp) = r.poll_checkpoint() {
            let origin = Origin {
                history: r.history().unwrap_or(0),
                term: r.session().map_or(0, |s| s.1),
            };
            let opens = match opener {
                Some((o, seq)) if o == origin => seq == cp.epoch,
                _ => {
                    opener = Some((origin, cp.epoch));
                    true
                }
            };
            apply_one(cfg, &mut r, link, replica, &cp, origin, opens).await?;
        }
        while let Some(out) = r.poll_transmit() {
            link.send(&out)
                .await
                .map_err(|e| Failure::Session(e.into()))?;
        }
        if let Some(e) = r.closed() {
            tracing::info!("session closed: {e}");
            break;
        }
    }
    Ok(())
}

/// Applies one checkpoint: durable (or, for a full sync, applied and promoted), acknowledged,
/// then completed. A refused one is reported to the primary, which resends it.
async fn apply_one(
    cfg: &BackupConfig,
    r: &mut Receiver,
    link: &mut BackupLink,
    replica: &mut Replica,
    cp: &Checkpoint,
    origin: Origin,
    opens: bool,
) -> Result<(), Failure> {
    let stats = &cfg.stats;
    let t0 = Instant::now();
    let staged = match replica.begin(cp, origin, opens) {
        Ok(s) => s,
        Err(Failure::Refused(e)) => {
            stats.apply_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("checkpoint {}: {e}", cp.epoch);
            r.apply_failed(cp.epoch, &e.to_string());
            return Ok(());
        }
        Err(f) => {
            stats.apply_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("checkpoint {}: {f}", cp.epoch);
            return Err(f);
        }
    };
    let durable = t0.elapsed();
    r.ack(cp.epoch);
    while let Some(out) = r.poll_transmit() {
        link.send(&out)
            .await
            .map_err(|e| Failure::Session(e.into()))?;
    }
    if let Some(s) = staged {
        replica.complete(s)?;
    }
    stats.applied.store(cp.epoch + 1, Ordering::Relaxed);
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    stats
        .pages
        .fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
    stats
        .last_durable_us
        .store(durable.as_micros() as u64, Ordering::Relaxed);
    stats.syncing.store(replica.syncing(), Ordering::Relaxed);
    tracing::debug!(
        "checkpoint {} ({:?}, {} pages): durable after {} µs, applied after {} µs",
        cp.epoch,
        cp.kind,
        cp.pages.len(),
        durable.as_micros(),
        t0.elapsed().as_micros()
    );
    Ok(())
}
