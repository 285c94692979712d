//! Snapshot and restore of the real guest on real KVM, taps and namespaces: TCP connections
//! survive a move to a new process, memory is bit-identical, diff chains equal full snapshots;
//! a restored VM stops cleanly through its control socket (`PUT /stop`).

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn boot(net: &TestNet, dir: &Path, mem: u64) -> (VmProc, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    make_disk(&disk, 32);
    let sock = dir.join("ctl.sock");
    let s = sock.to_str().unwrap().to_string();
    let mut vm = VmProc::spawn_with(
        net,
        &disk,
        &dir.join("console1.log"),
        mem,
        &["--control", &s],
    );
    vm.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    (vm, sock)
}

#[test]
fn tcp_connections_and_acknowledged_writes_survive_snapshot_kill_restore() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = boot(&net, dir.path(), 64);
    let addr = vm.addr;

    // 8 clients on long-lived connections, each checking its own keys.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(addr).expect("connect");
                kv.set_timeout(Duration::from_secs(30));
                let mut acked: HashMap<String, String> = HashMap::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || i < 50 {
                    let key = format!("c{c}k{}", i % 16);
                    let val = format!("v{i}");
                    assert_eq!(
                        kv.cmd(&format!("SET {key} {val}"))
                            .expect("SET on the same connection"),
                        "OK"
                    );
                    acked.insert(key.clone(), val.clone());
                    assert_eq!(
                        kv.cmd(&format!("GET {key}")).expect("GET"),
                        format!("VALUE {val}")
                    );
                    i += 1;
                }
                (kv, acked)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));

    let mut probe = KvClient::connect(addr).unwrap();
    let before = probe.cmd("STATS").unwrap();
    // Pause, snapshot the paused VM, and kill it: nothing is acknowledged after the capture.
    ctl(&sock, &["pause"]);
    let snap = dir.path().join("snap");
    let r = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(json_field(&r, "id").is_some(), "{r}");
    vm.kill9();

    let mut vm2 = VmProc::restore(&net, &snap, &dir.path().join("console2.log"), &[]);
    // The clients go on on their existing connections (TCP retransmits across the gap).
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut all = HashMap::new();
    for w in workers {
        let (mut kv, acked) = w.join().expect("client kept its connection");
        for (k, v) in &acked {
            assert_eq!(kv.cmd(&format!("GET {k}")).unwrap(), format!("VALUE {v}"));
        }
        all.extend(acked);
    }
    // The probe's connection survived too, and the guest's counters continued.
    let after = probe.cmd("STATS").unwrap();
    let num = |s: &str, k: &str| field(s, k).unwrap().parse::<u64>().unwrap();
    assert!(
        num(&after, "sets") > num(&before, "sets"),
        "{before} -> {after}"
    );
    assert!(
        num(&after, "uptime_ms") >= num(&before, "uptime_ms"),
        "{before} -> {after}"
    );
    // Time without an exit, before and after (the restoring VMM anchored the clock page anew).
    assert_eq!(field(&before, "clock").as_deref(), Some("page"), "{before}");
    assert_eq!(field(&after, "clock").as_deref(), Some("page"), "{after}");
    let mut fresh = vm2.wait_ready(Duration::from_secs(10));
    for (k, v) in &all {
        assert_eq!(
            fresh.cmd(&format!("GET {k}")).unwrap(),
            format!("VALUE {v}")
        );
    }
}

