//! `vmatrix primary`: a VM (booted, or started from a snapshot or a backup's image with
//! `--from-image`) replicated to its backups, session after session: a session that loses its
//! backups is followed by another (output stays held meanwhile), and `PUT /backups` on its
//! control socket (`vmatrix ctl <socket> backups ...`) ends the running session and starts the
//! next one with the new set at once. Its control socket also serves `PUT /fence`; a fenced
//! primary (by that request, or by a backup that refused it for a stale term) releases no
//! output again, stops its VM and exits with [`FENCED_EXIT`]; and `PUT /handover`
//! ([`super::handover`]). Its `GET /status` adds the replication figures to the VM's.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use primary::{Fence, PrimaryConfig, PrimaryError, PrimaryState, Stats};
use protocol::page::EncodeOptions;
use tokio::sync::watch;
use vmm::devices::serial::ConsoleOut;
use vmm::Vm;

use super::{load_identity, parse_backup_set, quic_config, PrimaryArgs};
use crate::control::types::{
    BackupsAnswer, CheckpointAnswer, ControlError, PrimaryFenceAnswer, Request,
};
use crate::control::{answer, Extra, ExtraRequests, StatusExtra};
use crate::run::{resolve, supervise};

/// Exit code of a fenced primary.
pub const FENCED_EXIT: u8 = 3;

/// Pause between losing every backup and trying to reconnect.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The backups of the next session, and how many must acknowledge.
#[derive(Debug, Clone)]
struct BackupSet {
    list: Vec<(SocketAddr, String)>,
    required: usize,
}

/// Refuses a `--vcpu-cpus`/`--loop-cpus` CPU this process may not run on.
fn check_cpu_lists(a: &PrimaryArgs) -> anyhow::Result<()> {
    super::check_cpus("--vcpu-cpus", a.vcpu_cpus.as_ref())?;
    super::check_cpus("--loop-cpus", a.loop_cpus.as_ref())
}

