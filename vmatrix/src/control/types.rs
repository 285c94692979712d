//! The control API's vocabulary, shared by the server and the client: [`Request`] (what a
//! request asks, and the HTTP method, path and JSON body that carry it), the bodies, the
//! answers (the `status` of each kind of process) and [`ControlError`], an error with the HTTP
//! status it is answered with. Pure data and pure functions: no I/O here.

use std::path::PathBuf;

use axum::http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a control request asks, whatever the process (each answers its own; see
/// `control`'s table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /status`.
    Status,
    /// `PUT /state`: pause or resume the VM.
    SetState(RunState),
    /// `GET /checksum`: CRC32 of guest memory (paused VM).
    Checksum,
    /// `PUT /snapshot`.
    Snapshot {
        /// Full or diff.
        kind: SnapshotKind,
        /// Target directory (absolute).
        dir: PathBuf,
    },
    /// `PUT /stop`.
    Stop,
    /// `PUT /faults/disk`: fail the next n guest disk writes (fault injection, for tests).
    DiskFaults(u32),
    /// `PUT /backups`: a primary's new set (`name@host:port` each; empty: none).
    Backups(Vec<String>),
    /// `PUT /fence`.
    Fence(u64),
    /// `PUT /handover`: a primary's planned handover.
    Handover,
    /// `PUT /promote`: a backup's promotion to the term.
    Promote(u64),
    /// `PUT /identity`: a standby clone's identity (it starts serving as that clone).
    Identity {
        /// The clone's name.
        name: String,
        /// Its guest config string (its own address).
        config: String,
    },
}

/// A VM running or paused (`PUT /state`, `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The vCPU runs.
    Running,
    /// The vCPU is parked.
    Paused,
}

/// Which snapshot (`PUT /snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Everything.
    Full,
    /// What changed since the previous snapshot.
    Diff,
}

/// Body of `PUT /state`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateBody {
    /// `"paused"` or `"running"`.
    pub state: RunState,
}

/// Body of `PUT /snapshot`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// `"full"` or `"diff"`.
    pub kind: SnapshotKind,
    /// Absolute directory.
    pub dir: PathBuf,
}

/// Body of `PUT /faults/disk`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsBody {
    /// How many guest disk writes fail next.
    pub count: u32,
}

/// Body of `PUT /backups`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsBody {
    /// `name@host:port` each; empty: no backup.
    pub backups: Vec<String>,
}

/// Body of `PUT /fence` and `PUT /promote`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermBody {
    /// The term.
    pub term: u64,
}

/// Body of `PUT /identity`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBody {
    /// The clone's name.
    pub name: String,
    /// Its guest config string.
    pub config: String,
}

/// Body of a request that carries none (`{}` or nothing).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

impl Request {
    /// The method and path that carry it.
    pub fn route(&self) -> (Method, &'static str) {
        match self {
            Request::Status => (Method::GET, "/status"),
            Request::Checksum => (Method::GET, "/checksum"),
            Request::SetState(_) => (Method::PUT, "/state"),
            Request::Snapshot { .. } => (Method::PUT, "/snapshot"),
            Request::Stop => (Method::PUT, "/stop"),
            Request::DiskFaults(_) => (Method::PUT, "/faults/disk"),
            Request::Backups(_) => (Method::PUT, "/backups"),
            Request::Fence(_) => (Method::PUT, "/fence"),
            Request::Handover => (Method::PUT, "/handover"),
            Request::Promote(_) => (Method::PUT, "/promote"),
            Request::Identity { .. } => (Method::PUT, "/identity"),
        }
    }

