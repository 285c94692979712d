//! Deterministic two-endpoint tests in the manner of quinn-proto: a `Sender` and a `Receiver`
//! joined by a simulated link with virtual time and seeded faults (loss, duplication, reordering,
//! truncation, corruption). No sockets, no clocks. Each test prints its seed on failure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use protocol::checkpoint::{to_messages, Checkpoint};
use protocol::message::{Hello, Kind, Message, Role};
use protocol::page::{encode, EncodeOptions, PageData, PAGE};
use protocol::{
    ProtocolError, Receiver, ReceiverConfig, RefuseCode, Sender, SenderConfig, SenderEvent,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
}

#[derive(Default, Clone, Copy)]
struct Faults {
    loss: f64,
    dup: f64,
    reorder: f64,
    corrupt: f64,
    truncate: f64,
}

struct Link {
    q: VecDeque<(Instant, Vec<u8>)>,
    faults: Faults,
    latency: Duration,
}

impl Link {
    fn new(faults: Faults) -> Self {
        Link {
            q: VecDeque::new(),
            faults,
            latency: Duration::from_micros(200),
        }
    }
    fn send(&mut self, rng: &mut Rng, now: Instant, mut f: Vec<u8>) {
        let fl = self.faults;
        if rng.chance(fl.loss) {
            return;
        }
        if rng.chance(fl.corrupt) && !f.is_empty() {
            let i = (rng.next() as usize) % f.len();
            f[i] ^= 1 << (rng.next() % 8);
        }
        if rng.chance(fl.truncate) && !f.is_empty() {
            let n = (rng.next() as usize) % f.len();
            f.truncate(n);
        }
        let mut at = now + self.latency;
        if rng.chance(fl.reorder) {
            at += Duration::from_micros(rng.next() % 3000);
        }
        if rng.chance(fl.dup) {
            self.q
                .push_back((at + Duration::from_micros(50), f.clone()));
        }
        self.q.push_back((at, f));
        self.q.make_contiguous().sort_by_key(|x| x.0);
    }
    fn due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.q.front().is_some_and(|x| x.0 <= now) {
            self.q.pop_front().map(|x| x.1)
        } else {
            None
        }
    }
    fn next_at(&self) -> Option<Instant> {
        self.q.front().map(|x| x.0)
    }
}

struct Sim {
    rng: Rng,
    now: Instant,
    s: Sender,
    r: Receiver,
    s2r: Link,
    r2s: Link,
    applied: Vec<Checkpoint>,
    events: Vec<SenderEvent>,
    r_errors: Vec<ProtocolError>,
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        let now = Instant::now();
        let mut scfg = SenderConfig::new(7, "vm1", 3);
        scfg.ack_timeout = Duration::from_millis(20);
        scfg.max_attempts = 50;
        let mut s = Sender::new(scfg);
        s.start(now);
        Sim {
            rng: Rng(seed.max(1)),
            now,
            s,
            r: Receiver::new(ReceiverConfig::new(7, "vm1")),
            s2r: Link::new(faults),
            r2s: Link::new(Faults::default()),
            applied: Vec::new(),
            events: Vec::new(),
            r_errors: Vec::new(),
        }
    }

    /// Moves frames and time until nothing is left to do or `limit` passes.
    fn run(&mut self, limit: Duration) {
        let end = self.now + limit;
        while self.now < end {
            while let Some((_, f)) = self.s.poll_transmit(self.now) {
                self.s2r.send(&mut self.rng, self.now, f);
            }
            while let Some(f) = self.r.poll_transmit() {
                self.r2s.send(&mut self.rng, self.now, f);
            }
            let mut progressed = false;
            while let Some(f) = self.s2r.due(self.now) {
                if let Err(e) = self.r.handle_frame(self.now, &f) {
                    self.r_errors.push(e);
                }
                progressed = true;
            }
            while let Some(cp) = self.r.poll_checkpoint() {
                self.r.ack(cp.epoch);
                self.applied.push(cp);
                progressed = true;
            }
            while let Some(f) = self.r2s.due(self.now) {
                let _ = self.s.handle_frame(self.now, &f);
                progressed = true;
            }
            while let Some(e) = self.s.poll_event() {
                self.events.push(e);
            }
            if progressed {
                continue;
            }
            let next = [
                self.s2r.next_at(),
                self.r2s.next_at(),
                self.s.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.s.handle_timeout(self.now);
                }
                _ => break,
            }
            if self.s.in_flight() == 0
                && self.s2r.q.is_empty()
                && self.r2s.q.is_empty()
                && self.s.is_ready()
            {
                // Idle: skip the heartbeat chatter.
                break;
            }
        }
    }
}

