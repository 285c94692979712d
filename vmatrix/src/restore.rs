//! `vmatrix restore`: start a VM from a snapshot directory or a backup's replica image in a new
//! process. [`restore_dir`] builds the VM for it and for `vmatrix primary --from-image`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use backup::image::{self, WorkingDisk};
use backup::ImageLock;
use clap::Args;
use vmm::devices::serial::ConsoleOut;
use vmm::{RestoreConfig, RestoreParts, Vm};

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
    let console = crate::run::console(a.console_log)?;
    let host = Host {
        tap: a.tap,
        disk: a.disk,
        console: console.clone(),
    };
    // A backup's replica image stays locked while this process runs its VM: a backup started
    // on it meanwhile is refused.
    let (vm, _image_lock) = restore_dir(&a.dir, host, false)?;
    crate::run::supervise(
        Arc::new(vm),
        a.control.as_deref(),
        console,
        a.paused,
        Default::default(),
    )
}

/// The host resources of a VM being restored.
pub(crate) struct Host {
    /// Tap for the NIC.
    pub tap: Option<String>,
    /// Working disk (default `<dir>/disk-live.img`).
    pub disk: Option<PathBuf>,
    /// Console output.
    pub console: ConsoleOut,
}

/// Builds (does not start) the VM of `dir`: a snapshot directory, restored and verified as
/// `Vm::restore` does, or a backup's replica image (`replica.bin`, or a side image
/// `incoming/`), which is locked — the lock is returned, to be held while the VM runs — and
/// recovered (an interrupted promotion finished or an abandoned sync removed, an interrupted
/// checkpoint completed from its journal). A replica image finalized as a snapshot by a stopped
/// backup (a `snapshot.bin` as new as `replica.bin`) restores as that snapshot; otherwise the
/// VM is built from the image's parts: `memory.bin` mapped copy-on-write, the state from
/// `replica.bin`, and a working disk cloned from `disk.img` where the file system can. With
/// `take` (a new primary: `vmatrix primary --from-image`) and no clone, the VM takes `disk.img`
/// over (linked, no copy); with `take` the image is consumed when the guest starts, cloned disk
/// or not (`backup::image::consume_locked`); without it the disk's data is copied and the image
/// stays.
pub(crate) fn restore_dir(
    dir: &Path,
    host: Host,
    take: bool,
) -> anyhow::Result<(Vm, Option<Arc<ImageLock>>)> {
    if !image::is_replica(dir) {
        if let Some(m) = image::consumed(dir) {
            anyhow::bail!(
                "{}: this replica image was taken over by a VM started from its checkpoint {} \
                 (term {}), which ran with its disk: it holds no checkpoint any more",
                dir.display(),
                m.seq,
                m.term
            );
        }
        return Ok((snapshot_vm(dir, host)?, None));
    }
    let t0 = Instant::now();
    let lock = ImageLock::acquire(dir)?;
    let meta = image::committed_locked(&lock)
        .with_context(|| format!("recovering the replica image in {}", dir.display()))?;
    // (A new primary — `take` — never starts from the snapshot a stopped backup finalized: it
    // is built from the image's parts below so that its start gate consumes the image; a guest
    // that ran from a still-whole image would be taken for one that never ran.)
    if finalized(dir) && !take {
        return Ok((snapshot_vm(dir, host)?, Some(Arc::new(lock))));
    }
    let t_recovered = t0.elapsed();
    let disk = host
        .disk
        .clone()
        .unwrap_or_else(|| dir.join(backup::promote::LIVE_DISK));
    let made = match meta.disk_len {
        0 => None,
        _ => Some(image::working_disk_locked(&lock, &meta, &disk, take)?),
    };
    let t_disk = t0.elapsed();
    let vm = Vm::restore_parts(RestoreParts {
        memory: dir.join(vmm::snapshot::MEMORY_FILE),
        mem_size: meta.mem_size,
        disk: made.map(|_| disk.clone()),
        state: meta.vm_state()?,
        tap: host.tap,
        console: host.console,
        generation: None,
    })
    .with_context(|| format!("starting the VM of the replica image in {}", dir.display()))?;
    let lock = Arc::new(lock);
    // A new primary consumes the image whatever its disk (linked or cloned), durably, right
    // before its guest's first instruction: an image still whole afterwards proves that no
    // guest ever ran from it, so nothing of the new term was released (the agent reports such
    // a promotion as never run and the manager promotes that image again: failover::manager).
    if take {
        let held = lock.clone();
        vm.gate_start(Box::new(move || {
            image::consume_locked(&held).map_err(|e| format!("consuming the image: {e}"))
        }));
    }
    tracing::info!(
        "restored from {}: checkpoint {} (term {}), recovered in {:.1} ms, working disk {} in \
         {:.1} ms, VM built in {:.1} ms ({} MiB of memory mapped copy-on-write)",
        dir.display(),
        meta.seq,
        meta.term,
        ms(t_recovered),
        describe(made),
        ms(t_disk - t_recovered),
        ms(t0.elapsed() - t_disk),
        meta.mem_size >> 20
    );
    eprintln!(
        "vmatrix restore: replica image finalized at checkpoint {} (term {}); the VM starts from \
         it",
        meta.seq, meta.term
    );
    Ok((vm, Some(lock)))
}

/// A snapshot directory's VM (every part verified).
fn snapshot_vm(dir: &Path, host: Host) -> anyhow::Result<Vm> {
    Vm::restore(RestoreConfig {
        dir: dir.to_path_buf(),
        tap: host.tap,
        disk: host.disk,
        console: host.console,
        generation: None,
    })
    .with_context(|| format!("restoring the snapshot in {}", dir.display()))
}

/// A replica image whose backup stopped and finalized it as a snapshot of its checkpoint.
fn finalized(dir: &Path) -> bool {
    let mtime = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    };
    match (mtime(vmm::snapshot::META_FILE), mtime(image::REPLICA_FILE)) {
        (Some(s), Some(r)) => s >= r,
        _ => false,
    }
}

fn describe(d: Option<WorkingDisk>) -> String {
    match d {
        None => "none".into(),
        Some(WorkingDisk::Cloned) => "cloned (reflink)".into(),
        Some(WorkingDisk::Linked) => "taken over (linked; the image is consumed at start)".into(),
        Some(WorkingDisk::Copied { bytes }) => format!("copied ({} KiB of data)", bytes >> 10),
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
