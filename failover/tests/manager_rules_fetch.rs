//! Rule tests of clones on hosts that run nothing of their VM (issue 11): such a host copies a
//! clone base from a host holding one (its agent serves it); the primary then makes none (no
//! snapshot pause); without base servers the rules are as before; a slot that cannot start on
//! its host is re-placed and the host avoided; the copy list is stable from report to report.

mod common;

use common::clones::*;
use common::*;
use failover::clones::{BaseObservation, CloneObservation};
use failover::event::EventKind;
use failover::manager::Input;
use failover::model::{Report, VmObservation};

const PORT: u16 = 7400;

/// A report with a base server (or none, `port` 0), these clones running and a base.
fn served(vms: Vec<VmObservation>, clones: &[&str], base: Option<(u64, u64)>, port: u16) -> Report {
    Report {
        base_port: port,
        bases: base
            .map(|(term, age_ms)| BaseObservation {
                vm: "web".into(),
                term,
                age_ms,
            })
            .into_iter()
            .collect(),
        ..with_clones(vms, clones, None)
    }
}

/// Hosts a, b, c say hello again offering `cap` MiB (a: the primary's, b and c: the backups').
fn capacity(t: &mut T, hosts: &[&str], cap: u64) {
    for h in hosts {
        let hello = Input::Hello {
            host: h.to_string(),
            repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
            capacity_mib: cap,
        };
        t.m.handle(t.now, hello);
    }
    t.drain();
}

/// One round of reports: a primary on a, backups with bases on b and c, `d` as given; `age` of
/// the bases in ms (it changes from report to report).
fn reports(t: &mut T, port: u16, age: u64, d: Report) {
    t.report_all(
        "a",
        served(vec![primary(1, &["b", "c"], true)], &[], None, port),
    );
    t.report_all(
        "b",
        served(vec![backup(1, 10, 5)], &[], Some((1, age)), port),
    );
    t.report_all(
        "c",
        served(vec![backup(1, 12, 5)], &[], Some((1, age)), port),
    );
    t.report_all("d", d);
}

/// A protected VM whose primary's and backups' hosts have no room for a clone; every host
/// serves bases (or none, `port` 0).
fn full_but_d(port: u16) -> T {
    let mut t = T::protected_vm();
    capacity(&mut t, &["a", "b", "c"], 64);
    reports(&mut t, port, 5, served(vec![], &[], None, port));
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
    t
}

#[test]
fn clones_go_to_a_host_running_nothing_of_the_vm_which_copies_a_base() {
    let mut t = full_but_d(PORT);
    scale(&mut t, 2).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0", "web-c1"]);
    let d = t.last_assign("d").unwrap();
    assert_eq!(d.fetch.len(), 1, "{:?}", d.fetch);
    let f = &d.fetch[0];
    assert_eq!(f.vm, "web");
    let from: Vec<(&str, &str, u64)> = f
        .sources
        .iter()
        .map(|s| (s.host.as_str(), s.addr.as_str(), s.term))
        .collect();
    assert_eq!(
        from,
        [("b", "10.0.0.2:7400", 1), ("c", "10.0.0.3:7400", 1)],
        "the backups' hosts, which make their bases"
    );
    // The primary's host makes no base: d copies the backups' (no snapshot pause).
    let a = t.last_assign("a").unwrap();
    assert!(!a.bases.contains(&"web".to_string()), "{:?}", a.bases);
    assert!(detail_of(&t, EventKind::Scaled)
        .iter()
        .any(|e| e.contains("d copies a base from b or c")));
    // Once d holds its copy, it is one source for others, after the makers.
    reports(
        &mut t,
        PORT,
        5,
        served(vec![], &ALL3[..2], Some((1, 9)), PORT),
    );
    capacity(&mut t, &["a"], 1024);
    reports(
        &mut t,
        PORT,
        5,
        served(vec![], &ALL3[..2], Some((1, 9)), PORT),
    );
    scale(&mut t, 3).unwrap();
    // (d holds a base: it gets the third too.)
    assert_eq!(clones_on(&t, "d"), ALL3);
}

