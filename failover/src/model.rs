//! The control plane's data: what a VM should be (its spec), where its instances run and at
//! which term (its record, persisted), what a host's agent must run (assignments) and what it
//! reports (observations). Plain serde data shared by the manager, the agent, the store and the
//! HTTP API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::limits::{Limits, ProcUsage, UsageOf};

pub use crate::clones::{
    BaseFetch, BaseObservation, BaseSource, CloneAssignment, CloneObservation, CloneSet,
};

/// A host's name (as in its certificate).
pub type HostId = String;

/// What the user asks for: one protected VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name (also the VM id on replication channels).
    pub name: String,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Guest disk size, MiB (a fresh raw disk is made on the primary's host).
    pub disk_mib: u64,
    /// The guest's config string (e.g. "ip=10.77.1.2/24,gw=10.77.1.1,port=7000").
    pub guest_config: String,
    /// Backups wanted (each on its own host, never the primary's).
    pub backups: u8,
    /// Hosts allowed to run it (empty: any).
    #[serde(default)]
    pub hosts: Vec<HostId>,
    /// UDP port the backups listen on (on their host's replication address).
    pub port: u16,
}

impl VmSpec {
    /// Checks what a user sent.
    pub fn validate(&self) -> Result<(), String> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(format!(
                "name '{}' must be 1..=32 characters of [A-Za-z0-9_-]",
                self.name
            ));
        }
        if !(16..=16384).contains(&self.mem_mib) {
            return Err(format!("mem_mib {} not in 16..=16384", self.mem_mib));
        }
        if !(1..=1 << 20).contains(&self.disk_mib) {
            return Err(format!("disk_mib {} not in 1..=1048576", self.disk_mib));
        }
        if self.backups > 4 {
            return Err(format!("backups {} > 4", self.backups));
        }
        if self.port == 0 || self.data_port().is_none() {
            return Err(format!(
                "port {}: 1..=65534 (its backups listen on it and, for their data \
                 connection, on the next one)",
                self.port
            ));
        }
        if self.guest_config.len() > 1024 || self.guest_config.contains('\n') {
            return Err("guest_config: one line of at most 1024 bytes".into());
        }
        Ok(())
    }

    /// The port of its backups' data connection: the one after `port` (a second QUIC
    /// connection that carries checkpoint data beside the session's, on a socket and a
    /// receive path of its own; docs/failover.md, "VmSpec"). None for port 65535 (refused).
    pub fn data_port(&self) -> Option<u16> {
        data_port(self.port)
    }

    /// Whether `host` may run it.
    pub fn allows(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }
}

/// The data port of a VM's backups listening on `port` ([`VmSpec::data_port`]).
pub fn data_port(port: u16) -> Option<u16> {
    port.checked_add(1)
}

/// One backup of a VM as the manager knows it (persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSlot {
    /// Its host.
    pub host: HostId,
    /// The term whose primary it holds everything of: set when that primary reports itself
    /// protected with exactly this set (with every backup required, all released output is then
    /// on each of them). Only a backup synced at the current term may be promoted.
    pub synced_term: Option<u64>,
}

/// Where a VM stands (persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Placed; the primary boots from scratch (nothing of it ever ran).
    Creating,
    /// A primary runs (protected or not: see the observations).
    Running,
    /// A backup is being promoted at the record's term.
    Promoting,
    /// A planned migration: the primary takes a last checkpoint of its paused guest; then the
    /// target (`handover_to`) is promoted from exactly that checkpoint.
    Handover,
}

/// The manager's persisted record of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// What the user asked for.
    pub spec: VmSpec,
    /// The current term: only the primary of this term may release output. Grows only.
    pub term: u64,
    /// Phase.
    pub phase: Phase,
    /// Host of the primary of `term` (none when lost).
    pub primary: Option<HostId>,
    /// The primary of `term` has been seen running (from then on nothing may boot it afresh).
    pub started: bool,
    /// Backups in the primary's set.
    pub backups: Vec<BackupSlot>,
    /// The target of a planned migration under way (phase `Handover`).
    #[serde(default)]
    pub handover_to: Option<HostId>,
    /// Promotions retried in a row because their primary never ran its guest (reset once the
    /// VM is protected again; persisted so that a restarted manager keeps the bound).
    #[serde(default)]
    pub retries: u32,
    /// Its clones: how many, where (absent in state files written before clones).
    #[serde(default)]
    pub clones: CloneSet,
    /// Resource limits of each of its processes (absent in state files written before them).
    #[serde(default)]
    pub limits: Limits,
}

/// Everything the manager persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// VMs by name.
    pub vms: BTreeMap<String, VmRecord>,
    /// The last term of each deleted VM: a VM created again under the same name starts above
    /// it (images and primaries of the old one on some host refuse, or are refused by, lower
    /// terms).
    #[serde(default)]
    pub retired: BTreeMap<String, u64>,
}

/// Where a VM's primary on a host comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// Boot the guest afresh (only before the VM ever ran).
    Boot,
    /// Promote the backup image on this host (the backup process there is told to promote).
    Promote,
    /// Already running: never start anything (a missing process is a failure to report).
    Running,
}

