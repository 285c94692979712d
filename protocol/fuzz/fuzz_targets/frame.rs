//! Fuzz target: the frame reader and message decoder on arbitrary byte streams.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::frame::FrameReader;
use protocol::message::Message;

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data);
    let mut r = FrameReader::new();
    for chunk in data.chunks(97) {
        r.push(chunk);
        while let Ok(Some(f)) = r.next_frame() {
            if let Ok(m) = Message::decode(&f) {
                assert_eq!(Message::decode(&m.encode()).ok(), Some(m));
            }
        }
    }
});
