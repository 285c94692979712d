//! The vmatrix platform device (MMIO, one 4 KiB window).
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | R u32 | magic `0x504d5856` ("VXMP") |
//! | 0x04 | R u32 | version (1) |
//! | 0x08 | R u64 | monotonic guest clock in ns (part of VM state; does not jump on restore) |
//! | 0x10 | W u64 | wait until a device event or N ns (the vCPU blocks in the VMM) |
//! | 0x10 | R u64 | outcome of the last wait: 0 timeout, 1 event, 2 spurious (VMM pause) |
//! | 0x18 | R u64 | generation id (changes in a clone) |
//! | 0x20 | R u64 | guest RAM size in bytes |
//! | 0x28 | R u64 | length of the config string |
//! | 0x30 | W u64 | copy the config string to this guest physical address |
//! | 0x38 | W u64 | the guest stops with this exit code (0 = clean, else a panic) |
//! | 0x40 | R u64 | device event counter (diagnostics) |
//! | 0x48 | R u64 | incarnation: differs in every VMM process that runs this VM (boot, restore, failover); not part of the VM state |

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::bus::{le_value, put_le_value, BusDevice};
use crate::events::{GuestEvents, WaitOutcome};
use crate::memory::GuestMem;
use crate::vcpu::Control;

/// Magic value at offset 0.
pub const PLATFORM_MAGIC: u32 = 0x504d_5856;
/// Longest single wait the VMM honours; the guest simply waits again.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Register offsets.
pub mod regs {
    /// Magic.
    pub const MAGIC: u64 = 0x00;
    /// Version.
    pub const VERSION: u64 = 0x04;
    /// Clock.
    pub const CLOCK_NS: u64 = 0x08;
    /// Wait / wait outcome.
    pub const WAIT_NS: u64 = 0x10;
    /// Generation id.
    pub const GENERATION: u64 = 0x18;
    /// Memory size.
    pub const MEM_SIZE: u64 = 0x20;
    /// Config length.
    pub const CONFIG_LEN: u64 = 0x28;
    /// Config copy.
    pub const CONFIG_COPY: u64 = 0x30;
    /// Guest exit.
    pub const EXIT: u64 = 0x38;
    /// Event counter.
    pub const EVENTS: u64 = 0x40;
    /// Incarnation.
    pub const INCARNATION: u64 = 0x48;
}

/// A value unique to this VMM process (and this device), never 0: the guest compares it with
/// the one it saw before to notice it was restored elsewhere (and, e.g., re-announce its
/// addresses to the network).
pub fn new_incarnation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = t ^ (u64::from(std::process::id()) << 32) ^ COUNT.fetch_add(1, Ordering::Relaxed);
    mixed.max(1)
}

/// The platform device.
pub struct Platform {
    pub(super) events: Arc<GuestEvents>,
    pub(super) control: Arc<Control>,
    pub(super) mem: GuestMem,
    pub(super) config: Vec<u8>,
    pub(super) generation: u64,
    pub(super) mem_size: u64,
    /// Host instant at which the guest clock read `clock_base_ns`.
    pub(super) clock_origin: Instant,
    pub(super) clock_base_ns: u64,
    pub(super) seen_seq: u64,
    pub(super) last_wait: WaitOutcome,
    pub(super) incarnation: u64,
}

impl Platform {
    /// A platform device for a fresh VM whose clock starts at zero.
    pub fn new(
        events: Arc<GuestEvents>,
        control: Arc<Control>,
        mem: GuestMem,
        mem_size: u64,
        config: Vec<u8>,
        generation: u64,
    ) -> Self {
        Platform {
            seen_seq: events.seq(),
            events,
            control,
            mem,
            config,
            generation,
            mem_size,
            clock_origin: Instant::now(),
            clock_base_ns: 0,
            last_wait: WaitOutcome::Timeout,
            incarnation: new_incarnation(),
        }
    }

    /// The generation id the guest reads.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A standby clone's new config string (what the guest reads from now on).
    pub fn set_config(&mut self, config: Vec<u8>) {
        self.config = config;
    }

    /// A standby clone's new generation id; a guest waiting in the VMM is woken to look.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.events.signal();
    }

    /// Guest clock now, in ns.
    pub fn clock_ns(&self) -> u64 {
        self.clock_base_ns
            .saturating_add(self.clock_origin.elapsed().as_nanos() as u64)
    }

    fn wait(&mut self, ns: u64) {
        let timeout = Duration::from_nanos(ns).min(MAX_WAIT);
        let (outcome, seq) = self.events.wait(self.seen_seq, timeout);
        self.seen_seq = seq;
        self.last_wait = outcome;
    }
}

impl BusDevice for Platform {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            regs::MAGIC => u64::from(PLATFORM_MAGIC),
            regs::VERSION => 1,
            regs::CLOCK_NS => self.clock_ns(),
            regs::WAIT_NS => self.last_wait as u64,
            regs::GENERATION => self.generation,
            regs::MEM_SIZE => self.mem_size,
            regs::CONFIG_LEN => self.config.len() as u64,
            regs::EVENTS => self.events.seq(),
            regs::INCARNATION => self.incarnation,
            _ => 0,
        };
        put_le_value(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        match offset {
            regs::WAIT_NS => self.wait(v),
            regs::CONFIG_COPY => {
                if let Err(e) = self.mem.write_slice(&self.config, GuestAddress(v)) {
                    tracing::warn!("platform: config copy to {v:#x} failed: {e}");
                }
            }
            regs::EXIT => self.control.request_guest_exit(v),
            _ => tracing::debug!("platform: write to unknown register {offset:#x}"),
        }
    }
}
