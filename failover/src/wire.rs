//! The agent protocol: messages between a host's agent and the manager, and their framing.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload (postcard)`, at most
//! [`MAX_FRAME`] bytes of payload. The agent speaks first with [`AgentMsg::Hello`] carrying
//! [`VERSION`]; the manager answers [`ManagerMsg::Welcome`] or closes. Every byte is untrusted:
//! lengths are checked before allocation, the CRC before decoding, and decoding errors are typed.

use serde::{Deserialize, Serialize};

use crate::model::{Assignments, Report};
use crate::FailoverError;

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Largest payload accepted (a report of many VMs fits easily).
pub const MAX_FRAME: usize = 1 << 20;
/// Header bytes before the payload.
pub const HEADER: usize = 8;

/// Agent → manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message.
    Hello {
        /// Protocol version.
        version: u16,
        /// Host name (must match the certificate).
        host: String,
        /// The host's replication address (backups listen there).
        repl_ip: String,
        /// Memory offered to VMs, MiB.
        capacity_mib: u64,
    },
    /// A heartbeat with the state of every VM process (every ~10 ms).
    Report(Report),
}

/// Manager → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerMsg {
    /// Accepts the agent.
    Welcome {
        /// Protocol version.
        version: u16,
    },
    /// What the host must run (the whole of it; sent on change and now and then).
    Assign(Assignments),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FailoverError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| FailoverError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(FailoverError::FrameTooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads the payload length from a frame header, checking the bound.
pub fn payload_len(header: &[u8; HEADER]) -> Result<usize, FailoverError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FailoverError::FrameTooLarge(len));
    }
    Ok(len)
}

/// Decodes a payload after its header.
pub fn decode<T: for<'de> Deserialize<'de>>(
    header: &[u8; HEADER],
    payload: &[u8],
) -> Result<T, FailoverError> {
    let len = payload_len(header)?;
    if payload.len() != len {
        return Err(FailoverError::Truncated {
            want: len,
            got: payload.len(),
        });
    }
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let got = crc32fast::hash(payload);
    if crc != got {
        return Err(FailoverError::Crc { want: crc, got });
    }
    postcard::from_bytes(payload).map_err(|e| FailoverError::Decode(e.to_string()))
}

