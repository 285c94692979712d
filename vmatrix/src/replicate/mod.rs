//! `vmatrix primary` and `vmatrix backup`: continuous replication of a running VM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use protocol::page::EncodeOptions;
use transport::QuicConfig;
use vmm::Vm;

use crate::run::{resolve, supervise, RunArgs};

/// Flags of `vmatrix primary`.
#[derive(Args, Debug)]
pub struct PrimaryArgs {
    /// The VM, as for `vmatrix run`.
    #[command(flatten)]
    pub run: RunArgs,
    /// Backup address, `host:port` or `name@host:port` (name = host name in its certificate,
    /// default "backup"). Repeat for several backups.
    #[arg(long, required = true, value_parser = parse_backup)]
    pub backup: Vec<(SocketAddr, String)>,
    /// Backups that must acknowledge before output is released: "all" or a number.
    #[arg(long, default_value = "all")]
    pub required: String,
    /// Certificate directory (from `vmatrix certs init/issue`).
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name (picks <certs>/<host>.pem).
    #[arg(long)]
    pub host: String,
    /// Epoch length in milliseconds (1..=1000); the loop adapts it within
    /// [--min-epoch-ms, --max-output-delay-ms].
    #[arg(long, default_value_t = 20)]
    pub epoch_ms: u64,
    /// Shortest adaptive epoch, ms.
    #[arg(long, default_value_t = 10)]
    pub min_epoch_ms: u64,
    /// Longest adaptive epoch, ms: the cap on how long guest output waits for its checkpoint.
    #[arg(long, default_value_t = 200)]
    pub max_output_delay_ms: u64,
    /// Cluster id shared by primary and backup.
    #[arg(long, default_value_t = 1)]
    pub cluster_id: u64,
    /// VM id shared by primary and backup.
    #[arg(long, default_value = "vm")]
    pub vm_id: String,
    /// Data streams.
    #[arg(long, default_value_t = 2)]
    pub lanes: u8,
    /// QUIC idle timeout (failure detection), ms.
    #[arg(long, default_value_t = 1000)]
    pub idle_timeout_ms: u64,
    /// Serve Prometheus metrics (text format) over HTTP on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// End an epoch as soon as guest output waits for a checkpoint (replies wait ~1 pause and
    /// one round trip instead of the rest of the epoch). On by default; `--early-checkpoints
    /// false` gives fixed (adaptive-length) epochs only.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub early_checkpoints: bool,
    /// Most pre-copy rounds of the initial sync (memory copied while the guest runs, then one
    /// short pause); 0 = copy everything in one pause.
    #[arg(long, default_value_t = 8)]
    pub precopy_rounds: u32,
    /// This primary's term (the failover manager grants it; by hand: higher than any earlier
    /// primary of this VM). A backup refuses a primary whose term is lower than its image's.
    #[arg(long, default_value_t = 1)]
    pub term: u64,
    /// Drop a backup whose window has been full this long (ms) while more than --required
    /// others keep up; it rejoins by quick resync.
    #[arg(long, default_value_t = 1000)]
    pub drop_after_ms: u64,
}

/// Flags of `vmatrix backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Replica image directory (a snapshot of the last committed checkpoint after stop). An
    /// image already there is kept and brought up to date (quick resync or full sync).
    #[arg(long)]
    pub image_dir: PathBuf,
    /// Certificate directory.
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name.
    #[arg(long)]
    pub host: String,
    /// Cluster id.
    #[arg(long, default_value_t = 1)]
    pub cluster_id: u64,
    /// VM id.
    #[arg(long, default_value = "vm")]
    pub vm_id: String,
    /// QUIC idle timeout (failure detection), ms. A primary that says nothing for 3 s (or three
    /// times this if shorter, at least 1.5 s) is disconnected.
    #[arg(long, default_value_t = 1000)]
    pub idle_timeout_ms: u64,
    /// Longest time an incoming handshake (mutual TLS) may take, ms; handshakes run
    /// concurrently, so abandoned ones never delay a real primary.
    #[arg(long, default_value_t = 2000)]
    pub handshake_timeout_ms: u64,
    /// Serve `status` and `stop` on this Unix socket (`vmatrix ctl <socket> status|stop`).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

fn parse_backup(s: &str) -> Result<(SocketAddr, String), String> {
    let (name, addr) = match s.split_once('@') {
        Some((n, a)) => (n.to_string(), a),
        None => ("backup".to_string(), s),
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("'{addr}' is not host:port: {e}"))?;
    Ok((addr, name))
}

fn quic_config(idle_ms: u64) -> QuicConfig {
    QuicConfig {
        keep_alive_ms: (idle_ms / 5).max(10),
        idle_timeout_ms: idle_ms,
        ..QuicConfig::default()
    }
}

/// This host's certificates from the directory made by `vmatrix certs`.
fn load_identity(
    certs: &std::path::Path,
    host: &str,
) -> anyhow::Result<transport::certs::Identity> {
    transport::certs::load(certs, host)
        .with_context(|| format!("loading certificates of '{host}' from {}", certs.display()))
}

