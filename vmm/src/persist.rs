//! The one persistence shape every device follows (as in Firecracker): `save` produces plain
//! serde data, `restore` rebuilds the device from it plus host resources passed in `Args`
//! (files, taps, guest memory). There are no default methods: a device that cannot say what its
//! state is does not compile.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device state that does not fit the device it is restored into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot restore {device}: {why}")]
pub struct RestoreError {
    /// Which device.
    pub device: &'static str,
    /// What is wrong with the state.
    pub why: String,
}

impl RestoreError {
    /// Shorthand constructor.
    pub fn new(device: &'static str, why: impl Into<String>) -> Self {
        RestoreError {
            device,
            why: why.into(),
        }
    }
}

/// Save/restore of one device.
pub trait Persist: Sized {
    /// Plain, versioned-by-the-snapshot-format data.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq;
    /// Host resources needed to rebuild the device.
    type Args;

    /// Captures the device (called with vCPUs and device threads quiesced).
    fn save(&self) -> Self::State;

    /// Rebuilds the device from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, RestoreError>;
}
