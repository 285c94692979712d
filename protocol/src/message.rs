//! The messages of a replication session and their typed (postcard) encoding inside frames.
//!
//! | type | message | direction | purpose |
//! |---|---|---|---|
//! | 1 | `Hello` | primary → backup | versions, cluster, VM, term, role, stream count |
//! | 2 | `Welcome` | backup → primary | chosen version, last committed checkpoint, data ports (v4) |
//! | 3 | `Begin` | primary → backup | checkpoint N: kind, attempt, number of parts |
//! | 4 | `Pages` | primary → backup | a batch of pages: runs of guest frame numbers + encoded data |
//! | 5 | `Disk` | primary → backup | a disk write of the epoch (offset, data) |
//! | 6 | `State` | primary → backup | vCPU/device state, opaque versioned bytes |
//! | 7 | `End` | primary → backup | CRC32 over all parts of the checkpoint |
//! | 8 | `Ack` | backup → primary | checkpoint N is applied |
//! | 9 | `Heartbeat` | both | liveness |
//! | 10 | `Refuse` | both | a typed error/refusal |
//! | 11 | `Goodbye` | both | orderly close |

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::frame;
use crate::page::PageData;

/// Highest protocol version this build speaks. Version 2 added [`Kind::PreCopy`]; version 3 the
/// checkpoint identity: `Hello.history`, `Welcome.committed` and [`Kind::Resync`]; version 4
/// the backup's data connections (`Welcome.data_ports`).
pub const PROTOCOL_VERSION: u16 = 4;
/// First protocol version with pre-copy rounds ([`Kind::PreCopy`]).
pub const PRECOPY_VERSION: u16 = 2;
/// First protocol version with the checkpoint identity and quick resync ([`Kind::Resync`]).
pub const RESYNC_VERSION: u16 = 3;
/// First protocol version with data connections (`Welcome.data_ports`).
pub const DATA_CONN_VERSION: u16 = 4;
/// Lowest protocol version this build accepts (the current and the previous).
pub const MIN_PROTOCOL_VERSION: u16 = 3;
/// Most data ports a `Welcome` may offer.
pub const MAX_DATA_PORTS: usize = 8;
const _: () = assert!(PROTOCOL_VERSION - MIN_PROTOCOL_VERSION <= 1);
/// Longest VM id.
pub const MAX_VM_ID: usize = 64;
/// Longest free-text field (refusal detail, goodbye reason).
pub const MAX_TEXT: usize = 1024;
/// Largest disk chunk or state chunk.
pub const MAX_CHUNK: usize = 1 << 20;
/// Most pages in one batch.
pub const MAX_BATCH_PAGES: usize = 256;
/// Most parts in one checkpoint (a 3 GiB full sync is ~3,100 batches).
pub const MAX_PARTS: u32 = 1 << 20;

/// Which side a peer plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Sends checkpoints.
    Primary,
    /// Receives them.
    Backup,
}

/// Opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest version the sender speaks.
    pub min_version: u16,
    /// Highest version the sender speaks.
    pub max_version: u16,
    /// Cluster identity.
    pub cluster_id: u64,
    /// Which VM this stream protects.
    pub vm_id: String,
    /// The sender's term (fencing epoch of the failover manager).
    pub term: u64,
    /// The sender's role.
    pub role: Role,
    /// Data streams the sender will use.
    pub streams: u8,
    /// The primary's history id (v3): with `term` and a checkpoint's seq it names one state of
    /// the VM. Random per primary instance, so two primaries that wrongly share a term never
    /// mistake each other's checkpoints for their own. 0 from a version-2 primary.
    pub history: u64,
}

/// Where a replica stands: the checkpoint `(term, seq)` of history `history` it has committed.
/// Two replicas of a VM compare by it (same history and term: the higher seq is newer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// History id of the primary that produced it.
    pub history: u64,
    /// Term of that primary.
    pub term: u64,
    /// Checkpoint sequence number within the term.
    pub seq: u64,
}

/// Accepts a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both will speak.
    pub version: u16,
    /// The term accepted.
    pub term: u64,
    /// The last checkpoint the receiver has applied, if any (its seq; kept for version 2).
    pub last_committed: Option<u64>,
    /// The receiver's committed image (v3): the primary sends a quick resync from it if it
    /// still knows every change since, else a full sync into a side image.
    pub committed: Option<Position>,
    /// Ports on the backup's address where this session's data connections are accepted (v4):
    /// the primary may spread its data streams over connections to them, each to a socket (and
    /// a receive path) of its own. Empty: the session's one connection carries everything.
    pub data_ports: Vec<u16>,
}

