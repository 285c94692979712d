//! Building a VM from a snapshot (or a chain of diffs ending at one), or from the raw parts of
//! a backup's replica image.
//!
//! From a snapshot ([`Vm::restore`]): verify the whole chain (every CRC) → materialize the
//! working disk → map the base memory copy-on-write and apply the diffs → create KVM objects →
//! restore vCPU and devices. No vCPU runs and nothing is written outside the new working disk
//! until every check passed.
//!
//! From parts ([`Vm::restore_parts`]): the caller has a raw image of guest RAM, a working disk
//! it prepared and the state, all of one consistent checkpoint (a replica image the backup
//! kept crash-safe). Nothing is read in full: the memory file is mapped copy-on-write (pages are
//! read when the guest touches them), so building the VM takes the same time for any guest
//! size. Sizes are checked (the memory file against the RAM size, the disk against the block
//! device's capacity); contents carry no CRC to check.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{create_kvm_vm, open_disk, open_kvm, Devices, Vm};
use crate::devices::platform::{Platform, PlatformArgs};
use crate::devices::serial::{ConsoleOut, Serial};
use crate::devices::virtio::blk::{Block, Disk};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::persist::TransportArgs;
use crate::events::GuestEvents;
use crate::memory::GuestMem;
use crate::persist::Persist;
use crate::snapshot::{self, ParentRef, SnapshotError, VmState};
use crate::vcpu::Control;
use crate::vcpu_state;
use crate::{Error, Result};

/// Where a restored VM gets its host resources.
pub struct RestoreConfig {
    /// The snapshot directory (a full snapshot or the last diff of a chain).
    pub dir: PathBuf,
    /// Tap for the NIC (required if the snapshot has one; may differ from the original).
    pub tap: Option<String>,
    /// Working disk to create from the snapshot's disk (default `<dir>/disk-live.img`).
    pub disk: Option<PathBuf>,
    /// Console output.
    pub console: ConsoleOut,
    /// New generation id (a clone); `None` keeps the snapshot's.
    pub generation: Option<u64>,
}

/// A VM's checkpoint as raw parts (a backup's replica image), for [`Vm::restore_parts`].
pub struct RestoreParts {
    /// Raw image of guest RAM, exactly `mem_size` bytes; mapped copy-on-write, never written.
    /// It must not change while the VM runs (the caller holds it: a replica image is locked).
    pub memory: PathBuf,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// The working disk (made by the caller; the VM writes it), if the VM has a disk.
    pub disk: Option<PathBuf>,
    /// vCPU and device state of the checkpoint.
    pub state: VmState,
    /// Tap for the NIC (required if the state has one).
    pub tap: Option<String>,
    /// Console output.
    pub console: ConsoleOut,
    /// New generation id; `None` keeps the checkpoint's.
    pub generation: Option<u64>,
}

/// What every restore hands to [`build`]: guest RAM as of the checkpoint, its state and the
/// host resources already opened.
pub(super) struct Restored {
    pub mem: GuestMem,
    pub mem_size: u64,
    pub state: VmState,
    pub tap: Option<Tap>,
    pub disk: Option<Disk>,
    pub console: ConsoleOut,
    pub generation: Option<u64>,
}

/// Opens the tap the state needs.
pub(super) fn open_tap(state: &VmState, tap: &Option<String>) -> Result<Option<Tap>> {
    match (&state.net, tap) {
        (Some(_), Some(name)) => Ok(Some(Tap::open(name)?)),
        (Some(_), None) => Err(Error::Host(
            "the snapshot has a network card: pass --tap <name>".into(),
        )),
        (None, _) => Ok(None),
    }
}

/// The platform device must agree with the memory part on the RAM size.
pub(super) fn check_mem_size(state: &VmState, mem_size: u64) -> Result<()> {
    let pages_ok = mem_size > 0 && mem_size.is_multiple_of(crate::layout::PAGE_SIZE);
    if state.platform.mem_size != mem_size
        || !pages_ok
        || mem_size > crate::layout::MAX_MEM_MIB << 20
    {
        return Err(SnapshotError::Invalid {
            part: snapshot::Part::Meta,
            why: format!(
                "guest RAM of {mem_size} bytes (the platform device says {}) is not valid",
                state.platform.mem_size
            ),
        }
        .into());
    }
    Ok(())
}

