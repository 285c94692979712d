//! Regression test for invariant 2 (complete dirty set): pages written during one epoch by the
//! vCPU (KVM dirty log) and by the VMM's devices (virtio-net RX and a virtio-blk read into guest
//! memory, through the vm-memory bitmap) all appear in that epoch's harvest — with KVM's
//! bitmap and with its dirty ring as the vCPU's source.

mod support;

use std::time::Duration;

use support::*;
use vmm::devices::serial::ConsoleOut;
use vmm::{Vm, VmConfig};

/// Pages lying entirely inside [addr, addr + len).
fn whole_pages(addr: u64, len: u64) -> Vec<u64> {
    let first = addr.div_ceil(4096);
    let end = (addr + len) / 4096;
    (first..end).collect()
}

fn region(layout: &str, key: &str) -> (u64, u64) {
    let v = field(layout, key).unwrap_or_else(|| panic!("{key} in {layout}"));
    let (a, l) = v.split_once('+').unwrap();
    (
        u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap(),
        l.parse().unwrap(),
    )
}

#[test]
fn vcpu_and_device_writes_of_one_epoch_are_all_harvested() {
    // (One test, so that the process-wide choice of source is not raced by another.)
    for ring in [false, true] {
        vmm::dirty_ring::prefer(ring);
        one_epoch(ring);
    }
    vmm::dirty_ring::prefer(false);
}

fn one_epoch(ring: bool) {
    let tap = HostTap::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16);
    let vm = Vm::new(VmConfig {
        guest_elf: guest_elf(),
        mem_mib: 64,
        disk: Some(disk),
        tap: Some(tap.name.clone()),
        mac: [0x02, 0x78, 0x6d, 0, 0, 9],
        guest_config: tap.guest_config(),
        console: ConsoleOut::new(Box::new(std::io::sink())),
        dirty_log: true,
        generation: 1,
    })
    .expect("build VM");
    let source = if ring { "ring" } else { "bitmap+hot" };
    assert_eq!(vm.dirty_source(), source);
    vm.start().unwrap();
    let mut kv = connect_retry(tap.guest_addr(), Duration::from_secs(20));
    // Write something so the log has data to read back.
    assert_eq!(kv.cmd("SET warm up").unwrap(), "OK");
    let layout = kv.cmd("LAYOUT").unwrap();
    let (rx, rx_len) = region(&layout, "rxbuf");
    let (dbuf, _) = region(&layout, "diskbuf");

    // Epoch boundary: harvest and reset both sources while paused.
    vm.pause().unwrap();
    vm.harvest_dirty().unwrap();
    vm.resume();

    // During the epoch: frames arrive (device writes RX buffers), the guest reads 16 KiB of
    // disk into its buffer (device write), and stores a key (vCPU writes).
    assert_eq!(kv.cmd("SET epoch one").unwrap(), "OK");
    let r = kv.cmd("DISKREAD 0 32").unwrap();
    assert!(r.starts_with("DISKREAD crc="), "{r}");

    vm.pause().unwrap();
    let d = vm.harvest_dirty().unwrap();
    let union = d.union();

    assert!(!d.kvm.is_empty(), "vCPU writes are in the KVM dirty log");
    let disk_pages = whole_pages(dbuf, 32 * 512);
    assert!(disk_pages.len() >= 3);
    for &p in &disk_pages {
        assert!(
            d.device.contains(p),
            "disk read page {p} in the device bitmap"
        );
        assert!(
            !d.kvm.contains(p),
            "disk read page {p} was written by the device only"
        );
        assert!(
            union.contains(p),
            "disk read page {p} in the epoch's dirty set"
        );
    }
    let rx_pages: Vec<u64> = whole_pages(rx, rx_len)
        .into_iter()
        .filter(|&p| d.device.contains(p))
        .collect();
    assert!(
        !rx_pages.is_empty(),
        "received frames dirtied receive-buffer pages"
    );
    for &p in &rx_pages {
        assert!(
            !d.kvm.contains(p),
            "RX page {p} is invisible to the KVM log"
        );
        assert!(union.contains(p), "RX page {p} in the epoch's dirty set");
    }

    // Harvesting reset both sources: an immediate second harvest is empty.
    let again = vm.harvest_dirty().unwrap();
    assert!(again.union().is_empty(), "both sources were reset together");
    vm.resume();
    assert_eq!(kv.cmd("GET epoch").unwrap(), "VALUE one");
    vm.stop();
    vm.wait();
}
