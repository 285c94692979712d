//! `vmatrix lb serve`: the load balancer's driver for one VM managed by `vmatrix manager`
//! (docs/clones.md, "Drain before stop").
//!
//! A process next to the balancer (in the caller's namespace, where the manager's loopback API
//! is; the service itself lives in `--netns`). It owns the nftables service of the VM and,
//! every `--interval-ms`:
//! 1. reads the VM from the manager (`GET /v1/vms/{name}`) and renews its attachment
//!    (`PUT /v1/vms/{name}/balancer` with a lease of `--lease-ms`): while it holds, the manager
//!    drains scaled-down clones instead of stopping them;
//! 2. reads the service's servers and statistics from the kernel;
//! 3. acts on what [`Reconciler::step`] decides (a pure state machine, `reconcile.rs`): the
//!    primary and the running clones in the service at weight 1 once they accept a TCP
//!    connection from the balancer's namespace (`probe.rs`), draining clones quiesced and,
//!    once their last connection ended, reported drained (`PUT .../clones/{slot}/drained`, the
//!    manager then stops them), anything else removed;
//! 4. sends the load (`--signal`: active connections or new connections per second over every
//!    server) to the autoscaler (`PUT /v1/vms/{name}/load`) when the VM autoscales.
//!
//! Every call here blocks (an `nft` process, an HTTP request on loopback): the driver is a
//! plain loop on its own thread, with no async runtime to stall. A drain never blocks it: a
//! draining server is checked once per round from the same statistics. SIGINT/SIGTERM: it
//! detaches (`DELETE .../balancer`: the manager stops draining clones at once) and removes the
//! service unless `--keep`. A manager that cannot be reached is retried every round; the
//! service keeps its servers meanwhile (the kernel forwards without the driver).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use failover::manager::VmView;

use super::probe::Prober;
use super::reconcile::{self, Action, Reconciler, Signal};
use super::{parse_addr, Service, Spec};
use crate::cluster::cli::{Client, ManagerOpt};

/// Flags of `vmatrix lb serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The VM whose service this is.
    #[arg(long)]
    pub vm: String,
    #[command(flatten)]
    pub m: ManagerOpt,
    /// Network namespace the balancer lives in (default: this one).
    #[arg(long)]
    pub netns: Option<String>,
    /// The service's address, a.b.c.d:port.
    #[arg(long)]
    pub vip: String,
    /// Put the VIP on this device (a /32 the service owns).
    #[arg(long)]
    pub vip_dev: Option<String>,
    /// Service name (a-z, 0-9, _; default: the VM's name in lower case, '-' as '_').
    #[arg(long)]
    pub service: Option<String>,
    /// What the autoscaler is fed.
    #[arg(long, value_enum, default_value = "active-conns")]
    pub signal: Signal,
    /// One round every this many ms.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// The attachment's lease, ms (default: 4 rounds, at least 2 s): a driver silent that long
    /// is detached and the VM's draining clones stop.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// A server (the primary, a clone) enters the service once a TCP connection to it from the
    /// balancer's namespace succeeds within this, ms.
    #[arg(long, default_value_t = 300)]
    pub probe_timeout_ms: u64,
    /// Leave the service in the kernel when stopping.
    #[arg(long)]
    pub keep: bool,
}

/// The service name for a VM: lower case, `-` as `_`.
fn service_name(vm: &str) -> String {
    vm.to_ascii_lowercase().replace('-', "_")
}

/// Adopts the service if it exists with this VIP, else creates it (replacing a leftover).
fn open_service(a: &ServeArgs, name: &str, vip: SocketAddrV4) -> anyhow::Result<Service> {
    if let Ok(svc) = Service::open(name, a.netns.as_deref()) {
        if svc.vip().ok() == Some(vip) {
            tracing::info!("service {name}: adopted (VIP {vip})");
            return Ok(svc);
        }
    }
    let mut spec = Spec::new(name, vip);
    spec.netns = a.netns.clone();
    spec.vip_dev = a.vip_dev.clone();
    let mut svc = Service::create(&spec)?;
    svc.detach();
    tracing::info!("service {name}: created (VIP {vip})");
    Ok(svc)
}

/// The driver's state across rounds.
struct Driver {
    vm: String,
    client: Client,
    svc: Service,
    prober: Prober,
    vip: SocketAddrV4,
    lease_ms: u64,
    signal: Signal,
    rec: Reconciler,
    start: Instant,
    /// The last error said (said again only when it changes).
    last_err: Option<String>,
}

