//! The decision loop: the one task that owns the [`Manager`] state machine.
//!
//! It runs on a thread of its own (with a one-thread tokio runtime) so the synchronous fsync of
//! every `Persist` blocks nothing else: agents' connections and the API keep being served while
//! a save is under way, and nothing after the save is acted on before it completed. Everything
//! reaches it as a [`Cmd`] on one bounded channel; it calls `tick` every [`TICK`], and after
//! every input, call and tick drains the machine's outputs in order:
//!
//! - `Persist` → [`FileStore::save`]; if that fails the loop ends with the error (the process
//!   exits non-zero): acting on a decision that is not durable would break fencing;
//! - `Assign` → the host's connection's latest-value channel (never waits: the connection's
//!   writer task sends the newest whole assignment when its stream can take it);
//! - `Event` → the [`EventLog`].
//!
//! An API call that changes state is answered only after its outputs were drained, so a
//! success means the decision is on disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failover::clones::{AutoscaleSpec, Balancer};
use failover::limits::Limits;
use failover::manager::{
    ApiError, DrainedReport, HostView, Input, Manager, Output, ScaleRequest, VmView, TICK,
};
use failover::model::{Assignments, HostId, Report, VmSpec};
use failover::store::{FileStore, Store};
use tokio::sync::{mpsc, oneshot, watch};

use super::events::EventLog;

/// Identifies one agent connection (a newer one from the same host replaces it).
pub type ConnId = u64;

/// Capacity of the loop's channel.
pub const QUEUE: usize = 1024;

/// The loop's side of one agent connection.
#[derive(Debug)]
pub struct AgentLink {
    /// The newest whole assignment for the host (the connection's writer sends it).
    pub assign: watch::Sender<Option<Assignments>>,
    /// The connection (closed when a newer one replaces it).
    pub conn: quinn::Connection,
}

/// What the API asks.
#[derive(Debug)]
pub enum ApiCall {
    /// Every VM.
    Vms(oneshot::Sender<Vec<VmView>>),
    /// One VM.
    Vm(String, oneshot::Sender<Option<VmView>>),
    /// Creates a VM; answers its view once the record is durable.
    Create(VmSpec, Limits, oneshot::Sender<Result<VmView, ApiError>>),
    /// Sets a VM's resource limits; answers its view once the record is durable.
    Limits(String, Limits, oneshot::Sender<Result<VmView, ApiError>>),
    /// Deletes a VM.
    Delete(String, oneshot::Sender<Result<(), ApiError>>),
    /// Promotes a synced backup (`to`, or the most advanced); answers the new term.
    Failover(
        String,
        Option<String>,
        oneshot::Sender<Result<u64, ApiError>>,
    ),
    /// Moves the primary to a host.
    Migrate(String, String, oneshot::Sender<Result<(), ApiError>>),
    /// Sets a VM's clone count; answers its view once the record is durable.
    Scale(
        String,
        ScaleRequest,
        oneshot::Sender<Result<VmView, ApiError>>,
    ),
    /// Sets (or ends) a VM's autoscaling, with the first clone's address if given.
    Autoscale(
        String,
        Option<AutoscaleSpec>,
        Option<String>,
        oneshot::Sender<Result<(), ApiError>>,
    ),
    /// A load sample for a VM's autoscaler.
    Load(String, f64, oneshot::Sender<Result<(), ApiError>>),
    /// A load balancer's driver attaches to a VM or renews its lease.
    Attach(String, Balancer, oneshot::Sender<Result<(), ApiError>>),
    /// The driver detaches.
    Detach(String, oneshot::Sender<Result<(), ApiError>>),
    /// The driver drained a clone (VM, slot).
    Drained(
        String,
        u32,
        DrainedReport,
        oneshot::Sender<Result<(), ApiError>>,
    ),
    /// Every host.
    Hosts(oneshot::Sender<Vec<HostView>>),
    /// Figures for the metrics page.
    Figures(oneshot::Sender<Figures>),
}

