//! A managed cluster for failover tests: the hosts of [`Cluster`], a `vmatrix manager` in the
//! test's namespace on the replication network, and a `vmatrix agent` in every host, with
//! certificates for all of them. Every process is killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::cluster::Cluster;
use super::{guest_elf, vmatrix_bin};

/// The hosts of a VM's backups in its JSON view.
pub fn backups_of(v: &serde_json::Value) -> Vec<String> {
    v["backups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["host"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

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
    /// Extra flags of every `vmatrix manager` it starts (e.g. `--detect-ms`).
    manager_flags: Vec<String>,
    /// The agents' cgroups, removed after everything else.
    _cgroups: super::cgroups::Cleanup,
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
        Self::start_with(dir, hosts, &[])
    }

    /// The same, with extra flags for the manager (kept for its restarts), e.g.
    /// `["--detect-ms", "300"]`.
    pub fn start_with(dir: &Path, hosts: usize, manager_flags: &[&str]) -> Managed {
        let net = Cluster::up(hosts);
        let index = net.index;
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
            manager_flags: manager_flags.iter().map(|f| f.to_string()).collect(),
            _cgroups: super::cgroups::Cleanup(format!("vmx-t{}-{}-", std::process::id(), index)),
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
            .args(&self.manager_flags)
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
        self.start_agent_with(i, &[]);
    }

    /// Starts host `i`'s agent with extra flags (e.g. its `--crash-at` test hook).
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) {
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
            .arg("--cgroup-name")
            .arg(super::cgroups::group_name(self.net.index, &host))
            .args(extra)
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

    /// Creates VM "web" (64 MiB, 16 MiB disk, port 7100) with `backups` backups and waits until
    /// it is protected; returns its view.
    pub fn create_protected(&self, backups: u8) -> serde_json::Value {
        let cfg = self.net.guest_config();
        let n = backups.to_string();
        let out = self.cli(&[
            "vm",
            "create",
            "web",
            "--mem-mib",
            "64",
            "--disk-mib",
            "16",
            "--guest-config",
            &cfg,
            "--backups",
            &n,
            "--port",
            "7100",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "create: {err}");
        self.wait_vm("web", "protected", Duration::from_secs(60), |v| {
            v["status"] == "protected"
        })
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

    /// The address of clone `i` of "web" (slot i: 10.77.<index>.(10 + i), port 7000).
    pub fn clone_addr(&self, i: u32) -> SocketAddr {
        format!("10.77.{}.{}:7000", self.net.index, 10 + i)
            .parse()
            .unwrap()
    }

    /// `vmatrix vm scale web --clones n --ip 10.77.<index>.10/24`; panics unless it succeeds.
    pub fn scale(&self, n: u32) {
        let ip = format!("10.77.{}.10/24", self.net.index);
        let out = self.cli(&[
            "vm",
            "scale",
            "web",
            "--clones",
            &n.to_string(),
            "--ip",
            &ip,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "scale: {err}");
    }

    /// (host, state) of every clone in a VM's JSON view.
    pub fn clone_states(v: &serde_json::Value) -> Vec<(String, String)> {
        v["clones"]["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                        (s("host"), s("state"))
                    })
                    .collect()
            })
            .unwrap_or_default()
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

/// An nftables table in a host's namespace (or the test's own), deleted on drop (the fault
/// heals).
pub struct Nft {
    ns: Option<String>,
    family: &'static str,
    table: String,
}

impl Nft {
    /// Installs `table <family> <table> { <body> }` in `ns` (None: the test's namespace).
    pub fn install(ns: Option<&str>, family: &'static str, table: &str, body: &str) -> Nft {
        let script = format!("table {family} {table} {{\n{body}\n}}\n");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft", "-f", "-"]);
                c
            }
            None => {
                let mut c = Command::new("nft");
                c.args(["-f", "-"]);
                c
            }
        };
        let mut c = cmd
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft (apt-get install nftables)");
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "nft refused:\n{script}");
        Nft {
            ns: ns.map(str::to_string),
            family,
            table: table.to_string(),
        }
    }

    fn nft(&self) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }

    /// The sum of the packets of every `counter` in the table.
    pub fn packets(&self) -> u64 {
        let out = self
            .nft()
            .args(["list", "table", self.family, &self.table])
            .output()
            .expect("nft list");
        assert!(out.status.success(), "nft list table {}", self.table);
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(3)
            .filter(|w| w[0] == "counter" && w[1] == "packets")
            .map(|w| w[2].parse::<u64>().unwrap_or(0))
            .sum()
    }

    /// Removes the table.
    pub fn heal(self) {}
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = self
            .nft()
            .args(["delete", "table", self.family, &self.table])
            .status();
    }
}

