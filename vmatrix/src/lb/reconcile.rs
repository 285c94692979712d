//! The load-balancer driver's decisions (`vmatrix lb serve`, see `serve.rs`), as pure
//! functions and one small state machine in virtual time, so the I/O loop only reads and acts.
//!
//! - [`targets`]: what the service should hold, from the manager's view of the VM: the
//!   primary's service address and every running clone **serving**, every clone the manager
//!   keeps as draining **draining** (with its slot); anything else (starting, exited, gone) is
//!   not in the service.
//! - [`Reconciler::step`]: from the targets, the servers the kernel holds (with weights) and
//!   their active connections, the actions of one round:
//!   - a serving target missing or at weight 0 is **added** at weight 1 once it is ready (a
//!     TCP connection from the balancer's namespace succeeded, [`to_probe`] and
//!     `super::probe`: a clone that just started may still be waking); a clone brought back
//!     into service during its drain gets new connections again;
//!   - a draining target at weight > 0 is **quiesced** (weight 0: no new connection, open ones
//!     go on); one missing (e.g. the driver restarted) is put back at weight 0, so its
//!     connections can be watched;
//!   - a draining target at weight 0 with no active connection is reported **drained** — only
//!     from the round after its quiesce, so a connection accepted just before it is counted;
//!   - a server that is neither is **removed** (a drained clone once the manager stopped it, a
//!     leftover, a clone the manager stopped at its drain limit).
//! - [`load`]: the autoscaler's sample from the per-server statistics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;
use std::time::Duration;

use failover::manager::VmView;

use super::ServerStats;

/// What a server is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gets new connections (the primary, a running clone).
    Serving,
    /// Gets none; the manager waits for its connections to end before it stops the clone.
    Draining {
        /// The clone's slot.
        slot: u32,
    },
}

/// What a round does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add the server (or set its weight), weight 1 or 0.
    Add(SocketAddrV4, u32),
    /// Weight 0: no new connection.
    Quiesce(SocketAddrV4),
    /// Remove it from the service.
    Remove(SocketAddrV4),
    /// Tell the manager the clone of `slot` has no connection left.
    Drained {
        /// Its slot.
        slot: u32,
        /// Its address.
        server: SocketAddrV4,
        /// Since the driver first saw it draining, ms.
        waited_ms: u64,
    },
}

/// The load signal sent to the autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// Open connections (handshake or established) over every server.
    ActiveConns,
    /// New connections per second over every server.
    ConnsPerS,
}

/// `ip=` and `port=` of a guest config string (port 7000, the guest's default, if absent).
fn service_addr(config: &str, ip: Option<&str>) -> Result<Option<SocketAddrV4>, String> {
    let mut port = 7000u16;
    let mut addr = None;
    for item in config.split(',').map(str::trim) {
        if let Some(v) = item.strip_prefix("port=") {
            port = v
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("port '{v}' in the guest config"))?;
        } else if let Some(v) = item.strip_prefix("ip=") {
            addr = Some(v.to_string());
        }
    }
    let Some(a) = ip.map(str::to_string).or(addr) else {
        return Ok(None);
    };
    let host = a.split('/').next().unwrap_or_default();
    let host = Ipv4Addr::from_str(host).map_err(|_| format!("address '{a}' is not a.b.c.d"))?;
    Ok(Some(SocketAddrV4::new(host, port)))
}

/// The servers the service should hold, from the manager's view of the VM.
pub fn targets(view: &VmView) -> Result<BTreeMap<SocketAddrV4, Role>, String> {
    let cfg = &view.spec.guest_config;
    let mut out = BTreeMap::new();
    if let Some(p) = service_addr(cfg, None)? {
        out.insert(p, Role::Serving);
    }
    for c in &view.clones.instances {
        let role = match c.state.as_str() {
            _ if c.draining || c.state == "draining" => Role::Draining { slot: c.index },
            "running" => Role::Serving,
            _ => continue,
        };
        if let Some(a) = service_addr(cfg, Some(&c.ip))? {
            out.insert(a, role);
        }
    }
    Ok(out)
}

