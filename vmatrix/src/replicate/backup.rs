//! `vmatrix backup`: receives a primary's checkpoints into a replica image until it is stopped
//! (SIGINT/SIGTERM, `PUT /stop`) or promoted (`PUT /promote {"term":n}`), then finalizes the
//! image as a snapshot of its last committed checkpoint. Its control socket (`crate::control`)
//! also serves `GET /status` and `PUT /fence {"term":n}`: primaries of an older term are
//! refused from then on (persisted in the image directory).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use backup::stats::now_ms;
use backup::{BackupStats, Fence};
use serde_json::Value;
use tokio::sync::watch;
use transport::QuicConfig;

use crate::control::answer;
use crate::control::types::{
    BackupFenceAnswer, BackupStatus, CheckpointAnswer, ControlError, Request, SnapshotAnswer,
    SnapshotKind, Status, StopAnswer,
};

use super::{load_identity, quic_config, BackupArgs};

/// Longest wait of `promote` for the image to be final.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(120);

/// The outcome of a promotion, handed from the main thread to the waiting control request.
type Promoted = Result<Option<u64>, String>;

/// What a backup serves, for the 404 of anything else.
const SERVES: &str = "GET /status, PUT /stop, PUT /fence, PUT /promote and PUT /snapshot";
/// Longest wait of `snapshot` for the export (a 4 GiB image copies in a few seconds).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// `--data-ports`: at most 8, distinct, none the listening port.
fn check_data_ports(a: &BackupArgs) -> anyhow::Result<()> {
    let p = &a.data_ports;
    let max = protocol::message::MAX_DATA_PORTS;
    if p.len() > max {
        anyhow::bail!("--data-ports: at most {max} ports, not {}", p.len());
    }
    let mut seen = std::collections::BTreeSet::new();
    for &port in p {
        if port != 0 && !seen.insert(port) {
            anyhow::bail!("--data-ports: port {port} given twice");
        }
        if port != 0 && port == a.listen.port() {
            anyhow::bail!("--data-ports: port {port} is the listening port (--listen)");
        }
    }
    Ok(())
}

