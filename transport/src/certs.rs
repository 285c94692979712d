//! The cluster CA and host certificates (rcgen).
//!
//! ```text
//! <dir>/ca.pem  <dir>/ca.key          cluster CA (keep ca.key off the hosts if you can)
//! <dir>/<host>.pem <dir>/<host>.key   a host's certificate, signed by the CA, valid as both
//!                                      TLS server and TLS client (mutual TLS), SAN = host name
//!                                      and a role statement (see [`crate::roles`])
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::error::TransportError;
use crate::roles::Grants;

/// Default validity of a host certificate.
pub const HOST_VALIDITY_DAYS: i64 = 365;
/// Default validity of the CA.
pub const CA_VALIDITY_DAYS: i64 = 3650;

fn cert_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Cert(e.to_string())
}

fn write(path: &Path, data: &str, private: bool) -> Result<(), TransportError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|err| TransportError::Io {
            path: path.into(),
            err,
        })?;
    f.write_all(data.as_bytes())
        .map_err(|err| TransportError::Io {
            path: path.into(),
            err,
        })
}

fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|err| TransportError::Io {
        path: path.into(),
        err,
    })
}

/// Paths of the CA files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Paths of a host's files in `dir`.
pub fn host_paths(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}.key")),
    )
}

fn ca_params(name: &str, days: i64) -> Result<CertificateParams, TransportError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "vmatrix cluster");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    Ok(p)
}

/// Creates a new cluster CA in `dir` (refuses to overwrite one).
pub fn init_ca(dir: &Path) -> Result<(), TransportError> {
    std::fs::create_dir_all(dir).map_err(|err| TransportError::Io {
        path: dir.into(),
        err,
    })?;
    let (cert, key) = ca_paths(dir);
    if cert.exists() || key.exists() {
        return Err(TransportError::Cert(format!(
            "{} already holds a cluster CA",
            dir.display()
        )));
    }
    let kp = KeyPair::generate().map_err(cert_err)?;
    let c = ca_params("vmatrix cluster CA", CA_VALIDITY_DAYS)?
        .self_signed(&kp)
        .map_err(cert_err)?;
    write(&key, &kp.serialize_pem(), true)?;
    write(&cert, &c.pem(), false)
}

/// Validity window of an issued certificate, relative to now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, relative to now (negative: in the past).
    pub from: Duration,
    /// End, relative to now.
    pub until: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            from: Duration::hours(-1),
            until: Duration::days(HOST_VALIDITY_DAYS),
        }
    }
}

/// Issues a certificate for `host`, signed by the CA in `dir`, that may act as primary and
/// backup of any VM ([`Grants::primary_and_backup`]).
pub fn issue(dir: &Path, host: &str) -> Result<(), TransportError> {
    issue_with(dir, host, Validity::default())
}

/// Issues a certificate for `host` that grants `grants`.
pub fn issue_for(dir: &Path, host: &str, grants: &Grants) -> Result<(), TransportError> {
    issue_full(dir, host, grants, Validity::default())
}

/// Issues a primary-and-backup certificate for `host` with an explicit validity (tests use an
/// expired one).
pub fn issue_with(dir: &Path, host: &str, v: Validity) -> Result<(), TransportError> {
    issue_full(dir, host, &Grants::primary_and_backup(), v)
}

/// Issues a certificate for `host` granting `grants`, valid for `v`.
pub fn issue_full(
    dir: &Path,
    host: &str,
    grants: &Grants,
    v: Validity,
) -> Result<(), TransportError> {
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(TransportError::Cert(format!(
            "host name '{host}' must be letters, digits, '-' and '.'"
        )));
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca_kp = KeyPair::from_pem(&read(&ca_key)?).map_err(cert_err)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_kp).map_err(cert_err)?;
    let mut p = CertificateParams::new(vec![host.to_string()]).map_err(cert_err)?;
    let uri = grants.to_uri().try_into().map_err(cert_err)?;
    p.subject_alt_names.push(SanType::URI(uri));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now + v.from;
    p.not_after = now + v.until;
    let kp = KeyPair::generate().map_err(cert_err)?;
    let c = p.signed_by(&kp, &issuer).map_err(cert_err)?;
    let (cert, key) = host_paths(dir, host);
    write(&key, &kp.serialize_pem(), true)?;
    write(&cert, &c.pem(), false)
}

/// Creates a self-signed certificate for `host` that no cluster CA vouches for (tests).
pub fn self_signed(dir: &Path, host: &str) -> Result<(), TransportError> {
    std::fs::create_dir_all(dir).map_err(|err| TransportError::Io {
        path: dir.into(),
        err,
    })?;
    let kp = KeyPair::generate().map_err(cert_err)?;
    let c = CertificateParams::new(vec![host.to_string()])
        .map_err(cert_err)?
        .self_signed(&kp)
        .map_err(cert_err)?;
    let (cert, key) = host_paths(dir, host);
    write(&key, &kp.serialize_pem(), true)?;
    write(&cert, &c.pem(), false)
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TransportError::Cert(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TransportError::Cert(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A host's identity: the cluster CA, its certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    /// Host name (SAN of the certificate).
    pub host: String,
    /// The cluster CA.
    pub ca: Vec<CertificateDer<'static>>,
    /// The host certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            host: self.host.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Loads `host`'s identity from a directory made by `init_ca` + `issue`.
pub fn load(dir: &Path, host: &str) -> Result<Identity, TransportError> {
    let (cert, key) = host_paths(dir, host);
    load_parts(host, &ca_paths(dir).0, &cert, &key)
}

/// Loads an identity from explicit files: the CA to trust, a certificate and its key.
pub fn load_parts(
    host: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Identity, TransportError> {
    use rustls::pki_types::pem::PemObject;
    let key_pem = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TransportError::Cert(format!("{}: {e}", key.display())))?;
    Ok(Identity {
        host: host.to_string(),
        ca: pem_certs(ca)?,
        chain: pem_certs(cert)?,
        key: key_der,
    })
}