fn checkpoint(epoch: u64, seed: u64) -> Checkpoint {
    let mut rng = Rng(seed ^ ((epoch + 1) * 0x9e37));
    let n = 1 + rng.next() % 40;
    let mut gfns: Vec<u64> = (0..n).map(|_| rng.next() % 4096).collect();
    gfns.sort();
    gfns.dedup();
    let pages = gfns
        .into_iter()
        .map(|g| {
            let fill = (rng.next() % 4) as u8;
            let p: Vec<u8> = (0..PAGE)
                .map(|i| {
                    if fill == 0 {
                        0
                    } else {
                        (i as u8).wrapping_mul(fill)
                    }
                })
                .collect();
            (g, encode(&p, None, EncodeOptions::default()))
        })
        .collect();
    Checkpoint {
        epoch,
        kind: if epoch == 0 {
            Kind::Sync
        } else {
            Kind::Incremental
        },
        mem_size: 4096 * 4096,
        pages,
        disk: vec![(epoch * 512, vec![epoch as u8; 512]), (4096, vec![1; 100])],
        state: Some((1, vec![epoch as u8; 300])),
    }
}

/// Sends `n` checkpoints through the faulty link; every one must arrive whole, once, in order.
fn deliver_all(seed: u64, faults: Faults, n: u64) -> Sim {
    let mut sim = Sim::new(seed, faults);
    for _ in 0..20 {
        if sim.s.is_ready() {
            break;
        }
        sim.run(Duration::from_millis(50));
    }
    assert!(sim.s.is_ready(), "seed {seed}: session not up");
    let mut next = 0;
    let deadline = sim.now + Duration::from_secs(600);
    while (sim.applied.len() as u64) < n {
        while next < n && sim.s.can_send() {
            sim.s
                .send_checkpoint(sim.now, checkpoint(next, seed))
                .unwrap();
            next += 1;
        }
        sim.run(Duration::from_millis(100));
        assert!(
            sim.now < deadline,
            "seed {seed}: stuck with {} of {n} applied",
            sim.applied.len()
        );
        assert!(
            !sim.events
                .iter()
                .any(|e| matches!(e, SenderEvent::Failed(_))),
            "seed {seed}: {:?}",
            sim.events
        );
    }
    for (i, cp) in sim.applied.iter().enumerate() {
        assert_eq!(
            *cp,
            checkpoint(i as u64, seed),
            "seed {seed}: checkpoint {i} differs"
        );
    }
    sim.run(Duration::from_millis(200));
    assert_eq!(sim.s.acked(), Some(n - 1), "seed {seed}");
    sim
}

#[test]
fn clean_link_delivers_in_order() {
    let sim = deliver_all(1, Faults::default(), 40);
    assert!(sim.r_errors.is_empty(), "{:?}", sim.r_errors);
    assert!(sim
        .events
        .iter()
        .any(|e| matches!(e, SenderEvent::Acked { epoch: 39, .. })));
}

#[test]
fn loss_is_recovered_by_resending() {
    for seed in 1..=10 {
        let sim = deliver_all(
            seed * 31,
            Faults {
                loss: 0.05,
                ..Default::default()
            },
            30,
        );
        assert!(
            sim.events
                .iter()
                .any(|e| matches!(e, SenderEvent::Resending { .. })),
            "seed {seed}"
        );
    }
}

#[test]
fn duplication_and_reordering_are_harmless() {
    for seed in 1..=10 {
        deliver_all(
            seed * 17,
            Faults {
                dup: 0.2,
                reorder: 0.3,
                ..Default::default()
            },
            30,
        );
    }
}

