//! What a VM's control socket executes (`vmatrix run`, `restore`, `primary`): status, pause
//! and resume, checksum, snapshot, stop, disk fault injection — and, through [`Extra`], a
//! primary's own requests and status fields.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use vmm::Vm;

use super::server::{self, Served};
use super::types::{
    ChecksumAnswer, ControlError, FaultsAnswer, PrimaryStatus, Replication, Request, RunState,
    SnapshotAnswer, SnapshotKind, StateAnswer, Status, StopAnswer, VmStatus,
};

/// A primary's replication figures for `status`.
pub type StatusExtra = Arc<dyn Fn() -> Replication + Send + Sync>;

/// Requests a VM's owner answers besides the VM's own (a primary's `/backups`, `/fence`,
/// `/handover`): the answer, or None for a request it leaves to the VM.
pub type ExtraRequests = Arc<dyn Fn(&Request) -> Option<Result<Value, ControlError>> + Send + Sync>;

/// What a VM's control socket serves besides the VM's own requests.
#[derive(Clone, Default)]
pub struct Extra {
    /// Replication figures: `status` is then a primary's.
    pub status: Option<StatusExtra>,
    /// Further requests, tried before the VM's.
    pub requests: Option<ExtraRequests>,
}

/// Serializes an answer (plain data: cannot fail).
pub fn answer<T: Serialize>(t: T) -> Result<Value, ControlError> {
    serde_json::to_value(t).map_err(|e| ControlError::failed(e.to_string()))
}

/// Serves `vm`'s control requests on `path`, and `extra`'s. `paused` says the VM starts
/// parked, a pause `PUT /state {"state":"running"}` ends.
pub fn serve(path: &Path, vm: Arc<Vm>, extra: Extra, paused: bool) -> anyhow::Result<Served> {
    let h = VmHandler {
        vm,
        extra,
        paused_by_api: AtomicBool::new(paused),
    };
    server::serve(
        path,
        Box::new(move |req| {
            if let Some(a) = h.extra.requests.as_ref().and_then(|f| f(&req)) {
                return a;
            }
            h.execute(req)
        }),
    )
}

/// A VM's requests.
struct VmHandler {
    vm: Arc<Vm>,
    extra: Extra,
    /// The API holds a pause of the VM (its own, counted apart from a snapshot's or a
    /// checkpoint's, which it never ends).
    paused_by_api: AtomicBool,
}

impl VmHandler {
    fn execute(&self, req: Request) -> Result<Value, ControlError> {
        let vm = &self.vm;
        match req {
            Request::Status => {
                let s = vm_status(vm);
                answer(match &self.extra.status {
                    Some(f) => Status::Primary(PrimaryStatus {
                        vm: s,
                        replication: f(),
                    }),
                    None => Status::Vm(s),
                })
            }
            Request::SetState(state) => self.set_state(state),
            Request::Checksum => {
                // Paused through the API: a checkpoint's or a snapshot's pause may end while
                // memory is read.
                if !self.paused_by_api.load(Ordering::SeqCst) {
                    return Err(ControlError::conflict(
                        "the VM must be paused (PUT /state {\"state\":\"paused\"}) to checksum \
                         its memory",
                    ));
                }
                vm.memory_checksum()
                    .map_err(|e| ControlError::conflict(e.to_string()))
                    .and_then(|c| answer(ChecksumAnswer { memory_crc32: c }))
            }
            Request::Snapshot { kind, dir } => snapshot(vm, kind, &dir),
            Request::Stop => {
                vm.stop();
                answer(StopAnswer { stopping: true })
            }
            Request::DiskFaults(n) => vm
                .inject_disk_write_failures(n)
                .map_err(|e| ControlError::conflict(e.to_string()))
                .and_then(|()| answer(FaultsAnswer { failing_writes: n })),
            other => Err(ControlError::not_found(format!(
                "{} is not served by a {}: it serves GET /status, GET /checksum, PUT /state, \
                 PUT /snapshot, PUT /stop, PUT /faults/disk{}",
                other.name(),
                if self.extra.status.is_some() {
                    "primary"
                } else {
                    "VM without replication"
                },
                if self.extra.requests.is_some() {
                    ", PUT /backups, PUT /fence, PUT /handover"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Pauses or resumes; idempotent (a second pause changes nothing, and resuming a VM the
    /// API did not pause ends no one else's pause).
    fn set_state(&self, state: RunState) -> Result<Value, ControlError> {
        match state {
            RunState::Paused => {
                if !self.paused_by_api.load(Ordering::SeqCst) {
                    self.vm
                        .pause()
                        .map_err(|e| ControlError::conflict(format!("the VM has ended: {e}")))?;
                    self.paused_by_api.store(true, Ordering::SeqCst);
                }
            }
            RunState::Running => {
                if self.paused_by_api.swap(false, Ordering::SeqCst) {
                    self.vm.resume();
                }
            }
        }
        answer(StateAnswer { state })
    }
}

fn vm_status(vm: &Vm) -> VmStatus {
    let net = vm.net_stats().unwrap_or_default();
    let held = vm.held_output();
    VmStatus {
        state: if vm.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        },
        mem_mib: vm.mem_size() >> 20,
        guest_clock_ms: vm.guest_clock_ns() / 1_000_000,
        net_rx_frames: net.rx_frames,
        net_tx_frames: net.tx_frames,
        net_tx_errors: net.tx_errors,
        blk_requests: vm.blk_completed().unwrap_or(0),
        output_epoch: held.map(|h| h.2),
        held_frames: held.map(|h| h.0 as u64),
        held_bytes: held.map(|h| h.1 as u64),
    }
}

fn snapshot(vm: &Vm, kind: SnapshotKind, dir: &Path) -> Result<Value, ControlError> {
    let kind = match kind {
        SnapshotKind::Full => vmm::SnapshotKind::Full,
        SnapshotKind::Diff => vmm::SnapshotKind::Diff,
    };
    let s = vm.snapshot(dir, kind).map_err(|e| match e {
        // The directory holds one already, a diff has no base, the VM has ended.
        vmm::snapshot::SnapshotError::Capture(_) => ControlError::conflict(e.to_string()),
        e => ControlError::failed(e.to_string()),
    })?;
    answer(SnapshotAnswer {
        id: s.id,
        pause_us: s.pause.as_micros() as u64,
        pages: s.pages,
        total_ms: s.total.as_millis() as u64,
        memory_crc32: s.memory_checksum,
    })
}
