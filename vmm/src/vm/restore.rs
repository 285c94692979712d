//! Building a VM from a snapshot (or a chain of diffs ending at one).
//!
//! Order: verify the whole chain (every CRC) → materialize the working disk → map the base
//! memory copy-on-write and apply the diffs → create KVM objects → restore vCPU and devices. No
//! vCPU runs and nothing is written outside the new working disk until every check passed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{create_kvm_vm, open_disk, open_kvm, Devices, Vm};
use crate::devices::platform::{Platform, PlatformArgs};
use crate::devices::serial::{ConsoleOut, Serial};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::persist::TransportArgs;
use crate::events::GuestEvents;
use crate::persist::Persist;
use crate::snapshot::{self, ParentRef, SnapshotError};
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
        if state.platform.mem_size != mem_size {
            return Err(SnapshotError::Invalid {
                part: snapshot::Part::Meta,
                why: "platform RAM size differs from the memory part".into(),
            }
            .into());
        }
        let tap = match (&state.net, &cfg.tap) {
            (Some(_), Some(name)) => Some(Tap::open(name)?),
            (Some(_), None) => {
                return Err(Error::Host(
                    "the snapshot has a network card: pass --tap <name>".into(),
                ))
            }
            (None, _) => None,
        };

        let disk_file = match &state.blk {
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
                Some(open_disk(&out)?)
            }
            None => None,
        };
        let mem = snapshot::restore_memory(&chain)?;

        let parts = create_kvm_vm(kvm, &mem, mem_size, true)?;
        vcpu_state::restore(&parts.vcpu, &state.vcpu)?;

        let events = Arc::new(GuestEvents::default());
        let control = Arc::new(Control::new(events.clone()));
        let devices = Devices {
            serial: Arc::new(Mutex::new(
                Serial::restore(cfg.console, &state.serial).map_err(SnapshotError::from)?,
            )),
            platform: Arc::new(Mutex::new(
                Platform::restore(
                    PlatformArgs {
                        events: events.clone(),
                        control: control.clone(),
                        mem: mem.clone(),
                        generation: cfg.generation,
                    },
                    &state.platform,
                )
                .map_err(SnapshotError::from)?,
            )),
            net: match (tap, &state.net) {
                (Some(t), Some(st)) => Some(Arc::new(Mutex::new(
                    MmioTransport::<Net<Tap>>::restore(
                        TransportArgs {
                            device: t,
                            mem: mem.clone(),
                            events: events.clone(),
                        },
                        st,
                    )
                    .map_err(SnapshotError::from)?,
                ))),
                _ => None,
            },
            blk: match (disk_file, &state.blk) {
                (Some(f), Some(st)) => Some(Arc::new(Mutex::new(
                    MmioTransport::<Block>::restore(
                        TransportArgs {
                            device: f,
                            mem: mem.clone(),
                            events: events.clone(),
                        },
                        st,
                    )
                    .map_err(SnapshotError::from)?,
                ))),
                _ => None,
            },
        };
        let vm = Vm::assemble(parts, mem, mem_size, true, control, devices);
        let abs = std::fs::canonicalize(&tail.dir).map_err(SnapshotError::io(&tail.dir))?;
        // Diffs continue the chain; disk writes are recorded from now on, so the next diff
        // can carry a disk delta.
        vm.continue_chain(ParentRef {
            dir: abs,
            id: tail.meta.id,
        });
        Ok(vm)
    }
}
