//! What a run created, recorded before it is created, so that nothing outlives the run: the
//! run's guard tears it down on every exit path ([`teardown`] from its `Drop`), and a runner
//! that was killed outright (SIGKILL, a power cut of the shell) leaves a record that the next
//! runner finds and tears down ([`clean_leftovers`]).
//!
//! Records are JSON files in `/run/vmatrix-chaos/` (the temporary directory if `/run` is
//! missing), one per live run, naming the runner's pid and start time (so a reused pid is not
//! mistaken for a live runner), the cluster, the index lock, markers that every process of the
//! run has in its command line and no other process has (the manager's address on the
//! cluster's replication network, the capture's nflog group), nftables tables in the runner's
//! namespace and mounts.

use std::path::{Path, PathBuf};

use rustix::process::Signal;
use serde::{Deserialize, Serialize};

use super::cluster::{self, Cluster};
use super::nft;
use super::procs::{cmdline, pid_alive, signal};

/// One live run's resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The runner's pid.
    pub runner_pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22, clock ticks since boot).
    pub runner_start: u64,
    /// The cluster's name (`vxc<index>`).
    pub cluster: String,
    /// The index's lock file.
    pub lock: PathBuf,
    /// Strings that the command line of every process of the run (and of no other) contains.
    pub markers: Vec<String>,
    /// nftables tables in the runner's namespace: (family, name).
    pub tables: Vec<(String, String)>,
    /// Mount points.
    pub mounts: Vec<PathBuf>,
}

/// The directory of the records (and of the installed scripts).
pub fn registry_dir() -> PathBuf {
    let run = Path::new("/run");
    match run.is_dir() {
        true => run.join("vmatrix-chaos"),
        false => std::env::temp_dir().join("vmatrix-chaos"),
    }
}

/// The start time of `pid` (field 22 of its stat), if it runs.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command: state is field 3, so starttime (22) is the 20th here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Record {
    /// A record for this process and `cluster`.
    pub fn new(cluster: &Cluster, markers: Vec<String>) -> Record {
        let pid = std::process::id();
        Record {
            runner_pid: pid,
            runner_start: start_time(pid).unwrap_or(0),
            cluster: cluster.name.clone(),
            lock: cluster.lock.clone(),
            markers,
            ..Record::default()
        }
    }

    /// Its file.
    pub fn path(&self) -> PathBuf {
        registry_dir().join(format!("{}.json", self.cluster))
    }

    /// Writes it (atomically).
    pub fn save(&self) -> std::io::Result<()> {
        let dir = registry_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!("{}.json.tmp", self.cluster));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, self.path())
    }

    /// Whether the runner that wrote it still runs.
    pub fn runner_alive(&self) -> bool {
        pid_alive(self.runner_pid) && start_time(self.runner_pid) == Some(self.runner_start)
    }
}

/// Removes everything `rec` names (processes, hosts, tables, mounts, the lock, the record);
/// reports each step through `log`.
pub fn teardown(rec: &Record, log: &mut dyn FnMut(String)) {
    kill_marked(&rec.markers, log);
    match cluster::install_scripts(&registry_dir().join("bin")) {
        Ok(script) => {
            if let Err(e) = cluster::run_script(&script, &["down", &rec.cluster]) {
                log(format!("{} down: {e}", rec.cluster));
            }
        }
        Err(e) => log(format!("cannot install cluster.sh: {e}")),
    }
    for (family, name) in &rec.tables {
        nft::remove_caller_table(family, name);
    }
    for m in &rec.mounts {
        let st = std::process::Command::new("umount")
            .arg("-l")
            .arg(m)
            .stderr(std::process::Stdio::null())
            .status();
        if st.is_ok_and(|s| s.success()) {
            log(format!("unmounted {}", m.display()));
        }
    }
    kill_marked(&rec.markers, log);
    let _ = std::fs::remove_file(&rec.lock);
    let _ = std::fs::remove_file(rec.path());
}

/// SIGKILLs every process whose command line contains one of `markers` (never this one).
pub fn kill_marked(markers: &[String], log: &mut dyn FnMut(String)) {
    if markers.is_empty() {
        return;
    }
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !pid_alive(pid) {
            continue;
        }
        let cmd = cmdline(pid);
        if markers.iter().any(|m| cmd.contains(m.as_str())) {
            let _ = signal(pid, Signal::KILL);
            log(format!("killed leftover pid {pid}: {cmd}"));
        }
    }
}

/// Tears down what crashed runners left: every record whose runner is gone, and every chaos
/// namespace (`vxc<i><host>`) that no live runner's record names.
pub fn clean_leftovers(log: &mut dyn FnMut(String)) {
    let dir = registry_dir();
    let mut live = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<Record>(&bytes) else {
                log(format!("{}: unreadable record, removed", p.display()));
                let _ = std::fs::remove_file(&p);
                continue;
            };
            if rec.runner_alive() {
                live.push(rec.cluster.clone());
                continue;
            }
            log(format!(
                "cleaning up after a chaos run that did not finish (cluster {}, runner pid {})",
                rec.cluster, rec.runner_pid
            ));
            teardown(&rec, log);
        }
    }
    for name in cluster::chaos_namespaces() {
        if live.contains(&name) {
            continue;
        }
        log(format!("removing leftover chaos hosts {name}*"));
        let rec = Record {
            cluster: name.clone(),
            lock: PathBuf::from("/nonexistent"),
            ..Record::default()
        };
        teardown(&rec, log);
        nft::remove_caller_table("bridge", &format!("{name}cap"));
    }
}