    /// Its JSON body (None for a GET; `{}` for a PUT that needs nothing).
    pub fn body(&self) -> Option<serde_json::Value> {
        let v = |b: serde_json::Result<serde_json::Value>| Some(b.expect("plain data"));
        match self {
            Request::Status | Request::Checksum => None,
            Request::Stop | Request::Handover => v(serde_json::to_value(NoBody {})),
            Request::SetState(state) => v(serde_json::to_value(StateBody { state: *state })),
            Request::Snapshot { kind, dir } => v(serde_json::to_value(SnapshotBody {
                kind: *kind,
                dir: dir.clone(),
            })),
            Request::DiskFaults(count) => v(serde_json::to_value(FaultsBody { count: *count })),
            Request::Backups(backups) => v(serde_json::to_value(BackupsBody {
                backups: backups.clone(),
            })),
            Request::Fence(term) | Request::Promote(term) => {
                v(serde_json::to_value(TermBody { term: *term }))
            }
            Request::Identity { name, config } => v(serde_json::to_value(IdentityBody {
                name: name.clone(),
                config: config.clone(),
            })),
        }
    }

    /// `PUT <path>` with `body`: the request, or why not (400). A path that takes no body
    /// accepts an empty one or `{}`.
    pub fn from_put(path: &str, body: &[u8]) -> Result<Request, ControlError> {
        Ok(match path {
            "/state" => Request::SetState(json::<StateBody>(body)?.state),
            "/snapshot" => {
                let b: SnapshotBody = json(body)?;
                if !b.dir.is_absolute() {
                    return Err(ControlError::bad_request(format!(
                        "\"dir\" must be an absolute path, not '{}'",
                        b.dir.display()
                    )));
                }
                Request::Snapshot {
                    kind: b.kind,
                    dir: b.dir,
                }
            }
            "/faults/disk" => Request::DiskFaults(json::<FaultsBody>(body)?.count),
            "/backups" => Request::Backups(json::<BackupsBody>(body)?.backups),
            "/fence" => Request::Fence(json::<TermBody>(body)?.term),
            "/promote" => Request::Promote(json::<TermBody>(body)?.term),
            "/identity" => {
                let b: IdentityBody = json(body)?;
                Request::Identity {
                    name: b.name,
                    config: b.config,
                }
            }
            "/stop" | "/handover" => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    json::<NoBody>(body)?;
                }
                match path {
                    "/stop" => Request::Stop,
                    _ => Request::Handover,
                }
            }
            _ => return Err(ControlError::not_found(format!("no resource PUT {path}"))),
        })
    }

    /// A short name for messages, e.g. `PUT /promote`.
    pub fn name(&self) -> String {
        let (m, p) = self.route();
        format!("{m} {p}")
    }
}

/// Parses a JSON body into `T`; a clear 400 if it is not.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body)
        .map_err(|e| ControlError::bad_request(format!("invalid JSON body: {e}")))
}

/// What went wrong, as the HTTP status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed or a value is invalid.
    BadRequest,
    /// 404: no such resource (on this kind of process).
    NotFound,
    /// 405: the resource exists, not with this method.
    MethodNotAllowed,
    /// 408: the request (head or body) did not arrive in time.
    Timeout,
    /// 409: not valid in the current state.
    Conflict,
    /// 413: the body is too large.
    TooLarge,
    /// 500: the operation failed.
    Failed,
    /// 503: too many clients, or the process is going away.
    Busy,
}

impl ErrorKind {
    /// Its HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A control request refused or failed: answered `{"error": message}` with its kind's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Which status.
    pub kind: ErrorKind,
    /// Why, for a human.
    pub message: String,
}

