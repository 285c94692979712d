//! The agent's per-VM resource limits (issue 12, "Virtual Services"): every VM process it runs
//! — primary, backup, clone — goes into a control group of its own (`crate::cgroup`) as soon as
//! it is started or adopted, gets its VM's limits from the manager's assignment (changed live
//! when they change), and its usage is sampled every round for the heartbeat. Groups of
//! processes that are gone are removed; so are empty ones an earlier agent left.
//!
//! Where the host has no usable hierarchy (or `--cgroups off`), VM processes run as before and
//! the reason is logged once; a VM with limits then reports the reason as its usage's error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use failover::limits::{Limits, ProcUsage, UsageOf};

use crate::cgroup::{block_device, Cgroups, Group, RtBudget};

/// One VM process to confine.
pub struct Target {
    /// Its group's name (`web.primary`, `web.backup`, `web-c0.clone`).
    pub name: String,
    /// Its VM.
    pub vm: String,
    /// Which process of the VM.
    pub of: UsageOf,
    /// Its pid.
    pub pid: u32,
    /// It may boost its pauses to real time (a primary).
    pub realtime: bool,
    /// A file or directory on the file system of its disk (for disk limits).
    pub disk_at: PathBuf,
}

/// A process in its group.
struct Member {
    /// None: the process could not be moved into its group (`error` says why).
    group: Option<Group>,
    /// A primary (its group shares the real-time budget).
    realtime: bool,
    /// It is in its group's `cpu` directory (a primary on a host grouping real-time tasks is
    /// only while its VM has a CPU limit: `Cgroups::rt_grouped`).
    in_cpu: bool,
    pid: u32,
    /// The block device of its files (disk limits), found once: it does not change.
    disk: Option<(u32, u32)>,
    error: String,
}

impl Member {
    /// Writes `want` to its group (if it has one), keeping the error and saying it when it
    /// changes; answers whether the process belongs in its group's `cpu` directory.
    fn apply(&mut self, name: &str, want: &Limits, rt_grouped: bool) -> bool {
        let cpu = !(self.realtime && rt_grouped) || want.cpu_millis != 0 || want.cpu_weight != 0;
        let Some(g) = self.group.as_mut() else {
            return self.in_cpu;
        };
        let was = std::mem::take(&mut self.error);
        self.error = match g.set(want, self.disk) {
            Ok(()) => String::new(),
            Err(e) => format!("limits: {e}"),
        };
        if self.error.is_empty() && cpu && !self.in_cpu {
            self.error = "its CPU limit waits for its move into its cpu group".into();
        }
        if !self.error.is_empty() && self.error != was {
            tracing::warn!("{name}: {}", self.error);
        }
        cpu
    }
}

/// The agent's groups.
pub struct Limiter {
    cg: Result<Cgroups, String>,
    members: BTreeMap<String, Member>,
    /// Groups whose process is gone but which could not be removed yet (a process still exits).
    leaving: BTreeSet<String>,
    /// A primary joined: the real-time budget is to be shared again.
    rt_dirty: bool,
}

impl Limiter {
    /// No groups (yet).
    pub fn off() -> Limiter {
        Limiter {
            cg: Err("cgroups not set up yet".into()),
            members: BTreeMap::new(),
            leaving: BTreeSet::new(),
            rt_dirty: false,
        }
    }

    /// Finds the hierarchy (mounting it under `private` where this mount namespace has none)
    /// and makes this agent's base group `name` (`enabled` false: none), removing what an
    /// earlier agent left empty.
    pub fn new(name: &str, enabled: bool, rt: RtBudget, private: &Path) -> Limiter {
        let cg = if enabled {
            Cgroups::detect(name, rt, private).map_err(|e| e.to_string())
        } else {
            Err("cgroups are off (--cgroups off)".into())
        };
        match &cg {
            Ok(c) => tracing::info!(
                "VM processes get cgroup {} groups under {:?}",
                c.kind(),
                c.base()
            ),
            Err(e) => tracing::warn!("VM processes run without resource limits: {e}"),
        }
        let mut l = Limiter {
            cg,
            members: BTreeMap::new(),
            leaving: BTreeSet::new(),
            rt_dirty: false,
        };
        if let Ok(c) = &l.cg {
            // Groups of processes an earlier agent ran and that still run stay (they are
            // adopted: busy groups refuse removal); empty ones go.
            l.leaving.extend(c.children());
        }
        l
    }

