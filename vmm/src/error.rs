//! Typed errors of the VMM.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device node does not exist on this host.
    #[error("{0} does not exist: this host has no KVM (load kvm_intel/kvm_amd or enable nested virtualization)")]
    KvmMissing(String),
    /// The KVM device node exists but cannot be opened by this user.
    #[error("permission denied opening {0}: run as root or add this user to the 'kvm' group")]
    KvmPermission(String),
    /// Any other KVM ioctl failure.
    #[error("KVM {op} failed: {err}")]
    Kvm {
        /// Which operation failed.
        op: &'static str,
        /// The errno KVM returned.
        err: kvm_ioctls::Error,
    },
    /// The requested guest memory size is not usable.
    #[error("guest memory of {mib} MiB is invalid: {why}")]
    Memory {
        /// Requested size in MiB.
        mib: u64,
        /// Why it was refused.
        why: String,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map guest memory: {0}")]
    MemoryMap(String),
    /// The guest ELF file could not be read.
    #[error("cannot read guest ELF {path}: {err}")]
    GuestRead {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The guest ELF file is not a loadable image for this VMM.
    #[error("malformed guest ELF: {0}")]
    GuestElf(crate::loader::ElfError),
    /// The disk image could not be opened.
    #[error("cannot open disk {path}: {err}")]
    Disk {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The tap device could not be opened.
    #[error("cannot open tap device '{name}': {why}")]
    Tap {
        /// Interface name.
        name: String,
        /// Why it failed.
        why: String,
    },
    /// A host resource (thread, eventfd, signal) failed.
    #[error("host resource failure: {0}")]
    Host(String),
    /// A snapshot could not be used.
    #[error("snapshot: {0}")]
    Snapshot(crate::snapshot::SnapshotError),
    /// The guest configuration string is malformed.
    #[error("invalid guest config: {0}")]
    GuestConfig(String),
}

impl From<crate::snapshot::SnapshotError> for Error {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        Error::Snapshot(e)
    }
}

impl From<crate::loader::ElfError> for Error {
    fn from(e: crate::loader::ElfError) -> Self {
        Error::GuestElf(e)
    }
}

// The messages above already carry their cause, so no variant declares a `#[source]`: a
// printed error chain would otherwise repeat it.

impl Error {
    /// Helper to wrap a KVM error with the name of the operation.
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |err| Error::Kvm { op, err }
    }
}
