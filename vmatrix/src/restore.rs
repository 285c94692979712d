//! `vmatrix restore`: start a VM from a snapshot directory in a new process.

use std::path::{Path, PathBuf};

use anyhow::Context;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use vmm::{RestoreConfig, Vm};

/// Flags of `vmatrix restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory (a full snapshot, or the last diff of a chain).
    pub dir: PathBuf,
    /// Tap for the guest NIC (needed if the snapshot has one).
    #[arg(long)]
    pub tap: Option<String>,
    /// Working disk to create from the snapshot's disk (default <dir>/disk-live.img).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Serve pause/resume/snapshot/status on this Unix socket.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Start parked: no guest instruction runs until `vmatrix ctl <socket> resume`.
    #[arg(long)]
    pub paused: bool,
}

/// Restores and runs until the VM stops.
pub fn main(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    if a.paused && a.control.is_none() {
        anyhow::bail!("--paused needs --control <socket> (to resume the VM)");
    }
    finalize_replica(&a.dir)?;
    let console = crate::run::console(a.console_log)?;
    let vm = Vm::restore(RestoreConfig {
        dir: a.dir,
        tap: a.tap,
        disk: a.disk,
        console: console.clone(),
        generation: None,
    })?;
    crate::run::supervise(Arc::new(vm), a.control.as_deref(), console, a.paused, None)
}

/// A backup's replica image whose process died before finalizing it (no `snapshot.bin`, or one
/// older than `replica.bin`) is finalized first: an interrupted checkpoint is completed from its
/// journal, and the snapshot describes the last applied checkpoint.
fn finalize_replica(dir: &Path) -> anyhow::Result<()> {
    let mtime = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    };
    let Some(replica) = mtime("replica.bin") else {
        return Ok(());
    };
    let journaled = backup::journal::SLOT_FILES
        .iter()
        .any(|f| dir.join(f).exists());
    if mtime(vmm::snapshot::META_FILE).is_some_and(|s| s >= replica) && !journaled {
        return Ok(());
    }
    let epoch = backup::image::finalize(dir)
        .with_context(|| format!("finalizing the replica image in {}", dir.display()))?;
    eprintln!("vmatrix restore: replica image finalized at checkpoint {epoch}");
    Ok(())
}
