//! Fuzz target: the agent protocol's frame decoding (both directions) on arbitrary bytes; a
//! frame that decodes must encode back to a frame that decodes to the same message.
#![no_main]

use failover::wire::{decode_frame, encode, AgentMsg, ManagerMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_frame::<AgentMsg>(data) {
        let again = encode(&m).expect("a decoded message encodes");
        assert_eq!(decode_frame::<AgentMsg>(&again).ok(), Some(m));
    }
    if let Ok(m) = decode_frame::<ManagerMsg>(data) {
        let again = encode(&m).expect("a decoded message encodes");
        assert_eq!(decode_frame::<ManagerMsg>(&again).ok(), Some(m));
    }
});