/// Decodes one whole frame (header and payload), refusing trailing bytes.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, FailoverError> {
    if frame.len() < HEADER {
        return Err(FailoverError::Truncated {
            want: HEADER,
            got: frame.len(),
        });
    }
    let header: [u8; HEADER] = frame[..HEADER].try_into().expect("8 bytes");
    decode(&header, &frame[HEADER..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmObservation;

    fn report() -> AgentMsg {
        AgentMsg::Report(Report {
            vms: vec![VmObservation {
                vm: "web".into(),
                role: crate::model::ProcRole::Backup,
                alive: true,
                exit: None,
                term: 3,
                image_term: 3,
                seq: Some(41),
                protected: false,
                backup_hosts: vec![],
                output_held: false,
                silent_ms: Some(7),
                handed_over: false,
                never_ran: false,
            }],
            ..Default::default()
        })
    }

    #[test]
    fn round_trip() {
        let f = encode(&report()).unwrap();
        assert_eq!(decode_frame::<AgentMsg>(&f).unwrap(), report());
    }

    #[test]
    fn every_corruption_is_a_typed_error() {
        let f = encode(&report()).unwrap();
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                // A flipped bit is caught by the length check, the CRC or the decoder: never a
                // panic, never the same message.
                if let Ok(m) = decode_frame::<AgentMsg>(&g) {
                    panic!("corrupted frame (byte {i} bit {bit}) decoded to {m:?}");
                }
            }
        }
        for n in 0..f.len() {
            assert!(decode_frame::<AgentMsg>(&f[..n]).is_err());
        }
    }

    /// The messages as an agent and a manager built before clones (issue 11) knew them.
    mod before_clones {
        use serde::{Deserialize, Serialize};
        use std::collections::BTreeMap;

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Assignments {
            pub vms: BTreeMap<String, crate::model::Assignment>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub enum ManagerMsg {
            Welcome { version: u16 },
            Assign(Assignments),
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Report {
            pub vms: Vec<crate::model::VmObservation>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub enum AgentMsg {
            Hello {
                version: u16,
                host: String,
                repl_ip: String,
                capacity_mib: u64,
            },
            Report(Report),
        }
    }

    /// Messages as agents built before copied bases knew them.
    mod before_fetch {
        use serde::{Deserialize, Serialize};
        use std::collections::BTreeMap;

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Assignments {
            pub vms: BTreeMap<String, crate::model::Assignment>,
            pub clones: Vec<crate::clones::CloneAssignment>,
            pub bases: Vec<String>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub enum ManagerMsg {
            Welcome { version: u16 },
            Assign(Assignments),
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Report {
            pub vms: Vec<crate::model::VmObservation>,
            pub clones: Vec<crate::clones::CloneObservation>,
            pub bases: Vec<crate::clones::BaseObservation>,
        }
    }

    #[test]
    fn a_base_port_reads_as_none_from_an_agent_built_before_it() {
        let AgentMsg::Report(mut r) = report() else {
            unreachable!()
        };
        r.base_port = 7400;
        let f = encode(&r).unwrap();
        let old: before_fetch::Report = decode_frame(&f).unwrap();
        assert_eq!(old.vms, r.vms);
        let f = encode(&old).unwrap();
        let new: Report = decode_frame(&f).unwrap();
        assert_eq!(new.base_port, 0);
        assert_eq!(new.vms, r.vms);
    }

    #[test]
    fn peers_built_before_clones_still_understand_each_other() {
        use crate::clones::{BaseObservation, CloneAssignment, CloneObservation};
        let AgentMsg::Report(mut r) = report() else {
            unreachable!()
        };
        r.clones.push(CloneObservation {
            name: "web-c0".into(),
            vm: "web".into(),
            alive: true,
            running: true,
            exit: None,
            base_term: 3,
        });
        r.bases.push(BaseObservation {
            vm: "web".into(),
            term: 3,
            age_ms: 9,
        });
        // A new agent's report to an old manager: the clone fields are skipped.
        let f = encode(&AgentMsg::Report(r.clone())).unwrap();
        let old: before_clones::AgentMsg = decode_frame(&f).unwrap();
        assert_eq!(
            old,
            before_clones::AgentMsg::Report(before_clones::Report { vms: r.vms.clone() })
        );
        // An old agent's report to a new manager: no clones.
        let f = encode(&old).unwrap();
        let new: AgentMsg = decode_frame(&f).unwrap();
        assert_eq!(
            new,
            AgentMsg::Report(Report {
                vms: r.vms,
                ..Default::default()
            })
        );
        // Assignments both ways.
        let a = Assignments {
            vms: Default::default(),
            clones: vec![CloneAssignment {
                name: "web-c0".into(),
                vm: "web".into(),
                index: 0,
                guest_config: "ip=10.0.0.9/24".into(),
                mem_mib: 64,
            }],
            bases: vec!["web".into()],
            fetch: vec![crate::clones::BaseFetch {
                vm: "web".into(),
                sources: vec![crate::clones::BaseSource {
                    host: "b".into(),
                    addr: "10.0.0.2:7400".into(),
                    term: 3,
                }],
            }],
            limits: Default::default(),
        };
        // An agent built before copied bases: the fetch list is skipped.
        let f = encode(&ManagerMsg::Assign(a.clone())).unwrap();
        let mid: before_fetch::ManagerMsg = decode_frame(&f).unwrap();
        assert!(matches!(mid, before_fetch::ManagerMsg::Assign(ref x) if x.bases == a.bases));
        let f = encode(&ManagerMsg::Assign(a)).unwrap();
        let old: before_clones::ManagerMsg = decode_frame(&f).unwrap();
        assert!(matches!(old, before_clones::ManagerMsg::Assign(ref x) if x.vms.is_empty()));
        let f = encode(&old).unwrap();
        let new: ManagerMsg = decode_frame(&f).unwrap();
        assert_eq!(new, ManagerMsg::Assign(Assignments::default()));
    }

    /// An agent built before resource limits skips them (and runs its VMs unlimited); a
    /// manager built before them skips the agents' usage; and the other way round both read
    /// as none.
    #[test]
    fn peers_built_before_limits_still_understand_each_other() {
        let mut a = Assignments::default();
        a.bases.push("web".into());
        a.limits.insert(
            "web".into(),
            crate::limits::Limits {
                cpu_millis: 500,
                ..Default::default()
            },
        );
        let f = encode(&ManagerMsg::Assign(a.clone())).unwrap();
        let old: before_fetch::ManagerMsg = decode_frame(&f).unwrap();
        assert!(matches!(old, before_fetch::ManagerMsg::Assign(ref x) if x.bases == a.bases));
        let f = encode(&old).unwrap();
        let ManagerMsg::Assign(new) = decode_frame(&f).unwrap() else {
            unreachable!()
        };
        assert!(new.limits.is_empty());
        assert_eq!(new.bases, a.bases);

        let AgentMsg::Report(mut r) = report() else {
            unreachable!()
        };
        r.base_port = 7400;
        r.usage.push(crate::limits::ProcUsage {
            vm: "web".into(),
            of: crate::limits::UsageOf::Vm(crate::model::ProcRole::Primary),
            cpu_millis: 480,
            throttled_us: 12,
            mem_bytes: 1 << 20,
            mem_limit_bytes: 2 << 20,
            oom_kills: 0,
            error: String::new(),
        });
        let f = encode(&r).unwrap();
        let back: Report = decode_frame(&f).unwrap();
        assert_eq!(back, r);
        let old: before_fetch::Report = decode_frame(&f).unwrap();
        assert_eq!(old.vms, r.vms);
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocation() {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            payload_len(&h),
            Err(FailoverError::FrameTooLarge(_))
        ));
    }
}
