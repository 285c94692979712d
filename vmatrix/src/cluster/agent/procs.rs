//! The VM processes an agent runs: one `vmatrix primary` or `vmatrix backup` per VM instance,
//! each in its own process (a crash of one never takes down the agent or another VM), watched
//! through its exit status and its control socket (`GET /status` every round, with
//! `crate::control::client`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use failover::model::{ProcRole, VmObservation};

use crate::control::client::Client;
use crate::control::types::{BackupStatus, Replication, Status};

/// How a primary that handed over exited (exit code 4).
const HANDED_OVER: &str = "exit code 4 (handed over)";

/// How long one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_millis(200);

/// One VM process.
pub struct Proc {
    /// Which VM.
    pub vm: String,
    /// Primary or backup.
    pub role: ProcRole,
    /// Our child, or None for a process adopted from an earlier agent (watched through /proc).
    child: Option<Child>,
    pid: u32,
    /// Its record (pid, term, backups) for an agent that restarts: `<vm dir>/<role>.pid`.
    pidfile: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    /// How it exited, once it did.
    pub exit: Option<String>,
    /// A primary that answered `PUT /handover`: its guest is stopped for good (it exits next).
    pub handed_over: bool,
    /// Last status it answered.
    pub status: Option<Status>,
    /// When it last answered.
    status_at: Option<std::time::Instant>,
    /// Since when its status polls fail (None: the last one was answered, or none was made
    /// since it started or was adopted, which counts from then). A poll the agent did not make
    /// (busy with another action) is not held against the process.
    unanswered_since: Option<std::time::Instant>,
    /// The term it was started with (primary) or told (backup).
    pub term: u64,
    /// Backup hosts applied to a primary.
    pub backup_hosts: Vec<String>,
    /// Status polls since the backup set was last applied (a primary's "protected" counts only
    /// from a status taken after it).
    pub polls_since_apply: u32,
}

impl Proc {
    /// Spawns `cmd` (stdout/stderr to `log`) as the VM process.
    pub fn spawn(
        vm: &str,
        role: ProcRole,
        mut cmd: Command,
        control: PathBuf,
        log: &Path,
        term: u64,
    ) -> anyhow::Result<Proc> {
        let _ = std::fs::remove_file(&control);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // Its own process group: a signal meant for the agent (a terminal's Ctrl-C) never
        // reaches the VMs.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn()?;
        let pid = child.id();
        tracing::info!("started {role:?} of {vm} (pid {pid})");
        let pidfile = log.with_file_name(pid_name(role));
        let p = Proc {
            vm: vm.to_string(),
            role,
            child: Some(child),
            pid,
            pidfile,
            control,
            exit: None,
            handed_over: false,
            status: None,
            status_at: None,
            unanswered_since: None,
            term,
            backup_hosts: Vec::new(),
            polls_since_apply: 0,
        };
        if let Err(e) = p.save_record(&[]) {
            // It runs and is tracked; only an agent restart could not adopt it.
            tracing::warn!("recording the {role:?} of {vm}: {e}");
        }
        Ok(p)
    }

