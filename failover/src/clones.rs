//! Clones through the manager (issue 11): the data. A VM's clones are plain VMs started from a
//! frozen checkpoint of it (a "clone base") on some host, each with its own address, MAC and
//! generation id; they never take a replication role or a term, and a failover of their parent
//! does not touch them. The manager persists how many a VM should have ([`CloneSet`]) and where
//! each runs ([`CloneSlot`]); a host's assignment lists the clones it must run
//! ([`CloneAssignment`]) and the VMs whose primary on it keeps a base warm; its agent reports
//! them ([`CloneObservation`], [`BaseObservation`]).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::model::HostId;

/// Most clones one VM may ask for.
pub const MAX_CLONES: u32 = 64;

/// Memory a clone is counted for when a host's room is judged, MiB. A clone maps its parent's
/// guest RAM copy-on-write from one file per host, so it costs what it writes plus its process:
/// measured ~2 MiB of guest pages written by the test guest after waking and ~4 MiB of private
/// process memory (docs/clones.md, BENCHMARKS.md); counted as 8 MiB, a fixed share, whatever the
/// guest's size. A guest that rewrites much of its memory after waking costs more: this is a
/// placement estimate, not a limit.
pub const CLONE_SHARE_MIB: u64 = 8;

/// The autoscaler's settings for one VM (persisted; see `crate::scaler`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleSpec {
    /// Load one replica (the primary or a clone) should carry: open connections (or requests
    /// per second) measured at the load balancer.
    pub target: f64,
    /// Fewest clones.
    pub min: u32,
    /// Most clones.
    pub max: u32,
    /// Least time between a change and a scale-up, ms.
    pub up_cooldown_ms: u64,
    /// Least time between a change and a scale-down, and how long the load must have stayed low
    /// (the highest demand of that window is what it scales down to), ms.
    pub down_cooldown_ms: u64,
    /// Dead band as a fraction of the target (0.1: scale down only once every replica would
    /// still carry at most 90 % of the target).
    pub hysteresis: f64,
}

impl AutoscaleSpec {
    /// Checks what a user sent.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.target.is_finite() && self.target > 0.0) {
            return Err(format!("target {} must be a positive number", self.target));
        }
        if self.min > self.max || self.max > MAX_CLONES {
            return Err(format!(
                "need min {} <= max {} <= {MAX_CLONES}",
                self.min, self.max
            ));
        }
        if !(0.0..0.9).contains(&self.hysteresis) {
            return Err(format!("hysteresis {} not in 0..0.9", self.hysteresis));
        }
        if self.up_cooldown_ms > 3_600_000 || self.down_cooldown_ms > 3_600_000 {
            return Err("cool-downs are at most one hour".into());
        }
        Ok(())
    }
}

/// One placed clone (persisted): slot `index` of its VM runs on `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSlot {
    /// Slot number, 0-based: it fixes the clone's name and address (and so its MAC).
    pub index: u32,
    /// Where it runs.
    pub host: HostId,
    /// Scaled down while a load balancer's driver was attached: it gets no new connection and
    /// runs on until the driver says its connections ended (or the manager's drain limit), then
    /// it is stopped. It is not serving, not placed again, and its slot (so its address) is
    /// taken by nobody else meanwhile. (Absent in state files written before draining.)
    #[serde(default)]
    pub draining: bool,
}

/// The load balancer's driver attached to a VM (`vmatrix lb serve`; persisted, so a restarted
/// manager still drains; its lease is not: a restarted manager counts it from its own start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balancer {
    /// The service's address (the VIP, `a.b.c.d:port`), for the record.
    pub vip: String,
    /// The driver renews within this, ms; after it without a renewal it is detached.
    pub lease_ms: u64,
}

/// Shortest and longest lease a driver may ask for, ms.
pub const LEASE_MS: std::ops::RangeInclusive<u64> = 200..=60_000;

impl Balancer {
    /// Checks what a driver sent.
    pub fn validate(&self) -> Result<(), String> {
        let vip: std::net::SocketAddrV4 = self
            .vip
            .parse()
            .map_err(|_| format!("vip '{}' is not a.b.c.d:port", self.vip))?;
        if vip.ip().is_unspecified() || vip.port() == 0 {
            return Err(format!("vip '{}' needs an address and a port", self.vip));
        }
        if !LEASE_MS.contains(&self.lease_ms) {
            return Err(format!(
                "lease_ms {} not in {}..={}",
                self.lease_ms,
                LEASE_MS.start(),
                LEASE_MS.end()
            ));
        }
        Ok(())
    }
}

