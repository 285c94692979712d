//! A protected VM fails over to its backup's host (two network namespaces joined by a veth pair
//! for replication, both on a clients' LAN bridge; `scripts/hosts.sh`): the primary is killed,
//! the backup's image resumes on the other host, and the clients' open TCP connections carry on
//! there, with every acknowledged write present. The guest's gratuitous ARP after the restore is
//! what moves its address to the new host's port on the LAN bridge.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

#[test]
fn clients_tcp_connections_survive_a_failover_to_the_backups_host() {
    let net = TestNet::two_hosts();
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replicated::start(&net, dir.path(), &[]);
    let mut first = r.wait_ready(Duration::from_secs(20));
    assert_eq!(first.cmd("COUNT").unwrap(), "COUNT 0");

    // Four clients on long-lived connections, each with acknowledged writes.
    let mut clients: Vec<KvClient> = (0..4)
        .map(|_| KvClient::connect(net.guest_addr()).expect("connect"))
        .collect();
    let mut acked: HashMap<String, String> = HashMap::new();
    for round in 0..25 {
        for (c, kv) in clients.iter_mut().enumerate() {
            let (k, v) = (format!("c{c}k{}", round % 10), format!("v{round}"));
            assert_eq!(kv.cmd(&format!("SET {k} {v}")).unwrap(), "OK");
            acked.insert(k, v);
        }
    }

    // The primary's host dies; the backup finalizes; the VM resumes on the backup's host.
    r.primary.kill9();
    let image = r.finalize_backup();
    let mut vm = VmProc::restore_in(
        &net,
        &net.backup_ns(),
        &image,
        &dir.path().join("failover-console.log"),
        &[],
    );
    let _ = vm.wait_ready(Duration::from_secs(20));

    // The same connections go on (TCP retransmits reach the new host), and see every write.
    for (c, kv) in clients.iter_mut().enumerate() {
        kv.set_timeout(Duration::from_secs(30));
        for (k, v) in acked
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("c{c}k")))
        {
            assert_eq!(
                kv.cmd(&format!("GET {k}"))
                    .expect("GET on the old connection"),
                format!("VALUE {v}"),
                "client {c} key {k}"
            );
        }
        assert_eq!(
            kv.cmd(&format!("SET after{c} yes"))
                .expect("SET after failover"),
            "OK"
        );
    }
    assert_eq!(first.cmd("GET after0").unwrap(), "VALUE yes");
}
