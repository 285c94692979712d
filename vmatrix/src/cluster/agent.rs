//! `vmatrix agent` (stub: being built).
use std::process::ExitCode;

/// Flags of `vmatrix agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {}

/// Runs the agent.
pub fn main(_a: AgentArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
