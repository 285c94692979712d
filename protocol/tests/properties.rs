//! Property tests: any sequence of bytes is an error or a valid message, never a panic, in the
//! frame decoder and in both state machines.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use protocol::checkpoint::{to_messages, Checkpoint};
use protocol::frame::{FrameReader, MAGIC};
use protocol::message::{Hello, Kind, Message, Role};
use protocol::page::PageData;
use protocol::{Receiver, ReceiverConfig, Sender, SenderConfig};

fn hello() -> Vec<u8> {
    Message::Hello(Hello {
        min_version: 2,
        max_version: 3,
        cluster_id: 7,
        vm_id: "vm1".into(),
        term: 1,
        role: Role::Primary,
        streams: 1,
        history: 9,
    })
    .encode()
}

/// A frame header followed by arbitrary bytes, so inputs get past the magic.
fn framed(t: u8, body: &[u8]) -> Vec<u8> {
    protocol::frame::encode(t, body)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Message::decode(&bytes);
        let mut with_magic = MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Message::decode(&with_magic);
        let mut r = FrameReader::new();
        r.push(&bytes);
        while let Ok(Some(f)) = r.next_frame() {
            let _ = Message::decode(&f);
        }
    }

    #[test]
    fn valid_frames_with_garbage_bodies_are_errors_not_panics(t in 0u8..14, body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let f = framed(t, &body);
        if let Ok(m) = Message::decode(&f) {
            // Whatever decodes re-encodes to a frame that decodes to the same message.
            prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        let now = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
        let _ = r.handle_frame(now, &hello());
        let _ = r.handle_frame(now, &f);
        while r.poll_transmit().is_some() {}
        let mut s = Sender::new(SenderConfig::new(7, "vm1", 1));
        s.start(now);
        let _ = s.handle_frame(now, &f);
        s.handle_timeout(now + Duration::from_secs(10));
    }

    #[test]
    fn receiver_survives_any_message_sequence(ops in proptest::collection::vec((0usize..6, 0u64..6, 0u32..3, any::<u8>()), 1..60)) {
        let now = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
        let _ = r.handle_frame(now, &hello());
        for (which, epoch, attempt, flip) in ops {
            let cp = Checkpoint {
                epoch,
                kind: Kind::Incremental,
                mem_size: 1 << 20,
                pages: vec![(epoch, PageData::Zero), (epoch + 1, PageData::Raw(vec![flip; 4096]))],
                disk: vec![(0, vec![flip; 16])],
                state: Some((1, vec![flip])),
            };
            let msgs = to_messages(1, attempt, &cp);
            let m = &msgs[which % msgs.len()];
            let _ = r.handle_frame(now, &m.encode());
            while let Some(c) = r.poll_checkpoint() {
                r.ack(c.epoch);
            }
            while r.poll_transmit().is_some() {}
        }
        r.handle_timeout(now + Duration::from_secs(60));
    }
}
