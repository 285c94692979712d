//! # transport — QUIC with mutual TLS for vmatrix
//!
//! The cluster CA and host certificates ([`certs`], rcgen), rustls configurations that make
//! mutual TLS mandatory ([`tls`]), QUIC endpoints with failure-detection timers ([`quic`],
//! quinn), and the mapping of protocol frames onto a control stream and several data streams
//! ([`link`]), what a host certificate allows its host to be ([`roles`]), the bounded record of
//! refused connections ([`refusals`]), and a raw-throughput probe for benchmarks ([`probe`]).
//! The replication protocol itself is the sans-IO `protocol` crate.

#![forbid(unsafe_code)]

pub mod certs;
pub mod error;
pub mod link;
pub mod probe;
pub mod quic;
pub mod refusals;
pub mod roles;
pub mod tls;

pub use error::TransportError;
pub use link::{BackupLink, FrameRx, PrimaryLink, CHANNEL_FRAMES};
pub use quic::{client, connect, connect_backup, QuicConfig, Server};
pub use roles::{Grants, HostRole, PeerCert, VmScope};