#[test]
fn corruption_and_truncation_never_deliver_a_bad_checkpoint() {
    for seed in 1..=10 {
        let sim = deliver_all(
            seed * 7,
            Faults {
                corrupt: 0.03,
                truncate: 0.02,
                loss: 0.01,
                dup: 0.05,
                reorder: 0.1,
            },
            25,
        );
        assert!(
            !sim.r_errors.is_empty(),
            "seed {seed}: faults were injected"
        );
    }
}

#[test]
fn corruption_at_every_byte_of_a_frame_is_refused() {
    // One small checkpoint; for every frame, flip every byte: the receiver refuses the frame
    // and no checkpoint is handed out from the damaged stream.
    let cp = checkpoint(0, 99);
    let frames: Vec<Vec<u8>> = to_messages(3, 0, &cp).iter().map(|m| m.encode()).collect();
    for (fi, frame) in frames.iter().enumerate().take(4) {
        for i in 0..frame.len() {
            let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
            let now = Instant::now();
            r.handle_frame(now, &hello(3, 2, 3)).unwrap();
            for (fj, f) in frames.iter().enumerate() {
                let mut f = f.clone();
                if fj == fi {
                    f[i] ^= 0x5a;
                    assert!(
                        r.handle_frame(now, &f).is_err(),
                        "frame {fi} byte {i} accepted"
                    );
                } else {
                    let _ = r.handle_frame(now, &f);
                }
            }
            assert!(
                r.poll_checkpoint().is_none(),
                "frame {fi} byte {i}: damaged checkpoint delivered"
            );
        }
        // Truncation at every length.
        for cut in 0..frame.len() {
            let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
            r.handle_frame(Instant::now(), &hello(3, 2, 3)).unwrap();
            assert!(r.handle_frame(Instant::now(), &frame[..cut]).is_err());
        }
    }
}

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

fn refusal(r: &mut Receiver) -> (RefuseCode, Option<u64>) {
    while let Some(f) = r.poll_transmit() {
        if let Ok(Message::Refuse(x)) = Message::decode(&f) {
            return (x.code, x.epoch);
        }
    }
    panic!("no refusal sent");
}

#[test]
fn checkpoint_crc_mismatch_keeps_previous_state_and_tells_the_sender() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
    r.handle_frame(now, &hello(3, 2, 3)).unwrap();
    for m in to_messages(3, 0, &checkpoint(0, 5)) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    let good = r.poll_checkpoint().expect("checkpoint 0 applies");
    r.ack(good.epoch);
    // Checkpoint 1 with a wrong end-to-end CRC (each frame itself is intact).
    let mut msgs = to_messages(3, 0, &checkpoint(1, 5));
    if let Some(Message::End(e)) = msgs.last_mut() {
        e.crc ^= 1;
    }
    let mut last = Ok(());
    for m in &msgs {
        last = r.handle_frame(now, &m.encode());
    }
    assert!(
        matches!(last, Err(ProtocolError::CheckpointCrc { epoch: 1, .. })),
        "{last:?}"
    );
    assert!(
        r.poll_checkpoint().is_none(),
        "the bad checkpoint is not applied"
    );
    assert_eq!(refusal(&mut r), (RefuseCode::CheckpointCrc, Some(1)));
    // The sender, told so, resends; the resend applies.
    for m in to_messages(3, 1, &checkpoint(1, 5)) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    assert_eq!(r.poll_checkpoint().map(|c| c.epoch), Some(1));

    // The sender side of the same refusal: a typed Resending event.
    let mut sim = Sim::new(3, Faults::default());
    sim.run(Duration::from_millis(10));
    sim.s.send_checkpoint(sim.now, checkpoint(0, 5)).unwrap();
    let refuse = Message::Refuse(protocol::message::Refuse {
        code: RefuseCode::CheckpointCrc,
        epoch: Some(0),
        detail: "test".into(),
    });
    sim.s.handle_frame(sim.now, &refuse.encode()).unwrap();
    assert!(matches!(
        sim.events.first(),
        Some(SenderEvent::Ready { .. })
    ));
    assert!(matches!(
        sim.s.poll_event(),
        Some(SenderEvent::Resending { epoch: 0, .. })
    ));
}

