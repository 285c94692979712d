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
    // A backup's replica image stays locked while this process works on it (the VM runs from
    // its memory.bin): a backup started on it meanwhile is refused.
    let _image_lock = finalize_replica(&a.dir)?;
    let console = crate::run::console(a.console_log)?;
    let vm = Vm::restore(RestoreConfig {
        dir: a.dir,
        tap: a.tap,
        disk: a.disk,
        console: console.clone(),
        generation: None,
    })?;
    crate::run::supervise(
        Arc::new(vm),
        a.control.as_deref(),
        console,
        a.paused,
        Default::default(),
    )
}

/// A backup's replica image (`replica.bin` or a side image `incoming/`) is locked, and if its
/// backup died before finalizing it (no `snapshot.bin`, or one older than `replica.bin`),
/// finalized first: an interrupted promotion is finished or an abandoned full sync removed, an
/// interrupted checkpoint is completed from its journal, and the snapshot describes the last
/// committed checkpoint. Returns the lock (None for a plain snapshot directory). Also used by
/// `vmatrix primary --from-image`.
pub(crate) fn finalize_replica(dir: &Path) -> anyhow::Result<Option<backup::ImageLock>> {
    if !backup::image::is_replica(dir) {
        return Ok(None);
    }
    let lock = backup::ImageLock::acquire(dir)?;
    backup::image::recover_locked(&lock)
        .with_context(|| format!("recovering the replica image in {}", dir.display()))?;
    let mtime = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    };
    let Some(replica) = mtime(backup::image::REPLICA_FILE) else {
        anyhow::bail!(
            "{}: no full sync of this replica image ever completed: there is no consistent \
             checkpoint to restore",
            dir.display()
        );
    };
    if mtime(vmm::snapshot::META_FILE).is_some_and(|s| s >= replica) {
        return Ok(Some(lock));
    }
    let seq = backup::image::finalize_locked(&lock)
        .with_context(|| format!("finalizing the replica image in {}", dir.display()))?;
    eprintln!("vmatrix restore: replica image finalized at checkpoint {seq}");
    Ok(Some(lock))
}