/// A VM's clones as the manager keeps them (persisted, inside its record).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloneSet {
    /// How many should run.
    #[serde(default)]
    pub desired: u32,
    /// Address of slot 0 with its prefix length (`10.77.1.10/24`); slot i has the i-th next.
    #[serde(default)]
    pub first_ip: Option<String>,
    /// Keep a clone base warm on the primary's host even with no clone (a scale-up from zero
    /// then starts in milliseconds).
    #[serde(default)]
    pub warm: bool,
    /// Scale by itself from the load signal (None: only by hand).
    #[serde(default)]
    pub autoscale: Option<AutoscaleSpec>,
    /// Where each clone runs.
    #[serde(default)]
    pub placed: Vec<CloneSlot>,
    /// The load balancer's driver, while one is attached (scale-down then drains).
    #[serde(default)]
    pub balancer: Option<Balancer>,
}

impl Eq for CloneSet {}

impl CloneSet {
    /// Whether the primary's host should keep a clone base of this VM.
    pub fn wants_base(&self) -> bool {
        self.desired > 0 || self.warm || self.autoscale.as_ref().is_some_and(|a| a.max > 0)
    }
}

/// One clone a host must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneAssignment {
    /// Its name (`<vm>-c<index>`), unique in the cluster.
    pub name: String,
    /// The VM it clones.
    pub vm: String,
    /// Its slot.
    pub index: u32,
    /// Its guest config string: the parent's with its own `ip=`.
    pub guest_config: String,
    /// The parent's guest memory, MiB.
    pub mem_mib: u64,
}

/// Where a host gets a clone base of a VM it makes none of (its assignment's `fetch`): it
/// copies the newest base one of `sources` holds, over QUIC with mutual TLS (agent role both
/// ways), and verifies every CRC of it before a clone starts from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFetch {
    /// The VM.
    pub vm: String,
    /// Hosts holding a base of it, the best first (newest term, then the hosts that make
    /// theirs, then by name).
    pub sources: Vec<BaseSource>,
}

/// A host a base can be copied from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseSource {
    /// Its name (its certificate's).
    pub host: HostId,
    /// `ip:port` of its agent's base server.
    pub addr: String,
    /// The term of the base it reported.
    pub term: u64,
}

/// How a clone looks to its host's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneObservation {
    /// Its name.
    pub name: String,
    /// The VM it clones.
    pub vm: String,
    /// The process runs.
    pub alive: bool,
    /// Its VM was built and answers on its control socket.
    pub running: bool,
    /// How it ended (or why it could not start), once it did.
    pub exit: Option<String>,
    /// The term of the primary whose snapshot its base was frozen from.
    pub base_term: u64,
}

/// A clone base a host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseObservation {
    /// The VM.
    pub vm: String,
    /// The term of the primary whose snapshot it froze.
    pub term: u64,
    /// Its age, ms.
    pub age_ms: u64,
}

/// Decodes a field appended to a wire message after its first release: when the bytes end
/// before it (a peer built before it), it is the default. The frame's CRC has been checked
/// before decoding, so a field that does not decode is a shorter message, not corruption.
pub(crate) fn trailing<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(T::deserialize(d).unwrap_or_default())
}

/// A clone's name.
pub fn clone_name(vm: &str, index: u32) -> String {
    format!("{vm}-c{index}")
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a.b.c.d/len"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("'{ip}': {e}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (1..=30).contains(l))
        .ok_or_else(|| format!("prefix length '{len}' not in 1..=30"))?;
    Ok((ip, len))
}

/// The address of slot `index` (the `index`-th after `first`), if it stays in `first`'s subnet
/// and is not its broadcast address.
pub fn slot_ip(first: &str, index: u32) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = parse_cidr(first)?;
    let mask = u32::MAX << (32 - len);
    let n = u32::from(ip)
        .checked_add(index)
        .ok_or_else(|| format!("slot {index} overflows {first}"))?;
    if n & mask != u32::from(ip) & mask || n | mask == u32::MAX {
        return Err(format!("slot {index} of {first} leaves its subnet"));
    }
    Ok((Ipv4Addr::from(n), len))
}

