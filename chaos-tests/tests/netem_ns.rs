//! The link-degradation proxy in the path of real traffic between network namespaces, as the
//! chaos runner uses it: two "hosts" (namespaces) on a bridge of this namespace, which runs the
//! proxy on the bridge's address (as the caller's namespace of `scripts/cluster.sh` does),
//! and a UDP flow from host a to an echo server on host b redirected through the proxy by
//! [`route_through`] while it runs, impaired, then given back its direct path.
//!
//! A second test runs a real QUIC connection (the replication transport, mutual TLS) across
//! the same setup. Needs root (namespaces, nft); skipped with a message otherwise. Every name is unique to
//! this process (`nmtst<pid>…`) and everything is removed at the end, even on failure.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chaos_tests::netem::{
    route::{list_tables, TABLE_PREFIX},
    route_through, Direction, Impairment, LinkImpairment, Netem,
};

/// Runs `ip args`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_in(ns: &str, script: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft: {script}");
}

/// Two namespaces `<name>a` (10.x.y.1) and `<name>b` (.2) on bridge `<name>br` (.254) of this
/// namespace, `<name>` = `nmtst<pid><tag>`; removed on drop.
struct Net {
    name: String,
    subnet: [u8; 3],
}

impl Net {
    fn up(tag: char) -> Net {
        let name = format!("nmtst{}{tag}", std::process::id() % 10_000_000);
        let subnet = free_subnet(tag as u32);
        let net = Net { name, subnet };
        net.down(); // leftovers of an earlier process with the same pid
        let n = &net.name;
        let br = format!("{n}br");
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", net.addr(254)), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for (h, i) in [("a", 1), ("b", 2)] {
            let ns = format!("{n}{h}");
            let veth = format!("{n}{h}");
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &br, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.name)
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, host)
    }

    fn down(&self) {
        for h in ["a", "b"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.ns(h)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.name)])
            .output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.down();
    }
}