/// Kind of checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Initial sync: all of memory, all of the disk, full state.
    Sync,
    /// One epoch's changes.
    Incremental,
    /// A pre-copy round of the initial sync (protocol version 2): pages and disk chunks copied
    /// while the guest kept running, without state. Checkpoint 0 of this kind starts a new
    /// image; the image becomes consistent with the first later checkpoint that carries state
    /// (an `Incremental` one, taken in the final short pause). Never sent to a version-1 peer.
    PreCopy,
    /// Quick resync (protocol version 3): the pages and disk chunks changed since checkpoint
    /// `from` (the receiver's committed position, same history and term), with the state. It
    /// brings the committed image from `from` to this checkpoint in one step.
    Resync {
        /// The seq of the receiver's committed image this was computed against.
        from: u64,
    },
}

impl Kind {
    /// True for the kinds that may open a session's stream of checkpoints at any seq: a full
    /// sync, a pre-copy round, a quick resync.
    pub fn starts_stream(self) -> bool {
        !matches!(self, Kind::Incremental)
    }
}

/// Starts checkpoint `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    /// Term.
    pub term: u64,
    /// Checkpoint number.
    pub epoch: u64,
    /// Retransmission attempt (0 first).
    pub attempt: u32,
    /// Sync or incremental.
    pub kind: Kind,
    /// Number of `Pages`, `Disk` and `State` parts that follow (seq 0..parts).
    pub parts: u32,
    /// Guest RAM size (pages beyond it are refused).
    pub mem_size: u64,
}

/// Identifies a part of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartId {
    /// Term.
    pub term: u64,
    /// Checkpoint number.
    pub epoch: u64,
    /// Attempt.
    pub attempt: u32,
    /// Index of the part within the checkpoint.
    pub seq: u32,
}

/// A batch of pages: `runs` of consecutive guest frame numbers, `pages` in run order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pages {
    /// Which part.
    pub id: PartId,
    /// (first gfn, count) runs.
    pub runs: Vec<(u64, u32)>,
    /// One encoded page per gfn of the runs.
    pub pages: Vec<PageData>,
}

/// A disk write of the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Which part.
    pub id: PartId,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The data.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// vCPU and device state, opaque to the protocol but versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Which part.
    pub id: PartId,
    /// Version of the state encoding (the snapshot format version).
    pub format: u32,
    /// The bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Ends checkpoint `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Term.
    pub term: u64,
    /// Checkpoint number.
    pub epoch: u64,
    /// Attempt.
    pub attempt: u32,
    /// CRC32 over the payloads of all parts, in seq order.
    pub crc: u32,
}

/// Checkpoint `epoch` (and every earlier one) is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Term.
    pub term: u64,
    /// Checkpoint number.
    pub epoch: u64,
}

/// Liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Term.
    pub term: u64,
    /// Counter.
    pub seq: u64,
}

/// Why something was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// A frame or message could not be decoded.
    BadFrame,
    /// No common version.
    Version,
    /// Wrong cluster or VM.
    WrongPeer,
    /// Stale term: the sender is fenced.
    StaleTerm,
    /// A checkpoint failed its CRC; resend it.
    CheckpointCrc,
    /// A checkpoint or part out of sequence; resend from `epoch`.
    Sequence,
    /// Too much data staged.
    StagingFull,
    /// The message was not expected now.
    Unexpected,
    /// The receiver failed to apply the checkpoint.
    ApplyFailed,
}

/// A typed refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    /// What kind.
    pub code: RefuseCode,
    /// The checkpoint concerned, if any.
    pub epoch: Option<u64>,
    /// Human-readable detail.
    pub detail: String,
}

/// Orderly close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why.
    pub reason: String,
}

/// `Hello` as version 2 encodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HelloV2 {
    min_version: u16,
    max_version: u16,
    cluster_id: u64,
    vm_id: String,
    term: u64,
    role: Role,
    streams: u8,
}

impl HelloV2 {
    fn upgrade(self) -> Hello {
        Hello {
            min_version: self.min_version,
            max_version: self.max_version,
            cluster_id: self.cluster_id,
            vm_id: self.vm_id,
            term: self.term,
            role: self.role,
            streams: self.streams,
            history: 0,
        }
    }
}

/// `Welcome` as version 2 encodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WelcomeV2 {
    version: u16,
    term: u64,
    last_committed: Option<u64>,
}

