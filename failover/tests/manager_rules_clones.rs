//! Rule tests of the manager's clones (issue 11): scaling by hand and by the autoscaler,
//! placement on live hosts with room that hold (or can make) a clone base, assignments, events,
//! independence from the parent's failover, re-placement when a clone's host is lost.

mod common;

use common::*;
use failover::clones::{AutoscaleSpec, BaseObservation, CloneObservation};
use failover::event::EventKind;
use failover::manager::{ApiError, Output, ScaleRequest};
use failover::model::{Report, VmObservation};

fn scale(t: &mut T, count: u32) -> Result<(), ApiError> {
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

fn running(name: &str) -> CloneObservation {
    CloneObservation {
        name: name.into(),
        vm: "web".into(),
        alive: true,
        running: true,
        exit: None,
        base_term: 1,
    }
}

fn base(term: u64) -> BaseObservation {
    BaseObservation {
        vm: "web".into(),
        term,
        age_ms: 5,
    }
}

/// A report of `vms` with these clones and a base (or none).
fn with_clones(vms: Vec<VmObservation>, clones: &[&str], base_term: Option<u64>) -> Report {
    Report {
        vms,
        clones: clones.iter().map(|c| running(c)).collect(),
        bases: base_term.into_iter().map(base).collect(),
    }
}

fn clones_on(t: &T, host: &str) -> Vec<String> {
    t.last_assign(host)
        .map(|a| a.clones.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn detail_of(t: &T, kind: EventKind) -> Vec<String> {
    t.out
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) if e.kind == kind => Some(e.detail.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn scaling_places_clones_where_a_base_can_be_made_and_says_so() {
    let mut t = T::protected_vm();
    // No address yet: refused; an address outside its subnet for the count: refused.
    assert!(matches!(
        t.m.scale(
            t.now,
            "web",
            ScaleRequest {
                count: 1,
                ip: None,
                warm: None
            }
        ),
        Err(ApiError::Invalid(_))
    ));
    assert!(matches!(
        t.m.scale(
            t.now,
            "web",
            ScaleRequest {
                count: 10,
                ip: Some("10.77.1.250/24".into()),
                warm: None
            }
        ),
        Err(ApiError::Invalid(_))
    ));
    assert!(matches!(
        t.m.scale(
            t.now,
            "nope",
            ScaleRequest {
                count: 1,
                ip: None,
                warm: None
            }
        ),
        Err(ApiError::NotFound(_))
    ));
    scale(&mut t, 2).unwrap();
    // Only the primary's host can make a base: both clones go there, with their own address.
    let a = t.last_assign("a").unwrap().clone();
    assert_eq!(clones_on(&t, "a"), ["web-c0", "web-c1"]);
    assert_eq!(a.bases, ["web"]);
    assert_eq!(
        a.clones[1].guest_config, "ip=10.77.1.11/24",
        "the parent's config with its own ip"
    );
    assert!(clones_on(&t, "b").is_empty() && clones_on(&t, "c").is_empty());
    assert_eq!(t.events(EventKind::Scaled), 1);
    // Clones never get a role: the VM's own assignments are unchanged.
    assert_eq!(a.vms.len(), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!(v.clones.instances.len(), 2);
    assert_eq!(v.clones.instances[0].state, "starting");
    // Reported running: clone_started once each.
    let p = primary(1, &["b", "c"], true);
    t.report_all(
        "a",
        with_clones(vec![p.clone()], &["web-c0", "web-c1"], Some(1)),
    );
    t.report_all("a", with_clones(vec![p], &["web-c0", "web-c1"], Some(1)));
    assert_eq!(t.events(EventKind::CloneStarted), 2);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!(v.clones.instances[1].state, "running");
    assert_eq!(v.clones.instances[1].ip, "10.77.1.11/24");
    // The count is persisted.
    let persisted = t.out.iter().rev().find_map(|o| match o {
        Output::Persist(s) => Some(s.clone()),
        _ => None,
    });
    assert_eq!(persisted.unwrap().vms["web"].clones.placed.len(), 2);
}

#[test]
fn clones_go_to_hosts_with_room_and_a_base_and_wait_otherwise() {
    let mut t = T::protected_vm();
    // d offers 200 MiB and holds a base: it is filled first (25 clones of 8 MiB), the rest go
    // to a (1024 MiB, the 64 MiB primary on it), which runs the primary and can make a base.
    t.m.handle(
        t.now,
        failover::manager::Input::Hello {
            host: "d".into(),
            repl_ip: "10.0.0.4".into(),
            capacity_mib: 200,
        },
    );
    t.report_all("d", with_clones(vec![], &[], Some(1)));
    scale(&mut t, 64).unwrap();
    let (on_a, on_d) = (clones_on(&t, "a").len(), clones_on(&t, "d").len());
    assert_eq!((on_a, on_d), (39, 25));
    // b and c hold no base and run no primary: none there.
    assert!(clones_on(&t, "b").is_empty() && clones_on(&t, "c").is_empty());

    // A host with no room: a small one alone.
    let mut t = T::new(&["a"]);
    t.m.handle(
        t.now,
        failover::manager::Input::Hello {
            host: "a".into(),
            repl_ip: "10.0.0.1".into(),
            capacity_mib: 64 + 3 * 8,
        },
    );
    t.m.create(t.now, spec(0)).unwrap();
    t.report("a", vec![primary(1, &[], false)]);
    scale(&mut t, 5).unwrap();
    assert_eq!(clones_on(&t, "a").len(), 3);
    let waits = detail_of(&t, EventKind::Scaled);
    assert!(
        waits.iter().any(|d| d.contains("web-c3 waits")),
        "{waits:?}"
    );
    t.advance(MS * 10);
    t.report("a", vec![primary(1, &[], false)]);
    let n = detail_of(&t, EventKind::Scaled).len();
    assert_eq!(n, waits.len(), "said once");
}

#[test]
fn scaling_down_stops_the_highest_slots_and_a_failover_leaves_clones_running() {
    let mut t = T::protected_vm();
    scale(&mut t, 3).unwrap();
    assert_eq!(clones_on(&t, "a").len(), 3);
    let all = ["web-c0", "web-c1", "web-c2"];
    t.report_all(
        "a",
        with_clones(vec![primary(1, &["b", "c"], true)], &all, Some(1)),
    );
    // The parent fails over to c: the clones stay on a, untouched.
    let term = t.m.failover(t.now, "web", Some("c")).unwrap();
    t.drain();
    assert_eq!(term, 2);
    assert_eq!(clones_on(&t, "a"), all);
    assert!(
        t.last_assign("a").unwrap().bases.is_empty(),
        "a no longer makes bases"
    );
    assert_eq!(t.events(EventKind::CloneStopped), 0);
    // c runs the primary of term 2: it is where a base is kept now.
    t.report("c", vec![primary(2, &["b"], false)]);
    t.report_all("a", with_clones(vec![], &all, Some(1)));
    assert_eq!(t.last_assign("c").unwrap().bases, ["web"]);
    // Down to one: c2 then c1 leave, c0 stays.
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert_eq!(stopped.len(), 2);
    assert!(stopped[0].starts_with("web-c2: scaled down"), "{stopped:?}");
}

#[test]
fn clones_of_a_lost_host_are_placed_again() {
    let mut t = T::protected_vm();
    t.report_all("d", with_clones(vec![], &[], Some(1)));
    // d holds a base and has the most room: the clone goes there.
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    // d goes silent: within backup_lost nothing moves, after it the clone is on a.
    for _ in 0..140 {
        t.advance(MS * 10);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
    }
    assert_eq!(clones_on(&t, "a"), Vec::<String>::new());
    for _ in 0..20 {
        t.advance(MS * 10);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
    }
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert!(stopped[0].contains("host went silent"), "{stopped:?}");
    // The VM itself was never touched.
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
}

#[test]
fn a_clone_that_died_where_no_base_is_left_is_placed_again() {
    let mut t = T::protected_vm();
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    // The parent moves to b; a keeps no base and its clone dies: it cannot restart it there.
    t.m.failover(t.now, "web", Some("b")).unwrap();
    t.drain();
    t.report("b", vec![primary(2, &["c"], false)]);
    let mut dead = running("web-c0");
    dead.alive = false;
    dead.exit = Some("killed by signal 9".into());
    t.report_all(
        "a",
        Report {
            vms: vec![],
            clones: vec![dead],
            bases: vec![],
        },
    );
    assert_eq!(clones_on(&t, "b"), ["web-c0"]);
    assert!(clones_on(&t, "a").is_empty());
}

#[test]
fn the_autoscaler_sets_the_count_and_says_why() {
    let mut t = T::protected_vm();
    let spec = AutoscaleSpec {
        target: 50.0,
        min: 0,
        max: 8,
        up_cooldown_ms: 1000,
        down_cooldown_ms: 5000,
        hysteresis: 0.2,
    };
    assert!(matches!(
        t.m.load_sample(t.now, "web", 10.0),
        Err(ApiError::Invalid(_))
    ));
    assert!(matches!(
        t.m.autoscale(t.now, "web", Some(spec.clone()), None),
        Err(ApiError::Invalid(_))
    ));
    t.m.autoscale(t.now, "web", Some(spec), Some("10.77.1.10/24".into()))
        .unwrap();
    t.drain();
    // A base is kept warm for it although no clone runs yet.
    assert_eq!(t.last_assign("a").unwrap().bases, ["web"]);
    assert!(matches!(
        t.m.load_sample(t.now, "web", f64::NAN),
        Err(ApiError::Invalid(_))
    ));
    t.m.load_sample(t.now, "web", 170.0).unwrap();
    t.drain();
    assert_eq!(clones_on(&t, "a").len(), 3, "170 / 50 → 4 replicas");
    let why = detail_of(&t, EventKind::Scaled);
    assert!(
        why.last().unwrap().starts_with("autoscaler: load 170.0"),
        "{why:?}"
    );
    // Load gone: after the down cool-down, back to 0.
    for _ in 0..60 {
        t.advance(MS * 100);
        t.m.load_sample(t.now, "web", 0.0).unwrap();
        t.drain();
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
    }
    assert!(clones_on(&t, "a").is_empty());
    assert_eq!(t.m.vm(t.now, "web").unwrap().clones.load, Some(0.0));
    // Off: the count stays where it is.
    t.m.autoscale(t.now, "web", None, None).unwrap();
    t.drain();
    assert!(t.last_assign("a").unwrap().bases.is_empty());
}
