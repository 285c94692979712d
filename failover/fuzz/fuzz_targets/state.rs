//! Fuzz target: the manager's state file decoder on arbitrary bytes; a state that decodes
//! must encode back to bytes that decode to the same state.
#![no_main]

use failover::store::{decode_state, encode_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = decode_state(data) {
        let again = encode_state(&s).expect("a decoded state encodes");
        assert_eq!(decode_state(&again).ok(), Some(s));
    }
});