#[test]
fn a_previous_version_peer_is_accepted_at_its_version() {
    use protocol::message::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    assert_eq!(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION - 1);
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
    r.handle_frame(now, &hello(1, MIN_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION))
        .unwrap();
    assert_eq!(r.session().map(|s| s.0), Some(MIN_PROTOCOL_VERSION));
}

#[test]
fn stale_terms_versions_gaps_and_duplicates_are_typed_errors() {
    let now = Instant::now();
    // Version: the peer speaks only versions we do not.
    let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
    assert!(matches!(
        r.handle_frame(
            now,
            &hello(
                3,
                protocol::message::PROTOCOL_VERSION + 1,
                protocol::message::PROTOCOL_VERSION + 2
            )
        ),
        Err(ProtocolError::Version { .. })
    ));
    assert_eq!(refusal(&mut r).0, RefuseCode::Version);
    // Stale term at Hello.
    let mut cfg = ReceiverConfig::new(7, "vm1");
    cfg.min_term = 5;
    let mut r = Receiver::new(cfg);
    assert!(matches!(
        r.handle_frame(now, &hello(4, 2, 3)),
        Err(ProtocolError::StaleTerm { got: 4, current: 5 })
    ));
    assert_eq!(refusal(&mut r).0, RefuseCode::StaleTerm);
    // Wrong cluster.
    let mut r = Receiver::new(ReceiverConfig::new(8, "vm1"));
    assert!(matches!(
        r.handle_frame(now, &hello(3, 2, 3)),
        Err(ProtocolError::WrongPeer { .. })
    ));
    // Stale term inside the session, gap, duplicate.
    let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
    r.handle_frame(now, &hello(3, 2, 3)).unwrap();
    let old = to_messages(2, 0, &checkpoint(0, 1));
    assert!(matches!(
        r.handle_frame(now, &old[0].encode()),
        Err(ProtocolError::StaleTerm { .. })
    ));
    // Before the session's sync or resync, an incremental checkpoint is refused.
    let early = to_messages(3, 0, &checkpoint(5, 1));
    assert!(matches!(
        r.handle_frame(now, &early[0].encode()),
        Err(ProtocolError::Unexpected { .. })
    ));
    for m in to_messages(3, 0, &checkpoint(0, 1)) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    assert!(r.poll_checkpoint().is_some());
    let far = to_messages(3, 0, &checkpoint(100, 1));
    assert!(matches!(
        r.handle_frame(now, &far[0].encode()),
        Err(ProtocolError::Gap { got: 100, .. })
    ));
    let again = to_messages(3, 0, &checkpoint(0, 1));
    assert!(matches!(
        r.handle_frame(now, &again[0].encode()),
        Err(ProtocolError::Duplicate { .. })
    ));
    // A part whose seq is beyond what Begin announced.
    let mut msgs = to_messages(3, 0, &checkpoint(1, 1));
    let k = msgs.len() - 3;
    if let Message::Disk(d) = &mut msgs[k] {
        d.id.seq = 999;
    }
    let mut saw = false;
    for m in &msgs {
        if let Err(ProtocolError::Reordered { .. }) = r.handle_frame(now, &m.encode()) {
            saw = true;
        }
    }
    assert!(saw, "part beyond the announced count refused");
    // Oversize frame header.
    let mut f = msgs[0].encode();
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        r.handle_frame(now, &f),
        Err(ProtocolError::Oversize { .. })
    ));
}

