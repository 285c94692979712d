//! A backup facing hostile or broken peers: abandoned handshakes do not delay a real primary's
//! session; a peer that authenticates but never speaks is closed after
//! the silence limit and the next primary is served; a `Hello` from a certificate that may not
//! act as primary for the VM is refused (`Refuse WrongPeer` with the reason, then the
//! connection is closed with the `REFUSED` code); every failed session closes its connection
//! with an application error code and reason; a data connection (protocol v4) is taken only
//! from the running session's own primary, and closed with its session.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::message::{Hello, Message, RefuseCode, Role};
use transport::quic::code;
use transport::{certs, quic, Grants, HostRole, PrimaryLink, QuicConfig};

const VM: &str = "vm1";

struct Backup {
    addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Option<u64>, backup::BackupError>>,
    _dir: tempfile::TempDir,
}

fn quic_cfg() -> QuicConfig {
    // Silence limit of the backup: min(3 s, max(idle, 500 ms) * 3) = 1.5 s.
    QuicConfig {
        idle_timeout_ms: 200,
        keep_alive_ms: 40,
        ..QuicConfig::default()
    }
}

async fn start_backup(pki: &Path) -> Backup {
    start_backup_with(pki, (1, Vec::new())).await
}

/// A backup with `data_sockets` free data sockets, or at `data_ports`.
async fn start_backup_with(pki: &Path, (data_sockets, data_ports): (u8, Vec<u16>)) -> Backup {
    let dir = tempfile::tempdir().unwrap();
    let cfg = backup::BackupConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        image_dir: dir.path().join("image"),
        identity: certs::load(pki, "backup").unwrap(),
        cluster_id: 1,
        vm_id: VM.into(),
        quic: quic_cfg(),
        stats: Arc::new(backup::BackupStats::default()),
        exports: backup::Exports::default(),
        data_sockets,
        data_ports,
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(backup::serve(cfg, rx, Some(ready_tx)));
    let addr = ready_rx.await.expect("backup listening");
    Backup {
        addr,
        stop,
        task,
        _dir: dir,
    }
}

fn pki(dir: &Path) {
    certs::init_ca(dir).unwrap();
    certs::issue(dir, "backup").unwrap();
    certs::issue(dir, "primary").unwrap();
}

async fn connect(pki: &Path, host: &str, addr: std::net::SocketAddr) -> quinn::Connection {
    let ep = quic::client(&certs::load(pki, host).unwrap(), &quic_cfg()).unwrap();
    quic::connect(&ep, addr, "backup").await.expect("connect")
}

fn hello(vm: &str) -> Vec<u8> {
    Message::Hello(Hello {
        min_version: protocol::message::MIN_PROTOCOL_VERSION,
        max_version: protocol::message::PROTOCOL_VERSION,
        cluster_id: 1,
        vm_id: vm.into(),
        term: 1,
        role: Role::Primary,
        streams: 1,
        history: 42,
    })
    .encode()
}

/// Says Hello on `conn`; returns the backup's first answer.
async fn say_hello(conn: quinn::Connection, vm: &str) -> (PrimaryLink, Message) {
    let (mut link, mut rx) = PrimaryLink::open(conn, 1).await.unwrap();
    link.send(0, hello(vm)).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an answer to Hello")
        .expect("stream open")
        .expect("a frame");
    (link, Message::decode(&f).unwrap())
}

/// Waits for `conn` to be closed by the backup; returns its application code and reason.
async fn closed_by_backup(conn: &quinn::Connection, within: Duration) -> (u32, String) {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner() as u32,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(e) => panic!("closed, but not by the backup's application: {e}"),
        Err(_) => panic!("the backup did not close the connection within {within:?}"),
    }
}

