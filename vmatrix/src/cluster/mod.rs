//! The control plane's processes: `vmatrix agent` (one per host) and `vmatrix manager`, and
//! the agent protocol's framing over a QUIC stream they share.

pub mod agent;
pub mod cli;
mod cli_clones;
mod cli_limits;
pub mod link;
pub mod manager;