/// A backup address handed to a primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTarget {
    /// The backup's host (its certificate's name).
    pub host: HostId,
    /// `ip:port` it listens on.
    pub addr: String,
}

/// What one VM on one host must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The primary of `term`.
    Primary {
        /// Term granted.
        term: u64,
        /// Where it comes from.
        source: Source,
        /// Its backups; output is held until all of them acknowledged (empty: it runs
        /// unprotected, which only this grant allows).
        backups: Vec<BackupTarget>,
        /// Hand over: pause the guest for good, checkpoint it, wait for every backup's
        /// acknowledgement, stop (a planned migration).
        #[serde(default)]
        handover: bool,
    },
    /// A backup that refuses primaries older than `min_term`.
    Backup {
        /// Lowest term it accepts (persisted by the backup).
        min_term: u64,
    },
}

/// One VM's assignment to a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The VM.
    pub spec: VmSpec,
    /// Its role there.
    pub role: Role,
}

/// The whole of what a host must run (anything else of ours on it is stopped).
///
/// The clone fields come last and default to empty: an agent built before clones decodes an
/// assignment of a newer manager (postcard ignores the trailing bytes) and runs its VMs, and
/// an agent built after decodes an older manager's (the missing fields read as empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    /// By VM name.
    pub vms: BTreeMap<String, Assignment>,
    /// Clones to run on this host (each a plain VM of its own; anything else is stopped).
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub clones: Vec<CloneAssignment>,
    /// VMs whose primary or backup on this host makes (and keeps warm) a clone base.
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub bases: Vec<String>,
    /// VMs with clones here whose bases this host copies from another host's agent.
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub fetch: Vec<BaseFetch>,
    /// Resource limits of the VMs with a process here (primary, backup or clone), by VM name;
    /// a VM absent has none.
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub limits: BTreeMap<String, Limits>,
}

/// Kind of a VM process an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ProcRole {
    /// `vmatrix primary`.
    Primary,
    /// `vmatrix backup`.
    Backup,
}

/// What an agent sees of one VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObservation {
    /// VM name.
    pub vm: String,
    /// Its role.
    pub role: ProcRole,
    /// The process is alive (false: it exited; `exit` says how).
    pub alive: bool,
    /// Exit code or signal description, once it exited.
    pub exit: Option<String>,
    /// Primary: its term; backup: the lowest term it accepts.
    pub term: u64,
    /// Backup: the term of its committed image (0: none).
    pub image_term: u64,
    /// Backup: committed seq; primary: last acknowledged seq.
    pub seq: Option<u64>,
    /// Primary: every backup in its set holds the VM.
    pub protected: bool,
    /// Primary: the hosts of the backups in its set (as the agent last applied it).
    pub backup_hosts: Vec<HostId>,
    /// Primary: output waits for a checkpoint.
    pub output_held: bool,
    /// Backup: time since a checkpoint or heartbeat from its primary last arrived, ms (None:
    /// never, since it started). Primary: time since it last answered its agent's status
    /// request, ms (None: never, since it started).
    pub silent_ms: Option<u64>,
    /// Primary: it handed over: its guest is stopped for good and its last checkpoint is on
    /// every backup (reported as soon as it answered, while its process may still be exiting).
    #[serde(default)]
    pub handed_over: bool,
    /// Primary (not alive): it was promoted from this host's image and never ran its guest:
    /// the image it started from is still unconsumed (a VM consumes it, durably, right before
    /// its first instruction), so nothing of its term was ever released and the image still
    /// holds everything the term before released. Its host crashed between the promotion's
    /// marker and the guest's start, or the process failed before the guest ran.
    #[serde(default)]
    pub never_ran: bool,
}

impl VmObservation {
    /// The primary of `term` that a promotion on this host began but that never ran its
    /// guest, because the host restarted first (the agent finds it from the promotion's
    /// marker and the still-whole image).
    pub fn unstarted_primary(vm: &str, term: u64) -> VmObservation {
        VmObservation {
            vm: vm.to_string(),
            role: ProcRole::Primary,
            alive: false,
            exit: Some("this host restarted before its guest ran".into()),
            term,
            image_term: 0,
            seq: None,
            protected: false,
            backup_hosts: Vec::new(),
            output_held: false,
            silent_ms: None,
            handed_over: false,
            never_ran: true,
        }
    }
}

/// One report (heartbeat) of an agent.
///
/// The clone fields come last and default to empty: a manager built before clones decodes the
/// report of a newer agent (postcard ignores the trailing bytes), and a newer manager an older
/// agent's (the missing fields read as empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every VM process the agent runs or ran recently.
    pub vms: Vec<VmObservation>,
    /// Every clone it runs or ran recently.
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub clones: Vec<CloneObservation>,
    /// The clone bases it holds.
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub bases: Vec<BaseObservation>,
    /// The UDP port its agent serves clone bases on, on its replication address (0: none).
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub base_port: u16,
    /// Each VM process's use of its resource limits (only processes in a group of their own).
    #[serde(default, deserialize_with = "crate::clones::trailing")]
    pub usage: Vec<ProcUsage>,
}
