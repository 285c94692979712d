//! `vmatrix manager`: the failover manager's process.
//!
//! It wires I/O around [`failover::manager::Manager`] (the decisions, sans-IO):
//!
//! - [`agents`]: a QUIC server (mutual TLS) that agents connect to; their hellos, reports and
//!   lost connections go to the decision loop, their assignments come back from it;
//! - [`core`]: the decision loop, which owns the state machine and the store, ticks it, and
//!   acts on its outputs in order (persist before anything after it);
//! - [`api`]: the HTTP/JSON API and `/metrics` (loopback only) for `vmatrix vm|host|events`
//!   and curl;
//! - [`events`]: the numbered, timed event log (a JSON-lines file and the last 1000 in memory).
//!
//! Stopping it (SIGINT/SIGTERM, or a crash) never stops a VM: the agents keep their VMs running
//! and reconnect; a restarted manager loads the same state and sends nothing destructive before
//! the agents have reported.

pub mod agents;
pub mod api;
pub mod core;
pub mod events;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use failover::manager::{Manager, ManagerConfig};
use failover::store::{FileStore, Store};
use tokio::sync::{mpsc, oneshot};
use transport::roles::{HostRole, PeerCert};

/// Flags of `vmatrix manager`.
#[derive(clap::Args, Debug)]
pub struct ManagerArgs {
    /// Address agents connect to (QUIC, mutual TLS), e.g. 10.80.0.254:7700.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address of the HTTP/JSON API and /metrics: loopback only (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub api: SocketAddr,
    /// The cluster state file (created on the first decision; a corrupt one is refused).
    #[arg(long)]
    pub state: PathBuf,
    /// The event log, one JSON object per line (appended to).
    #[arg(long)]
    pub events: PathBuf,
    /// Directory with the cluster CA and this host's certificate (`vmatrix certs`).
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name (its certificate must grant the manager role).
    #[arg(long)]
    pub host: String,
    /// Silence (of the primary's agent and of the checkpoints at its backups) after which a
    /// primary is failed, ms.
    #[arg(long, default_value_t = 60)]
    pub detect_ms: u64,
    /// Silence of a backup's agent after which the backup is replaced, ms.
    #[arg(long, default_value_t = 1500)]
    pub backup_lost_ms: u64,
    /// A primary that has not answered its (heard) agent for this long, while its backups say
    /// checkpoints stopped for as long, is failed as hung, ms.
    #[arg(long, default_value_t = 1000)]
    pub hung_ms: u64,
    /// Longest a scaled-down clone drains on its VM's load balancer (no new connections, open
    /// ones finishing) before it is stopped anyway, ms (docs/clones.md, "Drain before stop").
    #[arg(long, default_value_t = 30_000)]
    pub drain_limit_ms: u64,
    /// A clone its host reports but not running for this long is placed on another host (and
    /// that host avoided for the VM three times as long), ms (docs/clones.md).
    #[arg(long, default_value_t = 20_000)]
    pub clone_stuck_ms: u64,
}

