//! The failover tests' cluster network (`scripts/cluster.sh`, `support::cluster`): three hosts
//! reach each other and the manager over the replication network, and the test's namespace
//! reaches every host; a killed host loses its processes and drops off the network while the
//! others carry on; a revived host is reachable again, with its processes still dead.
//! Reachability is a real TCP exchange: a small server on every host answers with its name.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::cluster::Cluster;

const PORT: u16 = 7900;

/// Answers every connection with its name (argv[2]) and closes it.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode() + b"\n")
    c.close()
"#;

/// Prints the server's name, "refused" (the host answered, nothing listens) or "unreachable".
const CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    print(c.makefile().readline().strip())
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("unreachable")
"#;

/// A name server on one host; SIGKILLed and reaped on drop if still running.
struct Server(Child);

impl Server {
    fn start(cluster: &Cluster, i: usize) -> Server {
        let mut child = cluster
            .command(i, "python3")
            .args(["-c", SERVER, &PORT.to_string(), &cluster.host_name(i)])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3 (the test needs python3)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "server on host {i} did not start");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What host `from` gets from `to`:PORT.
fn probe_from(cluster: &Cluster, from: usize, to: Ipv4Addr) -> String {
    let out = cluster
        .command(from, "python3")
        .args(["-c", CLIENT, &to.to_string(), &PORT.to_string()])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "probe from host {from} to {to}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What the test's namespace gets from `to`:PORT.
fn probe_here(to: Ipv4Addr) -> String {
    match TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), Duration::from_secs(1)) {
        Ok(s) => {
            let mut line = String::new();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            BufReader::new(s).read_line(&mut line).unwrap();
            line.trim().to_string()
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => "refused".into(),
        Err(_) => "unreachable".into(),
    }
}

/// Whether link `dev` (in namespace `ns`, or the test's) is administratively up.
fn link_up(ns: Option<&str>, dev: &str) -> bool {
    let mut cmd = std::process::Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(["-o", "link", "show", "dev", dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip link show {dev} in {ns:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = text.split(['<', '>']).nth(1).unwrap_or_default();
    flags.split(',').any(|f| f == "UP")
}

/// The LAN and replication links of host `i`: (namespace, device), both ends.
fn host_links(cluster: &Cluster, i: usize) -> Vec<(Option<String>, String)> {
    let (name, h, ns) = (&cluster.name, cluster.host_name(i), cluster.ns(i));
    vec![
        (None, format!("{name}{h}l")),
        (None, format!("{name}{h}r")),
        (Some(ns.clone()), "lan0".into()),
        (Some(ns), "rep0".into()),
    ]
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hosts_reach_each_other_and_the_manager_until_killed() {
    let cluster = Cluster::up(3);
    let n = cluster.hosts;
    assert_eq!(cluster.ns(1), format!("{}b", cluster.name));
    assert_eq!(
        cluster.repl_ip(2),
        Ipv4Addr::new(10, 78, cluster.index as u8, 3)
    );
    assert_eq!(
        cluster.guest_config(),
        format!(
            "ip={}/24,gw={},port=7000",
            cluster.guest_addr().ip(),
            cluster.lan_gateway()
        )
    );

    // The manager's side: a listener on the replication bridge in the test's namespace.
    let manager = TcpListener::bind((cluster.manager_ip(), PORT)).expect("bind the manager ip");
    std::thread::spawn(move || {
        for mut s in manager.incoming().flatten() {
            let _ = s.write_all(b"manager\n");
        }
    });
    let mut servers: Vec<Server> = (0..n).map(|i| Server::start(&cluster, i)).collect();

    // Every host reaches every host and the manager; the test's namespace reaches every host.
    for from in 0..n {
        for to in 0..n {
            assert_eq!(
                probe_from(&cluster, from, cluster.repl_ip(to)),
                cluster.host_name(to),
                "host {from} -> host {to}"
            );
        }
        assert_eq!(
            probe_from(&cluster, from, cluster.manager_ip()),
            "manager",
            "host {from} -> manager"
        );
        assert_eq!(
            probe_here(cluster.repl_ip(from)),
            cluster.host_name(from),
            "test -> host {from}"
        );
    }

    // Host a crashes: its server dies of SIGKILL, its links are down, nobody reaches it and it
    // reaches nobody; b and c still reach each other and the manager.
    cluster.kill(0);
    let st = servers[0].0.try_wait().unwrap();
    assert_eq!(
        st.and_then(|s| s.signal()),
        Some(9),
        "host a's server after kill: {st:?}"
    );
    for (ns, dev) in host_links(&cluster, 0) {
        assert!(!link_up(ns.as_deref(), &dev), "{dev} in {ns:?} still up");
    }
    assert_eq!(probe_here(cluster.repl_ip(0)), "unreachable");
    assert_eq!(probe_from(&cluster, 1, cluster.repl_ip(0)), "unreachable");
    assert_eq!(probe_from(&cluster, 0, cluster.repl_ip(1)), "unreachable");
    assert_eq!(probe_from(&cluster, 0, cluster.manager_ip()), "unreachable");
    assert_eq!(probe_from(&cluster, 1, cluster.repl_ip(2)), "c");
    assert_eq!(probe_from(&cluster, 2, cluster.repl_ip(1)), "b");
    for i in 1..n {
        assert_eq!(probe_from(&cluster, i, cluster.manager_ip()), "manager");
        assert_eq!(probe_here(cluster.repl_ip(i)), cluster.host_name(i));
    }

    // Plugged back in: reachable again (the connection is refused: its server stays dead).
    cluster.revive(0);
    for (ns, dev) in host_links(&cluster, 0) {
        assert!(link_up(ns.as_deref(), &dev), "{dev} in {ns:?} still down");
    }
    wait_for("test -> revived host a", Duration::from_secs(10), || {
        probe_here(cluster.repl_ip(0)) == "refused"
    });
    wait_for("host b -> revived host a", Duration::from_secs(10), || {
        probe_from(&cluster, 1, cluster.repl_ip(0)) == "refused"
    });
    wait_for("revived host a -> manager", Duration::from_secs(10), || {
        probe_from(&cluster, 0, cluster.manager_ip()) == "manager"
    });
    assert_eq!(probe_from(&cluster, 0, cluster.repl_ip(2)), "c");
    servers.clear();
}