impl ControlError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ControlError {
        ControlError {
            kind,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(m: impl Into<String>) -> ControlError {
        ControlError::new(ErrorKind::BadRequest, m)
    }

    /// 404.
    pub fn not_found(m: impl Into<String>) -> ControlError {
        ControlError::new(ErrorKind::NotFound, m)
    }

    /// 409.
    pub fn conflict(m: impl Into<String>) -> ControlError {
        ControlError::new(ErrorKind::Conflict, m)
    }

    /// 500.
    pub fn failed(m: impl Into<String>) -> ControlError {
        ControlError::new(ErrorKind::Failed, m)
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Why.
    pub error: String,
}

/// `GET /status` of any process, told apart by `"role"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Status {
    /// A VM without replication (`run`, `restore`).
    Vm(VmStatus),
    /// A protected VM (`primary`).
    Primary(PrimaryStatus),
    /// A backup.
    Backup(BackupStatus),
}

/// A VM's state and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Running or paused (paused also while a checkpoint or a snapshot pauses it, for about a
    /// millisecond).
    pub state: RunState,
    /// Guest RAM.
    pub mem_mib: u64,
    /// The guest's clock.
    pub guest_clock_ms: u64,
    /// Frames received by the guest.
    pub net_rx_frames: u64,
    /// Frames sent by the guest.
    pub net_tx_frames: u64,
    /// Frames the host could not send.
    pub net_tx_errors: u64,
    /// Disk requests completed.
    pub blk_requests: u64,
    /// Output commit: the epoch of the output now collected (null when output is not held).
    pub output_epoch: Option<u64>,
    /// Output commit: frames held.
    pub held_frames: Option<u64>,
    /// Output commit: bytes held.
    pub held_bytes: Option<u64>,
}

/// A primary's VM and replication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// The VM.
    #[serde(flatten)]
    pub vm: VmStatus,
    /// The replication.
    #[serde(flatten)]
    pub replication: Replication,
}

/// A primary's replication figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replication {
    /// Its term.
    pub term: u64,
    /// The session's first sync or resync is acknowledged.
    pub protected: bool,
    /// Highest acknowledged consistent checkpoint (null: none).
    pub acked_seq: Option<u64>,
    /// Backups in its current set.
    pub backups: u64,
    /// Backups keeping up.
    pub backups_in_step: u64,
    /// Guest output is held until acknowledged (output commit on).
    pub output_held: bool,
    /// Pre-copy rounds of the last sync.
    pub sync_rounds: u64,
    /// Checkpoints sent.
    pub epochs: u64,
    /// Current epoch length, µs.
    pub epoch_us: u64,
    /// Highest acknowledged checkpoint (null: none).
    pub acked_epoch: Option<u64>,
    /// Median checkpoint pause, µs.
    pub pause_p50_us: u64,
    /// 99th percentile checkpoint pause, µs.
    pub pause_p99_us: u64,
    /// Last checkpoint pause, µs.
    pub last_pause_us: u64,
    /// Longest checkpoint pause, µs.
    pub max_pause_us: u64,
    /// Dirty pages sent.
    pub dirty_pages_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Last acknowledgement latency, µs.
    pub ack_latency_us: u64,
    /// Guest frames released.
    pub released_frames: u64,
    /// It handed over (`PUT /handover` answered): its guest is stopped for good.
    #[serde(default)]
    pub handed_over: bool,
    /// Where the vCPU's dirty pages come from (`ring`, `bitmap+hot`, `bitmap`; chosen at
    /// start, `--dirty-source`).
    #[serde(default)]
    pub dirty_source: String,
    /// Pauses may run at real-time priority (`--rt-pause` not `off`, and the host allows it).
    #[serde(default)]
    pub rt_pause: bool,
    /// `--rt-pause`: `auto` (real-time while pauses are seen waiting for the scheduler), `on`,
    /// `off`.
    #[serde(default)]
    pub rt_mode: String,
    /// A pause now would run at real-time priority.
    #[serde(default)]
    pub rt_boosting: bool,
    /// Pauses that ran at real-time priority.
    #[serde(default)]
    pub rt_boosted_pauses: u64,
    /// Times `auto` turned real-time pauses on.
    #[serde(default)]
    pub rt_boosts: u64,
    /// Times the dirty ring filled between two checkpoints.
    #[serde(default)]
    pub dirty_ring_full: u64,
    /// Dirty pages copied early, while the guest ran, a quarter epoch before a busy epoch's
    /// pause (`--epoch-precopy`).
    #[serde(default)]
    pub early_copied_pages: u64,
    /// Stalls of the primary's process noticed (stopped or not scheduled for 25 ms or more):
    /// after each, output waits for a checkpoint taken after it (docs/failover.md).
    #[serde(default)]
    pub stalls: u64,
}

