//! The agent's decisions: from the manager's [`Assignments`] for this host and what the host
//! runs now, the actions that make the two match. Pure logic; `vmatrix agent` carries the
//! actions out (spawning `vmatrix primary` / `vmatrix backup` processes, one per VM instance,
//! and talking to them over their control sockets).
//!
//! The rules:
//! - a primary is started from scratch only for [`Source::Boot`]; for [`Source::Promote`] the
//!   backup on this host is told to promote (it persists the new term and finalizes its image)
//!   and a primary then starts from that image, once per term (a dead primary of the term,
//!   reported, is never started again); for [`Source::Running`] nothing is ever started
//!   (a missing primary is a failure the manager must see, never a silent reboot);
//! - a backup that exited is started again on its image (its committed image survives, and a
//!   quick resync brings it up to date);
//! - a primary of an older term than assigned, or of a VM not assigned, is fenced (stopped);
//! - a backup is told the assigned minimum term whenever it reports an older one.

use std::collections::BTreeMap;

use crate::model::{
    Assignment, Assignments, BackupTarget, ProcRole, Role, Source, VmObservation, VmSpec,
};

/// One thing the agent must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start `vmatrix primary` booting the guest afresh.
    BootPrimary {
        /// The VM.
        spec: VmSpec,
        /// Its term.
        term: u64,
        /// Its backups.
        backups: Vec<BackupTarget>,
    },
    /// Tell the backup to promote at `term`, then start a primary from its image.
    Promote {
        /// The VM.
        spec: VmSpec,
        /// New term.
        term: u64,
        /// The new primary's backups.
        backups: Vec<BackupTarget>,
    },
    /// Start (or restart) `vmatrix backup`.
    StartBackup {
        /// The VM.
        spec: VmSpec,
        /// Lowest term it accepts.
        min_term: u64,
    },
    /// Give the running primary a new backup set.
    SetBackups {
        /// VM name.
        vm: String,
        /// The set.
        backups: Vec<BackupTarget>,
    },
    /// Tell the backup its new minimum term.
    FenceBackup {
        /// VM name.
        vm: String,
        /// Lowest term from now on.
        term: u64,
    },
    /// Ask the primary to hand over (a planned migration).
    Handover {
        /// VM name.
        vm: String,
        /// Its term.
        term: u64,
    },
    /// Stop this process of the VM (fenced by `term`, or not assigned here).
    Stop {
        /// VM name.
        vm: String,
        /// Which process.
        role: ProcRole,
        /// Why.
        why: String,
    },
}

/// What the agent knows of one VM process besides its observation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// The backup set last applied to the primary.
    pub backups: Option<Vec<BackupTarget>>,
    /// A promotion at this term is under way (the backup was told; the primary not started).
    pub promoting: Option<u64>,
    /// The primary of this term was asked to hand over.
    pub handover: Option<u64>,
}

/// The actions that bring `running` (this host's VM processes) to `want`.
pub fn reconcile(
    want: &Assignments,
    running: &[VmObservation],
    applied: &BTreeMap<String, Applied>,
) -> Vec<Action> {
    let mut out = Vec::new();
    for (name, a) in &want.vms {
        let ap = applied.get(name).cloned().unwrap_or_default();
        match &a.role {
            Role::Primary { .. } => primary_actions(name, a, running, &ap, &mut out),
            Role::Backup { min_term } => backup_actions(name, a, *min_term, running, &mut out),
        }
    }
    for o in running
        .iter()
        .filter(|o| o.alive && !want.vms.contains_key(&o.vm))
    {
        out.push(Action::Stop {
            vm: o.vm.clone(),
            role: o.role,
            why: "not assigned to this host".into(),
        });
    }
    out
}

/// The VM's process of `role` on this host: any (`alive` false) or only a running one.
fn find<'a>(
    running: &'a [VmObservation],
    vm: &str,
    role: ProcRole,
    alive: bool,
) -> Option<&'a VmObservation> {
    running
        .iter()
        .find(|o| o.vm == vm && o.role == role && (o.alive || !alive))
}

