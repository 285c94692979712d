//! Control groups for VM processes: one group per process (primary, backup, clone) with the
//! VM's limits (`failover::limits::Limits`) — CPU bandwidth and weight, memory, disk bytes per
//! second — and its usage (one group's handling: `cgroup_group.rs`).
//!
//! Both hierarchies are handled, because hosts have both: **cgroup v2** (`cpu.max`,
//! `cpu.weight`, `memory.max`, `io.max`) where the unified hierarchy offers the `cpu` and
//! `memory` controllers, else **cgroup v1** (`cpu.cfs_quota_us`, `cpu.shares`,
//! `memory.limit_in_bytes`, `blkio.throttle.*`), as on this project's test machines. The
//! groups live under the agent's own group in each hierarchy (`<its group>/vmatrix-<host>/`,
//! or `--cgroup-name`), so an agent confined by its own limits confines its VMs too, and agents
//! of several hosts on one machine (the tests' namespaces) never share a group.
//!
//! Real-time pauses (`vmm::rt`, `--rt-pause`) need a real-time budget where the kernel groups
//! real-time tasks (v1 `cpu.rt_runtime_us`, `CONFIG_RT_GROUP_SCHED`): a group without one may
//! not use `SCHED_FIFO` at all. The agent's base group takes `rt_total_us` of each second (less
//! if its parent cannot give that much) and shares it equally among the primaries' groups (up
//! to `rt_vm_us` each), so boosted pauses keep working inside a CPU limit; CFS bandwidth limits
//! do not throttle real-time threads.
//!
//! Caveat of v1: its `blkio` throttles only I/O the kernel can attribute to the process (direct
//! and synchronous I/O, reads); buffered writes flushed later by the kernel's writeback threads
//! are not throttled (v2's `io.max` attributes them). `status`/`vm show` say which hierarchy
//! applies.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Why a group could not be made, set or read.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable v2 hierarchy nor v1 `cpu` and `memory` hierarchies are mounted.
    #[error("no cgroup hierarchy with cpu and memory controllers is mounted")]
    NoHierarchy,
    /// A file of a group could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The limits cannot be expressed here.
    #[error("{0}")]
    Unsupported(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which hierarchy, with the directories of the agent's base group in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one directory.
    V2(PathBuf),
    /// cgroup v1: one directory per controller (`cpuacct` and `blkio` optional; `cpuacct` may
    /// be the `cpu` directory when they are mounted together).
    V1 {
        /// `cpu`.
        cpu: PathBuf,
        /// `cpuacct`.
        cpuacct: Option<PathBuf>,
        /// `memory`.
        memory: PathBuf,
        /// `blkio`.
        blkio: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// "v1" or "v2".
    pub fn name(&self) -> &'static str {
        match self {
            Hierarchy::V2(_) => "v2",
            Hierarchy::V1 { .. } => "v1",
        }
    }

    /// Every directory of it.
    fn dirs(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2(d) => vec![d],
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                blkio,
            } => {
                let mut v = vec![cpu.as_path(), memory.as_path()];
                v.extend(cpuacct.as_deref().filter(|c| *c != cpu.as_path()));
                v.extend(blkio.as_deref());
                v
            }
        }
    }

    /// The same hierarchy one level down (`name` under every directory).
    fn child(&self, name: &str) -> Hierarchy {
        match self {
            Hierarchy::V2(d) => Hierarchy::V2(d.join(name)),
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                blkio,
            } => Hierarchy::V1 {
                cpu: cpu.join(name),
                cpuacct: cpuacct.as_ref().map(|c| c.join(name)),
                memory: memory.join(name),
                blkio: blkio.as_ref().map(|b| b.join(name)),
            },
        }
    }
}

/// The agent's groups: a base group and one group per VM process below it.
#[derive(Debug)]
pub struct Cgroups {
    base: Hierarchy,
    /// Real-time budget the base group got, µs per second (0: none).
    rt_total_us: u64,
    /// The kernel groups real-time tasks here.
    rt_grouped: bool,
    /// Most of it one primary's group gets.
    rt_vm_us: u64,
}

/// Real-time budget settings (v1 with `CONFIG_RT_GROUP_SCHED` only).
#[derive(Debug, Clone, Copy)]
pub struct RtBudget {
    /// Of the agent's base group, µs per second.
    pub total_us: u64,
    /// Of each primary's group.
    pub vm_us: u64,
}

