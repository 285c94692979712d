//! # vmatrix — the command-line interface
//!
//! `vmatrix run` boots the test guest in our own KVM VMM; `restore` and `ctl` move and control
//! it; `primary` and `backup` replicate it continuously; `certs` makes the cluster's mutual-TLS
//! identities; `disk create` makes a raw disk image; `kv` talks to the guest's service; `bench`
//! measures. Later commands (failover, clones) land here as they are built.

#![forbid(unsafe_code)]

mod bench;
mod certs;
mod cgroup;
mod chaos;
mod clone;
mod cluster;
mod control;
mod disk;
mod guest_config;
mod kv;
mod lb;
mod metrics;
mod progress;
mod replicate;
mod restore;
mod rt;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmatrix: replication and fast failover for virtual machines.
#[derive(Parser, Debug)]
#[command(name = "vmatrix", version, about)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. "info" or "vmm=debug".
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a guest in a new VM and run it until it stops (SIGINT/SIGTERM stop it cleanly).
    Run(run::RunArgs),
    /// Run a VM protected by continuous replication to a backup (output commit).
    Primary(Box<replicate::PrimaryArgs>),
    /// Receive a primary's checkpoints into a replica image.
    Backup(replicate::BackupArgs),
    /// Start a VM from a snapshot directory in this new process.
    Restore(restore::RestoreArgs),
    /// Start clones of a VM image (a snapshot or a backup's replica image) on this host, each
    /// with its own generation, MAC, address and tap, memory shared copy-on-write.
    Clone(clone::CloneArgs),
    /// One clone in this process (what `vmatrix clone` and an agent start per clone).
    #[command(hide = true)]
    CloneVm(clone::CloneVmArgs),
    /// One address for a service: a VIP whose new connections are spread over real servers
    /// (the primary and its clones) by the kernel's NAT (nftables numgen), with draining.
    #[command(subcommand)]
    Lb(lb::cli::LbCmd),
    /// Control a running VM through its --control socket.
    Ctl(control::CtlArgs),
    /// Send requests to a guest's key-value service and print the answers.
    Kv(kv::KvArgs),
    /// Cluster CA and host certificates (mutual TLS on every replication channel).
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Disk image tools.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Benchmarks on real KVM, taps and QUIC (Markdown for docs/BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The failover manager: desired state, detection, fenced promotion, re-protection.
    Manager(cluster::manager::ManagerArgs),
    /// A host's agent: runs the VM processes the manager assigns, heartbeats and reports.
    Agent(cluster::agent::AgentArgs),
    /// Protected VMs on the manager's hosts.
    #[command(subcommand)]
    Vm(cluster::cli::VmCmd),
    /// The manager's hosts.
    #[command(subcommand)]
    Host(cluster::cli::HostCmd),
    /// The manager's event log (detections, term changes, promotions, re-protection).
    Events(cluster::cli::EventsArgs),
    /// The chaos suite: seeded faults on a real cluster here, checks, an HTML report per run.
    #[command(subcommand)]
    Chaos(chaos::ChaosCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Disk(d) => disk::main(d),
        Cmd::Certs(c) => certs::main(c),
        Cmd::Kv(a) => kv::main(a),
        Cmd::Primary(a) => replicate::primary_main(*a),
        Cmd::Backup(a) => replicate::backup_main(a),
        Cmd::Restore(a) => restore::main(a),
        Cmd::Lb(c) => lb::cli::main(c),
        Cmd::Ctl(a) => control::main(a),
        Cmd::Clone(a) => clone::main(a),
        Cmd::CloneVm(a) => clone::vm::main(a),
        Cmd::Bench(b) => bench::main(b),
        Cmd::Manager(a) => cluster::manager::main(a),
        Cmd::Agent(a) => cluster::agent::main(a),
        Cmd::Vm(c) => cluster::cli::vm_main(c),
        Cmd::Host(c) => cluster::cli::host_main(c),
        Cmd::Events(a) => cluster::cli::events_main(a),
        Cmd::Chaos(c) => chaos::main(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmatrix: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