impl Vm {
    /// Builds a VM from a snapshot. The VM is not started.
    pub fn restore(cfg: RestoreConfig) -> Result<Vm> {
        let kvm = open_kvm()?;
        let chain = snapshot::load_chain(&cfg.dir)?;
        let tail = chain
            .last()
            .ok_or_else(|| Error::Snapshot(SnapshotError::Chain("empty chain".into())))?;
        let state = tail.meta.vm.clone();
        let mem_size = tail.meta.mem_size;
        check_mem_size(&state, mem_size)?;
        let tap = open_tap(&state, &cfg.tap)?;
        let disk = match &state.blk {
            Some(_) => {
                let out = cfg
                    .disk
                    .clone()
                    .unwrap_or_else(|| cfg.dir.join("disk-live.img"));
                if !snapshot::restore_disk(&chain, &out)? {
                    return Err(SnapshotError::Chain(
                        "the snapshot has a disk device but no disk".into(),
                    )
                    .into());
                }
                Some(open_disk(&out)?.into())
            }
            None => None,
        };
        let mem = snapshot::restore_memory(&chain)?;
        let vm = build(
            kvm,
            Restored {
                mem,
                mem_size,
                state,
                tap,
                disk,
                console: cfg.console,
                generation: cfg.generation,
            },
        )?;
        let abs = std::fs::canonicalize(&tail.dir).map_err(SnapshotError::io(&tail.dir))?;
        // Diffs continue the chain; disk writes are recorded from now on, so the next diff
        // can carry a disk delta.
        vm.continue_chain(ParentRef {
            dir: abs,
            id: tail.meta.id,
        });
        Ok(vm)
    }

    /// Builds a VM from a checkpoint's raw parts (see the module docs). The VM is not started.
    /// It continues no snapshot chain: its first snapshot is a full one.
    pub fn restore_parts(p: RestoreParts) -> Result<Vm> {
        let kvm = open_kvm()?;
        check_mem_size(&p.state, p.mem_size)?;
        let tap = open_tap(&p.state, &p.tap)?;
        let disk = match (&p.state.blk, &p.disk) {
            (Some(_), Some(path)) => Some(open_disk(path)?.into()),
            (Some(_), None) => {
                return Err(Error::Host(
                    "the checkpoint has a disk device: a working disk is needed".into(),
                ))
            }
            (None, _) => None,
        };
        let mem = snapshot::memory::map_full(&p.memory, p.mem_size)?;
        build(
            kvm,
            Restored {
                mem,
                mem_size: p.mem_size,
                state: p.state,
                tap,
                disk,
                console: p.console,
                generation: p.generation,
            },
        )
    }
}

/// Creates the KVM VM on the restored memory, restores the vCPU and every device. A new
/// generation id (a clone) is also written to the guest's generation word
/// ([`GENID_ADDR`](crate::layout::GENID_ADDR)) before any guest instruction can run.
pub(super) fn build(kvm: kvm_ioctls::Kvm, r: Restored) -> Result<Vm> {
    let Restored {
        mem,
        mem_size,
        state,
        tap,
        disk,
        console,
        generation,
    } = r;
    if let Some(g) = generation {
        crate::boot::write_generation(&mem, g)?;
    }
    let parts = create_kvm_vm(kvm, &mem, mem_size, true)?;
    vcpu_state::restore(&parts.vcpu, &state.vcpu)?;
    let events = Arc::new(GuestEvents::default());
    let control = Arc::new(Control::new(events.clone()));
    let serial = Serial::restore(console.clone(), &state.serial).map_err(SnapshotError::from)?;
    let mut platform = Platform::restore(
        PlatformArgs {
            events: events.clone(),
            control: control.clone(),
            mem: mem.clone(),
            generation,
        },
        &state.platform,
    )
    .map_err(SnapshotError::from)?;
    platform.set_console(console);
    let net = match (tap, &state.net) {
        (Some(t), Some(st)) => Some(Arc::new(Mutex::new(
            MmioTransport::<Net<Tap>>::restore(transport_args(t, &mem, &events), st)
                .map_err(SnapshotError::from)?,
        ))),
        _ => None,
    };
    let blk = match (disk, &state.blk) {
        (Some(f), Some(st)) => Some(Arc::new(Mutex::new(
            MmioTransport::<Block>::restore(transport_args(f, &mem, &events), st)
                .map_err(SnapshotError::from)?,
        ))),
        _ => None,
    };
    let devices = Devices {
        serial: Arc::new(Mutex::new(serial)),
        platform: Arc::new(Mutex::new(platform)),
        net,
        blk,
    };
    Ok(Vm::assemble(parts, mem, mem_size, true, control, devices))
}

fn transport_args<D>(device: D, mem: &GuestMem, events: &Arc<GuestEvents>) -> TransportArgs<D> {
    TransportArgs {
        device,
        mem: mem.clone(),
        events: events.clone(),
    }
}
