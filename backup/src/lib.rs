//! # backup — the receiving side of continuous replication
//!
//! Accepts a primary's session over QUIC with mutual TLS ([`serve`]), runs the protocol's
//! [`Receiver`](protocol::Receiver), applies each complete, verified checkpoint to the replica
//! image ([`image`]) and acknowledges it. An incomplete or corrupt checkpoint never reaches the
//! image (the receiver refuses it and the primary resends). On stop, the image is finalized as a
//! snapshot of the last applied checkpoint, which `vmatrix restore` starts.

#![forbid(unsafe_code)]

pub mod image;
pub mod journal;
mod server;
pub mod stats;

use std::path::PathBuf;

pub use server::{serve, BackupConfig};
pub use stats::BackupStats;

/// Typed errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file of the image.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// A checkpoint that cannot be applied.
    #[error("cannot apply checkpoint: {0}")]
    Apply(String),
    /// Protocol failure.
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    /// Transport failure.
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    /// Snapshot format failure.
    #[error("snapshot: {0}")]
    Snapshot(#[from] vmm::snapshot::SnapshotError),
}
