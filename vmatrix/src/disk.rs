//! `vmatrix disk create`: a sparse raw disk image of whole MiB.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;

/// Disk subcommands.
#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create a zero-filled (sparse) raw disk image.
    Create {
        /// Path of the new image.
        path: PathBuf,
        /// Size in MiB.
        #[arg(long)]
        size_mib: u64,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a disk subcommand.
pub fn main(cmd: DiskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DiskCmd::Create {
            path,
            size_mib,
            force,
        } => {
            if size_mib == 0 || size_mib > 1 << 20 {
                bail!("--size-mib must be between 1 and 1048576");
            }
            if path.exists() && !force {
                bail!(
                    "{} already exists (use --force to replace it)",
                    path.display()
                );
            }
            let f = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            f.set_len(size_mib << 20)
                .with_context(|| format!("cannot size {}", path.display()))?;
            println!("created {} ({size_mib} MiB)", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