/// Figures for the metrics page.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Status of every VM.
    pub vm_status: Vec<String>,
    /// Hosts whose agent heartbeats.
    pub hosts_up: u64,
    /// Promotions after a detected failure.
    pub failovers: u64,
    /// Promotions asked for (failover, migration).
    pub switchovers: u64,
    /// Last detection time, ms.
    pub last_detect_ms: Option<u64>,
    /// Last promotion time, ms.
    pub last_promote_ms: Option<u64>,
}

/// Everything the loop is told.
#[derive(Debug)]
pub enum Cmd {
    /// An agent connection said a valid Hello and was welcomed.
    Hello {
        /// The connection.
        conn: ConnId,
        /// Its host (as in its certificate).
        host: HostId,
        /// Its replication address.
        repl_ip: String,
        /// Memory it offers, MiB.
        capacity_mib: u64,
        /// Where its assignments go.
        link: AgentLink,
    },
    /// A report on a connection.
    Report {
        /// The connection.
        conn: ConnId,
        /// Its host.
        host: HostId,
        /// The report.
        report: Report,
    },
    /// A connection ended.
    Gone {
        /// The connection.
        conn: ConnId,
        /// Its host.
        host: HostId,
    },
    /// An API call.
    Api(ApiCall),
    /// Stop the loop.
    Stop,
}

/// The loop's state.
pub struct Core {
    mgr: Manager,
    store: FileStore,
    events: Arc<Mutex<EventLog>>,
    links: BTreeMap<HostId, (ConnId, AgentLink)>,
    start: Instant,
}

