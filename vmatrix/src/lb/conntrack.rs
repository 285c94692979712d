//! The kernel's connection table (`/proc/net/nf_conntrack` of the load balancer's namespace),
//! read for the per-server connection counts IPVS would report as `ActiveConn`/`InActConn`.
//!
//! A connection to the service is one whose **original** direction goes to the VIP and port;
//! its server is the **reply** direction's source (after DNAT). Active: the handshake or the
//! established state (`SYN_SENT`, `SYN_RECV`, `ESTABLISHED`), as IPVS counts an established
//! connection active; inactive: every closing state (`FIN_WAIT`, `CLOSE_WAIT`, `LAST_ACK`,
//! `TIME_WAIT`, `CLOSE`).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

/// Connections of one server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Conns {
    pub active: u32,
    pub inactive: u32,
    /// Not yet done: active, or half closed with data still able to flow (`FIN_WAIT`,
    /// `CLOSE_WAIT`, `LAST_ACK`: a client that shut its side down may still be receiving the
    /// answer). A drain waits for these, not only for the active ones.
    pub open: u32,
}

/// One parsed line: (state, original destination, reply source).
fn parse_line(line: &str) -> Option<(&str, SocketAddrV4, SocketAddrV4)> {
    let mut words = line.split_whitespace();
    // "ipv4 2 tcp 6 <timeout> <STATE> src=.. dst=.. sport=.. dport=.. [..] src=.. dst=.. ..."
    if words.next()? != "ipv4" {
        return None;
    }
    let rest: Vec<&str> = words.collect();
    if rest.get(1) != Some(&"tcp") {
        return None;
    }
    let state = rest.get(4).copied().filter(|s| !s.contains('='))?;
    let mut dirs = [(None, None), (None, None)]; // (addr, port) of original dst, reply src
    let (mut seen_src, mut seen_sport) = (0, 0);
    for w in &rest[5..] {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "src" => {
                if seen_src == 1 {
                    dirs[1].0 = v.parse().ok();
                }
                seen_src += 1;
            }
            "dst" if seen_src == 1 => dirs[0].0 = v.parse().ok(),
            "sport" => {
                if seen_sport == 1 {
                    dirs[1].1 = v.parse().ok();
                }
                seen_sport += 1;
            }
            "dport" if seen_sport == 1 => dirs[0].1 = v.parse().ok(),
            _ => {}
        }
    }
    let orig = SocketAddrV4::new(dirs[0].0?, dirs[0].1?);
    let reply = SocketAddrV4::new(dirs[1].0?, dirs[1].1?);
    Some((state, orig, reply))
}

/// Counts the connections to `vip` per server (the reply source), from the text of
/// `/proc/net/nf_conntrack`. Lines of other services and unparsable lines are skipped.
pub fn count(table: &str, vip: SocketAddrV4) -> BTreeMap<SocketAddrV4, Conns> {
    let mut out: BTreeMap<SocketAddrV4, Conns> = BTreeMap::new();
    for (state, orig, server) in table.lines().filter_map(parse_line) {
        if orig != vip {
            continue;
        }
        let c = out.entry(server).or_default();
        match state {
            "ESTABLISHED" | "SYN_SENT" | "SYN_RECV" => c.active += 1,
            _ => c.inactive += 1,
        }
        if matches!(
            state,
            "ESTABLISHED" | "SYN_SENT" | "SYN_RECV" | "FIN_WAIT" | "CLOSE_WAIT" | "LAST_ACK"
        ) {
            c.open += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.5.1 dst=10.77.5.100 sport=40000 dport=7000 src=10.77.5.10 dst=10.77.5.4 sport=7000 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 118 TIME_WAIT src=10.77.5.1 dst=10.77.5.100 sport=40001 dport=7000 src=10.77.5.10 dst=10.77.5.4 sport=7000 dport=40001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 58 SYN_RECV src=10.77.5.1 dst=10.77.5.100 sport=40002 dport=7000 src=10.77.5.2 dst=10.77.5.4 sport=7000 dport=40002 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.5.1 dst=10.77.5.9 sport=40003 dport=7000 src=10.77.5.9 dst=10.77.5.1 sport=7000 dport=40003 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.77.5.1 dst=10.77.5.100 sport=53 dport=7000 [UNREPLIED] src=10.77.5.100 dst=10.77.5.1 sport=7000 dport=53 mark=0 zone=0 use=2
garbage line
ipv4 2 tcp 6 1 ESTABLISHED src=x dst=10.77.5.100 sport=1 dport=7000 src=10.77.5.11 dst=y sport=7000
";

    #[test]
    fn counts_per_server_of_the_vip_only() {
        let vip: SocketAddrV4 = "10.77.5.100:7000".parse().unwrap();
        let c = count(TABLE, vip);
        let s10: SocketAddrV4 = "10.77.5.10:7000".parse().unwrap();
        let s2: SocketAddrV4 = "10.77.5.2:7000".parse().unwrap();
        let s11: SocketAddrV4 = "10.77.5.11:7000".parse().unwrap();
        assert_eq!(
            c[&s10],
            Conns {
                active: 1,
                inactive: 1,
                open: 1
            }
        );
        assert_eq!(
            c[&s2],
            Conns {
                active: 1,
                inactive: 0,
                open: 1
            }
        );
        // Malformed addresses elsewhere in the line do not matter: only the tuple's parts
        // we use must parse.
        assert_eq!(c[&s11].active, 1);
        assert_eq!(c.len(), 3, "{c:?}");
    }

    /// A half-closed connection (the client shut its side, the answer may still flow) is not
    /// active but still open: a drain waits for it; TIME_WAIT is done.
    #[test]
    fn half_closed_connections_are_open_until_done() {
        let vip: SocketAddrV4 = "10.77.5.100:7000".parse().unwrap();
        let line = |state: &str, port: u16| {
            format!(
                "ipv4 2 tcp 6 60 {state} src=10.77.5.1 dst=10.77.5.100 sport={port} dport=7000 \
                 src=10.77.5.10 dst=10.77.5.4 sport=7000 dport={port} [ASSURED] mark=0 use=2\n"
            )
        };
        let table: String = [
            line("FIN_WAIT", 1),
            line("CLOSE_WAIT", 2),
            line("LAST_ACK", 3),
            line("TIME_WAIT", 4),
            line("CLOSE", 5),
        ]
        .concat();
        let s10: SocketAddrV4 = "10.77.5.10:7000".parse().unwrap();
        let c = count(&table, vip)[&s10];
        assert_eq!((c.active, c.inactive, c.open), (0, 5, 3), "{c:?}");
    }

    #[test]
    fn other_ports_and_empty_tables_count_nothing() {
        let vip: SocketAddrV4 = "10.77.5.100:7001".parse().unwrap();
        assert!(count(TABLE, vip).is_empty());
        assert!(count("", vip).is_empty());
    }
}
