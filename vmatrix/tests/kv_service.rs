//! The guest's KV service under concurrent load over a real tap in a network namespace.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

const CLIENTS: usize = 20;
const OPS_PER_CLIENT: usize = 500; // 20 x 500 = 10,000 operations
const KEYS_PER_CLIENT: usize = 25;

#[test]
fn twenty_clients_ten_thousand_ops_read_their_acknowledged_writes() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 64);
    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("console.log"), 64);
    let mut probe = vm.wait_ready(Duration::from_secs(20));
    assert_eq!(probe.cmd("COUNT").unwrap(), "COUNT 0");

    let addr = vm.addr;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(addr).expect("connect");
                let mut acked: HashMap<String, String> = HashMap::new();
                // A small deterministic generator per client: xorshift seeded by the client id.
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
                for op in 0..OPS_PER_CLIENT {
                    let x = rng.next();
                    let key = format!("c{c}-k{}", x as usize % KEYS_PER_CLIENT);
                    if op % 2 == 0 {
                        let val = format!("v{c}-{op}-{}", x % 1000);
                        let r = kv.cmd(&format!("SET {key} {val}")).expect("SET");
                        assert_eq!(r, "OK", "client {c} op {op}");
                        acked.insert(key, val);
                    } else {
                        let r = kv.cmd(&format!("GET {key}")).expect("GET");
                        match acked.get(&key) {
                            Some(v) => assert_eq!(r, format!("VALUE {v}"), "client {c} op {op}"),
                            None => assert_eq!(r, "NOTFOUND", "client {c} op {op}"),
                        }
                    }
                }
                acked
            })
        })
        .collect();
    let mut all = HashMap::new();
    for w in workers {
        all.extend(w.join().expect("client thread"));
    }
    // A fresh connection sees every last acknowledged value.
    let mut kv = KvClient::connect(addr).unwrap();
    for (k, v) in &all {
        assert_eq!(kv.cmd(&format!("GET {k}")).unwrap(), format!("VALUE {v}"));
    }
    assert_eq!(kv.cmd("COUNT").unwrap(), format!("COUNT {}", all.len()));
}

#[test]
fn protocol_errors_are_answered_not_fatal() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16);
    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("console.log"), 32);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    assert!(kv.cmd("FROB x").unwrap().starts_with("ERR "));
    assert!(kv.cmd("SET onlykey").unwrap().starts_with("ERR "));
    assert!(kv
        .cmd(&format!("SET {} v", "k".repeat(256)))
        .unwrap()
        .starts_with("ERR "));
    assert!(kv.cmd("GET").unwrap().starts_with("ERR "));
    assert!(kv.cmd("CHURN x y").unwrap().starts_with("ERR "));
    assert_eq!(kv.cmd("GET missing").unwrap(), "NOTFOUND");
    assert_eq!(kv.cmd("SET k v").unwrap(), "OK");
    assert_eq!(kv.cmd("GET k").unwrap(), "VALUE v");
    assert_eq!(kv.cmd("CHURN 64 10").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(50));
    let stats = kv.cmd("STATS").unwrap();
    assert!(stats.starts_with("STATS keys=1 "), "{stats}");
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    // The service still works after all of that.
    assert_eq!(kv.cmd("COUNT").unwrap(), "COUNT 1");
}

/// A disk write that fails (injected through the control socket) is answered with an error, a
/// GET in the same round does not see the write that was rolled back, and the service goes on;
/// after a restart on the same disk only the acknowledged value is there.
#[test]
fn a_failed_disk_write_is_an_error_and_never_visible() {
    use std::io::{BufRead, BufReader, Write};
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16);
    let sock = dir.path().join("ctl.sock");
    let s = sock.to_str().unwrap().to_string();
    let mut vm = VmProc::spawn_with(
        &net,
        &disk,
        &dir.path().join("console.log"),
        32,
        &["--control", &s],
    );
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    assert_eq!(kv.cmd("SET k old").unwrap(), "OK");
    assert_eq!(
        json_field(&ctl(&sock, &["disk-faults", "1"]), "failing_writes").as_deref(),
        Some("1")
    );
    // One segment: both requests are handled in the same round, before its commit fails.
    let mut c = std::net::TcpStream::connect(vm.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"SET k new\nGET k\n").unwrap();
    let mut r = BufReader::new(c);
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        lines.push(l.trim_end().to_string());
    }
    assert_eq!(lines, ["ERR disk write failed", "VALUE old"]);
    assert_eq!(kv.cmd("GET k").unwrap(), "VALUE old");
    assert_eq!(kv.cmd("SET k newer").unwrap(), "OK", "the service goes on");
    vm.kill9();
    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("console2.log"), 32);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    assert_eq!(kv.cmd("GET k").unwrap(), "VALUE newer");
}
