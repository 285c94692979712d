//! Protocol versions on the wire: older layouts of `Hello` and `Welcome` still decode (and are
//! refused clearly when too old), each `Welcome` layout only with its own versions; the data
//! ports of version 4 reach a version-4 primary only, and hostile port lists are refused.

use std::time::Instant;

use protocol::message::{Hello, Message, Role};
use protocol::{ProtocolError, Receiver, ReceiverConfig, Sender, SenderConfig, SenderEvent};

fn hello(term: u64, min: u16, max: u16) -> Vec<u8> {
    Message::Hello(Hello {
        min_version: min,
        max_version: max,
        cluster_id: 7,
        vm_id: "vm1".into(),
        term,
        role: Role::Primary,
        streams: 1,
        history: 9,
    })
    .encode()
}

#[test]
fn data_ports_reach_a_version_4_primary_only_and_hostile_lists_are_refused() {
    use protocol::message::{Welcome, MAX_DATA_PORTS};
    let now = Instant::now();
    let offer = |max: u16| {
        let mut cfg = ReceiverConfig::new(7, "vm1");
        cfg.data_ports = vec![7001, 7002];
        let mut r = Receiver::new(cfg);
        r.handle_frame(now, &hello(1, 3, max)).unwrap();
        let f = r.poll_transmit().expect("a Welcome");
        match Message::decode(&f).unwrap() {
            Message::Welcome(w) => (w.version, w.data_ports),
            m => panic!("{m:?}"),
        }
    };
    assert_eq!(offer(4), (4, vec![7001, 7002]));
    // A version-3 primary gets the version-3 layout, which it can decode: no ports.
    assert_eq!(offer(3), (3, vec![]));
    // The sender reports them with Ready.
    let mut s = Sender::new(SenderConfig::new(7, "vm1", 3));
    s.start(now);
    while s.poll_transmit(now).is_some() {}
    let w = |ports: Vec<u16>| {
        Message::Welcome(Welcome {
            version: 4,
            term: 3,
            last_committed: None,
            committed: None,
            data_ports: ports,
        })
        .encode()
    };
    s.handle_frame(now, &w(vec![7001])).unwrap();
    assert!(matches!(
        s.poll_event(),
        Some(SenderEvent::Ready { version: 4, ref data_ports, .. }) if data_ports == &[7001]
    ));
    // A layout that is not its version's: malformed (it would not re-encode the same).
    let v4_layout_v3 = postcard::to_stdvec(&Welcome {
        version: 3,
        term: 3,
        last_committed: None,
        committed: None,
        data_ports: vec![7001],
    })
    .unwrap();
    assert!(matches!(
        Message::from_payload(2, &v4_layout_v3),
        Err(ProtocolError::Malformed {
            kind: "Welcome",
            ..
        })
    ));
    let mut v3_layout_v4 = postcard::to_stdvec(&Welcome {
        version: 4,
        term: 3,
        last_committed: None,
        committed: None,
        data_ports: vec![],
    })
    .unwrap();
    v3_layout_v4.pop(); // (the empty port list's length)
    assert!(matches!(
        Message::from_payload(2, &v3_layout_v4),
        Err(ProtocolError::Malformed {
            kind: "Welcome",
            ..
        })
    ));
    // Too many ports, or port 0: malformed.
    for bad in [vec![7001; MAX_DATA_PORTS + 1], vec![7001, 0]] {
        assert!(matches!(
            Message::decode(&w(bad)),
            Err(ProtocolError::Malformed {
                kind: "Welcome",
                ..
            })
        ));
    }
}

#[test]
fn version_2_hello_and_welcome_still_decode() {
    // Version 2 layouts: Hello without history, Welcome without committed.
    #[derive(serde::Serialize)]
    struct HelloV2<'a> {
        min_version: u16,
        max_version: u16,
        cluster_id: u64,
        vm_id: &'a str,
        term: u64,
        role: Role,
        streams: u8,
    }
    let p = postcard::to_stdvec(&HelloV2 {
        min_version: 1,
        max_version: 2,
        cluster_id: 7,
        vm_id: "vm1",
        term: 4,
        role: Role::Primary,
        streams: 2,
    })
    .unwrap();
    match Message::from_payload(1, &p).unwrap() {
        Message::Hello(h) => assert_eq!((h.term, h.history, h.max_version), (4, 0, 2)),
        m => panic!("{m:?}"),
    }
    // A Welcome at version 2 is encoded in the version-2 layout and decodes back.
    let w = protocol::message::Welcome {
        version: 2,
        term: 4,
        last_committed: None,
        committed: None,
        data_ports: vec![],
    };
    let f = Message::Welcome(w.clone()).encode();
    assert_eq!(Message::decode(&f).unwrap(), Message::Welcome(w));
}
