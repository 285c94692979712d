//! # vmm — one KVM virtual machine
//!
//! This crate owns everything that touches KVM for one VM: guest memory (vm-memory with a
//! [`DeviceBitmap`](device_bitmap::DeviceBitmap) so every device write is tracked), the
//! loader for the ring-3 test guest, the x86-64 boot state (page tables, GDT, TSS with an I/O
//! permission bitmap), the vCPU thread and its exit dispatch, and the devices (serial console,
//! the vmatrix platform device, virtio-mmio net and block).
//!
//! All `unsafe` code of the workspace lives in this crate; every block carries a `// SAFETY:`
//! comment. See `docs/design.md` for how exits flow through the bus to the devices.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod affinity;
pub mod boot;
pub mod bus;
pub mod device_bitmap;
pub mod devices;
pub mod dirty;
pub mod dirty_log;
pub mod dirty_ring;
pub mod error;
pub mod events;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod page_set;
pub mod persist;
pub mod pvclock;
pub mod rt;
pub mod run_delay;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use error::{Error, Result};
pub use vm::{
    CaptureKind, Changes, CloneDisk, CloneParts, DiskCapture, EpochCapture, RestoreConfig,
    RestoreParts, SnapshotKind, SnapshotStats, StartGate, Vm, VmConfig, VmExit,
};
