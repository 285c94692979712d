//! The manager's rules one at a time, with hand-made agent reports in virtual time.

use std::time::Duration;

use failover::event::EventKind;
use failover::manager::{Input, Manager, ManagerConfig, Output};
use failover::model::{Assignments, ProcRole, Report, Role, Source, VmObservation, VmSpec};

const MS: Duration = Duration::from_millis(1);

fn spec(backups: u8) -> VmSpec {
    VmSpec {
        name: "web".into(),
        mem_mib: 64,
        disk_mib: 64,
        guest_config: String::new(),
        backups,
        hosts: vec![],
        port: 7100,
    }
}

fn primary(term: u64, backups: &[&str], protected: bool) -> VmObservation {
    VmObservation {
        vm: "web".into(),
        role: ProcRole::Primary,
        alive: true,
        exit: None,
        term,
        image_term: 0,
        seq: Some(10),
        protected,
        backup_hosts: backups.iter().map(|s| s.to_string()).collect(),
        output_held: true,
        silent_ms: None,
        handed_over: false,
        never_ran: false,
    }
}

fn backup(term: u64, seq: u64, silent_ms: u64) -> VmObservation {
    VmObservation {
        vm: "web".into(),
        role: ProcRole::Backup,
        alive: true,
        exit: None,
        term,
        image_term: term,
        seq: Some(seq),
        protected: false,
        backup_hosts: vec![],
        output_held: false,
        silent_ms: Some(silent_ms),
        handed_over: false,
        never_ran: false,
    }
}

struct T {
    m: Manager,
    now: Duration,
    out: Vec<Output>,
}

impl T {
    fn new(hosts: &[&str]) -> T {
        let mut t = T {
            m: Manager::new(ManagerConfig::default(), Default::default(), Duration::ZERO),
            now: Duration::ZERO,
            out: vec![],
        };
        for h in hosts {
            t.m.handle(
                t.now,
                Input::Hello {
                    host: h.to_string(),
                    repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
                    capacity_mib: 1024,
                },
            );
        }
        t.drain();
        t
    }
    fn drain(&mut self) {
        while let Some(o) = self.m.poll_output() {
            self.out.push(o);
        }
    }
    fn report(&mut self, host: &str, vms: Vec<VmObservation>) {
        self.m.handle(
            self.now,
            Input::Report {
                host: host.into(),
                report: Report { vms },
            },
        );
        self.drain();
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.m.tick(self.now);
        self.drain();
    }
    fn events(&self, kind: EventKind) -> usize {
        self.out
            .iter()
            .filter(|o| matches!(o, Output::Event(e) if e.kind == kind))
            .count()
    }
    fn last_assign(&self, host: &str) -> Option<&Assignments> {
        self.out.iter().rev().find_map(|o| match o {
            Output::Assign {
                host: h,
                assignments,
            } if h == host => Some(assignments),
            _ => None,
        })
    }
    /// A running, protected VM: primary on a, backups on b (seq 10) and c (seq 12).
    fn protected_vm() -> T {
        let mut t = T::new(&["a", "b", "c", "d"]);
        t.m.create(t.now, spec(2)).unwrap();
        t.drain();
        let v = t.m.vm(t.now, "web").unwrap();
        assert_eq!(v.primary.as_deref(), Some("a"));
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
        t.report("d", vec![]);
        assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
        t
    }
}

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

