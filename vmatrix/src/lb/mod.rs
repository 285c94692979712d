//! One address for a service, spread over the primary and its clones (issue 11, part 2a;
//! docs/clones.md, "One address: the load balancer").
//!
//! A [`Service`] is a virtual address (VIP:port) whose new TCP connections the kernel spreads
//! over real servers (the primary's service address and each clone's), with Linux's own NAT:
//! **nftables** DNAT through a `numgen` map (this machine's kernel has no IPVS: built without
//! `CONFIG_IP_VS` and without module support, `ipvsadm` answers "Protocol not available").
//! Existing connections follow their conntrack entry and never move; a server is drained by
//! taking it out of the map (IPVS's weight 0) and waiting until the kernel's connection table
//! shows none of its connections active. Per-server statistics come from nft counters and
//! conntrack, for an autoscaler.
//!
//! The kernel's ruleset is the only record of a service (`nft.rs`): every operation re-reads
//! it under a lock file, so the `vmatrix lb` commands and a manager in another process work on
//! the same service. A service made by [`Service::create`] is removed when its handle is
//! dropped, unless [`Service::detach`]ed; a crashed run's leftover of the same name is replaced
//! by the next `create`.
//!
//! ```ignore
//! use crate::lb;
//! use std::time::Duration;
//! let spec = lb::Spec::new("web", lb::parse_addr("10.77.5.100:7000")?)
//!     .netns("vmxl5").vip_dev("lan0");
//! let mut svc = lb::Service::create(&spec)?;
//! svc.add(lb::parse_addr("10.77.5.2:7000")?, 1)?;   // the primary
//! svc.add(lb::parse_addr("10.77.5.10:7000")?, 1)?;  // a clone
//! let stats = svc.stats()?;                           // per server: active, conns/s, packets
//! svc.drain(lb::parse_addr("10.77.5.10:7000")?, Duration::from_secs(30))?; // then stop it
//! ```

pub mod cli;
mod conntrack;
mod nft;
pub mod probe;
pub mod reconcile;
pub mod serve;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Errors of the load balancer.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("{0:?} is not an IPv4 address with a port (a.b.c.d:port)")]
    BadAddr(String),
    #[error("{what} {value:?}: {why}")]
    BadInput {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "{0} not found on PATH: the load balancer needs it (Debian package {pkg}; \
         scripts/lib.sh ensure_packages installs it)", pkg = package_of(.0)
    )]
    ToolMissing(&'static str),
    #[error("network namespace {0:?} does not exist")]
    NoNetns(String),
    #[error("no load-balancer service {name:?}{}", in_ns(.netns))]
    NoService { name: String, netns: Option<String> },
    #[error("{server} is not a server of service {name:?}")]
    NoServer { server: SocketAddrV4, name: String },
    #[error(
        "IP forwarding is off{}: a NAT load balancer forwards (sysctl -w net.ipv4.ip_forward=1)",
        in_ns(.0)
    )]
    ForwardingOff(Option<String>),
    #[error("{cmd}: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected nft listing: {0}")]
    Parse(String),
    #[error("entering network namespace {ns:?}: {source}")]
    Setns { ns: String, source: std::io::Error },
    #[error("the readiness prober's thread is gone")]
    ProberGone,
}

fn package_of(tool: &str) -> &'static str {
    match tool {
        "nft" => "nftables",
        _ => "iproute2",
    }
}

fn in_ns(ns: &Option<String>) -> String {
    ns.as_ref()
        .map(|n| format!(" in network namespace {n:?}"))
        .unwrap_or_default()
}

/// How new connections are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scheduler {
    /// Weighted round robin (`numgen inc`): IPVS's `wrr`.
    RoundRobin,
    /// Weighted random (`numgen random`).
    Random,
}

impl Scheduler {
    fn as_str(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "rr",
            Scheduler::Random => "random",
        }
    }

    fn numgen(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "inc",
            Scheduler::Random => "random",
        }
    }
}

impl FromStr for Scheduler {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s {
            "rr" | "wrr" => Ok(Scheduler::RoundRobin),
            "random" => Ok(Scheduler::Random),
            _ => Err(LbError::BadInput {
                what: "scheduler",
                value: s.to_string(),
                why: "must be rr (weighted round robin) or random",
            }),
        }
    }
}

/// Parses a VIP or a real server: `a.b.c.d:port`, a unicast address, port not 0.
pub fn parse_addr(s: &str) -> Result<SocketAddrV4, LbError> {
    let a: SocketAddrV4 = s.trim().parse().map_err(|_| LbError::BadAddr(s.into()))?;
    let ip = a.ip();
    if a.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(LbError::BadInput {
            what: "address",
            value: s.into(),
            why: "must be a unicast IPv4 address and a port other than 0",
        });
    }
    Ok(a)
}