impl Core {
    /// A loop around `mgr` (made at time zero of `start`).
    pub fn new(
        mgr: Manager,
        store: FileStore,
        events: Arc<Mutex<EventLog>>,
        start: Instant,
    ) -> Core {
        Core {
            mgr,
            store,
            events,
            links: BTreeMap::new(),
            start,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Runs until [`Cmd::Stop`] (or every sender is gone); an error means a decision could not
    /// be made durable.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    let now = self.now();
                    self.mgr.tick(now);
                    self.drain()?;
                }
                cmd = rx.recv() => match cmd {
                    None | Some(Cmd::Stop) => break,
                    Some(cmd) => self.handle(cmd)?,
                },
            }
        }
        for (_, (_, link)) in std::mem::take(&mut self.links) {
            transport::quic::close(&link.conn, transport::quic::code::SHUTDOWN, "manager stops");
        }
        Ok(())
    }

    fn handle(&mut self, cmd: Cmd) -> anyhow::Result<()> {
        let now = self.now();
        match cmd {
            Cmd::Hello {
                conn,
                host,
                repl_ip,
                capacity_mib,
                link,
            } => {
                if let Some((old, old_link)) = self.links.insert(host.clone(), (conn, link)) {
                    tracing::info!("agent {host}: connection {conn} replaces connection {old}");
                    transport::quic::close(
                        &old_link.conn,
                        transport::quic::code::DONE,
                        "replaced by a newer connection from the same host",
                    );
                }
                self.mgr.handle(
                    now,
                    Input::Hello {
                        host,
                        repl_ip,
                        capacity_mib,
                    },
                );
            }
            Cmd::Report { conn, host, report } => {
                if self.current(&host, conn) {
                    self.mgr.handle(now, Input::Report { host, report });
                }
            }
            Cmd::Gone { conn, host } => {
                if self.current(&host, conn) {
                    self.links.remove(&host);
                    self.mgr.handle(now, Input::Gone { host });
                }
            }
            Cmd::Api(call) => return self.api(now, call),
            Cmd::Stop => {}
        }
        self.drain()
    }

    fn current(&self, host: &str, conn: ConnId) -> bool {
        self.links.get(host).is_some_and(|(c, _)| *c == conn)
    }

    fn api(&mut self, now: Duration, call: ApiCall) -> anyhow::Result<()> {
        // Replies to callers that went away are dropped silently.
        match call {
            ApiCall::Vms(tx) => {
                let _ = tx.send(self.mgr.vms(now));
            }
            ApiCall::Vm(name, tx) => {
                let _ = tx.send(self.mgr.vm(now, &name));
            }
            ApiCall::Hosts(tx) => {
                let _ = tx.send(self.mgr.host_views(now));
            }
            ApiCall::Figures(tx) => {
                let c = self.mgr.counters();
                let f = Figures {
                    vm_status: self.mgr.vms(now).into_iter().map(|v| v.status).collect(),
                    hosts_up: self
                        .mgr
                        .host_views(now)
                        .iter()
                        .filter(|h| h.status == "up")
                        .count() as u64,
                    failovers: c.failovers,
                    switchovers: c.switchovers,
                    last_detect_ms: c.last_detect_ms,
                    last_promote_ms: c.last_promote_ms,
                };
                let _ = tx.send(f);
            }
            ApiCall::Create(spec, limits, tx) => {
                let name = spec.name.clone();
                // Limits checked first: a VM is never created without the limits asked for.
                let r = limits
                    .validate(spec.mem_mib)
                    .map_err(ApiError::Invalid)
                    .and_then(|()| self.mgr.create(now, spec))
                    .and_then(|()| self.mgr.set_limits(now, &name, limits));
                self.drain()?;
                let r = r.map(|()| self.mgr.vm(self.now(), &name).expect("just created"));
                let _ = tx.send(r);
            }
            ApiCall::Limits(name, limits, tx) => {
                let r = self.mgr.set_limits(now, &name, limits);
                self.drain()?;
                let r = r.map(|()| self.mgr.vm(self.now(), &name).expect("it exists"));
                let _ = tx.send(r);
            }
            ApiCall::Delete(name, tx) => {
                let r = self.mgr.delete(now, &name);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Failover(name, to, tx) => {
                let r = self.mgr.failover(now, &name, to.as_deref());
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Scale(name, req, tx) => {
                let r = self.mgr.scale(now, &name, req);
                self.drain()?;
                let r = r.and_then(|()| {
                    self.mgr
                        .vm(self.now(), &name)
                        .ok_or_else(|| ApiError::NotFound(name.clone()))
                });
                let _ = tx.send(r);
            }
            ApiCall::Autoscale(name, spec, ip, tx) => {
                let r = self.mgr.autoscale(now, &name, spec, ip);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Load(name, load, tx) => {
                let r = self.mgr.load_sample(now, &name, load);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Attach(name, b, tx) => {
                let r = self.mgr.attach_balancer(now, &name, b);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Detach(name, tx) => {
                let r = self.mgr.detach_balancer(now, &name);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Drained(name, slot, report, tx) => {
                let r = self.mgr.clone_drained(now, &name, slot, report);
                self.drain()?;
                let _ = tx.send(r);
            }
            ApiCall::Migrate(name, to, tx) => {
                let r = self.mgr.migrate(now, &name, &to);
                self.drain()?;
                let _ = tx.send(r);
            }
        }
        Ok(())
    }

    /// Acts on the machine's outputs, in order.
    fn drain(&mut self) -> anyhow::Result<()> {
        while let Some(out) = self.mgr.poll_output() {
            match out {
                Output::Persist(state) => {
                    // Durable before anything after it is acted on.
                    if let Err(e) = self.store.save(&state) {
                        tracing::error!(
                            "cannot persist the cluster state to {}: {e}; stopping: acting on \
                             decisions that are not durable would break fencing",
                            self.store.path().display()
                        );
                        return Err(anyhow::Error::new(e).context(format!(
                            "persisting the cluster state to {}",
                            self.store.path().display()
                        )));
                    }
                }
                Output::Assign { host, assignments } => match self.links.get(&host) {
                    Some((conn, link)) => {
                        tracing::debug!(
                            "agent {host} (connection {conn}): assignment of {} VMs",
                            assignments.vms.len()
                        );
                        link.assign.send_replace(Some(assignments));
                    }
                    None => tracing::warn!("assignment for {host}, which has no connection"),
                },
                Output::Event(e) => self
                    .events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(e),
            }
        }
        // After the assignments left: the incident's record is durable without delaying them.
        self.events.lock().unwrap_or_else(|p| p.into_inner()).sync();
        Ok(())
    }
}
