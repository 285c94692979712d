//! Clones on a host that runs nothing of their VM (issue 11), on real KVM, taps, namespaces and
//! QUIC: the protected VM's primary's and backup's hosts have no room for a clone, so `vm scale
//! --clones 2` places both on the third host, whose agent copies the base the backup's host
//! exported (its agent's base server, mutual TLS, agent role): the copy equals the source byte
//! for byte, the clones answer with the parent's data, the primary is never paused for a base.
//! Then the copy's source host crashes (the VM's backup with it): the clones run on from their
//! copy, the VM gets a new backup, and a third clone comes.

mod support;

use std::time::{Duration, Instant};

use support::clones::wait_clone;
use support::managed::Managed;
use support::*;

/// The newest whole base of "web" on host `i` (its directory).
fn newest_base(m: &Managed, i: usize) -> Option<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(m.host_file(i, "clones/web"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("term").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

#[test]
fn clones_on_a_host_running_nothing_of_the_vm_copy_its_base() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Managed::start(dir.path(), 3);
    let v = m.create_protected(1);
    let ph = m.host_index(v["primary"].as_str().unwrap());
    let bh = m.host_index(v["backups"][0]["host"].as_str().unwrap());
    let other = (0..3).find(|i| *i != ph && *i != bh).unwrap();
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET colour blue").unwrap(), "OK");
    // The primary's and the backup's hosts offer only the VM's memory: no room for a clone.
    for h in [ph, bh] {
        m.kill_agent(h);
        m.start_agent_with(h, &["--capacity-mib", "64"]);
    }
    // (Once the manager heard both again: `host list`'s CAPACITY_MIB column.)
    let (pn, bn) = (m.net.host_name(ph), m.net.host_name(bh));
    let t0 = Instant::now();
    loop {
        let out = String::from_utf8_lossy(&m.cli(&["host", "list"]).stdout).into_owned();
        let full = |n: &str| {
            out.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&n) && f.get(1) == Some(&"up") && f.get(6) == Some(&"64")
            })
        };
        if full(&pn) && full(&bn) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{out}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let t0 = Instant::now();
    m.scale(2);
    for i in 0..2 {
        wait_clone(&m, i, "VALUE blue", Duration::from_secs(30));
    }
    eprintln!(
        "scale --clones 2 → both answering on the third host: {} ms (export, copy, check, start)",
        t0.elapsed().as_millis()
    );
    let v = m.wait_vm("web", "clones running", Duration::from_secs(10), |v| {
        Managed::clone_states(v)
            .iter()
            .filter(|(_, s)| s == "running")
            .count()
            == 2
    });
    let third = m.net.host_name(other);
    assert!(
        Managed::clone_states(&v).iter().all(|(h, _)| *h == third),
        "both on the host running nothing of the VM: {v}"
    );
    assert_eq!(v["status"], "protected");
    let backup = m.net.host_name(bh);
    assert!(
        m.events().contains(&format!("{third} copies a base")),
        "{}",
        m.events()
    );
    let log = m.agent_log(other);
    let copied = log
        .lines()
        .find(|l| l.contains("copied from"))
        .unwrap_or("");
    eprintln!("  agent: {copied}");
    assert!(copied.contains(&backup), "{log}");
    // The primary was never paused for a base: its agent made none (no snapshot asked of it).
    let plog = m.agent_log(ph);
    assert!(
        !plog.contains("clone base of term"),
        "a base on the primary's host: {plog}"
    );
    // The copy equals its source, byte for byte (each host's newest base: the source refreshes
    // only after a minute).
    let (src, dst) = (
        newest_base(&m, bh).unwrap(),
        newest_base(&m, other).unwrap(),
    );
    for f in ["snapshot.bin", "memory.bin", "disk.img"] {
        let a = std::fs::read(src.join("snap").join(f)).unwrap();
        let b = std::fs::read(dst.join("snap").join(f)).unwrap();
        assert!(a == b, "{f} of the copy differs from its source's");
    }
    // A write on a clone is its own.
    let mut c0 = connect_retry(m.clone_addr(0), Duration::from_secs(10));
    assert_eq!(c0.cmd("SET colour red").unwrap(), "OK");
    assert_eq!(kv.cmd("GET colour").unwrap(), "VALUE blue");

    source_host_crashes(&mut m, bh, other);
}

/// The host the base was copied from crashes (the VM's backup with it): the clones run on from
/// their copy (same processes), the VM is protected again, and a third clone comes.
fn source_host_crashes(m: &mut Managed, bh: usize, other: usize) {
    let pids = m.vm_pids(other, "clone-vm");
    assert_eq!(pids.len(), 2, "{pids:?}");
    m.crash_host(bh);
    std::thread::sleep(Duration::from_secs(2));
    wait_clone(m, 0, "VALUE red", Duration::from_secs(5));
    wait_clone(m, 1, "VALUE blue", Duration::from_secs(5));
    assert_eq!(m.vm_pids(other, "clone-vm"), pids, "the clones ran on");
    m.wait_vm("web", "protected again", Duration::from_secs(60), |v| {
        v["status"] == "protected"
    });
    let t0 = Instant::now();
    m.scale(3);
    wait_clone(m, 2, "VALUE blue", Duration::from_secs(60));
    eprintln!(
        "after the source's crash, a third clone answering: {} ms",
        t0.elapsed().as_millis()
    );
}