impl Cgroups {
    /// Finds the hierarchy from `/proc/self/mountinfo` and `/proc/self/cgroup` and makes the
    /// base group `name` (`vmatrix-<host>` by default) under the agent's own group. In a mount
    /// namespace without the cgroup file systems (`ip netns exec` mounts a /sys of its own),
    /// the hierarchies the process belongs to are mounted under `private` first (the same
    /// hierarchies as the host's: one group tree, seen from here).
    pub fn detect(name: &str, rt: RtBudget, private: &Path) -> Result<Cgroups, CgroupError> {
        let own = read(Path::new("/proc/self/cgroup"))?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let own_root = match find_hierarchy(&mountinfo, &own, Path::new("/")) {
            Some(h) => h,
            // (Cgroup file systems mounted, only not usable ones: nothing to mount.)
            None if mountinfo.contains(" - cgroup") => return Err(CgroupError::NoHierarchy),
            None => {
                mount_own(&own, private)?;
                let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
                find_hierarchy(&mountinfo, &own, Path::new("/")).ok_or(CgroupError::NoHierarchy)?
            }
        };
        Cgroups::at(&own_root, &sanitize(name), rt)
    }

    /// Makes the base group `name` under `parent` (a hierarchy's directories).
    pub fn at(parent: &Hierarchy, name: &str, rt: RtBudget) -> Result<Cgroups, CgroupError> {
        if name.is_empty() || sanitize(name) != name {
            return Err(CgroupError::Unsupported(format!(
                "group name {name:?}: 1 or more of [A-Za-z0-9_.-], not starting with '.'"
            )));
        }
        if let Hierarchy::V2(p) = parent {
            enable_v2_controllers(p)?;
        }
        let base = parent.child(name);
        for d in base.dirs() {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let (mut rt_total_us, mut rt_vm_us) = (0, 0);
        // (Groups of real-time tasks exist where the parent has a budget file.)
        let grouped_rt =
            matches!(parent, Hierarchy::V1 { cpu, .. } if cpu.join("cpu.rt_runtime_us").exists());
        if let Hierarchy::V1 { cpu, .. } = &base {
            if grouped_rt && rt.total_us > 0 {
                let got = grant_rt(cpu, rt.total_us);
                if got == 0 {
                    tracing::warn!(
                        "no real-time budget for {}: boosted pauses fall back to ordinary ones",
                        cpu.display()
                    );
                }
                (rt_total_us, rt_vm_us) = (got, rt.vm_us.min(got));
            }
        } else if let Hierarchy::V2(d) = &base {
            enable_v2_controllers(d)?;
        }
        Ok(Cgroups {
            base,
            rt_total_us,
            rt_grouped: grouped_rt,
            rt_vm_us,
        })
    }

    /// Whether the kernel groups real-time tasks here (v1 `cpu.rt_runtime_us`): a primary's
    /// boosted pauses then depend on its group's real-time share, and a group whose boosted
    /// threads used it up stalls until the next second. Primaries therefore join their `cpu`
    /// group only when their VM has a CPU limit (measured: with every primary in a `cpu`
    /// group, clients of a load-balancer test saw 1 s replies in 2 runs of 5, even with the
    /// whole budget shared; not understood yet).
    pub fn rt_grouped(&self) -> bool {
        self.rt_grouped
    }

    /// Which hierarchy.
    pub fn kind(&self) -> &'static str {
        self.base.name()
    }

    /// The base group's directories.
    pub fn base(&self) -> &Hierarchy {
        &self.base
    }

    /// Shares the base group's real-time budget among `groups` (the primaries'), equally, up
    /// to the per-VM most: the kernel admits children only within their parent's budget, so
    /// shares shrink first and grow after. A group whose real-time threads used up their
    /// share in a period stall until the next one (measured: 1 s stalls of a primary
    /// checkpointing hundreds of times a second with a fixed 200 ms share), so each gets as
    /// much as there is. Answers whether every write was taken.
    pub fn share_rt(&self, groups: &[&Group]) -> bool {
        let Hierarchy::V1 { cpu: base, .. } = &self.base else {
            return true;
        };
        if self.rt_total_us == 0 {
            return true;
        }
        let share = match groups.len() {
            0 => 0,
            n => (self.rt_total_us / n as u64).min(self.rt_vm_us),
        };
        let ours: Vec<PathBuf> = groups
            .iter()
            .filter_map(|g| match &g.h {
                Hierarchy::V1 { cpu, .. } => Some(cpu.clone()),
                Hierarchy::V2(_) => None,
            })
            .collect();
        // Every other child of the base gives its budget back (a primary that left its cpu
        // group, a group still being removed).
        let children: Vec<PathBuf> = fs::read_dir(base)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        let mut ok = true;
        for shrink in [true, false] {
            for c in &children {
                let want = if ours.contains(c) { share } else { 0 };
                let f = c.join("cpu.rt_runtime_us");
                let now = number(&f);
                if (shrink && now > want) || (!shrink && now < want) {
                    if let Err(e) = fs::write(&f, want.to_string()) {
                        tracing::warn!("{}: real-time share {want} µs: {e}", f.display());
                        ok = false;
                    }
                }
            }
        }
        ok
    }