    /// Puts each target in its group (again, if an earlier try failed), applies its VM's
    /// limits (`limits`; a VM absent has none; `None`: not known yet — the first rounds of an
    /// agent before the manager's assignment — so whatever groups hold stays), removes groups
    /// of processes gone, and answers each target's usage.
    pub fn round(
        &mut self,
        limits: Option<&BTreeMap<String, Limits>>,
        targets: &[Target],
    ) -> Vec<ProcUsage> {
        let Ok(cg) = &self.cg else {
            let why = self.cg.as_ref().err().cloned().unwrap_or_default();
            return unlimited(&why, limits, targets);
        };
        let mut out = Vec::with_capacity(targets.len());
        let mut moves = Vec::new();
        for t in targets {
            self.leaving.remove(&t.name);
            let fresh = !self.members.contains_key(&t.name);
            let m = self
                .members
                .entry(t.name.clone())
                .or_insert_with(|| join(cg, t));
            if m.pid != t.pid || m.group.is_none() || fresh {
                if !fresh {
                    *m = join(cg, t);
                }
                self.rt_dirty |= t.realtime;
            }
            if let (Some(l), true) = (limits, m.group.is_some()) {
                let want = for_role(&t.of, l.get(&t.vm).copied().unwrap_or_default());
                let cpu = m.apply(&t.name, &want, cg.rt_grouped());
                if cpu != m.in_cpu {
                    // (Moved after this loop: into its cpu group only once the group has its
                    // real-time share, or a boosted pause would find none.)
                    moves.push((t.name.clone(), t.pid, cpu));
                }
            }
            let u = m.group.as_mut().map(Group::usage).unwrap_or_default();
            out.push(ProcUsage {
                vm: t.vm.clone(),
                of: t.of.clone(),
                cpu_millis: u.cpu_millis,
                throttled_us: u.throttled_us,
                mem_bytes: u.mem_bytes,
                mem_limit_bytes: u.mem_limit_bytes,
                oom_kills: u.oom_kills,
                error: m.error.clone(),
            });
        }
        let names: BTreeSet<&String> = targets.iter().map(|t| &t.name).collect();
        let gone: Vec<String> = self
            .members
            .keys()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        let changed = !gone.is_empty();
        for n in gone {
            self.members.remove(&n);
            self.leaving.insert(n);
        }
        let before = self.leaving.len();
        self.leaving.retain(|n| cg.remove(n).is_err());
        if changed || self.rt_dirty || self.leaving.len() != before {
            self.share_rt();
        }
        for (name, pid, into) in moves {
            self.move_cpu(&name, pid, into);
        }
        out
    }

    /// Moves a primary into its cpu group (after the group got its real-time share) or out
    /// of it (then its share goes back to the others).
    fn move_cpu(&mut self, name: &str, pid: u32, into: bool) {
        if into {
            if let Some(m) = self.members.get_mut(name) {
                m.in_cpu = true;
            }
            self.share_rt();
        }
        let Some(m) = self.members.get_mut(name) else {
            return;
        };
        let Some(g) = m.group.as_ref() else {
            return;
        };
        match g.move_cpu(pid, into) {
            Ok(()) => {
                m.in_cpu = into;
                if m.error.starts_with("its CPU limit waits") {
                    m.error.clear();
                }
            }
            Err(e) => {
                m.in_cpu = !into;
                tracing::warn!("{name}: cpu group: {e}");
            }
        }
        self.share_rt();
    }
}