/// Runs a protected VM; if the backups are lost it keeps the guest's output held and reconnects,
/// starting over with a new initial sync.
pub fn primary_main(mut a: PrimaryArgs) -> anyhow::Result<ExitCode> {
    if !(1..=1000).contains(&a.epoch_ms) {
        bail!("--epoch-ms must be between 1 and 1000");
    }
    check_cpu_lists(&a)?;
    let identity = load_identity(&a.certs, &a.host)?;
    let n = a.backup.len();
    let required = match a.required.as_str() {
        "all" => n,
        x => x
            .parse::<usize>()
            .ok()
            .filter(|&k| (1..=n).contains(&k))
            .with_context(|| format!("--required must be 'all' or 1..={n}"))?,
    };
    let control = a.run.control.clone();
    // (The image lock, if the VM runs from a replica image, is held until this returns.)
    vmm::dirty_ring::prefer(a.dirty_source == super::DirtySource::Ring);
    vmm::dirty_ring::set_size(a.dirty_ring_bytes).context("--dirty-ring-bytes")?;
    let (vm, console, _image_lock) = build_vm(&mut a)?;
    if a.dirty_source == super::DirtySource::Ring && vm.dirty_source() != "ring" {
        tracing::warn!(
            "--dirty-source ring: this KVM gives no dirty ring (or refused its size); the \
             bitmap is used"
        );
    }
    vm.set_rt_pause(a.rt_pause);
    vm.set_lock_buffers(a.lock_buffers);
    tracing::info!(
        "dirty pages from: {}; pauses at real-time priority: {}; pause buffers locked in RAM: {}",
        vm.dirty_source(),
        a.rt_pause.name(),
        vm.lock_buffers()
    );
    if !a.unprotected_start {
        // Nothing the guest sends may leave before the backup holds the state that produced it.
        vm.hold_output_from_start();
    }
    let pcfg = primary_config(&a, required, identity);
    let (backups_tx, backups_rx) = watch::channel(BackupSet {
        list: a.backup,
        required,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let fence = Arc::new(Fence::default());
    // One history for the life of this primary: sessions after a failure resync from it.
    let state = PrimaryState::new(&vm, a.term, pcfg.encode);
    tracing::info!(
        "history {:x}, term {}",
        state.history.id,
        state.history.term
    );
    let sessions = Sessions {
        vm: vm.clone(),
        pcfg,
        stats: stats.clone(),
        state,
        fence: fence.clone(),
        backups: backups_rx,
        stop: stop_rx,
        unprotected: a.unprotected_start,
    };
    if let Some(super::CpuList(cpus)) = &a.vcpu_cpus {
        vm.pin_vcpu(cpus)
            .with_context(|| format!("pinning the vCPU thread to CPUs {cpus:?}"))?;
        tracing::info!("vCPU thread pinned to CPUs {cpus:?}");
    }
    let threads = crate::rt::Threads {
        cpus: a.loop_cpus.clone().map(|l| l.0),
        realtime: false,
    };
    let repl = crate::rt::spawn_with("replication", threads, sessions.run())
        .context("spawning the replication thread")?;
    let backups_tx = Arc::new(backups_tx);
    let handed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let extra = Extra {
        status: Some(status(
            vm.clone(),
            (stats.clone(), handed.clone()),
            a.term,
            backups_tx.clone(),
        )),
        requests: Some(requests(
            vm.clone(),
            fence.clone(),
            a.term,
            backups_tx,
            (stats.clone(), handed.clone()),
        )),
    };
    crate::progress::spawn(stats.clone(), Duration::from_secs(600));
    if let Some(addr) = a.metrics {
        crate::metrics::serve(addr, vm.clone(), stats.clone())?;
    }
    let code = supervise(vm, control.as_deref(), console, false, extra);
    let _ = stop_tx.send(true);
    let _ = repl.join();
    exit_code(code, &handed, &fence, a.term)
}

/// How the primary ended: handed over, fenced by a newer term, or as its VM did.
fn exit_code(
    code: anyhow::Result<ExitCode>,
    handed: &std::sync::atomic::AtomicBool,
    fence: &Fence,
    term: u64,
) -> anyhow::Result<ExitCode> {
    // (Handed over first: a handover's stop is not a fence, whatever came after it.)
    if handed.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("vmatrix primary: handed over (the guest stopped after its last checkpoint)");
        return Ok(ExitCode::from(super::handover::HANDED_OVER_EXIT));
    }
    if let Some(f) = fence.fenced() {
        let by = f
            .term
            .map_or("a newer term".to_string(), |t| format!("term {t}"));
        eprintln!("vmatrix primary: fenced by {by} (this primary has term {term})");
        return Ok(ExitCode::from(FENCED_EXIT));
    }
    code
}

/// The replication settings from the flags.
fn primary_config(
    a: &PrimaryArgs,
    required: usize,
    identity: transport::certs::Identity,
) -> PrimaryConfig {
    PrimaryConfig {
        epoch: Duration::from_millis(a.epoch_ms),
        min_epoch: Duration::from_millis(a.min_epoch_ms.clamp(1, 1000)),
        max_output_delay: Duration::from_millis(a.max_output_delay_ms.clamp(1, 10_000)),
        backups: Vec::new(),
        required,
        identity,
        cluster_id: a.cluster_id,
        vm_id: a.vm_id.clone(),
        term: a.term,
        lanes: a.lanes,
        window: 4,
        quic: quic_config(a.idle_timeout_ms),
        encode: EncodeOptions::default(),
        early_checkpoints: a.early_checkpoints,
        precopy_rounds: a.precopy_rounds,
        drop_after: Duration::from_millis(a.drop_after_ms),
        data_connections: a.data_connections,
        epoch_precopy: a.epoch_precopy,
    }
}

/// The VM: booted from the flags, or restored from `--from-image` (a backup's replica image is
/// locked and recovered first, as by `vmatrix restore`; the lock is returned, to be held while
/// the VM runs). The new primary takes a replica image over: its memory is mapped, not read,
/// and its disk becomes the working disk (cloned or linked; either way the image is consumed,
/// durably, right before the guest's first instruction: see `crate::restore::restore_dir`), so
/// the start does not grow with the guest.
fn build_vm(
    a: &mut PrimaryArgs,
) -> anyhow::Result<(Arc<Vm>, ConsoleOut, Option<Arc<backup::ImageLock>>)> {
    let Some(dir) = a.from_image.take() else {
        let cfg = resolve(std::mem::take(&mut a.run))?;
        let console = cfg.console.clone();
        return Ok((Arc::new(Vm::new(cfg)?), console, None));
    };
    let console = crate::run::console(a.run.console_log.take())?;
    let host = crate::restore::Host {
        tap: a.run.tap.take(),
        disk: a.run.disk.take(),
        console: console.clone(),
    };
    let (vm, lock) = crate::restore::restore_dir(&dir, host, true)
        .with_context(|| format!("starting the VM from the image in {}", dir.display()))?;
    Ok((Arc::new(vm), console, lock))
}

/// The primary's replication figures for `GET /status` (`metrics::replication_status`).
fn status(
    vm: Arc<Vm>,
    (stats, handed): (Arc<Stats>, Arc<std::sync::atomic::AtomicBool>),
    term: u64,
    backups: Arc<watch::Sender<BackupSet>>,
) -> StatusExtra {
    Arc::new(move || {
        let facts = crate::metrics::PrimaryFacts {
            term,
            backups: backups.borrow().list.len(),
            output_held: vm.held_output().is_some(),
            handed_over: handed.load(std::sync::atomic::Ordering::SeqCst),
            dirty_source: vm.dirty_source(),
            rt_pause: vm.rt_pause(),
            rt_mode: vm.rt_mode().name(),
            rt_boosting: vm.rt_boosting(),
            rt_counts: vm.rt_counts(),
            dirty_ring_full: vm.dirty_ring_full(),
        };
        crate::metrics::replication_status(&stats, &facts)
    })
}

/// The primary's own control requests: `PUT /backups`, `PUT /fence` and `PUT /handover`.
fn requests(
    vm: Arc<Vm>,
    fence: Arc<Fence>,
    term: u64,
    backups: Arc<watch::Sender<BackupSet>>,
    (stats, handed): (Arc<Stats>, Arc<std::sync::atomic::AtomicBool>),
) -> ExtraRequests {
    Arc::new(move |req| match req {
        Request::Handover => Some(
            super::handover::run(&vm, &stats, &handed)
                .and_then(|seq| answer(CheckpointAnswer { checkpoint: seq })),
        ),
        Request::Backups(set) => Some(
            parse_backup_set(set)
                .map_err(ControlError::bad_request)
                .and_then(|list| {
                    let n = list.len();
                    tracing::info!("new set of {n} backups: the session starts over with it");
                    backups.send_replace(BackupSet { list, required: n });
                    answer(BackupsAnswer { backups: n as u64 })
                }),
        ),
        Request::Fence(t) if *t > term => {
            let f = fence.fence(Some(*t));
            tracing::error!("fenced by term {t}: no output is released from now on");
            vm.stop();
            Some(answer(PrimaryFenceAnswer {
                fenced: true,
                term: f.term.unwrap_or(*t),
            }))
        }
        Request::Fence(_) => Some(answer(PrimaryFenceAnswer {
            fenced: false,
            term,
        })),
        _ => None,
    })
}

/// How a session ended, for what comes next.
enum Next {
    /// The set of backups changed: start the next session at once.
    Restart,
    /// The primary is stopping.
    Stop,
    /// The session failed: try again after [`RECONNECT_DELAY`].
    Retry(PrimaryError),
    /// A backup holds a newer term.
    Fenced,
}

/// The replication sessions of one primary, one after another.
struct Sessions {
    vm: Arc<Vm>,
    pcfg: PrimaryConfig,
    stats: Arc<Stats>,
    state: PrimaryState,
    fence: Arc<Fence>,
    backups: watch::Receiver<BackupSet>,
    stop: watch::Receiver<bool>,
    unprotected: bool,
}

impl Sessions {
    async fn run(mut self) {
        // Wait for the VM to be running before the initial sync.
        tokio::time::sleep(Duration::from_millis(1)).await;
        while self.fence.fenced().is_none() && !*self.stop.borrow() {
            let set = self.backups.borrow_and_update().clone();
            if set.list.is_empty() {
                self.without_backups();
                tokio::select! {
                    r = self.backups.changed() => if r.is_err() { break },
                    _ = self.stop.changed() => break,
                }
                continue;
            }
            match self.session(set).await {
                Next::Restart => {}
                Next::Stop => break,
                Next::Fenced => {
                    // (The driver fenced the primary before it returned.)
                    tracing::error!("fenced: stopping the VM");
                    self.vm.stop();
                    break;
                }
                Next::Retry(e) => {
                    // Output stays held (no client may see state a failover could lose) until
                    // a backup holds the VM again: reconnect, resync or sync it from scratch.
                    tracing::error!("replication lost: {e}; guest output stays held");
                    eprintln!("vmatrix primary: replication lost: {e}; guest output stays held; reconnecting (a quick resync or a new full sync follows)");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                        r = self.backups.changed() => if r.is_err() { break },
                        _ = self.stop.changed() => break,
                    }
                }
            }
        }
    }

    /// No backup is configured: with the failover manager's grant (`--unprotected-start`) the
    /// VM runs unprotected — output still held is released and no longer held (the next
    /// session holds it again from its sync on); without it, output stays held.
    fn without_backups(&mut self) {
        if !self.unprotected || self.vm.held_output().is_none() {
            if self.vm.held_output().is_some() {
                tracing::warn!("no backups: guest output stays held until a backup holds the VM");
            }
            return;
        }
        let vm = &self.vm;
        if self
            .fence
            .unless_fenced(|| vm.disable_output_commit())
            .is_some()
        {
            self.state.output_unheld();
            tracing::warn!("no backups: the VM runs unprotected (granted by --unprotected-start)");
        }
    }

    /// One session with `set`, until it fails, the set changes or the primary stops.
    async fn session(&mut self, set: BackupSet) -> Next {
        let cfg = PrimaryConfig {
            backups: set.list,
            required: set.required,
            ..self.pcfg.clone()
        };
        let (end_tx, end_rx) = watch::channel(false);
        let run = primary::run_fenced(
            self.vm.clone(),
            cfg,
            self.stats.clone(),
            &mut self.state,
            end_rx,
            self.fence.clone(),
        );
        tokio::pin!(run);
        // Some(reason) when this loop ends the session.
        let (ended, r) = tokio::select! {
            r = &mut run => (None, r),
            c = self.backups.changed() => (Some(c.is_ok()), Ok(())),
            _ = self.stop.changed() => (Some(false), Ok(())),
        };
        let r = match ended {
            Some(_) => {
                let _ = end_tx.send(true);
                run.await
            }
            None => r,
        };
        self.stats.protected.store(false, Ordering::Relaxed);
        self.stats.in_step.store(0, Ordering::Relaxed);
        match (ended, r) {
            (_, Err(PrimaryError::Fenced { .. })) => Next::Fenced,
            (Some(true), _) => Next::Restart,
            (Some(false), _) => Next::Stop,
            (None, Err(e)) => Next::Retry(e),
            (None, Ok(())) => Next::Retry(PrimaryError::BackupLost("session ended".into())),
        }
    }
}
