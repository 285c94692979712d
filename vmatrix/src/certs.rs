//! `vmatrix certs`: the cluster CA and host certificates for mutual TLS.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use transport::roles::{Grants, HostRole};

fn parse_role(s: &str) -> Result<HostRole, String> {
    s.parse()
}

/// Certificate subcommands.
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a new cluster CA in a directory (ca.pem, ca.key).
    Init {
        /// Directory for the cluster's certificates.
        dir: PathBuf,
    },
    /// Issue a host certificate signed by the cluster CA (<host>.pem, <host>.key) stating what
    /// the host may be. Without --role: primary and backup (of the --vm VMs, or any VM).
    Issue {
        /// Directory holding the cluster CA.
        dir: PathBuf,
        /// Host name (the certificate's subject alternative name).
        #[arg(long)]
        host: String,
        /// A role the host may play: primary, backup, manager or agent (repeat for several).
        /// Default: primary and backup.
        #[arg(long = "role", value_parser = parse_role)]
        roles: Vec<HostRole>,
        /// A VM the primary and backup roles apply to (repeat for several; '*' = any VM, the
        /// default).
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
}

/// Runs a certs subcommand.
pub fn main(cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCmd::Init { dir } => {
            transport::certs::init_ca(&dir)?;
            println!("created cluster CA in {}", dir.display());
        }
        CertsCmd::Issue {
            dir,
            host,
            roles,
            vms,
        } => {
            let defaulted = roles.is_empty();
            let roles = match defaulted {
                true => vec![HostRole::Primary, HostRole::Backup],
                false => roles,
            };
            let grants = Grants::new(&roles, &vms).map_err(anyhow::Error::msg)?;
            transport::certs::issue_for(&dir, &host, &grants)?;
            let (cert, key) = transport::certs::host_paths(&dir, &host);
            println!(
                "issued {} and {}: {grants}{}",
                cert.display(),
                key.display(),
                if defaulted {
                    " (no --role given: the default)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
