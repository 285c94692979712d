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

/// Tries to connect and exchange one frame; returns whether the server accepted, and its
/// accept result as text.
async fn attempt(server: &Server, addr: SocketAddr, ep: quinn::Endpoint) -> (bool, String) {
    let client = async move {
        let conn = quic::connect(&ep, addr, "backup").await?;
        let (mut link, mut rx) = transport::PrimaryLink::open(conn, 1).await?;
        link.send(0, &protocol::frame::encode(9, b"ping")).await?;
        match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            Ok(Some(Ok(_))) => Ok(()),
            Ok(Some(Err(e))) => Err(e),
            _ => Err(transport::TransportError::Closed("no answer".into())),
        }
    };
    let server_side = async {
        match server.accept().await {
            Ok(conn) => {
                let (mut link, mut rx) = transport::BackupLink::accept(conn).await.unwrap();
                if let Some(Ok(f)) = rx.recv().await {
                    link.send(&f).await.unwrap();
                }
                (true, "accepted".to_string())
            }
            Err(e) => (false, e.to_string()),
        }
    };
    let (c, s) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), client),
        tokio::time::timeout(Duration::from_secs(10), server_side)
    );
    let s = s.unwrap_or((false, "server timed out".into()));
    if s.0 {
        assert!(
            matches!(c, Ok(Ok(()))),
            "accepted peer could not exchange a frame: {c:?}"
        );
    } else {
        assert!(!matches!(c, Ok(Ok(()))), "refused peer exchanged a frame");
    }
    s
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
    assert!(why.contains("refused connection"), "{why}");
    let log = server.refusals().join("; ");
    assert!(
        log.contains("client certificate refused"),
        "refusal logged with reason: {log}"
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
    let log = server.refusals().join("; ");
    // Both CAs carry the same name, so webpki finds the issuer by name and the signature fails.
    assert!(
        log.contains("BadSignature") || log.contains("UnknownIssuer"),
        "{log}"
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
    let log = server.refusals().join("; ");
    assert!(log.contains("certificate expired"), "{log}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path());
    let id = certs::load(dir.path(), "primary").unwrap();
    let tls = transport::tls::client_config_without_cert(&id).unwrap();
    let ep = quic::client_with(tls, &QuicConfig::default()).unwrap();
    let (ok, why) = attempt(&server, server.local_addr().unwrap(), ep).await;
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
    let accept = tokio::spawn(async move { fake.accept().await.is_ok() });
    let r = quic::connect(&ep, addr, "backup").await;
    assert!(r.is_err(), "client must not trust a server from another CA");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("invalid peer certificate"), "{e}");
    let _ = tokio::time::timeout(Duration::from_secs(2), accept).await;
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