/// The most entries a dispatch map has (the sum of the weights).
pub const MAX_TOTAL_WEIGHT: u32 = 1024;
/// The largest weight of one server.
pub const MAX_WEIGHT: u32 = 100;

/// Refuses a weight above [`MAX_WEIGHT`].
pub fn check_weight(weight: u32) -> Result<(), LbError> {
    match weight <= MAX_WEIGHT {
        true => Ok(()),
        false => Err(LbError::BadInput {
            what: "weight",
            value: weight.to_string(),
            why: "must be 0..=100",
        }),
    }
}

/// What [`Service::create`] makes.
#[derive(Debug, Clone)]
pub struct Spec {
    /// 1..=24 of `a-z 0-9 _`: the table is `ip vmatrix_lb_<name>`.
    pub name: String,
    pub vip: SocketAddrV4,
    pub scheduler: Scheduler,
    /// The network namespace the balancer lives in (None: this process's).
    pub netns: Option<String>,
    /// Put the VIP on this device as a /32 (the service's own: removed with it).
    pub vip_dev: Option<String>,
    /// Masquerade the service's connections to the balancer's address, so the replies come
    /// back through it whatever the servers' routes (off: the balancer must be their gateway).
    pub snat: bool,
}

impl Spec {
    /// Round robin, SNAT on, this namespace, the VIP not put on any device.
    pub fn new(name: &str, vip: SocketAddrV4) -> Spec {
        Spec {
            name: name.to_string(),
            vip,
            scheduler: Scheduler::RoundRobin,
            netns: None,
            vip_dev: None,
            snat: true,
        }
    }

    pub fn netns(mut self, ns: &str) -> Spec {
        self.netns = Some(ns.to_string());
        self
    }

    pub fn vip_dev(mut self, dev: &str) -> Spec {
        self.vip_dev = Some(dev.to_string());
        self
    }
}

fn check_name(what: &'static str, v: &str, max: usize, extra: &[u8]) -> Result<(), LbError> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b));
    match ok {
        true => Ok(()),
        false => Err(LbError::BadInput {
            what,
            value: v.into(),
            why: "unsupported characters or length",
        }),
    }
}

fn check_netns(ns: &Option<String>) -> Result<(), LbError> {
    if let Some(n) = ns {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !n.starts_with('.');
        if !ok {
            return Err(LbError::BadInput {
                what: "network namespace",
                value: n.clone(),
                why: "unsupported characters or length",
            });
        }
        if !Path::new("/run/netns").join(n).exists() {
            return Err(LbError::NoNetns(n.clone()));
        }
    }
    Ok(())
}

/// Whether `tool` is an executable file in a directory of PATH.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(tool)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// Runs programs in the balancer's namespace.
#[derive(Debug, Clone)]
struct Runner {
    netns: Option<String>,
}

impl Runner {
    fn new(netns: Option<String>) -> Result<Runner, LbError> {
        for tool in ["nft", "ip"] {
            if !on_path(tool) {
                return Err(LbError::ToolMissing(tool));
            }
        }
        check_netns(&netns)?;
        Ok(Runner { netns })
    }

