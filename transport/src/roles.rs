//! What a host certificate allows its host to be.
//!
//! A host certificate names its host (SAN DNS name, checked by TLS) and states its **roles**
//! (primary, backup, manager, agent) and the **VMs** the VM-bound roles (primary, backup) apply
//! to, in one extra SAN of type URI:
//!
//! ```text
//! vmatrix:role=primary,backup;vm=*          any VM
//! vmatrix:role=backup;vm=web1,db2           only these VMs
//! vmatrix:role=manager;vm=*                 cluster-wide roles ignore the VM list
//! ```
//!
//! The statement is signed by the cluster CA like the rest of the certificate, so a peer reads
//! it back from the end-entity certificate that TLS has already verified ([`peer_grants`],
//! parsed with `x509-parser`). A certificate without the statement grants nothing.

use std::collections::BTreeSet;
use std::fmt;

use rustls::pki_types::CertificateDer;

use crate::error::TransportError;

/// Prefix of the SAN URI that carries the grants.
pub const URI_PREFIX: &str = "vmatrix:";

/// Longest VM name a certificate can carry (as `Hello.vm_id`).
pub const MAX_VM_NAME: usize = 64;

/// Most VMs one certificate names.
pub const MAX_VMS: usize = 256;

/// What a host may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostRole {
    /// Runs a protected VM and sends its checkpoints (VM-bound).
    Primary,
    /// Receives a VM's checkpoints into a replica image (VM-bound).
    Backup,
    /// The failover manager (cluster-wide).
    Manager,
    /// A host agent (cluster-wide).
    Agent,
}

impl HostRole {
    /// Every role.
    pub const ALL: [HostRole; 4] = [
        HostRole::Primary,
        HostRole::Backup,
        HostRole::Manager,
        HostRole::Agent,
    ];

    /// Its name in certificates and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostRole::Primary => "primary",
            HostRole::Backup => "backup",
            HostRole::Manager => "manager",
            HostRole::Agent => "agent",
        }
    }

    /// Whether the role applies to particular VMs (the certificate's VM list).
    pub fn vm_bound(self) -> bool {
        matches!(self, HostRole::Primary | HostRole::Backup)
    }
}

impl fmt::Display for HostRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for HostRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HostRole::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role '{s}' (primary, backup, manager or agent)"))
    }
}

/// The VMs the VM-bound roles apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmScope {
    /// Every VM (`vm=*`).
    Any,
    /// Only these.
    Only(BTreeSet<String>),
}

/// What a certificate allows: its roles and the VMs they apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// The roles.
    pub roles: BTreeSet<HostRole>,
    /// The VMs of the VM-bound roles.
    pub vms: VmScope,
}

