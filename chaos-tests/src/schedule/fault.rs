//! The faults a schedule can inject: their kinds (the names `--faults` takes), the roles that
//! targets are given by, and each fault's parameters.
//!
//! Targets are roles, not hosts: which host is "the primary" is only known when the fault is
//! injected (an earlier fault may have moved it), so the runner resolves a [`Role`] from the
//! manager's view at that moment and logs what it resolved to.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One kind of fault; `--faults` takes these names (and the group names of [`GROUPS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of every process of the primary's host (agent and VM processes).
    KillPrimaryHost,
    /// `kill -9` of every process of a backup's host.
    KillBackupHost,
    /// `kill -9` of the manager.
    KillManager,
    /// `kill -9` of one VM process (the primary's or a backup's), its host staying up.
    KillVm,
    /// SIGSTOP, then SIGCONT, of every process of the primary's host.
    StallPrimaryHost,
    /// SIGSTOP/SIGCONT of every process of a backup's host.
    StallBackupHost,
    /// SIGSTOP/SIGCONT of the manager.
    StallManager,
    /// SIGSTOP/SIGCONT of one VM process.
    StallVm,
    /// One host cut from every other host and from the manager (both directions).
    IsolateHost,
    /// The primary's host cut from the manager only.
    CutPrimaryFromManager,
    /// The primary's host cut from its backups' hosts only.
    CutPrimaryFromBackups,
    /// Packets from one role to another dropped, the other direction flowing.
    OneWayDrop,
    /// Delay (with jitter) on the replication link between the primary and a backup.
    LinkDelay,
    /// Random loss on the replication link.
    LinkLoss,
    /// Random duplication on the replication link.
    LinkDuplicate,
    /// Random reordering on the replication link (some packets held back).
    LinkReorder,
    /// A backup's disk full.
    DiskFull,
    /// A crash while a checkpoint is in flight.
    CrashInCheckpoint,
    /// A crash while a backup's initial sync runs.
    CrashInSync,
    /// Links stalled one by one, then healed in a random order (FoundationDB's swizzle-clog).
    Swizzle,
}

impl FaultKind {
    /// Every kind, in the canonical order (the order of the schedule's draws).
    pub const ALL: [FaultKind; 20] = [
        FaultKind::KillPrimaryHost,
        FaultKind::KillBackupHost,
        FaultKind::KillManager,
        FaultKind::KillVm,
        FaultKind::StallPrimaryHost,
        FaultKind::StallBackupHost,
        FaultKind::StallManager,
        FaultKind::StallVm,
        FaultKind::IsolateHost,
        FaultKind::CutPrimaryFromManager,
        FaultKind::CutPrimaryFromBackups,
        FaultKind::OneWayDrop,
        FaultKind::LinkDelay,
        FaultKind::LinkLoss,
        FaultKind::LinkDuplicate,
        FaultKind::LinkReorder,
        FaultKind::DiskFull,
        FaultKind::CrashInCheckpoint,
        FaultKind::CrashInSync,
        FaultKind::Swizzle,
    ];

