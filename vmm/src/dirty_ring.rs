//! KVM's dirty ring as the harvest source (issue 12): `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (or
//! `KVM_CAP_DIRTY_LOG_RING`), where KVM has it and the VM's owner asks for it ([`prefer`]).
//!
//! With the bitmap (`crate::dirty_log`) a harvest asks KVM for a bitmap of all of guest RAM and
//! clears it: its cost grows with the guest (2 GiB: 1.3 ms at 1,000 dirty pages on this host).
//! With the ring, KVM appends the guest frame of every page the vCPU dirties to a per-vCPU
//! ring shared with us (`mmap` of the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET`); a harvest reads
//! the entries written since the last one, marks them collected, and one
//! `KVM_RESET_DIRTY_RINGS` write-protects those pages again: its cost grows with the pages
//! dirtied, not with the guest. What it gives up: hot pages (every collected page is
//! protected again, so a page written in every epoch faults in every epoch).
//!
//! A ring that fills before the next harvest makes the vCPU exit (`KVM_EXIT_DIRTY_RING_FULL`);
//! the entries are then collected into [`DirtyRing`]'s pending bitmap (the next harvest
//! returns them too) and the vCPU runs on. The ring is chosen when the VM is created and
//! reported by `Vm::dirty_source`.
//!
//! **Never reset from the vCPU's own thread.** On this host (nested PVM, kernel 6.18),
//! `KVM_RESET_DIRTY_RINGS` issued by the vCPU's thread right after its ring-full exit left
//! some collected pages writable: later writes to them made no ring entry, and a backup kept
//! their old content (runs of 1 to 30 consecutive pages, 60-70 passes of the guest's churn
//! behind; the same with a 100 µs sleep before the reset, so not timing). Issued by another
//! thread, with everything else the same, no page was ever lost. So the ring-full collect
//! runs on a helper thread ([`Resetter`]) while the vCPU's thread waits for it; harvests run
//! on the capturing thread anyway.
//!
//! A harvest while the guest runs (a pre-copy pass) may miss pages still in the CPU's PML
//! buffer (flushed to the ring at the vCPU's next exit): they come with the next harvest. A
//! paused capture is complete — the pause makes the vCPU exit first.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::page_set::PageSet;
use crate::{Error, Result};

/// `KVM_EXIT_DIRTY_RING_FULL` (kvm-ioctls 0.25 reports it as `VcpuExit::Unsupported`).
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;
/// Entry flags.
const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;
/// The ring's size, bytes (65,536 entries of 16 bytes), or KVM's largest if smaller.
const RING_BYTES: u32 = 1 << 20;
static SIZE: AtomicU32 = AtomicU32::new(RING_BYTES);

static PREFER: AtomicBool = AtomicBool::new(false);

/// The smallest ring accepted, bytes: KVM refuses rings under (64 + 512 PML entries) × 16
/// bytes on Intel hosts with PML.
pub const MIN_BYTES: u32 = 16 << 10;

/// The size of the rings of VMs created from now on, bytes: a power of two of at least
/// [`MIN_BYTES`]; KVM's largest if smaller. A small ring fills between harvests (tests).
pub fn set_size(bytes: u32) -> Result<()> {
    if !bytes.is_power_of_two() || bytes < MIN_BYTES {
        return Err(Error::Host(format!(
            "dirty ring of {bytes} bytes: a power of two of at least {MIN_BYTES} is needed"
        )));
    }
    SIZE.store(bytes, Ordering::Relaxed);
    Ok(())
}

/// VMs created by this process from now on use the dirty ring where KVM has it (or not).
pub fn prefer(on: bool) {
    PREFER.store(on, Ordering::Relaxed);
}

/// Whether VMs created now use the ring where KVM has it.
pub fn preferred() -> bool {
    PREFER.load(Ordering::Relaxed)
}

/// Turns the ring on for `vm_fd` (before any vCPU exists); its size in bytes, or None where
/// KVM has no ring (the bitmap is used).
pub fn enable(vm_fd: &VmFd) -> Option<u32> {
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = vm_fd.check_extension_raw(cap.into());
        if max <= 0 {
            continue;
        }
        let bytes = SIZE.load(Ordering::Relaxed).min(max as u32);
        let mut c = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        c.args[0] = u64::from(bytes);
        match vm_fd.enable_cap(&c) {
            Ok(()) => return Some(bytes),
            Err(e) => tracing::warn!("KVM dirty ring (cap {cap}): {e}; using the bitmap"),
        }
    }
    None
}

