//! `vmatrix ctl <socket> <request>`: one request on a control socket; prints the JSON answer on
//! one line and exits 0, or prints the error (with its HTTP status) and fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::client::Client;
use super::types::{Request, RunState, SnapshotKind};

/// Longest wait for an answer (a snapshot of a big guest, a promotion, take a while).
const CTL_TIMEOUT: Duration = Duration::from_secs(600);

/// `vmatrix ctl` arguments.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a VM (`run`, `restore`, `primary`) or of a backup.
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

/// Requests `vmatrix ctl` can send.
#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Pause the VM (`PUT /state {"state":"paused"}`).
    Pause,
    /// Resume the VM (`PUT /state {"state":"running"}`).
    Resume,
    /// Show state and counters (`GET /status`).
    Status,
    /// CRC32 of all guest memory; the VM must be paused (`GET /checksum`).
    Checksum,
    /// Snapshot the VM into a directory (`PUT /snapshot`).
    Snapshot {
        /// Target directory (created; sent as an absolute path).
        dir: PathBuf,
        /// Only what changed since the previous snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Stop the VM (a backup: finalize its image as a snapshot of the last applied checkpoint
    /// and exit) (`PUT /stop`).
    Stop,
    /// Fault injection (tests): the next N guest disk writes fail with an I/O error
    /// (`PUT /faults/disk`).
    DiskFaults {
        /// How many writes fail.
        n: u32,
    },
    /// A primary: replace its backups (`name@host:port,...`, or `none`); the session restarts
    /// with them (quick resync where possible), all of them required (`PUT /backups`).
    Backups {
        /// Comma-separated `name@host:port` list, or `none`.
        list: String,
    },
    /// A primary: stop for good (exit 3) if TERM is newer than its own. A backup: refuse
    /// primaries older than TERM from now on (persisted) (`PUT /fence`).
    Fence {
        /// The newer term.
        term: u64,
    },
    /// A primary: planned handover; the guest stops after its last checkpoint is acknowledged
    /// and the process exits with 4 (`PUT /handover`).
    Handover,
    /// A backup: fence to TERM, stop serving and finalize the image for a new primary
    /// (`PUT /promote`).
    Promote {
        /// The term granted to the new primary.
        term: u64,
    },
    /// A standby clone (`vmatrix clone-vm --standby`): take this name and address and start
    /// serving as that clone (`PUT /identity`).
    Identity {
        /// The clone's name.
        #[arg(long)]
        name: String,
        /// Its guest config string, e.g. `ip=10.77.1.10/24,gw=10.77.1.1,port=7000`.
        #[arg(long)]
        config: String,
    },
}

/// The request `cmd` sends (a snapshot directory is created first).
fn request(cmd: CtlCmd) -> anyhow::Result<Request> {
    Ok(match cmd {
        CtlCmd::Pause => Request::SetState(RunState::Paused),
        CtlCmd::Resume => Request::SetState(RunState::Running),
        CtlCmd::Status => Request::Status,
        CtlCmd::Checksum => Request::Checksum,
        CtlCmd::Stop => Request::Stop,
        CtlCmd::DiskFaults { n } => Request::DiskFaults(n),
        CtlCmd::Backups { list } => Request::Backups(backup_list(&list)),
        CtlCmd::Fence { term } => Request::Fence(term),
        CtlCmd::Handover => Request::Handover,
        CtlCmd::Promote { term } => Request::Promote(term),
        CtlCmd::Identity { name, config } => Request::Identity { name, config },
        CtlCmd::Snapshot { dir, diff } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Request::Snapshot {
                kind: if diff {
                    SnapshotKind::Diff
                } else {
                    SnapshotKind::Full
                },
                dir: std::fs::canonicalize(&dir)?,
            }
        }
    })
}

/// `a,b,c` or `none` as a list.
fn backup_list(s: &str) -> Vec<String> {
    match s.trim() {
        "none" => Vec::new(),
        s => s.split(',').map(|b| b.trim().to_string()).collect(),
    }
}

/// Sends one request and prints the answer; fails on an error answer.
pub fn main(a: CtlArgs) -> anyhow::Result<ExitCode> {
    let req = request(a.cmd)?;
    let answer = Client::new(&a.socket, CTL_TIMEOUT).send_blocking(&req)?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_lists() {
        assert!(backup_list("none").is_empty());
        assert_eq!(
            backup_list("a@1.2.3.4:5, b@1.2.3.4:6"),
            ["a@1.2.3.4:5", "b@1.2.3.4:6"]
        );
        // An empty item is the primary's to refuse.
        assert_eq!(backup_list(""), [""]);
    }
}
