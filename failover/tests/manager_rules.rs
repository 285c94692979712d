//! The manager's rules one at a time, with hand-made agent reports in virtual time (the
//! rules about failing links, stalls and crashes cut short: `manager_rules_faults.rs`).

mod common;

use common::*;
use failover::event::EventKind;
use failover::manager::{ApiError, Input, Manager, ManagerConfig, Output};
use failover::model::{Report, Role, Source};

#[test]
fn a_manager_cut_from_a_healthy_primary_does_not_fail_it_over() {
    let mut t = T::protected_vm();
    // a goes silent for the manager, but its backups keep receiving checkpoints.
    for _ in 0..100 {
        t.advance(5 * MS);
        t.report("b", vec![backup(1, 10, 3)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::Detected), 0);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "unreachable");
}

#[test]
fn a_silent_host_with_silent_backups_fails_over_to_the_most_advanced_backup() {
    let mut t = T::protected_vm();
    let mut silent = 5;
    let mut detected_at = None;
    for _ in 0..40 {
        t.advance(5 * MS);
        silent += 5;
        t.report("b", vec![backup(1, 10, silent)]);
        t.report("c", vec![backup(1, 12, silent)]);
        t.report("d", vec![]);
        if detected_at.is_none() && t.events(EventKind::Detected) > 0 {
            detected_at = Some(t.now);
        }
    }
    let at = detected_at.expect("detected");
    assert!(
        at <= ManagerConfig::default().detect + 10 * MS,
        "detected after {at:?}"
    );
    // The term was persisted before the first assignment naming the new primary left.
    let persist = t
        .out
        .iter()
        .position(|o| matches!(o, Output::Persist(s) if s.vms["web"].term == 2))
        .unwrap();
    let assign = t
        .out
        .iter()
        .position(|o| matches!(o, Output::Assign { assignments, .. } if assignments.vms.get("web").is_some_and(|a| matches!(a.role, Role::Primary { term: 2, .. }))))
        .unwrap();
    assert!(
        persist < assign,
        "persisted at {persist}, assigned at {assign}"
    );
    // c (seq 12) beats b (seq 10); b is fenced to term 2; a runs nothing of it; d becomes a backup.
    let c = t.last_assign("c").unwrap();
    assert!(matches!(
        c.vms["web"].role,
        Role::Primary {
            term: 2,
            source: Source::Promote,
            ..
        }
    ));
    assert!(matches!(
        t.last_assign("b").unwrap().vms["web"].role,
        Role::Backup { min_term: 2 }
    ));
    assert!(matches!(
        t.last_assign("d").unwrap().vms["web"].role,
        Role::Backup { min_term: 2 }
    ));
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "promoting");
    // The promoted primary reports in: running at term 2.
    t.report("c", vec![primary(2, &["b", "d"], false)]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
    // "Protected" alone is not enough: each backup's own report must show the new term's
    // image at or past what the primary had acknowledged (seq 10).
    t.report("c", vec![primary(2, &["b", "d"], true)]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
    t.report("b", vec![backup(2, 11, 3)]);
    t.report("d", vec![backup(1, 12, 3)]);
    t.report("c", vec![primary(2, &["b", "d"], true)]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
    t.report("d", vec![backup(2, 10, 3)]);
    t.report("c", vec![primary(2, &["b", "d"], true)]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
}

#[test]
fn an_exited_primary_process_fails_over_at_once() {
    let mut t = T::protected_vm();
    let mut dead = primary(1, &["b", "c"], true);
    dead.alive = false;
    dead.exit = Some("killed by signal 9".into());
    t.report("a", vec![dead]);
    assert_eq!(t.events(EventKind::Detected), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 2);
}

#[test]
fn a_backup_never_synced_at_the_current_term_is_never_promoted() {
    let mut t = T::new(&["a", "b"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    // The primary never reports itself protected; b holds an image of term 1 anyway.
    t.report("a", vec![primary(1, &["b"], false)]);
    t.report("b", vec![backup(1, 10, 5)]);
    let mut dead = primary(1, &["b"], false);
    dead.alive = false;
    t.report("a", vec![dead]);
    assert_eq!(t.events(EventKind::Detected), 0);
    assert_eq!(t.events(EventKind::Lost), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "down");
}

#[test]
fn a_restarted_manager_resumes_from_its_store_without_acting_before_reports() {
    let t = T::protected_vm();
    let state = t.m.state().clone();
    // A new manager with the stored state: agents reconnect; nothing is failed meanwhile.
    let mut m = Manager::new(ManagerConfig::default(), state, t.now);
    for h in ["a", "b", "c", "d"] {
        m.handle(
            t.now,
            Input::Hello {
                host: h.into(),
                repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
                capacity_mib: 1024,
            },
        );
    }
    for k in 1..50 {
        m.tick(t.now + k * MS);
    }
    let mut outs = vec![];
    while let Some(o) = m.poll_output() {
        outs.push(o);
    }
    assert!(!outs
        .iter()
        .any(|o| matches!(o, Output::Event(e) if e.kind == EventKind::Detected)));
    // Every host gets the same assignment as before the restart.
    let a = outs.iter().find_map(|o| match o {
        Output::Assign { host, assignments } if host == "a" => Some(assignments),
        _ => None,
    });
    assert!(matches!(
        a.unwrap().vms["web"].role,
        Role::Primary {
            term: 1,
            source: Source::Running,
            ..
        }
    ));
}

#[test]
fn a_lost_backup_leaves_the_set_and_another_host_takes_its_place() {
    let mut t = T::protected_vm();
    for _ in 0..400 {
        t.advance(5 * MS);
        t.report("a", vec![primary(1, &["b", "c"], false)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    let hosts: Vec<&str> = v.backups.iter().map(|b| b.host.as_str()).collect();
    assert_eq!(hosts, ["c", "d"]);
    assert!(
        matches!(&t.last_assign("a").unwrap().vms["web"].role, Role::Primary { backups, .. } if backups.len() == 2 && backups[1].host == "d")
    );
    assert!(t.last_assign("b").unwrap().vms.is_empty());
}

#[test]
fn a_planned_migration_hands_over_then_promotes_the_target_from_that_checkpoint() {
    planned_migration(false);
}

/// The agent reports "handed over" as soon as the primary answered, while its process exits:
/// the target is promoted at once, not after the teardown.
#[test]
fn a_primary_still_exiting_after_it_handed_over_does_not_delay_the_target() {
    planned_migration(true);
}

fn planned_migration(still_exiting: bool) {
    let mut t = T::protected_vm();
    t.m.migrate(t.now, "web", "d").unwrap();
    t.drain();
    // d joins the set; once the primary is protected with it, the handover starts.
    assert!(matches!(
        t.last_assign("d").unwrap().vms["web"].role,
        Role::Backup { min_term: 1 }
    ));
    t.report("d", vec![backup(1, 12, 3)]);
    t.report("a", vec![primary(1, &["b", "c", "d"], true)]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "migrating");
    assert!(matches!(
        t.last_assign("a").unwrap().vms["web"].role,
        Role::Primary {
            term: 1,
            handover: true,
            ..
        }
    ));
    // Nothing is promoted while the primary hands over.
    t.advance(20 * MS);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 1);
    let mut done = primary(1, &["b", "c", "d"], true);
    done.alive = still_exiting;
    done.handed_over = true;
    if !still_exiting {
        done.exit = Some("exit code 4 (handed over)".into());
    }
    t.report("a", vec![done]);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.primary.as_deref()), (2, Some("d")));
    assert!(matches!(
        t.last_assign("d").unwrap().vms["web"].role,
        Role::Primary {
            term: 2,
            source: Source::Promote,
            ..
        }
    ));
    assert!(t.last_assign("a").unwrap().vms.is_empty());
}

/// A primary that handed over while its target went silent: the other synced backup takes
/// over (every backup holds the handed-over checkpoint), never the silent target.
#[test]
fn a_handover_to_a_target_gone_silent_promotes_another_synced_backup() {
    let mut t = T::protected_vm();
    t.m.migrate(t.now, "web", "b").unwrap();
    t.drain();
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "migrating");
    // b's host falls silent; the primary hands over meanwhile.
    t.advance(200 * MS);
    t.report("c", vec![backup(1, 12, 3)]);
    let mut done = primary(1, &["b", "c"], true);
    done.handed_over = true;
    t.report("a", vec![done]);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.primary.as_deref()), (2, Some("c")));
    assert!(t.out.iter().any(|o| matches!(o, Output::Event(e)
        if e.kind == EventKind::Detected && e.detail.contains("not heard: c instead"))));
}

/// A handover the manager already gave up on, answered late: the primary is stopped for
/// good, so it is failed over at once (not after its process exits or the hung timer).
#[test]
fn a_handover_answered_after_the_manager_gave_up_fails_over_at_once() {
    let mut t = T::protected_vm();
    t.m.migrate(t.now, "web", "b").unwrap();
    t.drain();
    for _ in 0..600 {
        t.advance(10 * MS);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 12, 3)]);
        t.report("c", vec![backup(1, 12, 3)]);
    }
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
    let mut done = primary(1, &["b", "c"], true);
    done.handed_over = true;
    t.report("a", vec![done]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 2);
}

