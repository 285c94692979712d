//! Injecting and healing each fault kind on this machine.
//!
//! Targets are roles; [`Resolver`] turns them into hosts from the manager's view
//! (`GET /v1/vms`) at injection time, or from the last view it had if the manager does not
//! answer (it may be the fault's victim: killed or stalled), saying so in the injection's note.
//!
//! | kind | injected | healed |
//! |---|---|---|
//! | kill host | `cluster.sh kill` (links down, every process SIGKILLed) | `cluster.sh revive`, the host's agent restarted |
//! | kill manager | SIGKILL | restarted on its state and events files |
//! | kill vm | SIGKILL of the pid in `<state dir>/<vm>/<role>.pid` | nothing: the agent notices |
//! | stall host / manager / vm | SIGSTOP of every process of the host's namespace / the manager / the VM process | SIGCONT (of the host's processes as listed again) |
//! | partitions, loss, swizzle | an nftables table per fault (per link for swizzle) in a host's namespace ([`super::nft`]) | the table deleted |
//! | crash in checkpoint | the primary's replication datagrams delayed 10 ms through a proxy; once it holds some, the victim's host crashes as above | as a crashed host; the proxy removed |
//! | crash in sync | the backup's process killed (its image removed first if the backup is the victim), its agent restarts it, the primary syncs it again through a counting proxy; once the new session's datagrams flow, the victim's host crashes ([`sync`]) | as a crashed host; the proxy removed |
//! | link delay, duplication, reordering | the primary's datagrams to the backup's replication port routed through a [`Netem`] proxy in the runner's namespace ([`crate::netem`]) | route removed, proxy stopped |
//! | disk full | a file filling the backup host's state directory (a tmpfs of its own) | the file deleted |

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use rustix::process::Signal;

use super::api::{Api, Roles};
use super::cluster::Cluster;
use super::nft::{self, Table};
use super::procs::{signal, vm_pid, Fleet};
use super::workload::Clock;
use crate::netem::LinkImpairment;
use crate::schedule::{Fault, Role, ScheduledEvent};

mod link;
mod net;
mod sync;

use link::ProxiedLink;
pub use net::swizzle_step;
use net::{inject_network, link_netem};

/// Who a role resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A host (index).
    Host(usize),
    /// The manager.
    Manager,
}

/// Resolves roles from the manager's view.
#[derive(Debug)]
pub struct Resolver {
    /// The manager's API.
    pub api: Api,
    /// The VM whose roles are resolved.
    pub vm: String,
    /// The last view it got, and when (ns on the run's clock).
    pub last: Option<(u64, Roles)>,
    /// Since when the manager has said, in every view since, that the VM is `down`.
    pub down_since: Option<u64>,
}

impl Resolver {
    /// Asks the manager now; remembers the answer.
    pub fn refresh(&mut self, now_ns: u64) -> Result<Roles, String> {
        let vms = self.api.vms().map_err(|e| e.to_string())?;
        let v = vms
            .iter()
            .find(|v| v.spec.name == self.vm)
            .ok_or_else(|| format!("the manager knows no VM {}", self.vm))?;
        let roles = Roles::of(v);
        self.down_since = match roles.status == "down" {
            true => self.down_since.or(Some(now_ns)),
            false => None,
        };
        self.last = Some((now_ns, roles.clone()));
        Ok(roles)
    }

