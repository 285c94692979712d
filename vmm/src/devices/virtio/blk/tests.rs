//! virtio-blk against queues in plain memory: the four request types, and malformed chains
//! (out of range, loops, wrong direction, short header) that must give a device error, never a
//! panic, and never touch the disk or memory outside the chain.

use std::io::{Read, Seek, SeekFrom, Write};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::Block;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{DeviceError, VirtioDevice};

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x100;
const STATUS: u64 = DATA + 0x3000;

fn disk(sectors: u64) -> (tempfile::NamedTempFile, Block) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
    f.write_all(&pattern).unwrap();
    let b = Block::new(f.reopen().unwrap(), "test-disk").unwrap();
    (f, b)
}

fn header(mem: &crate::memory::GuestMem, rtype: u32, sector: u64) {
    mem.write_obj(rtype, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

fn file_bytes(f: &mut tempfile::NamedTempFile) -> Vec<u8> {
    let mut v = Vec::new();
    f.as_file_mut().seek(SeekFrom::Start(0)).unwrap();
    f.as_file_mut().read_to_end(&mut v).unwrap();
    v
}

fn run(b: &mut Block, mem: &crate::memory::GuestMem) -> Result<bool, DeviceError> {
    let mut qs = [queue(mem)];
    b.process_queue(0, &mut qs, mem)
}

#[test]
fn read_write_flush_get_id() {
    let mem = mem();
    let (mut f, mut b) = disk(8);
    let mut d = Driver::new();
    let mut qs = [queue(&mem)];
    // Write sector 2 with 0xab.
    header(&mem, 1, 2);
    mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
    d.desc(&mem, 0, HDR, 16, F_NEXT, 1);
    d.desc(&mem, 1, BUF, 512, F_NEXT, 2);
    d.desc(&mem, 2, STATUS, 1, F_WRITE, 0);
    d.push(&mem, 0);
    assert_eq!(b.process_queue(0, &mut qs, &mem), Ok(true));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(&file_bytes(&mut f)[1024..1536], &[0xab; 512][..]);

    // Read sector 1 back into guest memory.
    header(&mem, 0, 1);
    d.desc(&mem, 1, BUF, 512, F_NEXT | F_WRITE, 2);
    d.push(&mem, 0);
    assert_eq!(b.process_queue(0, &mut qs, &mem), Ok(true));
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    let expect: Vec<u8> = (512..1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(&got[..], &expect[..]);
    assert_eq!(d.used(&mem, 1), (0, 513));

    // Flush (header + status only) and get-id.
    header(&mem, 4, 0);
    d.desc(&mem, 0, HDR, 16, F_NEXT, 2);
    d.push(&mem, 0);
    assert_eq!(b.process_queue(0, &mut qs, &mem), Ok(true));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    header(&mem, 8, 0);
    d.desc(&mem, 0, HDR, 16, F_NEXT, 1);
    d.desc(&mem, 1, BUF, 20, F_NEXT | F_WRITE, 2);
    d.push(&mem, 0);
    assert_eq!(b.process_queue(0, &mut qs, &mem), Ok(true));
    let mut id = [0u8; 9];
    mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id, b"test-disk");
    assert_eq!(b.completed, 4);
}

#[test]
fn beyond_the_disk_is_an_io_error_not_a_device_error() {
    let mem = mem();
    let (_f, mut b) = disk(4);
    let mut d = Driver::new();
    header(&mem, 0, 4);
    d.desc(&mem, 0, HDR, 16, F_NEXT, 1);
    d.desc(&mem, 1, BUF, 512, F_NEXT | F_WRITE, 2);
    d.desc(&mem, 2, STATUS, 1, F_WRITE, 0);
    d.push(&mem, 0);
    assert_eq!(run(&mut b, &mem), Ok(true));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
}

/// Runs one malformed write request and checks: the expected error, the disk unchanged, and
/// guest memory outside the queue structures unchanged.
fn malformed(setup: impl FnOnce(&crate::memory::GuestMem, &Driver)) -> DeviceError {
    let mem = mem();
    let (mut f, mut b) = disk(8);
    let before_disk = file_bytes(&mut f);
    let mut d = Driver::new();
    header(&mem, 1, 0);
    mem.write_slice(&[0x5a; 512], GuestAddress(BUF)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    setup(&mem, &d);
    let before_mem = checksum_outside(&mem, &[(DESC, 0x4000)]);
    d.push(&mem, 0);
    let err = run(&mut b, &mem).expect_err("malformed chain must be refused");
    assert_eq!(file_bytes(&mut f), before_disk, "disk must not change");
    assert_eq!(
        checksum_outside(&mem, &[(DESC, 0x4000)]),
        before_mem,
        "no stray writes"
    );
    assert_eq!(d.used_idx(&mem), 0, "a refused chain is not completed");
    err
}

#[test]
fn descriptor_out_of_guest_memory() {
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, MEM_SIZE as u64 - 256, 512, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::OutOfRange { .. }), "{e}");
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, u64::MAX - 10, 512, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::OutOfRange { .. }), "{e}");
}

#[test]
fn descriptor_loop() {
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, BUF, 512, F_NEXT, 0);
    });
    assert!(matches!(e, DeviceError::Loop { .. }), "{e}");
    assert!(e.to_string().contains("loops"));
}

#[test]
fn wrong_direction() {
    // Data of a write request marked device-writable.
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, BUF, 512, F_NEXT | F_WRITE, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::Direction { .. }), "{e}");
    // Status byte not writable.
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, BUF, 512, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, 0, 0);
    });
    assert!(matches!(e, DeviceError::Direction { .. }), "{e}");
    // Readable after writable.
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT | F_WRITE, 1);
        d.desc(m, 1, BUF, 512, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::Direction { .. }), "{e}");
}

#[test]
fn short_header_and_bad_lengths() {
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 8, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::Malformed { .. }), "{e}");
    let e = malformed(|m, d| {
        d.desc(m, 0, HDR, 16, F_NEXT, 1);
        d.desc(m, 1, BUF, 100, F_NEXT, 2);
        d.desc(m, 2, STATUS, 1, F_WRITE, 0);
    });
    assert!(matches!(e, DeviceError::Malformed { .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Arbitrary descriptor tables and avail entries: the device returns Ok or a typed error,
    /// never panics, and never writes outside the buffers the chain names.
    #[test]
    fn random_descriptor_tables_never_panic(
        descs in proptest::collection::vec((any::<u64>(), 0u32..5000, 0u16..8, 0u16..20), 1..16),
        heads in proptest::collection::vec(0u16..20, 1..4),
        hdr in any::<[u8; 16]>(),
    ) {
        let mem = mem();
        let (_f, mut b) = disk(16);
        let mut d = Driver::new();
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            // Half the addresses inside the data area, half anywhere.
            let a = if addr % 2 == 0 { DATA + (addr % 0x8000) } else { *addr };
            d.desc(&mem, i as u16, a, *len, *flags, *next);
        }
        for h in heads {
            d.push(&mem, h);
        }
        let _ = run(&mut b, &mem);
    }
}