/// One vCPU's dirty ring, and the pages collected from it between two harvests.
pub struct DirtyRing {
    inner: Arc<Mutex<Inner>>,
    /// Times the ring filled between two harvests (the vCPU exited to have it collected).
    full: std::sync::atomic::AtomicU64,
    /// The thread that collects a full ring for the vCPU (started at the first full exit).
    resetter: OnceLock<Resetter>,
}

/// A request to the resetter: where to send the result of one collect.
type Reply = mpsc::SyncSender<Result<u32>>;

/// A thread that collects the ring and resets it on behalf of the vCPU's thread (see the
/// module's note: the reset must not be issued by the vCPU's thread). It ends when the ring
/// is dropped (its channel closes).
struct Resetter {
    requests: mpsc::Sender<Reply>,
}

impl Resetter {
    fn start(inner: Arc<Mutex<Inner>>) -> Result<Resetter> {
        let (tx, rx) = mpsc::channel::<Reply>();
        std::thread::Builder::new()
            .name("dirty-ring".into())
            .spawn(move || {
                for reply in rx {
                    let r = lock(&inner).collect();
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| Error::Host(format!("starting the dirty ring's thread: {e}")))?;
        Ok(Resetter { requests: tx })
    }

    /// Collects the ring on the resetter's thread and waits for it.
    fn collect(&self) -> Result<u32> {
        let (tx, rx) = mpsc::sync_channel(1);
        let gone = || Error::Host("the dirty ring's thread is gone".into());
        self.requests.send(tx).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    gfns: *mut kvm_dirty_gfn,
    count: u32,
    /// Index of the next entry to read.
    fetch: u32,
    map_len: usize,
    /// A duplicate of the VM's fd (for `KVM_RESET_DIRTY_RINGS` from the resetter's thread).
    vm: OwnedFd,
    /// Pages collected and not yet harvested.
    pending: Collected,
    pages: u64,
    /// Entries collected and marked, but `KVM_RESET_DIRTY_RINGS` failed since: retried.
    unreset: bool,
    /// Entries of another slot or beyond guest RAM (none expected), counted.
    stray: u64,
}

// SAFETY: `gfns` points into a mapping this struct owns (unmapped on drop); it is only
// accessed under the mutex.
unsafe impl Send for Inner {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (`bytes` as enabled) for a guest of `pages` pages.
    pub fn map(vm_fd: &VmFd, vcpu: &VcpuFd, bytes: u32, pages: u64) -> Result<DirtyRing> {
        let page = crate::layout::PAGE_SIZE as i64;
        // SAFETY: a shared mapping of `bytes` of the vCPU fd at the offset KVM documents for
        // its dirty ring; the result is checked before use and unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Host(format!(
                "mapping the KVM dirty ring: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: a close-on-exec duplicate of an fd we hold (no child process inherits it);
        // the new fd is owned by the OwnedFd.
        let dup = unsafe { libc::fcntl(vm_fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(p, bytes as usize) };
            return Err(Error::Host("dup of the VM fd failed".into()));
        }
        Ok(DirtyRing {
            inner: Arc::new(Mutex::new(Inner {
                gfns: p.cast(),
                count: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
                fetch: 0,
                map_len: bytes as usize,
                // SAFETY: `dup` is a fresh fd nobody else owns.
                vm: unsafe { OwnedFd::from_raw_fd(dup) },
                pending: Collected::new(pages),
                pages,
                unreset: false,
                stray: 0,
            })),
            full: Default::default(),
            resetter: OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Collects the ring into the pending pages and has KVM protect them again, after the
    /// vCPU exited because the ring is full: on the resetter's thread, never the caller's
    /// (the vCPU's; see the module's note). Returns the entries collected.
    pub fn collect_full(&self) -> Result<u32> {
        self.full.fetch_add(1, Ordering::Relaxed);
        if self.resetter.get().is_none() {
            let r = Resetter::start(self.inner.clone())?;
            let _ = self.resetter.set(r);
        }
        match self.resetter.get() {
            Some(r) => r.collect(),
            None => Err(Error::Host("no dirty ring thread".into())),
        }
    }

    /// Times the ring filled between two harvests.
    pub fn full_count(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }

    /// The pages dirtied by the vCPU since the last harvest, collected and protected again.
    /// Its cost follows the pages dirtied, not guest RAM.
    pub fn harvest(&self) -> Result<PageSet> {
        let mut g = self.lock();
        g.collect()?;
        Ok(g.pending.take())
    }
}

/// Pages collected from a ring: a bit per page of the linear RAM image (made once; only the
/// `touched` words are ever non-zero), and which words those are, so that taking them costs
/// what was collected, not guest RAM.
#[derive(Debug)]
struct Collected {
    bits: Vec<u64>,
    /// The non-zero words of `bits`, in the order they were first set.
    touched: Vec<u32>,
}

impl Collected {
    fn new(pages: u64) -> Collected {
        Collected {
            bits: vec![0; pages.div_ceil(64) as usize],
            touched: Vec::new(),
        }
    }

    /// Adds page `p` (a page of the guest: below the `pages` it was made for).
    fn mark(&mut self, p: u64) {
        let w = (p / 64) as usize;
        if self.bits[w] == 0 {
            // (A u32 indexes the words of 2^38 pages: 1 PiB of guest.)
            debug_assert!(u32::try_from(w).is_ok());
            self.touched.push(w as u32);
        }
        self.bits[w] |= 1 << (p % 64);
    }

    /// The pages collected, as a set; none are left.
    fn take(&mut self) -> PageSet {
        self.touched.sort_unstable();
        let mut out = PageSet::with_capacity(self.touched.len());
        for &w in &self.touched {
            out.push_word(u64::from(w), std::mem::take(&mut self.bits[w as usize]));
        }
        self.touched.clear();
        out
    }
}

impl Inner {
    fn collect(&mut self) -> Result<u32> {
        let mut n = 0;
        while n < self.count {
            let i = (self.fetch % self.count) as usize;
            // SAFETY: `i < count`, so the entry lies inside the mapping. No reference to the
            // entry is made while KVM may write it: `flags` (an aligned u32 at its start) is
            // read through an atomic view with acquire, and the rest only after it says DIRTY.
            let e = unsafe { self.gfns.add(i) };
            // SAFETY: as above.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
                break;
            }
            // SAFETY: as above; KVM does not write an entry it published until it is reset.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*e).slot).read_volatile(),
                    std::ptr::addr_of!((*e).offset).read_volatile(),
                )
            };
            // Slots 0 and 1 are guest RAM (below the MMIO hole, and beyond it at 4 GiB).
            match page_of(slot, offset).filter(|&p| p < self.pages) {
                Some(p) => self.pending.mark(p),
                None => self.stray += 1,
            }
            flags.store(F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        // (Also when nothing new was found but an earlier reset failed: a vCPU whose ring is
        // full does not run again until it is reset.)
        if n > 0 || self.unreset {
            self.unreset = true;
            // SAFETY: an argument-less ioctl on our duplicate of the VM fd.
            let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
            if r < 0 {
                return Err(Error::Host(format!(
                    "KVM_RESET_DIRTY_RINGS: {}",
                    std::io::Error::last_os_error()
                )));
            }
            self.unreset = false;
        }
        Ok(n)
    }
}

/// The page of the linear RAM image that page `offset` of KVM memory slot `slot` is.
fn page_of(slot: u32, offset: u64) -> Option<u64> {
    let low_pages = crate::layout::MMIO_BASE / crate::layout::PAGE_SIZE;
    match slot {
        0 if offset < low_pages => Some(offset),
        1 => offset.checked_add(low_pages),
        _ => None,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `DirtyRing::map`, used by nothing else.
        unsafe { libc::munmap(self.gfns.cast(), self.map_len) };
    }
}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        write!(f, "DirtyRing({} entries, fetch {})", g.count, g.fetch)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn collected_pages_are_taken_in_order_and_only_once() {
        let mut c = super::Collected::new(1 << 20);
        for p in [900_000, 5, 7, 900_001, 5, 64] {
            c.mark(p);
        }
        assert_eq!(c.take().pages(u64::MAX), vec![5, 7, 64, 900_000, 900_001]);
        assert!(c.take().is_empty(), "taken");
        assert!(c.bits.iter().all(|&w| w == 0) && c.touched.is_empty());
        c.mark(3);
        assert_eq!(c.take().pages(u64::MAX), vec![3]);
    }

    #[test]
    fn ring_entries_of_both_slots_map_to_the_linear_image() {
        let low = crate::layout::MMIO_BASE / crate::layout::PAGE_SIZE;
        assert_eq!(super::page_of(0, 5), Some(5));
        assert_eq!(super::page_of(0, low), None);
        assert_eq!(super::page_of(1, 0), Some(low));
        assert_eq!(super::page_of(1, u64::MAX), None);
        assert_eq!(super::page_of(2, 0), None);
    }
}
