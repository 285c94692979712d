//! # protocol — the vmatrix replication protocol, sans I/O
//!
//! Messages ([`message`]), their framing with magic, version, length limits and CRC32
//! ([`frame`]), page encodings ([`page`]), checkpoints split into parts with an end-to-end CRC
//! ([`checkpoint`]), and the two state machines: the primary's [`Sender`] and the backup's
//! [`Receiver`]. Like quinn-proto, nothing here does I/O or reads a clock: the caller feeds
//! frames and the current time in, and takes frames, events, checkpoints and deadlines out.
//! That makes every behaviour testable deterministically (see `tests/sim.rs`).

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod error;
pub mod frame;
pub mod message;
pub mod page;
pub mod receiver;
pub mod sender;

pub use checkpoint::Checkpoint;
pub use error::ProtocolError;
pub use message::{Kind, Message, RefuseCode};
pub use receiver::{Receiver, ReceiverConfig};
pub use sender::{Sender, SenderConfig, SenderEvent};
