//! Runtime support for a freestanding ring-3 binary: the entry point, the heap allocator, the
//! panic handler, and the C memory functions the compiler expects.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{null_mut, NonNull};

use linked_list_allocator::Heap;

core::arch::global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".global _start",
    "_start:",
    "lea rsp, [rip + __stack_top]",
    "xor ebp, ebp",
    "call {main}",
    "ud2",
    main = sym crate::guest_main,
);

extern "C" {
    static __image_end: u8;
}

/// First byte after the image and its stack: the heap starts here.
pub fn image_end() -> u64 {
    // Only the symbol's address is taken (defined by linker.ld); no read happens.
    core::ptr::addr_of!(__image_end) as u64
}

/// Two heaps: RAM below the MMIO hole, and RAM at 4 GiB and beyond (guests larger than the
/// part below the hole; see `layout::HIGH_RAM`). The high one is tried first, so that a big
/// guest's data, churn and device buffers live above 4 GiB (KVM slot 1) from the start.
struct GuestAlloc(UnsafeCell<[Heap; 2]>);
// SAFETY: the guest has a single thread of execution and no interrupts.
unsafe impl Sync for GuestAlloc {}

// SAFETY: delegates to linked_list_allocator, which upholds the GlobalAlloc contract.
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; no other reference to the heaps is live.
        let heaps = unsafe { &mut *self.0.get() };
        heaps
            .iter_mut()
            .rev()
            .find_map(|h| h.allocate_first_fit(layout).ok())
            .map(|p| p.as_ptr())
            .unwrap_or(null_mut())
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let i = usize::from(ptr as u64 >= crate::layout::HIGH_RAM);
        // SAFETY: `ptr` came from `alloc` with this layout, from the heap its address is in
        // (the low heap ends below the MMIO hole, the high one starts at 4 GiB);
        // single-threaded.
        unsafe { (*self.0.get())[i].deallocate(NonNull::new_unchecked(ptr), layout) }
    }
}

#[global_allocator]
static ALLOC: GuestAlloc = GuestAlloc(UnsafeCell::new([Heap::empty(), Heap::empty()]));

/// Hands `[start, end)` to the allocator: heap 0 (below the MMIO hole) or 1 (at 4 GiB).
pub fn init_heap(heap: usize, start: u64, end: u64) {
    // SAFETY: called once per heap at boot, before any allocation; the range is unused
    // guest RAM.
    unsafe { (*ALLOC.0.get())[heap].init(start as *mut u8, (end - start) as usize) }
}

/// Bytes of heap in use.
pub fn heap_used() -> usize {
    // SAFETY: single-threaded read.
    unsafe { (*ALLOC.0.get()).iter().map(|h| h.used()).sum() }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("PANIC: {}", info);
    crate::platform::exit(0xdead)
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    crate::platform::exit(0xdeae)
}

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees valid, non-overlapping ranges.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy with the direction flag set, restored afterwards.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack));
        }
        dst
    }
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees a valid range.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: caller guarantees both ranges are readable for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