async fn stop(b: Backup) {
    let _ = b.stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), b.task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_authenticated_peer_is_closed_and_the_next_primary_served() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let b = start_backup(dir.path()).await;
    // Authenticates, opens nothing, says nothing.
    let silent = connect(dir.path(), "primary", b.addr).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let real = connect(dir.path(), "primary", b.addr).await;
    let real_hello = tokio::spawn(say_hello(real, VM));
    // A newer connection supersedes one that opened no stream (a primary retrying its
    // handshake must not wait for the silence limit).
    let (c, reason) = closed_by_backup(&silent, Duration::from_secs(5)).await;
    assert_eq!(c, code::SESSION_FAILED, "{reason}");
    assert!(reason.contains("superseded"), "{reason}");
    let (_link, answer) = tokio::time::timeout(Duration::from_secs(5), real_hello)
        .await
        .expect("the next primary is served")
        .unwrap();
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(1), "served after {waited:?}");

    // Opens its control stream, then says nothing: the receiver's clock runs from the start.
    let mute = connect(dir.path(), "primary", b.addr).await;
    let (_mute_link, _rx) = PrimaryLink::open(mute.clone(), 1).await.unwrap();
    // The backup is busy with the real primary's session; end it so it takes the mute one.
    drop(_link);
    let (c, reason) = closed_by_backup(&mute, Duration::from_secs(8)).await;
    assert_eq!(c, code::PEER_TIMEOUT, "{reason}");

    // Alone (nobody newer waiting), a peer that opens nothing is closed after the limit.
    let lone = connect(dir.path(), "primary", b.addr).await;
    let (c, reason) = closed_by_backup(&lone, Duration::from_secs(8)).await;
    assert_eq!(c, code::PEER_TIMEOUT, "{reason}");
    assert!(reason.contains("silent for 1500 ms"), "{reason}");
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_from_a_certificate_that_may_not_be_primary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let backup_only = Grants::new(&[HostRole::Backup], &[]).unwrap();
    certs::issue_for(dir.path(), "rogue", &backup_only).unwrap();
    let other_vm = Grants::new(&[HostRole::Primary], &["vm2".into()]).unwrap();
    certs::issue_for(dir.path(), "vm2-primary", &other_vm).unwrap();
    let this_vm = Grants::new(&[HostRole::Primary], &[VM.into()]).unwrap();
    certs::issue_for(dir.path(), "vm1-primary", &this_vm).unwrap();
    let b = start_backup(dir.path()).await;
    for (host, want) in [
        (
            "rogue",
            "the certificate of 'rogue' may not act as primary for VM 'vm1': it grants roles backup for any VM",
        ),
        (
            "vm2-primary",
            "the certificate of 'vm2-primary' may not act as primary for VM 'vm1': it grants roles primary for VM vm2",
        ),
    ] {
        let conn = connect(dir.path(), host, b.addr).await;
        let (_link, answer) = say_hello(conn.clone(), VM).await;
        match answer {
            Message::Refuse(r) => {
                assert_eq!(r.code, RefuseCode::WrongPeer);
                assert_eq!(r.detail, want);
            }
            m => panic!("{host}: expected a refusal, got {m:?}"),
        }
        let (c, reason) = closed_by_backup(&conn, Duration::from_secs(5)).await;
        assert_eq!(c, code::REFUSED, "{reason}");
        assert!(reason.contains(want), "{reason}");
    }
    // A certificate for this VM, and the default one (primary and backup of any VM), work.
    for host in ["vm1-primary", "primary"] {
        let conn = connect(dir.path(), host, b.addr).await;
        let (link, answer) = say_hello(conn.clone(), VM).await;
        assert!(matches!(answer, Message::Welcome(_)), "{host}: {answer:?}");
        link.close(code::DONE, "test done");
    }
    stop(b).await;
}

/// The next message from the backup.
async fn next(rx: &mut transport::FrameRx) -> Message {
    let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a frame from the backup")
        .expect("stream open")
        .expect("a frame");
    Message::decode(&f).unwrap()
}

