//! kill -9 the VMM and boot a new VM on the same disk: every acknowledged write is there; a
//! deliberately torn last record is dropped and the rest kept.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;

fn write_keys(vm: &mut VmProc, n: usize, prefix: &str) -> BTreeMap<String, String> {
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    let mut acked = BTreeMap::new();
    for i in 0..n {
        let (k, v) = (format!("{prefix}{}", i % 40), format!("val{i}"));
        assert_eq!(kv.cmd(&format!("SET {k} {v}")).unwrap(), "OK");
        acked.insert(k, v);
    }
    acked
}

/// Every acknowledged key has its acknowledged value, except that a key whose write was in
/// flight at the crash (sent, never answered) may instead hold that newer value.
fn check_keys_allowing(
    vm: &mut VmProc,
    acked: &BTreeMap<String, String>,
    in_flight: Option<(String, String)>,
) {
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for (k, v) in acked {
        let got = kv.cmd(&format!("GET {k}")).unwrap();
        let newer = in_flight
            .as_ref()
            .is_some_and(|(fk, fv)| fk == k && got == format!("VALUE {fv}"));
        assert!(
            got == format!("VALUE {v}") || newer,
            "key {k} after restart: got {got:?}, acknowledged {v:?}; console:\n{}",
            vm.console_text()
        );
    }
    let extra = in_flight.is_some_and(|(k, _)| !acked.contains_key(&k));
    let count = kv.cmd("COUNT").unwrap();
    assert!(
        count == format!("COUNT {}", acked.len())
            || (extra && count == format!("COUNT {}", acked.len() + 1)),
        "{count} with {} acknowledged keys",
        acked.len()
    );
}

fn check_keys(vm: &mut VmProc, acked: &BTreeMap<String, String>) {
    check_keys_allowing(vm, acked, None);
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 64);

    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("c1.log"), 64);
    let mut acked = write_keys(&mut vm, 300, "k");
    // Writes in flight from other clients at the moment of the crash must not matter.
    let addr = vm.addr;
    let bg = std::thread::spawn(move || {
        let mut done = BTreeMap::new();
        let mut in_flight = None;
        if let Ok(mut kv) = KvClient::connect(addr) {
            kv.set_timeout(Duration::from_secs(2));
            for i in 0..100_000 {
                let (k, v) = (format!("bg{}", i % 10), format!("x{i}"));
                match kv.cmd(&format!("SET {k} {v}")) {
                    Ok(r) if r == "OK" => {
                        done.insert(k, v);
                    }
                    _ => {
                        in_flight = Some((k, v));
                        break;
                    }
                }
            }
        }
        (done, in_flight)
    });
    std::thread::sleep(Duration::from_millis(300));
    vm.kill9();
    let (bg_acked, in_flight) = bg.join().unwrap();
    assert!(
        bg_acked.len() == 10,
        "the background client made progress before the crash"
    );
    acked.extend(bg_acked);

    let mut vm2 = VmProc::spawn(&net, &disk, &dir.path().join("c2.log"), 64);
    check_keys_allowing(&mut vm2, &acked, in_flight.clone());
    // From here on the in-flight write's outcome is whatever the restarted VM says it is.
    if let Some((k, _)) = in_flight {
        let mut kv = vm2.wait_ready(Duration::from_secs(5));
        let got = kv.cmd(&format!("GET {k}")).unwrap();
        if let Some(v) = got.strip_prefix("VALUE ") {
            acked.insert(k, v.to_string());
        }
    }
    // And the restarted VM keeps accepting writes after the replayed log.
    let more = write_keys(&mut vm2, 50, "after");
    vm2.kill9();
    let mut vm3 = VmProc::spawn(&net, &disk, &dir.path().join("c3.log"), 64);
    acked.extend(more);
    check_keys(&mut vm3, &acked);
}

#[test]
fn torn_last_record_is_dropped_rest_kept() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16);
    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("c1.log"), 32);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    for i in 0..30 {
        assert_eq!(kv.cmd(&format!("SET key{i} value{i}")).unwrap(), "OK");
    }
    drop(kv);
    vm.kill9();

    // Tear the last record: keep its header, lose the end of its value, as a crash mid-write
    // would.
    let mut bytes = std::fs::read(&disk).unwrap();
    let recs = log::records(&bytes);
    assert_eq!(recs.len(), 30, "all 30 records on disk before tearing");
    let (off, len, k, _) = recs.last().unwrap().clone();
    assert_eq!(k, "key29");
    for b in &mut bytes[off + len - 3..off + len] {
        *b ^= 0xff;
    }
    std::fs::write(&disk, &bytes).unwrap();

    let mut vm2 = VmProc::spawn(&net, &disk, &dir.path().join("c2.log"), 32);
    let mut kv = vm2.wait_ready(Duration::from_secs(20));
    for i in 0..29 {
        assert_eq!(
            kv.cmd(&format!("GET key{i}")).unwrap(),
            format!("VALUE value{i}")
        );
    }
    assert_eq!(kv.cmd("GET key29").unwrap(), "NOTFOUND");
    assert_eq!(kv.cmd("COUNT").unwrap(), "COUNT 29");
    assert!(
        vm2.console_text().contains("torn last record dropped"),
        "console:\n{}",
        vm2.console_text()
    );
    // New writes go where the torn record was, and survive another restart.
    assert_eq!(kv.cmd("SET key29 again").unwrap(), "OK");
    drop(kv);
    vm2.kill9();
    let mut vm3 = VmProc::spawn(&net, &disk, &dir.path().join("c3.log"), 32);
    let mut kv = vm3.wait_ready(Duration::from_secs(20));
    assert_eq!(kv.cmd("GET key29").unwrap(), "VALUE again");
    assert_eq!(kv.cmd("COUNT").unwrap(), "COUNT 30");
}
