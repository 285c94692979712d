//! Clones through the manager and agents (issue 11, part 2b) on real KVM, taps and namespaces:
//! a protected VM is created, `vmatrix vm scale --clones 2` starts two clones on its backup's
//! host (a base the backup exported between two checkpoints: the primary is never paused for
//! it), the service and its protection going on; they answer with the parent's data on their
//! own addresses; a failover of the parent to that host leaves them running (same processes);
//! the crash of that host (the parent's primary and the clones) fails the parent over and has
//! the clones placed again where a base can be made; `--clones 0` stops them.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::clones::wait_clone;
use support::managed::Managed;
use support::*;

fn scale(m: &Managed, n: u32) {
    m.scale(n);
}

fn clone_hosts(v: &serde_json::Value) -> Vec<(String, String)> {
    Managed::clone_states(v)
}

fn clone_addr(m: &Managed, i: u32) -> SocketAddr {
    m.clone_addr(i)
}

#[test]
fn clones_through_the_manager_follow_the_count_and_survive_the_parents_failover() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Managed::start(dir.path(), 3);
    let v = m.create_protected(1);
    let primary = v["primary"].as_str().unwrap().to_string();
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET colour blue").unwrap(), "OK");

    // Two clones: each answers with the parent's data on its own address.
    let t0 = Instant::now();
    scale(&m, 2);
    for i in 0..2 {
        wait_clone(&m, i, "VALUE blue", Duration::from_secs(20));
    }
    eprintln!(
        "scale --clones 2 → both answering: {} ms (base made on demand)",
        t0.elapsed().as_millis()
    );
    let v = m.wait_vm("web", "clones running", Duration::from_secs(10), |v| {
        clone_hosts(v)
            .iter()
            .filter(|(_, s)| s == "running")
            .count()
            == 2
    });
    let backup = v["backups"][0]["host"].as_str().unwrap().to_string();
    assert!(
        clone_hosts(&v).iter().all(|(h, _)| *h == backup),
        "on the backup's host, whose base is the backup's export (the primary is never paused \
         for a base while a backup can export): {v}"
    );
    assert_eq!(v["status"], "protected", "the parent is still protected");
    assert_eq!(v["term"], 1, "clones take no term");
    // A write on a clone is its own; the parent keeps its value.
    let mut c0 = connect_retry(clone_addr(&m, 0), Duration::from_secs(10));
    assert_eq!(c0.cmd("SET colour red").unwrap(), "OK");
    assert_eq!(kv.cmd("GET colour").unwrap(), "VALUE blue");
    wait_clone(&m, 1, "VALUE blue", Duration::from_secs(5));
    let ph = m.host_index(&primary);
    let bh = m.host_index(&backup);
    let pids = m.vm_pids(bh, "clone-vm");
    assert_eq!(pids.len(), 2, "one process per clone: {pids:?}");
    assert!(m.vm_pids(ph, "clone-vm").is_empty());

    // The parent fails over to its backup: the clones run on, the same processes.
    let out = m.cli(&["vm", "failover", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = m.wait_vm("web", "protected at term 2", Duration::from_secs(30), |v| {
        v["term"] == 2 && v["primary"] != primary.as_str() && v["status"] == "protected"
    });
    assert_eq!(v["primary"], backup.as_str());
    assert_eq!(
        m.vm_pids(bh, "clone-vm"),
        pids,
        "clones untouched by the failover"
    );
    wait_clone(&m, 0, "VALUE red", Duration::from_secs(5));
    wait_clone(&m, 1, "VALUE blue", Duration::from_secs(5));

    host_crash_then_scale_down(&mut m, bh);
}

/// The clones' host `ph`, which now runs the parent's primary too, crashes: the parent fails
/// over to its backup, and the clones are placed again where a base can be made and serve the
/// parent's data again; then scaled to 0, they stop, and the parent serves.
fn host_crash_then_scale_down(m: &mut Managed, ph: usize) {
    let crashed = m.net.host_name(ph);
    let t1 = Instant::now();
    m.crash_host(ph);
    for i in 0..2 {
        wait_clone(m, i, "VALUE blue", Duration::from_secs(30));
    }
    eprintln!(
        "clones' host crashed → both answering again elsewhere: {} ms",
        t1.elapsed().as_millis()
    );
    let v = m.wait_vm("web", "clones re-placed", Duration::from_secs(10), |v| {
        let c = clone_hosts(v);
        c.len() == 2 && c.iter().all(|(h, s)| *h != crashed && s == "running")
    });
    let new_primary = m.vm("web").unwrap()["primary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(new_primary, crashed, "the parent failed over");
    let stopped = m.events_of("clone_stopped");
    assert!(
        stopped.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("host went silent"))),
        "{stopped:?}"
    );
    // (Two at first, and both again.)
    assert_eq!(m.events_of("clone_started").len(), 4, "{v}");
    assert!(!m.events_of("scaled").is_empty());

    // Scale to 0: the clones stop.
    let holders: Vec<usize> = clone_hosts(&v)
        .iter()
        .map(|(h, _)| m.host_index(h))
        .collect();
    scale(m, 0);
    for h in holders {
        m.wait_no_vm_process(h, "clone-vm", Duration::from_secs(10));
    }
    assert!(KvClient::connect(clone_addr(m, 0))
        .and_then(|mut c| {
            c.set_timeout(Duration::from_millis(300));
            c.cmd("GET colour")
        })
        .is_err());
    let v = m.vm("web").unwrap();
    assert_eq!(v["primary"], new_primary, "the parent did not move");
    assert_eq!(v["clones"]["desired"], 0);
    assert!(clone_hosts(&v).is_empty());
    // The parent served all along.
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(10));
    assert_eq!(kv.cmd("GET colour").unwrap(), "VALUE blue");
}

/// The backup whose export is to make the clones' base is killed -9 right after the scale-up
/// (its export under way or about to start): no clone starts from a half-made base, the clone
/// answers once a base can be made again (from the primary while the VM has no synced backup,
/// or from its backup once it is back), and the parent is served throughout.
#[test]
fn a_backup_killed_while_it_exports_a_base_leaves_no_half_base_and_the_clone_comes() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let m = Managed::start(dir.path(), 2);
    let v = m.create_protected(1);
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET colour blue").unwrap(), "OK");
    let bh = m.host_index(v["backups"][0]["host"].as_str().unwrap());
    let t0 = Instant::now();
    scale(&m, 1);
    m.kill_vm_process(bh, "backup");
    let took = wait_clone(&m, 0, "VALUE blue", Duration::from_secs(30));
    eprintln!("backup killed at the scale-up → clone answering: {took:?}");
    let log = m.agent_log(bh);
    for l in log.lines().filter(|l| l.contains("clone base")) {
        eprintln!("  agent: {l}");
    }
    assert_eq!(
        kv.cmd("GET colour").unwrap(),
        "VALUE blue",
        "the parent served"
    );
    // Every base left on either host is whole: its term file is written last, after the
    // snapshot's own description; a failed one was removed.
    for h in 0..2 {
        let vm_dir = m.host_file(h, "clones/web");
        for b in std::fs::read_dir(&vm_dir).into_iter().flatten().flatten() {
            let p = b.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("base-"))
            {
                assert!(
                    !p.join("term").exists() || p.join("snap/snapshot.bin").exists(),
                    "a base without its snapshot: {}",
                    p.display()
                );
            }
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}