#[test]
fn a_handover_that_does_not_complete_is_abandoned_and_the_primary_runs_on() {
    let mut t = T::protected_vm();
    t.m.migrate(t.now, "web", "b").unwrap();
    t.drain();
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "migrating");
    for _ in 0..1100 {
        t.advance(5 * MS);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 3)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.status.as_str()), (1, "protected"));
    assert!(matches!(
        t.last_assign("a").unwrap().vms["web"].role,
        Role::Primary {
            handover: false,
            ..
        }
    ));
}

#[test]
fn a_vm_whose_primary_and_backups_hosts_all_went_silent_is_down_until_a_backup_is_back() {
    let mut t = T::protected_vm();
    // a, b and c die together: nobody can witness, only d heartbeats.
    for _ in 0..100 {
        t.advance(5 * MS);
        t.report("d", vec![]);
    }
    // Within a lost backup's timeout: the manager cannot tell; it only shows it unreachable.
    assert_eq!(t.events(EventKind::Lost), 0);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "unreachable");
    for _ in 0..300 {
        t.advance(5 * MS);
        t.report("d", vec![]);
    }
    // Then it is down, said once, and nothing is promoted or started elsewhere.
    assert_eq!(t.events(EventKind::Lost), 1);
    assert_eq!(t.events(EventKind::Detected), 0);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.status.as_str(), v.term), ("down", 1));
    assert!(t.last_assign("d").is_none_or(|a| a.vms.is_empty()));
    // c comes back with its image (a new backup process: it has heard nothing yet): it is
    // promoted at term 2.
    t.m.handle(
        t.now,
        Input::Hello {
            host: "c".into(),
            repl_ip: "ip-c".into(),
            capacity_mib: 1024,
        },
    );
    // Its agent's first reports, before its backup runs again: still down, not said again.
    // (Its report from before it died says nothing of now.)
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "down");
    t.report("c", vec![]);
    t.advance(5 * MS);
    t.report("c", vec![]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "down");
    assert_eq!(t.events(EventKind::Lost), 1);
    let mut back = backup(1, 12, 0);
    back.silent_ms = None;
    t.report("c", vec![back]);
    assert_eq!(t.events(EventKind::Lost), 1);
    assert_eq!(t.events(EventKind::Detected), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.primary.as_deref(), v.term), (Some("c"), 2));
}

