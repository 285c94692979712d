//! rustls configurations for mutual TLS inside the cluster: TLS 1.3 only, the ring provider,
//! both sides present a certificate signed by the cluster CA. A peer without one, with a
//! self-signed one, one from another CA or an expired one is refused during the handshake,
//! before any protocol byte, and the refusal is logged with its reason.

use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

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

/// Client certificate failures seen by a server, newest last (for logs and tests).
pub type RefusalLog = Arc<Mutex<Vec<String>>>;

/// Delegates to webpki and records why a client certificate was refused.
#[derive(Debug)]
struct LoggingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    log: RefusalLog,
}

impl ClientCertVerifier for LoggingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &r {
            tracing::warn!("refusing client certificate: {e}");
            if let Ok(mut l) = self.log.lock() {
                l.push(format!("client certificate refused: {e}"));
            }
        }
        r
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server side: requires a client certificate from the cluster CA.
pub fn server_config(
    id: &Identity,
    log: RefusalLog,
) -> Result<rustls::ServerConfig, TransportError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(id)?), provider())
        .build()
        .map_err(tls_err)?;
    let verifier = Arc::new(LoggingVerifier { inner, log });
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
