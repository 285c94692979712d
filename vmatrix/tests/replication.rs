//! Continuous replication on real KVM, taps, namespaces and QUIC: output commit holds replies
//! until the backup has the state that produced them, and killing the primary at any moment
//! loses no acknowledged write.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn output_is_held_while_the_backup_is_stalled_and_released_in_order() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut r = Replicated::start(
        &net,
        dir.path(),
        &[
            "--idle-timeout-ms",
            "8000",
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    let mut kv = r.wait_ready(Duration::from_secs(20));
    assert_eq!(kv.cmd("SET warm 1").unwrap(), "OK");

    let mut s = TcpStream::connect(r.primary.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    r.signal_backup("-STOP");
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"SET x 1\nSET y 2\nGET x\n").unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => panic!(
            "a reply escaped while the backup was stalled: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    r.signal_backup("-CONT");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut lines = BufReader::new(s);
    let mut got = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        if let Err(e) = lines.read_line(&mut l) {
            eprintln!("status: {}", ctl(&sock, &["status"]));
            panic!(
                "no reply after SIGCONT ({e}); primary:\n{}\nbackup:\n{}",
                r.primary.stderr_text(),
                r.backup_log()
            );
        }
        got.push(l.trim_end().to_string());
    }
    assert_eq!(
        got,
        ["OK", "OK", "VALUE 1"],
        "replies arrive after SIGCONT, in order"
    );
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One crash: 16 clients write; the primary dies at a random moment; the backup's image is
/// started; every acknowledged write must be there.
fn crash_once(seed: u64) {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9) | 1);
    let mut r = Replicated::start(&net, dir.path(), &["--epoch-ms", "10"]);
    r.wait_ready(Duration::from_secs(20));
    let addr = r.primary.addr;
    let workers: Vec<_> = (0..16)
        .map(|c| {
            std::thread::spawn(move || {
                let mut acked: HashMap<String, String> = HashMap::new();
                let mut in_flight: Option<(String, String)> = None;
                if let Ok(mut kv) = KvClient::connect(addr) {
                    kv.set_timeout(Duration::from_secs(3));
                    for i in 0..100_000u64 {
                        let (k, v) = (format!("c{c}k{}", i % 8), format!("v{i}"));
                        match kv.cmd(&format!("SET {k} {v}")) {
                            Ok(resp) if resp == "OK" => {
                                acked.insert(k, v);
                            }
                            _ => {
                                in_flight = Some((k, v));
                                break;
                            }
                        }
                    }
                }
                (acked, in_flight)
            })
        })
        .collect();
    let t = Duration::from_millis(150 + rng.next() % 600);
    std::thread::sleep(t);
    r.primary.kill9();
    let mut acked = HashMap::new();
    let mut maybe: HashMap<String, String> = HashMap::new();
    for w in workers {
        let (a, f) = w.join().unwrap();
        acked.extend(a);
        if let Some((k, v)) = f {
            maybe.insert(k, v);
        }
    }
    assert!(
        !acked.is_empty(),
        "seed {seed}: clients were acknowledged before the crash"
    );
    let image = r.finalize_backup();
    let mut vm = VmProc::restore(&net, &image, &dir.path().join("restored.log"), &[]);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for (k, v) in &acked {
        let got = kv.cmd(&format!("GET {k}")).unwrap();
        let newer = maybe.get(k).is_some_and(|m| got == format!("VALUE {m}"));
        assert!(
            got == format!("VALUE {v}") || newer,
            "seed {seed} (crash after {t:?}): key {k} = {got:?}, acknowledged {v:?}"
        );
    }
}

#[test]
fn killing_the_primary_at_random_moments_loses_no_acknowledged_write() {
    let seeds: Vec<u64> = match std::env::var("VMATRIX_SEED") {
        Ok(s) => vec![s.parse().expect("VMATRIX_SEED is a number")],
        Err(_) => (1..=20).collect(),
    };
    for seed in seeds {
        eprintln!("crash test seed {seed} (replay: VMATRIX_SEED={seed})");
        let t = Instant::now();
        crash_once(seed);
        eprintln!("seed {seed} ok in {:?}", t.elapsed());
    }
}

#[test]
fn the_backup_image_equals_the_primary_at_a_checkpoint() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut r = Replicated::start(&net, dir.path(), &["--control", sock.to_str().unwrap()]);
    let mut kv = r.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    for i in 0..50 {
        assert_eq!(kv.cmd(&format!("SET k{i} v{i}")).unwrap(), "OK");
    }
    assert_eq!(kv.cmd("CHURN 200 20").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(200));
    let status = ctl(&sock, &["status"]);
    for key in [
        "epochs",
        "acked_epoch",
        "max_pause_us",
        "ack_latency_us",
        "held_frames",
    ] {
        assert!(
            field(&status, key).is_some(),
            "status shows {key}: {status}"
        );
    }
    // Pause the primary's guest: the epoch loop keeps checkpointing the (now still) VM.
    ctl(&sock, &["pause"]);
    let c1 = field(&ctl(&sock, &["checksum"]), "memory_crc32").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    r.primary.kill9();
    let image = r.finalize_backup();
    let meta = vmm::snapshot::read_meta(&image).unwrap();
    let c2 = format!("{:#010x}", meta.memory_checksum.unwrap());
    assert_eq!(
        c1, c2,
        "backup memory equals the primary's memory at its last checkpoint"
    );
    let primary_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
    let backup_disk = std::fs::read(image.join("disk.img")).unwrap();
    assert!(
        primary_disk == backup_disk,
        "backup disk equals the primary's disk"
    );
}
