//! `vmatrix certs`: the cluster CA and host certificates for mutual TLS.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

/// Certificate subcommands.
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a new cluster CA in a directory (ca.pem, ca.key).
    Init {
        /// Directory for the cluster's certificates.
        dir: PathBuf,
    },
    /// Issue a host certificate signed by the cluster CA (<host>.pem, <host>.key).
    Issue {
        /// Directory holding the cluster CA.
        dir: PathBuf,
        /// Host name (the certificate's subject alternative name).
        #[arg(long)]
        host: String,
    },
}

/// Runs a certs subcommand.
pub fn main(cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCmd::Init { dir } => {
            transport::certs::init_ca(&dir)?;
            println!("created cluster CA in {}", dir.display());
        }
        CertsCmd::Issue { dir, host } => {
            transport::certs::issue(&dir, &host)?;
            let (cert, key) = transport::certs::host_paths(&dir, &host);
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