#[path = "kv_writer.rs"]
mod kv_writer;
// (Not every test binary that uses this module writes with it.)
#[allow(unused_imports)]
pub use kv_writer::KvWriter;

/// `vmatrix <role>` processes of this test's binary running in a namespace.
fn vm_pids(ns: &str, role: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // vmatrix [--log <level>] <role> ...
            let sub = args
                .iter()
                .skip(1)
                .scan(false, |skip, a| {
                    let this = if *skip { None } else { Some(a) };
                    *skip = a == "--log";
                    Some(this)
                })
                .flatten()
                .find(|a| !a.starts_with('-'));
            // (A standby clone — `clone-vm --standby`, idle, isolated — is role "standby" while
            // its control socket has its standby name; once it took a clone's identity, the
            // agent renamed the socket and it is a "clone-vm".)
            let control = args
                .iter()
                .skip_while(|a| *a != "--control")
                .nth(1)
                .map(std::path::Path::new);
            let standby =
                args.iter().any(|a| a == "--standby") && control.is_some_and(|c| c.exists());
            let sub = match (sub, standby) {
                (Some(s), true) if s == "clone-vm" => Some("standby"),
                (s, _) => s.map(String::as_str),
            };
            args.first()
                .is_some_and(|a| a.ends_with("vmatrix") || a == &vmatrix_bin().to_string_lossy())
                && sub == Some(role)
        })
        .collect()
}

impl Managed {
    /// Name of the test namespace's end of host `i`'s replication veth (a port of the
    /// replication bridge).
    fn repl_port(&self, i: usize) -> String {
        format!("{}{}r", self.net.name, self.net.host_name(i))
    }

    /// Cuts only the traffic between the manager and host `i` (both ways; the host still
    /// reaches every other host): the replication bridge drops what host `i`'s port sends to
    /// the manager's address and what the manager sends out of that port.
    pub fn cut_manager_from(&self, i: usize) -> Nft {
        let port = self.repl_port(i);
        Nft::install(
            None,
            "bridge",
            &format!("vmxmcut_{port}"),
            &format!(
                "  chain cut_input {{\n    type filter hook input priority 0; policy accept;\n    iifname \"{port}\" drop\n  }}\n  chain cut_output {{\n    type filter hook output priority 0; policy accept;\n    oifname \"{port}\" drop\n  }}"
            ),
        )
    }

    /// Isolates host `i` from the replication (and management) network: its port on the
    /// replication bridge passes nothing either way. Its LAN link stays up.
    pub fn isolate_replication(&self, i: usize) -> Nft {
        let port = self.repl_port(i);
        Nft::install(
            None,
            "bridge",
            &format!("vmxiso_{port}"),
            &format!(
                "  chain cut_forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"{port}\" drop\n    oifname \"{port}\" drop\n  }}\n  chain cut_input {{\n    type filter hook input priority 0; policy accept;\n    iifname \"{port}\" drop\n  }}\n  chain cut_output {{\n    type filter hook output priority 0; policy accept;\n    oifname \"{port}\" drop\n  }}"
            ),
        )
    }

