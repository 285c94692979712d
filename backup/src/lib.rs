//! # backup — the receiving side of continuous replication
//!
//! Accepts a primary's session over QUIC with mutual TLS ([`serve`]), runs the protocol's
//! [`Receiver`](protocol::Receiver), applies each complete, verified checkpoint to the replica
//! image ([`image`]) and acknowledges it. An incomplete or corrupt checkpoint never reaches the
//! image (the receiver refuses it and the primary resends). The committed image survives
//! sessions and restarts: a reconnecting primary brings it up to date by a quick resync, and a
//! full sync builds a side image that replaces it only once complete ([`promote`]). The image
//! directory is locked by the process working on it ([`lock`]). On stop, the image is
//! finalized as a snapshot of the last committed checkpoint, which `vmatrix restore` starts.

#![forbid(unsafe_code)]

mod applier;
mod data;
pub mod export;
#[cfg(test)]
mod export_tests;
pub mod fence;
pub mod image;
pub mod journal;
pub mod lock;
mod mem_file;
pub mod promote;
mod replica;
#[cfg(test)]
mod ring_tests;
mod server;
pub mod stats;
#[cfg(test)]
mod tests;
mod write_back;

use std::path::PathBuf;

pub use export::{Exported, Exports};
pub use fence::Fence;
pub use lock::ImageLock;
pub use server::{serve, serve_fenced, serve_locked, BackupConfig};
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
    /// Another process works on the image directory.
    #[error("image {dir} is in use by another process (a backup or restore)")]
    InUse {
        /// The image directory.
        dir: PathBuf,
    },
    /// The directory holds no committed image.
    #[error("{dir} holds no consistent replica image: no full sync ever completed")]
    NoImage {
        /// The image directory.
        dir: PathBuf,
    },
    /// A `replica.bin` that does not decode (damaged, or written by another version).
    #[error("{path}: {err}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// Why it does not decode.
        err: vmm::snapshot::SnapshotError,
    },
    /// The primary's certificate may not act as primary for the VM (or states no roles).
    #[error("refused: {reason}")]
    NotPermitted {
        /// Its address.
        peer: String,
        /// Why: the certificate's host, what it grants and what was wanted.
        reason: String,
    },
    /// A checkpoint that cannot be applied.
    #[error("cannot apply checkpoint: {0}")]
    Apply(String),
    /// An export of the committed image that failed or was cancelled (`export`).
    #[error("export: {0}")]
    Export(String),
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