    fn command(&self, prog: &str, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
            None => Command::new(prog),
        };
        c.args(args);
        c
    }

    /// Runs `prog args` with `stdin`; its stdout, or a typed error with its stderr.
    fn run(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LbError> {
        let cmd = format!("{prog} {}", args.join(" "));
        let spawn = |source| LbError::Spawn {
            cmd: cmd.clone(),
            source,
        };
        let mut child = self
            .command(prog, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        if let (Some(mut i), Some(text)) = (child.stdin.take(), stdin) {
            i.write_all(text.as_bytes()).map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(LbError::Command {
                cmd: format!("{cmd}{}", in_ns(&self.netns)),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nft(&self, script: &str) -> Result<(), LbError> {
        tracing::debug!(netns = ?self.netns, "nft -f -\n{script}");
        self.run("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn read(&self, path: &str) -> Result<String, LbError> {
        match &self.netns {
            // /proc/net and /proc/sys/net are those of the reader's namespace.
            Some(_) => self.run("cat", &[path], None),
            None => std::fs::read_to_string(path).map_err(|source| LbError::Spawn {
                cmd: format!("read {path}"),
                source,
            }),
        }
    }
}

/// A server as [`Service::stats`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerStats {
    pub server: SocketAddrV4,
    /// 0: draining (no new connections).
    pub weight: u32,
    /// Connections in the handshake or established.
    pub active: u32,
    /// Connections closing (FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE).
    pub inactive: u32,
    /// Connections not yet done: active or half closed (FIN_WAIT, CLOSE_WAIT, LAST_ACK), what
    /// a drain waits for.
    pub open: u32,
    /// Connections sent to it since it was added.
    pub connections: u64,
    /// Packets and bytes of its connections (both directions) that went through the balancer.
    pub packets: u64,
    pub bytes: u64,
    /// Rates since this handle's previous `stats` (None the first time).
    pub conns_per_s: Option<f64>,
    pub packets_per_s: Option<f64>,
}

/// How a drain ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drained {
    pub server: SocketAddrV4,
    /// Its active connections reached 0 before the timeout.
    pub drained: bool,
    /// Active connections when it was removed (they keep their NAT mapping until they end).
    pub active_left: u32,
    pub waited_ms: u64,
}

/// A load-balancer service (see the module's doc).
#[derive(Debug)]
pub struct Service {
    name: String,
    runner: Runner,
    owned: bool,
    last: Option<Sample>,
}

/// When, and per server its connections and packets so far: what rates are computed from.
type Sample = (Instant, BTreeMap<SocketAddrV4, (u64, u64)>);

impl Service {
    /// Creates the service with no server (replacing a leftover of the same name), and the
    /// VIP on `vip_dev` if given. Removed when dropped, unless detached.
    pub fn create(spec: &Spec) -> Result<Service, LbError> {
        check_name("service name", &spec.name, 24, b"_")?;
        if let Some(d) = &spec.vip_dev {
            check_name("VIP device", d, 15, b"_.-")
                .or_else(|_| check_name("VIP device", &d.to_ascii_lowercase(), 15, b"_.-"))?;
        }
        let runner = Runner::new(spec.netns.clone())?;
        if runner.read("/proc/sys/net/ipv4/ip_forward")?.trim() != "1" {
            return Err(LbError::ForwardingOff(spec.netns.clone()));
        }
        let svc = Service {
            name: spec.name.clone(),
            runner,
            owned: true,
            last: None,
        };
        let _lock = svc.lock()?;
        // A leftover's VIP (it may be on another device) goes with it.
        if let Ok(old) = svc.state() {
            svc.remove_vip(&old);
        }
        let st = nft::State {
            vip: spec.vip,
            scheduler: spec.scheduler,
            snat: spec.snat,
            vip_dev: spec.vip_dev.clone(),
            servers: BTreeMap::new(),
            counters: BTreeMap::new(),
        };
        svc.runner.nft(&nft::create_script(&spec.name, &st))?;
        if let Some(dev) = &spec.vip_dev {
            let cidr = format!("{}/32", spec.vip.ip());
            if let Err(e) = svc
                .runner
                .run("ip", &["addr", "replace", &cidr, "dev", dev], None)
            {
                let _ = svc
                    .runner
                    .nft(&format!("delete table ip {}\n", nft::table(&svc.name)));
                return Err(e);
            }
        }
        Ok(svc)
    }

    /// The existing service `name` (not removed when dropped).
    pub fn open(name: &str, netns: Option<&str>) -> Result<Service, LbError> {
        check_name("service name", name, 24, b"_")?;
        let svc = Service {
            name: name.to_string(),
            runner: Runner::new(netns.map(str::to_string))?,
            owned: false,
            last: None,
        };
        svc.state()?;
        Ok(svc)
    }

    /// Leaves the service in the kernel when this handle is dropped.
    pub fn detach(&mut self) {
        self.owned = false;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VIP.
    pub fn vip(&self) -> Result<SocketAddrV4, LbError> {
        Ok(self.state()?.vip)
    }

    /// Every server and its weight (0: draining).
    pub fn servers(&self) -> Result<BTreeMap<SocketAddrV4, u32>, LbError> {
        Ok(self.state()?.servers)
    }

    fn lock(&self) -> Result<File, LbError> {
        let ns = self.runner.netns.as_deref().unwrap_or("-");
        let path = std::env::temp_dir().join(format!("vmatrix-lb-{ns}-{}.lock", self.name));
        let err = |source| LbError::Lock {
            path: path.clone(),
            source,
        };
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        f.lock().map_err(err)?;
        Ok(f)
    }

    fn state(&self) -> Result<nft::State, LbError> {
        let t = nft::table(&self.name);
        match self
            .runner
            .run("nft", &["-j", "list", "table", "ip", &t], None)
        {
            Ok(json) => nft::parse_state(&json),
            Err(LbError::Command { stderr, .. }) if stderr.contains("No such file") => {
                Err(LbError::NoService {
                    name: self.name.clone(),
                    netns: self.runner.netns.clone(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Applies `change` to the servers' weights, under the lock, from the kernel's state.
    fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<SocketAddrV4, u32>) -> Result<(), LbError>,
    ) -> Result<(), LbError> {
        let _lock = self.lock()?;
        let st = self.state()?;
        let mut servers = st.servers.clone();
        change(&mut servers)?;
        let total: u32 = servers.values().sum();
        if total > MAX_TOTAL_WEIGHT {
            return Err(LbError::BadInput {
                what: "total weight",
                value: total.to_string(),
                why: "the sum of the weights is at most 1024",
            });
        }
        self.runner
            .nft(&nft::update_script(&self.name, &st, &servers))
    }

    /// Adds `server` with `weight` (1..=100), or sets the weight of a server already there (0:
    /// no new connections, as IPVS's weight 0). Existing connections are never moved.
    pub fn add(&mut self, server: SocketAddrV4, weight: u32) -> Result<(), LbError> {
        check_weight(weight)?;
        self.update(|s| {
            s.insert(server, weight);
            Ok(())
        })
    }

    /// Weight 0: `server` gets no new connection; its existing ones go on.
    pub fn quiesce(&mut self, server: SocketAddrV4) -> Result<(), LbError> {
        let name = self.name.clone();
        self.update(|s| match s.get_mut(&server) {
            Some(w) => {
                *w = 0;
                Ok(())
            }
            None => Err(LbError::NoServer { server, name }),
        })
    }

    /// Removes `server` at once (its open connections keep their NAT mapping until they end).
    pub fn remove(&mut self, server: SocketAddrV4) -> Result<(), LbError> {
        let name = self.name.clone();
        self.update(|s| match s.remove(&server) {
            Some(_) => Ok(()),
            None => Err(LbError::NoServer { server, name }),
        })
    }

    /// Drains `server`: no new connections, then waits until none of its connections is active
    /// or `timeout` passed, then removes it. Stop the server only after this returns.
    pub fn drain(&mut self, server: SocketAddrV4, timeout: Duration) -> Result<Drained, LbError> {
        let t0 = Instant::now();
        self.quiesce(server)?;
        let vip = self.vip()?;
        let active = |r: &Runner| -> Result<u32, LbError> {
            let table = r.read("/proc/net/nf_conntrack")?;
            Ok(conntrack::count(&table, vip)
                .get(&server)
                .map_or(0, |c| c.open))
        };
        let mut left = active(&self.runner)?;
        while left > 0 && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
            left = active(&self.runner)?;
        }
        self.remove(server)?;
        Ok(Drained {
            server,
            drained: left == 0,
            active_left: left,
            waited_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Per-server statistics, with rates since this handle's previous call.
    pub fn stats(&mut self) -> Result<Vec<ServerStats>, LbError> {
        let st = self.state()?;
        let table = self.runner.read("/proc/net/nf_conntrack")?;
        let conns = conntrack::count(&table, st.vip);
        let now = Instant::now();
        let mut sample = BTreeMap::new();
        let mut out = Vec::new();
        for (&server, &weight) in &st.servers {
            let i = nft::id(server);
            let new = st.counters.get(&format!("new_{i}")).map_or(0, |c| c.0);
            let (packets, bytes) = st
                .counters
                .get(&format!("pkts_{i}"))
                .copied()
                .unwrap_or_default();
            let c = conns.get(&server).copied().unwrap_or_default();
            let rate = |cur: u64, f: fn(&(u64, u64)) -> u64| {
                let (t, prev) = self.last.as_ref()?;
                let dt = now.duration_since(*t).as_secs_f64();
                let p = prev.get(&server).map(f)?;
                (dt > 0.0).then(|| cur.saturating_sub(p) as f64 / dt)
            };
            out.push(ServerStats {
                server,
                weight,
                active: c.active,
                inactive: c.inactive,
                open: c.open,
                connections: new,
                packets,
                bytes,
                conns_per_s: rate(new, |p| p.0),
                packets_per_s: rate(packets, |p| p.1),
            });
            sample.insert(server, (new, packets));
        }
        self.last = Some((now, sample));
        Ok(out)
    }

    fn remove_vip(&self, st: &nft::State) {
        if let Some(dev) = &st.vip_dev {
            let cidr = format!("{}/32", st.vip.ip());
            let _ = self
                .runner
                .run("ip", &["addr", "del", &cidr, "dev", dev], None);
        }
    }

    /// Removes the service: its table (every server with it) and its VIP.
    pub fn delete(mut self) -> Result<(), LbError> {
        self.owned = false;
        self.delete_now()
    }

    fn delete_now(&self) -> Result<(), LbError> {
        let _lock = self.lock()?;
        let st = self.state()?;
        self.remove_vip(&st);
        self.runner
            .nft(&format!("delete table ip {}\n", nft::table(&self.name)))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.delete_now() {
                tracing::warn!(service = %self.name, "removing the load-balancer service: {e}");
            }
        }
    }
}
