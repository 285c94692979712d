//! The run's hosts: network namespaces built by `scripts/cluster.sh` (embedded in the binary and
//! run with bash), on a replication/management network and a clients' LAN.
//!
//! A cluster is named `vxc<index>` (hosts `vxc<index>a`, `vxc<index>b`, ...), which no test or
//! script uses (tests use `vmc<i>`, `vmxt<i>`, `vmxh<i>`; the demo `vmxd`; the benchmarks
//! `vmxb`, `vmxbench<i>`). The index (third octet of 10.77.<i>.0/24 and 10.78.<i>.0/24) is
//! claimed with the same lock files as the tests' networks (`vmatrix-test-net-<i>.lock` in the
//! temporary directory, `O_EXCL`), preferring 200..=239 (the demo takes 1, `bench-failover`
//! 240, `bench-resync` 50..59), and skipped if an interface already holds one of its subnets.
//! The tests treat a lock older than 10 minutes as stale, so the runner touches its lock while
//! it runs ([`Cluster::touch_lock`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::RunnerError;

/// `scripts/cluster.sh`, as built into this binary.
const CLUSTER_SH: &str = include_str!("../../../scripts/cluster.sh");
/// `scripts/net-lib.sh`, which `cluster.sh` sources.
const NET_LIB_SH: &str = include_str!("../../../scripts/net-lib.sh");

/// Prefix of every chaos cluster's name.
pub const NAME_PREFIX: &str = "vxc";

/// The most hosts `cluster.sh` builds.
pub const MAX_HOSTS: usize = 5;

/// Writes the embedded scripts into `dir` (atomically: several runners may do it at once) and
/// returns the path of `cluster.sh`.
pub fn install_scripts(dir: &Path) -> Result<PathBuf, RunnerError> {
    std::fs::create_dir_all(dir).map_err(RunnerError::io(dir))?;
    for (name, text) in [("cluster.sh", CLUSTER_SH), ("net-lib.sh", NET_LIB_SH)] {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).map_err(RunnerError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(RunnerError::io(&path))?;
    }
    Ok(dir.join("cluster.sh"))
}

