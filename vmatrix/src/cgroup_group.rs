//! One VM process's control group ([`Group`]): moving the process in, writing its limits
//! (v2 `cpu.max`/`cpu.weight`/`memory.max`/`io.max`, or their v1 files) once per change, and
//! sampling its use against them ([`Usage`]). Split from `cgroup.rs` (the hierarchy, the
//! agent's base group and the real-time budget), which it shares its errors and file helpers
//! with.

use std::fs;
use std::path::Path;
use std::time::Instant;

use failover::limits::Limits;

use super::*;
/// Limits and the disk device (major, minor) they were written for.
type Applied = (Limits, Option<(u32, u32)>);

/// One process's group.
#[derive(Debug)]
pub struct Group {
    pub(super) h: Hierarchy,
    /// Start of the current CPU window: (time, CPU used µs).
    last: Option<(Instant, u64)>,
    /// CPU rate over the last whole window, thousandths of a CPU.
    rate: u32,
    /// Limits last written (and the disk device they were written for).
    applied: Option<Applied>,
    /// Limits last refused, when, and why.
    failed: Option<(Applied, Instant, String)>,
}

/// One sample of a group's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU over the last whole window of [`RATE_WINDOW`], thousandths of a CPU.
    pub cpu_millis: u32,
    /// Held back by the CPU limit since the group was made, µs.
    pub throttled_us: u64,
    /// Memory charged now.
    pub mem_bytes: u64,
    /// Memory limit (0: none).
    pub mem_limit_bytes: u64,
    /// OOM kills in it.
    pub oom_kills: u64,
}

/// A refused write of the same limits is tried again after this.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

fn has_io(l: &Limits) -> bool {
    l.io_read_bps != 0 || l.io_write_bps != 0
}

/// Shortest window a CPU rate is measured over.
pub const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// The v1 period of CPU bandwidth, µs.
const PERIOD_US: u64 = 100_000;

impl Group {
    /// A group of hierarchy `h` whose directories exist, nothing written yet.
    pub(super) fn new(h: Hierarchy) -> Group {
        Group {
            h,
            last: None,
            rate: 0,
            applied: None,
            failed: None,
        }
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        self.add_but_cpu(pid, true)
    }

    /// Moves process `pid` into the group, into its `cpu` directory only if `cpu` (v1; see
    /// [`Cgroups::rt_grouped`]).
    pub fn add_but_cpu(&self, pid: u32, cpu: bool) -> Result<(), CgroupError> {
        let cpu_dir = match &self.h {
            Hierarchy::V1 { cpu: c, .. } if !cpu => Some(c.clone()),
            _ => None,
        };
        for d in self.h.dirs() {
            if cpu_dir.as_deref() == Some(d) {
                continue;
            }
            let f = d.join("cgroup.procs");
            fs::write(&f, pid.to_string()).map_err(io_err(&f))?;
        }
        Ok(())
    }

