//! `vmatrix clone-vm --standby`: a clone built ahead of demand. It is built from the base as
//! any clone (memory mapped copy-on-write, its own disk delta and tap) and runs at once — but
//! as its parent, idle: it keeps the checkpoint's generation and config, and its NIC has a
//! placeholder MAC (`02:73:..`, random), so the source filter drops everything the guest sends
//! with its parent's MAC and nothing of it reaches the network. Running warms what a fresh VM
//! pays for on its first instructions (under nested PVM ~7 ms of exits before its first frame,
//! see docs/BENCHMARKS.md); being spawned already saves the process start.
//!
//! `PUT /identity {"name": ..., "config": "ip=..."}` on its control socket gives it a name,
//! an address, the MAC of that address and a new generation, all at once (the generation word
//! last: [`vmm::Vm::assume_identity`]); the guest takes them on its next round, before it sends
//! anything, exactly as a clone built with them would on its first. Once only: a second
//! `PUT /identity` is refused (409). The answer is the line a clone prints when built.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use vmm::{CloneDisk, CloneParts, Vm};

use super::base;
use super::identity::{self, mac_string};
use super::vm::{identity_of, Built, CloneVmArgs};
use crate::control::types::{ControlError, Request};
use crate::control::vm::{Extra, ExtraRequests};

/// A placeholder MAC: locally administered unicast `02:73:` and four random bytes (never a
/// clone's `02:76:` nor the parent's default `02:78:`).
fn placeholder_mac() -> [u8; 6] {
    let r = identity::random_u64().to_le_bytes();
    [0x02, 0x73, r[0], r[1], r[2], r[3]]
}

/// Runs one standby clone until it stops.
pub fn main(a: CloneVmArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let delta = a.delta.clone().context("--standby needs --delta")?;
    let control = a.control.clone().context("--standby needs --control")?;
    let meta = base::read(&a.base)?;
    let console = crate::run::console(a.console_log.clone())?;
    let built = Vm::restore_standby(CloneParts {
        memory: meta.memory.clone(),
        mem_size: meta.mem_size,
        disk: meta.disk.as_ref().map(|b| CloneDisk {
            base: b.clone(),
            delta: delta.clone(),
        }),
        state: meta.state.clone(),
        tap: Some(a.tap.clone()),
        console: console.clone(),
        generation: 0,
        config: String::new(),
        mac: placeholder_mac(),
    })
    .context("building a standby clone");
    let vm = match built {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            let _ = std::fs::remove_file(&delta);
            return Err(e);
        }
    };
    tracing::info!(
        "standby clone built from {} in {:.1} ms; waiting for its identity",
        meta.source.display(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let extra = Extra {
        status: None,
        requests: Some(identity_requests(vm.clone(), a.tap.clone())),
    };
    let code = crate::run::supervise(vm, Some(&control), console, false, extra);
    if !a.keep_delta {
        let _ = std::fs::remove_file(&delta);
    }
    code
}

/// Answers `PUT /identity` (once); everything else is the VM's.
fn identity_requests(vm: Arc<Vm>, tap: String) -> ExtraRequests {
    let taken = AtomicBool::new(false);
    Arc::new(move |req| {
        let Request::Identity { name, config } = req else {
            return None;
        };
        if taken.swap(true, Ordering::SeqCst) {
            return Some(Err(ControlError::conflict(
                "this standby clone already has its identity",
            )));
        }
        let before = vm.net_stats().map_or(0, |n| n.tx_frames);
        let r = assume(&vm, &tap, name, config);
        if r.is_ok() {
            note_first_frame(vm.clone(), before);
        }
        if r.is_err() {
            // (Nothing changed: it may be given one again.)
            taken.store(false, Ordering::SeqCst);
        }
        Some(r)
    })
}

/// Logs when the guest sends its first frame with its new identity (its announcement): how
/// long its wake-up and re-identification took (watched for at most 100 ms, on a thread).
fn note_first_frame(vm: Arc<Vm>, before: u64) {
    let t0 = Instant::now();
    let _ = std::thread::Builder::new()
        .name("first-frame".into())
        .spawn(move || {
            while t0.elapsed() < std::time::Duration::from_millis(100) {
                if vm.net_stats().is_some_and(|n| n.tx_frames > before) {
                    tracing::info!(
                        "first frame of the new identity {:.2} ms after it was given",
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                    return;
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        });
}

fn assume(vm: &Vm, tap: &str, name: &str, config: &str) -> Result<serde_json::Value, ControlError> {
    let t0 = Instant::now();
    let id = identity_of(name, tap, identity::random_u64(), config)
        .map_err(|e| ControlError::bad_request(format!("{e:#}")))?;
    vm.assume_identity(id.generation, &id.config, id.mac)
        .map_err(|e| ControlError::conflict(e.to_string()))?;
    let line = Built {
        name: &id.name,
        pid: std::process::id(),
        generation: id.generation,
        mac: mac_string(&id.mac),
        config: &id.config,
        startup_ms: None,
        build_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    tracing::info!(
        "standby clone is {} now (generation {}, {}) after {:.2} ms",
        id.name,
        id.generation,
        id.config,
        line.build_ms
    );
    serde_json::to_value(&line).map_err(|e| ControlError::conflict(e.to_string()))
}