impl Driver {
    /// One round; errors are the round's, the next one tries again.
    fn round(&mut self) -> anyhow::Result<()> {
        let vm = self.vm.clone();
        let text = self.client.call("GET", &format!("/v1/vms/{vm}"), None)?;
        let view: VmView = serde_json::from_str(&text).context("the manager's view of the VM")?;
        let body = serde_json::json!({ "vip": self.vip.to_string(), "lease_ms": self.lease_ms });
        self.client
            .call("PUT", &format!("/v1/vms/{vm}/balancer"), Some(body))?;
        let targets = reconcile::targets(&view).map_err(anyhow::Error::msg)?;
        let current = self.svc.servers()?;
        let stats = self.svc.stats()?;
        let active: BTreeMap<SocketAddrV4, u32> =
            stats.iter().map(|s| (s.server, s.open)).collect();
        let ready = self.prober.ready(reconcile::to_probe(&targets, &current))?;
        let now = self.start.elapsed();
        for act in self.rec.step(now, &targets, &current, &active, &ready) {
            self.act(&act)?;
        }
        if view.clones.autoscale.is_some() {
            if let Some(load) = reconcile::load(&stats, self.signal) {
                let body = serde_json::json!({ "load": load });
                self.client
                    .call("PUT", &format!("/v1/vms/{vm}/load"), Some(body))?;
            }
        }
        Ok(())
    }

    fn act(&mut self, act: &Action) -> anyhow::Result<()> {
        tracing::info!(vm = %self.vm, "{act:?}");
        match *act {
            Action::Add(s, w) => self.svc.add(s, w)?,
            Action::Quiesce(s) => self.svc.quiesce(s)?,
            Action::Remove(s) => self.svc.remove(s)?,
            Action::Drained {
                slot,
                server,
                waited_ms,
            } => {
                let body = serde_json::json!({ "drained": true, "active_left": 0,
                    "waited_ms": waited_ms });
                let path = format!("/v1/vms/{}/clones/{slot}/drained", self.vm);
                // Refused (it serves again, or the manager stopped it at its limit): the next
                // round's view says what it is now.
                if let Err(e) = self.client.call("PUT", &path, Some(body)) {
                    tracing::warn!(vm = %self.vm, "drained {server} (slot {slot}): {e:#}");
                }
            }
        }
        Ok(())
    }
}

/// Runs the driver until SIGINT/SIGTERM.
pub fn main(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let vip = parse_addr(&a.vip)?;
    if !(50..=60_000).contains(&a.interval_ms) {
        anyhow::bail!("--interval-ms {} not in 50..=60000", a.interval_ms);
    }
    let lease_ms = a.lease_ms.unwrap_or((a.interval_ms * 4).max(2000));
    if lease_ms < a.interval_ms * 2 {
        anyhow::bail!("--lease-ms {lease_ms} must be at least two rounds (--interval-ms)");
    }
    let name = a.service.clone().unwrap_or_else(|| service_name(&a.vm));
    let client = Client::new(&a.m)?;
    let svc = open_service(&a, &name, vip)?;
    let prober = Prober::start(
        a.netns.as_deref(),
        Duration::from_millis(a.probe_timeout_ms),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let mut d = Driver {
        vm: a.vm.clone(),
        client,
        svc,
        prober,
        vip,
        lease_ms,
        signal: a.signal,
        rec: Reconciler::default(),
        start: Instant::now(),
        last_err: None,
    };
    let interval = Duration::from_millis(a.interval_ms);
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        match d.round() {
            Ok(()) => d.last_err = None,
            Err(e) => {
                let msg = format!("{e:#}");
                if d.last_err.as_ref() != Some(&msg) {
                    tracing::warn!(vm = %d.vm, "round: {msg}");
                    d.last_err = Some(msg);
                }
            }
        }
        while t0.elapsed() < interval && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(interval));
        }
    }
    tracing::info!(vm = %d.vm, "stopping: detaching from the manager");
    if let Err(e) = d
        .client
        .call("DELETE", &format!("/v1/vms/{}/balancer", d.vm), None)
    {
        tracing::warn!("detaching: {e:#}");
    }
    if !a.keep {
        d.svc.delete()?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn service_names_from_vm_names() {
        assert_eq!(super::service_name("Web-1"), "web_1");
    }
}
