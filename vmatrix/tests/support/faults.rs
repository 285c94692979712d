//! Link faults for the integration tests, made with nftables inside a test namespace (this
//! kernel has no netem): drop every packet of the replication link for a while (a blip), or
//! limit its rate (a slow link). The table is removed when the fault is dropped: the link heals.

use std::io::Write;
use std::process::{Command, Stdio};

/// An nftables table in a namespace that drops or throttles the UDP traffic of one port.
pub struct LinkFault {
    ns: String,
    table: String,
}

impl LinkFault {
    /// Drops every packet to and from these UDP ports inside `ns` (a replication link: the
    /// backup's port and its data ports).
    pub fn drop_ports(ns: &str, ports: &[u16]) -> LinkFault {
        let set = port_set(ports);
        Self::install(
            ns,
            "vmxblip",
            &format!("udp dport {{ {set} }} drop\n    udp sport {{ {set} }} drop"),
        )
    }

    /// Lets at most `kbytes_per_s` in all through to these UDP ports inside `ns` (the rest is
    /// dropped, as a policer does; QUIC's congestion control adapts).
    pub fn rate_limit(ns: &str, ports: &[u16], kbytes_per_s: u32) -> LinkFault {
        Self::install(
            ns,
            "vmxslow",
            &format!(
                "udp dport {{ {} }} limit rate over {kbytes_per_s} kbytes/second drop",
                port_set(ports)
            ),
        )
    }

    fn install(ns: &str, table: &str, rules: &str) -> LinkFault {
        let script = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    {rules}\n  }}\n}}\n"
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft (apt-get install nftables)");
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "nft refused:\n{script}");
        LinkFault {
            ns: ns.to_string(),
            table: table.to_string(),
        }
    }

    /// Removes the fault.
    pub fn heal(self) {}
}

/// `a, b, …` for an nftables anonymous set.
fn port_set(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Drop for LinkFault {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "delete",
                "table",
                "inet",
                &self.table,
            ])
            .status();
    }
}