impl WelcomeV2 {
    fn upgrade(self) -> Welcome {
        Welcome {
            version: self.version,
            term: self.term,
            last_committed: self.last_committed,
            committed: None,
            data_ports: Vec::new(),
        }
    }
}

/// `Welcome` as version 3 encodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WelcomeV3 {
    version: u16,
    term: u64,
    last_committed: Option<u64>,
    committed: Option<Position>,
}

impl WelcomeV3 {
    fn upgrade(self) -> Welcome {
        Welcome {
            version: self.version,
            term: self.term,
            last_committed: self.last_committed,
            committed: self.committed,
            data_ports: Vec::new(),
        }
    }
}

/// Decodes a `Welcome` in whichever layout it came, checking that its version is one of
/// that layout's.
fn welcome_of(p: &[u8]) -> Result<Welcome, ProtocolError> {
    fn whole<'a, T: Deserialize<'a>>(p: &'a [u8]) -> Result<T, String> {
        match postcard::take_from_bytes::<T>(p) {
            Ok((v, [])) => Ok(v),
            Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
            Err(e) => Err(e.to_string()),
        }
    }
    let (w, versions) = match whole::<Welcome>(p) {
        Ok(w) => (w, DATA_CONN_VERSION..=u16::MAX),
        Err(why) => match (whole::<WelcomeV3>(p), whole::<WelcomeV2>(p)) {
            (Ok(w), _) => (w.upgrade(), RESYNC_VERSION..=DATA_CONN_VERSION - 1),
            (_, Ok(w)) => (w.upgrade(), 0..=RESYNC_VERSION - 1),
            _ => {
                return Err(ProtocolError::Malformed {
                    kind: "Welcome",
                    why,
                })
            }
        },
    };
    if !versions.contains(&w.version) {
        return Err(ProtocolError::Malformed {
            kind: "Welcome",
            why: format!("version {} in another version's layout", w.version),
        });
    }
    Ok(w)
}

/// Any message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Begin`].
    Begin(Begin),
    /// See [`Pages`].
    Pages(Pages),
    /// See [`Disk`].
    Disk(Disk),
    /// See [`State`].
    State(State),
    /// See [`End`].
    End(End),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
}

/// Type byte of [`End`] frames.
const END_TYPE: u8 = 7;

impl Message {
    /// Whether `frame`, a whole encoded frame, carries an `End` (by its type byte, unchecked:
    /// for a sender cutting its frames at checkpoint boundaries, not for a receiver).
    pub fn is_end_frame(frame: &[u8]) -> bool {
        frame.get(5) == Some(&END_TYPE)
    }

    /// Type byte and name.
    pub fn kind(&self) -> (u8, &'static str) {
        match self {
            Message::Hello(_) => (1, "Hello"),
            Message::Welcome(_) => (2, "Welcome"),
            Message::Begin(_) => (3, "Begin"),
            Message::Pages(_) => (4, "Pages"),
            Message::Disk(_) => (5, "Disk"),
            Message::State(_) => (6, "State"),
            Message::End(_) => (END_TYPE, "End"),
            Message::Ack(_) => (8, "Ack"),
            Message::Heartbeat(_) => (9, "Heartbeat"),
            Message::Refuse(_) => (10, "Refuse"),
            Message::Goodbye(_) => (11, "Goodbye"),
        }
    }

    /// The payload bytes (postcard).
    pub fn payload(&self) -> Vec<u8> {
        let r = match self {
            Message::Hello(m) => postcard::to_stdvec(m),
            // A version-2 primary gets the version-2 layout (no `committed`).
            Message::Welcome(m) if m.version < RESYNC_VERSION => postcard::to_stdvec(&WelcomeV2 {
                version: m.version,
                term: m.term,
                last_committed: m.last_committed,
            }),
            // A version-3 primary gets the version-3 layout (no `data_ports`).
            Message::Welcome(m) if m.version < DATA_CONN_VERSION => {
                postcard::to_stdvec(&WelcomeV3 {
                    version: m.version,
                    term: m.term,
                    last_committed: m.last_committed,
                    committed: m.committed,
                })
            }
            Message::Welcome(m) => postcard::to_stdvec(m),
            Message::Begin(m) => postcard::to_stdvec(m),
            Message::Pages(m) => postcard::to_stdvec(m),
            Message::Disk(m) => postcard::to_stdvec(m),
            Message::State(m) => postcard::to_stdvec(m),
            Message::End(m) => postcard::to_stdvec(m),
            Message::Ack(m) => postcard::to_stdvec(m),
            Message::Heartbeat(m) => postcard::to_stdvec(m),
            Message::Refuse(m) => postcard::to_stdvec(m),
            Message::Goodbye(m) => postcard::to_stdvec(m),
        };
        // Serializing plain structs into a Vec cannot fail.
        r.unwrap_or_default()
    }