    /// Writes its record (pid, term, backup set) for an agent that restarts.
    pub fn save_record(&self, backups: &[failover::model::BackupTarget]) -> std::io::Result<()> {
        let list: Vec<String> = backups
            .iter()
            .map(|b| format!("{}@{}", b.host, b.addr))
            .collect();
        let tmp = self.pidfile.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!("{} {} {}\n", self.pid, self.term, list.join(",")),
        )?;
        std::fs::rename(&tmp, &self.pidfile)
    }

    /// A process an earlier agent started, from its record, if it still runs.
    pub fn adopt(
        dir: &Path,
        vm: &str,
        role: ProcRole,
    ) -> Option<(Proc, Vec<failover::model::BackupTarget>)> {
        let pidfile = dir.join(pid_name(role));
        let text = std::fs::read_to_string(&pidfile).ok()?;
        let mut f = text.split_whitespace();
        let pid: u32 = f.next()?.parse().ok()?;
        let term: u64 = f.next()?.parse().ok()?;
        let backups: Vec<failover::model::BackupTarget> = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|b| b.split_once('@'))
            .map(|(h, a)| failover::model::BackupTarget {
                host: h.into(),
                addr: a.into(),
            })
            .collect();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let want = match role {
            ProcRole::Primary => "primary",
            ProcRole::Backup => "backup",
        };
        let ours = cmdline.split(|&b| b == 0).any(|a| a == want.as_bytes())
            && cmdline.split(|&b| b == 0).any(|a| a == vm.as_bytes());
        if !ours || !pid_alive(pid) {
            return None;
        }
        tracing::info!("adopted the running {role:?} of {vm} (pid {pid}, term {term})");
        let control = dir.join(match role {
            ProcRole::Primary => "primary.sock",
            ProcRole::Backup => "backup.sock",
        });
        let p = Proc {
            vm: vm.to_string(),
            role,
            child: None,
            pid,
            pidfile,
            control,
            exit: None,
            handed_over: false,
            status: None,
            status_at: None,
            unanswered_since: None,
            term,
            backup_hosts: backups.iter().map(|b| b.host.clone()).collect(),
            polls_since_apply: 0,
        };
        Some((p, backups))
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it still runs (reaps it if it exited).
    pub fn alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let Some(child) = self.child.as_mut() else {
            if pid_alive(self.pid) {
                return true;
            }
            self.exit = Some("exited (adopted from an earlier agent: status unknown)".into());
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(st)) => {
                let why = describe_exit(st);
                tracing::warn!("{:?} of {} exited: {why}", self.role, self.vm);
                self.exit = Some(why);
                false
            }
            Err(e) => {
                self.exit = Some(format!("cannot wait for it: {e}"));
                false
            }
        }
    }

    /// Kills it at once (fencing at the resource: no output can leave it afterwards).
    pub fn kill(&mut self) {
        match self.child.as_mut() {
            Some(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None => {
                if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                let until = std::time::Instant::now() + Duration::from_secs(2);
                while pid_alive(self.pid) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        if self.exit.is_none() {
            self.exit = Some("stopped by the agent".into());
        }
    }

    /// Asks it to stop cleanly (a backup finalizes its image); kills it after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let _ = self.client(STATUS_TIMEOUT).stop();
        let until = std::time::Instant::now() + grace;
        while std::time::Instant::now() < until {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    /// Waits up to `limit` for it to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// A client of its control socket whose requests take at most `limit`.
    pub fn client(&self, limit: Duration) -> Client {
        Client::new(&self.control, limit)
    }

    /// Refreshes `status` from its control socket (keeps the last one on failure).
    pub fn poll(&mut self) {
        let asked = std::time::Instant::now();
        match self.client(STATUS_TIMEOUT).status() {
            Ok(s) => {
                self.status = Some(s);
                self.status_at = Some(std::time::Instant::now());
                self.unanswered_since = None;
                self.polls_since_apply = self.polls_since_apply.saturating_add(1);
            }
            Err(_) => {
                self.unanswered_since.get_or_insert(asked);
            }
        }
    }

    /// How long its status polls have been failing, ms (0 when the last was answered).
    fn unanswered_ms(&self) -> u64 {
        self.unanswered_since
            .map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// How old the last status answer is (a process that stopped answering keeps its last
    /// answer; what it says ages).
    fn status_age_ms(&self) -> u64 {
        self.status_at.map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// The replication figures of a primary's last status.
    fn replication(&self) -> Option<&Replication> {
        match &self.status {
            Some(Status::Primary(p)) => Some(&p.replication),
            _ => None,
        }
    }

    /// A backup's last status.
    fn backup_status(&self) -> Option<&BackupStatus> {
        match &self.status {
            Some(Status::Backup(b)) => Some(b),
            _ => None,
        }
    }

    /// What the manager is told about it.
    pub fn observe(&mut self) -> VmObservation {
        let alive = self.alive();
        let mut o = VmObservation {
            vm: self.vm.clone(),
            role: self.role,
            alive,
            exit: self.exit.clone(),
            term: self.term,
            image_term: 0,
            seq: None,
            protected: false,
            backup_hosts: Vec::new(),
            output_held: false,
            silent_ms: None,
            handed_over: self.handed_over
                || self.exit.as_deref() == Some(HANDED_OVER)
                || self.replication().is_some_and(|r| r.handed_over),
            // (Set by the supervisor from the VM's files.)
            never_ran: false,
        };
        match self.role {
            ProcRole::Primary => {
                let r = self.replication();
                o.term = r.map_or(self.term, |r| r.term);
                o.seq = r.and_then(|r| r.acked_seq);
                // Protected with the set last applied: every backup of it in step, judged from a
                // status taken after the set was applied.
                let n = self.backup_hosts.len() as u64;
                o.protected = self.polls_since_apply >= 2
                    && n > 0
                    && r.is_some_and(|r| r.protected && r.backups == n && r.backups_in_step == n);
                o.output_held = r.is_some_and(|r| r.output_held);
                o.backup_hosts = self.backup_hosts.clone();
                // How long it has not answered (the manager fails a hung primary).
                o.silent_ms = Some(self.unanswered_ms());
            }
            ProcRole::Backup => {
                let b = self.backup_status();
                o.term = b.map_or(self.term, |b| b.min_term);
                o.image_term = b.map_or(0, |b| b.term);
                o.seq = b.and_then(|b| b.seq);
                // Silent = neither a checkpoint nor a heartbeat from the primary (an epoch may
                // legitimately last longer than the detection timeout; heartbeats do not stop),
                // as of the last answer, aged by how old that answer is.
                let heard = b.and_then(|b| {
                    [b.last_checkpoint_ms_ago, b.last_heard_ms_ago]
                        .into_iter()
                        .flatten()
                        .min()
                });
                o.silent_ms = heard.map(|ms| ms + self.status_age_ms());
            }
        }
        o
    }
}

fn pid_name(role: ProcRole) -> &'static str {
    match role {
        ProcRole::Primary => "primary.pid",
        ProcRole::Backup => "backup.pid",
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "pid (comm) S ...".
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(3), _) => "exit code 3 (fenced by a newer term)".into(),
        (Some(4), _) => HANDED_OVER.into(),
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "exited".into(),
    }
}