/// Pause between losing every backup and trying to reconnect.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Runs a protected VM; if the backups are lost it keeps the guest's output held and reconnects,
/// starting over with a new initial sync.
pub fn primary_main(a: PrimaryArgs) -> anyhow::Result<ExitCode> {
    if !(1..=1000).contains(&a.epoch_ms) {
        bail!("--epoch-ms must be between 1 and 1000");
    }
    let identity = load_identity(&a.certs, &a.host)?;
    let n = a.backup.len();
    let required = match a.required.as_str() {
        "all" => n,
        x => x
            .parse::<usize>()
            .ok()
            .filter(|&k| (1..=n).contains(&k))
            .with_context(|| format!("--required must be 'all' or 1..={n}"))?,
    };
    let control = a.run.control.clone();
    let cfg = resolve(a.run)?;
    let console = cfg.console.clone();
    let vm = Arc::new(Vm::new(cfg)?);
    // Nothing the guest sends may leave before the backup holds the state that produced it.
    vm.hold_output_from_start();
    let pcfg = primary::PrimaryConfig {
        epoch: Duration::from_millis(a.epoch_ms),
        min_epoch: Duration::from_millis(a.min_epoch_ms.clamp(1, 1000)),
        max_output_delay: Duration::from_millis(a.max_output_delay_ms.clamp(1, 10_000)),
        backups: a.backup,
        required,
        identity,
        cluster_id: a.cluster_id,
        vm_id: a.vm_id,
        term: a.term,
        lanes: a.lanes,
        window: 4,
        quic: quic_config(a.idle_timeout_ms),
        encode: EncodeOptions::default(),
        early_checkpoints: a.early_checkpoints,
        precopy_rounds: a.precopy_rounds,
        drop_after: Duration::from_millis(a.drop_after_ms),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(primary::Stats::default());
    let (vm2, st2) = (vm.clone(), stats.clone());
    // One history for the life of this primary: sessions after a failure resync from it.
    let mut state = primary::PrimaryState::new(&vm, a.term, pcfg.encode);
    tracing::info!(
        "history {:x}, term {}",
        state.history.id,
        state.history.term
    );
    let repl = crate::rt::spawn("replication", async move {
        // Wait for the VM to be running before the initial sync.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut stop_rx = stop_rx;
        loop {
            let r = primary::run(vm2.clone(), pcfg.clone(), st2.clone(), &mut state, stop_rx.clone());
            match r.await {
                Ok(()) => break,
                Err(_) if *stop_rx.borrow() => break,
                Err(e) => {
                    // Output stays held (no client may see state a failover could lose) until
                    // a backup holds the VM again: reconnect and sync it from scratch.
                    st2.protected.store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!("replication lost: {e}; guest output stays held");
                    eprintln!("vmatrix primary: replication lost: {e}; guest output stays held; reconnecting (a quick resync or a new full sync follows)");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                        _ = stop_rx.changed() => break,
                    }
                }
            }
        }
    })
    .context("spawning the replication thread")?;
    let status: crate::control::StatusExtra = {
        let s = stats.clone();
        Arc::new(move || crate::metrics::status_fields(&s))
    };
    crate::progress::spawn(stats.clone(), Duration::from_secs(600));
    if let Some(addr) = a.metrics {
        crate::metrics::serve(addr, vm.clone(), stats.clone())?;
    }
    let code = supervise(vm, control.as_deref(), console, false, Some(status));
    let _ = stop_tx.send(true);
    let _ = repl.join();
    code
}

/// Runs a backup until SIGINT/SIGTERM or `vmatrix ctl <socket> stop`, then finalizes its image.
/// The image directory is locked for the whole run, before anything else (a second backup or a
/// restore of the same image is refused).
pub fn backup_main(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let lock = backup::ImageLock::acquire(&a.image_dir)?;
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
        stats: Arc::new(backup::BackupStats::default()),
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tx = Arc::new(tx);
    if let Some(path) = &a.control {
        let (stats, stop) = (cfg.stats.clone(), tx.clone());
        crate::control::serve_with(
            path,
            Box::new(move |line| match line {
                "status" => Ok(stats.status_fields()),
                "stop" => {
                    let _ = stop.send(true);
                    Ok("stopping: finalizing the image".into())
                }
                other => Err(format!(
                    "a backup answers 'status' and 'stop', not '{other}'"
                )),
            }),
        )?;
    }
    let control = a.control.clone();
    let rt = crate::rt::runtime().context("tokio runtime")?;
    let epoch = rt.block_on(async move {
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
        backup::serve_locked(cfg, lock, rx, None).await
    })?;
    if let Some(p) = control {
        let _ = std::fs::remove_file(p);
    }
    match epoch {
        Some(e) => eprintln!("vmatrix backup: image is a snapshot of checkpoint {e}"),
        None => eprintln!("vmatrix backup: no full sync ever completed: no image"),
    }
    Ok(ExitCode::SUCCESS)
}