/// A /24 of 10.213.0.0/16 that no interface of this namespace uses (`salt` keeps the tests of
/// this process, which run at once, apart).
fn free_subnet(salt: u32) -> [u8; 3] {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = (std::process::id() + salt * 37) % 250;
    (0..250)
        .map(|k| [10, 213, ((start + k) % 250 + 1) as u8])
        .find(|s| !used.contains(&format!(" {}.{}.{}.", s[0], s[1], s[2])))
        .expect("a free 10.213.x.0/24")
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

/// Sends `msg` and returns the echoes that come within `wait` (the echo server answers
/// `<source address it saw> <msg>`).
fn ask(c: &UdpSocket, msg: &str, wait: Duration) -> Vec<String> {
    // A datagram dropped by the sender's own output rules fails the send with EPERM.
    let _ = c.send(msg.as_bytes());
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    let t0 = Instant::now();
    while t0.elapsed() < wait {
        c.set_read_timeout(Some((wait - t0.elapsed()).max(Duration::from_millis(1))))
            .unwrap();
        match c.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    out
}

/// The first echo of `msg`, waiting up to a second, with the round trip.
fn echo(c: &UdpSocket, msg: &str) -> (String, Duration) {
    let t0 = Instant::now();
    c.send(msg.as_bytes()).unwrap();
    let mut buf = [0u8; 1500];
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    loop {
        let n = c
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no echo of {msg}: {e}"));
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        if s.ends_with(msg) {
            return (s, t0.elapsed());
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

#[test]
fn a_flow_between_namespaces_goes_through_the_proxy_and_back_to_its_direct_path() {
    if !is_root() || !have("nft") || !have("ip") {
        eprintln!("skipped: needs root, ip and nft");
        return;
    }
    let net = Net::up('u');
    let (a, b) = (net.ns("a"), net.ns("b"));
    let server = SocketAddrV4::new(net.addr(2), 7000);
    let stop = AtomicBool::new(false);
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();

    // Conntrack is active in host a before anything (as the runner's own rules may make it):
    // the case where a DNAT rule would miss a running flow.
    nft_in(
        &a,
        "table ip nmtst_ct {\n chain out {\n type filter hook output priority 0;\n \
         ct state established counter\n }\n}\n",
    );

    // The proxy runs here, on the bridge's address, like the runner in the caller's namespace.
    let proxy = Netem::start(
        SocketAddr::new(net.addr(254).into(), 0),
        server.into(),
        LinkImpairment::NONE,
        7,
    )
    .unwrap();
    let proxy_ip = net.addr(254).to_string();
    let host_a_ip = net.addr(1).to_string();

    std::thread::scope(|s| {
        // Host b: a UDP echo server that says whom it saw.
        let echo_server = s.spawn(|| {
            let ready_tx = ready_tx; // moved in
            enter(&b);
            let sock = UdpSocket::bind(server).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let reply = format!("{} {}", from.ip(), String::from_utf8_lossy(&buf[..n]));
                    let _ = sock.send_to(reply.as_bytes(), from);
                }
            }
        });

        // Host a: one connected socket for the whole test (one flow, as a QUIC connection).
        let result = s
            .spawn(|| {
                let ready = ready; // moved in
                enter(&a);
                ready
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the echo server listens");
                let c = UdpSocket::bind("0.0.0.0:0").unwrap();
                c.connect(server).unwrap();

                // Direct: b sees a.
                let (r, _) = echo(&c, "direct");
                assert_eq!(r, format!("{host_a_ip} direct"));
                assert_eq!(proxy.counters().forward.received, 0);

                // Routed while the flow runs: b sees the proxy; a's socket, connected to b,
                // still accepts the answers (they come from b's address).
                let route = route_through(&a, server.into(), proxy.local_addr()).unwrap();
                let tables = list_tables(&a).unwrap();
                assert!(tables.contains(&route.table().to_string()), "{tables:?}");
                let (r, _) = echo(&c, "routed");
                assert_eq!(r, format!("{proxy_ip} routed"));
                let k = proxy.counters();
                assert_eq!((k.forward.delivered, k.backward.delivered), (1, 1));

                // Delay one way.
                proxy.set(LinkImpairment::one_way(
                    Direction::Forward,
                    Impairment {
                        delay_ns: 60_000_000,
                        ..Impairment::NONE
                    },
                ));
                let (_, rtt) = echo(&c, "slow");
                assert!(rtt >= Duration::from_millis(60), "{rtt:?}");

                // Every datagram twice.
                proxy.set(LinkImpairment::one_way(
                    Direction::Forward,
                    Impairment {
                        duplicate_permille: 1000,
                        ..Impairment::NONE
                    },
                ));
                let got = ask(&c, "twice", Duration::from_millis(300));
                assert_eq!(got, vec![format!("{proxy_ip} twice"); 2]);

                // Stalled: nothing comes back until the release, then it does.
                proxy.set(LinkImpairment::stalled());
                assert!(ask(&c, "held", Duration::from_millis(200)).is_empty());
                assert_eq!(proxy.counters().forward.held, 1);
                proxy.set(LinkImpairment::NONE);
                let mut buf = [0u8; 1500];
                c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let n = c
                    .recv(&mut buf)
                    .expect("the held datagram after the release");
                assert_eq!(
                    String::from_utf8_lossy(&buf[..n]),
                    format!("{proxy_ip} held")
                );

                // Host a's own filter rules still see the real peer: dropping b drops the
                // proxied flow, dropping the proxy's address does not.
                nft_in(
                    &a,
                    &format!(
                        "table ip nmtst_part {{\n chain out {{\n type filter hook output \
                         priority 0;\n ip daddr {proxy_ip} drop\n }}\n}}\n"
                    ),
                );
                assert_eq!(echo(&c, "not cut").0, format!("{proxy_ip} not cut"));
                nft_in(
                    &a,
                    &format!(
                        "flush table ip nmtst_part\nadd rule ip nmtst_part out ip daddr {} \
                         drop\n",
                        server.ip()
                    ),
                );
                assert!(ask(&c, "cut", Duration::from_millis(200)).is_empty());
                nft_in(&a, "delete table ip nmtst_part\n");

                // Removed while the flow runs: the direct path again, the proxy sees nothing.
                let before = proxy.counters().forward.received;
                let table = route.table().to_string();
                route.remove().unwrap();
                let tables = list_tables(&a).unwrap();
                assert!(!tables.contains(&table), "{tables:?}");
                assert!(tables.iter().all(|t| !t.starts_with(TABLE_PREFIX)));
                assert!(
                    tables.contains(&"nmtst_ct".to_string()),
                    "other tables stay"
                );
                let (r, _) = echo(&c, "direct again");
                assert_eq!(r, format!("{host_a_ip} direct again"));
                assert_eq!(proxy.counters().forward.received, before);

                // A dropped route removes its table too.
                {
                    let _r = route_through(&a, server.into(), proxy.local_addr()).unwrap();
                    assert_eq!(echo(&c, "again").0, format!("{proxy_ip} again"));
                }
                assert!(list_tables(&a)
                    .unwrap()
                    .iter()
                    .all(|t| !t.starts_with(TABLE_PREFIX)));
                assert_eq!(echo(&c, "last").0, format!("{host_a_ip} last"));
            })
            .join();
        stop.store(true, Ordering::Relaxed);
        echo_server.join().unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    let k = proxy.stop();
    assert_eq!(k.sessions, 1, "one flow, one session, across both routes");
    drop(net);
}

/// One request on a new stream of `conn`; the server answers `<peer address it sees> <msg>`.
async fn quic_echo(conn: &quinn::Connection, msg: &str) -> (String, Duration) {
    let t0 = Instant::now();
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(msg.as_bytes()).await.expect("write");
        send.finish().expect("finish");
        let answer = recv.read_to_end(1500).await.expect("answer");
        String::from_utf8(answer).unwrap()
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| panic!("no answer to {msg} within 5 s"));
    (answer, t0.elapsed())
}

/// The case the chaos runner depends on: a QUIC connection (the replication transport, mutual
/// TLS) from host a to a server on host b keeps working when the route through the proxy is
/// added while it runs (the server sees the proxy's address: a migration), through delay,
/// loss, duplication with reordering and a stall, and when the route is removed again.
#[test]
fn a_quic_connection_survives_being_routed_impaired_and_given_back() {
    if !is_root() || !have("nft") || !have("ip") {
        eprintln!("skipped: needs root, ip and nft");
        return;
    }
    let net = Net::up('q');
    let (a, b) = (net.ns("a"), net.ns("b"));
    let server_addr = SocketAddrV4::new(net.addr(2), 7001);
    let certs = tempfile::tempdir().unwrap();
    transport::certs::init_ca(certs.path()).unwrap();
    transport::certs::issue(certs.path(), "backup").unwrap();
    transport::certs::issue(certs.path(), "primary").unwrap();
    let cfg = transport::QuicConfig {
        idle_timeout_ms: 5_000,
        ..transport::QuicConfig::default()
    };
    let proxy = Netem::start(
        SocketAddr::new(net.addr(254).into(), 0),
        server_addr.into(),
        LinkImpairment::NONE,
        11,
    )
    .unwrap();
    let proxy_ip = net.addr(254).to_string();
    let host_a_ip = net.addr(1).to_string();
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        // Host b: a QUIC server answering each stream with the peer address it sees.
        let server = s.spawn(|| {
            let ready_tx = ready_tx; // moved in
            enter(&b);
            rt().block_on(async {
                let id = transport::certs::load(certs.path(), "backup").unwrap();
                let server = transport::Server::bind(server_addr.into(), &id, &cfg).unwrap();
                ready_tx.send(()).unwrap();
                let accepted = tokio::time::timeout(Duration::from_secs(10), server.accept()).await;
                let Ok(Ok(conn)) = accepted else { return };
                while !stop.load(Ordering::Relaxed) {
                    let next = tokio::time::timeout(Duration::from_millis(100), conn.accept_bi());
                    let (mut send, mut recv) = match next.await {
                        Err(_) => continue,
                        Ok(Ok(pair)) => pair,
                        Ok(Err(_)) => break, // closed
                    };
                    let Ok(msg) = recv.read_to_end(1500).await else {
                        continue;
                    };
                    let answer = format!(
                        "{} {}",
                        conn.remote_address().ip(),
                        String::from_utf8_lossy(&msg)
                    );
                    let _ = send.write_all(answer.as_bytes()).await;
                    let _ = send.finish();
                }
            });
        });

        // Host a: one connection for the whole test.
        let result = s
            .spawn(|| {
                let ready = ready; // moved in
                enter(&a);
                ready
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the QUIC server listens");
                rt().block_on(async {
                    let id = transport::certs::load(certs.path(), "primary").unwrap();
                    let ep = transport::quic::client(&id, &cfg).unwrap();
                    let conn = transport::quic::connect_raw(&ep, server_addr.into(), "backup")
                        .await
                        .expect("connect");
                    let echo = |msg: &'static str| quic_echo(&conn, msg);

                    assert_eq!(echo("direct").await.0, format!("{host_a_ip} direct"));

                    // Routed while the connection runs: the server sees the proxy.
                    let route = route_through(&a, server_addr.into(), proxy.local_addr()).unwrap();
                    assert_eq!(echo("routed").await.0, format!("{proxy_ip} routed"));

                    proxy.set(LinkImpairment::both(Impairment {
                        delay_ns: 30_000_000,
                        jitter_ns: 5_000_000,
                        ..Impairment::NONE
                    }));
                    let (_, rtt) = echo("slow").await;
                    assert!(rtt >= Duration::from_millis(50), "{rtt:?}");

                    proxy.set(LinkImpairment::both(Impairment {
                        loss_permille: 200,
                        ..Impairment::NONE
                    }));
                    for _ in 0..10 {
                        assert!(echo("lossy").await.0.ends_with("lossy"));
                    }

                    proxy.set(LinkImpairment::both(Impairment {
                        duplicate_permille: 300,
                        reorder_permille: 300,
                        reorder_delay_ns: 5_000_000,
                        ..Impairment::NONE
                    }));
                    for _ in 0..10 {
                        assert!(echo("shuffled").await.0.ends_with("shuffled"));
                    }

                    // Stalled for 600 ms: the request waits, then completes.
                    proxy.set(LinkImpairment::stalled());
                    let release = async {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        proxy.set(LinkImpairment::NONE);
                    };
                    let ((answer, rtt), ()) = tokio::join!(echo("clogged"), release);
                    assert!(answer.ends_with("clogged"));
                    assert!(rtt >= Duration::from_millis(550), "{rtt:?}");

                    // Given back: the server sees host a again, on the same connection.
                    route.remove().unwrap();
                    assert_eq!(
                        echo("direct again").await.0,
                        format!("{host_a_ip} direct again")
                    );
                    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
                    let k = proxy.counters();
                    assert!(k.forward.dropped > 0 && k.backward.dropped > 0, "{k:?}");
                    assert!(k.forward.duplicated > 0 && k.forward.reordered > 0, "{k:?}");
                    assert!(k.forward.held > 0, "{k:?}");
                    conn.close(0u32.into(), b"done");
                    ep.wait_idle().await;
                });
            })
            .join();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    drop(proxy);
    drop(net);
}