#[test]
fn idle_peer_times_out() {
    let mut sim = Sim::new(11, Faults::default());
    sim.run(Duration::from_millis(10));
    // The backup goes silent: drop everything it would send.
    sim.r2s.faults.loss = 1.0;
    sim.s.send_checkpoint(sim.now, checkpoint(0, 1)).unwrap();
    for _ in 0..100 {
        sim.run(Duration::from_millis(100));
        if sim
            .events
            .iter()
            .any(|e| matches!(e, SenderEvent::Failed(_)))
        {
            break;
        }
    }
    assert!(
        sim.events.iter().any(|e| matches!(
            e,
            SenderEvent::Failed(ProtocolError::PeerTimeout { .. })
                | SenderEvent::Failed(ProtocolError::Closed(_))
        )),
        "{:?}",
        sim.events
    );
}

#[test]
fn xor_pages_apply_against_the_replica() {
    let old: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
    let mut new = old.clone();
    new[10] = 0xee;
    let enc = encode(&new, Some(&old), EncodeOptions::default());
    assert!(matches!(enc, PageData::Xor(_)));
    assert_eq!(protocol::page::decode(4, &enc, Some(&old)).unwrap(), new);
}

/// Checkpoint `seq` of kind `kind` (seeded contents).
fn checkpoint_of(seq: u64, kind: Kind) -> Checkpoint {
    Checkpoint {
        epoch: seq,
        kind,
        ..checkpoint(seq, 3)
    }
}

#[test]
fn a_session_starts_at_any_seq_with_a_resync_and_parts_may_race_ahead_of_begin() {
    let now = Instant::now();
    let committed = protocol::message::Position {
        history: 9,
        term: 3,
        seq: 40,
    };
    let mut cfg = ReceiverConfig::new(7, "vm1");
    cfg.committed = Some(committed);
    let mut r = Receiver::new(cfg);
    r.handle_frame(now, &hello(3, 2, 3)).unwrap();
    // The Welcome reports the committed position.
    let w = std::iter::from_fn(|| r.poll_transmit())
        .find_map(|f| match Message::decode(&f) {
            Ok(Message::Welcome(w)) => Some(w),
            _ => None,
        })
        .expect("welcome");
    assert_eq!(w.committed, Some(committed));
    // A resync from 40 numbered 57 (the primary's seq): its parts arrive before its Begin.
    let msgs = to_messages(3, 0, &checkpoint_of(57, Kind::Resync { from: 40 }));
    for m in msgs[1..].iter().chain(&msgs[..1]) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    let cp = r.poll_checkpoint().expect("the resync is delivered");
    assert_eq!((cp.epoch, cp.kind), (57, Kind::Resync { from: 40 }));
    r.ack(57);
    // Then incremental checkpoints follow from 58.
    for m in to_messages(3, 0, &checkpoint_of(58, Kind::Incremental)) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    assert_eq!(r.poll_checkpoint().map(|c| c.epoch), Some(58));
}

#[test]
fn a_failed_apply_with_checkpoints_pipelined_behind_it_does_not_livelock() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
    r.handle_frame(now, &hello(3, 2, 3)).unwrap();
    for seq in 10..14 {
        let kind = if seq == 10 {
            Kind::Sync
        } else {
            Kind::Incremental
        };
        for m in to_messages(3, 0, &checkpoint_of(seq, kind)) {
            r.handle_frame(now, &m.encode()).unwrap();
        }
    }
    assert_eq!(r.poll_checkpoint().map(|c| c.epoch), Some(10));
    r.ack(10);
    // Applying 11 fails while 12 and 13 wait behind it: they are dropped, not handed out to
    // fail in turn; the refusal asks for 11 again.
    assert_eq!(r.poll_checkpoint().map(|c| c.epoch), Some(11));
    r.apply_failed(11, "disk full");
    assert!(r.poll_checkpoint().is_none());
    assert_eq!(refusal(&mut r), (RefuseCode::ApplyFailed, Some(11)));
    for seq in 11..14 {
        for m in to_messages(3, 1, &checkpoint_of(seq, Kind::Incremental)) {
            r.handle_frame(now, &m.encode()).unwrap();
        }
    }
    let got: Vec<u64> = std::iter::from_fn(|| r.poll_checkpoint())
        .map(|c| c.epoch)
        .collect();
    assert_eq!(got, vec![11, 12, 13]);
}

