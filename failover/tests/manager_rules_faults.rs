//! The manager's rules about failing links, stalled hosts and promotions cut short, with
//! hand-made agent reports in virtual time (the rest: `manager_rules.rs`).

mod common;

use common::*;
use failover::event::EventKind;
use failover::manager::{Input, ManagerConfig};
use failover::model::{Role, Source};

/// Every host stalls together for 70 ms (this machine's hosts share two CPUs), and the backups'
/// first reports after it, which reach the manager before the primary's, say checkpoints
/// stopped 129 ms ago: that silence is their own stall, so it counts only from when their hosts
/// were heard again (a chaos soak finding). A primary that really died in the stall is still
/// failed over, `detect` after the backups' hosts came back.
#[test]
fn a_backup_host_back_from_its_own_stall_does_not_witness_its_stall() {
    let mut t = T::protected_vm();
    let backups = |t: &mut T, silent: u64| {
        t.report("b", vec![backup(1, 10, silent)]);
        t.report("c", vec![backup(1, 12, silent)]);
        t.report("d", vec![]);
    };
    let primary_ok = |t: &mut T| t.report("a", vec![primary(1, &["b", "c"], true)]);
    let stall = |t: &mut T| {
        for _ in 0..14 {
            t.advance(5 * MS);
        }
    };
    for _ in 0..20 {
        t.advance(5 * MS);
        primary_ok(&mut t);
        backups(&mut t, 3);
    }
    stall(&mut t);
    backups(&mut t, 129);
    assert_eq!(t.events(EventKind::Detected), 0);
    primary_ok(&mut t);
    for _ in 0..40 {
        t.advance(5 * MS);
        primary_ok(&mut t);
        backups(&mut t, 3);
    }
    assert_eq!(t.events(EventKind::Detected), 0);
    // The same stall, but the primary's host died in it.
    stall(&mut t);
    let mut silent = 129;
    backups(&mut t, silent);
    let back = t.now;
    while t.events(EventKind::Detected) == 0 {
        assert!(t.now - back < 200 * MS, "never detected");
        t.advance(5 * MS);
        silent += 5;
        backups(&mut t, silent);
    }
    let after = t.now - back;
    let detect = ManagerConfig::default().detect;
    assert!(after > detect && after <= detect + 10 * MS, "{after:?}");
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

/// The primary's link to one backup is cut (both hosts heard by the manager): that backup hears
/// nothing for longer than `backup_lost` while the primary answers, so it leaves the set (the
/// primary would hold output for it forever) and another host takes its place; a backup silent
/// for less, or silent because the primary itself stopped answering, stays.
#[test]
fn a_backup_cut_from_a_running_primary_leaves_the_set() {
    let mut t = T::protected_vm();
    // (Its session to b failed: it no longer says it is protected by its whole set.)
    let mut answering = primary(1, &["b", "c"], false);
    answering.silent_ms = Some(0);
    // (A backup's silence counts from when this term's primary was first seen running.)
    for _ in 0..200 {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![backup(1, 10, 1000)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 0);
    // A primary that says every backup is in step contradicts b's silence (a stall of b's
    // host, an overloaded primary): b stays (a crash soak finding: a synced backup dropped
    // that way left only an unsynced replacement for the next crash).
    let mut in_step = answering.clone();
    in_step.protected = true;
    t.report("a", vec![in_step]);
    t.report("b", vec![backup(1, 10, 1600)]);
    assert_eq!(t.events(EventKind::BackupLost), 0);
    t.report("a", vec![answering.clone()]);
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

/// A backup that has never heard from the running primary that has it in its set (the link was
/// cut before their first session; the primary holds output and retries) leaves the set after
/// twice `backup_lost`, and re-protection avoids its host while another one can take it.
#[test]
fn a_backup_that_never_heard_from_its_primary_leaves_the_set_for_another_host() {
    let mut t = T::new(&["a", "b", "c"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    let never = || {
        let mut b = backup(1, 0, 0);
        (b.silent_ms, b.image_term, b.seq) = (None, 0, None);
        b
    };
    let lost = ManagerConfig::default().backup_lost;
    let mut answering = primary(1, &["b"], false);
    answering.silent_ms = Some(0);
    while t.now < 2 * lost {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![never()]);
        t.report("c", vec![]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 0);
    t.advance(20 * MS);
    t.report("a", vec![answering.clone()]);
    t.report("b", vec![never()]);
    assert_eq!(t.events(EventKind::BackupLost), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    let hosts: Vec<&str> = v.backups.iter().map(|b| b.host.as_str()).collect();
    // (b and c are equally loaded now: c, because b's link to the primary just failed.)
    assert_eq!(hosts, ["c"]);
    // A backup that does hear from it is never dropped on this ground.
    let mut t = T::protected_vm();
    for _ in 0..400 {
        t.advance(10 * MS);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 3)]);
        t.report("c", vec![backup(1, 12, 3)]);
        t.report("d", vec![]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 0);
    // A clock from an earlier stretch does not count: b never heard for 2 s, then the manager
    // stops hearing the primary (b gets checkpoints again), then b's process restarts (never
    // heard again) as the primary is heard again: b is not dropped at once (the chaos soak
    // saw "27595 ms" this way, right after a promotion), only after the full wait again.
    let mut t = T::new(&["a", "b", "c"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    let (start, lost) = (t.now, ManagerConfig::default().backup_lost);
    while t.now < start + 2 * MS * 1000 {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![never()]);
    }
    for i in 0..100 {
        t.advance(10 * MS);
        match !(10..90).contains(&i) {
            true => t.report("b", vec![never()]),
            false => t.report("b", vec![backup(1, 0, 3)]),
        }
    }
    let back = t.now;
    while t.now < back + lost {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![never()]);
    }
    assert_eq!(
        t.events(EventKind::BackupLost),
        0,
        "dropped on an old clock"
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
    // Retried at most RETRY_LIMIT times in a row, each after a growing backoff: then down.
    never.term = 3;
    t.report("c", vec![never.clone()]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().term,
        3,
        "retried without a backoff"
    );
    for term in 3..3 + u64::from(failover::manager::RETRY_LIMIT) {
        never.term = term;
        for _ in 0..300 {
            t.advance(5 * MS);
            t.report("c", vec![never.clone()]);
            t.report("b", vec![backup(term, 10, 5)]);
        }
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

/// The primary is cut from the manager only; later, its checkpoints pause for longer than
/// `detect` (a busy host): the manager lost it well before its backups did, so it was alive
/// while cut, and the pause must last `hung` before it is failed over. A crash (both signals
/// stop together) is still detected after `detect`.
#[test]
fn a_pause_of_a_primary_already_cut_from_the_manager_must_last_as_long_as_a_hang() {
    let mut t = T::protected_vm();
    let report = |t: &mut T, silent: u64| {
        t.report("b", vec![backup(1, 10, silent)]);
        t.report("c", vec![backup(1, 12, silent)]);
        t.report("d", vec![]);
    };
    for _ in 0..100 {
        t.advance(5 * MS);
        report(&mut t, 3);
    }
    let mut silent = 3;
    while t.events(EventKind::Detected) == 0 {
        t.advance(5 * MS);
        silent += 5;
        report(&mut t, silent);
        assert!(silent < 2000, "never failed over");
    }
    let hung = ManagerConfig::default().hung;
    assert!(
        silent > hung.as_millis() as u64 && silent <= hung.as_millis() as u64 + 10,
        "failed over after a pause of {silent} ms"
    );
}

/// A promoted primary is seen alive from its process's start, before its guest's (review
/// finding): one that then dies before the start gate (its image still whole) is promoted again
/// although the VM already counted as running; the backups' silence from the previous primary
/// does not drop them from the new one's set; the retry count is persisted (a restarted manager
/// keeps the bound).
#[test]
fn a_primary_seen_running_that_died_before_its_guest_ran_is_promoted_again() {
    let mut t = T::protected_vm();
    let mut dead = primary(1, &["b", "c"], true);
    dead.alive = false;
    t.report("a", vec![dead]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().term, 2);
    // c's process runs (not its guest yet); b last heard the old primary 2 s ago.
    t.report("c", vec![primary(2, &["b", "d"], false)]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
    t.advance(10 * MS);
    t.report("b", vec![backup(2, 10, 2000)]);
    t.report("c", vec![primary(2, &["b", "d"], false)]);
    assert_eq!(
        t.events(EventKind::BackupLost),
        0,
        "dropped for the old primary's silence"
    );
    // Then it dies before the gate.
    let mut never = primary(2, &["b", "d"], false);
    (never.alive, never.never_ran) = (false, true);
    t.report("c", vec![never]);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!((v.term, v.primary.as_deref()), (3, Some("c")), "{v:?}");
    assert_eq!(t.m.state().vms["web"].retries, 1);
}

/// A backup dropped for a cut link and added again (the only host left) is not dropped again
/// at once on its unchanged report ("nothing from the primary for 5516 ms"): its silence counts
/// from when it joined the set again (a crash-in-sync soak finding: a drop/add loop).
#[test]
fn a_backup_added_again_is_not_dropped_again_on_its_old_silence() {
    let mut t = T::new(&["a", "b"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    let mut answering = primary(1, &["b"], false);
    answering.silent_ms = Some(0);
    let lost = ManagerConfig::default().backup_lost;
    let start = t.now;
    while t.now < start + lost + 200 * MS {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![backup(1, 10, 5516)]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 1);
    let v = t.m.vm(t.now, "web").unwrap();
    assert_eq!(v.backups.len(), 1, "b added again (the only host): {v:?}");
    for _ in 0..50 {
        t.advance(10 * MS);
        t.report("a", vec![answering.clone()]);
        t.report("b", vec![backup(1, 10, 5516)]);
    }
    assert_eq!(t.events(EventKind::BackupLost), 1, "dropped again at once");
}

/// With only backups that never heard from the primary (a restarted backup process), a short
/// silence of the primary's host is not a failure (the VM was called lost after 60-130 ms
/// stalls); a long one (`hung`) still is.
#[test]
fn backups_that_never_heard_from_the_primary_need_a_long_silence() {
    let mut t = T::new(&["a", "b"]);
    t.m.create(t.now, spec(1)).unwrap();
    t.drain();
    t.report("a", vec![primary(1, &["b"], false)]);
    let mut never = backup(1, 0, 0);
    never.silent_ms = None;
    for _ in 0..30 {
        t.advance(5 * MS);
        t.report("b", vec![never.clone()]);
    }
    assert_eq!(t.events(EventKind::Lost) + t.events(EventKind::Detected), 0);
    t.report("a", vec![primary(1, &["b"], false)]);
    let start = t.now;
    while t.events(EventKind::Lost) == 0 {
        assert!(t.now - start < 2 * ManagerConfig::default().hung, "never");
        t.advance(5 * MS);
        t.report("b", vec![never.clone()]);
    }
    assert!(t.now - start >= ManagerConfig::default().hung);
}

/// A primary's "protected" outlives a backup that restarted from nothing or whose host died:
/// the VM is protected only while every backup is heard and holds an image of the term (the
/// chaos runner once crashed a "protected" primary whose only backup held nothing).
#[test]
fn protected_needs_every_backup_heard_and_holding_an_image_of_the_term() {
    let mut t = T::protected_vm();
    // c's backup process restarted with its image removed: it holds nothing yet.
    let mut empty = backup(1, 0, 0);
    empty.image_term = 0;
    empty.seq = None;
    empty.silent_ms = None;
    t.advance(5 * MS);
    t.report("a", vec![primary(1, &["b", "c"], true)]);
    t.report("b", vec![backup(1, 14, 5)]);
    t.report("c", vec![empty]);
    assert_eq!(
        t.m.vm(t.now, "web").unwrap().status,
        "unprotected (syncing)"
    );
    // It holds the term's image again: protected again.
    t.advance(5 * MS);
    t.report("c", vec![backup(1, 14, 5)]);
    t.report("a", vec![primary(1, &["b", "c"], true)]);
    assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
    // c's host goes silent while the stale primary still says protected: not for long.
    let lost = ManagerConfig::default().backup_lost;
    let start = t.now;
    while t.now < start + lost + 20 * MS {
        t.advance(10 * MS);
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 14, 5)]);
    }
    assert_ne!(t.m.vm(t.now, "web").unwrap().status, "protected");
}
