//! Rule tests of the manager's clones (issue 11): scaling by hand and by the autoscaler,
//! placement on live hosts with room that hold (or can make) a clone base, assignments, events,
//! independence from the parent's failover, re-placement when a clone's host is lost; drain
//! before stop with a load balancer's driver attached (limit, lease, restart, scale-up during a
//! drain, hostile reports).

mod common;

use std::time::Duration;

use common::*;
use failover::clones::{AutoscaleSpec, Balancer, BaseObservation, CloneObservation};
use failover::event::EventKind;
use failover::manager::{
    ApiError, DrainedReport, Input, Manager, ManagerConfig, Output, ScaleRequest,
};
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

/// A protected VM (primary on a, backups on b and c) whose backups' hosts have no room for a
/// clone (their capacity is their backup's memory) and whose primary's host holds a base (made
/// before): every clone goes to a (or d, if it holds a base).
fn protected_room_on_a() -> T {
    let mut t = T::protected_vm();
    let p = primary(1, &["b", "c"], true);
    t.report_all("a", with_clones(vec![p], &[], Some(1)));
    for (h, seq) in [("b", 10), ("c", 12)] {
        let hello = Input::Hello {
            host: h.into(),
            repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
            capacity_mib: 64,
        };
        t.m.handle(t.now, hello);
        t.report(h, vec![backup(1, seq, 5)]);
    }
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
    t
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
    // The backups' hosts (synced at the term) make the bases, each by exporting its image;
    // the primary's host does not (a snapshot would pause the guest). The clones go where
    // there is the most room, each with its own address.
    let a = t.last_assign("a").unwrap().clone();
    assert_eq!(clones_on(&t, "b"), ["web-c0"]);
    assert_eq!(clones_on(&t, "c"), ["web-c1"]);
    for h in ["b", "c"] {
        assert_eq!(t.last_assign(h).unwrap().bases, ["web"], "{h} makes a base");
    }
    assert!(a.bases.is_empty(), "no base made from the primary");
    assert!(t.last_assign("d").is_none_or(|d| d.bases.is_empty()));
    let c = t.last_assign("c").unwrap().clone();
    assert_eq!(
        c.clones[0].guest_config, "ip=10.77.1.11/24",
        "the parent's config with its own ip"
    );
    assert!(clones_on(&t, "a").is_empty() && clones_on(&t, "d").is_empty());
    assert_eq!(t.events(EventKind::Scaled), 1);
    // Clones never get a role: the VM's own assignments are unchanged.
    assert_eq!(a.vms.len(), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!(v.clones.instances.len(), 2);
    assert_eq!(v.clones.instances[0].state, "starting");
    // Reported running: clone_started once each.
    for _ in 0..2 {
        let bk = backup(1, 10, 5);
        t.report_all("b", with_clones(vec![bk], &["web-c0"], Some(1)));
        let bk = backup(1, 12, 5);
        t.report_all("c", with_clones(vec![bk], &["web-c1"], Some(1)));
    }
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
    // d offers 200 MiB and holds a base: it is filled first (25 clones of 8 MiB), the rest are
    // spread by room over b and c (1024 MiB, 64 of it their backup), which make a base by
    // exporting their image; a (the primary's host) makes none while they can.
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
    let on = |h| clones_on(&t, h).len();
    assert_eq!((on("a"), on("b"), on("c"), on("d")), (0, 20, 19, 25));
    // Once b's backup is no longer synced at the term (a failover to c; b not yet re-synced),
    // b can make no base of the term, and the VM has no synced backup: its new primary's host
    // makes one (a snapshot), and new clones go there.
    scale(&mut t, 0).unwrap();
    t.m.failover(t.now, "web", Some("c")).unwrap();
    t.drain();
    t.report("c", vec![primary(2, &["b"], false)]);
    t.report_all("d", with_clones(vec![], &[], None));
    scale(&mut t, 3).unwrap();
    assert_eq!(
        clones_on(&t, "c").len(),
        3,
        "only the new primary's host can make a base of term 2"
    );
    assert!(
        t.last_assign("b").unwrap().bases.is_empty(),
        "b has no image of term 2"
    );

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
    let mut t = protected_room_on_a();
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
fn a_backup_that_restarted_empty_makes_no_base_and_gets_no_clone() {
    let mut t = T::protected_vm();
    // b's backup restarted from nothing (its host rebooted): alive, no committed image. It
    // stays "synced at term 1" in the record until a promotion, but it can export nothing.
    let mut empty = backup(1, 0, 5);
    empty.seq = None;
    empty.image_term = 0;
    t.report("b", vec![empty]);
    scale(&mut t, 6).unwrap();
    assert!(
        clones_on(&t, "b").is_empty(),
        "no clone where no base can be made"
    );
    assert!(t.last_assign("b").is_none_or(|a| a.bases.is_empty()));
    assert_eq!(
        clones_on(&t, "c").len(),
        6,
        "c's backup exports: all go there"
    );
    assert_eq!(t.last_assign("c").unwrap().bases, ["web"]);
}

#[test]
fn clones_of_a_lost_host_are_placed_again() {
    let mut t = T::protected_vm();
    t.report_all("d", with_clones(vec![], &[], Some(1)));
    // d holds a base and has the most room: the clone goes there.
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    // d goes silent: within backup_lost nothing moves, after it the clone is on b (a backup's
    // host, which exports a base; the first of b and c, which have as much room).
    let beat = |t: &mut T| {
        t.advance(MS * 10);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
    };
    for _ in 0..140 {
        beat(&mut t);
    }
    assert_eq!(clones_on(&t, "b"), Vec::<String>::new());
    for _ in 0..20 {
        beat(&mut t);
    }
    assert_eq!(clones_on(&t, "b"), ["web-c0"]);
    assert!(clones_on(&t, "a").is_empty(), "not on the primary's host");
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert!(stopped[0].contains("host went silent"), "{stopped:?}");
    // The VM itself was never touched.
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
}

#[test]
fn a_clone_that_died_where_no_base_is_left_is_placed_again() {
    let mut t = T::protected_vm();
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "b"), ["web-c0"]);
    // The parent moves to c; b's backup is of the old term, b keeps no base and its clone
    // dies: it cannot restart it there. With no backup synced at term 2, the new primary's
    // host makes a base (a snapshot): the clone goes there.
    t.m.failover(t.now, "web", Some("c")).unwrap();
    t.drain();
    t.report("c", vec![primary(2, &["b"], false)]);
    let mut dead = running("web-c0");
    dead.alive = false;
    dead.exit = Some("killed by signal 9".into());
    t.report_all(
        "b",
        Report {
            vms: vec![backup(1, 10, 5)],
            clones: vec![dead],
            bases: vec![],
        },
    );
    assert_eq!(clones_on(&t, "c"), ["web-c0"]);
    assert!(clones_on(&t, "b").is_empty());
}