#[test]
fn a_checkpoint_still_being_transmitted_is_never_resent_and_heartbeats_overtake_it() {
    let t0 = Instant::now();
    let mut s = Sender::new(SenderConfig::new(7, "vm1", 3));
    s.start(t0);
    while s.poll_transmit(t0).is_some() {}
    let welcome = Message::Welcome(protocol::message::Welcome {
        version: 3,
        term: 3,
        last_committed: None,
        committed: None,
        data_ports: vec![],
    });
    s.handle_frame(t0, &welcome.encode()).unwrap();
    while s.poll_event().is_some() {}
    s.send_checkpoint(t0, checkpoint_of(5, Kind::Sync)).unwrap();
    // A slow link: nothing leaves for 5 ack timeouts (the backup echoes heartbeats meanwhile).
    let mut now = t0;
    let mut heartbeats = 0;
    for _ in 0..50 {
        now += Duration::from_millis(100);
        s.handle_frame(
            now,
            &Message::Heartbeat(protocol::message::Heartbeat { term: 3, seq: 0 }).encode(),
        )
        .unwrap();
        s.handle_timeout(now);
        // Only the frame at the head of the queue may leave: a heartbeat jumps the queue.
        if let Some((lane, f)) = s.poll_transmit(now) {
            assert_eq!(lane, 0);
            assert!(
                matches!(Message::decode(&f), Ok(Message::Heartbeat(_))),
                "only heartbeats leave"
            );
            heartbeats += 1;
        }
    }
    assert!(
        heartbeats >= 40,
        "heartbeats went out while the data waited: {heartbeats}"
    );
    assert!(
        !std::iter::from_fn(|| s.poll_event()).any(|e| matches!(e, SenderEvent::Resending { .. })),
        "a checkpoint that has not left is not resent"
    );
    // It leaves now; the ack timeout runs from here.
    while s.poll_transmit(now).is_some() {}
    let left = now;
    s.handle_timeout(left + Duration::from_millis(900));
    assert!(s.poll_event().is_none());
    s.handle_frame(
        left + Duration::from_millis(900),
        &Message::Heartbeat(protocol::message::Heartbeat { term: 3, seq: 0 }).encode(),
    )
    .unwrap();
    s.handle_timeout(left + Duration::from_millis(1001));
    assert!(
        std::iter::from_fn(|| s.poll_event())
            .any(|e| matches!(e, SenderEvent::Resending { epoch: 5, .. })),
        "resent once an ack timeout passed after it left"
    );
}

#[test]
fn complete_checkpoints_not_yet_handed_out_count_against_the_staging_bound() {
    let now = Instant::now();
    let first = to_messages(3, 0, &checkpoint_of(0, Kind::Sync));
    let size = {
        let mut r = Receiver::new(ReceiverConfig::new(7, "vm1"));
        r.handle_frame(now, &hello(3, 2, 3)).unwrap();
        for m in &first {
            r.handle_frame(now, &m.encode()).unwrap();
        }
        r.staged_bytes()
    };
    assert!(size > 0, "a complete checkpoint still held counts");
    let mut cfg = ReceiverConfig::new(7, "vm1");
    cfg.max_staged_bytes = size + size / 2;
    let mut r = Receiver::new(cfg);
    r.handle_frame(now, &hello(3, 2, 3)).unwrap();
    for m in &first {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    // Not handed out yet: the next checkpoint's parts do not fit.
    let second = to_messages(3, 0, &checkpoint_of(1, Kind::Incremental));
    let refused = second.iter().any(|m| {
        matches!(
            r.handle_frame(now, &m.encode()),
            Err(ProtocolError::StagingFull { .. })
        )
    });
    assert!(
        refused,
        "the bound counts what is complete but not handed out"
    );
    // Handed out: room again (the refused checkpoint is resent with a new attempt).
    assert!(r.poll_checkpoint().is_some());
    assert_eq!(r.staged_bytes(), 0);
    for m in to_messages(3, 1, &checkpoint_of(1, Kind::Incremental)) {
        r.handle_frame(now, &m.encode()).unwrap();
    }
    assert_eq!(r.poll_checkpoint().map(|c| c.epoch), Some(1));
}
