//! The vmatrix platform device: clock, wait, config string, exit.

use alloc::string::String;
use alloc::vec;

use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicBool, AtomicU64};

use crate::io;
use crate::layout::{CLOCK_PAGE, PLATFORM};

const MAGIC: u32 = 0x504d_5856;

/// True if the platform device answers with its magic.
pub fn present() -> bool {
    io::read32(PLATFORM) == MAGIC
}
/// The device's register layout version (2: it has the console register).
pub fn version() -> u32 {
    io::read32(PLATFORM + 0x04)
}
/// Writes `bytes` (at most 4 KiB) to the console in one VM exit (version 2).
pub fn console(bytes: &[u8]) {
    let len = bytes.len().min(4096) as u64;
    io::write64(PLATFORM + 0x50, bytes.as_ptr() as u64 | (len << 48));
}
/// Guest monotonic clock in ns: from the clock page and the TSC when the VMM anchored one
/// (no VM exit, as a Linux guest reads kvmclock), else the clock register. Never backwards.
pub fn clock_ns() -> u64 {
    let t = pv_clock_ns().unwrap_or_else(register_clock_ns);
    // (One vCPU: a plain load and store is enough.)
    let last = LAST_NS.load(Relaxed);
    if t > last {
        LAST_NS.store(t, Relaxed);
        return t;
    }
    last
}

/// The clock register (one VM exit).
pub fn register_clock_ns() -> u64 {
    io::read64(PLATFORM + 0x08)
}

const CLOCK_MAGIC: u32 = 0x4b4c_4356;
const CLOCK_VERSION: u32 = 1;
static LAST_NS: AtomicU64 = AtomicU64::new(0);
/// The anchor (its TSC base) last checked against the register, and whether it agreed.
static CHECKED_BASE: AtomicU64 = AtomicU64::new(0);
static CHECKED_OK: AtomicBool = AtomicBool::new(false);

/// An anchor of the clock page (`vmm/src/pvclock.rs`).
#[derive(Clone, Copy)]
struct Anchor {
    mult: u64,
    tsc_base: u64,
    ns_base: u64,
}

impl Anchor {
    /// The page's anchor, if the VMM wrote one.
    fn read() -> Option<Anchor> {
        let at = |o: u64| -> u64 {
            // SAFETY: CLOCK_PAGE is an aligned 32-byte record in identity-mapped guest RAM
            // below the image, written by the VMM only while this vCPU does not run.
            unsafe { core::ptr::read_volatile((CLOCK_PAGE + o) as *const u64) }
        };
        let head = at(0);
        if head as u32 != CLOCK_MAGIC || (head >> 32) as u32 != CLOCK_VERSION {
            return None;
        }
        Some(Anchor {
            mult: at(8),
            tsc_base: at(16),
            ns_base: at(24),
        })
    }

    fn now(&self) -> u64 {
        let ticks = tsc().saturating_sub(self.tsc_base);
        let ns = (u128::from(ticks) * u128::from(self.mult)) >> 32;
        self.ns_base
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Checks a new anchor against the clock register once (one exit), before its first use:
    /// one that disagrees by more than 1 ms is not used.
    fn check(&self) -> bool {
        let before = self.now();
        let reg = register_clock_ns();
        let after = self.now();
        let ok = reg.saturating_add(1_000_000) >= before && reg <= after.saturating_add(1_000_000);
        if !ok {
            crate::println!(
                "vmatrix-guest: the clock page disagrees with the clock register ({} vs {} ns): not used",
                before,
                reg
            );
        }
        CHECKED_BASE.store(self.tsc_base, Relaxed);
        CHECKED_OK.store(ok, Relaxed);
        ok
    }
}

/// The clock from the clock page, if the VMM anchored it and the anchor agreed with the
/// register when first used (each VMM process writes a new anchor).
pub fn pv_clock_ns() -> Option<u64> {
    let a = Anchor::read()?;
    let ok = match CHECKED_BASE.load(Relaxed) == a.tsc_base {
        true => CHECKED_OK.load(Relaxed),
        false => a.check(),
    };
    ok.then(|| a.now())
}

/// Where the time comes from: "page" (no exit) or "register".
pub fn clock_source() -> &'static str {
    match pv_clock_ns().is_some() {
        true => "page",
        false => "register",
    }
}
/// Blocks in the VMM until a device event or `ns` nanoseconds.
pub fn wait(ns: u64) {
    io::write64(PLATFORM + 0x10, ns);
}
/// Generation id.
pub fn generation() -> u64 {
    io::read64(PLATFORM + 0x18)
}
/// The generation word in memory (no VM exit): the VMM changes it before a clone runs, or
/// while a standby clone runs (its config and MAC changed first).
pub fn generation_word() -> u64 {
    // SAFETY: GENID is an aligned u64 in identity-mapped guest RAM below the image, written
    // only by the VMM (before the vCPU runs, or with one atomic store while it runs); an
    // aligned volatile 8-byte read cannot tear on x86 and sees the VMM's write.
    unsafe { core::ptr::read_volatile(crate::layout::GENID as *const u64) }
}
/// Incarnation: changes whenever the VM runs in a new VMM process (restore, failover).
pub fn incarnation() -> u64 {
    io::read64(PLATFORM + 0x48)
}
/// The TSC (PVM passes the raw host counter): the clock page's time base, and entropy for
/// seeds.
pub fn tsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed in ring 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}
/// RAM size in bytes.
pub fn mem_size() -> u64 {
    io::read64(PLATFORM + 0x20)
}
/// The config string.
pub fn config() -> String {
    let len = io::read64(PLATFORM + 0x28).min(4096) as usize;
    let buf = vec![0u8; len];
    io::write64(PLATFORM + 0x30, buf.as_ptr() as u64);
    // The VMM wrote the bytes behind the compiler's back.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // SAFETY: reading our own buffer after the device filled it.
    let bytes: alloc::vec::Vec<u8> = buf
        .iter()
        .map(|b| unsafe { core::ptr::read_volatile(b) })
        .collect();
    String::from_utf8(bytes).unwrap_or_default()
}
/// Stops the VM with `code`.
pub fn exit(code: u64) -> ! {
    loop {
        io::write64(PLATFORM + 0x38, code);
    }
}
