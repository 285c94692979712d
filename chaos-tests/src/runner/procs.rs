//! The run's processes: the cluster's certificates, the manager (in the runner's namespace, on
//! the replication bridge's address, its API on a free loopback port, its state and events files
//! in the work directory) and an agent per host (in the host's namespace), each logging to
//! `<run dir>/logs/`. Each is its own process group, so a Ctrl-C at the terminal reaches only
//! the runner, which then tears everything down in order. Also: signals to pids, and the VM
//! processes' pid files the agents keep.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::cluster::Cluster;
use super::RunnerError;

/// Where a run's processes keep their files.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<run dir>/work`: certificates, manager state, hosts' state directories.
    pub work: PathBuf,
    /// `<run dir>/logs`.
    pub logs: PathBuf,
}

impl Paths {
    /// The certificates.
    pub fn certs(&self) -> PathBuf {
        self.work.join("pki")
    }

    /// The manager's state file.
    pub fn manager_state(&self) -> PathBuf {
        self.work.join("manager.state")
    }

    /// The manager's event log.
    pub fn events(&self) -> PathBuf {
        self.work.join("events.jsonl")
    }

    /// Host `name`'s state directory.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.work.join(format!("host-{name}"))
    }
}

/// Runs `cmd` to completion; an error with its output if it fails.
pub fn run_ok(cmd: &mut Command, what: &str) -> Result<String, RunnerError> {
    let out = cmd.output().map_err(RunnerError::spawn(what))?;
    if !out.status.success() {
        return Err(RunnerError::Command {
            what: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the cluster CA and the manager's and every host's certificates.
pub fn make_certs(vmatrix: &Path, paths: &Paths, cluster: &Cluster) -> Result<(), RunnerError> {
    let certs = paths.certs();
    run_ok(
        Command::new(vmatrix).args(["certs", "init"]).arg(&certs),
        "vmatrix certs init",
    )?;
    run_ok(
        Command::new(vmatrix)
            .args(["certs", "issue"])
            .arg(&certs)
            .args(["--host", "manager", "--role", "manager"]),
        "vmatrix certs issue manager",
    )?;
    for h in 0..cluster.hosts {
        run_ok(
            Command::new(vmatrix)
                .args(["certs", "issue"])
                .arg(&certs)
                .args(["--host", &cluster.host_name(h)])
                .args(["--role", "agent", "--role", "primary", "--role", "backup"]),
            "vmatrix certs issue",
        )?;
    }
    Ok(())
}

/// A free TCP port on loopback (for the manager's API).
pub fn free_port() -> Result<u16, RunnerError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(RunnerError::spawn("a loopback listener"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(RunnerError::spawn("a loopback listener"))
}

fn log_file(paths: &Paths, name: &str) -> Result<std::fs::File, RunnerError> {
    let p = paths.logs.join(name);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(RunnerError::io(&p))
}

/// Starts the manager (or restarts it on the same state and events files).
pub fn spawn_manager(
    vmatrix: &Path,
    paths: &Paths,
    cluster: &Cluster,
    api: SocketAddr,
) -> Result<Child, RunnerError> {
    use std::os::unix::process::CommandExt;
    Command::new(vmatrix)
        .args(["--log", "info", "manager", "--listen"])
        .arg(cluster.manager_listen().to_string())
        .arg("--api")
        .arg(api.to_string())
        .arg("--state")
        .arg(paths.manager_state())
        .arg("--events")
        .arg(paths.events())
        .arg("--certs")
        .arg(paths.certs())
        .args(["--host", "manager"])
        .stdin(Stdio::null())
        .stdout(log_file(paths, "manager.log")?)
        .stderr(log_file(paths, "manager.log")?)
        .process_group(0)
        .spawn()
        .map_err(RunnerError::spawn("vmatrix manager"))
}

/// Starts host `h`'s agent in its namespace.
pub fn spawn_agent(
    vmatrix: &Path,
    guest: &Path,
    paths: &Paths,
    cluster: &Cluster,
    h: usize,
) -> Result<Child, RunnerError> {
    use std::os::unix::process::CommandExt;
    let host = cluster.host_name(h);
    let state = paths.host_dir(&host);
    std::fs::create_dir_all(&state).map_err(RunnerError::io(&state))?;
    let log = format!("agent-{host}.log");
    cluster
        .command(h, vmatrix)
        .args(["--log", "info", "agent", "--manager"])
        .arg(cluster.manager_listen().to_string())
        .arg("--certs")
        .arg(paths.certs())
        .args(["--host", &host, "--repl-ip"])
        .arg(cluster.repl_ip(h).to_string())
        .arg("--state-dir")
        .arg(&state)
        .arg("--guest")
        .arg(guest)
        .stdin(Stdio::null())
        .stdout(log_file(paths, &log)?)
        .stderr(log_file(paths, &log)?)
        .process_group(0)
        .spawn()
        .map_err(RunnerError::spawn("vmatrix agent"))
}

/// Kills a child (SIGKILL, after SIGCONT in case it was stopped) and reaps it.
pub fn kill_child(c: &mut Child) {
    let _ = signal(c.id(), Signal::KILL);
    let _ = c.wait();
}

/// Whether a child still runs (reaping it if it exited).
pub fn child_running(c: &mut Child) -> bool {
    matches!(c.try_wait(), Ok(None))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: Signal) -> Result<(), String> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("bad pid {pid}"))?;
    kill_process(p, sig).map_err(|e| format!("kill -{sig:?} {pid}: {e}"))
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// `/proc/<pid>/cmdline` with its NULs as spaces ("" if gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .split('\0')
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The pid of VM `vm`'s `role` ("primary" or "backup") process on host `host`, from the
/// agent's record (`<state dir>/<vm>/<role>.pid`: "pid term backups"), if it runs and is a
/// `vmatrix <role>`.
pub fn vm_pid(paths: &Paths, host: &str, vm: &str, role: &str) -> Result<u32, String> {
    let file = paths.host_dir(host).join(vm).join(format!("{role}.pid"));
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("no {role} process record on host {host} ({e})"))?;
    let pid: u32 = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unreadable record {}", file.display()))?;
    if !pid_alive(pid) {
        return Err(format!("the {role} process {pid} on host {host} is gone"));
    }
    let cmd = cmdline(pid);
    if !cmd.split(' ').any(|a| a == role) {
        return Err(format!(
            "pid {pid} on host {host} is not a vmatrix {role}: {cmd}"
        ));
    }
    Ok(pid)
}

/// Waits until `check` holds, polling every 50 ms, or `timeout` passes (then the last detail).
pub fn wait_for(
    what: &str,
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), RunnerError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if interrupted() {
            return Err(RunnerError::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(RunnerError::Timeout {
                what: what.to_string(),
                after: timeout,
                detail: last,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run's long-lived processes: the manager and an agent per host.
#[derive(Debug)]
pub struct Fleet {
    /// The `vmatrix` binary.
    pub vmatrix: PathBuf,
    /// The guest ELF.
    pub guest: PathBuf,
    /// Their files.
    pub paths: Paths,
    /// The hosts.
    pub cluster: Cluster,
    /// The manager's API address.
    pub api: SocketAddr,
    /// The manager, if it runs.
    pub manager: Option<Child>,
    /// Each host's agent, if it runs.
    pub agents: Vec<Option<Child>>,
}

impl Fleet {
    /// Starts (or restarts) the manager.
    pub fn start_manager(&mut self) -> Result<u32, RunnerError> {
        if let Some(c) = self.manager.as_mut() {
            if child_running(c) {
                return Ok(c.id());
            }
        }
        let c = spawn_manager(&self.vmatrix, &self.paths, &self.cluster, self.api)?;
        let pid = c.id();
        self.manager = Some(c);
        Ok(pid)
    }

    /// SIGKILLs the manager; returns its pid.
    pub fn kill_manager(&mut self) -> Option<u32> {
        let mut c = self.manager.take()?;
        let pid = c.id();
        kill_child(&mut c);
        Some(pid)
    }

    /// The manager's pid, if it runs.
    pub fn manager_pid(&mut self) -> Option<u32> {
        let c = self.manager.as_mut()?;
        child_running(c).then(|| c.id())
    }

    /// Starts (or restarts) host `h`'s agent.
    pub fn start_agent(&mut self, h: usize) -> Result<u32, RunnerError> {
        if let Some(c) = self.agents[h].as_mut() {
            if child_running(c) {
                return Ok(c.id());
            }
        }
        let c = spawn_agent(&self.vmatrix, &self.guest, &self.paths, &self.cluster, h)?;
        let pid = c.id();
        self.agents[h] = Some(c);
        Ok(pid)
    }

    /// Reaps host `h`'s agent after its host was killed (it is dead already, or killed now).
    pub fn forget_agent(&mut self, h: usize) {
        if let Some(mut c) = self.agents[h].take() {
            kill_child(&mut c);
        }
    }

    /// Which processes that should run do not (an exit nobody caused is worth a note).
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = self.manager.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                out.push(format!("manager exited ({st})"));
                self.manager = None;
            }
        }
        for h in 0..self.agents.len() {
            if let Some(c) = self.agents[h].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    out.push(format!(
                        "agent of host {} exited ({st})",
                        self.cluster.host_name(h)
                    ));
                    self.agents[h] = None;
                }
            }
        }
        out
    }

    /// Kills every process (SIGKILL) and reaps it.
    pub fn kill_all(&mut self) {
        for c in self.agents.iter_mut().filter_map(Option::take) {
            let mut c = c;
            kill_child(&mut c);
        }
        self.kill_manager();
    }
}
