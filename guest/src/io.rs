//! Raw device access: MMIO loads/stores (each a VM exit) and the console (one platform-device
//! write per line, or COM1 with one `rep outsb` per line on an older VMM).

use core::fmt;

// Device accesses are inline asm without `nomem`: to the compiler each one may read or write
// any memory whose address escaped (e.g. a buffer handed to a device), so DMA-style writes by
// the VMM are never optimised around.

/// 32-bit MMIO read.
pub fn read32(addr: u64) -> u32 {
    let v: u32;
    // SAFETY: `addr` is a device register in the identity-mapped MMIO hole.
    unsafe {
        core::arch::asm!("mov {0:e}, dword ptr [{1}]", out(reg) v, in(reg) addr, options(nostack))
    };
    v
}
/// 32-bit MMIO write.
pub fn write32(addr: u64, v: u32) {
    // SAFETY: as `read32`.
    unsafe {
        core::arch::asm!("mov dword ptr [{1}], {0:e}", in(reg) v, in(reg) addr, options(nostack))
    };
}
/// 64-bit MMIO read.
pub fn read64(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: as `read32`.
    unsafe {
        core::arch::asm!("mov {0}, qword ptr [{1}]", out(reg) v, in(reg) addr, options(nostack))
    };
    v
}
/// 64-bit MMIO write.
pub fn write64(addr: u64, v: u64) {
    // SAFETY: as `read32`.
    unsafe {
        core::arch::asm!("mov qword ptr [{1}], {0}", in(reg) v, in(reg) addr, options(nostack))
    };
}
/// 8-bit MMIO read.
pub fn read8(addr: u64) -> u8 {
    let v: u8;
    // SAFETY: as `read32`.
    unsafe {
        core::arch::asm!("mov {0}, byte ptr [{1}]", out(reg_byte) v, in(reg) addr, options(nostack))
    };
    v
}

/// Port-I/O byte read.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the TSS I/O bitmap opens every port to ring 3; reading a UART register has no
    // effect on memory.
    unsafe { core::arch::asm!("in al, dx", out("al") v, in("dx") port, options(nostack, nomem)) };
    v
}

/// How the console is written: 0 not known yet, 1 the UART, 2 the platform device's console
/// register.
static CONSOLE_WAY: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Forgets how the console is written (a new VMM process may be an older one: asked again
/// at the next write).
pub fn console_reprobe() {
    CONSOLE_WAY.store(0, core::sync::atomic::Ordering::Relaxed);
}

/// Writes `buf` to the console: through the platform device's console register (one VM exit
/// per 4 KiB) where the VMM has it (platform version 2), else through the serial port with one
/// string-I/O instruction — which nested PVM emulates a byte at a time (~60–80 µs each).
pub fn console_write(buf: &[u8]) {
    use core::sync::atomic::Ordering;
    if buf.is_empty() {
        return;
    }
    let way = match CONSOLE_WAY.load(Ordering::Relaxed) {
        0 => {
            let w = if crate::platform::present() && crate::platform::version() >= 2 {
                2
            } else {
                1
            };
            CONSOLE_WAY.store(w, Ordering::Relaxed);
            w
        }
        w => w,
    };
    if way == 2 {
        for chunk in buf.chunks(4096) {
            crate::platform::console(chunk);
        }
        return;
    }
    // SAFETY: the TSS I/O bitmap opens COM1 to ring 3; rsi/rcx describe `buf`.
    unsafe {
        core::arch::asm!("rep outsb", in("dx") crate::layout::SERIAL_PORT,
            inout("rsi") buf.as_ptr() => _, inout("rcx") buf.len() => _,
            options(nostack, preserves_flags, readonly));
    }
}

/// A line buffer that flushes to the console.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    /// Empty buffer.
    pub const fn new() -> Self {
        Console {
            buf: [0; 256],
            len: 0,
        }
    }
    /// Sends what is buffered.
    pub fn flush(&mut self) {
        console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut c = $crate::io::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!($($arg)*));
        c.flush();
    }};
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut c = $crate::io::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut c, "\n");
        c.flush();
    }};
}
