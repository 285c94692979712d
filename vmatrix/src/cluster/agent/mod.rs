//! `vmatrix agent`: one per host. It connects to the manager over QUIC with mutual TLS (its
//! certificate must grant the agent role), heartbeats every `--heartbeat-ms` with a report of
//! every VM process it runs, and makes its host run what the manager assigns (see
//! [`supervisor`]), clones included ([`clones`]). Losing the manager never stops a VM: the
//! agent reconnects and goes on.

pub mod base_share;
mod clone_io;
mod clones;
mod limiter;
mod procs;
mod standby;
mod supervisor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use failover::wire::{AgentMsg, ManagerMsg, VERSION};
use transport::roles::HostRole;
use transport::QuicConfig;

use super::link::{read_msg, write_msg};
use supervisor::{HostConfig, Shared, Supervisor, Wake};

/// Flags of `vmatrix agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The manager's address (ip:port).
    #[arg(long)]
    pub manager: SocketAddr,
    /// The manager's name in its certificate.
    #[arg(long, default_value = "manager")]
    pub manager_name: String,
    /// Certificate directory.
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name (its certificate must grant agent, primary and backup).
    #[arg(long)]
    pub host: String,
    /// This host's replication address (its backups listen there).
    #[arg(long)]
    pub repl_ip: String,
    /// Directory for the VMs' images, disks, sockets and logs.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The guest ELF the VMs boot.
    #[arg(long)]
    pub guest: PathBuf,
    /// Tap device for the guests' NICs.
    #[arg(long, default_value = "tap0")]
    pub tap: String,
    /// Memory offered to VMs, MiB.
    #[arg(long, default_value_t = 4096)]
    pub capacity_mib: u64,
    /// Heartbeat (and supervision) interval, ms.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_ms: u64,
    /// Stop the VM processes when the agent stops (by default they go on running and the next
    /// agent on this host adopts them: restarting an agent never stops a VM).
    #[arg(long)]
    pub stop_vms_on_exit: bool,
    /// Extra flag for every `vmatrix primary` it starts (repeat), e.g. `--primary-flag=--epoch-ms=10`.
    #[arg(long = "primary-flag", allow_hyphen_values = true)]
    pub primary_flags: Vec<String>,
    /// The bridge the clones' taps join (this host's guest LAN).
    #[arg(long, default_value = "br0")]
    pub clone_bridge: String,
    /// A clone base older than this is replaced by a fresh snapshot of the primary, s.
    #[arg(long, default_value_t = 60)]
    pub clone_base_refresh_s: u64,
    /// Standby clones kept per VM wanting clones here: built and idle, isolated, each takes
    /// over the next clone assigned here (0: every clone is started when assigned).
    #[arg(long, default_value_t = 1)]
    pub clone_standby: usize,
    /// UDP port of this host's clone base server, on `--repl-ip` (agents of other hosts copy
    /// bases from it; 0: serve none).
    #[arg(long, default_value_t = base_share::DEFAULT_PORT)]
    pub base_port: u16,
    /// Put every VM process (primary, backup, clone) in a cgroup of its own with its VM's
    /// resource limits (`vmatrix vm limits`), cgroup v2 or v1, whichever the host offers.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub cgroups: String,
    /// Name of the agent's own group of VM groups (default `vmatrix-<host>`).
    #[arg(long)]
    pub cgroup_name: Option<String>,
    /// Real-time budget of all this agent's VM groups, µs per second (v1 hosts grouping
    /// real-time tasks: a group without one cannot boost its pauses).
    #[arg(long, default_value_t = 300_000)]
    pub cgroup_rt_us: u64,
    /// Most of that budget one primary's group gets, µs per second (the primaries share the
    /// budget equally up to this): a boosted pause path that used its share up would stall
    /// until the next second, so each gets as much as there is.
    #[arg(long, default_value_t = 300_000)]
    pub cgroup_rt_vm_us: u64,
    /// Test hook: abort at this point as a crashing host would (`after-promote-marker`: right
    /// after a promotion's marker is durable, before the new primary starts).
    #[arg(long, hide = true, value_parser = clap::builder::PossibleValuesParser::new(supervisor::CRASH_POINTS))]
    pub crash_at: Option<String>,
}

