//! The agents' cgroups in tests: each test cluster's agents get base groups of their own
//! (`--cgroup-name`), found through a VM process's `/proc/<pid>/cgroup` and removed when the
//! cluster is gone (the agents are SIGKILLed, so nobody else would).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The base group name of host `host`'s agent in test cluster `index` of this test process.
pub fn group_name(index: u32, host: &str) -> String {
    format!("vmx-t{}-{index}-{host}", std::process::id())
}

/// The directory of `pid`'s group in the v1 controller `ctl` (`cpu`, `memory`, ...), or in the
/// v2 hierarchy (`ctl` "").
pub fn dir_of(pid: u32, ctl: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = ctls.split(',').any(|c| c == ctl) || (ctl.is_empty() && ctls.is_empty());
        let mnt = if ctl.is_empty() {
            "/sys/fs/cgroup/unified".to_string()
        } else {
            format!("/sys/fs/cgroup/{ctl}")
        };
        hit.then(|| Path::new(&mnt).join(path.trim_start_matches('/')))
    })
}

/// A file of `pid`'s group in `ctl`, trimmed ("" if unreadable).
pub fn read(pid: u32, ctl: &str, file: &str) -> String {
    dir_of(pid, ctl)
        .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Removes every group named `prefix*` under /sys/fs/cgroup (children first), retrying for a
/// moment while killed processes still leave.
pub fn remove_all(prefix: &str) {
    let mut found = Vec::new();
    find(Path::new("/sys/fs/cgroup"), prefix, 0, &mut found);
    let deadline = Instant::now() + Duration::from_secs(3);
    for base in found {
        loop {
            let children: Vec<PathBuf> = std::fs::read_dir(&base)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            let ok = children.iter().all(|c| std::fs::remove_dir(c).is_ok())
                && std::fs::remove_dir(&base).is_ok();
            if ok || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn find(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if e.file_name().to_string_lossy().starts_with(prefix) {
            out.push(p);
        } else if depth < 4 {
            find(&p, prefix, depth + 1, out);
        }
    }
}

/// Removes a test cluster's agents' groups when dropped (after the cluster's processes).
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_all(&self.0);
    }
}