#[test]
fn the_autoscaler_sets_the_count_and_says_why() {
    let mut t = protected_room_on_a();
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
    // A base is kept warm for it although no clone runs yet (by the backups' hosts).
    for h in ["b", "c"] {
        assert_eq!(t.last_assign(h).unwrap().bases, ["web"], "{h}");
    }
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

// Drain before stop (docs/clones.md, "Drain before stop"): a load balancer's driver attached
// to the VM keeps scaled-down clones as `draining` until it says they drained.

const ALL3: [&str; 3] = ["web-c0", "web-c1", "web-c2"];

fn attach(t: &mut T) {
    let b = Balancer {
        vip: "10.77.1.100:7000".into(),
        lease_ms: 2000,
    };
    t.m.attach_balancer(t.now, "web", b).unwrap();
    t.drain();
}

/// `d` of time in 100 ms rounds: every host reports (a: the primary and `clones` running), and
/// the driver renews its lease if `renew`.
fn rounds(t: &mut T, d: Duration, clones: &[&str], renew: bool) {
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

fn states(t: &T) -> Vec<(String, String)> {
    let v = t.m.vm(t.now, "web").unwrap();
    v.clones
        .instances
        .iter()
        .map(|i| (i.name.clone(), i.state.clone()))
        .collect()
}

fn drained() -> DrainedReport {
    DrainedReport {
        drained: true,
        active_left: 0,
        waited_ms: 1200,
    }
}

/// A protected VM with a driver attached and three clones running on a.
fn three_behind_a_balancer() -> T {
    let mut t = protected_room_on_a();
    attach(&mut t);
    scale(&mut t, 3).unwrap();
    rounds(&mut t, MS * 200, &ALL3, true);
    assert_eq!(t.events(EventKind::CloneStarted), 3);
    t
}

#[test]
fn with_a_balancer_scale_down_drains_and_stops_only_once_drained() {
    let mut t = three_behind_a_balancer();
    assert_eq!(detail_of(&t, EventKind::Balancer).len(), 1, "attached once");
    scale(&mut t, 1).unwrap();
    // c1 and c2 drain: still assigned (they run), shown draining, not serving.
    assert_eq!(clones_on(&t, "a"), ALL3);
    let want = |s: &[&str; 3]| -> Vec<(String, String)> {
        ALL3.iter()
            .zip(s)
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect()
    };
    assert_eq!(states(&t), want(&["running", "draining", "draining"]));
    let why = detail_of(&t, EventKind::CloneDraining);
    assert!(
        why[0].starts_with("web-c2: scaled down to 1; draining"),
        "{why:?}"
    );
    assert_eq!(t.events(EventKind::CloneStopped), 0);
    let persisted = t.out.iter().rev().find_map(|o| match o {
        Output::Persist(s) => Some(s.clone()),
        _ => None,
    });
    let placed = persisted.unwrap().vms["web"].clones.placed.clone();
    assert!(placed[1].draining && placed[2].draining && !placed[0].draining);
    // Time passes within the limit: they stay.
    rounds(&mut t, Duration::from_secs(5), &ALL3, true);
    assert_eq!(clones_on(&t, "a"), ALL3);
    // c2 drained: stopped (its host's assignment no longer lists it); c1 still drains.
    t.m.clone_drained(t.now, "web", 2, drained()).unwrap();
    t.drain();
    assert_eq!(clones_on(&t, "a"), ["web-c0", "web-c1"]);
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert_eq!(stopped, ["web-c2: drained in 1200 ms, then stopped"]);
    // The driver gave up on c1 with connections open: stopped too, said so.
    let gave_up = DrainedReport {
        drained: false,
        active_left: 2,
        waited_ms: 9000,
    };
    t.m.clone_drained(t.now, "web", 1, gave_up).unwrap();
    t.drain();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(detail_of(&t, EventKind::CloneStopped)[1].contains("2 connections open"));
}

#[test]
fn without_a_balancer_or_a_running_clone_scale_down_stops_at_once() {
    let mut t = protected_room_on_a();
    scale(&mut t, 2).unwrap();
    rounds(&mut t, MS * 200, &["web-c0", "web-c1"], false);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert!(
        stopped[0].contains("no load balancer attached"),
        "{stopped:?}"
    );
    // With a balancer, a clone still starting has nothing to drain.
    attach(&mut t);
    scale(&mut t, 2).unwrap();
    rounds(&mut t, MS * 200, &["web-c0"], true);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(detail_of(&t, EventKind::CloneStopped)[1].contains("not running"));
    assert_eq!(t.events(EventKind::CloneDraining), 0);
}

#[test]
fn the_drain_limit_stops_a_clone_the_driver_never_reports() {
    let mut t = three_behind_a_balancer();
    scale(&mut t, 2).unwrap();
    rounds(&mut t, Duration::from_secs(29), &ALL3, true);
    assert_eq!(clones_on(&t, "a"), ALL3, "within the 30 s limit");
    rounds(&mut t, Duration::from_millis(1500), &ALL3, true);
    assert_eq!(clones_on(&t, "a"), ["web-c0", "web-c1"]);
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert!(
        stopped[0].contains("drain limit of 30000 ms passed"),
        "{stopped:?}"
    );
}

#[test]
fn a_lapsed_lease_detaches_the_balancer_and_stops_draining_clones() {
    let mut t = three_behind_a_balancer();
    scale(&mut t, 0).unwrap();
    assert_eq!(t.events(EventKind::CloneDraining), 3);
    // The driver goes silent: within its 2 s lease nothing happens, after it they stop.
    rounds(&mut t, MS * 1900, &ALL3, false);
    assert_eq!(clones_on(&t, "a"), ALL3);
    rounds(&mut t, MS * 300, &ALL3, false);
    assert!(clones_on(&t, "a").is_empty());
    let b = detail_of(&t, EventKind::Balancer);
    assert!(
        b.last().unwrap().starts_with("detached: no renewal"),
        "{b:?}"
    );
    let stopped = detail_of(&t, EventKind::CloneStopped);
    assert!(
        stopped.iter().all(|s| s.contains("load balancer detached")),
        "{stopped:?}"
    );
    assert_eq!(t.m.vm(t.now, "web").unwrap().clones.balancer, None);
    // Detached: the next scale-down stops at once; a driver that says goodbye detaches too.
    attach(&mut t);
    t.m.detach_balancer(t.now, "web").unwrap();
    t.drain();
    assert!(detail_of(&t, EventKind::Balancer)
        .last()
        .unwrap()
        .contains("said so"));
    assert_eq!(t.m.vm(t.now, "web").unwrap().clones.balancer, None);
}

#[test]
fn a_restarted_manager_keeps_draining_and_gives_the_driver_its_lease() {
    let mut t = three_behind_a_balancer();
    scale(&mut t, 1).unwrap();
    // A new manager from the persisted state, 10 s later in its own time.
    let restart = |t: &mut T| {
        let state = t.m.state().clone();
        t.m = Manager::new(ManagerConfig::default(), state, t.now);
        for h in ["a", "b", "c", "d"] {
            let repl_ip = format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a');
            let hello = Input::Hello {
                host: h.into(),
                repl_ip,
                capacity_mib: 1024,
            };
            t.m.handle(t.now, hello);
        }
        t.out.clear();
        rounds(t, MS * 300, &ALL3, false);
    };
    t.now += Duration::from_secs(10);
    restart(&mut t);
    assert_eq!(clones_on(&t, "a"), ALL3, "still draining, not re-placed");
    assert_eq!(states(&t)[2].1, "draining");
    // The driver renews: c2 drains normally.
    rounds(&mut t, MS * 500, &ALL3, true);
    t.m.clone_drained(t.now, "web", 2, drained()).unwrap();
    t.drain();
    assert_eq!(clones_on(&t, "a"), ["web-c0", "web-c1"]);
    // Restarted again, but the driver never comes back: its lease from the start runs out.
    t.now += Duration::from_secs(10);
    restart(&mut t);
    rounds(&mut t, MS * 2000, &ALL3, false);
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
}

#[test]
fn a_scale_up_during_a_drain_brings_the_same_clone_back() {
    let mut t = three_behind_a_balancer();
    scale(&mut t, 0).unwrap();
    rounds(&mut t, MS * 500, &ALL3, true);
    // Up to 2 while all three drain: c0 and c1 serve again — the same clones on the same
    // host, no second clone on their addresses; c2 drains on; nothing was stopped.
    scale(&mut t, 2).unwrap();
    assert_eq!(clones_on(&t, "a"), ALL3);
    assert!(["b", "c", "d"].iter().all(|h| clones_on(&t, h).is_empty()));
    let s = states(&t);
    assert_eq!(
        (s[0].1.as_str(), s[1].1.as_str(), s[2].1.as_str()),
        ("running", "running", "draining")
    );
    let back = detail_of(&t, EventKind::CloneDraining);
    assert!(
        back.iter()
            .any(|d| d.starts_with("web-c0: back in service")),
        "{back:?}"
    );
    assert_eq!(t.events(EventKind::CloneStopped), 0);
    assert_eq!(t.events(EventKind::CloneStarted), 3, "no new start");
    // A driver's late "drained" for c0 is refused: it serves.
    assert!(matches!(
        t.m.clone_drained(t.now, "web", 0, drained()),
        Err(ApiError::Invalid(_))
    ));
    assert_eq!(clones_on(&t, "a"), ALL3);
}

#[test]
fn a_drained_report_for_nothing_draining_is_refused_and_changes_nothing() {
    let mut t = three_behind_a_balancer();
    scale(&mut t, 2).unwrap();
    let before = t.m.state().clone();
    t.out.clear();
    let cases = [
        ("web", 7, "no clone"),
        ("web", 0, "not draining"),
        ("nope", 2, "nope"),
    ];
    for (vm, slot, says) in cases {
        let e = t.m.clone_drained(t.now, vm, slot, drained()).unwrap_err();
        assert!(e.to_string().contains(says), "{vm} {slot}: {e}");
    }
    assert!(matches!(
        t.m.clone_drained(t.now, "web", 7, drained()),
        Err(ApiError::NotFound(_))
    ));
    let bad = Balancer {
        vip: "nowhere".into(),
        lease_ms: 1000,
    };
    assert!(matches!(
        t.m.attach_balancer(t.now, "web", bad),
        Err(ApiError::Invalid(_))
    ));
    assert!(matches!(
        t.m.detach_balancer(t.now, "nope"),
        Err(ApiError::NotFound(_))
    ));
    t.drain();
    assert!(t.out.is_empty(), "no output: {:?}", t.out);
    assert_eq!(t.m.state(), &before);
    // The real one still works.
    t.m.clone_drained(t.now, "web", 2, drained()).unwrap();
}

/// One driver per VM: a second one (another VIP) is refused while the first one's lease holds
/// (two would take turns rewriting the attachment, persisted each time), and may attach once
/// it lapsed.
#[test]
fn a_second_driver_is_refused_while_the_first_ones_lease_holds() {
    let mut t = T::new(&["a", "b"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    attach(&mut t);
    let other = Balancer {
        vip: "10.77.1.101:7000".into(),
        lease_ms: 2000,
    };
    let before = t.m.state().clone();
    assert!(matches!(
        t.m.attach_balancer(t.now, "web", other.clone()),
        Err(ApiError::Exists(_))
    ));
    assert_eq!(t.m.state(), &before, "nothing changed");
    // The first one renews (same VIP): fine.
    attach(&mut t);
    // Its lease lapses: the other may attach.
    t.advance(Duration::from_millis(2100));
    t.m.attach_balancer(t.now, "web", other).unwrap();
}

/// Found by `clones_sim` (seeds 8 and 15 without the fix; seed 505 with only its first part,
/// the reports): scaled to 0 and at once up again at another address, the slots went back to
/// the host whose agent had not applied the scale-down yet: it still reported them running
/// (seed 15), or had started them a moment before and not reported them yet (seed 505). An
/// agent keeps a running clone whose name is assigned again, so they went on serving the old
/// addresses while the manager said (`clone_started`) they served the new ones. The address
/// changes only once no slot is placed and none was for `backup_lost`, and no host heard
/// within `backup_lost` reports a clone of the VM alive.
#[test]
fn the_address_changes_only_once_no_clone_of_the_old_one_runs() {
    let mut t = protected_room_on_a();
    let healthy = |t: &mut T, clones: &[&str]| {
        let p = primary(1, &["b", "c"], true);
        t.report_all("a", with_clones(vec![p], clones, Some(1)));
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
    };
    let other = |count| ScaleRequest {
        count,
        ip: Some("10.77.2.10/24".into()),
        warm: None,
    };
    // Seed 505: started but not reported yet.
    scale(&mut t, 2).unwrap();
    scale(&mut t, 0).unwrap();
    let r = t.m.scale(t.now, "web", other(2));
    assert!(matches!(r, Err(ApiError::Unavailable(_))), "{r:?}");
    // Seed 15: reported running, then scaled down; still reported a while later.
    scale(&mut t, 2).unwrap();
    healthy(&mut t, &["web-c0", "web-c1"]);
    scale(&mut t, 0).unwrap();
    assert!(clones_on(&t, "a").is_empty());
    for _ in 0..160 {
        t.advance(MS * 10);
        healthy(&mut t, &["web-c0", "web-c1"]);
    }
    let r = t.m.scale(t.now, "web", other(2));
    t.drain();
    assert!(matches!(r, Err(ApiError::Unavailable(_))), "{r:?}");
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!(v.clones.first_ip.as_deref(), Some("10.77.1.10/24"));
    assert_eq!(v.clones.desired, 0);
    // (The same address is fine: the clones keep theirs.)
    scale(&mut t, 0).unwrap();
    // Once a reports them gone, the new address is taken.
    healthy(&mut t, &[]);
    t.m.scale(t.now, "web", other(2)).unwrap();
    t.drain();
    let a = t.last_assign("a").unwrap();
    assert_eq!(a.clones[1].guest_config, "ip=10.77.2.11/24");
    // A host silent for longer than backup_lost (crashed for good, say) no longer holds it
    // back: its clones went with it, or it stops them when it is back (its first assignment
    // comes before any slot can be placed there again).
    let none = |ip: &str| ScaleRequest {
        count: 0,
        ip: Some(ip.into()),
        warm: None,
    };
    healthy(&mut t, &["web-c0", "web-c1"]);
    t.m.scale(t.now, "web", none("10.77.2.10/24")).unwrap();
    assert!(t.m.scale(t.now, "web", none("10.77.1.10/24")).is_err());
    for _ in 0..160 {
        t.advance(MS * 10);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
    }
    t.m.scale(t.now, "web", none("10.77.1.10/24")).unwrap();
}

/// A slot is not placed on one host while its previous clone (same name, same address) is
/// still reported alive by another (its scale-down not yet applied there): two VMs would answer
/// for one address. It is placed once that host no longer reports it (a review finding).
#[test]
fn a_slot_waits_while_its_previous_clone_still_runs_elsewhere() {
    let mut t = protected_room_on_a();
    t.report_all("d", with_clones(vec![], &[], Some(1)));
    scale(&mut t, 1).unwrap();
    assert_eq!(
        clones_on(&t, "d"),
        ["web-c0"],
        "placed on the host with a base"
    );
    t.advance(MS * 10);
    t.report_all("d", with_clones(vec![], &["web-c0"], Some(1)));
    scale(&mut t, 0).unwrap();
    // d has not applied it yet (still reports web-c0), and its base is gone: only a (the
    // primary's host) can take the slot now.
    t.advance(MS * 10);
    t.report_all("d", with_clones(vec![], &["web-c0"], None));
    scale(&mut t, 1).unwrap();
    assert!(clones_on(&t, "a").is_empty(), "not beside the old copy");
    let v = t.m.vm(t.now, "web").unwrap();
    assert!(v.clones.instances.is_empty(), "{v:?}");
    assert!(detail_of(&t, EventKind::Scaled)
        .iter()
        .any(|d| d.contains("still runs on d")));
    // d stops it: the slot is placed.
    t.advance(MS * 10);
    t.report_all("d", with_clones(vec![], &[], None));
    t.report("a", vec![primary(1, &["b", "c"], true)]);
    t.advance(MS * 10);
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
}