/// A backup's image and session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// A primary is connected.
    pub connected: bool,
    /// Sessions accepted.
    pub sessions: u64,
    /// In an initial sync (no consistent checkpoint yet).
    pub syncing: bool,
    /// Term of the committed image (0: none).
    pub term: u64,
    /// The committed image's checkpoint (null: none).
    pub seq: Option<u64>,
    /// History id of the committed image, hex (null: none).
    pub history: Option<String>,
    /// Since the last checkpoint was made durable, ms (null: never).
    pub last_checkpoint_ms_ago: Option<u64>,
    /// Since anything was heard from a primary, ms (null: never).
    pub last_heard_ms_ago: Option<u64>,
    /// Last applied checkpoint (null: none).
    pub applied_epoch: Option<u64>,
    /// Checkpoints applied.
    pub checkpoints: u64,
    /// Pages written into the image.
    pub pages: u64,
    /// Last checkpoint's time to durable, µs.
    pub durable_us: u64,
    /// Checkpoints that could not be applied.
    pub apply_failures: u64,
    /// The lowest term a primary may have (fenced, or the image's).
    pub min_term: u64,
}

/// Answer of `PUT /state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAnswer {
    /// The state now.
    pub state: RunState,
}

/// Answer of `GET /checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumAnswer {
    /// CRC32 of all guest memory.
    pub memory_crc32: u32,
}

/// Answer of `PUT /snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAnswer {
    /// The snapshot's id.
    pub id: u64,
    /// How long the guest was paused, µs.
    pub pause_us: u64,
    /// Pages stored.
    pub pages: u64,
    /// Total time, ms.
    pub total_ms: u64,
    /// CRC32 of guest memory (full snapshots; null for a diff).
    pub memory_crc32: Option<u32>,
}

/// Answer of `PUT /stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopAnswer {
    /// Always true: the process is stopping (a backup finalizes its image first).
    pub stopping: bool,
}

/// Answer of `PUT /faults/disk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultsAnswer {
    /// Writes that will fail.
    pub failing_writes: u32,
}

/// Answer of `PUT /backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupsAnswer {
    /// Backups in the new set.
    pub backups: u64,
}

/// A primary's answer to `PUT /fence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryFenceAnswer {
    /// Fenced: it stops and exits with code 3 (the term was newer than its own).
    pub fenced: bool,
    /// The fencing term when fenced, else its own.
    pub term: u64,
}

/// A backup's answer to `PUT /fence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFenceAnswer {
    /// The lowest term a primary may have now (persisted).
    pub min_term: u64,
}

