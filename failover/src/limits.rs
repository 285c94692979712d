//! Per-VM resource limits ("Virtual Services": one service's load must not starve another's)
//! and what agents report of their use.
//!
//! The user sets a VM's [`Limits`] at `vm create` or later (`vmatrix vm limits`); the manager
//! persists them in the VM's record and hands them to every host running a process of the VM
//! (`Assignments::limits`); each agent puts each VM process (primary, backup, clone) in a
//! cgroup of its own with these limits, changes them live, and reports [`ProcUsage`] with its
//! heartbeats, which `vmatrix vm show` prints against the limits.

use serde::{Deserialize, Serialize};

use crate::model::ProcRole;

/// Memory a VM process needs beyond twice its guest's RAM: the VMM, its threads, the capture
/// buffers it reuses (up to 2 × 64 MiB), the QUIC stack.
pub const VMM_OVERHEAD_MIB: u64 = 192;

/// The smallest memory limit of a VM with `guest_mem_mib` of RAM: its primary holds the guest's
/// RAM and a copy of every page it sent to its backups (the base of the next checkpoint's
/// encoding and of a quick resync), so up to twice the RAM, plus [`VMM_OVERHEAD_MIB`].
pub fn memory_floor_mib(guest_mem_mib: u64) -> u64 {
    guest_mem_mib
        .saturating_mul(2)
        .saturating_add(VMM_OVERHEAD_MIB)
}

/// Limits of each process of one VM (0 everywhere: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU bandwidth in thousandths of a CPU (500: half a CPU, 2000: two CPUs); 0: unlimited.
    #[serde(default)]
    pub cpu_millis: u32,
    /// CPU weight against other groups when the CPUs are contended, 1..=10000 (cgroup v2
    /// `cpu.weight`; 100 is the default share); 0: the default.
    #[serde(default)]
    pub cpu_weight: u32,
    /// Memory of the whole VM process (guest RAM, VMM, staging buffers, page cache), MiB; 0:
    /// unlimited. A process that exceeds it is reclaimed, then killed by the kernel (OOM) in
    /// its own group only.
    #[serde(default)]
    pub memory_mib: u64,
    /// Disk reads of the process on the device holding its disk, bytes per second; 0: unlimited.
    #[serde(default)]
    pub io_read_bps: u64,
    /// Disk writes, bytes per second; 0: unlimited.
    #[serde(default)]
    pub io_write_bps: u64,
}

impl Limits {
    /// No limit at all.
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// Checks them against the guest's RAM.
    pub fn validate(&self, guest_mem_mib: u64) -> Result<(), String> {
        if self.cpu_millis != 0 && !(10..=1_000_000).contains(&self.cpu_millis) {
            return Err(format!(
                "cpu_millis {} not in 10..=1000000 (thousandths of a CPU)",
                self.cpu_millis
            ));
        }
        if self.cpu_weight > 10_000 {
            return Err(format!("cpu_weight {} not in 1..=10000", self.cpu_weight));
        }
        let floor = memory_floor_mib(guest_mem_mib);
        if self.memory_mib != 0 && self.memory_mib < floor {
            return Err(format!(
                "memory_mib {} is below the {floor} MiB a VM of {guest_mem_mib} MiB needs (twice \
                 its RAM: the guest and its primary's copy of every page sent to its backups, \
                 plus {VMM_OVERHEAD_MIB} MiB for the VMM and its buffers)",
                self.memory_mib
            ));
        }
        if self.memory_mib > 1 << 30 {
            return Err(format!("memory_mib {} too large", self.memory_mib));
        }
        for (what, v) in [
            ("io_read_bps", self.io_read_bps),
            ("io_write_bps", self.io_write_bps),
        ] {
            if v != 0 && v < 4096 {
                return Err(format!("{what} {v} below 4096 bytes per second"));
            }
        }
        Ok(())
    }
}

/// "cpu 0.50, weight 200, memory 256 MiB, io read 1048576 B/s" (or "none").
impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self;
        if l.is_none() {
            return f.write_str("none");
        }
        let mut parts = Vec::new();
        if l.cpu_millis != 0 {
            parts.push(format!("cpu {:.2}", f64::from(l.cpu_millis) / 1000.0));
        }
        if l.cpu_weight != 0 {
            parts.push(format!("weight {}", l.cpu_weight));
        }
        if l.memory_mib != 0 {
            parts.push(format!("memory {} MiB", l.memory_mib));
        }
        if l.io_read_bps != 0 {
            parts.push(format!("io read {} B/s", l.io_read_bps));
        }
        if l.io_write_bps != 0 {
            parts.push(format!("io write {} B/s", l.io_write_bps));
        }
        f.write_str(&parts.join(", "))
    }
}

/// Which process of a VM a usage sample is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageOf {
    /// Its primary or a backup.
    Vm(ProcRole),
    /// One of its clones (by name).
    Clone(String),
}

/// One VM process's use of its limits, as its agent measured it (a heartbeat's field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcUsage {
    /// The VM.
    pub vm: String,
    /// The process.
    pub of: UsageOf,
    /// CPU used over the last sampling interval, thousandths of a CPU.
    pub cpu_millis: u32,
    /// Time its threads were held back by the CPU limit, since the group was made, µs.
    pub throttled_us: u64,
    /// Memory charged to it now, bytes.
    pub mem_bytes: u64,
    /// Its memory limit as the kernel holds it, bytes (0: none).
    pub mem_limit_bytes: u64,
    /// Processes the kernel killed in it for memory (OOM), since the group was made.
    pub oom_kills: u64,
    /// The limits could not be applied (why), or empty.
    #[serde(default)]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_against_the_guest() {
        assert!(Limits::default().validate(64).is_ok());
        let l = Limits {
            cpu_millis: 500,
            cpu_weight: 200,
            memory_mib: 320,
            io_read_bps: 1 << 20,
            io_write_bps: 1 << 20,
        };
        assert!(l.validate(64).is_ok());
        let e = l.validate(128).unwrap_err();
        assert!(e.contains("below the 448 MiB a VM of 128 MiB needs"), "{e}");
        for bad in [
            Limits { cpu_millis: 5, ..l },
            Limits {
                cpu_weight: 10_001,
                ..l
            },
            Limits {
                io_write_bps: 100,
                ..l
            },
        ] {
            assert!(bad.validate(64).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<Limits>(r#"{"cpu_milis": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let l: Limits = serde_json::from_str(r#"{"cpu_millis": 250}"#).unwrap();
        assert_eq!(l.cpu_millis, 250);
    }
}