#[test]
fn without_base_servers_the_primary_makes_the_base_as_before() {
    let mut t = full_but_d(0);
    capacity(&mut t, &["a"], 1024);
    reports(&mut t, 0, 5, served(vec![], &[], None, 0));
    scale(&mut t, 1).unwrap();
    // d cannot copy one: the slot goes to the primary's host, which snapshots its guest.
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(clones_on(&t, "d").is_empty());
    let a = t.last_assign("a").unwrap();
    assert!(a.bases.contains(&"web".to_string()));
    assert!(a.fetch.is_empty());
}

#[test]
fn with_base_servers_the_primarys_host_copies_rather_than_pauses_its_guest() {
    let mut t = full_but_d(PORT);
    capacity(&mut t, &["a"], 1024);
    capacity(&mut t, &["d"], 64);
    reports(&mut t, PORT, 5, served(vec![], &[], None, PORT));
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    let a = t.last_assign("a").unwrap();
    assert!(!a.bases.contains(&"web".to_string()), "no snapshot: {a:?}");
    assert_eq!(a.fetch.len(), 1);
    assert_eq!(a.fetch[0].sources[0].host, "b");
}

#[test]
fn the_copy_list_does_not_change_with_every_report() {
    let mut t = full_but_d(PORT);
    scale(&mut t, 1).unwrap();
    let sent = |t: &T| {
        t.out
            .iter()
            .filter(|o| matches!(o, failover::manager::Output::Assign { host, .. } if host == "d"))
            .count()
    };
    let before = sent(&t);
    for age in 6..60 {
        t.advance(MS * 10);
        reports(&mut t, PORT, age, served(vec![], &[], None, PORT));
    }
    assert_eq!(sent(&t), before, "ages of bases are not in the assignment");
}

/// A clone that cannot start where it was placed (its host cannot copy or make the base, or
/// it crashes at once) is re-placed after 20 s, and that host is avoided for the VM for 60 s.
#[test]
fn a_slot_stuck_on_its_host_is_re_placed_and_the_host_avoided() {
    let mut t = full_but_d(PORT);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    capacity(&mut t, &["a"], 1024);
    let stuck = |t: &mut T, age| {
        let mut r = served(vec![], &[], None, PORT);
        r.clones.push(CloneObservation {
            alive: false,
            running: false,
            exit: Some("copying its base: refused".into()),
            base_term: 0,
            ..running("web-c0")
        });
        reports(t, PORT, age, r);
    };
    for i in 0..190 {
        t.advance(MS * 100);
        stuck(&mut t, i);
    }
    assert_eq!(clones_on(&t, "d"), ["web-c0"], "not before 20 s");
    for i in 0..20 {
        t.advance(MS * 100);
        stuck(&mut t, i);
    }
    assert!(clones_on(&t, "d").is_empty());
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(detail_of(&t, EventKind::CloneStopped)
        .iter()
        .any(|e| e.contains("cannot start there") && e.contains("avoided")));
    // d has the most room, yet gets no clone of the VM while avoided...
    scale(&mut t, 2).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0", "web-c1"]);
    // ...and gets them again afterwards.
    for i in 0..600 {
        t.advance(MS * 100);
        reports(&mut t, PORT, i, served(vec![], &[], None, PORT));
    }
    scale(&mut t, 3).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c2"]);
}

/// A copying host is told to copy even before any base exists (it waits for the first, not
/// reported as stuck), and only hosts serving bases are told to.
#[test]
fn a_copier_waits_for_the_first_base_with_an_empty_source_list() {
    let mut t = T::protected_vm();
    capacity(&mut t, &["a", "b", "c"], 64);
    let none = |vms| served(vms, &[], None, PORT);
    t.report_all("a", none(vec![primary(1, &["b", "c"], true)]));
    t.report_all("b", none(vec![backup(1, 10, 5)]));
    t.report_all("c", none(vec![backup(1, 12, 5)]));
    t.report_all("d", none(vec![]));
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    let d = t.last_assign("d").unwrap();
    assert_eq!(d.fetch.len(), 1);
    assert!(d.fetch[0].sources.is_empty(), "{:?}", d.fetch);
    // b's first base comes: the list names it.
    reports(&mut t, PORT, 5, none(vec![]));
    assert_eq!(t.last_assign("d").unwrap().fetch[0].sources[0].host, "b");
}

