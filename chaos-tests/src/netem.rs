//! Link degradation on the replication network: a userspace UDP proxy that delays, drops,
//! duplicates, reorders and stalls datagrams from a seeded generator (this kernel has no
//! `tc netem`), and the nftables rules that put it in the path of a host's real traffic.
//!
//! - [`model`]: the impairment of one direction ([`Impairment`]) and the sans-IO [`Pipe`] that
//!   applies it in virtual time; deterministic given the seed.
//! - [`proxy`]: [`Netem`], the proxy on threads: per-direction impairments changed at run time
//!   with [`Netem::set`], [`Counters`] of what it did.
//! - [`route`]: [`route_through`] redirects a namespace's UDP for one `host:port` to the proxy
//!   (its own nft table, stateless rewriting); the returned [`Route`] removes exactly that table.
//!
//! On a cluster of `scripts/cluster.sh` (replication network `10.78.<index>.0/24`, host *i* at
//! `.i`, the caller's namespace at `.254` on bridge `<name>rep`), degrading the link from the
//! primary on host `a` to its backup on host `b`, whose VM listens on port `P`:
//!
//! ```no_run
//! use chaos_tests::netem::{route_through, Impairment, LinkImpairment, Netem};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backup = "10.78.3.2:7001".parse()?;
//! // In the caller's namespace, on its replication address.
//! let proxy = Netem::start("10.78.3.254:0".parse()?, backup, LinkImpairment::NONE, 42)?;
//! // Host a's QUIC datagrams for the backup now go through the proxy.
//! let route = route_through("vmc3a", backup, proxy.local_addr())?;
//! proxy.set(LinkImpairment::both(Impairment {
//!     delay_ns: 40_000_000,
//!     jitter_ns: 10_000_000,
//!     loss_permille: 20,
//!     ..Impairment::NONE
//! }));
//! // ... the fault's window ...
//! proxy.set(LinkImpairment::NONE); // heal (releases a stall)
//! route.remove()?;                 // the direct path again
//! let counters = proxy.stop();
//! # let _ = counters; Ok(()) }
//! ```
//!
//! The backup sees the proxy's address as its peer (QUIC takes it as a migration of the
//! primary's connection); the primary keeps seeing the backup's.

pub mod model;
pub mod proxy;
pub mod route;

pub use model::{Direction, DirectionCounters, Impairment, LinkImpairment, Pipe};
pub use proxy::{Counters, Netem};
pub use route::{remove_table, route_through, Route, RouteError};

#[cfg(test)]
mod tests;
