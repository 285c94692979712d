//! Tests of the TCP peer table: learning from transmitted segments, the pure ACKs it makes
//! (checksums verified independently), SACK-permitted stripping, and hostile frames.

use proptest::prelude::*;

use super::*;

const GUEST: [u8; 4] = [10, 0, 0, 2];
const CLIENT: [u8; 4] = [10, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

struct Seg<'a> {
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: &'a [u8],
    payload: &'a [u8],
}

/// Independent ones' complement sum: every 16-bit word, carries folded at the end.
fn ones_sum(words: &[u8]) -> u16 {
    let mut padded = words.to_vec();
    if padded.len() % 2 == 1 {
        padded.push(0);
    }
    let mut s: u64 = 0;
    for w in padded.chunks(2) {
        s += u64::from(w[0]) << 8 | u64::from(w[1]);
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn frame(s: &Seg) -> Vec<u8> {
    let (dst_mac, src_mac) = if s.from.0 == GUEST {
        (CLIENT_MAC, GUEST_MAC)
    } else {
        (GUEST_MAC, CLIENT_MAC)
    };
    let tcp_len = 20 + s.options.len() + s.payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + tcp_len) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 7, 0x40, 0, 64, 6, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&s.from.0);
    f.extend_from_slice(&s.to.0);
    let c = !ones_sum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let t = f.len();
    f.extend_from_slice(&s.from.1.to_be_bytes());
    f.extend_from_slice(&s.to.1.to_be_bytes());
    f.extend_from_slice(&s.seq.to_be_bytes());
    f.extend_from_slice(&s.ack.to_be_bytes());
    f.push((((20 + s.options.len()) / 4) << 4) as u8);
    f.push(s.flags);
    f.extend_from_slice(&s.window.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(s.options);
    f.extend_from_slice(s.payload);
    let c = !tcp_sum(&f);
    f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// The ones' complement sum over the pseudo header and the segment (0xffff when valid).
fn tcp_sum(f: &[u8]) -> u16 {
    let tcp = &f[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(tcp);
    ones_sum(&pseudo)
}

fn data_from_guest(seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    frame(&Seg {
        from: (GUEST, 7000),
        to: (CLIENT, 40000),
        seq,
        ack,
        flags: ACK | 0x08,
        window: 4096,
        options: &[],
        payload,
    })
}

#[test]
fn a_data_segment_from_the_guest_makes_a_valid_pure_ack_at_its_end() {
    let mut t = TcpPeers::default();
    t.observe_tx(&data_from_guest(1000, 5000, b"VALUE x\n"));
    assert_eq!(t.len(), 1);
    let frames = t.nudge_frames();
    let f = &frames[0];
    assert_eq!(f.len(), 54);
    assert_eq!(&f[0..6], &CLIENT_MAC);
    assert_eq!(&f[6..12], &GUEST_MAC);
    assert_eq!(ones_sum(&f[14..34]), 0xffff, "IP checksum");
    assert_eq!(tcp_sum(f), 0xffff, "TCP checksum");
    let s = parse(f).unwrap();
    assert_eq!(
        (s.src, s.sport, s.dst, s.dport),
        (GUEST, 7000, CLIENT, 40000)
    );
    assert_eq!((s.seq, s.ack, s.flags, s.window), (1008, 5000, ACK, 4096));
    assert_eq!(s.payload, 0);
}

#[test]
fn the_latest_segment_wins_and_a_syn_counts_one() {
    let mut t = TcpPeers::default();
    let synack = frame(&Seg {
        from: (GUEST, 7000),
        to: (CLIENT, 40000),
        seq: 99,
        ack: 1,
        flags: SYN | ACK,
        window: 8192,
        options: &[2, 4, 5, 0xb4],
        payload: &[],
    });
    t.observe_tx(&synack);
    assert_eq!(t.peers()[0].seq, 100);
    t.observe_tx(&data_from_guest(100, 20, b"OK\n"));
    assert_eq!((t.peers()[0].seq, t.peers()[0].ack), (103, 20));
    // Sequence numbers wrap.
    t.observe_tx(&data_from_guest(u32::MAX - 1, 30, b"abcd"));
    assert_eq!(t.peers()[0].seq, 2);
    assert_eq!(t.len(), 1);
}

#[test]
fn fin_and_rst_either_way_and_a_new_syn_end_the_entry() {
    let mut t = TcpPeers::default();
    for end in [FIN | ACK, RST] {
        t.observe_tx(&data_from_guest(1, 1, b"x"));
        let mut f = data_from_guest(2, 1, b"");
        f[47] = end;
        t.observe_tx(&f);
        assert!(t.is_empty());
    }
    for end in [RST, SYN] {
        t.observe_tx(&data_from_guest(1, 1, b"x"));
        let mut f = frame(&Seg {
            from: (CLIENT, 40000),
            to: (GUEST, 7000),
            seq: 1,
            ack: 0,
            flags: end,
            window: 100,
            options: &[],
            payload: &[],
        });
        t.observe_rx(&mut f);
        assert!(t.is_empty());
    }
}

#[test]
fn a_syn_loses_sack_permitted_and_keeps_a_valid_checksum_and_its_other_options() {
    let mut t = TcpPeers::default();
    // MSS 1460, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN).
    let opts = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    let mut f = frame(&Seg {
        from: (CLIENT, 40000),
        to: (GUEST, 7000),
        seq: 7,
        ack: 0,
        flags: SYN,
        window: 64240,
        options: &opts,
        payload: &[],
    });
    assert!(t.observe_rx(&mut f));
    assert_eq!(tcp_sum(&f), 0xffff);
    let o = &f[54..74];
    assert_eq!(&o[0..4], &[2, 4, 5, 0xb4]);
    assert_eq!(&o[4..6], &[1, 1]);
    assert_eq!(&o[6..20], &opts[6..20]);
    // A data segment is never changed.
    let mut d = data_from_guest(1, 1, &[4, 2, 4, 2]);
    let before = d.clone();
    assert!(!t.observe_rx(&mut d));
    assert_eq!(d, before);
}

#[test]
fn the_least_recently_used_connection_goes_first() {
    let mut t = TcpPeers::default();
    for port in 0..MAX_PEERS as u16 + 10 {
        let f = frame(&Seg {
            from: (GUEST, 7000),
            to: (CLIENT, 1000 + port),
            seq: 1,
            ack: 1,
            flags: ACK,
            window: 1,
            options: &[],
            payload: &[],
        });
        t.observe_tx(&f);
    }
    assert_eq!(t.len(), MAX_PEERS);
    assert!(t.peers().iter().all(|p| p.remote.1 >= 1010));
    assert!(t.validate().is_ok());
}

#[test]
fn a_table_too_long_from_a_file_is_refused() {
    let p = Peer {
        eth: [0; 14],
        local: (GUEST, 1),
        remote: (CLIENT, 2),
        seq: 0,
        ack: 0,
        window: 0,
        used: 0,
    };
    let t = TcpPeers {
        peers: vec![p; MAX_PEERS + 1],
        clock: 0,
    };
    assert!(t.validate().unwrap_err().contains("TCP peers"));
}

#[test]
fn fragments_and_other_protocols_are_ignored() {
    let mut t = TcpPeers::default();
    let mut f = data_from_guest(1, 1, b"x");
    f[20] = 0x20; // more fragments
    t.observe_tx(&f);
    let mut u = data_from_guest(1, 1, b"x");
    u[23] = 17; // UDP
    t.observe_tx(&u);
    let mut arp = data_from_guest(1, 1, b"x");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    t.observe_tx(&arp);
    assert!(t.is_empty());
}

proptest! {
    /// Arbitrary bytes, or a valid frame with a byte changed and cut short, never panic.
    #[test]
    fn hostile_frames_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..120),
        at in 0usize..80, v in any::<u8>(), cut in 0usize..80,
    ) {
        let mut t = TcpPeers::default();
        let mut b = bytes.clone();
        t.observe_tx(&b);
        t.observe_rx(&mut b);
        let mut f = frame(&Seg {
            from: (CLIENT, 40000), to: (GUEST, 7000), seq: 7, ack: 0, flags: SYN,
            window: 1, options: &[2, 4, 5, 0xb4, 4, 2, 1, 1], payload: &[],
        });
        if at < f.len() { f[at] = v; }
        f.truncate(f.len().saturating_sub(cut % 20));
        t.observe_rx(&mut f);
        t.observe_tx(&f);
        let _ = t.nudge_frames();
    }
}
