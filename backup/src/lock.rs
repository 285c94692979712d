//! The image directory lock: `<dir>/lock`, held (an exclusive `flock`, through
//! [`std::fs::File::try_lock`]) by whoever works on a replica image — a backup for its whole
//! life, `vmatrix restore` while it finalizes the image and runs the VM from it. A second holder
//! gets [`BackupError::InUse`] at once instead of both writing the same files. The lock goes
//! with the process (the kernel releases it when the process dies, even by SIGKILL), so a stale
//! `lock` file is harmless. A process takes it once and passes the guard on ([`ImageLock`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::BackupError;

/// Name of the lock file in an image directory.
pub const LOCK_FILE: &str = "lock";

/// Exclusive hold on an image directory, released when dropped.
#[derive(Debug)]
pub struct ImageLock {
    dir: PathBuf,
    _file: File,
}

impl ImageLock {
    /// Locks image directory `dir` (creating it and its lock file if needed), or fails at once
    /// with [`BackupError::InUse`] if another process (or another guard) holds it.
    pub fn acquire(dir: &Path) -> Result<ImageLock, BackupError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| BackupError::Io { path, err }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(ImageLock {
                dir: dir.to_path_buf(),
                _file: file,
            }),
            Err(TryLockError::WouldBlock) => Err(BackupError::InUse {
                dir: dir.to_path_buf(),
            }),
            Err(TryLockError::Error(err)) => Err(BackupError::Io { path, err }),
        }
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