    /// Moves process `pid` into this group's `cpu` directory (`into`), or back to the agent's
    /// own (`parent`, the base's parent) — v1 only.
    pub fn move_cpu(&self, pid: u32, into: bool) -> Result<(), CgroupError> {
        let Hierarchy::V1 { cpu, .. } = &self.h else {
            return Ok(());
        };
        let dir = match into {
            true => cpu.clone(),
            false => cpu
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| CgroupError::Unsupported(format!("{}: no parent", cpu.display())))?,
        };
        let f = dir.join("cgroup.procs");
        fs::write(&f, pid.to_string()).map_err(io_err(&f))
    }

    /// Whether `pid` is in it (its `cpu` or unified directory).
    pub fn holds(&self, pid: u32) -> bool {
        let d = match &self.h {
            Hierarchy::V2(d) => d,
            Hierarchy::V1 { cpu, .. } => cpu,
        };
        read(&d.join("cgroup.procs"))
            .map(|s| s.lines().any(|l| l.trim() == pid.to_string()))
            .unwrap_or(false)
    }

    /// Writes the limits (only what changed since the last call). `disk` is the block device
    /// (major, minor) disk limits apply to.
    pub fn set(&mut self, l: &Limits, disk: Option<(u32, u32)>) -> Result<(), CgroupError> {
        if self.applied == Some((*l, disk)) {
            return Ok(());
        }
        // The same write failed a moment ago (a memory limit below what the process holds:
        // v1 reclaims, then refuses): not again every round.
        if let Some((f, at, e)) = &self.failed {
            if *f == (*l, disk) && at.elapsed() < RETRY_AFTER {
                return Err(CgroupError::Unsupported(e.clone()));
            }
        }
        // Disk rules only when asked for now or before (to lift them): a device that refuses
        // them (a partition, a v2 host without io) must not fail every other limit.
        let had_io = self.applied.is_some_and(|(a, _)| has_io(&a));
        let io = (has_io(l) || had_io).then_some(disk);
        let r = match &self.h {
            Hierarchy::V2(d) => set_v2(d, l, io),
            Hierarchy::V1 {
                cpu, memory, blkio, ..
            } => set_v1(cpu, memory, blkio.as_deref(), l, io),
        };
        match r {
            Ok(()) => {
                self.applied = Some((*l, disk));
                self.failed = None;
                Ok(())
            }
            Err(e) => {
                self.failed = Some(((*l, disk), Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Its use now (CPU over the time since the previous call).
    pub fn usage(&mut self) -> Usage {
        let (cpu_us, throttled_us, mem, limit, ooms) = match &self.h {
            Hierarchy::V2(d) => {
                let stat = read(&d.join("cpu.stat")).unwrap_or_default();
                let ev = read(&d.join("memory.events")).unwrap_or_default();
                (
                    field(&stat, "usage_usec"),
                    field(&stat, "throttled_usec"),
                    number(&d.join("memory.current")),
                    number(&d.join("memory.max")),
                    field(&ev, "oom_kill"),
                )
            }
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                ..
            } => {
                let stat = read(&cpu.join("cpu.stat")).unwrap_or_default();
                let oom = read(&memory.join("memory.oom_control")).unwrap_or_default();
                let used = cpuacct
                    .as_ref()
                    .map_or(0, |c| number(&c.join("cpuacct.usage")) / 1000);
                let limit = number(&memory.join("memory.limit_in_bytes"));
                (
                    used,
                    field(&stat, "throttled_time") / 1000,
                    number(&memory.join("memory.usage_in_bytes")),
                    // (v1 says "no limit" with a page-rounded i64::MAX.)
                    if limit >= 1 << 62 { 0 } else { limit },
                    field(&oom, "oom_kill"),
                )
            }
        };
        // The CPU rate over windows of at least RATE_WINDOW: a bandwidth limit lets a group
        // run flat out for its quota and then holds it back, so shorter windows swing between
        // 0 and all CPUs.
        let now = Instant::now();
        match self.last {
            None => self.last = Some((now, cpu_us)),
            Some((t, before)) if now.duration_since(t) >= RATE_WINDOW => {
                let wall = now.duration_since(t).as_micros().max(1) as u64;
                let rate = cpu_us.saturating_sub(before) * 1000 / wall;
                self.rate = rate.min(u64::from(u32::MAX)) as u32;
                self.last = Some((now, cpu_us));
            }
            Some(_) => {}
        }
        Usage {
            cpu_millis: self.rate,
            throttled_us,
            mem_bytes: mem,
            mem_limit_bytes: limit,
            oom_kills: ooms,
        }
    }
}

/// `io`: None leaves the disk rules alone; Some(None): they are wanted but no block device
/// holds the VM's files.
fn set_v2(d: &Path, l: &Limits, io: Option<Option<(u32, u32)>>) -> Result<(), CgroupError> {
    let max = |v: u64| {
        if v == 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    let cpu = if l.cpu_millis == 0 {
        format!("max {PERIOD_US}")
    } else {
        format!("{} {PERIOD_US}", u64::from(l.cpu_millis) * PERIOD_US / 1000)
    };
    write(&d.join("cpu.max"), &cpu)?;
    let weight = if l.cpu_weight == 0 { 100 } else { l.cpu_weight };
    write(&d.join("cpu.weight"), &weight.to_string())?;
    write(&d.join("memory.max"), &max(l.memory_mib << 20))?;
    match io {
        Some(Some((ma, mi))) => {
            let rule = format!(
                "{ma}:{mi} rbps={} wbps={}",
                max(l.io_read_bps),
                max(l.io_write_bps)
            );
            write(&d.join("io.max"), &rule)
        }
        Some(None) => Err(no_disk()),
        None => Ok(()),
    }
}

fn set_v1(
    cpu: &Path,
    memory: &Path,
    blkio: Option<&Path>,
    l: &Limits,
    io: Option<Option<(u32, u32)>>,
) -> Result<(), CgroupError> {
    write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
    let quota = if l.cpu_millis == 0 {
        "-1".to_string()
    } else {
        (u64::from(l.cpu_millis) * PERIOD_US / 1000).to_string()
    };
    write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
    // v2's weight 100 is v1's 1024 shares.
    let weight = if l.cpu_weight == 0 { 100 } else { l.cpu_weight };
    let shares = (u64::from(weight) * 1024 / 100).max(2);
    write(&cpu.join("cpu.shares"), &shares.to_string())?;
    let mem = if l.memory_mib == 0 {
        "-1".to_string()
    } else {
        (l.memory_mib << 20).to_string()
    };
    write(&memory.join("memory.limit_in_bytes"), &mem)?;
    match (blkio, io) {
        (_, None) => {}
        (Some(b), Some(Some((ma, mi)))) => {
            if l.io_write_bps != 0 {
                tracing::warn!(
                    "cgroup v1: the disk write limit ({} bytes/s) holds only for writes the \
                     kernel charges to the VM process (direct, synchronous); buffered writes \
                     flushed later by the kernel pass unthrottled (cgroup v2's io.max holds them)",
                    l.io_write_bps
                );
            }
            for (file, v) in [
                ("blkio.throttle.read_bps_device", l.io_read_bps),
                ("blkio.throttle.write_bps_device", l.io_write_bps),
            ] {
                // (0 removes the rule.)
                write(&b.join(file), &format!("{ma}:{mi} {v}"))?;
            }
        }
        _ => return Err(no_disk()),
    }
    Ok(())
}

fn no_disk() -> CgroupError {
    CgroupError::Unsupported(
        "disk limits need the VM's files on a block device (and the io or blkio controller)".into(),
    )
}