    /// The roles now (two tries), else the last view with a note saying so.
    pub fn roles(&mut self, now_ns: u64) -> Result<(Roles, Option<String>), String> {
        let mut err = String::new();
        for _ in 0..2 {
            match self.refresh(now_ns) {
                Ok(r) => return Ok((r, None)),
                Err(e) => err = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        match &self.last {
            Some((at, r)) => Ok((
                r.clone(),
                Some(format!(
                    "manager unreachable ({err}): resolved from its view at {:.1} s",
                    *at as f64 / 1e9
                )),
            )),
            None => Err(format!("manager unreachable and no earlier view: {err}")),
        }
    }
}

/// The host of `role` in `roles`.
pub fn resolve(cluster: &Cluster, roles: &Roles, role: Role) -> Result<Endpoint, String> {
    let host = |name: &str| {
        cluster
            .host_index(name)
            .map(Endpoint::Host)
            .ok_or_else(|| format!("the manager names an unknown host {name}"))
    };
    match role {
        Role::Manager => Ok(Endpoint::Manager),
        Role::Primary => host(roles.primary.as_deref().ok_or("the VM has no primary")?),
        Role::Backup { index } => {
            if roles.backups.is_empty() {
                return Err("the VM has no backup".into());
            }
            host(&roles.backups[usize::from(index) % roles.backups.len()])
        }
        Role::Spare { index } => {
            let spares: Vec<usize> = (0..cluster.hosts)
                .filter(|&h| {
                    let n = cluster.host_name(h);
                    roles.primary.as_deref() != Some(&n) && !roles.backups.contains(&n)
                })
                .collect();
            if spares.is_empty() {
                return Err("no spare host".into());
            }
            Ok(Endpoint::Host(spares[usize::from(index) % spares.len()]))
        }
    }
}

/// What a fault left in place until its heal.
#[derive(Debug)]
pub enum Active {
    /// Nothing to undo (a killed VM process: its agent deals with it).
    Nothing,
    /// A crashed host.
    HostKilled(usize),
    /// The killed manager.
    ManagerKilled,
    /// Stopped processes (a host's: listed again at the heal).
    Stopped {
        /// The host whose processes were stopped, if a host.
        host: Option<usize>,
        /// The pids stopped.
        pids: Vec<u32>,
    },
    /// nftables tables.
    Tables(Vec<Table>),
    /// Swizzle: each link's ends and its table while stalled.
    Swizzle {
        /// Each link's ends, if they resolved to two different places.
        ends: Vec<Option<(Endpoint, Endpoint)>>,
        /// Each link's table while stalled.
        tables: Vec<Option<Table>>,
    },
    /// A file filling a disk.
    Filled(PathBuf),
    /// A host crashed with a checkpoint in flight, and the proxies that held it.
    CrashedInFlight {
        /// The crashed host.
        host: usize,
        /// The proxied link.
        link: ProxiedLink,
    },
    /// A link routed through the degradation proxies.
    Netem(ProxiedLink),
}

/// An injected fault: the target for a person, a note, what the heal undoes.
#[derive(Debug)]
pub struct Injected {
    /// When it acted (after resolving its target), on the run's clock.
    pub acted_ns: u64,
    /// `"host b (primary)"`.
    pub target: String,
    /// Anything worth saying (resolved from an old view, ...).
    pub note: Option<String>,
    /// What to undo.
    pub active: Active,
}

/// What the faults act on.
pub struct Ctx<'a> {
    /// The processes.
    pub fleet: &'a mut Fleet,
    /// The role resolver.
    pub resolver: &'a mut Resolver,
    /// Whether the hosts' state directories are small filesystems of their own (disk-full).
    pub own_disks: bool,
    /// The run's clock.
    pub clock: Clock,
    /// The UDP port the VM's backups listen on (their hosts' replication addresses).
    pub vm_port: u16,
    /// The run's seed (the link proxy's decisions are drawn from it and the event's index).
    pub seed: u64,
}

impl Ctx<'_> {
    fn cluster(&self) -> &Cluster {
        &self.fleet.cluster
    }

    fn name(&self, e: Endpoint) -> String {
        match e {
            Endpoint::Host(h) => format!("host {}", self.cluster().host_name(h)),
            Endpoint::Manager => "the manager".into(),
        }
    }

    fn ip(&self, e: Endpoint) -> Ipv4Addr {
        match e {
            Endpoint::Host(h) => self.cluster().repl_ip(h),
            Endpoint::Manager => self.cluster().manager_ip(),
        }
    }

    fn host(&self, roles: &Roles, role: Role) -> Result<usize, String> {
        match resolve(self.cluster(), roles, role)? {
            Endpoint::Host(h) => Ok(h),
            Endpoint::Manager => Err("the manager is not a host".into()),
        }
    }
}

/// Injects `ev`; `Err` means it was skipped (why).
pub fn inject(ctx: &mut Ctx<'_>, ev: &ScheduledEvent) -> Result<Injected, String> {
    let (roles, note) = ctx.resolver.roles(ctx.clock.now_ns())?;
    let acted_ns = ctx.clock.now_ns();
    let mut done = match LinkImpairment::for_fault(&ev.fault) {
        Some(imp) if !matches!(ev.fault, Fault::Swizzle { .. } | Fault::LinkLoss { .. }) => {
            link_netem(ctx, &roles, ev, imp)?
        }
        _ => inject_resolved(ctx, &ev.fault, &roles)?,
    };
    done.acted_ns = acted_ns;
    done.note = match (note, done.note) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    };
    Ok(done)
}