/// The limits a process of this kind gets: a backup only applies checkpoints, so a CPU cap
/// meant for the guest would only delay its acknowledgements (and the primary's output): it
/// keeps its weight and memory limit, not the cap.
fn for_role(of: &UsageOf, l: Limits) -> Limits {
    match of {
        UsageOf::Vm(failover::model::ProcRole::Backup) => Limits { cpu_millis: 0, ..l },
        _ => l,
    }
}

impl Limiter {
    /// Puts a process just started into its group with its VM's last known limits at once (the
    /// next round would, but a process can do much in a round: a promoted primary loads its
    /// whole image).
    pub fn place_now(&mut self, limits: Option<&BTreeMap<String, Limits>>, t: Target) {
        let Ok(cg) = &self.cg else {
            return;
        };
        let mut m = join(cg, &t);
        let mut into_cpu = false;
        if let (Some(l), true) = (limits, m.group.is_some()) {
            let want = for_role(&t.of, l.get(&t.vm).copied().unwrap_or_default());
            into_cpu = m.apply(&t.name, &want, cg.rt_grouped()) && !m.in_cpu;
        }
        self.leaving.remove(&t.name);
        let (name, pid) = (t.name.clone(), t.pid);
        self.members.insert(t.name, m);
        match into_cpu {
            true => self.move_cpu(&name, pid, true),
            false => self.share_rt(),
        }
    }

    /// The primaries' groups share the real-time budget (again, after one came or went).
    fn share_rt(&mut self) {
        let Ok(cg) = &self.cg else {
            return;
        };
        let groups: Vec<&Group> = self
            .members
            .values()
            .filter(|m| m.realtime && m.in_cpu)
            .filter_map(|m| m.group.as_ref())
            .collect();
        // (Kept dirty while a write is refused: tried again next round.)
        self.rt_dirty = !cg.share_rt(&groups);
    }
}

/// A new member: its group made and the process moved in.
fn join(cg: &Cgroups, t: &Target) -> Member {
    let mut in_cpu = !(t.realtime && cg.rt_grouped());
    let made = cg.group(&t.name).and_then(|g| {
        // An adopted primary still in its cpu group (capped under an earlier agent) stays
        // there until its limits are known: a round that knows them moves it out if they say
        // so (moving it out here lifted its CPU limit while the agent restarted).
        in_cpu |= g.holds(t.pid);
        g.add_but_cpu(t.pid, in_cpu)?;
        Ok(g)
    });
    match made {
        Ok(group) => {
            tracing::info!("{} (pid {}) runs in its cgroup", t.name, t.pid);
            Member {
                group: Some(group),
                realtime: t.realtime,
                in_cpu,
                pid: t.pid,
                disk: block_device(&t.disk_at),
                error: String::new(),
            }
        }
        Err(e) => {
            tracing::warn!("{} (pid {}): no cgroup: {e}", t.name, t.pid);
            Member {
                group: None,
                realtime: t.realtime,
                in_cpu,
                pid: t.pid,
                disk: block_device(&t.disk_at),
                error: format!("joining its cgroup: {e}"),
            }
        }
    }
}

/// Without cgroups: usage rows only for VMs that asked for limits, saying why none apply.
fn unlimited(
    why: &str,
    limits: Option<&BTreeMap<String, Limits>>,
    targets: &[Target],
) -> Vec<ProcUsage> {
    targets
        .iter()
        .filter(|t| limits.is_some_and(|l| l.contains_key(&t.vm)))
        .map(|t| ProcUsage {
            vm: t.vm.clone(),
            of: t.of.clone(),
            cpu_millis: 0,
            throttled_us: 0,
            mem_bytes: 0,
            mem_limit_bytes: 0,
            oom_kills: 0,
            error: format!("not applied: {why}"),
        })
        .collect()
}
