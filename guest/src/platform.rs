//! The vmatrix platform device: clock, wait, config string, exit.

use alloc::string::String;
use alloc::vec;

use crate::io;
use crate::layout::PLATFORM;

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
/// Guest monotonic clock in ns.
pub fn clock_ns() -> u64 {
    io::read64(PLATFORM + 0x08)
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
/// Host TSC (PVM passes the raw host counter): entropy for seeds, never a clock.
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
