//! The pause at guest output (issue 12, `vmm::vcpu`), on real KVM with the test guest behind a
//! tap: armed, the vCPU pauses itself at the first frame held in an output epoch, before
//! anyone captures; the capture adopts that pause (no kick), and the guest runs on after the
//! capture's resume; an unadopted pause ends by itself after `PRE_PAUSE_MAX`; unarmed (or
//! once per arming), output pauses nothing; a resume without a pause of its own leaves no
//! pause at output for the next pause to adopt. With the primary's loop arming it, the
//! replicas `replication.rs` compares byte for byte are taken through this path (not
//! asserted there).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vmm::devices::serial::ConsoleOut;
use vmm::vcpu::OutputPauses;
use vmm::{CaptureKind, Vm, VmConfig};

fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Sends `line` from another thread (its reply is held): the client, for `join`.
fn send(mut kv: KvClient, line: &str) -> std::thread::JoinHandle<(KvClient, String)> {
    let line = line.to_string();
    std::thread::spawn(move || {
        let r = kv.cmd(&line).unwrap();
        (kv, r)
    })
}

#[test]
fn an_armed_vm_pauses_at_its_output_and_the_capture_adopts_that_pause() {
    let tap = HostTap::new();
    let dir = tempfile::tempdir().unwrap();
    let (vm, kv, wakes) = protected_vm(&tap, dir.path());
    let kv = adopted_by_the_capture(&vm, kv, &wakes);
    let kv = state_read_at_the_park(&vm, kv);
    let kv = unadopted_pause_expires(&vm, kv, &tap);
    unbalanced_resume_leaves_nothing_to_adopt(&vm, kv);
    vm.stop();
}

/// A VM behind `tap`, as a protected primary's: output held, a waker that counts, the first
/// capture taken.
fn protected_vm(tap: &HostTap, dir: &std::path::Path) -> (Arc<Vm>, KvClient, Arc<AtomicU64>) {
    let disk = dir.join("disk.img");
    make_disk(&disk, 16);
    let vm = Arc::new(
        Vm::new(VmConfig {
            guest_elf: guest_elf(),
            mem_mib: 64,
            disk: Some(disk),
            tap: Some(tap.name.clone()),
            mac: [0x02, 0x78, 0x6d, 0, 0, 11],
            guest_config: tap.guest_config(),
            console: ConsoleOut::new(Box::new(std::io::sink())),
            dirty_log: true,
            generation: 1,
        })
        .expect("build VM"),
    );
    vm.start().unwrap();
    let mut kv = connect_retry(tap.guest_addr(), Duration::from_secs(20));
    kv.set_timeout(Duration::from_secs(10));
    assert_eq!(kv.cmd("SET warm up").unwrap(), "OK");
    let wakes = Arc::new(AtomicU64::new(0));
    let w = wakes.clone();
    vm.set_output_waker(Some(Arc::new(move || {
        w.fetch_add(1, Ordering::SeqCst);
    })));
    vm.hold_output_from_start();
    let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
    vm.release_output(c.epoch, None);
    assert_eq!(vm.output_pauses(), OutputPauses::default());
    (vm, kv, wakes)
}

/// Armed, the reply's frame pauses the vCPU before anyone asks; the capture adopts that pause,
/// and the next reply (once per arming) pauses nothing.
fn adopted_by_the_capture(vm: &Arc<Vm>, kv: KvClient, wakes: &AtomicU64) -> KvClient {
    // (Waiting up to a minute for its capture: a test thread on a busy host may not see a
    // 2 ms one.)
    vm.set_pause_at_output_wait(Duration::from_secs(60));
    vm.set_pause_at_output(true);
    let t = send(kv, "SET k1 v1");
    // (The waker runs right after the pause is taken, on the thread that held the frame: the
    // vCPU's, or the receive thread's when it moved the transmit queue on.)
    wait_until("the pause at output", Duration::from_secs(5), || {
        vm.is_paused() && wakes.load(Ordering::SeqCst) == 1
    });
    let taken = vm.output_pauses();
    assert_eq!((taken.taken, taken.adopted), (1, 0), "{taken:?}");
    // The capture adopts it: one pause, resumed by the capture, and the guest runs on.
    let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
    assert!(!c.pages.is_empty(), "the SET's epoch has dirty pages");
    let after = vm.output_pauses();
    assert_eq!(
        (after.taken, after.adopted, after.expired, after.state_reads),
        (1, 1, 0, 1),
        "adopted, with the state the vCPU read before parking"
    );
    wait_until(
        "the capture's resume to end the adopted pause",
        Duration::from_secs(5),
        || !vm.is_paused(),
    );
    vm.release_output(c.epoch, None);
    let (mut kv, r) = t.join().unwrap();
    assert_eq!(r, "OK");
    // Once per arming: the next reply pauses nothing (the primary arms again when a capture
    // would follow at once).
    let t = send(kv, "GET k1");
    wait_until("the next held reply", Duration::from_secs(5), || {
        wakes.load(Ordering::SeqCst) == 2
    });
    std::thread::sleep(Duration::from_millis(5));
    assert!(!vm.is_paused());
    assert_eq!(vm.output_pauses().taken, 1);
    let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
    vm.release_output(c.epoch, None);
    (kv, _) = t.join().unwrap();
    kv
}

