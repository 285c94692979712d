//! The manager's event log: what a person reads after an incident (detections, term changes,
//! promotions, re-protection), each numbered and, once the driver stamps it, timed.

use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An agent connected.
    HostUp,
    /// An agent stopped heartbeating.
    HostDown,
    /// A VM was created and placed.
    Created,
    /// A VM's primary runs at its term.
    PrimaryRunning,
    /// A VM's primary was declared failed (both signals).
    Detected,
    /// The VM's term was raised (persisted before anything acts on it).
    TermChanged,
    /// A backup was told to promote.
    Promoting,
    /// A backup joined a VM's set (re-protection or creation).
    BackupAdded,
    /// A backup left the set (its host or process failed).
    BackupLost,
    /// Every backup in the set holds the VM.
    Protected,
    /// The VM is down with no backup that holds everything it released.
    Lost,
    /// A VM was deleted.
    Deleted,
    /// An instance of an older term was found and fenced.
    Fenced,
    /// A planned migration's handover began or was abandoned.
    Handover,
    /// A VM's clone count changed (by hand or by its autoscaler: the detail says why), or a
    /// clone waits for a host.
    Scaled,
    /// A clone's VM runs on its host.
    CloneStarted,
    /// A clone was stopped (scaled down) or lost with its host.
    CloneStopped,
    /// A scaled-down clone began draining on the load balancer (or went back into service).
    CloneDraining,
    /// A load balancer's driver attached to a VM or detached (its lease ran out, or it said so).
    Balancer,
    /// A VM's resource limits were set or changed.
    Limited,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Manager time (ms since it started; the driver adds wall-clock time).
    pub at_ms: u64,
    /// Kind.
    pub kind: EventKind,
    /// The VM it concerns, if one.
    pub vm: Option<String>,
    /// The host it concerns, if one.
    pub host: Option<String>,
    /// The VM's term after it, if one.
    pub term: Option<u64>,
    /// What a person needs to know.
    pub detail: String,
}
