//! Building a VM from a snapshot (or a chain of diffs ending at one).
//!
//! Order: verify the whole chain (every CRC) → materialize the working disk → map the base
//! memory copy-on-write and apply the diffs → create KVM objects → restore vCPU and devices. No
//! vCPU runs and nothing is written outside the new working disk until every check passed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{create_kvm_vm, lock, open_disk, open_kvm, Devices, Vm};
use crate::devices::platform::{Platform, PlatformArgs};
use crate::devices::serial::{ConsoleOut, Serial};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::persist::TransportArgs;
use crate::dirty;
use crate::events::GuestEvents;
use crate::persist::Persist;
use crate::snapshot::{
    self, disk, memory, DiskPart, ParentRef, SnapshotError, DELTA_FILE, DISK_FILE, MEMORY_FILE,
};
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

        // Disk: the last full copy in the chain, then every later delta.
        let disk_file = match &state.blk {
            Some(_) => {
                let base = chain
                    .iter()
                    .rposition(|l| matches!(l.meta.disk, Some(DiskPart::Full { .. })))
                    .ok_or_else(|| {
                        Error::Snapshot(SnapshotError::Chain("no full disk in the chain".into()))
                    })?;
                let Some(DiskPart::Full { len, .. }) = chain[base].meta.disk else {
                    unreachable!("rposition matched a full disk");
                };
                let mut deltas = Vec::new();
                for l in &chain[base + 1..] {
                    if let Some(p) = &l.meta.disk {
                        deltas.push(disk::read_delta(&l.dir.join(DELTA_FILE), p)?);
                    }
                }
                let out = cfg
                    .disk
                    .clone()
                    .unwrap_or_else(|| cfg.dir.join("disk-live.img"));
                disk::materialize(&chain[base].dir.join(DISK_FILE), len, &deltas, &out)?;
                Some(open_disk(&out)?)
            }
            None => None,
        };

        // Memory: base image mapped copy-on-write, diffs applied on top.
        let mem = memory::map_full(&chain[0].dir.join(MEMORY_FILE), mem_size)?;
        for l in &chain[1..] {
            if let memory::MemoryPart::Diff { pages, .. } = &l.meta.memory {
                memory::apply_diff(&mem, &l.dir.join(MEMORY_FILE), pages)?;
            }
        }
        dirty::reset_device_bitmap(&mem);

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
                (Some(f), Some(st)) => {
                    let mut t = MmioTransport::<Block>::restore(
                        TransportArgs {
                            device: f,
                            mem: mem.clone(),
                            events: events.clone(),
                        },
                        st,
                    )
                    .map_err(SnapshotError::from)?;
                    // Record writes from now on, so the next diff can carry a disk delta.
                    t.with_device_unchecked(|d| d.take_writes());
                    Some(Arc::new(Mutex::new(t)))
                }
                _ => None,
            },
        };
        let vm = Vm::assemble(parts, mem, mem_size, true, control, devices);
        let abs = std::fs::canonicalize(&tail.dir).map_err(SnapshotError::io(&tail.dir))?;
        *lock(&vm.last_snapshot) = Some(ParentRef {
            dir: abs,
            id: tail.meta.id,
        });
        Ok(vm)
    }
}