    /// The complete frame.
    pub fn encode(&self) -> Vec<u8> {
        frame::encode(self.kind().0, &self.payload())
    }

    /// Decodes a complete frame, checking every field limit.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let (t, payload) = frame::decode(bytes)?;
        Self::from_payload(t, payload)
    }

    /// Decodes a payload of type `t`.
    pub fn from_payload(t: u8, p: &[u8]) -> Result<Message, ProtocolError> {
        fn de<'a, T: Deserialize<'a>>(kind: &'static str, p: &'a [u8]) -> Result<T, ProtocolError> {
            match postcard::take_from_bytes::<T>(p) {
                Ok((v, [])) => Ok(v),
                Ok((_, rest)) => Err(ProtocolError::Malformed {
                    kind,
                    why: format!("{} trailing bytes", rest.len()),
                }),
                Err(e) => Err(ProtocolError::Malformed {
                    kind,
                    why: e.to_string(),
                }),
            }
        }
        let m = match t {
            // Version 3 appended fields to Hello and Welcome, version 4 to Welcome: the previous
            // layouts still decode (a newer payload never decodes as an older one: trailing
            // bytes; an older one never as a newer one: too short), each only with a version
            // it belongs to (a Welcome re-encodes in the layout of its version).
            1 => Message::Hello(de("Hello", p).or_else(|e| {
                de::<HelloV2>("Hello", p)
                    .map(HelloV2::upgrade)
                    .map_err(|_| e)
            })?),
            2 => Message::Welcome(welcome_of(p)?),
            3 => Message::Begin(de("Begin", p)?),
            4 => Message::Pages(de("Pages", p)?),
            5 => Message::Disk(de("Disk", p)?),
            6 => Message::State(de("State", p)?),
            END_TYPE => Message::End(de("End", p)?),
            8 => Message::Ack(de("Ack", p)?),
            9 => Message::Heartbeat(de("Heartbeat", p)?),
            10 => Message::Refuse(de("Refuse", p)?),
            11 => Message::Goodbye(de("Goodbye", p)?),
            other => return Err(ProtocolError::UnknownType(other)),
        };
        m.check_limits()?;
        Ok(m)
    }

    fn check_limits(&self) -> Result<(), ProtocolError> {
        let bad = |kind, why: String| Err(ProtocolError::Malformed { kind, why });
        match self {
            Message::Hello(h) if h.vm_id.len() > MAX_VM_ID => bad("Hello", "vm id too long".into()),
            Message::Hello(h) if h.min_version > h.max_version => {
                bad("Hello", "min_version > max_version".into())
            }
            Message::Welcome(w) if w.data_ports.len() > MAX_DATA_PORTS => {
                bad("Welcome", format!("{} data ports", w.data_ports.len()))
            }
            Message::Welcome(w) if w.data_ports.contains(&0) => {
                bad("Welcome", "data port 0".into())
            }
            Message::Begin(b) if b.parts > MAX_PARTS => bad("Begin", format!("{} parts", b.parts)),
            Message::Pages(p) => {
                let n: u64 = p.runs.iter().map(|r| u64::from(r.1)).sum();
                if p.pages.len() > MAX_BATCH_PAGES || n != p.pages.len() as u64 {
                    return bad(
                        "Pages",
                        format!("{} runs pages vs {} pages", n, p.pages.len()),
                    );
                }
                if p.runs
                    .iter()
                    .any(|r| r.1 == 0 || r.0.checked_add(u64::from(r.1)).is_none())
                {
                    return bad("Pages", "empty or overflowing run".into());
                }
                Ok(())
            }
            Message::Disk(d)
                if d.data.len() > MAX_CHUNK
                    || d.offset.checked_add(d.data.len() as u64).is_none() =>
            {
                bad("Disk", "chunk too large".into())
            }
            Message::State(s) if s.data.len() > MAX_CHUNK => bad("State", "chunk too large".into()),
            Message::Refuse(r) if r.detail.len() > MAX_TEXT => {
                bad("Refuse", "detail too long".into())
            }
            Message::Goodbye(g) if g.reason.len() > MAX_TEXT => {
                bad("Goodbye", "reason too long".into())
            }
            _ => Ok(()),
        }
    }
}
