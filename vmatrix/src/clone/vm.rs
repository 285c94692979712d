//! `vmatrix clone-vm`: one clone in this process. The unit an agent starts and stops by name:
//! it reads a clone base (`base.rs`), builds the VM with the identity it is given
//! (`vmm::Vm::restore_clone`), prints one JSON line saying so, then runs it like any VM,
//! with its own control socket, console and disk delta, until it stops (SIGTERM, `PUT /stop`).
//! Its delta is removed when it ends: a clone's writes are its own and die with it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use vmm::{CloneDisk, CloneParts, Vm};

use super::base;
use super::identity::{self, Identity};

/// Flags of `vmatrix clone-vm`.
#[derive(Args, Debug, Clone)]
pub struct CloneVmArgs {
    /// The clone base directory (made by `vmatrix clone`).
    #[arg(long)]
    pub base: PathBuf,
    /// The clone's name.
    #[arg(long, required_unless_present = "standby")]
    pub name: Option<String>,
    /// Its tap.
    #[arg(long)]
    pub tap: String,
    /// Its guest config string (its own address; see `vmatrix run --guest-config`).
    #[arg(long, required_unless_present = "standby")]
    pub guest_config: Option<String>,
    /// Its generation id (default: random).
    #[arg(long)]
    pub generation: Option<u64>,
    /// Its disk delta file (must not exist; default <base>/../<name>.delta).
    #[arg(long)]
    pub delta: Option<PathBuf>,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Write the guest console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Keep the delta file when the clone ends.
    #[arg(long)]
    pub keep_delta: bool,
    /// A standby clone: built and running idle, isolated, as its parent, until `PUT /identity`
    /// on its control socket gives it a name and an address (see `clone::standby`). Needs
    /// `--control` and `--delta`; `--name`, `--guest-config` and `--generation` are not used.
    #[arg(long, conflicts_with_all = ["name", "guest_config", "generation"])]
    pub standby: bool,
}

/// The line a clone prints on stdout once its VM is built.
#[derive(Serialize)]
pub struct Built<'a> {
    /// Name.
    pub name: &'a str,
    /// Process id.
    pub pid: u32,
    /// Generation id.
    pub generation: u64,
    /// MAC address.
    pub mac: String,
    /// Config string.
    pub config: &'a str,
    /// From the parent's spawn to this process's `main` (exec, loading, runtime), ms; None if
    /// the parent did not say when it spawned it.
    pub startup_ms: Option<f64>,
    /// Time to read the base and build the VM, ms.
    pub build_ms: f64,
}

/// Environment variable with the Unix time (ns) at which the parent spawned the clone.
pub const SPAWNED_ENV: &str = "VMATRIX_CLONE_SPAWNED_NS";

/// Unix time in ns.
pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Runs one clone until it stops.
pub fn main(a: CloneVmArgs) -> anyhow::Result<ExitCode> {
    if a.standby {
        return super::standby::main(a);
    }
    let (Some(name), Some(guest_config)) = (a.name.clone(), a.guest_config.clone()) else {
        anyhow::bail!("--name and --guest-config are needed (or --standby)");
    };
    let t0 = Instant::now();
    let startup_ms = std::env::var(SPAWNED_ENV)
        .ok()
        .and_then(|v| v.parse::<u128>().ok())
        .map(|s| unix_ns().saturating_sub(s) as f64 / 1e6);
    let meta = base::read(&a.base)?;
    let generation = a.generation.unwrap_or_else(identity::random_u64);
    let id = identity_of(&name, &a.tap, generation, &guest_config)?;
    let delta = a.delta.clone().unwrap_or_else(|| {
        a.base
            .parent()
            .unwrap_or(&a.base)
            .join(format!("{name}.delta"))
    });
    let console = crate::run::console(a.console_log.clone())?;
    let vm = build(&meta, &id, &delta, console.clone());
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            // A delta made before the failure is of no use to anyone.
            let _ = std::fs::remove_file(&delta);
            return Err(e);
        }
    };
    let line = Built {
        name: &id.name,
        pid: std::process::id(),
        generation,
        mac: identity::mac_string(&id.mac),
        config: &id.config,
        startup_ms,
        build_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    println!("{}", serde_json::to_string(&line)?);
    tracing::info!(
        "clone {} built from {} in {:.1} ms",
        id.name,
        meta.source.display(),
        line.build_ms
    );
    let code = crate::run::supervise(
        Arc::new(vm),
        a.control.as_deref(),
        console,
        false,
        Default::default(),
    );
    if !a.keep_delta {
        let _ = std::fs::remove_file(&delta);
    }
    code
}

/// A clone's identity from its name, tap, generation and config string (checked: it must
/// give the clone's address, from which its MAC comes).
pub(super) fn identity_of(
    name: &str,
    tap: &str,
    generation: u64,
    config: &str,
) -> anyhow::Result<Identity> {
    crate::guest_config::validate(config).map_err(|e| anyhow::anyhow!("guest config: {e}"))?;
    Ok(Identity {
        name: name.to_string(),
        tap: tap.to_string(),
        generation,
        mac: identity::ip_of(config)
            .map(identity::mac_for)
            .ok_or_else(|| anyhow::anyhow!("the guest config has no ip= for the clone"))?,
        config: config.to_string(),
    })
}

/// Builds the clone's VM from the base.
fn build(
    meta: &base::BaseMeta,
    id: &Identity,
    delta: &std::path::Path,
    console: vmm::devices::serial::ConsoleOut,
) -> anyhow::Result<Vm> {
    let state = meta.state.clone();
    Vm::restore_clone(CloneParts {
        memory: meta.memory.clone(),
        mem_size: meta.mem_size,
        disk: meta.disk.as_ref().map(|b| CloneDisk {
            base: b.clone(),
            delta: delta.to_path_buf(),
        }),
        state,
        tap: Some(id.tap.clone()),
        console,
        generation: id.generation,
        config: id.config.clone(),
        mac: id.mac,
    })
    .with_context(|| format!("building clone {}", id.name))
}
