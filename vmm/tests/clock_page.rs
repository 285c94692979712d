//! The guest's clock page (`vmm::pvclock`) on real KVM: anchored by the vCPU thread before the
//! guest's first instruction, not before; after a restore anchored anew at this host's TSC
//! rate — even when the checkpoint says another rate (PVM accepts `KVM_SET_TSC_KHZ` and then
//! reports the rate it was given without scaling the counter: restoring the rate made the
//! clock run at the old host's speed, a review finding) — and never behind the saved time.

mod common;

use std::time::{Duration, Instant};

use common::vm::{console, vm_with};
use vm_memory::{Bytes, GuestAddress};
use vmm::pvclock::{CLOCK_MAGIC, CLOCK_PAGE_ADDR, CLOCK_PAGE_LEN};
use vmm::{RestoreParts, Vm};

/// mov eax, 0x300000; 1: inc qword [rax]; jmp 1b
const COUNT_LOOP: &[u8] = &[0xb8, 0x00, 0x00, 0x30, 0x00, 0x48, 0xff, 0x00, 0xeb, 0xfb];

/// (magic, mult, tsc_base, ns_base) of the clock page.
fn page(vm: &Vm) -> (u32, u64, u64, u64) {
    let mut p = [0u8; CLOCK_PAGE_LEN];
    vm.memory()
        .read_slice(&mut p, GuestAddress(CLOCK_PAGE_ADDR))
        .unwrap();
    let u = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
    (
        u32::from_le_bytes(p[0..4].try_into().unwrap()),
        u(8),
        u(16),
        u(24),
    )
}

/// Guest ns per host ns over `d` of running.
fn rate(vm: &Vm, d: Duration) -> f64 {
    let (g0, t0) = (vm.guest_clock_ns(), Instant::now());
    std::thread::sleep(d);
    let (g1, t1) = (vm.guest_clock_ns(), Instant::now());
    (g1 - g0) as f64 / (t1 - t0).as_nanos() as f64
}

#[test]
fn the_clock_page_is_anchored_at_the_first_run_and_anew_at_this_hosts_rate_after_a_restore() {
    let (vm, dir) = vm_with(COUNT_LOOP);
    assert_eq!(page(&vm).0, 0, "nothing written before the vCPU runs");
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (magic, mult, tsc_base, _) = page(&vm);
    assert_eq!(magic, CLOCK_MAGIC, "anchored before the guest ran");
    let r = rate(&vm, Duration::from_millis(200));
    assert!(
        (0.99..1.01).contains(&r),
        "guest clock runs at {r} of host time"
    );

    // Capture, and claim the checkpoint came from a host whose TSC ran 5 % faster.
    vm.pause().unwrap();
    let mut state = vm.capture_state().unwrap();
    let khz = state.vcpu.tsc_khz.expect("KVM tells the TSC rate");
    state.vcpu.tsc_khz = Some(khz + khz / 20);
    let saved_ns = state.platform.clock_ns;
    let mut ram = vec![0u8; vm.mem_size() as usize];
    vm.memory().read_slice(&mut ram, GuestAddress(0)).unwrap();
    vm.stop();
    vm.wait();
    let image = dir.path().join("ram");
    std::fs::write(&image, &ram).unwrap();

    let vm2 = Vm::restore_parts(RestoreParts {
        memory: image,
        mem_size: ram.len() as u64,
        disk: None,
        state,
        tap: None,
        console: console(),
        generation: None,
    })
    .expect("restore");
    assert_eq!(
        page(&vm2).2,
        tsc_base,
        "the restored memory is the capture's until the vCPU runs"
    );
    vm2.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (magic2, mult2, tsc_base2, ns_base2) = page(&vm2);
    assert_eq!(magic2, CLOCK_MAGIC);
    assert!(tsc_base2 > tsc_base, "anchored anew");
    assert_eq!(mult2, mult, "at this host's rate, not the checkpoint's");
    assert!(ns_base2 >= saved_ns, "never behind the saved time");
    let r = rate(&vm2, Duration::from_millis(200));
    assert!(
        (0.99..1.01).contains(&r),
        "restored guest clock runs at {r} of host time"
    );
    vm2.stop();
    vm2.wait();
}
