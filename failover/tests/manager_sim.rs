//! Seeded simulations of the manager and the agents' reconcile logic in virtual time (the
//! simulated world is `sim/`, shared with `clones_sim.rs`).
//!
//! Hosts run simulated VM processes (a primary that checkpoints every 10 ms to its backups and
//! releases output once every backup in its set acknowledged; backups that keep an image of
//! `(term, version)` on the host's disk, which survives crashes). Agents run the real
//! [`failover::agent::reconcile`]; the manager is the real `Manager` with an in-memory store.
//! Faults: host crashes and restarts, manager↔host partitions (short ones delay messages, long
//! ones drop the connection), primary↔backup link cuts, primary process crashes and stalls
//! (SIGSTOP: no checkpoints, no answers to its agent, later perhaps SIGCONT), manager crashes
//! (it restarts from the store only; unprocessed outputs are lost).
//!
//! Checked at every step: terms only grow; at most one live primary per term; no output a
//! client saw is lost by a promotion (the promoted image is at least every version released by
//! older terms); no primary of an older term releases output once a newer term's primary did.
//! Then a liveness phase (all hosts up, links healed): the VM must be running, protected by as
//! many backups as it asks for. Every run prints its seed; `VMATRIX_SEED=n` replays one.

mod sim;

use std::time::Duration;

use sim::world::{Sim, VM};

fn run(seed: u64, downs: &std::cell::Cell<u32>, promotions: &std::cell::Cell<u32>) {
    let mut s = Sim::new(seed, 3 + (seed % 2) as usize);
    // Safety phase: faults now and then, never two at once too often.
    for _ in 0..6000 {
        if s.rng.chance(2) {
            s.fault();
        }
        s.step();
    }
    promotions.set(promotions.get() + s.promotions);
    // Liveness phase: everything healed; the VM must run, protected, again.
    s.heal_all();
    s.note("HEAL everything".into());
    let deadline = s.now + Duration::from_secs(6);
    let mut ok = false;
    while s.now < deadline {
        s.step();
        let v = s.mgr.vm(s.now, VM).expect("the VM exists");
        if v.status == "protected" && v.backups.len() == v.spec.backups as usize {
            ok = true;
            break;
        }
        if v.status == "down" && s.now + Duration::from_secs(1) > deadline {
            // Down is right only when the primary of the current term died before every backup
            // in its set had acknowledged it (it may have released output none of them holds);
            // a backup that holds everything must be promoted, never left idle.
            let rec = s.store.state.vms.get(VM).expect("stored");
            assert!(
                !rec.backups.iter().any(|b| b.synced_term == Some(rec.term)),
                "seed {seed}: the VM is down although a synced backup exists: {rec:?}"
            );
            eprintln!(
                "seed {seed}: down after the heal (term {} died before a backup was synced)",
                v.term
            );
            downs.set(downs.get() + 1);
            ok = true;
            break;
        }
    }
    if !ok {
        let v = s.mgr.vm(s.now, VM);
        panic!("seed {seed}: not protected after the heal: {v:?}");
    }
    let retried = s
        .log
        .iter()
        .filter(|l| l.contains("never ran its guest"))
        .count();
    RETRIES.fetch_add(retried, std::sync::atomic::Ordering::Relaxed);
}

/// Promotions retried because a crash cut the first one short before its guest ran.
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn seeded_faults_never_lose_released_output_or_make_two_primaries() {
    let downs = std::cell::Cell::new(0);
    let promotions = std::cell::Cell::new(0);
    // (`VMATRIX_SEEDS=a..b` runs a range, a longer soak; otherwise seeds 1..=40.)
    let runs = sim::for_each_seed("manager_sim", 1..=40, |seed| run(seed, &downs, &promotions));
    eprintln!(
        "{} runs, {} promotions ({} retried after a crash before the guest ran), {} ended down",
        runs,
        promotions.get(),
        RETRIES.load(std::sync::atomic::Ordering::Relaxed),
        downs.get()
    );
    assert!(
        runs < 10 || promotions.get() as usize * 2 >= runs,
        "too few promotions to mean anything"
    );
    // Most runs must end protected: a manager that never marked a backup synced would leave
    // every run down.
    assert!(
        runs < 10 || downs.get() * 3 <= runs as u32,
        "{} of {} runs ended down",
        downs.get(),
        runs
    );
}