/// What to do for a VM assigned here as primary.
fn primary_actions(
    name: &str,
    a: &Assignment,
    running: &[VmObservation],
    ap: &Applied,
    out: &mut Vec<Action>,
) {
    let Role::Primary {
        term,
        source,
        backups,
        handover,
    } = &a.role
    else {
        return;
    };
    let primary = find(running, name, ProcRole::Primary, true);
    if let Some(p) = primary.filter(|p| p.term < *term) {
        out.push(Action::Stop {
            vm: name.to_string(),
            role: ProcRole::Primary,
            why: format!("fenced by term {term} (this primary has term {})", p.term),
        });
        return;
    }
    match (primary, source) {
        (Some(_), _) if *handover && ap.handover != Some(*term) => {
            out.push(Action::Handover {
                vm: name.to_string(),
                term: *term,
            });
        }
        (Some(_), _) if *handover => {}
        (Some(_), _) => {
            if ap.backups.as_ref() != Some(backups) {
                out.push(Action::SetBackups {
                    vm: name.to_string(),
                    backups: backups.clone(),
                });
            }
            if find(running, name, ProcRole::Backup, true).is_some() {
                out.push(Action::Stop {
                    vm: name.to_string(),
                    role: ProcRole::Backup,
                    why: "this host runs the primary".to_string(),
                });
            }
        }
        (None, Source::Boot) if find(running, name, ProcRole::Primary, false).is_none() => {
            out.push(Action::BootPrimary {
                spec: a.spec.clone(),
                term: *term,
                backups: backups.clone(),
            });
        }
        // (A primary of this term that died here — before its guest ran, after a restart of
        // this host, say — is never started again: the manager promotes at a new term.)
        (None, Source::Promote)
            if ap.promoting != Some(*term)
                && find(running, name, ProcRole::Primary, false).is_none_or(|p| p.term < *term) =>
        {
            out.push(Action::Promote {
                spec: a.spec.clone(),
                term: *term,
                backups: backups.clone(),
            });
        }
        _ => {}
    }
}

/// What to do for a VM assigned here as a backup of at least `min_term`.
fn backup_actions(
    name: &str,
    a: &Assignment,
    min_term: u64,
    running: &[VmObservation],
    out: &mut Vec<Action>,
) {
    if find(running, name, ProcRole::Primary, true).is_some() {
        out.push(Action::Stop {
            vm: name.to_string(),
            role: ProcRole::Primary,
            why: format!("this host holds a backup of term {min_term} now"),
        });
    }
    match find(running, name, ProcRole::Backup, true) {
        None => out.push(Action::StartBackup {
            spec: a.spec.clone(),
            min_term,
        }),
        Some(b) if b.term < min_term => out.push(Action::FenceBackup {
            vm: name.to_string(),
            term: min_term,
        }),
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promote_at(term: u64) -> Assignments {
        let spec = VmSpec {
            name: "web".into(),
            mem_mib: 64,
            disk_mib: 16,
            guest_config: String::new(),
            backups: 1,
            hosts: vec![],
            port: 7100,
        };
        let role = Role::Primary {
            term,
            source: Source::Promote,
            backups: vec![],
            handover: false,
        };
        let mut a = Assignments::default();
        a.vms.insert("web".into(), Assignment { spec, role });
        a
    }

    fn dead_primary(term: u64) -> VmObservation {
        VmObservation::unstarted_primary("web", term)
    }

    /// A promotion is carried out once per term: not again after this host restarted (the
    /// agent forgot it had begun; the dead primary of that term is reported instead), but at
    /// the next term the manager grants.
    #[test]
    fn a_promotion_is_never_started_twice_at_one_term() {
        let none = BTreeMap::new();
        let first = reconcile(&promote_at(2), &[], &none);
        assert!(matches!(first[..], [Action::Promote { term: 2, .. }]));
        assert!(reconcile(&promote_at(2), &[dead_primary(2)], &none).is_empty());
        let again = reconcile(&promote_at(3), &[dead_primary(2)], &none);
        assert!(matches!(again[..], [Action::Promote { term: 3, .. }]));
    }
}
