//! The vmatrix platform device (MMIO, one 4 KiB window).
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | R u32 | magic `0x504d5856` ("VXMP") |
//! | 0x04 | R u32 | version (2; 1 had no console register) |
//! | 0x08 | R u64 | monotonic guest clock in ns (part of VM state; does not jump on restore; also readable without an exit from the clock page, `crate::pvclock`) |
//! | 0x10 | W u64 | wait until a device event or N ns (the vCPU blocks in the VMM) |
//! | 0x10 | R u64 | outcome of the last wait: 0 timeout, 1 event, 2 spurious (VMM pause) |
//! | 0x18 | R u64 | generation id (changes in a clone) |
//! | 0x20 | R u64 | guest RAM size in bytes |
//! | 0x28 | R u64 | length of the config string |
//! | 0x30 | W u64 | copy the config string to this guest physical address |
//! | 0x38 | W u64 | the guest stops with this exit code (0 = clean, else a panic) |
//! | 0x40 | R u64 | device event counter (diagnostics) |
//! | 0x48 | R u64 | incarnation: differs in every VMM process that runs this VM (boot, restore, failover); not part of the VM state |
//! | 0x50 | W u64 | console: write `v >> 48` bytes (at most 4 KiB) from guest physical address `v & (2^48 - 1)` to the console, in one exit |
//!
//! The console register exists because the UART costs one VM exit per byte (`rep outsb` is
//! emulated per byte under nested PVM: ~60–80 µs a byte measured, 5–7 ms for one 85-byte line —
//! which a standby clone printed before its first answer). A guest uses it when the version is
//! 2 or more and falls back to the UART otherwise; both reach the same console.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::bus::{le_value, put_le_value, BusDevice};
use crate::devices::serial::ConsoleOut;
use crate::events::{GuestEvents, WaitOutcome};
use crate::memory::GuestMem;
use crate::pvclock::{TscClock, CLOCK_PAGE_ADDR, CLOCK_PAGE_LEN};
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
    /// Console write (address and length packed).
    pub const CONSOLE: u64 = 0x50;
}

/// Register layout version.
pub const VERSION: u64 = 2;
/// Most bytes one console write takes.
pub const CONSOLE_MAX: u64 = 4096;

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
    /// The clock as a function of the TSC, once anchored ([`Platform::anchor_clock`]): then
    /// the guest reads it from its clock page (`crate::pvclock`) and this device agrees.
    pub(super) tsc: Option<TscClock>,
    pub(super) seen_seq: u64,
    pub(super) last_wait: WaitOutcome,
    pub(super) incarnation: u64,
    /// Where console writes go (the serial port's console; none: dropped).
    pub(super) console: Option<ConsoleOut>,
    /// Console writes from outside guest memory (logged the first few times).
    pub(super) bad_console: u64,
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
            tsc: None,
            last_wait: WaitOutcome::Timeout,
            incarnation: new_incarnation(),
            console: None,
            bad_console: 0,
        }
    }

    /// Sends the guest's console writes to `console` (the serial port's).
    pub fn set_console(&mut self, console: ConsoleOut) {
        self.console = Some(console);
    }

    /// Writes the guest's bytes at `v`'s address to the console (see the module docs).
    fn console_write(&mut self, v: u64) {
        let (addr, len) = (v & ((1 << 48) - 1), (v >> 48).min(CONSOLE_MAX));
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.mem.read_slice(&mut buf, GuestAddress(addr)) {
            // (The guest cannot flood the log: the first few only.)
            self.bad_console += 1;
            if self.bad_console <= 8 {
                tracing::warn!("platform: console write from {addr:#x} ({len} bytes) failed: {e}");
            }
            return;
        }
        if let Some(c) = self.console.as_mut() {
            let _ = std::io::Write::write_all(c, &buf);
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
        match &self.tsc {
            Some(c) => c.now(),
            None => self
                .clock_base_ns
                .saturating_add(self.clock_origin.elapsed().as_nanos() as u64),
        }
    }

    /// Anchors the guest clock, at the time it reads now, to this host's TSC (`probe`: its
    /// rate and the guest's offset, `crate::pvclock::probe`) and writes the guest's clock page;
    /// without a probe, clears the page (the guest reads the register). Only while the guest
    /// does not run: the VM's vCPU thread calls it before the guest's first instruction.
    pub fn anchor_clock(&mut self, probe: Option<(u32, i64)>) {
        let now = self.clock_ns();
        let clock = probe.and_then(|(khz, offset)| TscClock::anchor(now, khz, offset));
        let page = clock.map_or([0u8; CLOCK_PAGE_LEN], |c| c.page());
        match self.mem.write_slice(&page, GuestAddress(CLOCK_PAGE_ADDR)) {
            Ok(()) => self.tsc = clock,
            Err(e) => {
                tracing::warn!("platform: cannot write the clock page: {e}");
                self.tsc = None;
            }
        }
        if self.tsc.is_none() {
            (self.clock_origin, self.clock_base_ns) = (Instant::now(), now);
        }
    }

    /// Whether the guest's clock page is anchored (it reads the time without an exit).
    pub fn clock_anchored(&self) -> bool {
        self.tsc.is_some()
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
            regs::VERSION => VERSION,
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
            regs::CONSOLE => self.console_write(v),
            _ => tracing::debug!("platform: write to unknown register {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// A console sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn platform() -> (Platform, GuestMem, Sink) {
        let events = Arc::new(GuestEvents::default());
        let control = Arc::new(Control::new(events.clone()));
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut p = Platform::new(events, control, mem.clone(), 1 << 20, Vec::new(), 1);
        let sink = Sink::default();
        p.set_console(ConsoleOut::new(Box::new(sink.clone())));
        (p, mem, sink)
    }

    fn console(p: &mut Platform, addr: u64, len: u64) {
        p.write(regs::CONSOLE, &(addr | (len << 48)).to_le_bytes());
    }

    #[test]
    fn a_console_line_is_one_write_and_bad_writes_are_dropped() {
        let (mut p, mem, sink) = platform();
        let mut v = [0u8; 4];
        p.read(regs::VERSION, &mut v);
        assert_eq!(u32::from_le_bytes(v), 2, "the guest looks for version 2");
        mem.write_slice(b"hello, console\n", GuestAddress(0x1000))
            .unwrap();
        console(&mut p, 0x1000, 15);
        assert_eq!(&sink.0.lock().unwrap()[..], b"hello, console\n");
        // Outside guest memory, or straddling its end: dropped (logged), nothing written.
        console(&mut p, 1 << 40, 8);
        console(&mut p, (1 << 20) - 4, 8);
        // Longer than 4 KiB: the first 4 KiB (a line is flushed at 4 KiB without a newline).
        mem.write_slice(&[b'x'; 8192], GuestAddress(0x2000))
            .unwrap();
        console(&mut p, 0x2000, 0xffff);
        assert_eq!(sink.0.lock().unwrap().len(), 15 + 4096);
    }
}
