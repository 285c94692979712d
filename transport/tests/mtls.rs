//! Mutual TLS is mandatory: a client with a self-signed certificate, a certificate from
//! another CA, an expired certificate, or none at all is refused during the handshake (before
//! any protocol byte), and the refusal is logged with its reason. A proper peer gets through.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use transport::certs::{self, Validity};
use transport::{quic, QuicConfig, Server};

fn setup(dir: &Path) -> Server {
    certs::init_ca(dir).unwrap();
    certs::issue(dir, "backup").unwrap();
    certs::issue(dir, "primary").unwrap();
    let id = certs::load(dir, "backup").unwrap();
    Server::bind("127.0.0.1:0".parse().unwrap(), &id, &QuicConfig::default()).unwrap()
}

/// Tries to connect and exchange one frame; returns whether the server accepted, and else
/// the refusal the server recorded for this client (its own address and reason).
async fn attempt(server: &Server, addr: SocketAddr, ep: quinn::Endpoint) -> (bool, String) {
    let port = ep.local_addr().unwrap().port();
    let client = async move {
        let conn = quic::connect(&ep, addr, "backup").await?;
        let (mut link, mut rx) = transport::PrimaryLink::open(conn, 1).await?;
        link.send(0, protocol::frame::encode(9, b"ping")).await?;
        match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            Ok(Some(Ok(_))) => Ok(()),
            Ok(Some(Err(e))) => Err(e),
            _ => Err(transport::TransportError::Closed("no answer".into())),
        }
    };
    let refused = async {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(4) {
            if server.refusals().iter().any(|r| r.peer.port() == port) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let server_side = async {
        tokio::select! {
            c = server.accept() => {
                let (mut link, mut rx) = transport::BackupLink::accept(c.unwrap()).await.unwrap();
                if let Some(Ok(f)) = rx.recv().await {
                    link.send(&f).await.unwrap();
                }
                true
            }
            _ = refused => false,
        }
    };
    let (c, accepted) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), client),
        server_side
    );
    if accepted {
        assert!(
            matches!(c, Ok(Ok(()))),
            "accepted peer could not exchange a frame: {c:?}"
        );
        return (true, "accepted".into());
    }
    assert!(!matches!(c, Ok(Ok(()))), "refused peer exchanged a frame");
    let refusal = server
        .refusals()
        .into_iter()
        .find(|r| r.peer.port() == port)
        .map(|r| r.to_string());
    (
        false,
        refusal.unwrap_or_else(|| "no refusal recorded".into()),
    )
}

#[tokio::test]
async fn cluster_member_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    let ep = quic::client(
        &certs::load(dir.path(), "primary").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
    assert!(ok, "{why}");
}

#[tokio::test]
async fn self_signed_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    let rogue = dir.path().join("rogue");
    certs::self_signed(&rogue, "primary").unwrap();
    let (c, k) = certs::host_paths(&rogue, "primary");
    let id = certs::load_parts("primary", &certs::ca_paths(dir.path()).0, &c, &k).unwrap();
    let ep = quic::client(&id, &QuicConfig::default()).unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
    assert!(!ok);
    assert!(why.contains("refused connection from 127.0.0.1:"), "{why}");
    assert!(
        why.contains("invalid peer certificate"),
        "refusal recorded with its reason: {why}"
    );
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    let other = dir.path().join("other");
    certs::init_ca(&other).unwrap();
    certs::issue(&other, "primary").unwrap();
    let (c, k) = certs::host_paths(&other, "primary");
    // It trusts our CA for the server, but its own certificate comes from elsewhere.
    let id = certs::load_parts("primary", &certs::ca_paths(dir.path()).0, &c, &k).unwrap();
    let ep = quic::client(&id, &QuicConfig::default()).unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
    assert!(!ok, "{why}");
    // Both CAs carry the same name, so webpki finds the issuer by name and the signature fails.
    assert!(
        why.contains("BadSignature") || why.contains("UnknownIssuer"),
        "{why}"
    );
}

#[tokio::test]
async fn expired_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    certs::issue_with(
        dir.path(),
        "old",
        Validity {
            from: time::Duration::days(-30),
            until: time::Duration::days(-1),
        },
    )
    .unwrap();
    let id = certs::load(dir.path(), "old").unwrap();
    let ep = quic::client(&id, &QuicConfig::default()).unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
    assert!(!ok, "{why}");
    assert!(why.contains("certificate expired"), "{why}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    let id = certs::load(dir.path(), "primary").unwrap();
    let tls = transport::tls::client_config_without_cert(&id).unwrap();
    let ep = quic::client_with(tls, &QuicConfig::default()).unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
    eprintln!("{why}");
    assert!(!ok);
    assert!(
        why.to_lowercase().contains("certificate"),
        "reason names the missing certificate: {why}"
    );
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let _ours = setup(dir.path());
    let other = dir.path().join("other");
    certs::init_ca(&other).unwrap();
    certs::issue(&other, "backup").unwrap();
    let fake = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(&other, "backup").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let ep = quic::client(
        &certs::load(dir.path(), "primary").unwrap(),
        &QuicConfig::default(),
    )
    .unwrap();
    let addr = fake.local_addr().unwrap();
    let r = quic::connect(&ep, addr, "backup").await;
    assert!(r.is_err(), "client must not trust a server from another CA");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("invalid peer certificate"), "{e}");
    drop(fake);
}

#[test]
fn certificate_files_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path()).unwrap();
    assert!(certs::init_ca(dir.path())
        .unwrap_err()
        .to_string()
        .contains("already holds"));
    assert!(certs::issue(dir.path(), "bad/name").is_err());
    certs::issue(dir.path(), "host-1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(certs::host_paths(dir.path(), "host-1").1)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    assert!(certs::load(dir.path(), "nobody").is_err());
}