    /// Counts (with an nftables counter in host `i`'s namespace) every frame the guest's tap
    /// sends through the host's bridge, i.e. what leaves the host towards the clients' LAN.
    pub fn count_guest_frames(&self, i: usize) -> Nft {
        Nft::install(
            Some(&self.net.ns(i)),
            "bridge",
            "vmxguestout",
            "  chain count_forward {\n    type filter hook forward priority 0; policy accept;\n    iifname \"tap0\" counter\n  }",
        )
    }

    /// Frames the VM process wrote into host `i`'s tap (its RX counter).
    pub fn tap_frames(&self, i: usize) -> u64 {
        let out = self
            .net
            .command(i, "cat")
            .arg("/sys/class/net/tap0/statistics/rx_packets")
            .output()
            .expect("read tap0 statistics");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("tap0 rx_packets on host {i}: {out:?}"))
    }

    /// Pids of the `vmatrix primary` (`role` "primary") or `vmatrix backup` processes on host
    /// `i`.
    pub fn vm_pids(&self, i: usize, role: &str) -> Vec<u32> {
        vm_pids(&self.net.ns(i), role)
    }

    /// SIGKILLs host `i`'s `vmatrix <role>` process (only that one: the host and its agent stay
    /// up); returns its pid.
    pub fn kill_vm_process(&self, i: usize, role: &str) -> u32 {
        self.signal_vm_process(i, role, "-9")
    }

    /// Sends `signal` (`-9`, `-STOP`, ...) to host `i`'s `vmatrix <role>` process (only that
    /// one); returns its pid.
    pub fn signal_vm_process(&self, i: usize, role: &str, signal: &str) -> u32 {
        let pids = self.vm_pids(i, role);
        assert_eq!(
            pids.len(),
            1,
            "vmatrix {role} processes on host {i}: {pids:?}"
        );
        let st = Command::new("kill")
            .args([signal, &pids[0].to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {signal} {}", pids[0]);
        pids[0]
    }

    /// Waits until host `i` runs no `vmatrix <role>` process.
    /// Waits until host `i` runs a `vmatrix <role>` process (a standby: one whose control
    /// socket is up, so it is built); returns their pids.
    pub fn wait_vm_process(&self, i: usize, role: &str, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.vm_pids(i, role);
            if !pids.is_empty() {
                return pids;
            }
            assert!(
                Instant::now() < deadline,
                "host {i} runs no vmatrix {role} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until host `i` runs no `vmatrix <role>` process.
    pub fn wait_no_vm_process(&self, i: usize, role: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.vm_pids(i, role);
            if pids.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "host {i} still runs vmatrix {role} ({pids:?}) after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A file of host `i`'s agent state directory (`<vm>/primary.log`, `<vm>/backup.sock`, ...).
    pub fn host_file(&self, i: usize, rel: &str) -> PathBuf {
        self.dir
            .join(format!("host-{}", self.net.host_name(i)))
            .join(rel)
    }

    /// Waits until the backup of "web" on host `name` says that the primary's data
    /// connection (to the port after the VM's, `VmSpec::data_port`) joined its session.
    pub fn wait_data_connection(&self, name: &str, timeout: Duration) {
        let log = self.host_file(self.host_index(name), "web/backup.log");
        let t = std::time::Instant::now();
        while !self
            .text(&log)
            .contains("data connection 1 joined the session")
        {
            assert!(
                t.elapsed() < timeout,
                "no data connection joined the backup on {name}:
{}",
                self.text(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A file of the test's directory as text (empty if missing): `agent-a.log`, ...
    pub fn text(&self, path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Host `i`'s agent log.
    pub fn agent_log(&self, i: usize) -> String {
        self.text(
            &self
                .dir
                .join(format!("agent-{}.log", self.net.host_name(i))),
        )
    }

    /// Every event of the events file (one JSON object each), oldest first.
    pub fn event_log(&self) -> Vec<serde_json::Value> {
        self.text(&self.dir.join("events.jsonl"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events of `kind` (e.g. "detected") in the events file.
    pub fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.event_log()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Whether the manager's process still runs.
    pub fn manager_running(&mut self) -> bool {
        self.manager
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}
