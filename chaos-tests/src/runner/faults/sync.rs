//! A crash in the middle of a (re)sync: the backup's process is killed so that its agent
//! starts it again and the primary syncs it again — from its committed image (a quick resync)
//! when the primary is the victim, from nothing (its image removed first: an initial sync) when
//! the backup is — and once the sync's datagrams flow, the victim's host crashes.
//!
//! With the one backup the runner gives a VM, both are single faults:
//! - the **primary** crashes while its only backup resyncs from an image it still holds
//!   committed (the blip-then-crash path that once lost every acknowledged write): the primary
//!   holds its output from the session's loss on, so that image holds everything released,
//!   and the backup must be promoted from it with nothing lost;
//! - the **backup** crashes while it syncs from nothing: the primary goes on (its output held
//!   during the sync, then released once the manager drops the dead backup), and the VM is
//!   protected again on another host.
//!
//! (Crashing the primary while its only backup syncs from nothing would be a double fault whose
//! designed outcome is a VM down: the manager never starts a VM from an older image.)

use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::{injected, Active, Ctx, Injected, ProxiedLink};
use crate::netem::LinkImpairment;
use crate::runner::api::Roles;
use crate::runner::procs::{signal, vm_pid};
use crate::schedule::Role;

/// Datagrams of the new session to see before the crash: past the QUIC handshake, into the
/// sync itself.
const INTO_THE_SYNC: u64 = 8;

/// How long to wait for the new session's datagrams before crashing anyway.
const WAIT: Duration = Duration::from_secs(5);

pub(super) fn crash_in_sync(
    ctx: &mut Ctx<'_>,
    roles: &Roles,
    syncing: u8,
    victim: Role,
) -> Result<Injected, String> {
    let p = ctx.host(roles, Role::Primary)?;
    let b = ctx.host(roles, Role::Backup { index: syncing })?;
    let v = ctx.host(roles, victim)?;
    let from_scratch = v == b;
    let backup_host = ctx.cluster().host_name(b);
    let vm = ctx.resolver.vm.clone();
    let pid = vm_pid(&ctx.fleet.paths, &backup_host, &vm, "backup")?;
    // The primary's datagrams to that backup (both its ports) go through proxies that only
    // count them.
    let link = ProxiedLink::start(ctx, (p, b), LinkImpairment::NONE, ctx.seed)?;
    if from_scratch {
        // (Its files unlinked under it: the process runs on until killed; the next one finds
        // an empty directory and is synced from nothing.)
        let image = ctx
            .fleet
            .paths
            .host_dir(&backup_host)
            .join(&vm)
            .join("image");
        empty_dir(&image)?;
    }
    let before = link.forward().0;
    signal(pid, Signal::KILL)?;
    let deadline = Instant::now() + WAIT;
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = link.forward().0.saturating_sub(before);
        if seen >= INTO_THE_SYNC {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    ctx.fleet.cluster.kill(v).map_err(|e| e.to_string())?;
    ctx.fleet.forget_agent(v);
    let sync = match from_scratch {
        true => "its initial sync (image removed)",
        false => "its resync from its committed image",
    };
    let mut target = format!(
        "host {} ({victim}) during {sync} of the backup on host {backup_host} (its process \
         pid {pid} killed; {seen} datagrams of the new session seen)",
        ctx.cluster().host_name(v)
    );
    if seen < INTO_THE_SYNC {
        target.push_str(" (the sync was not seen within 5 s: crashed anyway)");
    }
    let active = Active::CrashedInFlight { host: v, link };
    injected(target, active)
}

/// Removes everything in `dir` (not `dir` itself).
fn empty_dir(dir: &std::path::Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        let r = match path.is_dir() {
            true => std::fs::remove_dir_all(&path),
            false => std::fs::remove_file(&path),
        };
        r.map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
