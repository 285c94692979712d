//! A peer that connects (authenticates) and then says nothing is timed out like one that falls
//! silent: the receiver's idle clock runs from its start, not from the first frame.

use std::time::{Duration, Instant};

use protocol::message::{Hello, Message, Role};
use protocol::{ProtocolError, Receiver, ReceiverConfig};

fn config() -> ReceiverConfig {
    let mut c = ReceiverConfig::new(7, "vm1");
    c.idle_timeout = Duration::from_millis(500);
    c
}

#[test]
fn a_peer_that_never_speaks_is_closed_after_the_idle_timeout() {
    let t0 = Instant::now();
    let mut r = Receiver::new(config());
    r.start(t0);
    assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_millis(500)));
    r.handle_timeout(t0 + Duration::from_millis(499));
    assert!(r.closed().is_none(), "not before the timeout");
    r.handle_timeout(t0 + Duration::from_millis(500));
    assert_eq!(r.closed(), Some(&ProtocolError::PeerTimeout { ms: 500 }));
    assert_eq!(r.poll_timeout(), None, "closed: no more timers");
}

#[test]
fn without_start_the_clock_runs_from_creation() {
    let before = Instant::now();
    let r = Receiver::new(config());
    let after = Instant::now();
    let t = r.poll_timeout().expect("a deadline before any frame");
    assert!(t >= before + Duration::from_millis(500) && t <= after + Duration::from_millis(500));
}

#[test]
fn each_frame_moves_the_deadline() {
    let t0 = Instant::now();
    let mut r = Receiver::new(config());
    r.start(t0);
    let hello = Message::Hello(Hello {
        min_version: 2,
        max_version: 3,
        cluster_id: 7,
        vm_id: "vm1".into(),
        term: 1,
        role: Role::Primary,
        streams: 1,
        history: 9,
    })
    .encode();
    let t1 = t0 + Duration::from_millis(400);
    r.handle_frame(t1, &hello).unwrap();
    assert_eq!(r.poll_timeout(), Some(t1 + Duration::from_millis(500)));
    r.handle_timeout(t0 + Duration::from_millis(600));
    assert!(r.closed().is_none());
    r.handle_timeout(t1 + Duration::from_millis(500));
    assert!(matches!(
        r.closed(),
        Some(ProtocolError::PeerTimeout { .. })
    ));
}
