//! The initial sync and the backup's durability, on real KVM, namespaces and QUIC: pre-copy
//! rounds (and the one-pause fallback) give an exact replica; a backup killed with SIGKILL
//! leaves an image `vmatrix restore` starts; a checkpoint whose application was interrupted is
//! redone from its journal slot, and a damaged slot is ignored without touching the image.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use backup::image::ReplicaMeta;
use backup::journal::Journal;
use support::*;

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t.elapsed() < timeout,
            "'{needle}' never appeared in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.0 GET of `/` from `addr`; the body.
fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: vm\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, b)| b.to_string())
}

fn sync_gives_exact_replica(extra: &[&str], expect_precopy: bool) {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut args = vec![
        "--control",
        sock.to_str().unwrap(),
        "--metrics",
        "0.0.0.0:9100",
    ];
    args.extend_from_slice(extra);
    let mut r = Replicated::start(&net, dir.path(), &args);
    let mut kv = r.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    let log = r.primary.console.with_extension("stderr");
    let text = wait_for_log(&log, "protected after", Duration::from_secs(10));
    assert_eq!(
        text.contains("pre-copy round 0 ("),
        expect_precopy,
        "pre-copy rounds in the log:\n{text}"
    );
    assert!(text.contains("full sync: final pause"), "{text}");
    let status = ctl(&sock, &["status"]);
    assert_eq!(
        json_field(&status, "protected").as_deref(),
        Some("true"),
        "{status}"
    );
    let rounds: u64 = json_field(&status, "sync_rounds").unwrap().parse().unwrap();
    assert!(
        (rounds > 1) == expect_precopy && rounds >= 1,
        "sync rounds: {status}"
    );
    // The same figures in Prometheus text format (the primary's namespace is reachable at .3).
    let metrics = http_get(&format!("10.77.{}.3:9100", net.index));
    assert!(
        metrics.contains("# TYPE vmatrix_protected gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("\nvmatrix_protected 1\n"), "{metrics}");
    let epochs = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vmatrix_epochs_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(epochs.is_some_and(|e| e >= 1), "{metrics}");
    for i in 0..20 {
        assert_eq!(kv.cmd(&format!("SET k{i} v{i}")).unwrap(), "OK");
    }
    assert_eq!(kv.cmd("CHURN 300 30").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(200));
    assert_backup_equals_primary(&mut r, &sock);
}

#[test]
fn precopy_initial_sync_gives_an_exact_replica() {
    sync_gives_exact_replica(&[], true);
}

#[test]
fn one_pause_initial_sync_gives_an_exact_replica() {
    sync_gives_exact_replica(&["--precopy-rounds", "0"], false);
}

/// Restores `image` in `net` and checks the `n` keys `replicate_keys` stored; returns the VM
/// and a client.
fn restore_with_keys(net: &TestNet, image: &Path, dir: &Path, n: usize) -> (VmProc, KvClient) {
    let mut vm = VmProc::restore(net, image, &dir.join("restored.log"), &[]);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for i in 0..n {
        assert_eq!(
            kv.cmd(&format!("GET key{i}")).unwrap(),
            format!("VALUE val{i}")
        );
    }
    (vm, kv)
}

/// Starts a replicated guest and stores `n` keys (each acknowledged, so on the backup).
fn replicate_keys(net: &TestNet, dir: &Path, n: usize) -> Replicated {
    let mut r = Replicated::start(net, dir, &[]);
    let mut kv = r.wait_ready(Duration::from_secs(20));
    for i in 0..n {
        assert_eq!(kv.cmd(&format!("SET key{i} val{i}")).unwrap(), "OK");
    }
    r
}

#[test]
fn a_backup_killed_with_sigkill_leaves_an_image_restore_starts() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut r = replicate_keys(&net, dir.path(), 30);
    // The backup dies without finalizing, then the primary's host dies too.
    if let Some(mut b) = r.backup.take() {
        let _ = b.kill();
        let _ = b.wait();
    }
    r.primary.kill9();
    let image = r.image_dir(0);
    assert!(!image.join(vmm::snapshot::META_FILE).exists());
    let (vm, _) = restore_with_keys(&net, &image, dir.path(), 30);
    assert!(
        vm.stderr_text()
            .contains("replica image finalized at checkpoint"),
        "{}",
        vm.stderr_text()
    );
}

fn read_meta(image: &Path) -> ReplicaMeta {
    vmm::snapshot::format::decode(&std::fs::read(image.join("replica.bin")).unwrap()).unwrap()
}

#[test]
fn an_interrupted_apply_is_redone_from_the_journal_and_a_damaged_one_discarded() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut r = replicate_keys(&net, dir.path(), 5);
    r.primary.kill9();
    let image = r.finalize_backup();
    let meta = read_meta(&image);
    let n = meta.seq;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.join("memory.bin"))
        .unwrap();
    let page = |gfn: u64| {
        let mut b = vec![0u8; 4096];
        mem.read_exact_at(&mut b, gfn * 4096).unwrap();
        b
    };
    let gfns = vec![100u64, 101, 2000];
    let before: Vec<Vec<u8>> = gfns.iter().map(|&g| page(g)).collect();
    let disk_before = std::fs::read(image.join("disk.img")).unwrap();

    // Checkpoint n+1 as a backup would journal it, with distinctive contents.
    let mut data = Vec::new();
    for (i, _) in gfns.iter().enumerate() {
        data.extend(std::iter::repeat_n(0xa0 + i as u8, 4096));
    }
    let journal = Journal {
        seq: n + 1,
        base: n,
        meta: ReplicaMeta {
            seq: n + 1,
            ..meta.clone()
        },
        gfns: gfns.clone(),
        data: data.clone(),
        ranges: vec![],
        disk: vec![(8 << 20, vec![0x5a; 512])],
    };

    // A damaged journal was never committed: discarded, the image stays at n.
    let mut bytes = journal.encode().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let slot = backup::journal::slot_path(&image, ((n + 1) % 2) as usize);
    std::fs::write(&slot, &bytes).unwrap();
    assert_eq!(backup::image::finalize(&image).unwrap(), n);
    assert!(!slot.exists());
    for (g, b) in gfns.iter().zip(&before) {
        assert_eq!(&page(*g), b, "page {g} untouched by a damaged journal");
    }

    // The process died after the journal and one page: recovery completes checkpoint n+1.
    // (The other slot holds an older checkpoint; the newest verifying one wins.)
    let older = Journal {
        seq: n,
        base: n.saturating_sub(1),
        meta: meta.clone(),
        gfns: vec![],
        data: vec![],
        ranges: vec![],
        disk: vec![],
    };
    std::fs::write(
        backup::journal::slot_path(&image, (n % 2) as usize),
        older.encode().unwrap(),
    )
    .unwrap();
    std::fs::write(&slot, journal.encode().unwrap()).unwrap();
    mem.write_all_at(&data[..4096], gfns[0] * 4096).unwrap();
    assert_eq!(backup::image::finalize(&image).unwrap(), n + 1);
    assert!(!slot.exists());
    assert_eq!(read_meta(&image).seq, n + 1);
    for (i, g) in gfns.iter().enumerate() {
        assert_eq!(page(*g), data[i * 4096..(i + 1) * 4096], "page {g} redone");
    }
    let disk = std::fs::read(image.join("disk.img")).unwrap();
    assert_eq!(disk.len(), disk_before.len());
    assert!(disk[8 << 20..(8 << 20) + 512].iter().all(|&b| b == 0x5a));
    // The finalized snapshot describes the redone image.
    let sm = vmm::snapshot::read_meta(&image).unwrap();
    let crc = format!("{:#010x}", sm.memory_checksum.unwrap());
    assert_ne!(crc, "0x00000000");
}

