//! Network faults: partitions, loss and swizzle as nftables tables in host namespaces
//! ([`super::super::nft`]), and the faults that route the primary's replication traffic
//! through the link-degradation proxy ([`crate::netem`]): delay, duplication, reordering, and
//! a crash with replication datagrams in flight.

use super::{injected, resolve, Active, Ctx, Endpoint, Injected, ProxiedLink};
use crate::netem::LinkImpairment;
use crate::runner::api::Roles;
use crate::runner::nft::{self, Dir, Drop, Table};
use crate::schedule::{Fault, LinkRef, Role, ScheduledEvent};

pub(super) fn inject_network(
    ctx: &mut Ctx<'_>,
    fault: &Fault,
    roles: &Roles,
) -> Result<Injected, String> {
    match fault {
        Fault::IsolateHost { role } => isolate(ctx, roles, *role),
        Fault::CutPrimaryFromManager => {
            let p = ctx.host(roles, Role::Primary)?;
            let t = nft::install(
                ctx.cluster(),
                p,
                "vxchaos_cutmgr",
                &Drop::both(Some(ctx.cluster().manager_ip())),
            )?;
            let target = format!(
                "host {} (primary) <-> the manager",
                ctx.cluster().host_name(p)
            );
            injected(target, Active::Tables(vec![t]))
        }
        Fault::CutPrimaryFromBackups => {
            let p = ctx.host(roles, Role::Primary)?;
            if roles.backups.is_empty() {
                return Err("the VM has no backup".into());
            }
            let mut drops = Vec::new();
            let mut names = Vec::new();
            for i in 0..roles.backups.len() {
                let b = ctx.host(roles, Role::Backup { index: i as u8 })?;
                drops.extend(Drop::both(Some(ctx.cluster().repl_ip(b))));
                names.push(ctx.cluster().host_name(b));
            }
            let t = nft::install(ctx.cluster(), p, "vxchaos_cutbackups", &drops)?;
            let target = format!(
                "host {} (primary) <-> backups on {}",
                ctx.cluster().host_name(p),
                names.join(",")
            );
            injected(target, Active::Tables(vec![t]))
        }
        Fault::OneWayDrop { from, to } => one_way(ctx, roles, *from, *to),
        Fault::LinkLoss { backup, permille } => link_loss(ctx, roles, *backup, *permille),
        Fault::Swizzle { links, .. } => swizzle_start(ctx, roles, links),
        Fault::CrashInCheckpoint { victim } => crash_in_checkpoint(ctx, roles, *victim),
        other => Err(format!("{} is not supported by this runner", other.kind())),
    }
}

fn link_loss(
    ctx: &mut Ctx<'_>,
    roles: &Roles,
    backup: u8,
    permille: u16,
) -> Result<Injected, String> {
    let p = ctx.host(roles, Role::Primary)?;
    let b = ctx.host(roles, Role::Backup { index: backup })?;
    let peer = Some(ctx.cluster().repl_ip(b));
    let drops = [Dir::Out, Dir::In].map(|dir| Drop {
        dir,
        peer,
        permille: Some(permille),
    });
    let t = nft::install(ctx.cluster(), p, "vxchaos_loss", &drops)?;
    let target = format!(
        "link host {} (primary) <-> host {} (backup), {permille}‰ each way",
        ctx.cluster().host_name(p),
        ctx.cluster().host_name(b),
    );
    injected(target, Active::Tables(vec![t]))
}

/// Delay, duplication, reordering: the primary's datagrams to the backup's port go through a
/// proxy (in the runner's namespace, on the manager's replication address) applying the
/// fault's impairment both ways.
pub(super) fn link_netem(
    ctx: &mut Ctx<'_>,
    roles: &Roles,
    ev: &ScheduledEvent,
    imp: LinkImpairment,
) -> Result<Injected, String> {
    let backup = match ev.fault {
        Fault::LinkDelay { backup, .. }
        | Fault::LinkDuplicate { backup, .. }
        | Fault::LinkReorder { backup, .. } => backup,
        _ => return Err(format!("{} is not a proxied link fault", ev.fault.kind())),
    };
    let p = ctx.host(roles, Role::Primary)?;
    let b = ctx.host(roles, Role::Backup { index: backup })?;
    let seed = ctx.seed ^ u64::from(ev.index).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let link = ProxiedLink::start(ctx, (p, b), LinkImpairment::NONE, seed)?;
    link.set(imp);
    let target = format!(
        "link host {} (primary) -> {}:{} and its data port (backup on host {}) through the proxies {}",
        ctx.cluster().host_name(p),
        ctx.cluster().repl_ip(b),
        ctx.vm_port,
        ctx.cluster().host_name(b),
        link.proxies()
    );
    injected(target, Active::Netem(link))
}

