//! nftables tables for network faults, one table per fault (or per swizzled link), so a heal
//! deletes exactly what its fault added. Tables live inside the hosts' namespaces (family
//! `inet`, hooks `input` and `output`, matching on the replication interface `rep0` and the
//! peers' replication addresses) and are named `vxchaos_<event>_<part>`; the final heal deletes
//! every table with that prefix in every host, whatever happened before.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::cluster::Cluster;

/// Prefix of every fault table.
pub const TABLE_PREFIX: &str = "vxchaos_";

/// A rule's direction relative to the host whose namespace holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Packets the host sends.
    Out,
    /// Packets the host receives.
    In,
}

/// One drop rule: on `rep0`, to (out) or from (in) `peer` (every peer if `None`), with
/// probability `permille`/1000 (always if `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drop {
    /// Direction.
    pub dir: Dir,
    /// The peer's replication address (or the manager's).
    pub peer: Option<Ipv4Addr>,
    /// Random loss instead of a full cut.
    pub permille: Option<u16>,
}

impl Drop {
    /// Every packet to/from `peer`, both directions.
    pub fn both(peer: Option<Ipv4Addr>) -> [Drop; 2] {
        [
            Drop {
                dir: Dir::Out,
                peer,
                permille: None,
            },
            Drop {
                dir: Dir::In,
                peer,
                permille: None,
            },
        ]
    }

    fn rule(&self) -> String {
        let mut r = match self.dir {
            Dir::Out => String::from("oifname \"rep0\""),
            Dir::In => String::from("iifname \"rep0\""),
        };
        if let Some(ip) = self.peer {
            let field = match self.dir {
                Dir::Out => "daddr",
                Dir::In => "saddr",
            };
            r.push_str(&format!(" ip {field} {ip}"));
        }
        if let Some(p) = self.permille {
            r.push_str(&format!(" numgen random mod 1000 < {p}"));
        }
        r.push_str(" counter drop");
        r
    }
}

/// A fault's table in host `host`'s namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The host (index).
    pub host: usize,
    /// The table's name.
    pub name: String,
}

fn nft(cluster: &Cluster, host: usize) -> Command {
    let mut c = cluster.command(host, "nft");
    c.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Installs table `name` with `drops` in host `host`'s namespace (replacing one of that name).
pub fn install(
    cluster: &Cluster,
    host: usize,
    name: &str,
    drops: &[Drop],
) -> Result<Table, String> {
    let (mut input, mut output) = (String::new(), String::new());
    for d in drops {
        let line = format!("    {}\n", d.rule());
        match d.dir {
            Dir::In => input.push_str(&line),
            Dir::Out => output.push_str(&line),
        }
    }
    let script = format!(
        "table inet {name} {{}}\ndelete table inet {name}\ntable inet {name} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority -10; policy accept;\n{output}  }}\n}}\n"
    );
    run_nft(cluster, host, &["-f", "-"], Some(&script))?;
    Ok(Table {
        host,
        name: name.to_string(),
    })
}

/// Deletes a fault's table (healing it). A host whose namespace is gone has nothing to delete.
pub fn remove(cluster: &Cluster, t: &Table) -> Result<(), String> {
    run_nft(cluster, t.host, &["delete", "table", "inet", &t.name], None)
}

fn run_nft(
    cluster: &Cluster,
    host: usize,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(), String> {
    let mut child = nft(cluster, host)
        .args(args)
        .spawn()
        .map_err(|e| format!("nft: {e} (apt-get install nftables)"))?;
    if let Some(text) = stdin {
        if let Some(mut s) = child.stdin.take() {
            s.write_all(text.as_bytes())
                .map_err(|e| format!("nft stdin: {e}"))?;
        }
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "nft {} in {}: {}",
        args.join(" "),
        cluster.ns(host),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Deletes every fault table (and link-proxy route) in every host (the final heal); returns
/// what it deleted.
pub fn remove_all(cluster: &Cluster) -> Vec<String> {
    let mut removed = Vec::new();
    for h in 0..cluster.hosts {
        let Ok(out) = cluster.command(h, "nft").args(["list", "tables"]).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, name] = words[..] {
                if name.starts_with(TABLE_PREFIX)
                    || name.starts_with(crate::netem::route::TABLE_PREFIX)
                {
                    let _ = run_nft(cluster, h, &["delete", "table", family, name], None);
                    removed.push(format!("{}:{name}", cluster.host_name(h)));
                }
            }
        }
    }
    removed
}

/// The capture table in the runner's namespace: every frame entering the LAN bridge from a
/// host's port is logged to nflog `group` with the host's name as prefix (see
/// [`super::capture`]).
pub fn capture_table_name(cluster: &Cluster) -> String {
    format!("{}cap", cluster.name)
}

/// Installs the capture table.
pub fn install_capture(cluster: &Cluster, group: u16) -> Result<(), String> {
    let name = capture_table_name(cluster);
    let mut rules = String::new();
    for h in 0..cluster.hosts {
        rules.push_str(&format!(
            "    iifname \"{}\" counter log prefix \"{}\" group {group} snaplen 64\n",
            cluster.lan_port(h),
            cluster.host_name(h)
        ));
    }
    let script = format!(
        "table bridge {name} {{}}\ndelete table bridge {name}\ntable bridge {name} {{\n  chain pre {{\n    type filter hook prerouting priority -300; policy accept;\n{rules}  }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(script.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft capture table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The packets counted by the capture table's rules (all hosts), to compare with what the
/// capture file holds.
pub fn capture_counted(cluster: &Cluster) -> Option<u64> {
    let out = Command::new("nft")
        .args(["list", "table", "bridge", &capture_table_name(cluster)])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    Some(
        words
            .windows(3)
            .filter(|w| w[0] == "counter" && w[1] == "packets")
            .filter_map(|w| w[2].parse::<u64>().ok())
            .sum(),
    )
}

/// Deletes a table of the runner's namespace (`family name`), ignoring a missing one.
pub fn remove_caller_table(family: &str, name: &str) {
    let _ = Command::new("nft")
        .args(["delete", "table", family, name])
        .stderr(Stdio::null())
        .status();
}
