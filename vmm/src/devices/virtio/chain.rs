//! Validation of descriptor chains before any device touches the buffers they describe.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::DeviceError;
use crate::memory::GuestMem;

/// A validated buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A validated chain: readable buffers first, then writable ones, all inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index (for `add_used`).
    pub head: u16,
    /// Buffers in order.
    pub bufs: Vec<Buf>,
}

impl Chain {
    /// Total bytes in readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.bufs
            .iter()
            .filter(|b| !b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }
    /// Copies the readable bytes starting at byte `skip`, at most `max` of them.
    pub fn read(&self, mem: &GuestMem, skip: u64, max: usize) -> Result<Vec<u8>, DeviceError> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        for b in self.bufs.iter().filter(|b| !b.writable) {
            let (start, end) = (pos, pos + u64::from(b.len));
            pos = end;
            if end <= skip {
                continue;
            }
            let from = skip.saturating_sub(start);
            let want = ((end - start - from) as usize).min(max - out.len());
            let at = out.len();
            out.resize(at + want, 0);
            mem.read_slice(&mut out[at..], b.addr.unchecked_add(from))
                .map_err(|e| self.mem_err(e))?;
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }

    /// Writes `data` into the writable buffers starting at byte `skip` of the writable area.
    /// Returns how many bytes fitted.
    pub fn write(&self, mem: &GuestMem, skip: u64, data: &[u8]) -> Result<usize, DeviceError> {
        let mut done = 0usize;
        let mut pos = 0u64;
        for b in self.bufs.iter().filter(|b| b.writable) {
            let (start, end) = (pos, pos + u64::from(b.len));
            pos = end;
            if end <= skip || done == data.len() {
                continue;
            }
            let from = skip.saturating_sub(start);
            let n = ((end - start - from) as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], b.addr.unchecked_add(from))
                .map_err(|e| self.mem_err(e))?;
            done += n;
        }
        Ok(done)
    }

    fn mem_err(&self, e: vm_memory::GuestMemoryError) -> DeviceError {
        DeviceError::Malformed {
            head: self.head,
            why: format!("guest memory access failed: {e}"),
        }
    }

    /// Total bytes in writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.bufs
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }
}

/// Walks `chain` and checks every descriptor. `queue_size` bounds the length of the chain.
pub fn validate(
    chain: DescriptorChain<&GuestMem>,
    mem: &GuestMem,
    queue_size: u16,
) -> Result<Chain, DeviceError> {
    let head = chain.head_index();
    let mut bufs = Vec::new();
    let mut last: Option<Descriptor> = None;
    let mut seen_writable = false;
    for desc in chain {
        if desc.refers_to_indirect_table() {
            return Err(DeviceError::Direction {
                head,
                why: "indirect descriptors were not negotiated",
            });
        }
        let writable = desc.is_write_only();
        if seen_writable && !writable {
            return Err(DeviceError::Direction {
                head,
                why: "a readable buffer follows a writable one",
            });
        }
        seen_writable |= writable;
        let len = desc.len();
        let ok = GuestMemoryBackend::check_range(mem, desc.addr(), len as usize);
        if !ok {
            return Err(DeviceError::OutOfRange {
                index: bufs.len() as u16,
                addr: desc.addr().0,
                len,
            });
        }
        bufs.push(Buf {
            addr: desc.addr(),
            len,
            writable,
        });
        last = Some(desc);
        if bufs.len() > usize::from(queue_size) {
            break;
        }
    }
    // The iterator stops silently after `queue_size` descriptors; a chain that still wants to
    // go on is a loop.
    if bufs.len() >= usize::from(queue_size) && last.is_some_and(|d| d.has_next()) {
        return Err(DeviceError::Loop {
            head,
            size: queue_size,
        });
    }
    Ok(Chain { head, bufs })
}
