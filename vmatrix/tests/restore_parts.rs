//! `Vm::restore_parts` (how a promoted backup's image starts, on real KVM): a VM built from a
//! raw memory image mapped copy-on-write, a working disk and a state equals the checkpoint byte
//! for byte before it runs, serves every key, tracks vCPU and device writes in its first epoch
//! (KVM dirty log on the file-backed private slot, the vm-memory bitmap), and never writes the
//! memory file; a start gate runs before the guest, and a failing one keeps the guest from
//! running at all.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use vmm::devices::serial::ConsoleOut;
use vmm::snapshot::{self, files, SnapshotMeta};
use vmm::{RestoreParts, SnapshotKind, Vm, VmConfig};

fn console() -> ConsoleOut {
    ConsoleOut::new(Box::new(std::io::sink()))
}

/// Boots a VM, stores 50 keys and takes a full snapshot into `<dir>/s0`; returns its metadata.
fn checkpoint(tap: &HostTap, dir: &Path) -> SnapshotMeta {
    let disk = dir.join("disk.img");
    make_disk(&disk, 16);
    let vm = Vm::new(VmConfig {
        guest_elf: guest_elf(),
        mem_mib: 64,
        disk: Some(disk),
        tap: Some(tap.name.clone()),
        mac: [0x02, 0x78, 0x6d, 0, 0, 10],
        guest_config: tap.guest_config(),
        console: console(),
        dirty_log: true,
        generation: 1,
    })
    .expect("build VM");
    vm.start().unwrap();
    let mut kv = connect_retry(tap.guest_addr(), Duration::from_secs(20));
    for i in 0..50 {
        assert_eq!(kv.cmd(&format!("SET key{i} val{i}")).unwrap(), "OK");
    }
    vm.pause().unwrap();
    vm.snapshot(&dir.join("s0"), SnapshotKind::Full).unwrap();
    vm.stop();
    vm.wait();
    snapshot::read_meta(&dir.join("s0")).unwrap()
}

/// The VM of the snapshot's raw parts: `s0/memory.bin`, a working disk made from `s0/disk.img`.
fn from_parts(tap: &HostTap, dir: &Path, meta: &SnapshotMeta) -> Vm {
    let work = dir.join("work.img");
    let len = std::fs::metadata(dir.join("s0/disk.img")).unwrap().len();
    files::make_working_disk(&dir.join("s0/disk.img"), len, &work).unwrap();
    Vm::restore_parts(RestoreParts {
        memory: dir.join("s0/memory.bin"),
        mem_size: meta.mem_size,
        disk: Some(work),
        state: meta.vm.clone(),
        tap: Some(tap.name.clone()),
        console: console(),
        generation: None,
    })
    .expect("restore from parts")
}

fn region(layout: &str, key: &str) -> (u64, u64) {
    let v = field(layout, key).unwrap_or_else(|| panic!("{key} in {layout}"));
    let (a, l) = v.split_once('+').unwrap();
    (
        u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap(),
        l.parse().unwrap(),
    )
}

/// The first epoch of the restored VM: vCPU writes in the KVM log, a disk read into guest
/// memory and received frames in the device bitmap.
fn check_first_epoch(vm: &Vm, kv: &mut KvClient) {
    let layout = kv.cmd("LAYOUT").unwrap();
    let (dbuf, _) = region(&layout, "diskbuf");
    vm.pause().unwrap();
    vm.harvest_dirty().unwrap();
    vm.resume();
    assert_eq!(kv.cmd("SET epoch one").unwrap(), "OK");
    let r = kv.cmd("DISKREAD 0 32").unwrap();
    assert!(r.starts_with("DISKREAD crc="), "{r}");
    vm.pause().unwrap();
    let d = vm.harvest_dirty().unwrap();
    assert!(!d.kvm.is_empty(), "vCPU writes in the KVM log");
    let first = dbuf.div_ceil(4096);
    for p in first..(dbuf + 32 * 512) / 4096 {
        assert!(d.device.contains(p), "disk read page {p}");
        assert!(d.union().contains(p), "disk read page {p}");
    }
    assert!(!d.device.is_empty(), "device writes in the bitmap");
    vm.resume();
}

#[test]
fn a_vm_from_raw_parts_equals_its_checkpoint_and_tracks_its_writes() {
    let tap = HostTap::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = checkpoint(&tap, d);
    let file_crc = || crc32fast::hash(&std::fs::read(d.join("s0/memory.bin")).unwrap());
    let before = file_crc();

    // A gate that fails: the VM does not start, no guest instruction runs.
    let vm = from_parts(&tap, d, &meta);
    vm.gate_start(Box::new(|| Err("no".into())));
    let e = vm.start().unwrap_err().to_string();
    assert!(e.contains("before the guest starts: no"), "{e}");
    assert_eq!(
        vm.memory_checksum().unwrap(),
        meta.memory_checksum.unwrap(),
        "no guest instruction ran"
    );
    drop(vm);

    let vm = from_parts(&tap, d, &meta);
    assert_eq!(
        vm.memory_checksum().unwrap(),
        meta.memory_checksum.unwrap(),
        "guest RAM equals the checkpoint's before it runs"
    );
    let gated = Arc::new(AtomicBool::new(false));
    let g = gated.clone();
    vm.gate_start(Box::new(move || {
        g.store(true, Ordering::SeqCst);
        Ok(())
    }));
    vm.start().unwrap();
    assert!(gated.load(Ordering::SeqCst), "the gate ran at the start");
    let mut kv = connect_retry(tap.guest_addr(), Duration::from_secs(20));
    for i in 0..50 {
        assert_eq!(
            kv.cmd(&format!("GET key{i}")).unwrap(),
            format!("VALUE val{i}")
        );
    }
    check_first_epoch(&vm, &mut kv);
    assert_eq!(kv.cmd("GET epoch").unwrap(), "VALUE one");
    vm.stop();
    vm.wait();
    assert_eq!(file_crc(), before, "the memory file is never written");
}
