//! What a checkpoint's pause allocates (issue 12: "no allocation inside the pause"), counted by
//! a global allocator around real captures on real KVM: it must follow the pages the epoch
//! dirtied, never the guest's size. Before the harvests became page sets (`vmm::page_set`) each
//! capture of a 4 GiB guest allocated several bitmaps of the whole guest (128 KiB each: KVM's
//! dirty log per slot, their concatenation, the hot-page plan, the devices' bitmap, the
//! union); a 256 MiB and a 4 GiB guest dirtying the same 64 pages per epoch must now allocate
//! about the same, with KVM's bitmap and with its dirty ring as the source.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::vm::vm_sized;
use vm_memory::{Bytes, GuestAddress};
use vmm::CaptureKind;

/// Counts every allocation of the process (bytes asked for; a reallocation counts its new
/// size), then hands it to the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the counters are atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller's new size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Where the guest's pages start, and how many it writes round and round.
const BASE: u32 = 0x40_0000;
const PAGES: u32 = 64;

/// `1: mov eax, BASE; mov ecx, PAGES; 2: inc qword [rax]; add eax, 4096; dec ecx; jnz 2b;
/// jmp 1b` — one write to each of the pages, forever.
fn guest() -> Vec<u8> {
    let mut code = vec![0xb8];
    code.extend(BASE.to_le_bytes());
    code.push(0xb9);
    code.extend(PAGES.to_le_bytes());
    code.extend([
        0x48, 0xff, 0x00, 0x05, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf4,
    ]);
    code.extend([0xeb, 0xe8]);
    code
}

/// Most allocations and bytes of one capture, and the pages it carried, over 20 captures of
/// a `mem_mib` guest (after 5 unmeasured ones: the first harvest makes the hot-page table and
/// the page buffers reach their pool).
fn allocations_per_capture(mem_mib: u64) -> (u64, u64, usize) {
    let (vm, _dir) = vm_sized(&guest(), mem_mib);
    let ring = vmm::dirty_ring::preferred();
    assert_eq!(vm.dirty_source(), if ring { "ring" } else { "bitmap+hot" });
    vm.start().unwrap();
    let first = GuestAddress(u64::from(BASE));
    let t = Instant::now();
    while vm.memory().read_obj::<u64>(first).unwrap() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the guest never ran");
    }
    let (mut allocs, mut bytes, mut pages) = (0, 0, 0);
    for i in 0..25 {
        std::thread::sleep(Duration::from_millis(5));
        let (a0, b0) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
        let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
        let (a, b) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
        if i >= 5 {
            allocs = allocs.max(a - a0);
            bytes = bytes.max(b - b0);
            pages = pages.max(c.pages.len());
        }
        vm.recycle_capture(c.data);
    }
    vm.stop();
    vm.wait();
    (allocs, bytes, pages)
}

#[test]
fn a_pause_allocates_for_the_pages_dirtied_not_for_the_guests_size() {
    // (One test: the harvest source is chosen process-wide when a VM is made.)
    for ring in [false, true] {
        vmm::dirty_ring::prefer(ring);
        let small = allocations_per_capture(256);
        let big = allocations_per_capture(4096);
        eprintln!(
            "ring {ring}: 256 MiB: {} allocations, {} bytes ({} pages); 4 GiB: {} \
             allocations, {} bytes ({} pages)",
            small.0, small.1, small.2, big.0, big.1, big.2
        );
        assert!(big.2 >= PAGES as usize, "the epoch's pages were captured");
        // One bitmap of a 4 GiB guest is 128 KiB.
        assert!(big.1 < 64 << 10, "ring {ring}: {} bytes at 4 GiB", big.1);
        assert!(
            big.1 <= small.1 + (16 << 10),
            "ring {ring}: allocations grow with the guest: {} vs {} bytes",
            big.1,
            small.1
        );
    }
    vmm::dirty_ring::prefer(false);
}
