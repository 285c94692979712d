//! Snapshots of a protected primary (issue 8, item 4(a)): `ctl snapshot` and the replication
//! checkpoints both see every change. One harvest of the dirty log, the device bitmap and the
//! disk write log feeds both; before, whichever harvested took the changes from the other, so
//! the backup silently diverged (a checkpoint missed pages and disk writes a snapshot had taken)
//! and a diff snapshot missed what checkpoints had taken since its parent.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// Acknowledged keys of the background writers, with when they were acknowledged.
type Acked = Arc<Mutex<Vec<(String, Instant)>>>;

/// `n` clients writing unique keys (`w<c>_<i>`) as fast as the guest answers, until `stop`.
fn writers(
    addr: std::net::SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|c| {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(addr).expect("writer connects");
                kv.set_timeout(Duration::from_secs(20));
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let k = format!("w{c}_{i}");
                    assert_eq!(kv.cmd(&format!("SET {k} {i}")).unwrap(), "OK");
                    acked.lock().unwrap().push((k, Instant::now()));
                    i += 1;
                }
            })
        })
        .collect()
}

/// `SET <prefix><i> <i>` for i in 0..n, each acknowledged.
fn set_keys(kv: &mut KvClient, prefix: &str, n: usize) {
    for i in 0..n {
        assert_eq!(kv.cmd(&format!("SET {prefix}{i} {i}")).unwrap(), "OK");
    }
}

/// Diff snapshots `s1..s4` while four clients write and the guest churns; then churn stops and
/// the writers with it. Returns when each diff was requested and the writers' acknowledged keys.
fn diffs_while_writing(
    r: &Replicated,
    kv: &mut KvClient,
    sock: &std::path::Path,
    dir: &std::path::Path,
) -> (Vec<Instant>, Acked) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let w = writers(r.primary.addr, 4, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(400));
    let mut requested = Vec::new();
    for n in 1..=4 {
        requested.push(Instant::now());
        let s = dir.join(format!("s{n}"));
        let diff = ctl(sock, &["snapshot", s.to_str().unwrap(), "--diff"]);
        assert!(json_field(&diff, "pages").is_some(), "{diff}");
        std::thread::sleep(Duration::from_millis(37));
    }
    // Stop churning at once: the pages a snapshot harvested are not rewritten (which would
    // heal a checkpoint that missed them) for the rest of the test.
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for h in w {
        h.join().unwrap();
    }
    (requested, acked)
}

/// The disk of the chain `s0 <- s1` holds every key of `expected` (the KV log's records).
fn assert_chain_disk_holds(dir: &std::path::Path, expected: &[String]) {
    let chain = vmm::snapshot::load_chain(&dir.join("s1")).expect("chain verifies");
    assert_eq!(chain.len(), 2, "s0 <- s1");
    let disk = dir.join("chain-disk.img");
    assert!(vmm::snapshot::restore_disk(&chain, &disk).unwrap());
    let on_disk: std::collections::HashSet<String> = log::records(&std::fs::read(&disk).unwrap())
        .into_iter()
        .map(|(_, _, k, _)| k)
        .collect();
    let missing: Vec<&String> = expected.iter().filter(|k| !on_disk.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "the diff's disk misses {} acknowledged writes, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn snapshots_of_a_protected_primary_take_nothing_from_replication_and_vice_versa() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let sock = p("ctl.sock");
    // Fixed 50 ms epochs: a snapshot lands on average 25 ms after the last checkpoint, so
    // before the fix it reliably took pages (and, with clients writing, disk writes) that the
    // next checkpoint then missed.
    let mut r = Replicated::start(
        &net,
        dir.path(),
        &[
            "--control",
            sock.to_str().unwrap(),
            "--epoch-ms",
            "50",
            "--min-epoch-ms",
            "50",
            "--early-checkpoints",
            "false",
        ],
    );
    let mut kv = r.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    set_keys(&mut kv, "a", 20);

    // A full snapshot while the guest churns memory: 5 pages/ms, each page once per 600 ms.
    assert_eq!(kv.cmd("CHURN 3000 5").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(100));
    let full = ctl(&sock, &["snapshot", p("s0").to_str().unwrap()]);
    assert!(json_field(&full, "memory_crc32").is_some(), "{full}");

    // Writes between the snapshots: replication checkpoints harvest them first; the diffs
    // must still hold them all (memory and disk).
    set_keys(&mut kv, "b", 30);
    // Diff snapshots s1..s4 while clients write and the guest churns. Each harvest lands
    // between writes (churned pages, keys, disk records) and the checkpoint that must carry
    // them — unless it falls inside a checkpoint's own pause, hence four of them.
    let (requested, acked) = diffs_while_writing(&r, &mut kv, &sock, dir.path());
    // One more diff on top of them, and more writes after it.
    set_keys(&mut kv, "c", 20);
    ctl(&sock, &["snapshot", p("s5").to_str().unwrap(), "--diff"]);
    set_keys(&mut kv, "d", 20);
    // The keys acknowledged before diff `n` was requested.
    let acked_before = |n: usize| -> Vec<String> {
        let keys = (0..20)
            .map(|i| format!("a{i}"))
            .chain((0..30).map(|i| format!("b{i}")));
        let written = acked.lock().unwrap();
        let w = written
            .iter()
            .filter(|(_, at)| *at < requested[n - 1])
            .map(|(k, _)| k.clone());
        keys.chain(w).collect()
    };
    assert!(
        acked_before(1).len() >= 50 + 8,
        "the writers were acknowledged before s1: {}",
        acked_before(1).len() - 50
    );

    // Replication missed nothing: the backup's image equals the primary, memory and disk.
    assert_backup_equals_primary(&mut r, &sock);

    // The snapshots missed nothing: the chain s0 <- s1 holds, in its disk, every write
    // acknowledged before s1 was requested...
    assert_chain_disk_holds(dir.path(), &acked_before(1));
    // ...and s0 <- ... <- s4 restores with every write acknowledged before s4 was requested.
    let mut vm = VmProc::restore(&net, &p("s4"), &p("restored-s4.log"), &[]);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for k in &acked_before(4) {
        let want = k.split_once('_').map_or(&k[1..], |(_, i)| i).to_string();
        assert_eq!(
            kv.cmd(&format!("GET {k}")).unwrap(),
            format!("VALUE {want}"),
            "restored s4: key {k}"
        );
    }
    vm.kill9();

    // And the whole chain, s0 <- ... <- s5, holds the writes made before s5.
    let mut vm = VmProc::restore(&net, &p("s5"), &p("restored-s5.log"), &[]);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for i in 0..20 {
        assert_eq!(
            kv.cmd(&format!("GET c{i}")).unwrap(),
            format!("VALUE {i}"),
            "restored s5: key c{i}"
        );
    }
    assert_eq!(kv.cmd("GET d0").unwrap(), "NOTFOUND", "d0 came after s5");
}
