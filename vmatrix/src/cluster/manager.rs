//! `vmatrix manager` (stub: being built).
use std::process::ExitCode;

/// Flags of `vmatrix manager`.
#[derive(clap::Args, Debug)]
pub struct ManagerArgs {}

/// Runs the manager.
pub fn main(_a: ManagerArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