    /// Makes (or finds) the group of one process (a primary's gets its real-time share from
    /// [`Cgroups::share_rt`]).
    pub fn group(&self, name: &str) -> Result<Group, CgroupError> {
        let h = self.base.child(&sanitize(name));
        for d in h.dirs() {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let g = Group::new(h);
        // (No `memory.move_charge_at_immigrate`: moving a process's charges walks its whole
        // address space with its memory map locked — a standby clone taking over a clone,
        // with its base mapped, stalled for up to a second, measured. Memory charged before
        // the move stays where it was.)
        Ok(g)
    }

    /// Names of the groups under the base (what an earlier agent may have left).
    pub fn children(&self) -> Vec<String> {
        let dir = match &self.base {
            Hierarchy::V2(d) => d,
            Hierarchy::V1 { cpu, .. } => cpu,
        };
        let Ok(rd) = fs::read_dir(dir) else {
            return vec![];
        };
        rd.flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Removes the base group itself if nothing is left in it.
    pub fn remove_base(&self) -> Result<(), CgroupError> {
        for d in self.base.dirs() {
            fs::remove_dir(d).map_err(io_err(d))?;
        }
        Ok(())
    }

    /// Removes the group `name` if no process is left in it.
    pub fn remove(&self, name: &str) -> Result<(), CgroupError> {
        let h = self.base.child(&sanitize(name));
        for d in h.dirs() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(d)(e)),
            }
        }
        Ok(())
    }
}

/// Mounts, under `at`, each hierarchy `/proc/self/cgroup` (`own`) names with a controller
/// the groups use (v1: one per controller set, `at/cpu,cpuacct`; v2: `at/unified`).
fn mount_own(own: &str, at: &Path) -> Result<(), CgroupError> {
    use rustix::mount::{mount, MountFlags};
    let wanted = ["cpu", "cpuacct", "memory", "blkio"];
    let mut any = false;
    for line in own.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctls), Some(_)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let (dir, fs, opts) = if ctls.is_empty() {
            (at.join("unified"), "cgroup2", String::new())
        } else if ctls.split(',').any(|c| wanted.contains(&c)) {
            (at.join(ctls), "cgroup", ctls.to_string())
        } else {
            continue;
        };
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let data = std::ffi::CString::new(opts)
            .map_err(|e| CgroupError::Unsupported(format!("controller list {ctls:?}: {e}")))?;
        match mount(fs, &dir, fs, MountFlags::empty(), data.as_c_str()) {
            Ok(()) => any = true,
            Err(e) => tracing::warn!("mounting cgroup {ctls:?} at {}: {e}", dir.display()),
        }
    }
    if any {
        Ok(())
    } else {
        Err(CgroupError::NoHierarchy)
    }
}

/// The least real-time budget worth granting, µs per second: a primary whose boosted pause
/// path used up a smaller share would stall for the rest of the second (measured: ~1 s client
/// replies with a 37.5 ms budget); below it primaries get none and pause at ordinary priority.
pub const RT_FLOOR_US: u64 = 100_000;

/// Gives a v1 `cpu` group `want` µs of real time per second, or what its parent has left if
/// less (its own budget minus its other children's); none below [`RT_FLOOR_US`]. Answers what
/// it got.
fn grant_rt(cpu: &Path, want: u64) -> u64 {
    let f = cpu.join("cpu.rt_runtime_us");
    let left = cpu.parent().map_or(0, |parent| {
        let own = number(&parent.join("cpu.rt_runtime_us"));
        let others: u64 = fs::read_dir(parent)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir() && p != cpu)
                    .map(|p| number(&p.join("cpu.rt_runtime_us")))
                    .sum()
            })
            .unwrap_or(0);
        own.saturating_sub(others)
    });
    let us = want.min(left);
    if us >= RT_FLOOR_US && fs::write(&f, us.to_string()).is_ok() {
        return us;
    }
    let _ = fs::write(&f, "0");
    0
}

