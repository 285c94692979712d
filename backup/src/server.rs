//! The backup's network loop: one primary session at a time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use protocol::{Kind, Receiver, ReceiverConfig};
use tokio::sync::watch;
use transport::certs::Identity;
use transport::{BackupLink, QuicConfig, Server};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::image::{self, ReplicaImage};
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

/// Serves primaries until `stop` turns true; then finalizes the image as a snapshot of the last
/// applied checkpoint and returns that epoch (None if nothing was ever applied).
pub async fn serve(
    cfg: BackupConfig,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Option<u64>, BackupError> {
    let server = Server::bind(cfg.listen, &cfg.identity, &cfg.quic)?;
    let addr = server.local_addr()?;
    tracing::info!("backup listening on {addr}");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let mut applied = None;
    loop {
        tokio::select! {
            c = server.accept() => match c {
                Ok(conn) => match session(&cfg, conn, &mut stop).await {
                    Ok(e) => applied = e.or(applied),
                    Err(e) => tracing::warn!("session ended: {e}"),
                },
                Err(e) => tracing::warn!("{e}"),
            },
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    server.close();
    if cfg.image_dir.join("replica.bin").exists() {
        return match image::finalize(&cfg.image_dir) {
            Ok(epoch) => {
                tracing::info!("image finalized at checkpoint {epoch}");
                Ok(Some(epoch))
            }
            // An image still in its initial sync has nothing consistent to start: not an error
            // of the backup, just nothing to show.
            Err(e) if !image_consistent(&cfg.image_dir) => {
                tracing::warn!("{e}");
                Ok(None)
            }
            Err(e) => Err(e),
        };
    }
    Ok(applied)
}

fn image_consistent(dir: &std::path::Path) -> bool {
    std::fs::read(dir.join("replica.bin"))
        .ok()
        .and_then(|b| vmm::snapshot::format::decode::<image::ReplicaMeta>(&b).ok())
        .is_some_and(|m| !m.syncing())
}

async fn session(
    cfg: &BackupConfig,
    conn: quinn::Connection,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<u64>, BackupError> {
    let (mut link, mut rx) = BackupLink::accept(conn).await?;
    let stats = &cfg.stats;
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    let r = session_loop(cfg, &mut link, &mut rx, stop).await;
    stats.connected.store(false, Ordering::Relaxed);
    r
}

async fn session_loop(
    cfg: &BackupConfig,
    link: &mut BackupLink,
    rx: &mut transport::FrameRx,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<u64>, BackupError> {
    let stats = &cfg.stats;
    let mut r = Receiver::new(ReceiverConfig::new(cfg.cluster_id, &cfg.vm_id));
    let mut img: Option<ReplicaImage> = None;
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
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                r.handle_timeout(Instant::now());
            }
            _ = stop.changed() => break,
        }
        while let Some(cp) = r.poll_checkpoint() {
            let t0 = Instant::now();
            let term = r.session().map_or(0, |s| s.1);
            // Creating an image applies the checkpoint whole; any later one is staged (journal
            // written: durable), acknowledged at once, and then written into the image.
            let res = match (cp.kind, img.as_mut()) {
                (Kind::Sync, _) | (Kind::PreCopy, None) => {
                    ReplicaImage::create(&cfg.image_dir, term, &cp).map(|i| {
                        img = Some(i);
                        None
                    })
                }
                (_, Some(i)) => i.stage(&cp).map(Some),
                (Kind::Incremental, None) => Err(BackupError::Apply(
                    "incremental checkpoint before the initial sync".into(),
                )),
            };
            match res {
                Ok(staged) => {
                    let durable = t0.elapsed();
                    r.ack(cp.epoch);
                    while let Some(out) = r.poll_transmit() {
                        link.send(&out).await?;
                    }
                    if let (Some(s), Some(i)) = (staged, img.as_mut()) {
                        // A failure here leaves the journal: the image is recoverable, but
                        // this backup cannot go on.
                        i.complete(s)?;
                    }
                    stats.applied.store(cp.epoch + 1, Ordering::Relaxed);
                    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    stats
                        .pages
                        .fetch_add(cp.pages.len() as u64, Ordering::Relaxed);
                    stats
                        .last_durable_us
                        .store(durable.as_micros() as u64, Ordering::Relaxed);
                    stats
                        .syncing
                        .store(img.as_ref().is_some_and(|i| i.syncing()), Ordering::Relaxed);
                    tracing::debug!(
                        "checkpoint {} ({} pages): durable after {} µs, applied after {} µs",
                        cp.epoch,
                        cp.pages.len(),
                        durable.as_micros(),
                        t0.elapsed().as_micros()
                    );
                }
                Err(e) => {
                    stats.apply_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("checkpoint {}: {e}", cp.epoch);
                    r.apply_failed(cp.epoch, &e.to_string());
                }
            }
        }
        while let Some(out) = r.poll_transmit() {
            link.send(&out).await?;
        }
        if let Some(e) = r.closed() {
            tracing::info!("session closed: {e}");
            break;
        }
    }
    Ok(img.map(|i| i.epoch()))
}