/// Runs a backup until SIGINT/SIGTERM, `vmatrix ctl <socket> stop` or `promote`, then finalizes
/// its image. The image directory is locked for the whole run, before anything else (a second
/// backup or a restore of the same image is refused).
pub fn backup_main(a: BackupArgs) -> anyhow::Result<ExitCode> {
    check_data_ports(&a)?;
    super::check_cpus("--apply-cpus", a.apply_cpus.as_ref())?;
    let lock = backup::ImageLock::acquire(&a.image_dir)?;
    // A minimum term given at start is persisted before anything listens (no session of an
    // older primary can begin, and no later `fence` has to end one that is starting).
    if a.min_term > backup::fence::read_min_term(&a.image_dir)? {
        std::fs::create_dir_all(&a.image_dir)?;
        backup::fence::write_min_term(&a.image_dir, a.min_term)?;
    }
    let fence = Arc::new(Fence::load(&a.image_dir)?);
    let identity = load_identity(&a.certs, &a.host)?;
    let cfg = backup::BackupConfig {
        listen: a.listen,
        image_dir: a.image_dir,
        identity,
        cluster_id: a.cluster_id,
        vm_id: a.vm_id,
        quic: QuicConfig {
            handshake_timeout_ms: a.handshake_timeout_ms.max(1),
            ..quic_config(a.idle_timeout_ms)
        },
        stats: Arc::new(BackupStats::default()),
        exports: backup::Exports::default(),
        data_sockets: a.data_sockets,
        data_ports: a.data_ports.clone(),
    };
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let (promoted_tx, promoted_rx) = mpsc::channel::<Promoted>();
    let promoting = Arc::new(AtomicBool::new(false));
    let served = match &a.control {
        Some(path) => {
            let c = Controls {
                stats: cfg.stats.clone(),
                exports: cfg.exports.clone(),
                fence: fence.clone(),
                stop: tx.clone(),
                promoting: promoting.clone(),
                promoted: Mutex::new(promoted_rx),
            };
            Some(crate::control::server::serve_with(
                path,
                Box::new(move |req| c.answer(req)),
                true,
            )?)
        }
        None => None,
    };
    let control = a.control.clone();
    let threads = crate::rt::Threads {
        cpus: a.apply_cpus.clone().map(|c| c.0),
        realtime: a.rt_apply,
    };
    let rt = crate::rt::runtime_with(threads, None).context("tokio runtime")?;
    let result = crate::rt::block_on_worker(&rt, async move {
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut t), Ok(mut i)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            let _ = tx.send(true);
        });
        backup::serve_fenced(cfg, lock, rx, None, fence).await
    });
    // Served and finalized (the image's lock is released): only the signal listener is left on
    // the runtime, and nothing need wait for its threads (a promotion waits for this exit).
    rt.shutdown_background();
    if promoting.load(Ordering::SeqCst) {
        let _ = promoted_tx.send(match &result {
            Ok(seq) => Ok(*seq),
            Err(e) => Err(e.to_string()),
        });
    }
    let epoch = result?;
    let promoted = promoting.load(Ordering::SeqCst);
    match epoch {
        Some(e) if promoted => eprintln!(
            "vmatrix backup: image is a snapshot of checkpoint {e} (promoted: recorded in \
             replica.bin, the new primary starts from it)"
        ),
        Some(e) => eprintln!("vmatrix backup: image is a snapshot of checkpoint {e}"),
        None => eprintln!("vmatrix backup: no full sync ever completed: no image"),
    }
    if let Some(s) = served {
        // The answer to `stop` or `promote` goes out before the process ends.
        s.wait_idle(Duration::from_secs(1));
    }
    if let Some(p) = control {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the backup's control requests act on.
struct Controls {
    stats: Arc<BackupStats>,
    exports: backup::Exports,
    fence: Arc<Fence>,
    stop: Arc<watch::Sender<bool>>,
    promoting: Arc<AtomicBool>,
    promoted: Mutex<mpsc::Receiver<Promoted>>,
}

impl Controls {
    /// Answers one request.
    fn answer(&self, req: Request) -> Result<Value, ControlError> {
        match req {
            Request::Status => answer(Status::Backup(self.status())),
            Request::Stop => {
                let _ = self.stop.send(true);
                answer(StopAnswer { stopping: true })
            }
            Request::Fence(term) => {
                let min_term = self.fence(term).map_err(ControlError::failed)?;
                answer(BackupFenceAnswer { min_term })
            }
            Request::Promote(term) => {
                let checkpoint = self.promote(term)?;
                answer(CheckpointAnswer { checkpoint })
            }
            Request::Snapshot { kind, dir } => self.export(kind, dir),
            other => Err(ControlError::not_found(format!(
                "a backup serves {SERVES}, not {}",
                other.name()
            ))),
        }
    }

    /// `PUT /snapshot`: a full snapshot of the committed checkpoint, exported while replication
    /// goes on (`backup::export`); its `pause_us` is how long the apply loop was held (the
    /// guest never pauses for it).
    fn export(&self, kind: SnapshotKind, dir: PathBuf) -> Result<Value, ControlError> {
        if kind != SnapshotKind::Full {
            return Err(ControlError::bad_request(
                "a backup exports full snapshots only (its image holds one checkpoint)",
            ));
        }
        if self.promoting.load(Ordering::SeqCst) {
            return Err(ControlError::conflict("promoting: no export"));
        }
        let e = self
            .exports
            .export(dir, EXPORT_TIMEOUT)
            .map_err(|e| match e {
                backup::BackupError::NoImage { .. } => ControlError::conflict(e.to_string()),
                e => ControlError::failed(e.to_string()),
            })?;
        answer(SnapshotAnswer {
            id: e.id,
            pause_us: e.held_us,
            pages: e.bytes / 4096,
            total_ms: e.total_ms,
            memory_crc32: Some(e.memory_crc32),
        })
    }

    /// `GET /status`: the image, the session, the minimum term.
    fn status(&self) -> BackupStatus {
        let s = &self.stats;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let ago = |stamp: u64| (stamp != 0).then(|| now_ms().saturating_sub(stamp));
        let committed = ld(&s.committed);
        BackupStatus {
            connected: s.connected.load(Ordering::Relaxed),
            sessions: ld(&s.sessions),
            syncing: s.syncing.load(Ordering::Relaxed),
            term: ld(&s.term),
            seq: committed.checked_sub(1),
            history: (committed != 0).then(|| format!("{:x}", ld(&s.history))),
            last_checkpoint_ms_ago: ago(ld(&s.last_checkpoint_ms)),
            last_heard_ms_ago: ago(ld(&s.last_heard_ms)),
            applied_epoch: ld(&s.applied).checked_sub(1),
            checkpoints: ld(&s.checkpoints),
            pages: ld(&s.pages),
            durable_us: ld(&s.last_durable_us),
            apply_failures: ld(&s.apply_failures),
            min_term: self.min_term(),
        }
    }

    /// The lowest term a primary may have: the fenced one or the committed image's.
    fn min_term(&self) -> u64 {
        self.fence
            .min_term()
            .max(self.stats.term.load(Ordering::Relaxed))
    }

    /// Raises the minimum term to `term` (persisted; a running session of an older primary
    /// ends); returns the minimum term in force.
    fn fence(&self, term: u64) -> Result<u64, String> {
        let current = self.min_term();
        if term <= current {
            return Ok(current);
        }
        self.fence.raise(term).map_err(|e| e.to_string())
    }

    /// Fences the image at `term`, stops serving and waits for the image to be final; the
    /// image's checkpoint. 409 when there is nothing to promote or the term is stale.
    fn promote(&self, term: u64) -> Result<u64, ControlError> {
        if self.stats.committed.load(Ordering::Relaxed) == 0 {
            return Err(ControlError::conflict(
                "no committed image (no full sync ever completed): nothing to promote",
            ));
        }
        let current = self.min_term();
        if term < current {
            return Err(ControlError::conflict(format!(
                "term {term} is older than this image's term {current}: refused"
            )));
        }
        if self.promoting.swap(true, Ordering::SeqCst) {
            return Err(ControlError::conflict("already promoting"));
        }
        if let Err(e) = self.fence(term) {
            self.promoting.store(false, Ordering::SeqCst);
            return Err(ControlError::failed(e));
        }
        tracing::info!("promoting for term {term}: the session ends and the image is finalized");
        let _ = self.stop.send(true);
        let rx = self.promoted.lock().unwrap_or_else(|p| p.into_inner());
        match rx.recv_timeout(PROMOTE_TIMEOUT) {
            Ok(Ok(Some(seq))) => Ok(seq),
            Ok(Ok(None)) => Err(ControlError::conflict(
                "no full sync ever completed: no image",
            )),
            Ok(Err(e)) => Err(ControlError::failed(format!(
                "finalizing the image failed: {e}"
            ))),
            Err(_) => Err(ControlError::failed("the image was not final in time")),
        }
    }
}
