//! A host that crashes in the middle of a promotion, end to end (real KVM, namespaces, QUIC, the
//! manager and an agent per host): the chaos soak found that a crash of the promoted backup's
//! host between the agent's `promote-term` marker and the new primary's start left the VM down
//! for good, although that host's image — untouched, holding every acknowledged write — came
//! back with it. Now the returning agent reports that the term never ran (the image is still
//! unconsumed: a new primary consumes it right before its guest's first instruction), and the
//! manager promotes the same image again at the next term.
//!
//! The crash point is hit exactly with the agent's hidden `--crash-at after-promote-marker`
//! hook (the agent aborts right after the marker is durable), then the whole host is killed as
//! the chaos runner's host crash does.

mod support;

use std::time::{Duration, Instant};

use support::managed::{backups_of, KvWriter, Managed};
use support::*;

const LONG: Duration = Duration::from_secs(60);

#[test]
fn a_host_crash_between_the_promotion_marker_and_the_start_is_promoted_again() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // (A generous detection timeout: every "host" shares this machine's two CPUs.)
    let mut m = Managed::start_with(dir.path(), 3, &["--detect-ms", "1000"]);
    let v = m.create_protected(1);
    let p = m.host_index(v["primary"].as_str().unwrap());
    let b = m.host_index(&backups_of(&v)[0]);
    let third = (0..3).find(|&i| i != p && i != b).unwrap();
    // The backup's agent gets the hook (its VM processes go on across the restart).
    m.kill_agent(b);
    m.start_agent_with(b, &["--crash-at", "after-promote-marker"]);
    m.wait_hosts_up(3, LONG);

    let kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    let w = KvWriter::start(kv, "pc", Duration::from_millis(5), Duration::from_secs(5));
    w.wait_acked(100, Duration::from_secs(30));
    m.crash_host(p);
    let crashed = Instant::now();

    // b's agent dies right after the marker: the promotion never completes, the VM is down.
    let v = m.wait_vm("web", "down", LONG, |v| v["status"] == "down");
    eprintln!("down {:?} after the crash: {v}", crashed.elapsed());
    assert_eq!(v["term"], 2, "{v}");
    let marker = m.text(&m.host_file(b, "web/promote-term"));
    assert_eq!(marker.trim(), "2");
    assert!(
        m.host_file(b, "web/image/replica.bin").exists(),
        "the image was consumed although no primary started"
    );
    let done = w.stop();
    eprintln!(
        "{} writes acknowledged before the crash (then: {:?})",
        done.acked.len(),
        done.error
    );

    // Then the whole host goes down and comes back.
    m.crash_host(b);
    m.net.revive(b);
    let back = Instant::now();
    m.start_agent(b);
    let v = m.wait_vm("web", "promoted again", LONG, |v| {
        v["term"] == 3 && v["primary"] == m.net.host_name(b).as_str() && v["status"] != "promoting"
    });
    eprintln!(
        "term 3 on {} {:?} after the host came back: {v}",
        v["primary"],
        back.elapsed()
    );
    let retried = m.events_of("detected");
    assert!(
        retried.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("never ran its guest"))),
        "{}",
        m.events()
    );
    // Nothing acknowledged was lost, and the image is consumed now that a guest ran from it.
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(30));
    for (k, val) in &done.acked {
        assert_eq!(
            kv.cmd(&format!("GET {k}")).unwrap(),
            format!("VALUE {val}"),
            "acknowledged write {k} missing"
        );
    }
    assert_eq!(kv.cmd("SET after-retry yes").unwrap(), "OK");
    assert!(m.host_file(b, "web/image/replica.consumed").exists());
    // Re-protected on the third host; no host ever booted the VM from nothing again.
    let v = m.wait_vm("web", "re-protected", LONG, |v| {
        v["status"] == "protected" && v["term"].as_u64() >= Some(3)
    });
    if v["term"] == 3 {
        assert_eq!(backups_of(&v), [m.net.host_name(third)]);
    }
    for i in [b, third] {
        assert!(
            !m.agent_log(i).contains("BootPrimary"),
            "host {i} booted it"
        );
    }
    eprintln!("events:\n{}", m.events());
}