#[test]
fn a_vm_created_again_under_its_old_name_starts_above_its_old_term() {
    let mut t = T::protected_vm();
    t.m.failover(t.now, "web", None).unwrap();
    t.drain();
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 2);
    t.m.delete(t.now, "web").unwrap();
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 3);
    assert!(t
        .out
        .iter()
        .any(|o| matches!(o, Output::Persist(s) if s.retired.get("web") == Some(&2))));
}

#[test]
fn after_a_restart_no_primary_is_given_a_backup_whose_address_is_unknown() {
    let t = T::protected_vm();
    let state = t.m.state().clone();
    let mut m = Manager::new(ManagerConfig::default(), state, t.now);
    // Only the primary's host is back so far.
    m.handle(
        t.now,
        Input::Hello {
            host: "a".into(),
            repl_ip: "10.0.0.1".into(),
            capacity_mib: 1024,
        },
    );
    m.tick(t.now + MS);
    let mut outs = vec![];
    while let Some(o) = m.poll_output() {
        outs.push(o);
    }
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Assign { .. })),
        "{outs:?}"
    );
    for (i, h) in ["b", "c", "d"].iter().enumerate() {
        m.handle(
            t.now + MS,
            Input::Hello {
                host: h.to_string(),
                repl_ip: format!("10.0.0.{}", i + 2),
                capacity_mib: 1024,
            },
        );
    }
    let mut outs = vec![];
    while let Some(o) = m.poll_output() {
        outs.push(o);
    }
    let a = outs.iter().find_map(|o| match o {
        Output::Assign { host, assignments } if host == "a" => Some(assignments),
        _ => None,
    });
    assert!(
        matches!(&a.unwrap().vms["web"].role, Role::Primary { backups, .. }
        if backups.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>() == ["10.0.0.2:7100", "10.0.0.3:7100"])
    );
}

