//! Pause, resume and stop of a running VM from another thread, on real KVM, with tiny guests.

mod common;

use std::time::{Duration, Instant};

use common::vm::vm_with;
use vm_memory::{Bytes, GuestAddress};
use vmm::{Vm, VmExit};

const COUNTER: u64 = 0x30_0000;

fn counter(vm: &Vm) -> u64 {
    vm.memory().read_obj(GuestAddress(COUNTER)).unwrap()
}

/// mov eax, COUNTER; 1: inc qword [rax]; jmp 1b
const COUNT_LOOP: &[u8] = &[0xb8, 0x00, 0x00, 0x30, 0x00, 0x48, 0xff, 0x00, 0xeb, 0xfb];

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let (vm, _d) = vm_with(COUNT_LOOP);
    vm.start().unwrap();
    let t = Instant::now();
    while counter(&vm) < 1000 {
        assert!(t.elapsed() < Duration::from_secs(10), "guest never ran");
    }
    for _ in 0..5 {
        vm.pause().unwrap();
        let c1 = counter(&vm);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counter(&vm), c1, "a paused guest does not run");
        vm.resume();
        let t = Instant::now();
        while counter(&vm) == c1 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "guest did not resume"
            );
        }
    }
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
}

#[test]
fn pause_interrupts_a_guest_blocked_in_the_wait_register() {
    // mov eax, 0xd0000010; mov edx, COUNTER; mov ecx, 1_000_000_000 (1 s)
    // 1: mov [rax], rcx; inc qword [rdx]; jmp 1b
    let code = [
        0xb8, 0x10, 0x00, 0x00, 0xd0, 0xba, 0x00, 0x00, 0x30, 0x00, 0xb9, 0x00, 0xca, 0x9a, 0x3b,
        0x48, 0x89, 0x08, 0x48, 0xff, 0x02, 0xeb, 0xf8,
    ];
    let (vm, _d) = vm_with(&code);
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The guest sits in a 1 s wait; a pause must not wait for it to time out.
    let t = Instant::now();
    vm.pause().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "pause took {:?}: it waited for the guest's timeout",
        t.elapsed()
    );
    let c = counter(&vm);
    vm.resume();
    // After the spurious wake-up the guest loops and waits again.
    let t = Instant::now();
    while counter(&vm) == c {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "guest did not continue"
        );
    }
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
}

#[test]
fn stop_while_paused_and_clean_guest_exit() {
    let (vm, _d) = vm_with(COUNT_LOOP);
    vm.start().unwrap();
    vm.pause().unwrap();
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
    assert!(
        vm.control().pause().is_err(),
        "a stopped VM cannot be paused"
    );

    // mov eax, 0xd0000038; mov qword [rax], 0  -> clean shutdown
    let (vm, _d) = vm_with(&[0xb8, 0x38, 0x00, 0x00, 0xd0, 0x48, 0xc7, 0x00, 0, 0, 0, 0]);
    vm.start().unwrap();
    assert_eq!(vm.wait(), VmExit::GuestExit(0));
}