fn injected(target: String, active: Active) -> Result<Injected, String> {
    Ok(Injected {
        acted_ns: 0,
        target,
        note: None,
        active,
    })
}

fn inject_resolved(ctx: &mut Ctx<'_>, fault: &Fault, roles: &Roles) -> Result<Injected, String> {
    match fault {
        Fault::KillPrimaryHost => kill_host(ctx, roles, Role::Primary),
        Fault::KillBackupHost { backup } => kill_host(ctx, roles, Role::Backup { index: *backup }),
        Fault::KillManager => {
            let pid = ctx
                .fleet
                .kill_manager()
                .ok_or("the manager is not running")?;
            injected(format!("the manager (pid {pid})"), Active::ManagerKilled)
        }
        Fault::KillVm { role } => {
            let (target, pid) = vm_process(ctx, roles, *role)?;
            signal(pid, Signal::KILL)?;
            injected(target, Active::Nothing)
        }
        Fault::StallPrimaryHost => stall_host(ctx, roles, Role::Primary),
        Fault::StallBackupHost { backup } => {
            stall_host(ctx, roles, Role::Backup { index: *backup })
        }
        Fault::StallManager => {
            let pid = ctx
                .fleet
                .manager_pid()
                .ok_or("the manager is not running")?;
            signal(pid, Signal::STOP)?;
            let active = Active::Stopped {
                host: None,
                pids: vec![pid],
            };
            injected(format!("the manager (pid {pid})"), active)
        }
        Fault::StallVm { role } => {
            let (target, pid) = vm_process(ctx, roles, *role)?;
            signal(pid, Signal::STOP)?;
            let active = Active::Stopped {
                host: None,
                pids: vec![pid],
            };
            injected(target, active)
        }
        Fault::DiskFull { backup } => disk_full(ctx, roles, *backup),
        Fault::CrashInSync { syncing, victim } => {
            sync::crash_in_sync(ctx, roles, *syncing, *victim)
        }
        _ => inject_network(ctx, fault, roles),
    }
}

fn kill_host(ctx: &mut Ctx<'_>, roles: &Roles, role: Role) -> Result<Injected, String> {
    let h = ctx.host(roles, role)?;
    ctx.fleet.cluster.kill(h).map_err(|e| e.to_string())?;
    ctx.fleet.forget_agent(h);
    let target = format!("host {} ({role})", ctx.cluster().host_name(h));
    injected(target, Active::HostKilled(h))
}

fn stall_host(ctx: &mut Ctx<'_>, roles: &Roles, role: Role) -> Result<Injected, String> {
    let h = ctx.host(roles, role)?;
    let pids = ctx.cluster().pids(h);
    for &pid in &pids {
        let _ = signal(pid, Signal::STOP);
    }
    let target = format!(
        "host {} ({role}): {} processes",
        ctx.cluster().host_name(h),
        pids.len()
    );
    let active = Active::Stopped {
        host: Some(h),
        pids,
    };
    injected(target, active)
}

fn vm_process(ctx: &mut Ctx<'_>, roles: &Roles, role: Role) -> Result<(String, u32), String> {
    let h = ctx.host(roles, role)?;
    let which = match role {
        Role::Primary => "primary",
        _ => "backup",
    };
    let host = ctx.cluster().host_name(h);
    let pid = vm_pid(&ctx.fleet.paths, &host, &ctx.resolver.vm, which)?;
    Ok((
        format!("vmatrix {which} (pid {pid}) on host {host} ({role})"),
        pid,
    ))
}