/// The data ports the backup offered in `answer` (a `Welcome`).
fn data_ports(answer: &Message) -> Vec<u16> {
    match answer {
        Message::Welcome(w) => w.data_ports.clone(),
        m => panic!("expected a Welcome, got {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_sessions_own_primary_may_open_data_connections() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let this_vm = Grants::new(&[HostRole::Primary], &[VM.into()]).unwrap();
    certs::issue_for(dir.path(), "other-primary", &this_vm).unwrap();
    let b = start_backup(dir.path()).await;
    let main = connect(dir.path(), "primary", b.addr).await;
    let (mut link, mut rx) = PrimaryLink::open(main, 1).await.unwrap();
    link.send(0, hello(VM)).await.unwrap();
    let ports = data_ports(&next(&mut rx).await);
    assert_eq!(ports.len(), 1, "one data socket offered");
    let data_addr = std::net::SocketAddr::new(b.addr.ip(), ports[0]);
    // Another host, even one that may be primary for this VM, is not this session's primary.
    let other = connect(dir.path(), "other-primary", data_addr).await;
    let (c, reason) = closed_by_backup(&other, Duration::from_secs(5)).await;
    assert_eq!(c, code::REFUSED, "{reason}");
    assert!(reason.contains("the session's certificate"), "{reason}");
    // The session's own primary is taken in: a heartbeat sent on a stream of the data
    // connection is answered on the session's control stream.
    let data = connect(dir.path(), "primary", data_addr).await;
    transport::link::joined(&data, Duration::from_secs(5))
        .await
        .expect("the backup confirms the data connection it took in");
    let mut s = data.open_uni().await.unwrap();
    let hb = Message::Heartbeat(protocol::message::Heartbeat { term: 1, seq: 77 });
    s.write_all(&hb.encode()).await.unwrap();
    loop {
        if let Message::Heartbeat(h) = next(&mut rx).await {
            if h.seq == 77 {
                break;
            }
        }
    }
    // One data connection per data socket: a second one of the same primary is refused.
    let second = connect(dir.path(), "primary", data_addr).await;
    let (c, reason) = closed_by_backup(&second, Duration::from_secs(5)).await;
    assert_eq!(c, code::REFUSED, "{reason}");
    assert!(reason.contains("every data socket"), "{reason}");
    // The session ends: its data connection is closed with it.
    link.close(code::DONE, "test done");
    let (c, reason) = closed_by_backup(&data, Duration::from_secs(5)).await;
    assert_ne!(c, code::REFUSED, "{reason}");
    // No session runs: a data connection is refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = connect(dir.path(), "primary", data_addr).await;
    let (c, reason) = closed_by_backup(&late, Duration::from_secs(5)).await;
    assert_eq!(c, code::REFUSED, "{reason}");
    assert!(reason.contains("no session"), "{reason}");
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_session_closes_its_connection_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let b = start_backup(dir.path()).await;
    // The receiver refuses a Hello for another VM (WrongPeer); the connection is closed too.
    let conn = connect(dir.path(), "primary", b.addr).await;
    let (_link, answer) = say_hello(conn.clone(), "other-vm").await;
    assert!(
        matches!(&answer, Message::Refuse(r) if r.code == RefuseCode::WrongPeer),
        "{answer:?}"
    );
    let (c, reason) = closed_by_backup(&conn, Duration::from_secs(5)).await;
    assert_eq!(c, code::REFUSED, "{reason}");
    assert!(reason.contains("VM 'other-vm'"), "{reason}");
    // Garbage on the control stream: the session fails and is closed with the reason.
    let conn = connect(dir.path(), "primary", b.addr).await;
    let (mut link, _rx) = PrimaryLink::open(conn.clone(), 1).await.unwrap();
    link.send(0, b"this is not a vmatrix frame at all".to_vec())
        .await
        .unwrap();
    let (c, reason) = closed_by_backup(&conn, Duration::from_secs(5)).await;
    assert_eq!(c, code::SESSION_FAILED, "{reason}");
    assert!(reason.contains("magic"), "{reason}");
    stop(b).await;
}

/// Sends a genuine QUIC Initial (a ClientHello) to `server` from a socket that never answers.
async fn abandoned_hello(pki: &Path, server: std::net::SocketAddr) -> tokio::net::UdpSocket {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ep = quic::client(&certs::load(pki, "primary").unwrap(), &quic_cfg()).unwrap();
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

/// Time from a real primary starting to connect (retrying as the primary does) until the
/// backup's `Welcome`.
async fn time_to_welcome(pki: &Path, addr: std::net::SocketAddr) -> (Duration, PrimaryLink) {
    let ep = quic::client(&certs::load(pki, "primary").unwrap(), &quic_cfg()).unwrap();
    let t0 = Instant::now();
    let conn = loop {
        match quic::connect(&ep, addr, "backup").await {
            Ok(c) => break c,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(20), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (link, answer) = say_hello(conn, VM).await;
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
    (t0.elapsed(), link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_handshakes_do_not_delay_a_real_primary_session() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let b = start_backup(dir.path()).await;
    let (alone, link) = time_to_welcome(dir.path(), b.addr).await;
    link.close(code::DONE, "measured");
    let mut socks = Vec::new();
    for _ in 0..32 {
        socks.push(abandoned_hello(dir.path(), b.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (flooded, link) = time_to_welcome(dir.path(), b.addr).await;
    eprintln!(
        "Welcome after {:.1} ms alone, {:.1} ms behind 32 abandoned handshakes",
        alone.as_secs_f64() * 1e3,
        flooded.as_secs_f64() * 1e3
    );
    assert!(
        flooded < alone + Duration::from_millis(100),
        "abandoned handshakes delayed the primary: {flooded:?} (alone {alone:?})"
    );
    link.close(code::DONE, "measured");
    drop(socks);
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_port_taken_by_another_costs_its_connection_not_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    // Another process holds the port the backup is told to take for its data connection
    // (a managed VM's port + 1, say).
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let b = tokio::time::timeout(
        Duration::from_secs(10),
        start_backup_with(dir.path(), (0, vec![port])),
    )
    .await
    .expect("the backup listens without its data socket");
    let conn = connect(dir.path(), "primary", b.addr).await;
    match say_hello(conn, VM).await.1 {
        Message::Welcome(w) => assert!(w.data_ports.is_empty(), "{:?}", w.data_ports),
        other => panic!("not welcomed: {other:?}"),
    }
    stop(b).await;
}