    /// The name `--faults` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillPrimaryHost => "kill-primary-host",
            FaultKind::KillBackupHost => "kill-backup-host",
            FaultKind::KillManager => "kill-manager",
            FaultKind::KillVm => "kill-vm",
            FaultKind::StallPrimaryHost => "stall-primary-host",
            FaultKind::StallBackupHost => "stall-backup-host",
            FaultKind::StallManager => "stall-manager",
            FaultKind::StallVm => "stall-vm",
            FaultKind::IsolateHost => "isolate-host",
            FaultKind::CutPrimaryFromManager => "cut-primary-from-manager",
            FaultKind::CutPrimaryFromBackups => "cut-primary-from-backups",
            FaultKind::OneWayDrop => "one-way-drop",
            FaultKind::LinkDelay => "link-delay",
            FaultKind::LinkLoss => "link-loss",
            FaultKind::LinkDuplicate => "link-duplicate",
            FaultKind::LinkReorder => "link-reorder",
            FaultKind::DiskFull => "disk-full",
            FaultKind::CrashInCheckpoint => "crash-in-checkpoint",
            FaultKind::CrashInSync => "crash-in-sync",
            FaultKind::Swizzle => "swizzle",
        }
    }

    /// The kind of a name.
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the fault takes a process or host down for good (its heal is a restart), as
    /// opposed to one that only delays or cuts.
    pub fn is_crash(self) -> bool {
        matches!(
            self,
            FaultKind::KillPrimaryHost
                | FaultKind::KillBackupHost
                | FaultKind::KillManager
                | FaultKind::KillVm
                | FaultKind::CrashInCheckpoint
                | FaultKind::CrashInSync
        )
    }

    /// Whether it is a network partition of some shape.
    pub fn is_partition(self) -> bool {
        GROUPS
            .iter()
            .any(|(name, kinds)| *name == "partition" && kinds.contains(&self))
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of groups of kinds that `--faults` also takes.
pub const GROUPS: &[(&str, &[FaultKind])] = &[
    ("all", &FaultKind::ALL),
    (
        "kill",
        &[
            FaultKind::KillPrimaryHost,
            FaultKind::KillBackupHost,
            FaultKind::KillManager,
            FaultKind::KillVm,
        ],
    ),
    (
        "stall",
        &[
            FaultKind::StallPrimaryHost,
            FaultKind::StallBackupHost,
            FaultKind::StallManager,
            FaultKind::StallVm,
        ],
    ),
    (
        "partition",
        &[
            FaultKind::IsolateHost,
            FaultKind::CutPrimaryFromManager,
            FaultKind::CutPrimaryFromBackups,
            FaultKind::OneWayDrop,
        ],
    ),
    (
        "link",
        &[
            FaultKind::LinkDelay,
            FaultKind::LinkLoss,
            FaultKind::LinkDuplicate,
            FaultKind::LinkReorder,
        ],
    ),
    (
        "crash",
        &[FaultKind::CrashInCheckpoint, FaultKind::CrashInSync],
    ),
];

/// A `--faults` list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultListError {
    /// Not a kind nor a group.
    #[error("unknown fault {0:?} (kinds: {kinds}; groups: {groups})", kinds = kind_names(), groups = group_names())]
    Unknown(String),
    /// An empty item (`a,,b`).
    #[error("empty item in the fault list")]
    Empty,
}

fn kind_names() -> String {
    FaultKind::ALL.map(FaultKind::name).join(", ")
}

