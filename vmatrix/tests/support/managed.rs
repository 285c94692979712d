//! A managed cluster for failover tests: the hosts of [`Cluster`], a `vmatrix manager` in the
//! test's namespace on the replication network, and a `vmatrix agent` in every host, with
//! certificates for all of them. Every process is killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::cluster::Cluster;
use super::{guest_elf, vmatrix_bin};

/// Manager, agents and hosts.
pub struct Managed {
    /// The hosts.
    pub net: Cluster,
    /// Scratch directory (certs, state, logs).
    pub dir: PathBuf,
    manager: Option<Child>,
    agents: Vec<Option<Child>>,
    /// The manager's HTTP API.
    pub api: SocketAddr,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn vmatrix");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Managed {
    /// `hosts` hosts with an agent each, and the manager.
    pub fn start(dir: &Path, hosts: usize) -> Managed {
        let net = Cluster::up(hosts);
        let certs = dir.join("certs");
        run_ok(
            Command::new(vmatrix_bin())
                .arg("certs")
                .arg("init")
                .arg(&certs),
        );
        run_ok(
            Command::new(vmatrix_bin())
                .args(["certs", "issue"])
                .arg(&certs)
                .args(["--host", "manager", "--role", "manager"]),
        );
        for i in 0..hosts {
            run_ok(
                Command::new(vmatrix_bin())
                    .args(["certs", "issue"])
                    .arg(&certs)
                    .args(["--host", &net.host_name(i)])
                    .args(["--role", "agent", "--role", "primary", "--role", "backup"]),
            );
        }
        let mut m = Managed {
            net,
            dir: dir.to_path_buf(),
            manager: None,
            agents: (0..hosts).map(|_| None).collect(),
            api: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        m.start_manager();
        for i in 0..hosts {
            m.start_agent(i);
        }
        m.wait_hosts_up(hosts, Duration::from_secs(20));
        m
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap()
    }

    /// Starts (or restarts) the manager with the same state file.
    pub fn start_manager(&mut self) {
        let listen = format!("{}:7700", self.net.manager_ip());
        let child = Command::new(vmatrix_bin())
            .args(["--log", "info", "manager", "--listen", &listen])
            .arg("--api")
            .arg(self.api.to_string())
            .arg("--state")
            .arg(self.dir.join("manager.state"))
            .arg("--events")
            .arg(self.dir.join("events.jsonl"))
            .arg("--certs")
            .arg(self.dir.join("certs"))
            .args(["--host", "manager"])
            .stdout(Stdio::null())
            .stderr(self.log("manager.log"))
            .spawn()
            .expect("spawn the manager");
        self.manager = Some(child);
    }

    /// Kills the manager (SIGKILL).
    pub fn kill_manager(&mut self) {
        if let Some(mut c) = self.manager.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts host `i`'s agent.
    pub fn start_agent(&mut self, i: usize) {
        let host = self.net.host_name(i);
        let state = self.dir.join(format!("host-{host}"));
        let child = self
            .net
            .command(i, vmatrix_bin())
            .args(["--log", "info", "agent", "--manager"])
            .arg(format!("{}:7700", self.net.manager_ip()))
            .arg("--certs")
            .arg(self.dir.join("certs"))
            .args([
                "--host",
                &host,
                "--repl-ip",
                &self.net.repl_ip(i).to_string(),
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--guest")
            .arg(guest_elf())
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent-{host}.log")))
            .spawn()
            .expect("spawn an agent");
        self.agents[i] = Some(child);
    }

    /// Kills host `i`'s agent only (SIGKILL); its VM processes go on.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Crashes host `i`: links down, every process in it SIGKILLed.
    pub fn crash_host(&mut self, i: usize) {
        self.net.kill(i);
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `vmatrix <args>` against the manager.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(vmatrix_bin())
            .args(args)
            .env("VMATRIX_MANAGER", self.api.to_string())
            .output()
            .expect("spawn the CLI")
    }

    /// `vmatrix vm show <name>` as JSON (None if it fails).
    pub fn vm(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.cli(&["vm", "show", name]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `check` holds for the VM's JSON view; returns it.
    pub fn wait_vm(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.vm(name);
            if let Some(v) = v.as_ref().filter(|v| check(v)) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{name}: not {what} within {timeout:?}; last view {v:?}\nevents:\n{}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `n` hosts are up.
    pub fn wait_hosts_up(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.cli(&["host", "list"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.lines().filter(|l| l.contains(" up")).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "hosts not up: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The event log as the CLI prints it.
    pub fn events(&self) -> String {
        String::from_utf8_lossy(&self.cli(&["events"]).stdout).into_owned()
    }

    /// Index of host `name`.
    pub fn host_index(&self, name: &str) -> usize {
        (0..self.net.hosts)
            .find(|&i| self.net.host_name(i) == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_manager();
        if std::thread::panicking() {
            for f in ["manager.log", "agent-a.log", "agent-b.log", "agent-c.log"] {
                if let Ok(t) = std::fs::read_to_string(self.dir.join(f)) {
                    let tail: Vec<&str> = t.lines().rev().take(30).collect();
                    eprintln!("--- {f} (last lines) ---");
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        // The cluster's drop kills whatever still runs in its namespaces.
    }
}
