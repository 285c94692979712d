//! Putting a proxy in the path of real traffic: nftables rules in a host's network namespace
//! that send its UDP for one destination `host:port` to the proxy instead, and make the
//! proxy's answers look as if they came from that destination.
//!
//! Each route is its own table (`vmatrix_netem_<pid>_<n>`, family `ip`), created in one nft
//! transaction and removed whole, so removing one route never touches another rule:
//!
//! ```text
//! table ip vmatrix_netem_123_0 {
//!   chain untracked { type filter hook output priority raw;            # -300
//!     ip daddr D udp dport P notrack }
//!   chain to_proxy { type route hook output priority 10;              # after filter (0)
//!     ip daddr D udp dport P ip daddr set X udp dport set Y }
//!   chain from_proxy { type filter hook prerouting priority raw;      # -300
//!     ip saddr X udp sport Y notrack ip saddr set D udp sport set P }
//! }
//! ```
//!
//! **Stateless rewriting, not DNAT.** A `dnat` rule is decided once per conntrack entry: when
//! conntrack is already active in the namespace (any `ct` or NAT rule there, another route),
//! a flow that exists when the rule is added is never redirected, and one redirected when the
//! rule is removed keeps its binding and goes nowhere — measured on this kernel with a
//! running UDP flow. The rules above rewrite each datagram instead (`notrack` keeps conntrack
//! out of it), so a route takes effect on the next datagram and its removal too, whatever
//! else the namespace has. A `route` chain makes the kernel route the rewritten datagram again.
//!
//! **What other rules see.** The rewrite to the proxy happens after the `filter` priority (0)
//! of the output hook, and answers are rewritten back at `raw` (-300) of prerouting, so the
//! routed namespace's own filter rules (partitions) still see the real peer both ways: a rule
//! dropping the destination drops the proxied traffic too, and a rule dropping the proxy's
//! address (the manager's, on the cluster's replication network) does not. In the
//! destination's namespace, proxied datagrams come from the proxy's address: partition rules
//! there do not see the routed host.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The prefix of every route's table name.
pub const TABLE_PREFIX: &str = "vmatrix_netem_";

/// Errors of installing or removing a route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Only IPv4 (the replication network is IPv4).
    #[error("{0}: only IPv4 addresses can be routed")]
    NotIpv4(SocketAddr),
    /// A namespace or table name that is not a plain name.
    #[error("bad name {0:?}: letters, digits, '_', '-' and '.' only")]
    BadName(String),
    /// `ip netns exec … nft` could not be run.
    #[error("running nft in namespace {ns}: {source}")]
    Spawn {
        /// The namespace.
        ns: String,
        /// Why.
        source: std::io::Error,
    },
    /// nft refused.
    #[error("nft in namespace {ns} failed ({status}): {stderr}")]
    Nft {
        /// The namespace.
        ns: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// An installed route; removes its table when dropped (errors then are ignored: call
/// [`Route::remove`] to see them).
#[derive(Debug)]
pub struct Route {
    ns: String,
    table: String,
    dst: SocketAddrV4,
    proxy: SocketAddrV4,
    installed: bool,
}

impl Route {
    /// The namespace it is installed in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its nft table (family `ip`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The destination whose traffic it redirects.
    pub fn dst(&self) -> SocketAddrV4 {
        self.dst
    }

    /// The proxy it redirects to.
    pub fn proxy(&self) -> SocketAddrV4 {
        self.proxy
    }

    /// Removes its table: the direct path is back from the next datagram on.
    pub fn remove(mut self) -> Result<(), RouteError> {
        self.installed = false;
        remove_table(&self.ns, &self.table)
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        if self.installed {
            let _ = remove_table(&self.ns, &self.table);
        }
    }
}

fn v4(a: SocketAddr) -> Result<SocketAddrV4, RouteError> {
    match a {
        SocketAddr::V4(v) => Ok(v),
        SocketAddr::V6(_) => Err(RouteError::NotIpv4(a)),
    }
}

fn check_name(name: &str) -> Result<(), RouteError> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RouteError::BadName(name.to_string()))
    }
}