/// Answer of `PUT /handover` (a primary) and `PUT /promote` (a backup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointAnswer {
    /// The checkpoint the backups hold (handover) or the image is at (promote).
    pub checkpoint: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<Request, ControlError> {
        Request::from_put(path, body.as_bytes())
    }

    #[test]
    fn parses_put_bodies() {
        assert_eq!(
            put("/state", r#"{"state":"paused"}"#),
            Ok(Request::SetState(RunState::Paused))
        );
        assert_eq!(
            put("/snapshot", r#"{"kind":"diff","dir":"/tmp/a b"}"#),
            Ok(Request::Snapshot {
                kind: SnapshotKind::Diff,
                dir: "/tmp/a b".into()
            })
        );
        assert_eq!(
            put("/faults/disk", r#"{"count":3}"#),
            Ok(Request::DiskFaults(3))
        );
        assert_eq!(
            put("/backups", r#"{"backups":[]}"#),
            Ok(Request::Backups(vec![]))
        );
        assert_eq!(put("/fence", r#"{"term":7}"#), Ok(Request::Fence(7)));
        assert_eq!(put("/promote", r#"{"term":2}"#), Ok(Request::Promote(2)));
        assert_eq!(
            put("/identity", r#"{"name":"c","config":"ip=10.0.0.9/24"}"#),
            Ok(Request::Identity {
                name: "c".into(),
                config: "ip=10.0.0.9/24".into()
            })
        );
        assert!(put("/identity", r#"{"name":"c"}"#).is_err());
        assert_eq!(put("/stop", ""), Ok(Request::Stop));
        assert_eq!(put("/stop", " {} "), Ok(Request::Stop));
        assert_eq!(put("/handover", ""), Ok(Request::Handover));
    }

    #[test]
    fn refuses_bad_bodies_clearly() {
        let bad = |path: &str, body: &str, want: &str| {
            let e = put(path, body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{path} {body}: {e}");
            assert!(e.message.contains(want), "{path} {body}: {e}");
        };
        bad("/state", "{", "invalid JSON body: EOF while parsing");
        bad(
            "/state",
            r#"{"state":"asleep"}"#,
            "unknown variant `asleep`",
        );
        bad("/state", r#"{}"#, "missing field `state`");
        bad(
            "/snapshot",
            r#"{"kind":"half","dir":"/x"}"#,
            "unknown variant",
        );
        bad(
            "/snapshot",
            r#"{"kind":"full","dir":"rel"}"#,
            "absolute path",
        );
        bad("/fence", r#"{"term":-1}"#, "invalid value");
        bad("/fence", r#"{"term":1,"x":2}"#, "unknown field `x`");
        bad("/faults/disk", r#"{"count":"many"}"#, "invalid type");
        bad("/stop", "now", "invalid JSON body");
        let e = put("/reboot", "{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
    }

    #[test]
    fn every_put_request_round_trips_through_its_route_and_body() {
        for r in [
            Request::SetState(RunState::Running),
            Request::Snapshot {
                kind: SnapshotKind::Full,
                dir: "/s".into(),
            },
            Request::Stop,
            Request::DiskFaults(1),
            Request::Backups(vec!["b@10.0.0.1:7100".into()]),
            Request::Fence(4),
            Request::Handover,
            Request::Promote(5),
        ] {
            let (m, path) = r.route();
            assert_eq!(m, Method::PUT);
            let body = serde_json::to_vec(&r.body().unwrap()).unwrap();
            assert_eq!(Request::from_put(path, &body), Ok(r));
        }
        assert_eq!(Request::Status.route(), (Method::GET, "/status"));
        assert_eq!(Request::Checksum.body(), None);
    }

    #[test]
    fn status_carries_its_role_and_numbers_as_numbers() {
        let vm = VmStatus {
            state: RunState::Running,
            mem_mib: 64,
            guest_clock_ms: 5,
            net_rx_frames: 1,
            net_tx_frames: 2,
            net_tx_errors: 0,
            blk_requests: 3,
            output_epoch: Some(9),
            held_frames: Some(0),
            held_bytes: Some(0),
        };
        let p = Status::Primary(PrimaryStatus {
            vm: vm.clone(),
            replication: Replication {
                term: 2,
                protected: true,
                acked_seq: None,
                backups: 1,
                backups_in_step: 1,
                output_held: true,
                sync_rounds: 3,
                epochs: 10,
                epoch_us: 20_000,
                acked_epoch: None,
                pause_p50_us: 1,
                pause_p99_us: 2,
                last_pause_us: 1,
                max_pause_us: 2,
                dirty_pages_sent: 5,
                bytes_sent: 6,
                handed_over: false,
                ack_latency_us: 7,
                released_frames: 8,
                dirty_source: "ring".into(),
                rt_pause: true,
                rt_mode: "auto".into(),
                rt_boosting: false,
                rt_boosted_pauses: 3,
                rt_boosts: 1,
                dirty_ring_full: 0,
                early_copied_pages: 9,
                stalls: 1,
            },
        });
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(v["state"], "running");
        assert_eq!(v["mem_mib"], 64);
        assert_eq!(v["term"], 2);
        assert_eq!(v["acked_seq"], serde_json::Value::Null);
        let back: Status = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
        let v = serde_json::to_value(Status::Vm(vm.clone())).unwrap();
        assert_eq!(v["role"], "vm");
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), Status::Vm(vm));
    }
}