/// The state the vCPU reads before parking is what the ioctls read: a user's pause adopts the
/// pause at output, and the state is taken twice while it holds.
fn state_read_at_the_park(vm: &Arc<Vm>, mut kv: KvClient) -> KvClient {
    vm.set_pause_at_output(true);
    let t = send(kv, "SET k3 v3");
    // (Paused *after* the pause was taken: the vCPU may not have left the last capture's
    // park yet when this starts looking.)
    wait_until("the pause at output", Duration::from_secs(5), || {
        vm.output_pauses().taken == 2 && vm.is_paused()
    });
    vm.pause().unwrap();
    let parked = vm.capture_state().unwrap();
    let by_ioctls = vm.capture_state().unwrap();
    // (Field by field: MSRs that count time — the TSC — move between any two reads.)
    let (a, b) = (&parked.vcpu, &by_ioctls.vcpu);
    let same = |x: &dyn Fn(&vmm::vcpu_state::VcpuState) -> Vec<u8>| x(a) == x(b);
    assert!(same(
        &|v| postcard::to_stdvec(&(v.regs, v.sregs, v.events)).unwrap()
    ));
    assert!(same(&|v| v
        .xsave
        .region
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()));
    assert!(same(&|v| postcard::to_stdvec(&(
        v.xcrs,
        v.debugregs,
        v.mp_state
    ))
    .unwrap()));
    assert_eq!(a.msrs.len(), b.msrs.len());
    for (x, y) in a.msrs.iter().zip(&b.msrs) {
        assert_eq!(x.index, y.index);
        match x.index {
            // IA32_TSC: read at the park, so no later than the ioctl's.
            0x10 => assert!(x.data <= y.data, "TSC {:#x} after {:#x}", x.data, y.data),
            i => assert_eq!(x.data, y.data, "MSR {i:#x}"),
        }
    }
    assert_eq!(vm.output_pauses().state_reads, 2);
    vm.resume();
    let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
    vm.release_output(c.epoch, None);
    (kv, _) = t.join().unwrap();
    kv
}

/// Armed, but no capture comes: the vCPU runs on by itself after `PRE_PAUSE_MAX`.
fn unadopted_pause_expires(vm: &Arc<Vm>, kv: KvClient, tap: &HostTap) -> KvClient {
    vm.set_pause_at_output_wait(vmm::vcpu::PRE_PAUSE_MAX);
    vm.set_pause_at_output(true);
    let t = send(kv, "SET k2 v2");
    wait_until("the unadopted pause to end", Duration::from_secs(5), || {
        vm.output_pauses().expired == 1
    });
    wait_until("the vCPU to run on", Duration::from_secs(5), || {
        !vm.is_paused()
    });
    // It runs: a new connection's SYN-ACK is held too (the guest made it, nobody captured).
    let frames = vm.held_output().unwrap().0;
    let addr = tap.guest_addr();
    let other = std::thread::spawn(move || KvClient::connect(addr).is_ok());
    wait_until(
        "the guest to answer a new connection",
        Duration::from_secs(5),
        || vm.held_output().unwrap().0 > frames,
    );
    assert_eq!(
        vm.output_pauses().taken,
        3,
        "not armed again: no fourth pause"
    );
    let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
    vm.release_output(c.epoch, None);
    let (kv, r) = t.join().unwrap();
    assert_eq!(r, "OK");
    assert!(
        other.join().unwrap(),
        "the second client connected once released"
    );
    let end = vm.output_pauses();
    assert_eq!((end.taken, end.adopted, end.expired), (3, 2, 1), "{end:?}");
    kv
}

/// A resume without a pause of its own ends a pause at output: the next pause (a capture)
/// pauses afresh instead of adopting it, and returns.
fn unbalanced_resume_leaves_nothing_to_adopt(vm: &Arc<Vm>, kv: KvClient) {
    // its first, and only the first pauses.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
        vm.release_output(c.epoch, None);
        std::thread::sleep(Duration::from_millis(50));
        if vm.held_output().unwrap().0 == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the guest keeps sending");
    }
    vm.set_pause_at_output_wait(Duration::from_secs(60));
    vm.set_pause_at_output(true);
    let t = send(kv, "SET k4 v4");
    wait_until("the pause at output", Duration::from_secs(5), || {
        vm.output_pauses().taken == 4 && vm.is_paused()
    });
    vm.resume();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let vm2 = vm.clone();
    std::thread::spawn(move || {
        let c = vm2.capture_epoch(CaptureKind::Incremental).unwrap();
        vm2.release_output(c.epoch, None);
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "a capture after an unbalanced resume hangs"
    );
    // (The frame that paused may have been another connection's: capture until the reply.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "the reply never came");
        let c = vm.capture_epoch(CaptureKind::Incremental).unwrap();
        vm.release_output(c.epoch, None);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(t.join().unwrap().1, "OK");
    assert_eq!(vm.output_pauses().adopted, 2, "nothing left to adopt");
}
