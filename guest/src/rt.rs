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

struct GuestAlloc(UnsafeCell<Heap>);
// SAFETY: the guest has a single thread of execution and no interrupts.
unsafe impl Sync for GuestAlloc {}

// SAFETY: delegates to linked_list_allocator, which upholds the GlobalAlloc contract.
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; no other reference to the heap is live.
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map(|p| p.as_ptr())
            .unwrap_or(null_mut())
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout; single-threaded.
        unsafe { (*self.0.get()).deallocate(NonNull::new_unchecked(ptr), layout) }
    }
}

#[global_allocator]
static ALLOC: GuestAlloc = GuestAlloc(UnsafeCell::new(Heap::empty()));

/// Hands `[start, end)` to the allocator.
pub fn init_heap(start: u64, end: u64) {
    // SAFETY: called once at boot, before any allocation; the range is unused guest RAM.
    unsafe { (*ALLOC.0.get()).init(start as *mut u8, (end - start) as usize) }
}

/// Bytes of heap in use.
pub fn heap_used() -> usize {
    // SAFETY: single-threaded read.
    unsafe { (*ALLOC.0.get()).used() }
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