/// The backups' hosts are asked for a base and none comes (their exports fail): after 20 s
/// the primary's host, which has clones to start, makes its own from a snapshot rather than
/// wait for ever to copy theirs.
#[test]
fn when_the_exports_never_come_the_primarys_host_makes_its_own() {
    let mut t = full_but_d(PORT);
    capacity(&mut t, &["a"], 1024);
    capacity(&mut t, &["d"], 64);
    let no_bases = |t: &mut T| {
        let none = |vms| served(vms, &[], None, PORT);
        t.report_all("a", none(vec![primary(1, &["b", "c"], true)]));
        t.report_all("b", none(vec![backup(1, 10, 5)]));
        t.report_all("c", none(vec![backup(1, 12, 5)]));
        t.report_all("d", none(vec![]));
    };
    no_bases(&mut t);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    let a = t.last_assign("a").unwrap();
    assert!(!a.bases.contains(&"web".to_string()));
    for _ in 0..190 {
        t.advance(MS * 100);
        no_bases(&mut t);
    }
    assert!(!t
        .last_assign("a")
        .unwrap()
        .bases
        .contains(&"web".to_string()));
    for _ in 0..20 {
        t.advance(MS * 100);
        no_bases(&mut t);
    }
    let a = t.last_assign("a").unwrap();
    assert!(a.bases.contains(&"web".to_string()), "{a:?}");
    assert!(a.fetch.is_empty());
}

/// A clone in a crash loop (alive, dead, alive... never running) is stuck too.
#[test]
fn a_clone_in_a_crash_loop_is_re_placed() {
    let mut t = full_but_d(PORT);
    scale(&mut t, 1).unwrap();
    capacity(&mut t, &["a"], 1024);
    for i in 0..210 {
        t.advance(MS * 100);
        let mut r = served(vec![], &[], None, PORT);
        r.clones.push(CloneObservation {
            alive: i % 3 != 0,
            running: false,
            exit: (i % 3 == 0).then(|| "killed by signal 11".to_string()),
            ..running("web-c0")
        });
        reports(&mut t, PORT, i, r);
    }
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(clones_on(&t, "d").is_empty());
}

/// The exports never come and the clones are on a host that copies: after `clone_stuck` the
/// primary's host makes a base too (a snapshot), and the copier is told to copy it.
#[test]
fn when_the_exports_never_come_a_copier_gets_the_primarys_base() {
    let mut t = full_but_d(PORT);
    let none = |vms| served(vms, &[], None, PORT);
    let round = |t: &mut T, a_base: bool| {
        let a = served(
            vec![primary(1, &["b", "c"], true)],
            &[],
            a_base.then_some((1, 5)),
            PORT,
        );
        t.report_all("a", a);
        t.report_all("b", none(vec![backup(1, 10, 5)]));
        t.report_all("c", none(vec![backup(1, 12, 5)]));
        t.report_all("d", none(vec![]));
    };
    round(&mut t, false);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    for _ in 0..210 {
        t.advance(MS * 100);
        round(&mut t, false);
    }
    let a = t.last_assign("a").unwrap();
    assert!(a.bases.contains(&"web".to_string()), "{a:?}");
    round(&mut t, true);
    let d = t.last_assign("d").unwrap();
    assert_eq!(d.fetch[0].sources[0].host, "a", "{:?}", d.fetch);
}

/// A clone its host never reports (it waits for a base that never comes) is re-placed after
/// six times `clone_stuck`; a host that is merely slow to report it keeps it.
#[test]
fn a_clone_never_reported_is_re_placed_after_six_times_clone_stuck() {
    let mut t = full_but_d(PORT);
    scale(&mut t, 1).unwrap();
    assert_eq!(clones_on(&t, "d"), ["web-c0"]);
    capacity(&mut t, &["a"], 1024);
    for i in 0..1190 {
        t.advance(MS * 100);
        reports(&mut t, PORT, i, served(vec![], &[], None, PORT));
    }
    assert_eq!(clones_on(&t, "d"), ["web-c0"], "not before 120 s");
    for i in 0..20 {
        t.advance(MS * 100);
        reports(&mut t, PORT, i, served(vec![], &[], None, PORT));
    }
    assert_eq!(clones_on(&t, "a"), ["web-c0"]);
    assert!(detail_of(&t, EventKind::CloneStopped)
        .iter()
        .any(|e| e.contains("never reported there")));
}
