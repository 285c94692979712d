//! rustls configurations for mutual TLS inside the cluster: TLS 1.3 only, the ring provider,
//! both sides present a certificate signed by the cluster CA. A peer without one, with a
//! self-signed one, one from another CA or an expired one is refused during the handshake,
//! before any protocol byte; the server records and logs the refusal with that connection's
//! reason ([`crate::refusals`]).

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::certs::Identity;
use crate::error::TransportError;

/// ALPN of the replication protocol.
pub const ALPN: &[u8] = b"vmatrix-repl/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

fn roots(id: &Identity) -> Result<RootCertStore, TransportError> {
    let mut r = RootCertStore::empty();
    for c in &id.ca {
        r.add(c.clone()).map_err(tls_err)?;
    }
    Ok(r)
}

/// Server side: requires a client certificate from the cluster CA.
///
/// A refusal is reported by the handshake of that connection (its error names the webpki
/// reason), so concurrent handshakes never share a reason.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig, TransportError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(id)?), provider())
        .build()
        .map_err(tls_err)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Client side: trusts only the cluster CA and presents this host's certificate.
pub fn client_config(id: &Identity) -> Result<rustls::ClientConfig, TransportError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A client that presents no certificate at all (tests of refusal).
pub fn client_config_without_cert(id: &Identity) -> Result<rustls::ClientConfig, TransportError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(id)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
