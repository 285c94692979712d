//! A cluster of hosts for failover tests (`scripts/cluster.sh`): network namespaces `<name>a`,
//! `<name>b`, ... each with a tap for a guest on a bridge to the clients' LAN, all on one
//! replication/management network whose bridge (in the test's namespace) is where the manager
//! listens. Hosts can be crashed (links cut, processes SIGKILLed) and revived.
//!
//! Addresses, for the index the cluster claimed:
//! - clients' LAN: gateway 10.77.<index>.1 (the test's namespace), guest 10.77.<index>.2
//! - replication: host i (a = 0, b = 1, ...) 10.78.<index>.<i + 1>, manager 10.78.<index>.254

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use super::{claim_index, release_index, root};

/// The most hosts `scripts/cluster.sh` builds.
pub const MAX_HOSTS: usize = 5;

/// Hosts on a shared replication network and a clients' LAN; removed on drop.
pub struct Cluster {
    /// Prefix of the namespaces and links (`vmc<index>`).
    pub name: String,
    /// Third octet of the cluster's subnets (10.77.<index>.0/24, 10.78.<index>.0/24).
    pub index: u32,
    /// Number of hosts.
    pub hosts: usize,
}

impl Cluster {
    /// Creates `hosts` hosts (1..=5) with an index no other test network of this machine holds
    /// (the lock files `TestNet` uses).
    pub fn up(hosts: usize) -> Cluster {
        assert!(
            (1..=MAX_HOSTS).contains(&hosts),
            "a cluster has 1..={MAX_HOSTS} hosts, not {hosts}"
        );
        assert!(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing: the cluster's hosts need tap devices"
        );
        let index = claim_index();
        // Built before the script runs, so a failed `up` is still torn down (and the index
        // released) on drop.
        let c = Cluster {
            name: format!("vmc{index}"),
            index,
            hosts,
        };
        c.script(&["up", &c.name, &index.to_string(), &hosts.to_string()]);
        c
    }

    fn script(&self, args: &[&str]) {
        let st = Command::new(root().join("scripts/cluster.sh"))
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("run scripts/cluster.sh: {e}"));
        assert!(st.success(), "scripts/cluster.sh {} failed", args.join(" "));
    }

    fn check_host(&self, i: usize) {
        assert!(
            i < self.hosts,
            "host {i} out of range: cluster {} has {} hosts",
            self.name,
            self.hosts
        );
    }

    /// Letter of host `i`: "a", "b", ...
    pub fn host_name(&self, i: usize) -> String {
        self.check_host(i);
        ((b'a' + i as u8) as char).to_string()
    }

    /// Network namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}{}", self.name, self.host_name(i))
    }

    /// Address of host `i` on the replication network (10.78.<index>.<i + 1>).
    pub fn repl_ip(&self, i: usize) -> Ipv4Addr {
        self.check_host(i);
        Ipv4Addr::new(10, 78, self.index as u8, i as u8 + 1)
    }

    /// Where the manager listens (10.78.<index>.254, in the test's namespace).
    pub fn manager_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.index as u8, 254)
    }

    /// The clients' side of the LAN and the guest's gateway (10.77.<index>.1).
    pub fn lan_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index as u8, 1)
    }

    /// Guest address of the KV service, on whichever host runs it.
    pub fn guest_addr(&self) -> SocketAddr {
        format!("10.77.{}.2:7000", self.index).parse().unwrap()
    }

    /// The `--guest-config` string for a guest of this cluster.
    pub fn guest_config(&self) -> String {
        format!("ip=10.77.{0}.2/24,gw=10.77.{0}.1,port=7000", self.index)
    }

    /// `ip netns exec <ns of host i> <program>`: a command to run on host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Crashes host `i`: its LAN and replication links go down (both ends), then every process
    /// in its namespace is SIGKILLed; returns once they are gone.
    pub fn kill(&self, i: usize) {
        self.script(&["kill", &self.name, &self.host_name(i)]);
    }

    /// Plugs host `i` back in (links up); its processes stay dead.
    pub fn revive(&self, i: usize) {
        self.script(&["revive", &self.name, &self.host_name(i)]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/cluster.sh"))
            .args(["down", &self.name])
            .status();
        release_index(self.index);
    }
}
