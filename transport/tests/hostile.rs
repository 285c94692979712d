//! The replication port is reachable by anyone on the network. Handshakes that are started and
//! abandoned must not delay a real primary: the server drives every handshake in its own task
//! with a short timeout and hands finished connections to `accept`. Refusals are recorded per
//! connection (each with its own reason), in a bounded log. A server whose certificate does not
//! grant the backup role is refused by the client.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use transport::certs;
use transport::{quic, Grants, HostRole, QuicConfig, Server, TransportError};

fn pki(dir: &Path) {
    certs::init_ca(dir).unwrap();
    certs::issue(dir, "backup").unwrap();
    certs::issue(dir, "primary").unwrap();
}

/// Sends a genuine QUIC Initial (a ClientHello from a quinn client) to `server` from a UDP
/// socket that never answers: the server starts a handshake that nobody finishes. Returns the
/// socket (keep it open: a closed port could answer with ICMP).
async fn abandoned_hello(dir: &Path, server: SocketAddr) -> tokio::net::UdpSocket {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ep = quic::client(
        &certs::load(dir, "primary").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    // The client sends its Initial to our socket; we forward it to the server as our own.
    let connecting = ep.connect(sink.local_addr().unwrap(), "backup").unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sink.recv_from(&mut buf))
        .await
        .expect("the client sends an Initial")
        .unwrap();
    drop(connecting);
    ep.close(0u32.into(), b"");
    sink.send_to(&buf[..n], server).await.unwrap();
    sink
}

