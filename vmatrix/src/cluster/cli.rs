//! `vmatrix vm|host|events` (stub: being built).
use std::process::ExitCode;

/// `vmatrix vm ...`.
#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs.
    List,
}
/// `vmatrix host ...`.
#[derive(clap::Subcommand, Debug)]
pub enum HostCmd {
    /// List hosts.
    List,
}
/// `vmatrix events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {}

/// Runs `vm`.
pub fn vm_main(_c: VmCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
/// Runs `host`.
pub fn host_main(_c: HostCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
/// Runs `events`.
pub fn events_main(_a: EventsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