fn disk_full(ctx: &mut Ctx<'_>, roles: &Roles, backup: u8) -> Result<Injected, String> {
    if !ctx.own_disks {
        return Err("the hosts' state directories are not filesystems of their own".into());
    }
    let b = ctx.host(roles, Role::Backup { index: backup })?;
    let host = ctx.cluster().host_name(b);
    let dir = ctx.fleet.paths.host_dir(&host);
    let file = dir.join("chaos-fill");
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(&dir)
        .output()
        .map_err(|e| format!("stat -f: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [blocks, size] = nums[..] else {
        return Err(format!("stat -f {}: {text:?}", dir.display()));
    };
    // Most of it at once, then zeros until the filesystem refuses (its own accounting may
    // refuse the exact free size).
    let bulk = (blocks * size).saturating_sub(4 << 20);
    let out = Command::new("fallocate")
        .arg("-l")
        .arg(bulk.to_string())
        .arg(&file)
        .output()
        .map_err(|e| format!("fallocate: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&file);
        return Err(format!(
            "fallocate of {bulk} bytes: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let filled = bulk + top_up(&file);
    let target = format!("host {host} (backup {backup}): {} MiB filled", filled >> 20);
    injected(target, Active::Filled(file))
}

/// Appends zeros to `file` until the filesystem is full (at most 64 MiB); returns the bytes.
fn top_up(file: &std::path::Path) -> u64 {
    use std::io::Write;
    let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(file) else {
        return 0;
    };
    let zeros = [0u8; 4096];
    let mut n = 0u64;
    while n < 64 << 20 && f.write_all(&zeros).is_ok() {
        n += zeros.len() as u64;
    }
    let _ = f.sync_all();
    n
}

/// Undoes what a fault left; `Ok` may carry a note (what the link proxy did), `Err` is a
/// problem (the final heal retries everything anyway).
pub fn heal(ctx: &mut Ctx<'_>, active: Active) -> Result<Option<String>, String> {
    match active {
        Active::Netem(link) => link.heal(),
        other => heal_inner(ctx, other).map(|_| None),
    }
}

fn heal_inner(ctx: &mut Ctx<'_>, active: Active) -> Result<(), String> {
    match active {
        Active::Nothing => Ok(()),
        Active::Netem(link) => link.heal().map(|_| ()),
        Active::CrashedInFlight { host, link } => {
            let proxied = link.heal();
            heal_inner(ctx, Active::HostKilled(host))?;
            proxied.map(|_| ())
        }
        Active::HostKilled(h) => {
            ctx.fleet.cluster.revive(h).map_err(|e| e.to_string())?;
            ctx.fleet
                .start_agent(h)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Active::ManagerKilled => ctx
            .fleet
            .start_manager()
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Active::Stopped { host, mut pids } => {
            if let Some(h) = host {
                pids.extend(ctx.cluster().pids(h));
            }
            for pid in pids {
                let _ = signal(pid, Signal::CONT);
            }
            Ok(())
        }
        Active::Tables(tables) => {
            let errs: Vec<String> = tables
                .iter()
                .filter_map(|t| nft::remove(ctx.cluster(), t).err())
                .collect();
            match errs.is_empty() {
                true => Ok(()),
                false => Err(errs.join("; ")),
            }
        }
        Active::Swizzle { tables, .. } => {
            for t in tables.into_iter().flatten() {
                nft::remove(ctx.cluster(), &t)?;
            }
            Ok(())
        }
        Active::Filled(file) => {
            std::fs::remove_file(&file).map_err(|e| format!("{}: {e}", file.display()))
        }
    }
}

/// The final heal: every host plugged in with its agent running, every process continued, no
/// fault table left, no fill file, the manager running. Returns what it had to fix.
pub fn heal_everything(fleet: &mut Fleet) -> Vec<String> {
    let mut fixed = fleet.exited();
    let cluster = fleet.cluster.clone();
    for h in 0..cluster.hosts {
        if let Err(e) = cluster.revive(h) {
            fixed.push(format!("revive host {}: {e}", cluster.host_name(h)));
        }
        for pid in cluster.pids(h) {
            let _ = signal(pid, Signal::CONT);
        }
        let fill = fleet
            .paths
            .host_dir(&cluster.host_name(h))
            .join("chaos-fill");
        if std::fs::remove_file(&fill).is_ok() {
            fixed.push(format!("removed {}", fill.display()));
        }
    }
    if let Some(pid) = fleet.manager_pid() {
        let _ = signal(pid, Signal::CONT);
    }
    fixed.extend(
        nft::remove_all(&cluster)
            .into_iter()
            .map(|t| format!("deleted table {t}")),
    );
    if fleet.manager_pid().is_none() {
        match fleet.start_manager() {
            Ok(_) => fixed.push("started the manager".into()),
            Err(e) => fixed.push(format!("starting the manager: {e}")),
        }
    }
    for h in 0..cluster.hosts {
        let running = fleet.agents[h]
            .as_mut()
            .is_some_and(super::procs::child_running);
        if !running {
            match fleet.start_agent(h) {
                Ok(_) => fixed.push(format!(
                    "started the agent of host {}",
                    cluster.host_name(h)
                )),
                Err(e) => fixed.push(format!(
                    "starting the agent of host {}: {e}",
                    cluster.host_name(h)
                )),
            }
        }
    }
    fixed
}
