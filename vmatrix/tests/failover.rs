//! Automatic failover on three hosts (network namespaces) with the manager and an agent on
//! each: a protected VM is created through the manager's API; a client writes on one TCP
//! connection; the primary's whole host crashes (links cut, every process SIGKILLed); the
//! manager detects it from both signals, raises the term and promotes the backup; the same
//! connection carries on and sees every acknowledged write; the VM is re-protected on the third
//! host; the event log tells the story. Both backups take checkpoints over a data connection
//! too (the port after the VM's).

mod support;

use std::time::{Duration, Instant};

use support::managed::{backups_of, Managed};
use support::*;

#[test]
fn a_crashed_primary_host_fails_over_automatically_and_is_reprotected() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Managed::start(dir.path(), 3);
    let v = m.create_protected(1);
    let primary = v["primary"].as_str().unwrap().to_string();
    let backup = backups_of(&v)[0].clone();
    eprintln!("primary on {primary}, backup on {backup}");
    // Checkpoints also travel over a data connection to the port after the VM's.
    m.wait_data_connection(&backup, Duration::from_secs(10));

    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    let mut acked = Vec::new();
    for i in 0..100 {
        let (k, val) = (format!("k{i}"), format!("v{i}"));
        assert_eq!(kv.cmd(&format!("SET {k} {val}")).unwrap(), "OK");
        acked.push((k, val));
    }

    // The primary's host dies.
    let crashed = Instant::now();
    m.crash_host(m.host_index(&primary));
    kv.set_timeout(Duration::from_secs(30));
    let first = kv
        .cmd("GET k0")
        .expect("the same connection answers after the failover");
    let reply_ms = crashed.elapsed().as_millis();
    assert_eq!(first, "VALUE v0");
    for (k, val) in &acked {
        assert_eq!(
            kv.cmd(&format!("GET {k}")).unwrap(),
            format!("VALUE {val}"),
            "{k}"
        );
    }
    assert_eq!(kv.cmd("SET after failover").unwrap(), "OK");
    eprintln!("first reply on the old connection {reply_ms} ms after the crash");

    // Promoted at term 2 on the backup's host, re-protected on the third.
    let v = m.wait_vm("web", "re-protected", Duration::from_secs(60), |v| {
        v["status"] == "protected" && v["term"] == 2
    });
    assert_eq!(v["primary"].as_str(), Some(backup.as_str()));
    let now_backups = backups_of(&v);
    assert_eq!(now_backups.len(), 1);
    assert!(
        now_backups[0] != primary && now_backups[0] != backup,
        "{now_backups:?}"
    );
    m.wait_data_connection(&now_backups[0], Duration::from_secs(10));
    let events = m.events();
    for kind in [
        "detected",
        "term_changed",
        "promoting",
        "primary_running",
        "backup_added",
        "protected",
    ] {
        assert!(events.contains(kind), "no {kind} event in:\n{events}");
    }
    eprintln!("{events}");
}

#[test]
fn an_agent_restart_adopts_its_running_vm_and_failover_still_works() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // With its agent dead the primary's host is silent, so only the backup's silence stands
    // between a stall of this (busy, shared) machine and a failover: a longer timeout keeps
    // the test about adoption, not about the machine's stalls (see failover_faults.rs).
    let mut m = Managed::start_with(dir.path(), 3, &["--detect-ms", "1000"]);
    let v = m.create_protected(1);
    let primary = v["primary"].as_str().unwrap().to_string();
    let p = m.host_index(&primary);
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET before restart").unwrap(), "OK");

    // The primary host's agent dies (its VM does not): the backup still gets checkpoints, so
    // this is no failover; a new agent adopts the running primary.
    m.kill_agent(p);
    for i in 0..50 {
        assert_eq!(kv.cmd(&format!("SET during{i} x")).unwrap(), "OK");
        std::thread::sleep(Duration::from_millis(10));
    }
    m.start_agent(p);
    let v = m.wait_vm("web", "protected again", Duration::from_secs(30), |v| {
        v["status"] == "protected" && v["term"] == 1
    });
    assert_eq!(v["primary"].as_str(), Some(primary.as_str()));
    assert!(!m.events().contains("detected"), "{}", m.events());
    // (The view stayed "protected" all along: wait for the new agent's word.)
    let log = dir.path().join(format!("agent-{primary}.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("adopted the running Primary of web") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The adopted primary is watched like its own: its host crashes, the VM fails over.
    m.crash_host(p);
    kv.set_timeout(Duration::from_secs(30));
    assert_eq!(kv.cmd("GET before").unwrap(), "VALUE restart");
    assert_eq!(kv.cmd("GET during49").unwrap(), "VALUE x");
    m.wait_vm("web", "failed over", Duration::from_secs(60), |v| {
        v["term"] == 2
    });
}