#[test]
fn memory_checksum_at_capture_equals_checksum_after_restore() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = boot(&net, dir.path(), 64);
    let mut kv = vm.wait_ready(Duration::from_secs(5));
    for i in 0..100 {
        assert_eq!(kv.cmd(&format!("SET key{i} value{i}")).unwrap(), "OK");
    }
    assert_eq!(kv.cmd("CHURN 256 50").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(100));
    ctl(&sock, &["pause"]);
    let c1 = json_field(&ctl(&sock, &["checksum"]), "memory_crc32").unwrap();
    let snap = dir.path().join("snap");
    let r = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(
        json_field(&r, "memory_crc32").unwrap(),
        c1,
        "snapshot records the paused memory"
    );
    vm.kill9();

    let sock2 = dir.path().join("ctl2.sock");
    let s2 = sock2.to_str().unwrap();
    let mut vm2 = VmProc::restore(
        &net,
        &snap,
        &dir.path().join("c2.log"),
        &["--control", s2, "--paused"],
    );
    wait_socket(&sock2, Duration::from_secs(10));
    assert_eq!(
        json_field(&ctl(&sock2, &["status"]), "state").as_deref(),
        Some("paused")
    );
    let c2 = json_field(&ctl(&sock2, &["checksum"]), "memory_crc32").unwrap();
    assert_eq!(
        c1, c2,
        "memory after restore, before resume, equals memory at capture"
    );
    ctl(&sock2, &["resume"]);
    let mut kv = vm2.wait_ready(Duration::from_secs(10));
    assert_eq!(kv.cmd("GET key99").unwrap(), "VALUE value99");
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    // PUT /stop: the VM stops cleanly (exit 0), after answering, and its socket goes away.
    assert_eq!(ctl(&sock2, &["stop"]), r#"{"stopping":true}"#);
    let st = wait_exit(&mut vm2.child, Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    assert!(!sock2.exists());
}

#[test]
fn diff_chain_restores_the_same_state_as_a_full_snapshot() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = boot(&net, dir.path(), 64);
    let mut kv = vm.wait_ready(Duration::from_secs(5));
    let p = |n: &str| dir.path().join(n);

    assert_eq!(kv.cmd("SET a 1").unwrap(), "OK");
    ctl(&sock, &["snapshot", p("full0").to_str().unwrap()]);
    for i in 0..50 {
        assert_eq!(kv.cmd(&format!("SET b{i} {i}")).unwrap(), "OK");
    }
    assert_eq!(kv.cmd("CHURN 512 100").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(50));
    ctl(&sock, &["snapshot", p("diff1").to_str().unwrap(), "--diff"]);
    for i in 0..50 {
        assert_eq!(kv.cmd(&format!("SET c{i} {i}")).unwrap(), "OK");
    }
    std::thread::sleep(Duration::from_millis(50));
    // The same moment, twice: a diff on top of the chain, and a full snapshot.
    ctl(&sock, &["pause"]);
    ctl(&sock, &["snapshot", p("diff2").to_str().unwrap(), "--diff"]);
    ctl(&sock, &["snapshot", p("full2").to_str().unwrap()]);
    ctl(&sock, &["resume"]);
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    vm.kill9();

    use vm_memory::{Bytes, GuestAddress};
    // Diffs name their parent relative to themselves: the chain still loads after it is moved
    // as a whole.
    let moved = tempfile::tempdir().unwrap();
    for n in ["full0", "diff1", "diff2"] {
        std::fs::rename(p(n), moved.path().join(n)).unwrap();
    }
    let chain = vmm::snapshot::load_chain(&moved.path().join("diff2")).expect("chain verifies");
    assert_eq!(chain.len(), 3, "full0 <- diff1 <- diff2");
    let full = vmm::snapshot::load_chain(&p("full2")).expect("full verifies");
    let size = full[0].meta.mem_size as usize;
    let (m1, m2) = (
        vmm::snapshot::restore_memory(&chain).unwrap(),
        vmm::snapshot::restore_memory(&full).unwrap(),
    );
    let (mut b1, mut b2) = (vec![0u8; size], vec![0u8; size]);
    m1.read_slice(&mut b1, GuestAddress(0)).unwrap();
    m2.read_slice(&mut b2, GuestAddress(0)).unwrap();
    let first_diff = b1.iter().zip(&b2).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "memory of the chain equals memory of the full snapshot"
    );

    // vCPU and device state: identical, except the clocks that run while the VM is paused (the
    // platform clock, and the TSC MSR which PVM does not stop or offset).
    let (s1, s2) = (&chain[2].meta.vm, &full[0].meta.vm);
    let vcpu_bytes = |v: &vmm::vcpu_state::VcpuState| {
        let mut v = v.clone();
        v.msrs.retain(|m| m.index != 0x10);
        postcard::to_stdvec(&v).unwrap()
    };
    assert!(
        vcpu_bytes(&s1.vcpu) == vcpu_bytes(&s2.vcpu),
        "vCPU state differs"
    );
    assert_eq!(s1.vcpu.regs.rip, s2.vcpu.regs.rip);
    assert_eq!(s1.serial, s2.serial);
    assert_eq!(s1.net, s2.net);
    assert_eq!(s1.blk, s2.blk);
    let (mut pl1, mut pl2) = (s1.platform.clone(), s2.platform.clone());
    assert!(pl1.clock_ns <= pl2.clock_ns);
    pl1.clock_ns = 0;
    pl2.clock_ns = 0;
    assert_eq!(pl1, pl2);

    // Disk: the chain's deltas rebuild exactly the full snapshot's disk.
    assert!(vmm::snapshot::restore_disk(&chain, &p("disk-chain.img")).unwrap());
    assert!(vmm::snapshot::restore_disk(&full, &p("disk-full.img")).unwrap());
    assert!(
        std::fs::read(p("disk-chain.img")).unwrap() == std::fs::read(p("disk-full.img")).unwrap()
    );

    // And the chain restores into a working VM.
    let mut vm2 = VmProc::restore(&net, &moved.path().join("diff2"), &p("c2.log"), &[]);
    let mut kv = vm2.wait_ready(Duration::from_secs(10));
    assert_eq!(kv.cmd("GET c49").unwrap(), "VALUE 49");
    assert_eq!(kv.cmd("COUNT").unwrap(), "COUNT 101");
}