/// v2: the `cpu`, `memory` and `io` controllers for the children of `dir` (those it offers).
fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let have = read(&dir.join("cgroup.controllers")).unwrap_or_default();
    let want: Vec<String> = ["cpu", "memory", "io"]
        .iter()
        .filter(|c| have.split_whitespace().any(|h| h == **c))
        .map(|c| format!("+{c}"))
        .collect();
    let f = dir.join("cgroup.subtree_control");
    fs::write(&f, want.join(" ")).map_err(|e| {
        CgroupError::Unsupported(format!(
            "cannot enable {} under {}: {e} (cgroup v2 refuses controllers below a group that \
             holds processes: start the agent in a group of its own, e.g. with systemd-run \
             --scope -p Delegate=yes)",
            want.join(" "),
            dir.display()
        ))
    })
}

#[path = "cgroup_group.rs"]
mod group;
pub use group::Group;
#[cfg(test)]
use group::{Usage, RATE_WINDOW};

fn write(path: &Path, v: &str) -> Result<(), CgroupError> {
    fs::write(path, v).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// A file holding one number ("max" and unreadable files: 0).
fn number(path: &Path) -> u64 {
    read(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `key value` lines: the value of `key` (0 if absent).
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A group name from a host, VM or clone name: `[A-Za-z0-9_.-]`, others become `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// The block device (major, minor) of the file system holding `path` (None for a virtual
/// file system such as tmpfs or overlay: device major 0).
pub fn block_device(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).ok()?.dev();
    // glibc's gnu_dev_major/minor.
    let major = (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32;
    let minor = (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32;
    if major == 0 {
        return None;
    }
    // Throttling rules take whole disks: a partition's are refused (ENODEV).
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = fs::canonicalize(&sys).ok()?.parent()?.join("dev");
        let text = fs::read_to_string(parent).ok()?;
        let (ma, mi) = text.trim().split_once(':')?;
        return Some((ma.parse().ok()?, mi.parse().ok()?));
    }
    Some((major, minor))
}

/// From `/proc/self/mountinfo` and `/proc/self/cgroup`: the directories of our own group in a
/// usable hierarchy (v2 if its root offers `cpu` and `memory`, else v1 `cpu` and `memory`);
/// mount points are taken under `prefix` (another namespace's root, or `/`).
pub fn find_hierarchy(mountinfo: &str, own: &str, prefix: &Path) -> Option<Hierarchy> {
    // (mount point, root within the hierarchy, super options) of each cgroup mount.
    let mut v2 = None;
    let mut v1: Vec<(PathBuf, String, Vec<String>)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (root, mnt) = (
            pre[3].to_string(),
            prefix.join(pre[4].trim_start_matches('/')),
        );
        match post[0] {
            "cgroup2" => v2 = Some((mnt, root)),
            "cgroup" => {
                let opts = post[2].split(',').map(str::to_string).collect();
                v1.push((mnt, root, opts));
            }
            _ => {}
        }
    }
    // Our path in each hierarchy: "0::/path" (v2), "4:memory:/path" or "1:cpu,cpuacct:/path".
    let own_path = |ctl: &str| {
        own.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
            let hit = if ctl.is_empty() {
                ctls.is_empty()
            } else {
                ctls.split(',').any(|c| c == ctl)
            };
            hit.then(|| path.to_string())
        })
    };
    let join = |mnt: &Path, root: &str, path: &str| {
        // A mount of a sub-tree (root other than "/") shows paths relative to it.
        let rel = Path::new(path)
            .strip_prefix(root)
            .unwrap_or(Path::new(path.trim_start_matches('/')));
        mnt.join(rel)
    };
    if let Some((mnt, root)) = &v2 {
        let ctl = fs::read_to_string(mnt.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            return Some(Hierarchy::V2(join(mnt, root, &own_path("")?)));
        }
    }
    let dir = |ctl: &str| {
        let (mnt, root, _) = v1.iter().find(|(_, _, o)| o.iter().any(|x| x == ctl))?;
        Some(join(mnt, root, &own_path(ctl)?))
    };
    Some(Hierarchy::V1 {
        cpu: dir("cpu")?,
        cpuacct: dir("cpuacct"),
        memory: dir("memory")?,
        blkio: dir("blkio"),
    })
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