/// Runs the manager until SIGINT/SIGTERM (success) or a decision that cannot be persisted
/// (an error: the process exits non-zero).
pub fn main(a: ManagerArgs) -> anyhow::Result<ExitCode> {
    api::check_loopback(a.api)?;
    if a.detect_ms == 0 || a.backup_lost_ms == 0 || a.hung_ms < a.detect_ms {
        anyhow::bail!(
            "--detect-ms and --backup-lost-ms must be above 0, and --hung-ms at least --detect-ms"
        );
    }
    if a.detect_ms < 60 {
        // (A primary notices a stall of 25 ms and lets a released frame leave at most 50 ms
        // after the acknowledgement: both assume a detection of at least 60 ms.)
        tracing::warn!(
            "--detect-ms {} is under 60: a primary stopped for less than its release lease \
             (50 ms) could still send acknowledged output after a promotion",
            a.detect_ms
        );
    }
    let id = transport::certs::load(&a.certs, &a.host)
        .with_context(|| format!("loading the certificate of '{}'", a.host))?;
    let own = id
        .chain
        .first()
        .ok_or_else(|| anyhow::anyhow!("no certificate for '{}'", a.host))?;
    PeerCert::from_der(own)
        .map_err(anyhow::Error::msg)?
        .check(HostRole::Manager, None)
        .map_err(|e| anyhow::anyhow!("{e} (issue it with `vmatrix certs issue --role manager`)"))?;
    if let Some(dir) = a.state.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            anyhow::bail!(
                "the state file's directory {} does not exist",
                dir.display()
            );
        }
    }
    let mut store = FileStore::new(&a.state);
    let state = store
        .load()
        .with_context(|| format!("refusing to start from {}", a.state.display()))?;
    let events = Arc::new(Mutex::new(events::EventLog::open(&a.events)?));
    let cfg = ManagerConfig {
        detect: Duration::from_millis(a.detect_ms),
        backup_lost: Duration::from_millis(a.backup_lost_ms),
        hung: Duration::from_millis(a.hung_ms),
        drain_limit: Duration::from_millis(a.drain_limit_ms),
        clone_stuck: Duration::from_millis(a.clone_stuck_ms.max(1)),
    };
    let vms = state.vms.len();
    let start = Instant::now();
    let mgr = Manager::new(cfg, state, Duration::ZERO);
    let core = core::Core::new(mgr, store, events.clone(), start);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(a, id, vms, core, events))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    a: ManagerArgs,
    id: transport::certs::Identity,
    vms: usize,
    core: core::Core,
    events: Arc<Mutex<events::EventLog>>,
) -> anyhow::Result<()> {
    let server = transport::Server::bind(a.listen, &id, &agents::quic_config())
        .with_context(|| format!("listening for agents on {}", a.listen))?;
    let server = Arc::new(server);
    let listener = tokio::net::TcpListener::bind(a.api)
        .await
        .with_context(|| format!("serving the API on {}", a.api))?;
    let api_addr = listener.local_addr()?;

    // The decision loop, on a thread of its own (its fsyncs block nobody else).
    let (core_tx, core_rx) = mpsc::channel(core::QUEUE);
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("manager-core".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the decision loop's runtime")
                .and_then(|rt| rt.block_on(core.run(core_rx)));
            let _ = done_tx.send(r);
        })
        .context("spawning the decision loop")?;

    let agents = tokio::spawn(agents::serve(server.clone(), core_tx.clone()));
    let app = api::router(api::Api {
        core: core_tx.clone(),
        events,
        metrics: Arc::new(metrics::Metrics::new()),
    });
    let (stop_api, api_stopped) = oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = api_stopped.await;
            })
            .await
    });
    eprintln!(
        "vmatrix manager: agents on {} (QUIC), API on http://{api_addr}, state {} ({vms} VMs), events {}",
        a.listen,
        a.state.display(),
        a.events.display()
    );

    let mut done_rx = done_rx;
    let result = tokio::select! {
        r = &mut done_rx => Some(r.unwrap_or_else(|_| Err(anyhow::anyhow!("the decision loop panicked")))),
        sig = signal() => {
            match sig {
                Ok(name) => {
                    tracing::info!("{name}: stopping (the agents keep their VMs running)");
                    None
                }
                Err(e) => Some(Err(e)),
            }
        }
    };
    // Stop taking connections and calls, then the loop (if it still runs).
    server.close();
    agents.abort();
    let _ = stop_api.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    let result = match result {
        Some(r) => r,
        None => {
            let _ = core_tx.send(core::Cmd::Stop).await;
            done_rx
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the decision loop panicked")))
        }
    };
    result.map(|()| eprintln!("vmatrix manager: stopped"))
}

/// The first SIGINT or SIGTERM.
async fn signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
