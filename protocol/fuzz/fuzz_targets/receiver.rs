//! Fuzz target: the receiver state machine fed a Hello and then arbitrary frames, cut from the
//! input by the frame reader; complete checkpoints are acknowledged as an application would.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use protocol::frame::FrameReader;
use protocol::message::{Hello, Message, Position, Role};
use protocol::{Receiver, ReceiverConfig};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut cfg = ReceiverConfig::new(7, "vm1");
    cfg.committed = Some(Position {
        history: 9,
        term: 1,
        seq: 3,
    });
    let mut r = Receiver::new(cfg);
    let hello = Message::Hello(Hello {
        min_version: 2,
        max_version: 3,
        cluster_id: 7,
        vm_id: "vm1".into(),
        term: 1,
        role: Role::Primary,
        streams: 1,
        history: 9,
    });
    let _ = r.handle_frame(now, &hello.encode());
    let mut reader = FrameReader::new();
    reader.push(data);
    while let Ok(Some(f)) = reader.next_frame() {
        let _ = r.handle_frame(now, &f);
        while let Some(cp) = r.poll_checkpoint() {
            r.ack(cp.epoch);
        }
        while r.poll_transmit().is_some() {}
    }
    let _ = r.handle_frame(now, data);
    r.handle_timeout(now + Duration::from_secs(5));
});