fn valid_vm(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VM_NAME
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Grants {
    /// The default of `vmatrix certs issue` without `--role`: primary and backup of any VM
    /// (what every host certificate could do before roles existed).
    pub fn primary_and_backup() -> Grants {
        Grants {
            roles: [HostRole::Primary, HostRole::Backup].into(),
            vms: VmScope::Any,
        }
    }

    /// `roles` for `vms` (empty: any VM). Checks names: at least one role, VM names of
    /// letters, digits, '-', '_' and '.' (at most 64 characters), at most 256 of them.
    pub fn new(roles: &[HostRole], vms: &[String]) -> Result<Grants, String> {
        if roles.is_empty() {
            return Err("a certificate needs at least one role".into());
        }
        let vms = if vms.is_empty() || vms.iter().any(|v| v == "*") {
            if vms.len() > 1 {
                return Err("'*' (any VM) cannot be combined with VM names".into());
            }
            VmScope::Any
        } else {
            if vms.len() > MAX_VMS {
                return Err(format!("at most {MAX_VMS} VMs per certificate"));
            }
            if let Some(bad) = vms.iter().find(|v| !valid_vm(v)) {
                return Err(format!(
                    "VM name '{bad}' must be 1 to {MAX_VM_NAME} letters, digits, '-', '_' or '.'"
                ));
            }
            VmScope::Only(vms.iter().cloned().collect())
        };
        Ok(Grants {
            roles: roles.iter().copied().collect(),
            vms,
        })
    }

    /// The SAN URI that states them.
    pub fn to_uri(&self) -> String {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        let vms = match &self.vms {
            VmScope::Any => "*".to_string(),
            VmScope::Only(v) => v.iter().cloned().collect::<Vec<_>>().join(","),
        };
        format!("{URI_PREFIX}role={};vm={vms}", roles.join(","))
    }

    /// Parses a SAN URI made by [`Grants::to_uri`].
    pub fn from_uri(uri: &str) -> Result<Grants, String> {
        let bad = |why: &str| format!("role statement '{uri}': {why}");
        let body = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| bad("not a vmatrix statement"))?;
        let (mut roles, mut vms) = (None, None);
        for field in body.split(';') {
            match field.split_once('=') {
                Some(("role", v)) if roles.is_none() => roles = Some(v),
                Some(("vm", v)) if vms.is_none() => vms = Some(v),
                _ => return Err(bad(&format!("unexpected field '{field}'"))),
            }
        }
        let roles = roles.ok_or_else(|| bad("no role field"))?;
        let roles: Vec<HostRole> = roles
            .split(',')
            .map(|r| r.parse::<HostRole>())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        let vms: Vec<String> = vms
            .ok_or_else(|| bad("no vm field"))?
            .split(',')
            .map(str::to_string)
            .collect();
        if vms.is_empty() || vms.iter().any(String::is_empty) {
            return Err(bad("empty VM name"));
        }
        Grants::new(&roles, &vms).map_err(|e| bad(&e))
    }

    /// Reads the grants of a DER certificate: `Ok(None)` if it states none.
    pub fn from_cert(der: &[u8]) -> Result<Option<Grants>, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate does not parse: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("subject alternative names: {e}"))?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                if u.starts_with(URI_PREFIX) {
                    if found.is_some() {
                        return Err("more than one vmatrix role statement".into());
                    }
                    found = Some(Grants::from_uri(u)?);
                }
            }
        }
        Ok(found)
    }

    /// Whether `role` is granted, for `vm` if the role is VM-bound (`None`: for some VM).
    pub fn allows(&self, role: HostRole, vm: Option<&str>) -> bool {
        if !self.roles.contains(&role) {
            return false;
        }
        match (&self.vms, vm) {
            _ if !role.vm_bound() => true,
            (VmScope::Any, _) | (_, None) => true,
            (VmScope::Only(set), Some(v)) => set.contains(v),
        }
    }
}

impl fmt::Display for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        write!(f, "roles {}", roles.join("+"))?;
        match &self.vms {
            VmScope::Any => write!(f, " for any VM"),
            VmScope::Only(v) => {
                let v: Vec<&str> = v.iter().map(String::as_str).collect();
                write!(f, " for VM {}", v.join(", "))
            }
        }
    }
}

/// A peer's certificate as far as roles go: its host name and what it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The first DNS name (the host name), or "?" if there is none.
    pub host: String,
    /// The grants; `None` if the certificate states none.
    pub grants: Option<Grants>,
}

