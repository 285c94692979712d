//! # chaos-tests — the pure core of vmatrix's chaos suite
//!
//! A chaos run brings up a cluster, lets clients write and read keys on the guest's KV service,
//! injects faults from a seeded schedule, heals everything and then checks what the clients
//! saw. This crate holds everything of that which needs no process, network or clock, so it can
//! be tested on its own and reused by the runner (`vmatrix chaos run`) and by
//! `vmatrix chaos report <dir>`:
//!
//! - [`history`]: the clients' operations as JSON lines (writer and crash-tolerant reader).
//! - [`checker`]: lost acknowledged writes, per-key linearizability (Wing & Gong / Lowe, with
//!   memoization and a budget), cheap read anomalies, at most one serving primary, liveness; all
//!   aggregated in one serializable [`checker::Verdict`].
//! - [`schedule`]: the seeded, replayable fault schedule (its own pinned PRNG) and the exact
//!   command that replays a run.
//! - [`run_dir`]: the names and loaders of the files of a run directory.
//! - [`report`]: a self-contained HTML page with an SVG timeline, and the manager event-log
//!   parser it uses.
//! - [`runner`]: the part that is not pure: it runs a real cluster (namespaces, nftables, the
//!   `vmatrix` manager, agents and VM processes on KVM), clients and faults, and hands the run
//!   directory to the core.
//!
//! Times are nanoseconds since the run's start (`u64`) everywhere. The model and what each
//! check proves are in `docs/chaos.md`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod checker;
pub mod history;
pub mod netem;
pub mod report;
pub mod run_dir;
pub mod runner;
pub mod schedule;
