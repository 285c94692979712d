//! Rule tests of the manager's drain before stop (issue 11): with a load balancer's driver
//! attached, scaled-down clones drain before they stop (limit, lease, restart, scale-up during
//! a drain, a second driver, hostile reports).

mod common;

use std::time::Duration;

use common::clones::*;
use common::*;
use failover::clones::Balancer;
use failover::event::EventKind;
use failover::manager::{ApiError, DrainedReport, Input, Manager, ManagerConfig, Output};

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