/// The nft script of a route (see the module's doc).
pub fn route_script(table: &str, dst: SocketAddrV4, proxy: SocketAddrV4) -> String {
    let (d, p) = (dst.ip(), dst.port());
    let (x, y) = (proxy.ip(), proxy.port());
    format!(
        "create table ip {table}\n\
         table ip {table} {{\n\
         \tchain untracked {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tip daddr {d} udp dport {p} notrack\n\
         \t}}\n\
         \tchain to_proxy {{\n\
         \t\ttype route hook output priority 10; policy accept;\n\
         \t\tip daddr {d} udp dport {p} ip daddr set {x} udp dport set {y}\n\
         \t}}\n\
         \tchain from_proxy {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tip saddr {x} udp sport {y} notrack ip saddr set {d} udp sport set {p}\n\
         \t}}\n\
         }}\n"
    )
}

/// Sends the UDP that namespace `ns` addresses to `dst` to `proxy` instead (a
/// [`super::Netem`]'s [`local_addr`](super::Netem::local_addr), reachable from `ns`), and
/// makes the proxy's answers come from `dst`. Returns the route; drop it or call
/// [`Route::remove`] to restore the direct path.
///
/// The proxy should forward to `dst` itself (`Netem::start(_, dst, …)`), from an address
/// whose traffic `ns`'s rules do not redirect.
pub fn route_through(ns: &str, dst: SocketAddr, proxy: SocketAddr) -> Result<Route, RouteError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    check_name(ns)?;
    let (dst, proxy) = (v4(dst)?, v4(proxy)?);
    let table = format!(
        "{TABLE_PREFIX}{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    nft(ns, &["-f", "-"], Some(&route_script(&table, dst, proxy)))?;
    Ok(Route {
        ns: ns.to_string(),
        table,
        dst,
        proxy,
        installed: true,
    })
}

/// Removes exactly the table `table` (family `ip`) of namespace `ns`: what
/// [`route_through`] installed, for a caller that kept only the names.
pub fn remove_table(ns: &str, table: &str) -> Result<(), RouteError> {
    check_name(ns)?;
    check_name(table)?;
    nft(ns, &["delete", "table", "ip", table], None).map(drop)
}

/// The `ip` tables of namespace `ns` (to check what is installed).
pub fn list_tables(ns: &str) -> Result<Vec<String>, RouteError> {
    check_name(ns)?;
    let out = nft(ns, &["list", "tables", "ip"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .map(str::to_string)
        .collect())
}

/// Runs `nft args` in namespace `ns` with `stdin`, returning its output.
fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RouteError> {
    let spawn_err = |source| RouteError::Spawn {
        ns: ns.to_string(),
        source,
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(RouteError::Nft {
            ns: ns.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_redirects_one_destination_and_rewrites_answers() {
        let s = route_script(
            "vmatrix_netem_1_0",
            "10.78.3.2:7001".parse().unwrap(),
            "10.78.3.254:40000".parse().unwrap(),
        );
        assert!(s.starts_with("create table ip vmatrix_netem_1_0\n"));
        assert!(s.contains(
            "ip daddr 10.78.3.2 udp dport 7001 ip daddr set 10.78.3.254 udp dport set 40000"
        ));
        assert!(s.contains(
            "ip saddr 10.78.3.254 udp sport 40000 notrack ip saddr set 10.78.3.2 udp sport set 7001"
        ));
        assert!(s.contains("type route hook output priority 10"));
    }

    #[test]
    fn names_and_families_are_checked_before_anything_runs() {
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        let v4: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert!(matches!(
            route_through("ns", v6, v4),
            Err(RouteError::NotIpv4(_))
        ));
        assert!(matches!(
            route_through("a b", v4, v4),
            Err(RouteError::BadName(_))
        ));
        assert!(matches!(
            remove_table("ns", "-x"),
            Err(RouteError::BadName(_))
        ));
        assert!(matches!(
            remove_table("ns", "t;flush ruleset"),
            Err(RouteError::BadName(_))
        ));
    }
}
