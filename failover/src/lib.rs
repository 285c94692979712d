//! # failover — the control plane's decisions
//!
//! The manager and the host agents decide; this crate holds those decisions as sans-IO state
//! machines (inputs in, outputs out, time passed in), so seeded simulations can drive them in
//! virtual time through crashes, partitions, lost messages and manager restarts:
//!
//! - [`manager::Manager`]: desired and observed state, placement, two-signal failure
//!   detection, terms and fencing, promotion, re-protection, migration, clones.
//! - [`clones`]: a VM's clones (desired count, placement, what agents run and report).
//! - [`scaler`]: the autoscaler: from load samples and time, the clone count to ask for.
//! - [`agent`]: what an agent must do to make its host's VM processes match the manager's
//!   [`model::Assignments`].
//! - [`wire`]: the agent protocol's messages and their checked framing.
//! - [`store`]: the crash-safe store of the manager's state.
//!
//! No tokio, no sockets, no clocks here: the `vmatrix manager` and `vmatrix agent` commands do
//! the I/O.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod clones;
pub mod event;
pub mod limits;
pub mod manager;
pub mod model;
pub mod scaler;
pub mod store;
pub mod wire;

/// Errors of the control plane's codecs and store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    /// A frame's payload is larger than the protocol allows.
    #[error("frame of {0} bytes exceeds the limit of {max}", max = wire::MAX_FRAME)]
    FrameTooLarge(usize),
    /// Fewer bytes than announced.
    #[error("truncated: {got} of {want} bytes")]
    Truncated {
        /// Announced.
        want: usize,
        /// Present.
        got: usize,
    },
    /// The CRC32 does not match.
    #[error("CRC32 mismatch: header says {want:#010x}, data gives {got:#010x}")]
    Crc {
        /// From the header.
        want: u32,
        /// Computed.
        got: u32,
    },
    /// The payload does not decode.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A message could not be encoded.
    #[error("encoding: {0}")]
    Encode(String),
    /// The store could not be read or written.
    #[error("store: {0}")]
    Store(String),
    /// The stored state is not one this build can trust.
    #[error("stored state refused: {0}")]
    BadState(String),
}
