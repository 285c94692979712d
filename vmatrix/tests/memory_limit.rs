//! A guest hitting its memory limit (issue 12, "Virtual Services"), on real KVM and the kernel's
//! memory cgroup: a second VM, in a group of its own limited below what its guest then touches,
//! is stopped by the kernel inside that group (its VMM is OOM-killed there, nothing else is),
//! while a protected neighbour on the same machine goes on serving and checkpointing, and its
//! backup still equals it byte for byte.
//!
//! (Through the manager a VM's memory limit cannot be set below its guest's RAM plus the VMM's
//! share, `failover::limits::memory_floor_mib`: there a guest reaches its limit only through its
//! process's page cache, which the kernel reclaims in the group. This is the harder case: the
//! limit cut below what the guest holds, as a user running `vmatrix run` in a group would.)

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;

/// A memory cgroup of its own (v1 `memory` hierarchy, else v2), removed on drop.
struct MemGroup {
    dir: PathBuf,
    v1: bool,
}

impl MemGroup {
    fn new(name: &str, limit: u64) -> MemGroup {
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        let dir = match v1 {
            true => PathBuf::from("/sys/fs/cgroup/memory").join(name),
            false => PathBuf::from("/sys/fs/cgroup").join(name),
        };
        std::fs::create_dir_all(&dir).unwrap();
        let file = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        MemGroup { dir, v1 }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Times the group hit its limit, and the most it held (bytes).
    fn hits_and_peak(&self) -> (u64, u64) {
        let num = |f: &str| {
            std::fs::read_to_string(self.dir.join(f))
                .ok()
                .and_then(|s| {
                    // (v2's memory.events: "max N" among other lines.)
                    let s = s.trim();
                    s.parse().ok().or_else(|| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("max ").and_then(|n| n.parse().ok()))
                    })
                })
                .unwrap_or(0)
        };
        match self.v1 {
            true => (num("memory.failcnt"), num("memory.max_usage_in_bytes")),
            false => (num("memory.events"), num("memory.peak")),
        }
    }
}

impl Drop for MemGroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn epochs(sock: &std::path::Path) -> u64 {
    json_field(&ctl(sock, &["status"]), "epochs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_guest_over_its_memory_limit_is_stopped_in_its_group_and_its_neighbour_checkpoints_on() {
    require_kvm();
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut r, mut kv, sock) = Replicated::start_controlled(&net, dir.path());
    for i in 0..20 {
        assert_eq!(kv.cmd(&format!("SET before{i} v{i}")).unwrap(), "OK");
    }

    // The other VM: a 512 MiB guest whose process may hold 192 MiB.
    let hnet = TestNet::new();
    let hdir = tempfile::tempdir().unwrap();
    make_disk(&hdir.path().join("disk.img"), 16);
    let mut hog = VmProc::spawn(
        &hnet,
        &hdir.path().join("disk.img"),
        &hdir.path().join("console.log"),
        512,
    );
    let mut hkv = hog.wait_ready(Duration::from_secs(20));
    let limit = 192u64 << 20;
    let group = MemGroup::new(&format!("vmx-t{}-memhog", std::process::id()), limit);
    let pid = hog.child.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("vmatrix"), "the VM process itself: {exe:?}");
    group.add(pid);

    // Its guest touches 384 MiB (a CHURN region is zeroed when made): beyond the limit.
    let e0 = epochs(&sock);
    let _ = hkv.cmd("CHURN 98304 1000");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = hog.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the VM over its limit was not stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (hits, peak) = group.hits_and_peak();
    eprintln!("over its limit: {status}, the group hit its limit {hits} times, peak {peak} bytes");
    assert_eq!(
        status.signal(),
        Some(9),
        "killed by the kernel (OOM): {status}"
    );
    assert!(hits > 0, "the group reached its limit");
    assert!(peak <= limit, "never more than its limit: {peak}");

    // The neighbour served and checkpointed meanwhile, and goes on.
    for i in 0..20 {
        assert_eq!(kv.cmd(&format!("SET after{i} v{i}")).unwrap(), "OK");
    }
    let e1 = epochs(&sock);
    assert!(e1 > e0 + 10, "the neighbour checkpointed on: {e0} → {e1}");
    let st = ctl(&sock, &["status"]);
    eprintln!(
        "neighbour pause p99 {} µs",
        json_field(&st, "pause_p99_us").unwrap_or_default()
    );
    assert_backup_equals_primary(&mut r, &sock);
    drop(group);
}
