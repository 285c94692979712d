//! `vmatrix run`: build a VM from flags and/or a TOML file, run it (serving its control socket,
//! `crate::control`, with `--control`), report how it ended.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use vmm::devices::serial::ConsoleOut;
use vmm::{Vm, VmConfig, VmExit};

use crate::guest_config;

/// Flags of `vmatrix run`; each overrides the same key of `--config`.
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// TOML file with any of: guest, disk, tap, mem_mib, guest_config, mac, console_log.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Guest ELF (the vmatrix test guest).
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Raw disk image for virtio-blk.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Existing tap interface for virtio-net.
    #[arg(long)]
    pub tap: Option<String>,
    /// Guest RAM in MiB (default 64).
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Guest config string, e.g. "ip=10.0.0.2/24,gw=10.0.0.1,port=7000".
    #[arg(long)]
    pub guest_config: Option<String>,
    /// Guest MAC address (default 02:78:6d:00:00:02).
    #[arg(long)]
    pub mac: Option<String>,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Serve the control API (HTTP + JSON: status, pause/resume, snapshot, ...) on this Unix
    /// socket (see `vmatrix ctl`, or `curl --unix-socket <path> http://localhost/status`).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RunFile {
    guest: Option<PathBuf>,
    disk: Option<PathBuf>,
    tap: Option<String>,
    mem_mib: Option<u64>,
    guest_config: Option<String>,
    mac: Option<String>,
    console_log: Option<PathBuf>,
}

const DEFAULT_MAC: [u8; 6] = [0x02, 0x78, 0x6d, 0x00, 0x00, 0x02];

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC address '{s}' must be six hex bytes separated by ':'");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC address '{s}'"))?;
    }
    if mac[0] & 1 != 0 {
        bail!("MAC address '{s}' is multicast");
    }
    Ok(mac)
}

/// The console sink: a log file (appended) or stdout.
pub fn console(path: Option<PathBuf>) -> anyhow::Result<ConsoleOut> {
    Ok(match path {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("cannot open console log {}", p.display()))?;
            ConsoleOut::new(Box::new(f))
        }
        None => ConsoleOut::new(Box::new(std::io::stdout())),
    })
}

/// Merges the file (if any) under the flags and builds a `VmConfig`.
pub fn resolve(a: RunArgs) -> anyhow::Result<VmConfig> {
    let file = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str::<RunFile>(&text)
                .with_context(|| format!("invalid config file {}", p.display()))?
        }
        None => RunFile::default(),
    };
    let guest = a
        .guest
        .or(file.guest)
        .context("no guest ELF: pass --guest <elf> (or 'guest' in --config)")?;
    let guest_config = a.guest_config.or(file.guest_config).unwrap_or_default();
    guest_config::validate(&guest_config)
        .map_err(|e| anyhow::anyhow!("invalid --guest-config: {e}"))?;
    let mac = match a.mac.or(file.mac) {
        Some(m) => parse_mac(&m)?,
        None => DEFAULT_MAC,
    };
    let console = console(a.console_log.or(file.console_log))?;
    let disk = a.disk.or(file.disk);
    if let Some(d) = &disk {
        if !d.is_file() {
            bail!("disk image {} does not exist (create one with 'vmatrix disk create {} --size-mib 64')", d.display(), d.display());
        }
    }
    Ok(VmConfig {
        guest_elf: guest,
        mem_mib: a.mem_mib.or(file.mem_mib).unwrap_or(64),
        disk,
        tap: a.tap.or(file.tap),
        mac,
        guest_config,
        console,
        dirty_log: true,
        generation: 1,
    })
}

/// Runs the VM until it stops.
pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let control = a.control.clone();
    let cfg = resolve(a)?;
    let console = cfg.console.clone();
    let vm = Arc::new(Vm::new(cfg)?);
    supervise(vm, control.as_deref(), console, false, Default::default())
}

/// Serves the control socket (the VM's requests and `extra`'s), starts the VM (parked if
/// `paused`), stops it on SIGINT/SIGTERM, and turns its exit into the process exit code.
pub fn supervise(
    vm: Arc<Vm>,
    control: Option<&std::path::Path>,
    console: ConsoleOut,
    paused: bool,
    extra: crate::control::Extra,
) -> anyhow::Result<ExitCode> {
    let served = match control {
        Some(path) => Some(crate::control::serve(path, vm.clone(), extra, paused)?),
        None => None,
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let handle = signals.handle();
    let stopper = vm.control();
    let sig_thread = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stopper.stop();
        }
    });
    if paused {
        vm.start_paused()?;
    } else {
        vm.start()?;
    }
    let exit = vm.wait();
    handle.close();
    let _ = sig_thread.join();
    console.flush_partial();
    if let Some(path) = control {
        let _ = std::fs::remove_file(path);
    }
    // The answer to the request that stopped the VM (`stop`, a primary's `fence`) goes out
    // before the process ends.
    if let Some(s) = served {
        s.wait_idle(Duration::from_secs(1));
    }
    tracing::info!("VM ended: {exit}");
    match exit {
        VmExit::GuestExit(0) | VmExit::Stopped => {
            eprintln!("vmatrix: {exit}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("vmatrix: error: {other}");
            Ok(ExitCode::from(1))
        }
    }
}
