//! Building a clone: a VM started from a checkpoint's parts (as [`Vm::restore_parts`] does)
//! with an identity of its own, given before its first instruction.
//!
//! - Guest RAM is the checkpoint's memory file mapped copy-on-write (`MAP_PRIVATE`): every
//!   clone of the same file shares the pages it has not written through the page cache.
//! - The disk is a copy-on-write [`Overlay`] of the checkpoint's disk: the base is opened
//!   read-only and never written; the clone's writes go to its own delta file.
//! - The generation id, the config string (IP, ...) and the MAC are replaced in the state
//!   before the devices are restored; the new generation is written to the guest's generation
//!   word ([`GENID_ADDR`](crate::layout::GENID_ADDR)) before the vCPU exists.
//! - The NIC drops transmitted frames whose source MAC is not the clone's: whatever the guest
//!   sends with its parent's identity before it notices the new generation never leaves.
//!
//! A **standby** clone ([`Vm::restore_standby`]) is built the same way but keeps its parent's
//! generation and config: it runs idle as its parent would, behind a NIC whose MAC is a
//! placeholder (so the source filter drops everything it sends), its pages and the hypervisor's
//! tables for them warm, until [`Vm::assume_identity`] gives it its own identity — the
//! generation word written last, so the guest sees generation, config and MAC change together.

use std::fs::{File, OpenOptions};

use std::path::PathBuf;
use vm_memory::Bytes;

use super::restore::{build, check_mem_size, open_tap, Restored};
use super::{open_kvm, Vm};
use crate::devices::serial::ConsoleOut;
use crate::devices::virtio::blk::{Disk, Overlay};
use crate::snapshot::{self, VmState};
use crate::{Error, Result};

/// A clone's disk: the checkpoint's disk as a read-only base, and the clone's own delta.
pub struct CloneDisk {
    /// The checkpoint's disk (opened read-only; never written).
    pub base: PathBuf,
    /// The clone's delta file: created (it must not exist), sparse, as large as the base.
    pub delta: PathBuf,
}

/// What a clone is built from: the checkpoint's parts and the clone's identity.
pub struct CloneParts {
    /// Raw image of guest RAM (`mem_size` bytes), mapped copy-on-write. It must not change
    /// while any clone runs.
    pub memory: PathBuf,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// The checkpoint's disk and the clone's delta, if the VM has a disk.
    pub disk: Option<CloneDisk>,
    /// vCPU and device state of the checkpoint.
    pub state: VmState,
    /// The clone's tap (required if the state has a NIC).
    pub tap: Option<String>,
    /// Console output.
    pub console: ConsoleOut,
    /// The clone's generation id (must differ from the checkpoint's).
    pub generation: u64,
    /// The clone's config string (what the guest reads through the platform device).
    pub config: String,
    /// The clone's MAC address (unicast).
    pub mac: [u8; 6],
}

fn host_err(why: String) -> Error {
    Error::Host(why)
}

/// Opens the clone's disk: the base read-only, the delta created exclusively.
fn open_overlay(d: &CloneDisk) -> Result<Disk> {
    let base = File::open(&d.base).map_err(|err| Error::Disk {
        path: d.base.clone(),
        err,
    })?;
    let delta = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&d.delta)
        .map_err(|err| Error::Disk {
            path: d.delta.clone(),
            err,
        })?;
    let o = Overlay::new(base, delta).map_err(|err| Error::Disk {
        path: d.delta.clone(),
        err,
    })?;
    Ok(Disk::Overlay(o))
}

/// Checks a clone's identity: a generation other than its checkpoint's (`parent`), a config
/// string of at most 4 KiB, a unicast MAC.
fn check_identity(parent: u64, generation: u64, config: &str, mac: [u8; 6]) -> Result<()> {
    if generation == parent {
        return Err(host_err(format!(
            "a clone needs a new generation id ({generation} is the checkpoint's)"
        )));
    }
    if config.len() > 4096 {
        return Err(host_err("the config string is longer than 4 KiB".into()));
    }
    if mac[0] & 1 != 0 {
        return Err(host_err(
            "the clone's MAC address is a multicast one".into(),
        ));
    }
    Ok(())
}