#[test]
fn a_restarted_manager_does_not_call_a_vm_down_before_hearing_its_hosts() {
    let t = T::protected_vm();
    let state = t.m.state().clone();
    // Agents take a while to reconnect to a restarted manager: only d is back for 3 s.
    let mut m = Manager::new(ManagerConfig::default(), state, t.now);
    m.handle(
        t.now,
        Input::Hello {
            host: "d".into(),
            repl_ip: "10.0.0.4".into(),
            capacity_mib: 1024,
        },
    );
    for k in 1..600 {
        let now = t.now + k * 5 * MS;
        m.handle(
            now,
            Input::Report {
                host: "d".into(),
                report: Report::default(),
            },
        );
        m.tick(now);
    }
    let mut outs = vec![];
    while let Some(o) = m.poll_output() {
        outs.push(o);
    }
    assert!(!outs.iter().any(
        |o| matches!(o, Output::Event(e) if matches!(e.kind, EventKind::Lost | EventKind::Detected))
    ));
    assert_eq!(
        m.vm(t.now + 3000 * MS, "web").unwrap().status,
        "unreachable"
    );
}

#[test]
fn a_vm_whose_ports_touch_another_vms_is_refused() {
    // Web's backups listen on 7100 and, for their data connection, 7101.
    let mut t = T::new(&["a", "b"]);
    t.m.create(t.now, spec(1)).unwrap();
    let on = |name: &str, port: u16| failover::model::VmSpec {
        name: name.into(),
        port,
        ..spec(1)
    };
    for port in [7099, 7101] {
        let r = t.m.create(t.now, on("api", port));
        assert!(
            matches!(&r, Err(ApiError::Invalid(e)) if e.contains("VM web uses port 7100")),
            "{port}: {r:?}"
        );
    }
    let r = t.m.create(t.now, on("api", 65535));
    assert!(
        matches!(&r, Err(ApiError::Invalid(e)) if e.contains("1..=65534")),
        "{r:?}"
    );
    t.m.create(t.now, on("api", 7102)).unwrap();
    assert_eq!(t.m.state().vms.len(), 2);
}
