//! Typed errors of the protocol. Every byte from the network is untrusted: each way a frame or
//! a session can be wrong has its own variant, and none of them panics.

/// Why a frame or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Fewer bytes than the header or the declared length.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Not a vmatrix replication frame.
    #[error("bad frame magic")]
    BadMagic,
    /// A frame encoding version this build does not speak.
    #[error("frame version {0} is not supported")]
    FrameVersion(u8),
    /// Reserved header bits set.
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u16),
    /// Declared length beyond the limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Frame checksum mismatch.
    #[error("frame CRC32 mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    FrameCrc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The payload does not decode as its message type, or violates a field limit.
    #[error("malformed {kind} message: {why}")]
    Malformed {
        /// Message type name.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
    /// No protocol version in common.
    #[error(
        "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {min}..={max}"
    )]
    Version {
        /// Peer's lowest version.
        peer_min: u16,
        /// Peer's highest version.
        peer_max: u16,
        /// Our lowest version.
        min: u16,
        /// Our highest version.
        max: u16,
    },
    /// The peer belongs to another cluster or VM.
    #[error("peer is for {what}, expected {expected}")]
    WrongPeer {
        /// Which identity is wrong.
        what: String,
        /// What was expected.
        expected: String,
    },
    /// A message from an older term.
    #[error("stale term {got}, current term is {current}")]
    StaleTerm {
        /// Term in the message.
        got: u64,
        /// Our term.
        current: u64,
    },
    /// A message that makes no sense in the current state.
    #[error("unexpected {kind} message in state {state}")]
    Unexpected {
        /// Message type name.
        kind: &'static str,
        /// State name.
        state: &'static str,
    },
    /// A checkpoint far ahead of the next expected one.
    #[error("checkpoint {got} skips ahead: expected {expected} (window {window})")]
    Gap {
        /// Epoch received.
        got: u64,
        /// Next epoch expected.
        expected: u64,
        /// Epochs that may be in flight at once.
        window: u64,
    },
    /// A checkpoint already delivered, or a part already received.
    #[error("duplicate {what}")]
    Duplicate {
        /// What was duplicated.
        what: String,
    },
    /// A part that does not fit its checkpoint (seq beyond the announced count, attempt older
    /// than the staged one, counts that disagree).
    #[error("out-of-order or inconsistent part of checkpoint {epoch}: {why}")]
    Reordered {
        /// The checkpoint.
        epoch: u64,
        /// What is wrong.
        why: String,
    },
    /// A whole checkpoint failed its end-to-end CRC.
    #[error(
        "checkpoint {epoch} CRC32 mismatch: end says {stored:#010x}, parts give {computed:#010x}"
    )]
    CheckpointCrc {
        /// The checkpoint.
        epoch: u64,
        /// CRC in the end message.
        stored: u32,
        /// CRC of the received parts.
        computed: u32,
    },
    /// Staged data beyond the receiver's memory limit.
    #[error("checkpoint data over the staging limit of {max} bytes")]
    StagingFull {
        /// The limit.
        max: u64,
    },
    /// A page encoding that cannot be decoded.
    #[error("page {gfn}: {why}")]
    Page {
        /// Guest frame number.
        gfn: u64,
        /// What is wrong.
        why: String,
    },
    /// The peer refused something we sent.
    #[error("peer refused: {code:?}: {detail}")]
    Refused {
        /// Its code.
        code: crate::message::RefuseCode,
        /// Its explanation.
        detail: String,
    },
    /// Nothing heard from the peer for too long.
    #[error("peer silent for {ms} ms")]
    PeerTimeout {
        /// Milliseconds of silence.
        ms: u64,
    },
    /// The session is closed.
    #[error("session closed: {0}")]
    Closed(String),
}