fn group_names() -> String {
    GROUPS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kinds a run may inject.
///
/// Parsed from a comma-separated list of kinds and groups, read left to right; an item with a
/// leading `-` removes: `all,-disk-full`, `kill,partition,-kill-manager`. Displayed in the
/// canonical form (`all`, or the kinds in [`FaultKind::ALL`] order), which parses back to the
/// same set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FaultSet(BTreeSet<FaultKind>);

impl FaultSet {
    /// Every kind.
    pub fn all() -> FaultSet {
        FaultSet(FaultKind::ALL.into_iter().collect())
    }

    /// No kind.
    pub fn none() -> FaultSet {
        FaultSet::default()
    }

    /// Parses a `--faults` list (see the type's doc).
    pub fn parse(list: &str) -> Result<FaultSet, FaultListError> {
        let mut set = BTreeSet::new();
        for item in list.split(',').map(str::trim) {
            let (remove, name) = match item.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            if name.is_empty() {
                return Err(FaultListError::Empty);
            }
            let kinds: Vec<FaultKind> = match GROUPS.iter().find(|(g, _)| *g == name) {
                Some((_, kinds)) => kinds.to_vec(),
                None => vec![FaultKind::from_name(name)
                    .ok_or_else(|| FaultListError::Unknown(name.to_string()))?],
            };
            for k in kinds {
                if remove {
                    set.remove(&k);
                } else {
                    set.insert(k);
                }
            }
        }
        Ok(FaultSet(set))
    }

    /// Whether `kind` is on.
    pub fn contains(&self, kind: FaultKind) -> bool {
        self.0.contains(&kind)
    }

    /// The kinds that are on, in canonical order.
    pub fn kinds(&self) -> Vec<FaultKind> {
        self.0.iter().copied().collect()
    }

    /// Whether no kind is on.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<FaultKind> for FaultSet {
    fn from_iter<I: IntoIterator<Item = FaultKind>>(iter: I) -> Self {
        FaultSet(iter.into_iter().collect())
    }
}

impl std::str::FromStr for FaultSet {
    type Err = FaultListError;

    fn from_str(s: &str) -> Result<FaultSet, FaultListError> {
        FaultSet::parse(s)
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() == FaultKind::ALL.len() {
            return f.write_str("all");
        }
        let names: Vec<&str> = self.0.iter().map(|k| k.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// Who a fault hits, resolved by the runner when it injects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// The VM's primary, as the manager reports it at injection time.
    Primary,
    /// The VM's backup number `index` modulo how many it has then (in the manager's order).
    Backup {
        /// Which backup.
        index: u8,
    },
    /// The manager (its process, or its namespace for network faults).
    Manager,
    /// A host holding no instance of the VM, `index` modulo how many there are (if none, the
    /// runner skips the fault and logs why).
    Spare {
        /// Which spare.
        index: u8,
    },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Primary => f.write_str("primary"),
            Role::Backup { index } => write!(f, "backup {index}"),
            Role::Manager => f.write_str("manager"),
            Role::Spare { index } => write!(f, "spare {index}"),
        }
    }
}

/// A link between two roles (both directions), for swizzle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRef {
    /// One end.
    pub a: Role,
    /// The other end.
    pub b: Role,
}

