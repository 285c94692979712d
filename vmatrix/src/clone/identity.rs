//! A clone's identity: generation id, MAC, address and config string, all new, decided
//! before the clone's first instruction. Never the parent's replication role or term: a clone
//! is started as a plain VM (`role: vm`), with no backup and no output commit.

use std::net::Ipv4Addr;

/// What makes one clone unique on its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name (its files and control socket are named after it).
    pub name: String,
    /// Tap device.
    pub tap: String,
    /// Generation id (random, never 0, never the parent's).
    pub generation: u64,
    /// MAC address: locally administered unicast, from the clone's address.
    pub mac: [u8; 6],
    /// The guest config string with the clone's address.
    pub config: String,
}

/// A random u64 (never 0) from the kernel.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let v = match ok {
        Ok(()) => u64::from_le_bytes(b),
        // No /dev/urandom: time and pid (unique on this host, which is what matters).
        Err(_) => vmm::snapshot::new_id(),
    };
    v.max(1)
}

/// The MAC of the clone at `ip`: locally administered unicast `02:76:a:b:c:d`. Unique as
/// long as addresses are, and the same for every clone that ever holds this address: a
/// neighbour's ARP entry for it stays right when a clone is replaced (a new MAC per
/// generation left peers sending to the dead clone's MAC until their entry was refreshed:
/// measured, a first SYN lost). The parent's default MAC (`02:78:6d:..`) is never one of these.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x76, o[0], o[1], o[2], o[3]]
}

/// The MAC of a managed VM's primary whose guest is at `ip`: `02:78:a:b:c:d`, so VMs of one
/// cluster never share one (the VMM's default, `02:78:6d:00:00:02`, is for single VMs).
pub fn primary_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x78, o[0], o[1], o[2], o[3]]
}

/// The address (`ip=`) of a config string.
pub fn ip_of(config: &str) -> Option<Ipv4Addr> {
    config
        .split(',')
        .filter_map(|i| i.trim().strip_prefix("ip="))
        .find_map(|v| v.split('/').next()?.parse().ok())
}

/// Formats a MAC address.
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The parent's config string with `ip=` (and `gw=` if given) replaced: the rest (port, ...)
/// stays the parent's.
pub fn config_for(parent: &str, ip: Ipv4Addr, prefix: u8, gw: Option<Ipv4Addr>) -> String {
    let mut out: Vec<String> = vec![format!("ip={ip}/{prefix}")];
    let mut had_gw = false;
    for item in parent.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=').map(|(k, _)| k) {
            Some("ip") => {}
            Some("gw") => {
                had_gw = true;
                match gw {
                    Some(g) => out.push(format!("gw={g}")),
                    None => out.push(item.to_string()),
                }
            }
            _ => out.push(item.to_string()),
        }
    }
    if let (false, Some(g)) = (had_gw, gw) {
        out.push(format!("gw={g}"));
    }
    out.join(",")
}

/// Address `i` after `first` (clone i of a run gets `first + i`).
pub fn nth_ip(first: Ipv4Addr, i: u32) -> Option<Ipv4Addr> {
    u32::from(first).checked_add(i).map(Ipv4Addr::from)
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s.split_once('/').unwrap_or((s, "24"));
    let ip = a.parse().map_err(|_| format!("'{s}': bad IPv4 address"))?;
    let prefix = p
        .parse::<u8>()
        .ok()
        .filter(|&p| p <= 32)
        .ok_or_else(|| format!("'{s}': prefix length must be 0..=32"))?;
    Ok((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_the_parents_other_keys() {
        let ip = Ipv4Addr::new(10, 77, 1, 12);
        assert_eq!(
            config_for("ip=10.77.1.2/24,gw=10.77.1.1,port=7000", ip, 24, None),
            "ip=10.77.1.12/24,gw=10.77.1.1,port=7000"
        );
        assert_eq!(
            config_for("ip=10.0.0.2/24", ip, 16, Some(Ipv4Addr::new(10, 77, 0, 1))),
            "ip=10.77.1.12/16,gw=10.77.0.1"
        );
        assert!(crate::guest_config::validate(&config_for("port=7001", ip, 24, None)).is_ok());
    }

    #[test]
    fn macs_are_unicast_and_locally_administered() {
        let m = mac_for(Ipv4Addr::new(10, 77, 1, 12));
        assert_eq!(m, [0x02, 0x76, 10, 77, 1, 12]);
        assert_eq!(
            ip_of("gw=1.2.3.4,ip=10.0.0.9/16"),
            Some(Ipv4Addr::new(10, 0, 0, 9))
        );
        assert_eq!(ip_of("port=7"), None);
        assert_eq!(mac_string(&[2, 0xab, 0, 1, 2, 3]), "02:ab:00:01:02:03");
        assert_ne!(random_u64(), 0);
    }
}
