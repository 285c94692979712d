//! The harness shared by the seeded simulations (`manager_sim.rs`, `clones_sim.rs`,
//! `scaler_sim.rs`): one seeded RNG ([`rng::Rng`]), the seed selection
//! (`VMATRIX_SEED=n` replays one run, `VMATRIX_SEEDS=a..b` runs a range) and the simulated
//! world of the manager and its agents in virtual time ([`world::Sim`]):
//!
//! - `world.rs`: hosts (VM processes, disks, the agent's memory, the manager link), the real
//!   [`failover::manager::Manager`] with an in-memory store, the driver of its outputs;
//! - `agent.rs`: agents running the real [`failover::agent::reconcile`];
//! - `clones.rs`: the agents' clone bases and clone processes (as the real agent runs them);
//! - `data.rs`: the VM's checkpoints and released output, and the failover invariants;
//! - `faults.rs`: message delivery with partitions, host and manager crashes (the manager
//!   restarts from its store), process kills and stalls, and healing.
#![allow(dead_code)]

pub mod agent;
pub mod clones;
pub mod data;
pub mod faults;
pub mod rng;
pub mod world;

/// The seeds to run: `VMATRIX_SEED=n` replays one, `VMATRIX_SEEDS=a..b` runs a range,
/// otherwise `default`.
pub fn seeds(default: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    if let Ok(r) = std::env::var("VMATRIX_SEEDS") {
        let (a, b) = r.split_once("..").expect("VMATRIX_SEEDS=a..b");
        return (a.parse().expect("a")..b.parse().expect("b")).collect();
    }
    match std::env::var("VMATRIX_SEED") {
        Ok(s) => vec![s.parse().expect("VMATRIX_SEED=<u64>")],
        Err(_) => default.collect(),
    }
}

/// Runs `run` for every seed of [`seeds`], saying each seed and how to replay it (`test`: the
/// test target's name); the first failure is re-raised once its seed is said.
pub fn for_each_seed(
    test: &str,
    default: std::ops::RangeInclusive<u64>,
    mut run: impl FnMut(u64),
) -> usize {
    let seeds = seeds(default);
    for &seed in &seeds {
        eprintln!("seed {seed} (replay: VMATRIX_SEED={seed} cargo test -p failover --test {test})");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        if let Err(e) = r {
            eprintln!("seed {seed} FAILED");
            std::panic::resume_unwind(e);
        }
    }
    seeds.len()
}