/// Time from a real primary starting to connect until the server's `accept` returns its
/// connection.
async fn real_primary_delay(dir: &Path, server: &Server) -> Duration {
    let addr = server.local_addr().unwrap();
    let ep = quic::client(
        &certs::load(dir, "primary").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let t0 = Instant::now();
    // As the primary does: retry every 100 ms until connected.
    let client = tokio::spawn(async move {
        loop {
            match quic::connect(&ep, addr, "backup").await {
                Ok(c) => return (Ok::<_, transport::TransportError>(c), ep),
                Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return (Err(e), ep),
            }
        }
    });
    // As the backup does: take connections until one is there.
    let next = async {
        loop {
            if let Ok(c) = server.accept().await {
                return c;
            }
        }
    };
    let conn = tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("the real primary is accepted within 10 s");
    let took = t0.elapsed();
    let (c, _ep) = client.await.unwrap();
    c.expect("the real primary connects");
    conn.close(0u32.into(), b"done");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_handshakes_do_not_delay_a_real_primary() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let cfg = QuicConfig {
        handshake_timeout_ms: 500,
        ..QuicConfig::default()
    };
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(dir.path(), "backup").unwrap(),
        &cfg,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let baseline = real_primary_delay(dir.path(), &server).await;

    let flood: usize = std::env::var("FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut sockets = Vec::new();
    for _ in 0..flood {
        sockets.push(abandoned_hello(dir.path(), addr).await);
    }
    // Let the server take them all in before the real primary comes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let flooded = real_primary_delay(dir.path(), &server).await;
    eprintln!(
        "real primary accepted after {:.1} ms alone, {:.1} ms behind {flood} abandoned handshakes",
        baseline.as_secs_f64() * 1e3,
        flooded.as_secs_f64() * 1e3
    );
    assert!(
        flooded < baseline + Duration::from_millis(100),
        "{flood} abandoned handshakes delayed a real primary: {flooded:?} (alone: {baseline:?})"
    );
    // Each abandoned handshake ends at the handshake timeout and is recorded as such.
    let t0 = Instant::now();
    while server.refusal_log().total() < flood as u64 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refusals = server.refusals();
    assert_eq!(server.refusal_log().total(), flood as u64, "{refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|r| r.reason == "handshake not finished within 500 ms"),
        "{refusals:?}"
    );
    drop(sockets);
}

/// What a refused client presents.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rogue {
    Expired,
    OtherCa,
    NoCert,
}

fn rogue_endpoint(dir: &Path, kind: Rogue) -> quinn::Endpoint {
    let cfg = QuicConfig::default();
    match kind {
        Rogue::Expired => quic::client(&certs::load(dir, "old").unwrap(), &cfg).unwrap(),
        Rogue::OtherCa => {
            let other = dir.join("other");
            let (c, k) = certs::host_paths(&other, "primary");
            let id = certs::load_parts("primary", &certs::ca_paths(dir).0, &c, &k).unwrap();
            quic::client(&id, &cfg).unwrap()
        }
        Rogue::NoCert => {
            let id = certs::load(dir, "primary").unwrap();
            let tls = transport::tls::client_config_without_cert(&id).unwrap();
            quic::client_with(tls, &cfg).unwrap()
        }
    }
}

async fn wait_refusals(server: &Server, n: u64) {
    let t0 = Instant::now();
    while server.refusal_log().total() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} of {n} refusals recorded: {:?}",
            server.refusal_log().total(),
            server.refusals()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refusals_each_carry_their_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    certs::issue_with(
        dir.path(),
        "old",
        certs::Validity {
            from: time::Duration::days(-30),
            until: time::Duration::days(-1),
        },
    )
    .unwrap();
    let other = dir.path().join("other");
    certs::init_ca(&other).unwrap();
    certs::issue(&other, "primary").unwrap();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(dir.path(), "backup").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    // Interleaved kinds, all at once.
    let kinds = [Rogue::Expired, Rogue::OtherCa, Rogue::NoCert];
    let mut tasks = Vec::new();
    let mut kind_of = std::collections::HashMap::new();
    for i in 0..12 {
        let kind = kinds[i % 3];
        let ep = rogue_endpoint(dir.path(), kind);
        kind_of.insert(ep.local_addr().unwrap().port(), kind);
        tasks.push(tokio::spawn(async move {
            let r = quic::connect(&ep, addr, "backup").await;
            // Give the server time to refuse before the endpoint goes away.
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.is_ok()
        }));
    }
    wait_refusals(&server, 12).await;
    for t in tasks {
        // With TLS 1.3 the client may consider its side done before the refusal arrives.
        let _ = t.await;
    }
    for r in server.refusals() {
        let kind = kind_of[&r.peer.port()];
        let own = match kind {
            Rogue::Expired => r.reason.contains("certificate expired"),
            Rogue::OtherCa => {
                r.reason.contains("BadSignature") || r.reason.contains("UnknownIssuer")
            }
            Rogue::NoCert => r.reason.contains("peer sent no certificates"),
        };
        assert!(own, "{kind:?} client {} recorded as: {}", r.peer, r.reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_log_is_bounded_and_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(dir.path(), "backup").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let t0 = Instant::now();
    let mut eps = Vec::new();
    for _ in 0..100 {
        let ep = rogue_endpoint(dir.path(), Rogue::NoCert);
        let e2 = ep.clone();
        tokio::spawn(async move {
            let _ = quic::connect(&e2, addr, "backup").await;
        });
        eps.push(ep);
    }
    wait_refusals(&server, 100).await;
    let secs = t0.elapsed().as_secs() + 1;
    let log = server.refusal_log();
    assert_eq!(server.refusals().len(), transport::refusals::KEEP);
    assert!(
        log.lines_logged() <= u64::from(transport::refusals::LOG_PER_SECOND) * secs,
        "{} log lines for 100 refusals in {secs} s",
        log.lines_logged()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_that_may_not_be_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let only_primary = Grants::new(&[HostRole::Primary], &[]).unwrap();
    certs::issue_for(dir.path(), "impostor", &only_primary).unwrap();
    let other_vm = Grants::new(&[HostRole::Backup], &["vm2".into()]).unwrap();
    certs::issue_for(dir.path(), "vm2-backup", &other_vm).unwrap();
    let ep = quic::client(
        &certs::load(dir.path(), "primary").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    for (host, vm, want) in [
        (
            "impostor",
            None,
            Some("may not act as backup: it grants roles primary"),
        ),
        (
            "vm2-backup",
            Some("vm1"),
            Some("may not act as backup for VM 'vm1'"),
        ),
        ("vm2-backup", Some("vm2"), None),
        ("backup", Some("vm1"), None),
    ] {
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &certs::load(dir.path(), host).unwrap(),
            &QuicConfig::default(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let r = quic::connect_backup(&ep, addr, host, vm).await;
        match (want, r) {
            (None, Ok(_)) => {}
            (Some(w), Err(TransportError::NotPermitted { reason, .. })) => {
                assert!(reason.contains(w), "{host}: {reason}")
            }
            (w, r) => panic!("{host} for {vm:?}: expected {w:?}, got {r:?}"),
        }
    }
}
