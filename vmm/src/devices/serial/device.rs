//! Serial device: port I/O at 0x3f8..0x400 to a vm-superio 16550A whose output goes to a
//! line-buffered sink (stdout or a log file).
//!
//! The guest writes its console with `rep outsb`, which KVM delivers as one exit carrying the
//! whole buffer; each byte is fed to the UART model in turn.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;

use crate::bus::BusDevice;

/// No interrupt line: the ring-3 guest polls the line status register.
#[derive(Debug, Default)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Line-buffered console sink shared with the VMM (so the VMM can also read what the guest
/// printed, e.g. to find its readiness line).
#[derive(Clone)]
pub struct ConsoleOut {
    inner: Arc<Mutex<ConsoleInner>>,
}

struct ConsoleInner {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    bytes: u64,
}

impl ConsoleOut {
    /// Console output written to `sink` a line at a time.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            inner: Arc::new(Mutex::new(ConsoleInner {
                sink,
                line: Vec::new(),
                bytes: 0,
            })),
        }
    }

    /// Total bytes the guest has written.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }

    /// Writes out any partial line.
    pub fn flush_partial(&self) {
        if let Ok(mut i) = self.inner.lock() {
            let line = std::mem::take(&mut i.line);
            let _ = i.sink.write_all(&line);
            let _ = i.sink.flush();
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.bytes += buf.len() as u64;
        for &b in buf {
            i.line.push(b);
            if b == b'\n' || i.line.len() >= 4096 {
                let line = std::mem::take(&mut i.line);
                i.sink.write_all(&line)?;
                i.sink.flush()?;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Flushed per line; a flush per byte from the UART model would cost a syscall each.
        Ok(())
    }
}

/// The COM1 device on the port bus.
pub struct Serial {
    pub(super) uart: vm_superio::Serial<NoIrq, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl Serial {
    /// A UART writing to `out`.
    pub fn new(out: ConsoleOut) -> Self {
        Serial {
            uart: vm_superio::Serial::new(NoIrq, out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.uart.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for &b in data {
            // Errors from the sink are not the guest's problem; the byte is dropped.
            let _ = self.uart.write(offset as u8, b);
        }
    }
}
