//! Typed errors of the transport.

use std::path::PathBuf;

/// What can go wrong with certificates, endpoints and streams.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The endpoint could not be created.
    #[error("QUIC endpoint on {addr}: {err}")]
    Endpoint {
        /// The address.
        addr: String,
        /// The error.
        err: String,
    },
    /// Connecting failed (including a refused TLS handshake).
    #[error("connection to {peer} failed: {reason}")]
    Connect {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// An incoming connection was refused during the handshake (bad or missing certificate).
    #[error("refused connection from {peer}: {reason}")]
    Refused {
        /// The peer address.
        peer: String,
        /// Why (from the TLS layer).
        reason: String,
    },
    /// The peer's certificate does not grant the role it would play (or states no roles).
    #[error("refused {peer}: {reason}")]
    NotPermitted {
        /// The peer address.
        peer: String,
        /// Why (names the certificate's host, the role and VM wanted and what it grants).
        reason: String,
    },
    /// A stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer sent bytes that are not protocol frames.
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(String),
}
