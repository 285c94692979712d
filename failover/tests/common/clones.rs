//! Helpers of the manager's clone rule tests (`manager_rules_clones.rs`,
//! `manager_rules_drain.rs`): scaling, clone and base observations, a VM whose clones all go
//! to one host, a load balancer's driver and its rounds.

use std::time::Duration;

use failover::clones::{Balancer, BaseObservation, CloneObservation};
use failover::event::EventKind;
use failover::manager::{ApiError, DrainedReport, Input, Output, ScaleRequest};
use failover::model::{Report, VmObservation};

use super::*;

pub fn scale(t: &mut T, count: u32) -> Result<(), ApiError> {
    let r = t.m.scale(
        t.now,
        "web",
        ScaleRequest {
            count,
            ip: Some("10.77.1.10/24".into()),
            warm: None,
        },
    );
    t.drain();
    r
}

pub fn running(name: &str) -> CloneObservation {
    CloneObservation {
        name: name.into(),
        vm: "web".into(),
        alive: true,
        running: true,
        exit: None,
        base_term: 1,
    }
}

pub fn base(term: u64) -> BaseObservation {
    BaseObservation {
        vm: "web".into(),
        term,
        age_ms: 5,
    }
}

/// A protected VM (primary on a, backups on b and c) whose backups' hosts have no room for a
/// clone (their capacity is their backup's memory) and whose primary's host holds a base (made
/// before): every clone goes to a (or d, if it holds a base).
pub fn protected_room_on_a() -> T {
    let mut t = T::protected_vm();
    let p = primary(1, &["b", "c"], true);
    t.report_all("a", with_clones(vec![p], &[], Some(1)));
    no_room_on_the_backups_hosts(&mut t);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
    t
}

/// b and c (the protected VM's backups' hosts) say hello again offering only their backup's
/// memory (no room for a clone), and report their backups.
pub fn no_room_on_the_backups_hosts(t: &mut T) {
    for (h, seq) in [("b", 10), ("c", 12)] {
        let hello = Input::Hello {
            host: h.into(),
            repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
            capacity_mib: 64,
        };
        t.m.handle(t.now, hello);
        t.report(h, vec![backup(1, seq, 5)]);
    }
}

/// A report of `vms` with these clones and a base (or none).
pub fn with_clones(vms: Vec<VmObservation>, clones: &[&str], base_term: Option<u64>) -> Report {
    Report {
        vms,
        clones: clones.iter().map(|c| running(c)).collect(),
        bases: base_term.into_iter().map(base).collect(),
        base_port: 0,
        usage: vec![],
    }
}

pub fn clones_on(t: &T, host: &str) -> Vec<String> {
    t.last_assign(host)
        .map(|a| a.clones.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

pub fn detail_of(t: &T, kind: EventKind) -> Vec<String> {
    t.out
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) if e.kind == kind => Some(e.detail.clone()),
            _ => None,
        })
        .collect()
}

pub const ALL3: [&str; 3] = ["web-c0", "web-c1", "web-c2"];

pub fn attach(t: &mut T) {
    let b = Balancer {
        vip: "10.77.1.100:7000".into(),
        lease_ms: 2000,
    };
    t.m.attach_balancer(t.now, "web", b).unwrap();
    t.drain();
}

/// `d` of time in 100 ms rounds: every host reports (a: the primary and `clones` running), and
/// the driver renews its lease if `renew`.
pub fn rounds(t: &mut T, d: Duration, clones: &[&str], renew: bool) {
    for _ in 0..d.as_millis() / 100 {
        t.advance(MS * 100);
        let p = primary(t.m.vm(t.now, "web").unwrap().term, &["b", "c"], true);
        t.report_all("a", with_clones(vec![p], clones, Some(1)));
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
        if renew {
            attach(t);
        }
    }
}

pub fn states(t: &T) -> Vec<(String, String)> {
    let v = t.m.vm(t.now, "web").unwrap();
    v.clones
        .instances
        .iter()
        .map(|i| (i.name.clone(), i.state.clone()))
        .collect()
}

pub fn drained() -> DrainedReport {
    DrainedReport {
        drained: true,
        active_left: 0,
        waited_ms: 1200,
    }
}

/// A protected VM with a driver attached and three clones running on a.
pub fn three_behind_a_balancer() -> T {
    let mut t = protected_room_on_a();
    attach(&mut t);
    scale(&mut t, 3).unwrap();
    rounds(&mut t, MS * 200, &ALL3, true);
    assert_eq!(t.events(EventKind::CloneStarted), 3);
    t
}
