//! `vmatrix lb create|add|drain|remove|stats|delete|serve`: one address for a service from the shell
//! (docs/clones.md, "One address: the load balancer"). Each command is one short process
//! working on the kernel's record of the service (`super::Service::open`), so a script (or a
//! test) can start clones with `vmatrix clone`, add them, drain one and stop it.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{check_weight, parse_addr, Scheduler, Service, Spec};

/// `vmatrix lb ...`
#[derive(Subcommand, Debug)]
pub enum LbCmd {
    /// Create a service (VIP:port) with no server; replaces a leftover of the same name.
    Create(CreateArgs),
    /// Add real servers (or set their weight).
    Add(ServersArgs),
    /// Stop sending a server new connections, wait until it has none active (or the timeout),
    /// remove it; prints how it ended. Stop the server afterwards.
    Drain(DrainArgs),
    /// Remove real servers at once.
    Remove(ServersArgs),
    /// Per-server statistics (JSON lines): weight, active/inactive connections, connections,
    /// packets, bytes, and rates over --interval-ms.
    Stats(StatsArgs),
    /// Remove the service (its VIP and every server).
    Delete(Which),
    /// Drive the service of a VM of `vmatrix manager`: the primary and its running clones in
    /// it, scaled-down clones drained before the manager stops them, the load sent to its
    /// autoscaler; runs until SIGINT/SIGTERM.
    Serve(super::serve::ServeArgs),
}

/// Which service.
#[derive(Args, Debug)]
pub struct Which {
    /// Service name (a-z, 0-9, _; at most 24).
    #[arg(long)]
    pub name: String,
    /// Network namespace the balancer lives in (default: this one).
    #[arg(long)]
    pub netns: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub which: Which,
    /// The service's address, a.b.c.d:port.
    #[arg(long)]
    pub vip: String,
    /// rr (weighted round robin) or random.
    #[arg(long, default_value = "rr")]
    pub scheduler: String,
    /// Put the VIP on this device (a /32 the service owns and removes).
    #[arg(long)]
    pub vip_dev: Option<String>,
    /// No masquerade: the balancer must then be the servers' gateway for the replies.
    #[arg(long)]
    pub no_snat: bool,
}

#[derive(Args, Debug)]
pub struct ServersArgs {
    #[command(flatten)]
    pub which: Which,
    /// Real servers, a.b.c.d:port (repeat or comma-separate).
    #[arg(long = "server", required = true, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Weight of each (0..=100; 0: no new connections).
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    pub which: Which,
    #[arg(long)]
    pub server: String,
    /// Give up waiting after this long and remove it anyway.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub which: Which,
    /// Sample twice this far apart to print rates (0: counts only).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

fn open(w: &Which) -> anyhow::Result<Service> {
    Ok(Service::open(&w.name, w.netns.as_deref())?)
}

/// The service's servers and weights, one JSON line.
fn print_servers(svc: &Service) -> anyhow::Result<()> {
    let m: serde_json::Map<String, serde_json::Value> = svc
        .servers()?
        .into_iter()
        .map(|(s, w)| (s.to_string(), w.into()))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "service": svc.name(), "servers": m })
    );
    Ok(())
}

pub fn main(cmd: LbCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LbCmd::Create(a) => {
            let vip = parse_addr(&a.vip)?;
            let spec = Spec {
                name: a.which.name.clone(),
                vip,
                scheduler: a.scheduler.parse::<Scheduler>()?,
                netns: a.which.netns.clone(),
                vip_dev: a.vip_dev.clone(),
                snat: !a.no_snat,
            };
            let mut svc = Service::create(&spec)?;
            svc.detach();
            let line = serde_json::json!({
                "service": svc.name(), "vip": vip.to_string(), "scheduler": spec.scheduler,
                "netns": spec.netns, "vip_dev": spec.vip_dev, "snat": spec.snat,
            });
            println!("{line}");
        }
        LbCmd::Add(a) => {
            let servers = a
                .servers
                .iter()
                .map(|s| parse_addr(s))
                .collect::<Result<Vec<_>, _>>()?;
            check_weight(a.weight)?;
            let mut svc = open(&a.which)?;
            for s in servers {
                svc.add(s, a.weight)?;
            }
            print_servers(&svc)?;
        }
        LbCmd::Remove(a) => {
            let servers = a
                .servers
                .iter()
                .map(|s| parse_addr(s))
                .collect::<Result<Vec<_>, _>>()?;
            let mut svc = open(&a.which)?;
            for s in servers {
                svc.remove(s)?;
            }
            print_servers(&svc)?;
        }
        LbCmd::Drain(a) => {
            let server = parse_addr(&a.server)?;
            let d = open(&a.which)?.drain(server, Duration::from_millis(a.timeout_ms))?;
            println!("{}", serde_json::to_string(&d)?);
        }
        LbCmd::Stats(a) => {
            let mut svc = open(&a.which)?;
            let mut stats = svc.stats()?;
            if a.interval_ms > 0 {
                std::thread::sleep(Duration::from_millis(a.interval_ms));
                stats = svc.stats()?;
            }
            for s in stats {
                println!("{}", serde_json::to_string(&s)?);
            }
        }
        LbCmd::Delete(w) => open(&w)?.delete()?,
        LbCmd::Serve(a) => return super::serve::main(a),
    }
    Ok(ExitCode::SUCCESS)
}