#[test]
fn a_backup_reports_status_and_stops_through_its_control_socket() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut r = replicate_keys(&net, dir.path(), 10);
    let sock = r.backup_socket(0);
    wait_socket(&sock, Duration::from_secs(5));
    let status = ctl(&sock, &["status"]);
    assert_eq!(
        json_field(&status, "role").as_deref(),
        Some("backup"),
        "{status}"
    );
    assert_eq!(
        json_field(&status, "connected").as_deref(),
        Some("true"),
        "{status}"
    );
    assert_eq!(
        json_field(&status, "syncing").as_deref(),
        Some("false"),
        "{status}"
    );
    let applied: u64 = json_field(&status, "applied_epoch")
        .unwrap()
        .parse()
        .unwrap();
    assert!(applied >= 2, "{status}");
    // A VM-only request is refused with a clear error.
    let out = std::process::Command::new(vmatrix_bin())
        .arg("ctl")
        .arg(&sock)
        .arg("pause")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a backup serves"),
        "{out:?}"
    );
    // The primary's host dies; the operator stops the backup through its socket.
    r.primary.kill9();
    ctl(&sock, &["stop"]);
    let mut b = r.backup.take().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = b.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "backup did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    let image = r.image_dir(0);
    assert!(image.join(vmm::snapshot::META_FILE).exists(), "finalized");
    restore_with_keys(&net, &image, dir.path(), 10);
}