/// Runs the agent until SIGINT/SIGTERM; then stops its VM processes.
pub fn main(a: AgentArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let identity = transport::certs::load(&a.certs, &a.host)
        .with_context(|| format!("loading the certificate of '{}'", a.host))?;
    let rt = crate::rt::runtime().context("tokio runtime")?;
    let published = base_share::Published::default();
    let base_port = serve_bases(&a, published.clone());
    let cfg = HostConfig {
        host: a.host.clone(),
        certs: a.certs.clone(),
        repl_ip: a.repl_ip.clone(),
        state: a.state_dir.clone(),
        guest: a.guest.clone(),
        tap: a.tap.clone(),
        exe: std::env::current_exe().context("locating the vmatrix binary")?,
        heartbeat: Duration::from_millis(a.heartbeat_ms.clamp(1, 1000)),
        primary_flags: a.primary_flags.clone(),
        crash_at: a.crash_at.clone(),
        clones: clones::CloneConfig {
            dir: a.state_dir.join("clones"),
            exe: std::env::current_exe().context("locating the vmatrix binary")?,
            bridge: a.clone_bridge.clone(),
            refresh: Duration::from_secs(a.clone_base_refresh_s.max(1)),
            standby: a.clone_standby.min(64),
            published,
            identity: (a.certs.clone(), a.host.clone()),
        },
        base_port,
        cgroups: a.cgroups == "on",
        cgroup_name: a
            .cgroup_name
            .clone()
            .unwrap_or_else(|| format!("vmatrix-{}", a.host)),
        rt_budget: crate::cgroup::RtBudget {
            total_us: a.cgroup_rt_us.min(950_000),
            vm_us: a.cgroup_rt_vm_us.min(950_000),
        },
    };
    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sup = Supervisor::new(cfg.clone(), shared.clone());
    let stop2 = stop.clone();
    let stop_vms = a.stop_vms_on_exit;
    let wake = Arc::new(Wake::default());
    let wake2 = wake.clone();
    let sup = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || sup.run(stop2, stop_vms, &wake2))?;
    let hello = AgentMsg::Hello {
        version: VERSION,
        host: a.host.clone(),
        repl_ip: a.repl_ip.clone(),
        capacity_mib: a.capacity_mib,
    };
    rt.block_on(async {
        // As the manager's (see `manager::agents::quic_config`): detection is the manager's
        // heartbeat timer, not QUIC's idle timeout.
        let quic = QuicConfig {
            keep_alive_ms: 50,
            idle_timeout_ms: 2000,
            ..QuicConfig::default()
        };
        let ep = transport::quic::client(&identity, &quic)?;
        let conn_loop = async {
            loop {
                match session(&ep, &a, &hello, (&shared, &wake), cfg.heartbeat).await {
                    Ok(()) => tracing::warn!("the manager closed the connection"),
                    Err(e) => tracing::warn!("manager connection: {e:#}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = conn_loop => {}
            _ = crate::rt::shutdown_signal() => {}
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    wake.notify();
    let _ = sup.join();
    Ok(ExitCode::SUCCESS)
}

/// Starts this host's clone base server; its port (0: none, said in the log).
fn serve_bases(a: &AgentArgs, published: base_share::Published) -> u16 {
    if a.base_port == 0 {
        return 0;
    }
    let started = a
        .repl_ip
        .parse::<std::net::IpAddr>()
        .map_err(|e| anyhow::anyhow!("replication address '{}': {e}", a.repl_ip))
        .and_then(|ip| {
            let addr = SocketAddr::new(ip, a.base_port);
            base_share::start(addr, (a.certs.clone(), a.host.clone()), published)
        });
    match started {
        Ok(port) => {
            tracing::info!("serving clone bases on {}:{port}", a.repl_ip);
            port
        }
        Err(e) => {
            tracing::warn!("no clone base server ({e:#}): clones here copy no bases");
            0
        }
    }
}

/// One connection to the manager: hello, then heartbeats out and assignments in.
async fn session(
    ep: &quinn::Endpoint,
    a: &AgentArgs,
    hello: &AgentMsg,
    (shared, wake): (&Arc<Mutex<Shared>>, &Wake),
    heartbeat: Duration,
) -> anyhow::Result<()> {
    // Only complete reports are sent: wait for the supervisor's first look at every process.
    while !shared.lock().expect("shared").ready {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let conn = transport::quic::connect_raw(ep, a.manager, &a.manager_name).await?;
    transport::roles::check_peer(&conn, HostRole::Manager, None)?;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the agent stream")?;
    write_msg(&mut send, hello).await?;
    match read_msg::<ManagerMsg>(&mut recv).await? {
        Some(ManagerMsg::Welcome { version }) if version == VERSION => {}
        other => anyhow::bail!("the manager answered {other:?} to hello"),
    }
    tracing::info!("connected to the manager at {}", a.manager);
    let reader = async {
        while let Some(m) = read_msg::<ManagerMsg>(&mut recv).await? {
            if let ManagerMsg::Assign(x) = m {
                shared.lock().expect("shared").want = Some(x);
                wake.notify();
            }
        }
        anyhow::Ok(())
    };
    let writer = async {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let report = shared.lock().expect("shared").report.clone();
            write_msg(&mut send, &AgentMsg::Report(report)).await?;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    tokio::select! {
        r = reader => r,
        r = writer => r,
    }
}
