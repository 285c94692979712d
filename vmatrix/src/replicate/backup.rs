//! `vmatrix backup`: receives a primary's checkpoints into a replica image until it is stopped
//! (SIGINT/SIGTERM, `ctl stop`) or promoted (`ctl promote <term>`), then finalizes the image as a
//! snapshot of its last committed checkpoint. Its control socket also answers `fence <term>`:
//! primaries of an older term are refused from then on (persisted in the image directory).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use backup::{BackupStats, Fence};
use tokio::sync::watch;
use transport::QuicConfig;

use super::{load_identity, quic_config, BackupArgs};

/// Longest wait of `promote` for the image to be final.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(120);

/// The outcome of a promotion, handed from the main thread to the waiting control request.
type Promoted = Result<Option<u64>, String>;

/// Runs a backup until SIGINT/SIGTERM, `vmatrix ctl <socket> stop` or `promote`, then finalizes
/// its image. The image directory is locked for the whole run, before anything else (a second
/// backup or a restore of the same image is refused).
pub fn backup_main(a: BackupArgs) -> anyhow::Result<ExitCode> {
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
    };
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let (promoted_tx, promoted_rx) = mpsc::channel::<Promoted>();
    let promoting = Arc::new(AtomicBool::new(false));
    let served = match &a.control {
        Some(path) => {
            let c = Controls {
                stats: cfg.stats.clone(),
                fence: fence.clone(),
                stop: tx.clone(),
                promoting: promoting.clone(),
                promoted: Mutex::new(promoted_rx),
            };
            Some(crate::control::serve_with(
                path,
                Box::new(move |line| c.answer(line)),
            )?)
        }
        None => None,
    };
    let control = a.control.clone();
    let rt = crate::rt::runtime().context("tokio runtime")?;
    let result = rt.block_on(async move {
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
    fence: Arc<Fence>,
    stop: Arc<watch::Sender<bool>>,
    promoting: Arc<AtomicBool>,
    promoted: Mutex<mpsc::Receiver<Promoted>>,
}

impl Controls {
    /// Answers one request line.
    fn answer(&self, line: &str) -> Result<String, String> {
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let term = || {
            arg.trim()
                .parse::<u64>()
                .map_err(|_| format!("usage: {cmd} <term>"))
        };
        match (cmd, arg) {
            ("status", "") => Ok(format!(
                "{} min_term={}",
                self.stats.status_fields(),
                self.min_term()
            )),
            ("stop", "") => {
                let _ = self.stop.send(true);
                Ok("stopping: finalizing the image".into())
            }
            ("fence", _) => self.fence(term()?).map(|t| format!("term={t}")),
            ("promote", _) => self.promote(term()?),
            _ => Err(format!(
                "a backup answers 'status', 'stop', 'fence <term>' and 'promote <term>', not '{line}'"
            )),
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

    /// Fences the image at `term`, stops serving and waits for the image to be final.
    fn promote(&self, term: u64) -> Result<String, String> {
        if self.stats.committed.load(Ordering::Relaxed) == 0 {
            return Err(
                "no committed image (no full sync ever completed): nothing to promote".into(),
            );
        }
        let current = self.min_term();
        if term < current {
            return Err(format!(
                "term {term} is older than this image's term {current}: refused"
            ));
        }
        if self.promoting.swap(true, Ordering::SeqCst) {
            return Err("already promoting".into());
        }
        if let Err(e) = self.fence(term) {
            self.promoting.store(false, Ordering::SeqCst);
            return Err(e);
        }
        tracing::info!("promoting for term {term}: the session ends and the image is finalized");
        let _ = self.stop.send(true);
        let rx = self.promoted.lock().unwrap_or_else(|p| p.into_inner());
        match rx.recv_timeout(PROMOTE_TIMEOUT) {
            Ok(Ok(Some(seq))) => Ok(format!("promoting: image at checkpoint {seq}")),
            Ok(Ok(None)) => Err("no full sync ever completed: no image".into()),
            Ok(Err(e)) => Err(format!("finalizing the image failed: {e}")),
            Err(_) => Err("the image was not final in time".into()),
        }
    }
}
