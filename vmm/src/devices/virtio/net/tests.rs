//! virtio-net against queues in plain memory with an in-memory backend.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use vm_memory::{Bytes, GuestAddress};

use super::device::{Net, NetBackend, NET_HDR_LEN};
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{DeviceError, VirtioDevice};

#[derive(Default)]
struct Loop {
    sent: Vec<Vec<u8>>,
    incoming: VecDeque<Vec<u8>>,
}

impl NetBackend for Loop {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.incoming.pop_front() {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

fn frame(n: usize, fill: u8) -> Vec<u8> {
    vec![fill; n]
}

#[test]
fn transmit_strips_the_header() {
    let mem = mem();
    let mut net = Net::new(Loop::default(), [2, 0, 0, 0, 0, 1]);
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&frame(60, 7), GuestAddress(DATA + NET_HDR_LEN as u64))
        .unwrap();
    // Header and frame split over two descriptors.
    d.desc(&mem, 0, DATA, NET_HDR_LEN as u32, F_NEXT, 1);
    d.desc(&mem, 1, DATA + NET_HDR_LEN as u64, 60, 0, 0);
    d.push(&mem, 0);
    net.process_queue(1, &mut qs, &mem).unwrap();
    assert_eq!(net.backend_mut().sent, vec![frame(60, 7)]);
    assert_eq!(net.stats().tx_frames, 1);
    assert_eq!(d.used_idx(&mem), 1);
}

#[test]
fn receive_prepends_the_header_and_waits_for_buffers() {
    let mem = mem();
    let mut net = Net::new(Loop::default(), [2, 0, 0, 0, 0, 1]);
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    net.backend_mut().incoming.push_back(frame(100, 9));
    net.backend_mut().incoming.push_back(frame(50, 8));
    // One buffer: the second frame must stay in the backend.
    d.desc(&mem, 0, DATA, 2048, F_WRITE, 0);
    d.push(&mem, 0);
    assert_eq!(net.receive(&mut qs, &mem), Ok(true));
    assert_eq!(d.used(&mem, 0), (0, (NET_HDR_LEN + 100) as u32));
    let mut hdr = [0xffu8; NET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(DATA)).unwrap();
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert!(!net.rx_has_buffers());
    assert_eq!(net.backend_mut().incoming.len(), 1);
    // A second buffer arrives; the waiting frame is delivered.
    d.desc(&mem, 1, DATA + 0x1000, 2048, F_WRITE, 0);
    d.push(&mem, 1);
    assert_eq!(net.receive(&mut qs, &mem), Ok(true));
    assert_eq!(d.used(&mem, 1), (1, (NET_HDR_LEN + 50) as u32));
    assert_eq!(net.stats().rx_frames, 2);
}

#[test]
fn receive_into_too_small_buffer_drops_the_frame() {
    let mem = mem();
    let mut net = Net::new(Loop::default(), [2, 0, 0, 0, 0, 1]);
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    net.backend_mut().incoming.push_back(frame(1500, 1));
    d.desc(&mem, 0, DATA, 100, F_WRITE, 0);
    d.push(&mem, 0);
    let before = checksum_outside(&mem, &[(DESC, 0x4000)]);
    assert_eq!(net.receive(&mut qs, &mem), Ok(true));
    assert_eq!(d.used(&mem, 0), (0, 0));
    assert_eq!(net.stats().rx_dropped, 1);
    assert_eq!(checksum_outside(&mem, &[(DESC, 0x4000)]), before);
}

#[test]
fn malformed_chains_are_device_errors() {
    let mem = mem();
    let mut net = Net::new(Loop::default(), [2, 0, 0, 0, 0, 1]);
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    // TX chain with a writable buffer.
    d.desc(&mem, 0, DATA, 64, F_WRITE, 0);
    d.push(&mem, 0);
    let e = net.process_queue(1, &mut qs, &mem).unwrap_err();
    assert!(matches!(e, DeviceError::Direction { .. }), "{e}");
    assert!(net.backend_mut().sent.is_empty());

    // TX chain out of guest memory.
    let mut qs = [queue(&mem), queue(&mem)];
    let mut d = Driver::new();
    d.desc(&mem, 0, MEM_SIZE as u64 - 10, 64, 0, 0);
    d.push(&mem, 0);
    let e = net.process_queue(1, &mut qs, &mem).unwrap_err();
    assert!(matches!(e, DeviceError::OutOfRange { .. }), "{e}");

    // TX loop.
    let mut qs = [queue(&mem), queue(&mem)];
    let mut d = Driver::new();
    d.desc(&mem, 0, DATA, 64, F_NEXT, 1);
    d.desc(&mem, 1, DATA, 64, F_NEXT, 0);
    d.push(&mem, 0);
    let e = net.process_queue(1, &mut qs, &mem).unwrap_err();
    assert!(matches!(e, DeviceError::Loop { .. }), "{e}");

    // RX chain with a readable buffer: nothing written.
    let mut qs = [queue(&mem), queue(&mem)];
    let mut d = Driver::new();
    net.backend_mut().incoming.push_back(frame(60, 3));
    d.desc(&mem, 0, DATA, 2048, 0, 0);
    d.push(&mem, 0);
    let before = checksum_outside(&mem, &[(DESC, 0x4000)]);
    let e = net.receive(&mut qs, &mem).unwrap_err();
    assert!(matches!(e, DeviceError::Direction { .. }), "{e}");
    assert_eq!(checksum_outside(&mem, &[(DESC, 0x4000)]), before);
    assert_eq!(net.backend_mut().incoming.len(), 1, "frame not consumed");
}

#[test]
fn a_clones_source_filter_drops_frames_of_another_mac() {
    let mem = mem();
    let mac = [2, 0, 0, 0, 0, 9];
    let mut net = Net::new(Loop::default(), mac);
    net.set_source_filter(true);
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    let mut own = frame(60, 7);
    own[6..12].copy_from_slice(&mac);
    let mut parents = frame(60, 8);
    parents[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    for (i, f) in [&parents, &own].iter().enumerate() {
        let at = DATA + i as u64 * 0x1000;
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        mem.write_slice(f, GuestAddress(at + NET_HDR_LEN as u64))
            .unwrap();
        d.desc(&mem, i as u16, at, (NET_HDR_LEN + 60) as u32, 0, 0);
        d.push(&mem, i as u16);
    }
    net.process_queue(1, &mut qs, &mem).unwrap();
    assert_eq!(
        net.backend_mut().sent,
        vec![own],
        "only the clone's own frame leaves"
    );
    assert_eq!(net.foreign_dropped(), 1);
    assert_eq!(
        d.used_idx(&mem),
        2,
        "the dropped frame's buffer is returned too"
    );
}

/// Transmits one 60-byte frame filled with `fill` through the TX queue.
fn transmit_one(net: &mut Net<Loop>, mem: &crate::memory::GuestMem, fill: u8, slot: u16) {
    let mut d = Driver::new();
    let mut qs = [queue(mem), queue(mem)];
    let at = DATA + slot as u64 * 0x1000;
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
        .unwrap();
    mem.write_slice(&frame(60, fill), GuestAddress(at + NET_HDR_LEN as u64))
        .unwrap();
    d.desc(mem, 0, at, (NET_HDR_LEN + 60) as u32, 0, 0);
    d.push(mem, 0);
    net.process_queue(1, &mut qs, mem).unwrap();
}

/// The release lease: a release authorized by an acknowledgement sends its frames only until
/// `not_after`; a late one (the process was stopped between the acknowledgement and the send,
/// and may have been superseded meanwhile) drops them for good instead of sending them beside
/// a new primary's. A release within its lease sends, in order.
#[test]
fn a_release_after_its_lease_drops_the_frames_instead_of_sending_them() {
    use std::time::{Duration, Instant};
    let mem = mem();
    let mut net = Net::new(Loop::default(), [2, 0, 0, 0, 0, 1]);
    net.enable_output_commit(1, 1 << 20);
    transmit_one(&mut net, &mem, 1, 0);
    assert!(net.backend_mut().sent.is_empty(), "held");
    assert_eq!(net.advance_output_epoch(), Some(1), "epoch 1 closed");
    transmit_one(&mut net, &mem, 2, 1);
    assert_eq!(net.advance_output_epoch(), Some(2), "epoch 2 closed");
    let mut qs = [queue(&mem), queue(&mem)];
    // Epoch 1's release comes too late: dropped, and never sent afterwards.
    let late = Instant::now() - Duration::from_millis(1);
    assert_eq!(net.release_output(1, Some(late), &mut qs, &mem), Ok(0));
    assert!(net.backend_mut().sent.is_empty());
    assert_eq!(net.held_output().map(|(f, _, _)| f), Some(1));
    // Epoch 2's release is within its lease: sent.
    let lease = Instant::now() + Duration::from_secs(60);
    assert_eq!(net.release_output(2, Some(lease), &mut qs, &mem), Ok(1));
    assert_eq!(net.backend_mut().sent, vec![frame(60, 2)]);
    assert_eq!(net.held_output().map(|(f, _, _)| f), Some(0));
}

/// A clone's (and a standby's) device receives only frames for its MAC or a group: a unicast
/// frame for another MAC (the parent's, flooded by the bridge) is dropped without using a
/// buffer.
#[test]
fn a_filtered_device_receives_only_its_own_and_group_frames() {
    let mem = mem();
    let mac = [2, 0x73, 0, 0, 0, 9];
    let mut net = Net::new(Loop::default(), mac);
    net.set_source_filter(true);
    let mut to = |dst: [u8; 6], fill: u8| {
        let mut f = frame(60, fill);
        f[..6].copy_from_slice(&dst);
        net.backend_mut().incoming.push_back(f);
    };
    to([2, 0x78, 0x6d, 0, 0, 2], 1); // the parent's
    to(mac, 2); // its own
    to([0xff; 6], 3); // broadcast
    to([2, 0x78, 0x6d, 0, 0, 2], 4); // the parent's again
    let mut d = Driver::new();
    let mut qs = [queue(&mem), queue(&mem)];
    for i in 0..4u16 {
        d.desc(&mem, i, DATA + i as u64 * 0x1000, 2048, F_WRITE, 0);
        d.push(&mem, i);
    }
    assert_eq!(net.receive(&mut qs, &mem), Ok(true));
    assert_eq!(
        d.used_idx(&mem),
        2,
        "two frames delivered, two buffers left"
    );
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(DATA + NET_HDR_LEN as u64 + 6))
        .unwrap();
    assert_eq!(b[0], 2, "its own frame first");
    mem.read_slice(&mut b, GuestAddress(DATA + 0x1000 + NET_HDR_LEN as u64 + 6))
        .unwrap();
    assert_eq!(b[0], 3, "then the broadcast");
    assert_eq!(net.foreign_dropped(), 2);
    assert!(net.backend_mut().incoming.is_empty());
}