/// Runs `bash <script> <args>`, returning its stderr on failure.
pub fn run_script(script: &Path, args: &[&str]) -> Result<(), RunnerError> {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .map_err(RunnerError::spawn("bash cluster.sh"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(RunnerError::Command {
        what: format!("cluster.sh {}", args.join(" ")),
        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn lock_path(index: u32) -> PathBuf {
    std::env::temp_dir().join(format!("vmatrix-test-net-{index}.lock"))
}

/// Whether an interface of this namespace holds an address in 10.77.<index>.0/24 or
/// 10.78.<index>.0/24.
fn subnet_in_use(index: u32) -> bool {
    let Ok(out) = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let (a, b) = (format!(" 10.77.{index}."), format!(" 10.78.{index}."));
    text.lines().any(|l| l.contains(&a) || l.contains(&b))
}

/// Claims a free network index; returns it and its lock file.
pub fn claim_index() -> Result<(u32, PathBuf), RunnerError> {
    let order = (200..=239).chain(2..200).chain(241..=250);
    for index in order {
        let p = lock_path(index);
        let stale = std::fs::metadata(&p)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if stale {
            let _ = std::fs::remove_file(&p);
        }
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p);
        if created.is_err() {
            continue;
        }
        if subnet_in_use(index) {
            // Keep the lock: nobody should take an index whose subnet is somebody's.
            continue;
        }
        return Ok((index, p));
    }
    Err(RunnerError::NoFreeIndex)
}

/// The hosts of one run; [`Cluster::down`] removes them (the run's guard calls it).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `vxc<index>`.
    pub name: String,
    /// The third octet of its subnets.
    pub index: u32,
    /// Number of hosts.
    pub hosts: usize,
    /// The claimed index's lock file.
    pub lock: PathBuf,
    /// The installed `cluster.sh`.
    pub script: PathBuf,
}

impl Cluster {
    /// The cluster's name for an index.
    pub fn name_for(index: u32) -> String {
        format!("{NAME_PREFIX}{index}")
    }

    /// Builds the hosts (`cluster.sh up`).
    pub fn up(&self) -> Result<(), RunnerError> {
        run_script(
            &self.script,
            &[
                "up",
                &self.name,
                &self.index.to_string(),
                &self.hosts.to_string(),
            ],
        )
    }

    /// Removes the hosts: every process in them is SIGKILLed, namespaces and links deleted.
    pub fn down(&self) -> Result<(), RunnerError> {
        run_script(&self.script, &["down", &self.name])
    }

    /// Crashes host `h`: links down, every process in it SIGKILLed.
    pub fn kill(&self, h: usize) -> Result<(), RunnerError> {
        run_script(&self.script, &["kill", &self.name, &letter(h)])
    }

    /// Plugs host `h` back in (links up).
    pub fn revive(&self, h: usize) -> Result<(), RunnerError> {
        run_script(&self.script, &["revive", &self.name, &letter(h)])
    }

    /// Keeps the index's lock fresh (tests delete locks older than 10 minutes).
    pub fn touch_lock(&self) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.lock) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Releases the index.
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.lock);
    }

    /// Host `h`'s name ("a", "b", ...), as its certificate and the manager call it.
    pub fn host_name(&self, h: usize) -> String {
        letter(h)
    }

    /// The index of the host named `name`.
    pub fn host_index(&self, name: &str) -> Option<usize> {
        (0..self.hosts).find(|&h| letter(h) == name)
    }

    /// Host `h`'s network namespace.
    pub fn ns(&self, h: usize) -> String {
        format!("{}{}", self.name, letter(h))
    }

    /// The caller's end of host `h`'s LAN veth (a port of the LAN bridge).
    pub fn lan_port(&self, h: usize) -> String {
        format!("{}{}l", self.name, letter(h))
    }

    /// Host `h`'s replication address.
    pub fn repl_ip(&self, h: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.index as u8, h as u8 + 1)
    }

    /// The manager's address on the replication network.
    pub fn manager_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.index as u8, 254)
    }

    /// Where agents reach the manager (QUIC).
    pub fn manager_listen(&self) -> SocketAddr {
        SocketAddr::from((self.manager_ip(), 7700))
    }

    /// The guest's KV service.
    pub fn guest_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 77, self.index as u8, 2), 7000))
    }

    /// The guest's `--guest-config`.
    pub fn guest_config(&self) -> String {
        format!("ip=10.77.{0}.2/24,gw=10.77.{0}.1,port=7000", self.index)
    }

    /// The LAN bridge (in the caller's namespace).
    pub fn lan_bridge(&self) -> String {
        format!("{}lan", self.name)
    }

    /// A command run in host `h`'s namespace.
    pub fn command(&self, h: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(h)]).arg(program);
        c
    }

    /// The pids of every process in host `h`'s namespace.
    pub fn pids(&self, h: usize) -> Vec<u32> {
        ns_pids(&self.ns(h))
    }
}

/// The pids of every process in namespace `ns`.
pub fn ns_pids(ns: &str) -> Vec<u32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Host letter of index `h`.
fn letter(h: usize) -> String {
    ((b'a' + h as u8) as char).to_string()
}

/// Every network namespace whose name starts with [`NAME_PREFIX`] followed by digits and a host
/// letter, grouped by cluster name.
pub fn chaos_namespaces() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|ns| {
            let rest = ns.strip_prefix(NAME_PREFIX)?;
            let (digits, host) = rest.split_at(rest.len().checked_sub(1)?);
            let ok = !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && matches!(host, "a" | "b" | "c" | "d" | "e");
            ok.then(|| format!("{NAME_PREFIX}{digits}"))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