impl Vm {
    /// Builds a clone (see the module docs). The VM is not started.
    pub fn restore_clone(p: CloneParts) -> Result<Vm> {
        check_identity(p.state.platform.generation, p.generation, &p.config, p.mac)?;
        Self::build_clone(p, true)
    }

    /// Builds a standby clone (see the module docs): `p.mac` is its placeholder MAC; its
    /// `generation` and `config` are not used (the checkpoint's are kept until
    /// [`Vm::assume_identity`]). The VM is not started.
    pub fn restore_standby(p: CloneParts) -> Result<Vm> {
        if p.mac[0] & 1 != 0 {
            return Err(host_err("the placeholder MAC is a multicast one".into()));
        }
        Self::build_clone(p, false)
    }

    /// Gives a running standby clone its identity without stopping it: the config string and
    /// the MAC (and so the source filter) first, the generation id and the guest's generation
    /// word last (an atomic store). The guest looks at the word at the start of each round
    /// and only then reads config and MAC: it sees all of the new identity or none of it,
    /// and takes it before it sends anything; a frame it sends meanwhile with its parent's
    /// MAC is dropped by the filter. A guest waiting in the VMM is woken to look. (Pausing
    /// for the change cost 17–33 ms on a busy host: the pause waits for the vCPU thread to
    /// be scheduled.) Refused if the generation is the current one (given twice, or the
    /// parent's).
    pub fn assume_identity(&self, generation: u64, config: &str, mac: [u8; 6]) -> Result<()> {
        let mut p = self.platform_between_waits()?;
        check_identity(p.generation(), generation, config, mac)?;
        if let Some(n) = &self.devices.net {
            super::lock(n).with_device_unchecked(|d| d.set_mac(mac));
        }
        p.set_config(config.as_bytes().to_vec());
        self.memory()
            .store(
                generation,
                vm_memory::GuestAddress(crate::layout::GENID_ADDR),
                std::sync::atomic::Ordering::Release,
            )
            .map_err(|e| host_err(format!("writing the generation word: {e}")))?;
        // (Last: it also wakes a guest waiting in the VMM.)
        p.set_generation(generation);
        Ok(())
    }

    /// The platform device, locked between two of the guest's waits: a guest's wait holds it
    /// (up to the longest wait, 100 ms), so the wait is ended (a device event) until the lock
    /// is had — at once in practice: the guest runs a round before it waits again.
    fn platform_between_waits(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, crate::devices::platform::Platform>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            self.control.wake_guest();
            match self.devices.platform.try_lock() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(host_err(
                    "the guest's platform device stayed busy for 1 s".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    fn build_clone(p: CloneParts, identity: bool) -> Result<Vm> {
        let mut state = p.state;
        check_mem_size(&state, p.mem_size)?;
        if identity {
            state.platform.config = p.config.into_bytes();
        }
        if let Some(n) = state.net.as_mut() {
            n.device.mac = p.mac;
        }
        let kvm = open_kvm()?;
        let tap = open_tap(&state, &p.tap)?;
        let disk = match (&state.blk, &p.disk) {
            (Some(_), Some(d)) => Some(open_overlay(d)?),
            (Some(_), None) => {
                return Err(host_err(
                    "the checkpoint has a disk device: a clone needs its base disk".into(),
                ))
            }
            (None, _) => None,
        };
        let mem = snapshot::memory::map_full(&p.memory, p.mem_size)?;
        let vm = build(
            kvm,
            Restored {
                mem,
                mem_size: p.mem_size,
                state,
                tap,
                disk,
                console: p.console,
                generation: identity.then_some(p.generation),
            },
        )?;
        if let Some(n) = &vm.devices.net {
            super::lock(n).with_device_unchecked(|d| d.set_source_filter(true));
        }
        Ok(vm)
    }

    /// Frames the clone's NIC refused to send because their source was not its MAC (0 for a
    /// VM that is not a clone).
    pub fn foreign_frames_dropped(&self) -> u64 {
        self.devices
            .net
            .as_ref()
            .map_or(0, |n| super::lock(n).device().foreign_dropped())
    }

    /// Blocks the clone has written to its disk overlay (None without an overlay).
    pub fn overlay_blocks_written(&self) -> Option<u64> {
        let b = self.devices.blk.as_ref()?;
        let t = super::lock(b);
        t.device().disk().overlay().map(|o| o.blocks_written())
    }
}