/// Routes the primary's replication datagrams to its first backup through a proxy that
/// delays them by 10 ms, waits until the proxy holds some (a checkpoint or its
/// acknowledgement is under way: the primary sends only when it has one), then crashes the
/// victim's host. What the proxy holds is delivered after the crash, as a network would.
fn crash_in_checkpoint(ctx: &mut Ctx<'_>, roles: &Roles, victim: Role) -> Result<Injected, String> {
    let p = ctx.host(roles, Role::Primary)?;
    let b = ctx.host(roles, Role::Backup { index: 0 })?;
    let v = ctx.host(roles, victim)?;
    let delay = crate::netem::Impairment {
        delay_ns: 10_000_000,
        ..crate::netem::Impairment::NONE
    };
    let link = ProxiedLink::start(ctx, (p, b), LinkImpairment::both(delay), ctx.seed)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        let (received, queued) = link.forward();
        // Wait for the traffic to go through the proxies, then for a checkpoint in them.
        if received > 0 && queued >= 2 {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let queued = link.forward().1;
    ctx.fleet.cluster.kill(v).map_err(|e| e.to_string())?;
    ctx.fleet.forget_agent(v);
    let mut target = format!(
        "host {} ({victim}) with {queued} replication datagrams in flight to host {}",
        ctx.cluster().host_name(v),
        ctx.cluster().host_name(b)
    );
    if !seen {
        target.push_str(" (no checkpoint seen in flight within 3 s: crashed anyway)");
    }
    let active = Active::CrashedInFlight { host: v, link };
    injected(target, active)
}

fn isolate(ctx: &mut Ctx<'_>, roles: &Roles, role: Role) -> Result<Injected, String> {
    match resolve(ctx.cluster(), roles, role)? {
        Endpoint::Host(h) => {
            let t = nft::install(ctx.cluster(), h, "vxchaos_isolate", &Drop::both(None))?;
            let target = format!("host {} ({role})", ctx.cluster().host_name(h));
            injected(target, Active::Tables(vec![t]))
        }
        Endpoint::Manager => {
            let mgr = Some(ctx.cluster().manager_ip());
            let mut tables = Vec::new();
            for h in 0..ctx.cluster().hosts {
                match nft::install(ctx.cluster(), h, "vxchaos_isolate_mgr", &Drop::both(mgr)) {
                    Ok(t) => tables.push(t),
                    Err(e) => {
                        for t in &tables {
                            let _ = nft::remove(ctx.cluster(), t);
                        }
                        return Err(e);
                    }
                }
            }
            injected("the manager".into(), Active::Tables(tables))
        }
    }
}

/// The table that drops `from` → `to` (one direction), in a host's namespace.
fn one_way_table(ctx: &Ctx<'_>, from: Endpoint, to: Endpoint, name: &str) -> Result<Table, String> {
    match (from, to) {
        (Endpoint::Host(f), _) => {
            let drop = Drop {
                dir: Dir::Out,
                peer: Some(ctx.ip(to)),
                permille: None,
            };
            nft::install(ctx.cluster(), f, name, &[drop])
        }
        (Endpoint::Manager, Endpoint::Host(t)) => {
            let drop = Drop {
                dir: Dir::In,
                peer: Some(ctx.ip(from)),
                permille: None,
            };
            nft::install(ctx.cluster(), t, name, &[drop])
        }
        (Endpoint::Manager, Endpoint::Manager) => Err("the manager to itself".into()),
    }
}

fn one_way(ctx: &mut Ctx<'_>, roles: &Roles, from: Role, to: Role) -> Result<Injected, String> {
    let (f, t) = (
        resolve(ctx.cluster(), roles, from)?,
        resolve(ctx.cluster(), roles, to)?,
    );
    if f == t {
        return Err(format!("{from} and {to} are both {}", ctx.name(f)));
    }
    let table = one_way_table(ctx, f, t, "vxchaos_oneway")?;
    let target = format!("{} ({from}) -> {} ({to})", ctx.name(f), ctx.name(t));
    injected(target, Active::Tables(vec![table]))
}

fn swizzle_start(ctx: &mut Ctx<'_>, roles: &Roles, links: &[LinkRef]) -> Result<Injected, String> {
    let mut ends = Vec::new();
    let mut described = Vec::new();
    for l in links {
        let a = resolve(ctx.cluster(), roles, l.a);
        let b = resolve(ctx.cluster(), roles, l.b);
        match (a, b) {
            (Ok(a), Ok(b)) if a != b => {
                described.push(format!("{}<->{}", short(ctx, a), short(ctx, b)));
                ends.push(Some((a, b)));
            }
            _ => {
                described.push(format!("({}<->{} unresolved)", l.a, l.b));
                ends.push(None);
            }
        }
    }
    if ends.iter().all(Option::is_none) {
        return Err("no link resolved to two places".into());
    }
    let tables = ends.iter().map(|_| None).collect();
    let mut active = Active::Swizzle { ends, tables };
    swizzle_step(ctx, &mut active, 0, true)?;
    injected(format!("links {}", described.join(" ")), active)
}

fn short(ctx: &Ctx<'_>, e: Endpoint) -> String {
    match e {
        Endpoint::Host(h) => ctx.cluster().host_name(h),
        Endpoint::Manager => "manager".into(),
    }
}

/// Stalls (`stall`) or heals link `i` of a swizzle.
pub fn swizzle_step(
    ctx: &mut Ctx<'_>,
    active: &mut Active,
    i: usize,
    stall: bool,
) -> Result<(), String> {
    let Active::Swizzle { ends, tables } = active else {
        return Ok(());
    };
    let Some(Some((a, b))) = ends.get(i).copied() else {
        return Ok(());
    };
    if stall {
        let name = format!("vxchaos_swz{i}");
        let host_end = match (a, b) {
            (Endpoint::Host(h), other) | (other, Endpoint::Host(h)) => (h, other),
            _ => return Err("a link between two managers".into()),
        };
        let t = nft::install(
            ctx.cluster(),
            host_end.0,
            &name,
            &Drop::both(Some(ctx.ip(host_end.1))),
        )?;
        tables[i] = Some(t);
    } else if let Some(t) = tables[i].take() {
        nft::remove(ctx.cluster(), &t)?;
    }
    Ok(())
}