/// One fault with its parameters. The kind is [`Fault::kind`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    /// See [`FaultKind::KillPrimaryHost`]. Healed by restarting the host's agent.
    KillPrimaryHost,
    /// See [`FaultKind::KillBackupHost`]. Healed by restarting the host's agent.
    KillBackupHost {
        /// Which backup's host.
        backup: u8,
    },
    /// See [`FaultKind::KillManager`]. Healed by restarting the manager.
    KillManager,
    /// See [`FaultKind::KillVm`]. The agent notices; the heal does nothing.
    KillVm {
        /// Whose VM process: [`Role::Primary`] or a [`Role::Backup`].
        role: Role,
    },
    /// See [`FaultKind::StallPrimaryHost`]: SIGSTOP at start, SIGCONT at the end.
    StallPrimaryHost,
    /// See [`FaultKind::StallBackupHost`].
    StallBackupHost {
        /// Which backup's host.
        backup: u8,
    },
    /// See [`FaultKind::StallManager`].
    StallManager,
    /// See [`FaultKind::StallVm`].
    StallVm {
        /// Whose VM process.
        role: Role,
    },
    /// See [`FaultKind::IsolateHost`].
    IsolateHost {
        /// The host cut off (by its role).
        role: Role,
    },
    /// See [`FaultKind::CutPrimaryFromManager`].
    CutPrimaryFromManager,
    /// See [`FaultKind::CutPrimaryFromBackups`].
    CutPrimaryFromBackups,
    /// See [`FaultKind::OneWayDrop`]: packets `from` → `to` dropped.
    OneWayDrop {
        /// Sender whose packets are dropped.
        from: Role,
        /// Their destination.
        to: Role,
    },
    /// See [`FaultKind::LinkDelay`]: each packet delayed by `delay_ns` ± up to `jitter_ns`.
    LinkDelay {
        /// Which backup's replication link (to the primary).
        backup: u8,
        /// Mean delay.
        delay_ns: u64,
        /// Up to this much more or less.
        jitter_ns: u64,
    },
    /// See [`FaultKind::LinkLoss`].
    LinkLoss {
        /// Which backup's replication link.
        backup: u8,
        /// Each packet dropped with probability `permille / 1000`.
        permille: u16,
    },
    /// See [`FaultKind::LinkDuplicate`].
    LinkDuplicate {
        /// Which backup's replication link.
        backup: u8,
        /// Each packet sent twice with probability `permille / 1000`.
        permille: u16,
    },
    /// See [`FaultKind::LinkReorder`].
    LinkReorder {
        /// Which backup's replication link.
        backup: u8,
        /// Each packet held back with probability `permille / 1000`...
        permille: u16,
        /// ... by this long, so later ones overtake it.
        delay_ns: u64,
    },
    /// See [`FaultKind::DiskFull`]: the backup's image filesystem fills up; freed at the end.
    DiskFull {
        /// Which backup.
        backup: u8,
    },
    /// See [`FaultKind::CrashInCheckpoint`]: `kill -9` of the victim's host while a
    /// checkpoint is partly transferred (the runner watches the replication proxy for it);
    /// healed by restarting the host's agent.
    CrashInCheckpoint {
        /// [`Role::Primary`] (sending) or a [`Role::Backup`] (receiving).
        victim: Role,
    },
    /// See [`FaultKind::CrashInSync`]: the runner makes backup `syncing` resync from scratch
    /// (restarts its backup process with an empty image) and kills `victim`'s host while
    /// the sync runs.
    CrashInSync {
        /// The backup that syncs.
        syncing: u8,
        /// [`Role::Primary`] or that backup.
        victim: Role,
    },
    /// See [`FaultKind::Swizzle`]: from the start, every `step_ns` one more link of `links` is
    /// stalled (its packets dropped, both ways); from the middle of the fault, every `step_ns`
    /// one link is healed, in `heal_order` (indices into `links`).
    Swizzle {
        /// The links, in stall order.
        links: Vec<LinkRef>,
        /// Time between two steps.
        step_ns: u64,
        /// The order of the heals.
        heal_order: Vec<u32>,
    },
}