/// The config string of a clone: `parent`'s with `ip=` set to the clone's address (every other
/// item — gateway, port — kept).
pub fn clone_config(parent: &str, ip: Ipv4Addr, len: u8) -> String {
    let mut items: Vec<String> = parent
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty() && !i.starts_with("ip="))
        .map(str::to_string)
        .collect();
    items.insert(0, format!("ip={ip}/{len}"));
    items.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_in_their_subnet() {
        assert_eq!(
            slot_ip("10.77.1.10/24", 3).unwrap(),
            ("10.77.1.13".parse().unwrap(), 24)
        );
        assert!(slot_ip("10.77.1.250/24", 5).is_err());
        assert!(slot_ip("10.77.1.250/24", 4).is_ok());
        assert!(slot_ip("10.77.1.10", 0).is_err());
        assert!(slot_ip("10.77.1.10/0", 0).is_err());
        assert!(slot_ip("255.255.255.255/30", 1).is_err());
    }

    #[test]
    fn config_keeps_everything_but_the_address() {
        assert_eq!(
            clone_config(
                "ip=10.0.0.2/24,gw=10.0.0.1,port=7000",
                "10.0.0.9".parse().unwrap(),
                24
            ),
            "ip=10.0.0.9/24,gw=10.0.0.1,port=7000"
        );
        assert_eq!(
            clone_config("", "10.0.0.9".parse().unwrap(), 16),
            "ip=10.0.0.9/16"
        );
    }

    #[test]
    fn a_state_file_from_before_clones_still_parses() {
        let old = r#"{"vms":{"web":{"spec":{"name":"web","mem_mib":64,"disk_mib":16,
            "guest_config":"ip=10.0.0.2/24","backups":1,"hosts":[],"port":7100},
            "term":3,"phase":"Running","primary":"a","started":true,"backups":[],
            "handover_to":null}},"retired":{}}"#;
        let st: crate::model::ClusterState = serde_json::from_str(old).unwrap();
        assert_eq!(st.vms["web"].clones, CloneSet::default());
        assert!(!st.vms["web"].clones.wants_base());
    }

    #[test]
    fn a_state_file_from_before_draining_still_parses() {
        let old = r#"{"vms":{"web":{"spec":{"name":"web","mem_mib":64,"disk_mib":16,
            "guest_config":"ip=10.0.0.2/24","backups":1,"hosts":[],"port":7100},
            "term":3,"phase":"Running","primary":"a","started":true,"backups":[],
            "handover_to":null,"clones":{"desired":1,"first_ip":"10.0.0.10/24","warm":false,
            "autoscale":null,"placed":[{"index":0,"host":"a"}]}}},"retired":{}}"#;
        let st: crate::model::ClusterState = serde_json::from_str(old).unwrap();
        let c = &st.vms["web"].clones;
        assert!(!c.placed[0].draining);
        assert_eq!(c.balancer, None);
    }

    #[test]
    fn balancers_are_checked() {
        let ok = Balancer {
            vip: "10.0.0.100:7000".into(),
            lease_ms: 3000,
        };
        assert!(ok.validate().is_ok());
        for (vip, lease_ms) in [
            ("10.0.0.100", 3000),
            ("0.0.0.0:7000", 3000),
            ("10.0.0.100:0", 3000),
            ("web:7000", 3000),
            ("10.0.0.100:7000", 10),
            ("10.0.0.100:7000", 3_600_000),
        ] {
            let b = Balancer {
                vip: vip.into(),
                lease_ms,
            };
            assert!(b.validate().is_err(), "{b:?}");
        }
    }

    #[test]
    fn autoscale_specs_are_checked() {
        let ok = AutoscaleSpec {
            target: 50.0,
            min: 0,
            max: 8,
            up_cooldown_ms: 1000,
            down_cooldown_ms: 10_000,
            hysteresis: 0.2,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            AutoscaleSpec {
                target: f64::NAN,
                ..ok.clone()
            },
            AutoscaleSpec {
                target: 0.0,
                ..ok.clone()
            },
            AutoscaleSpec {
                min: 9,
                ..ok.clone()
            },
            AutoscaleSpec {
                max: MAX_CLONES + 1,
                ..ok.clone()
            },
            AutoscaleSpec {
                hysteresis: 0.95,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