impl PeerCert {
    /// Reads a DER end-entity certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerCert, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate does not parse: {e}"))?;
        let host = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|s| {
                s.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
            })
            .unwrap_or_else(|| "?".into());
        Ok(PeerCert {
            host,
            grants: Grants::from_cert(der)?,
        })
    }

    /// Checks that the certificate may act as `role` (for `vm`); the error says why not.
    pub fn check(&self, role: HostRole, vm: Option<&str>) -> Result<(), String> {
        let what = match vm {
            Some(v) if role.vm_bound() => format!("{role} for VM '{v}'"),
            _ => role.to_string(),
        };
        match &self.grants {
            None => Err(format!(
                "the certificate of '{}' may not act as {what}: it states no vmatrix roles \
                 (issued before roles existed? reissue it with `vmatrix certs issue --role`)",
                self.host
            )),
            Some(g) if !g.allows(role, vm) => Err(format!(
                "the certificate of '{}' may not act as {what}: it grants {g}",
                self.host
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The end-entity certificate a peer presented on `conn` (verified by TLS during the
/// handshake), read for its roles.
pub fn peer_cert(conn: &quinn::Connection) -> Result<PeerCert, TransportError> {
    let peer = conn.remote_address().to_string();
    let no = |reason: String| TransportError::NotPermitted {
        peer: peer.clone(),
        reason,
    };
    let id = conn
        .peer_identity()
        .ok_or_else(|| no("the peer presented no certificate".into()))?;
    let chain = id
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| no("the peer's identity is not an X.509 chain".into()))?;
    let ee = chain
        .first()
        .ok_or_else(|| no("the peer presented no certificate".into()))?;
    PeerCert::from_der(ee).map_err(no)
}

/// True if the peers of `a` and `b` presented the same end-entity certificate.
pub fn same_peer(a: &quinn::Connection, b: &quinn::Connection) -> bool {
    let leaf = |c: &quinn::Connection| {
        c.peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|ee| ee.as_ref().to_vec()))
    };
    matches!((leaf(a), leaf(b)), (Some(x), Some(y)) if x == y)
}

/// Checks that the peer of `conn` may act as `role` (for `vm`).
pub fn check_peer(
    conn: &quinn::Connection,
    role: HostRole,
    vm: Option<&str>,
) -> Result<PeerCert, TransportError> {
    let pc = peer_cert(conn)?;
    pc.check(role, vm)
        .map_err(|reason| TransportError::NotPermitted {
            peer: conn.remote_address().to_string(),
            reason,
        })?;
    Ok(pc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_checks() {
        let g = Grants::new(&[HostRole::Backup, HostRole::Primary], &[]).unwrap();
        assert_eq!(g.to_uri(), "vmatrix:role=primary,backup;vm=*");
        assert_eq!(Grants::from_uri(&g.to_uri()).unwrap(), g);
        let g = Grants::new(&[HostRole::Backup], &["vm1".into(), "vm-2".into()]).unwrap();
        assert_eq!(g.to_uri(), "vmatrix:role=backup;vm=vm-2,vm1");
        assert_eq!(Grants::from_uri(&g.to_uri()).unwrap(), g);
        assert!(g.allows(HostRole::Backup, Some("vm1")));
        assert!(!g.allows(HostRole::Backup, Some("vm3")));
        assert!(!g.allows(HostRole::Primary, Some("vm1")));
        let m = Grants::new(&[HostRole::Manager], &["vm1".into()]).unwrap();
        assert!(m.allows(HostRole::Manager, Some("other")));
        for bad in [
            "vmatrix:",
            "vmatrix:role=;vm=*",
            "vmatrix:role=king;vm=*",
            "vmatrix:role=primary",
            "vmatrix:role=primary;vm=",
            "vmatrix:role=primary;vm=a,,b",
            "vmatrix:role=primary;vm=*,a",
            "vmatrix:role=primary;vm=a b",
            "vmatrix:role=primary;vm=*;vm=*",
            "vmatrix:role=primary;vm=*;x=1",
            "other:role=primary;vm=*",
        ] {
            assert!(Grants::from_uri(bad).is_err(), "{bad}");
        }
        assert!(Grants::new(&[], &[]).is_err());
        assert!(Grants::new(&[HostRole::Primary], &["x".repeat(65)]).is_err());
    }

    #[test]
    fn refusal_says_why() {
        let pc = PeerCert {
            host: "h1".into(),
            grants: Some(Grants::new(&[HostRole::Backup], &[]).unwrap()),
        };
        let e = pc.check(HostRole::Primary, Some("vm")).unwrap_err();
        assert!(
            e.contains("'h1' may not act as primary for VM 'vm'")
                && e.contains("roles backup for any VM"),
            "{e}"
        );
        assert!(pc.check(HostRole::Backup, Some("vm")).is_ok());
        let legacy = PeerCert {
            host: "h1".into(),
            grants: None,
        };
        assert!(legacy
            .check(HostRole::Backup, None)
            .unwrap_err()
            .contains("states no vmatrix roles"));
    }
}