impl Fault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::KillPrimaryHost => FaultKind::KillPrimaryHost,
            Fault::KillBackupHost { .. } => FaultKind::KillBackupHost,
            Fault::KillManager => FaultKind::KillManager,
            Fault::KillVm { .. } => FaultKind::KillVm,
            Fault::StallPrimaryHost => FaultKind::StallPrimaryHost,
            Fault::StallBackupHost { .. } => FaultKind::StallBackupHost,
            Fault::StallManager => FaultKind::StallManager,
            Fault::StallVm { .. } => FaultKind::StallVm,
            Fault::IsolateHost { .. } => FaultKind::IsolateHost,
            Fault::CutPrimaryFromManager => FaultKind::CutPrimaryFromManager,
            Fault::CutPrimaryFromBackups => FaultKind::CutPrimaryFromBackups,
            Fault::OneWayDrop { .. } => FaultKind::OneWayDrop,
            Fault::LinkDelay { .. } => FaultKind::LinkDelay,
            Fault::LinkLoss { .. } => FaultKind::LinkLoss,
            Fault::LinkDuplicate { .. } => FaultKind::LinkDuplicate,
            Fault::LinkReorder { .. } => FaultKind::LinkReorder,
            Fault::DiskFull { .. } => FaultKind::DiskFull,
            Fault::CrashInCheckpoint { .. } => FaultKind::CrashInCheckpoint,
            Fault::CrashInSync { .. } => FaultKind::CrashInSync,
            Fault::Swizzle { .. } => FaultKind::Swizzle,
        }
    }

    /// A one-line description for a person (the report's labels).
    pub fn describe(&self) -> String {
        let ms = |ns: &u64| ns / 1_000_000;
        match self {
            Fault::KillBackupHost { backup } | Fault::StallBackupHost { backup } => {
                format!("{} (backup {backup})", self.kind())
            }
            Fault::KillVm { role } | Fault::StallVm { role } | Fault::IsolateHost { role } => {
                format!("{} ({role})", self.kind())
            }
            Fault::OneWayDrop { from, to } => format!("{} ({from} -> {to})", self.kind()),
            Fault::LinkDelay {
                backup,
                delay_ns,
                jitter_ns,
            } => format!(
                "{} (backup {backup}: {} ms ± {} ms)",
                self.kind(),
                ms(delay_ns),
                ms(jitter_ns)
            ),
            Fault::LinkLoss { backup, permille } | Fault::LinkDuplicate { backup, permille } => {
                format!("{} (backup {backup}: {permille}‰)", self.kind())
            }
            Fault::LinkReorder {
                backup,
                permille,
                delay_ns,
            } => format!(
                "{} (backup {backup}: {permille}‰ held {} ms)",
                self.kind(),
                ms(delay_ns)
            ),
            Fault::DiskFull { backup } => format!("{} (backup {backup})", self.kind()),
            Fault::CrashInCheckpoint { victim } => format!("{} ({victim})", self.kind()),
            Fault::CrashInSync { syncing, victim } => {
                format!(
                    "{} (backup {syncing} syncing, {victim} crashes)",
                    self.kind()
                )
            }
            Fault::Swizzle { links, .. } => format!("{} ({} links)", self.kind(), links.len()),
            _ => self.kind().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::from_name(k.name()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
        }
        let mut sorted = FaultKind::ALL;
        sorted.sort();
        assert_eq!(
            sorted,
            FaultKind::ALL,
            "ALL is in the enum's (canonical) order"
        );
    }

    #[test]
    fn lists_parse_with_groups_and_removals() {
        let s = FaultSet::parse("kill-primary-host,partition").unwrap();
        assert_eq!(
            s.kinds(),
            vec![
                FaultKind::KillPrimaryHost,
                FaultKind::IsolateHost,
                FaultKind::CutPrimaryFromManager,
                FaultKind::CutPrimaryFromBackups,
                FaultKind::OneWayDrop,
            ]
        );
        assert_eq!(
            s.to_string(),
            "kill-primary-host,isolate-host,cut-primary-from-manager,cut-primary-from-backups,one-way-drop"
        );
        assert_eq!(FaultSet::parse(&s.to_string()).unwrap(), s);
        let all = FaultSet::parse("all").unwrap();
        assert_eq!(all, FaultSet::all());
        assert_eq!(all.to_string(), "all");
        let some = FaultSet::parse("all, -disk-full,-stall").unwrap();
        assert_eq!(some.kinds().len(), FaultKind::ALL.len() - 5);
        assert!(!some.contains(FaultKind::DiskFull));
        assert_eq!(FaultSet::parse(&some.to_string()).unwrap(), some);
        assert!(matches!(
            FaultSet::parse("kill,nope"),
            Err(FaultListError::Unknown(n)) if n == "nope"
        ));
        assert_eq!(FaultSet::parse("kill,,link"), Err(FaultListError::Empty));
        assert!(FaultSet::parse("kill")
            .unwrap()
            .kinds()
            .iter()
            .all(|k| k.is_crash()));
        assert!(FaultKind::OneWayDrop.is_partition());
        assert!(!FaultKind::LinkLoss.is_partition());
    }

    #[test]
    fn faults_serialize_with_their_kind_tag() {
        let f = Fault::OneWayDrop {
            from: Role::Primary,
            to: Role::Backup { index: 1 },
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"fault":"one-way-drop","from":{"role":"primary"},"to":{"role":"backup","index":1}}"#
        );
        assert_eq!(serde_json::from_str::<Fault>(&json).unwrap(), f);
        assert_eq!(f.describe(), "one-way-drop (primary -> backup 1)");
    }
}
