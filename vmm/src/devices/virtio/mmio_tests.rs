//! The virtio-mmio transport: feature negotiation, queue setup through registers, and the
//! device-error path (NEEDS_RESET, frozen device, recovery by reset).

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::blk::Block;
use super::mmio::{regs, status, MmioTransport, MMIO_MAGIC};
use super::test_utils::*;
use crate::bus::BusDevice;
use crate::events::GuestEvents;

fn w(t: &mut MmioTransport<Block>, reg: u64, v: u32) {
    t.write(reg, &v.to_le_bytes());
}
fn r(t: &mut MmioTransport<Block>, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(reg, &mut b);
    u32::from_le_bytes(b)
}

fn bring_up(t: &mut MmioTransport<Block>) {
    w(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, regs::DRIVER_FEATURES_SEL, 1);
    w(t, regs::DRIVER_FEATURES, 1); // VERSION_1
    w(
        t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(r(t, regs::STATUS) & status::FEATURES_OK, 0);
    w(t, regs::QUEUE_SEL, 0);
    w(t, regs::QUEUE_NUM, u32::from(QSIZE));
    w(t, regs::QUEUE_DESC_LOW, DESC as u32);
    w(t, regs::QUEUE_DRIVER_LOW, AVAIL as u32);
    w(t, regs::QUEUE_DEVICE_LOW, USED as u32);
    w(t, regs::QUEUE_READY, 1);
    w(
        t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(t.is_active());
}

#[test]
fn identity_registers_and_feature_refusal() {
    let mem = mem();
    let f = tempfile::tempfile().unwrap();
    f.set_len(4096).unwrap();
    let mut t = MmioTransport::new(
        Block::new(f, "x").unwrap(),
        mem,
        Arc::new(GuestEvents::default()),
    );
    assert_eq!(r(&mut t, regs::MAGIC), MMIO_MAGIC);
    assert_eq!(r(&mut t, regs::VERSION), 2);
    assert_eq!(r(&mut t, regs::DEVICE_ID), 2);
    // A driver that does not accept VERSION_1 is refused FEATURES_OK.
    w(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);
}

#[test]
fn device_error_sets_needs_reset_and_freezes_until_reset() {
    let mem = mem();
    let f = tempfile::tempfile().unwrap();
    f.set_len(8 * 512).unwrap();
    let events = Arc::new(GuestEvents::default());
    let mut t = MmioTransport::new(Block::new(f, "x").unwrap(), mem.clone(), events.clone());
    bring_up(&mut t);
    let mut d = Driver::new();
    // A looping chain.
    d.desc(&mem, 0, DATA, 16, F_NEXT, 1);
    d.desc(&mem, 1, DATA, 16, F_NEXT, 0);
    d.push(&mem, 0);
    let seq = events.seq();
    w(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_ne!(r(&mut t, regs::STATUS) & status::NEEDS_RESET, 0);
    assert!(t.last_error().unwrap().to_string().contains("loops"));
    assert_ne!(
        r(&mut t, regs::INTERRUPT_STATUS) & 2,
        0,
        "config interrupt raised"
    );
    assert_ne!(events.seq(), seq, "guest woken");

    // While frozen, a good request is not processed.
    mem.write_obj(4u32, GuestAddress(DATA)).unwrap();
    d.desc(&mem, 2, DATA, 16, F_NEXT, 3);
    d.desc(&mem, 3, DATA + 0x100, 1, F_WRITE, 0);
    d.push(&mem, 2);
    w(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(&mem), 0);

    // Reset and bring up again: the device works.
    w(&mut t, regs::STATUS, 0);
    assert_eq!(r(&mut t, regs::STATUS), 0);
    assert!(t.last_error().is_none());
    mem.write_slice(&[0u8; 0x100], GuestAddress(AVAIL)).unwrap();
    mem.write_slice(&[0u8; 0x100], GuestAddress(USED)).unwrap();
    bring_up(&mut t);
    let mut d = Driver::new();
    d.push(&mem, 2);
    w(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(&mem), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap(), 0);
}