/// Serving targets not (or no longer) getting new connections: to probe before adding them.
pub fn to_probe(
    targets: &BTreeMap<SocketAddrV4, Role>,
    current: &BTreeMap<SocketAddrV4, u32>,
) -> Vec<SocketAddrV4> {
    targets
        .iter()
        .filter(|(a, r)| **r == Role::Serving && current.get(a).is_none_or(|&w| w == 0))
        .map(|(a, _)| *a)
        .collect()
}

/// The driver's memory between rounds: when each draining server was first seen draining.
#[derive(Debug, Default)]
pub struct Reconciler {
    since: BTreeMap<SocketAddrV4, Duration>,
}

impl Reconciler {
    /// One round's actions (see the module's doc). `current`: the servers and their weights;
    /// `active`: their open connections (handshake, established, half closed); `ready`: the probed
    /// servers of [`to_probe`] that answered.
    pub fn step(
        &mut self,
        now: Duration,
        targets: &BTreeMap<SocketAddrV4, Role>,
        current: &BTreeMap<SocketAddrV4, u32>,
        active: &BTreeMap<SocketAddrV4, u32>,
        ready: &BTreeSet<SocketAddrV4>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.since
            .retain(|a, _| matches!(targets.get(a), Some(Role::Draining { .. })));
        for (&addr, &role) in targets {
            let weight = current.get(&addr).copied();
            match role {
                Role::Serving if weight.is_none_or(|w| w == 0) && ready.contains(&addr) => {
                    out.push(Action::Add(addr, 1))
                }
                Role::Serving => {}
                Role::Draining { slot } => {
                    let since = *self.since.entry(addr).or_insert(now);
                    match weight {
                        None => out.push(Action::Add(addr, 0)),
                        Some(w) if w > 0 => out.push(Action::Quiesce(addr)),
                        Some(_) if active.get(&addr).copied().unwrap_or(0) == 0 => {
                            out.push(Action::Drained {
                                slot,
                                server: addr,
                                waited_ms: now.saturating_sub(since).as_millis() as u64,
                            })
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        for addr in current.keys().filter(|a| !targets.contains_key(a)) {
            out.push(Action::Remove(*addr));
        }
        out
    }
}

/// The load sample from per-server statistics (None: no figure yet — a rate needs two reads).
pub fn load(stats: &[ServerStats], signal: Signal) -> Option<f64> {
    match signal {
        Signal::ActiveConns => Some(stats.iter().map(|s| f64::from(s.active)).sum()),
        Signal::ConnsPerS => stats.iter().map(|s| s.conns_per_s).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failover::manager::{CloneView, ClonesView};
    use failover::model::VmSpec;

    fn a(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 77, 1, last), 7000)
    }

    fn clone(index: u32, state: &str, draining: bool) -> CloneView {
        CloneView {
            name: format!("web-c{index}"),
            index,
            host: "a".into(),
            ip: format!("10.77.1.{}/24", 10 + index),
            state: state.into(),
            draining,
        }
    }

    fn view(instances: Vec<CloneView>) -> VmView {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({"name": "web",
            "mem_mib": 64, "disk_mib": 16, "guest_config": "ip=10.77.1.2/24,port=7000",
            "backups": 1, "hosts": [], "port": 7100}))
        .unwrap();
        VmView {
            spec,
            term: 1,
            status: "protected".into(),
            primary: Some("a".into()),
            acked_seq: None,
            backups: vec![],
            clones: ClonesView {
                instances,
                ..Default::default()
            },
            limits: Default::default(),
            usage: vec![],
        }
    }

    #[test]
    fn targets_are_the_primary_the_running_and_the_draining() {
        let v = view(vec![
            clone(0, "running", false),
            clone(1, "starting", false),
            clone(2, "draining", true),
            clone(3, "unreachable", true),
            clone(4, "exited (signal 9)", false),
        ]);
        let t = targets(&v).unwrap();
        let want: BTreeMap<_, _> = [
            (a(2), Role::Serving),
            (a(10), Role::Serving),
            (a(12), Role::Draining { slot: 2 }),
            (a(13), Role::Draining { slot: 3 }),
        ]
        .into();
        assert_eq!(t, want);
        let mut bad = view(vec![]);
        bad.spec.guest_config = "ip=nonsense/24".into();
        assert!(targets(&bad).is_err());
    }

    #[test]
    fn a_drain_quiesces_waits_for_the_last_connection_then_reports() {
        let mut r = Reconciler::default();
        let ms = Duration::from_millis;
        let none = BTreeMap::new();
        let mut t: BTreeMap<_, _> = [(a(2), Role::Serving), (a(10), Role::Serving)].into();
        // An empty service: both to probe; added once they answer, the clone a round later.
        assert_eq!(to_probe(&t, &none), [a(2), a(10)]);
        let acts = r.step(ms(0), &t, &none, &none, &[a(2)].into());
        assert_eq!(acts, [Action::Add(a(2), 1)]);
        let cur: BTreeMap<_, _> = [(a(2), 1)].into();
        assert_eq!(to_probe(&t, &cur), [a(10)]);
        let acts = r.step(ms(200), &t, &cur, &none, &[a(10)].into());
        assert_eq!(acts, [Action::Add(a(10), 1)]);
        let mut cur: BTreeMap<_, _> = [(a(2), 1), (a(10), 1)].into();
        assert!(to_probe(&t, &cur).is_empty());
        assert!(r
            .step(ms(500), &t, &cur, &none, &BTreeSet::new())
            .is_empty());
        // The manager drains slot 0: quiesced first, even with no connection.
        t.insert(a(10), Role::Draining { slot: 0 });
        let acts = r.step(ms(1000), &t, &cur, &none, &BTreeSet::new());
        assert_eq!(acts, [Action::Quiesce(a(10))]);
        cur.insert(a(10), 0);
        // One connection left: wait.
        let one: BTreeMap<_, _> = [(a(10), 1)].into();
        assert!(r
            .step(ms(1500), &t, &cur, &one, &BTreeSet::new())
            .is_empty());
        // Gone: drained, with the time since the drain was seen.
        let acts = r.step(ms(2000), &t, &cur, &none, &BTreeSet::new());
        let drained = Action::Drained {
            slot: 0,
            server: a(10),
            waited_ms: 1000,
        };
        assert_eq!(acts, [drained]);
        // The manager stopped it: removed.
        t.remove(&a(10));
        assert_eq!(
            r.step(ms(2500), &t, &cur, &none, &BTreeSet::new()),
            [Action::Remove(a(10))]
        );
    }

    #[test]
    fn a_clone_back_in_service_a_lost_drain_and_leftovers() {
        let mut r = Reconciler::default();
        let ms = Duration::from_millis;
        // Brought back during its drain: weight 1 again.
        let t: BTreeMap<_, _> = [(a(2), Role::Serving), (a(10), Role::Serving)].into();
        let cur: BTreeMap<_, _> = [(a(2), 1), (a(10), 0), (a(99), 3)].into();
        assert_eq!(to_probe(&t, &cur), [a(10)]);
        let acts = r.step(ms(0), &t, &cur, &BTreeMap::new(), &[a(10)].into());
        assert_eq!(acts, [Action::Add(a(10), 1), Action::Remove(a(99))]);
        // A draining clone missing from the service (a restarted driver): back at weight 0,
        // then watched.
        let t: BTreeMap<_, _> = [(a(11), Role::Draining { slot: 1 })].into();
        let none = BTreeMap::new();
        let acts = r.step(ms(100), &t, &none, &none, &BTreeSet::new());
        assert_eq!(acts, [Action::Add(a(11), 0)]);
        let cur: BTreeMap<_, _> = [(a(11), 0)].into();
        assert!(to_probe(&t, &cur).is_empty(), "draining: not probed");
        let acts = r.step(ms(600), &t, &cur, &none, &BTreeSet::new());
        assert!(matches!(acts[..], [Action::Drained { slot: 1, .. }]));
    }

    #[test]
    fn load_sums_the_servers() {
        let s = |active, cps| ServerStats {
            server: a(2),
            weight: 1,
            active,
            inactive: 0,
            open: active,
            connections: 0,
            packets: 0,
            bytes: 0,
            conns_per_s: cps,
            packets_per_s: None,
        };
        let st = [s(3, Some(1.5)), s(4, Some(2.0))];
        assert_eq!(load(&st, Signal::ActiveConns), Some(7.0));
        assert_eq!(load(&st, Signal::ConnsPerS), Some(3.5));
        assert_eq!(load(&[s(3, None)], Signal::ConnsPerS), None);
        assert_eq!(load(&[], Signal::ActiveConns), Some(0.0));
    }
}