#[test]
fn the_primary_holds_output_while_its_backup_is_gone_and_resyncs_a_new_one() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut r = replicate_keys(&net, dir.path(), 10);
    let mut kv = KvClient::connect(r.primary.addr).unwrap();
    assert_eq!(kv.cmd("COUNT").unwrap(), "COUNT 10");
    // The backup's host dies.
    if let Some(mut b) = r.backup.take() {
        let _ = b.kill();
        let _ = b.wait();
    }
    // A write now cannot be protected: its answer is held.
    kv.set_timeout(Duration::from_millis(1500));
    assert!(
        kv.cmd("SET during outage").is_err(),
        "a write was acknowledged with no backup"
    );
    // A new backup comes up on the same address: the primary syncs it and releases the answer.
    r.respawn_backup(&net);
    kv.set_timeout(Duration::from_secs(30));
    let mut line = String::new();
    // The held "OK" arrives on the same connection.
    let t = Instant::now();
    while line.is_empty() {
        line = kv.cmd("GET during").unwrap_or_default();
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "output never released"
        );
    }
    assert_eq!(line, "OK", "the held answer to the SET comes first");
    assert_eq!(kv.cmd("GET during").unwrap(), "VALUE outage");
    let log = std::fs::read_to_string(r.primary.console.with_extension("stderr")).unwrap();
    assert!(log.contains("reconnecting"), "{log}");
    // The new backup's image holds everything acknowledged, old and new.
    r.primary.kill9();
    let image = r.finalize_backup();
    let (_vm, mut kv) = restore_with_keys(&net, &image, dir.path(), 10);
    assert_eq!(kv.cmd("GET during").unwrap(), "VALUE outage");
}

#[test]
fn a_lost_backup_rejoins_the_running_session() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replicated::start_n(&net, dir.path(), 2, &["--required", "1"]);
    let mut kv = r.wait_ready(Duration::from_secs(20));
    for i in 0..10 {
        assert_eq!(kv.cmd(&format!("SET before{i} v{i}")).unwrap(), "OK");
    }
    // Backup 1 dies; with a quorum of one the service goes on, protected by backup 0.
    r.kill_and_respawn_more(&net, 1, || {
        for i in 0..10 {
            assert_eq!(kv.cmd(&format!("SET during{i} v{i}")).unwrap(), "OK");
        }
    });
    // It comes back: the primary reconnects and syncs it inside the running session.
    let sock = r.backup_socket(1);
    wait_socket(&sock, Duration::from_secs(5));
    let t = Instant::now();
    loop {
        let st = ctl(&sock, &["status"]);
        if json_field(&st, "connected").as_deref() == Some("true")
            && json_field(&st, "syncing").as_deref() == Some("false")
            && json_field(&st, "checkpoints").and_then(|c| c.parse::<u64>().ok()) > Some(3)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "backup 1 never rejoined: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..10 {
        assert_eq!(kv.cmd(&format!("SET after{i} v{i}")).unwrap(), "OK");
    }
    let log = std::fs::read_to_string(r.primary.console.with_extension("stderr")).unwrap();
    assert!(log.contains("joins at checkpoint"), "{log}");
    // Make sure backup 1 has the last writes too: output now needs either backup, so wait for
    // it to apply a checkpoint taken after them.
    let applied = |st: &str| json_field(st, "applied_epoch").and_then(|a| a.parse::<u64>().ok());
    let a0 = applied(&ctl(&sock, &["status"]));
    let t = Instant::now();
    while applied(&ctl(&sock, &["status"])) <= a0.map(|a| a + 2) {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    r.primary.kill9();
    let image = r.finalize_more(1);
    let mut vm = VmProc::restore(&net, &image, &dir.path().join("restored.log"), &[]);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for prefix in ["before", "during", "after"] {
        for i in 0..10 {
            assert_eq!(
                kv.cmd(&format!("GET {prefix}{i}")).unwrap(),
                format!("VALUE v{i}"),
                "{prefix}{i} on the rejoined backup"
            );
        }
    }
}