/// The primary's host is cut from the manager; then the backups' hosts stall (this machine's
/// hosts share two CPUs): the first report after the stall says checkpoints stopped for longer
/// than `detect`, but that silence is the backups' own stall, so it counts only from when their
/// hosts were heard again (a chaos soak finding: such a primary was failed over). A primary that
/// really died is still failed over, `detect` after the backups' hosts came back.
#[test]
fn a_backup_host_back_from_its_own_stall_does_not_witness_its_stall() {
    let mut t = T::protected_vm();
    let healthy = |t: &mut T, silent: u64| {
        t.report("b", vec![backup(1, 10, silent)]);
        t.report("c", vec![backup(1, 12, silent)]);
        t.report("d", vec![]);
    };
    for _ in 0..20 {
        t.advance(5 * MS);
        healthy(&mut t, 3);
    }
    // b, c and d stall together for 70 ms (no reports), then say 129 ms.
    for _ in 0..14 {
        t.advance(5 * MS);
    }
    healthy(&mut t, 129);
    assert_eq!(t.events(EventKind::Detected), 0);
    // The primary was alive all along: checkpoints flow again.
    for _ in 0..40 {
        t.advance(5 * MS);
        healthy(&mut t, 3);
    }
    assert_eq!(t.events(EventKind::Detected), 0);
    // Same stall, but the primary is dead: failed over once the silence since the backups'
    // hosts came back exceeds `detect`.
    for _ in 0..14 {
        t.advance(5 * MS);
    }
    let mut silent = 129;
    healthy(&mut t, silent);
    let back = t.now;
    while t.events(EventKind::Detected) == 0 {
        assert!(t.now - back < 200 * MS, "never detected");
        t.advance(5 * MS);
        silent += 5;
        healthy(&mut t, silent);
    }
    let after = t.now - back;
    let detect = ManagerConfig::default().detect;
    assert!(after > detect && after <= detect + 10 * MS, "{after:?}");
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

/// A primary whose agent speaks but which answers it no more (stopped, hung): failed over once
/// it has been silent for `hung` and its backups say checkpoints stopped as long; not before,
/// not while any backup still gets checkpoints, and not without a backup to witness it.
#[test]
fn a_hung_primary_fails_over_only_when_its_backups_agree() {
    let hung = |silent_ms: u64| {
        let mut p = primary(1, &["b", "c"], true);
        p.silent_ms = Some(silent_ms);
        p
    };
    // Slow to answer, backups silent too, but not yet for `hung`.
    let mut t = T::protected_vm();
    t.report("a", vec![hung(900)]);
    t.report("b", vec![backup(1, 10, 900)]);
    t.report("c", vec![backup(1, 12, 900)]);
    assert_eq!(t.events(EventKind::Detected), 0);
    // Not answering for 1.2 s, but one backup still gets checkpoints: only the agent's polls
    // are slow.
    t.report("a", vec![hung(1200)]);
    t.report("b", vec![backup(1, 10, 1200)]);
    t.report("c", vec![backup(1, 12, 5)]);
    assert_eq!(t.events(EventKind::Detected), 0);
    // Both backups say checkpoints stopped 1.2 s ago: hung, failed over to the most advanced.
    t.report("c", vec![backup(1, 12, 1200)]);
    t.report("a", vec![hung(1200)]);
    assert_eq!(t.events(EventKind::Detected), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.primary.as_deref()), (2, Some("c")));
    // The old host is told to run nothing of it: its agent stops the hung process.
    assert!(t.last_assign("a").unwrap().vms.is_empty());

    // Without any backup heard, a silent primary whose agent speaks is left alone.
    let mut t = T::protected_vm();
    t.report("b", vec![]);
    t.report("c", vec![]);
    t.report("a", vec![hung(5000)]);
    assert_eq!(t.events(EventKind::Detected), 0);
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

/// The primary's link to one backup is cut (both hosts heard by the manager): that backup hears
/// nothing for longer than `backup_lost` while the primary answers, so it leaves the set (the
/// primary would hold output for it forever) and another host takes its place; a backup silent
/// for less, or silent because the primary itself stopped answering, stays.
#[test]
fn a_backup_cut_from_a_running_primary_leaves_the_set() {
    let mut t = T::protected_vm();
    let mut answering = primary(1, &["b", "c"], true);
    answering.silent_ms = Some(0);
    for _ in 0..100 {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![backup(1, 10, 1000)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 0);
    t.report("b", vec![backup(1, 10, 1600)]);
    assert_eq!(t.events(EventKind::BackupLost), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    let hosts: Vec<&str> = v.backups.iter().map(|b| b.host.as_str()).collect();
    assert_eq!(hosts, ["c", "d"]);
    assert_eq!(v.term, 1);

    // A primary that stopped answering is not kept by dropping its backups.
    let mut t = T::protected_vm();
    let mut stuck = primary(1, &["b", "c"], true);
    stuck.silent_ms = Some(1600);
    t.report("a", vec![stuck]);
    t.report("b", vec![backup(1, 10, 1600)]);
    t.report("c", vec![backup(1, 12, 1600)]);
    assert_eq!(t.events(EventKind::BackupLost), 0);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 2);
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
                report: Report { vms: vec![] },
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

/// The promoted primary's host crashes before its guest ran (the chaos soak's finding): the VM
/// is down meanwhile; when the host is back and its agent reports that the term never ran (its
/// image unconsumed), the same host is promoted again at a new term. A dead primary that did
/// run (image consumed) leaves the VM down; a retry that never runs either is tried at most
/// `RETRY_LIMIT` times.
#[test]
fn a_promotion_whose_host_died_before_the_guest_ran_is_retried_from_the_same_image() {
    let mut t = T::protected_vm();
    let mut dead = primary(1, &["b", "c"], true);
    dead.alive = false;
    dead.exit = Some("killed by signal 9".into());
    t.report("a", vec![dead]);
    assert!(matches!(
        t.last_assign("c").unwrap().vms["web"].role,
        Role::Primary { term: 2, .. }
    ));
    // c dies in the promotion; b and d go on.
    for _ in 0..400 {
        t.advance(5 * MS);
        t.report("b", vec![backup(2, 10, 5)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::Lost), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "down");
    t.m.handle(
        t.now,
        Input::Hello {
            host: "c".into(),
            repl_ip: "10.0.0.3".into(),
            capacity_mib: 1024,
        },
    );
    let mut never = primary(2, &["b", "d"], false);
    (never.alive, never.never_ran) = (false, true);
    never.exit = Some("its host restarted before the guest ran".into());
    t.report("c", vec![never.clone()]);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.primary.as_deref(), v.term), (Some("c"), 3), "{v:?}");
    assert_eq!(v.status, "promoting");
    assert!(matches!(
        t.last_assign("c").unwrap().vms["web"].role,
        Role::Primary {
            term: 3,
            source: Source::Promote,
            ..
        }
    ));
    assert!(matches!(
        t.last_assign("b").unwrap().vms["web"].role,
        Role::Backup { min_term: 3 }
    ));
    // Retried at most RETRY_LIMIT times in a row: then down.
    for term in 3..3 + u64::from(failover::manager::RETRY_LIMIT) {
        never.term = term;
        t.report("c", vec![never.clone()]);
    }
    let v = t.m.vm(t.now, "web").unwrap();
    let last = 2 + u64::from(failover::manager::RETRY_LIMIT);
    assert_eq!((v.term, v.status.as_str()), (last, "down"), "{v:?}");
    // A dead primary that ran is never retried.
    let mut t = T::protected_vm();
    let mut dead = primary(1, &["b", "c"], true);
    dead.alive = false;
    t.report("a", vec![dead]);
    let mut ran = primary(2, &["b", "d"], false);
    ran.alive = false;
    ran.exit = Some("killed by signal 9".into());
    t.report("c", vec![ran]);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.status.as_str()), (2, "down"), "{v:?}");
    // Once a retried primary runs, the count starts over.
    let mut t = T::protected_vm();
    let mut dead = primary(1, &["b", "c"], true);
    dead.alive = false;
    t.report("a", vec![dead]);
    let mut never = primary(2, &["b", "d"], false);
    (never.alive, never.never_ran) = (false, true);
    t.report("c", vec![never]);
    t.report("c", vec![primary(3, &["b", "d"], false)]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
}
