//! The primary's side of a session, as a state machine without I/O.
//!
//! [`Sender::send_checkpoint`] queues a checkpoint's frames; [`Sender::poll_transmit`] hands
//! them out, each with the lane it should travel on (lane 0 is the control stream; parts are
//! spread round-robin over the data lanes — which data stream carries a data frame is the
//! primary's writer's choice: `primary/src/writer.rs`). Acks release checkpoints; a refusal or an ack
//! timeout resends every unacknowledged checkpoint from the one concerned, with a new attempt
//! number, up to a limit. Events tell the application what happened.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::checkpoint::{encode_frames, Checkpoint};
use crate::error::ProtocolError;
use crate::message::*;

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Cluster identity.
    pub cluster_id: u64,
    /// The VM.
    pub vm_id: String,
    /// Our term.
    pub term: u64,
    /// Our history id (see [`Hello::history`]).
    pub history: u64,
    /// Data lanes (streams) to spread parts over.
    pub lanes: u8,
    /// Checkpoints that may be unacknowledged at once.
    pub window: u64,
    /// How long to wait for an ack before resending.
    pub ack_timeout: Duration,
    /// How often to send a heartbeat when idle.
    pub heartbeat_interval: Duration,
    /// Silence after which the peer is declared gone.
    pub idle_timeout: Duration,
    /// Resends of one checkpoint before giving up.
    pub max_attempts: u32,
}

impl SenderConfig {
    /// Defaults for `cluster_id` / `vm_id` / `term`.
    pub fn new(cluster_id: u64, vm_id: &str, term: u64) -> Self {
        SenderConfig {
            cluster_id,
            vm_id: vm_id.to_string(),
            term,
            history: 0,
            lanes: 2,
            window: 8,
            ack_timeout: Duration::from_millis(1000),
            heartbeat_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(3000),
            max_attempts: 5,
        }
    }
}

/// What happened, for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The backup accepted the session.
    Ready {
        /// Negotiated version.
        version: u16,
        /// The backup's committed image (v3; None from a v2 backup or an empty one).
        committed: Option<Position>,
        /// Ports on the backup's address that take this session's data connections (v4).
        data_ports: Vec<u16>,
    },
    /// Checkpoints up to `epoch` are applied on the backup.
    Acked {
        /// Highest acknowledged epoch.
        epoch: u64,
        /// Time from sending that checkpoint to its ack.
        latency: Duration,
    },
    /// Checkpoints from `epoch` on are being resent.
    Resending {
        /// First epoch resent.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// The session failed; nothing more will be sent.
    Failed(ProtocolError),
}

#[derive(Debug)]
struct InFlight {
    cp: Checkpoint,
    attempt: u32,
    /// When its `End` left (was handed to the transport by [`Sender::poll_transmit`]): the
    /// ack timeout runs from there, so a big checkpoint still being transmitted over a slow
    /// link is never resent. None while its frames are still queued.
    sent_at: Option<Instant>,
    /// When it was queued (for the ack latency if it never left).
    queued_at: Instant,
}

/// A queued frame: lane, bytes, and for a checkpoint's `End` its (epoch, attempt).
type Outgoing = (u8, Vec<u8>, Option<(u64, u32)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    AwaitWelcome,
    Ready,
    Failed,
}

/// The sending state machine.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    phase: Phase,
    unacked: BTreeMap<u64, InFlight>,
    /// Frames to send: lane, bytes, and for a checkpoint's `End` its (epoch, attempt).
    out: VecDeque<Outgoing>,
    events: VecDeque<SenderEvent>,
    next_lane: u8,
    last_heard: Option<Instant>,
    last_sent: Option<Instant>,
    /// Last heartbeat queued: heartbeats go every `heartbeat_interval` even while data flows,
    /// ahead of queued data, so a peer receiving one long checkpoint still hears from us.
    last_heartbeat: Option<Instant>,
    heartbeat_seq: u64,
    acked: Option<u64>,
}

impl Sender {
    /// A sender; call [`Sender::start`] to send `Hello`.
    pub fn new(cfg: SenderConfig) -> Self {
        Sender {
            cfg,
            phase: Phase::Start,
            unacked: BTreeMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            next_lane: 0,
            last_heard: None,
            last_sent: None,
            last_heartbeat: None,
            heartbeat_seq: 0,
            acked: None,
        }
    }

    /// Queues `Hello`.
    pub fn start(&mut self, now: Instant) {
        if self.phase != Phase::Start {
            return;
        }
        self.send_hello(now);
        self.last_heard = Some(now);
        self.phase = Phase::AwaitWelcome;
    }

    fn send_hello(&mut self, now: Instant) {
        let hello = Message::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            cluster_id: self.cfg.cluster_id,
            vm_id: self.cfg.vm_id.clone(),
            term: self.cfg.term,
            role: Role::Primary,
            streams: self.cfg.lanes,
            history: self.cfg.history,
        });
        self.queue(0, &hello, now);
    }

    /// True once the backup welcomed us.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The lane of the next frame [`poll_transmit`](Self::poll_transmit) would hand out.
    pub fn next_lane(&self) -> Option<u8> {
        self.out.front().map(|o| o.0)
    }

    /// True once the session failed or was closed (nothing more will be sent but what is
    /// queued).
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Highest epoch the backup acknowledged.
    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    /// Checkpoints sent but not acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// True if another checkpoint may be sent now.
    pub fn can_send(&self) -> bool {
        self.phase == Phase::Ready && (self.unacked.len() as u64) < self.cfg.window
    }

    fn queue(&mut self, lane: u8, m: &Message, now: Instant) {
        self.out.push_back((lane, m.encode(), None));
        self.last_sent = Some(now);
    }

    fn data_lane(&mut self) -> u8 {
        let lanes = self.cfg.lanes.max(1);
        let l = 1 + self.next_lane % lanes;
        self.next_lane = self.next_lane.wrapping_add(1);
        l
    }

    fn transmit_checkpoint(&mut self, epoch: u64) {
        let Some(f) = self.unacked.get_mut(&epoch) else {
            return;
        };
        f.sent_at = None;
        let attempt = f.attempt;
        let frames = encode_frames(self.cfg.term, f.attempt, &f.cp);
        let n = frames.len();
        for (i, fr) in frames.into_iter().enumerate() {
            // Begin on the control lane; the parts spread over the data lanes, and End after
            // them on a data lane: the primary's one data writer sends data frames in this
            // order (over the streams it chooses), so End leaves after the parts (the
            // receiver takes any order).
            let (lane, end) = match i {
                0 => (0, None),
                i if i == n - 1 => (self.data_lane(), Some((epoch, attempt))),
                _ => (self.data_lane(), None),
            };
            self.out.push_back((lane, fr, end));
        }
    }

    /// Queues a checkpoint. Its epoch must follow the previous one.
    pub fn send_checkpoint(&mut self, now: Instant, cp: Checkpoint) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Ready => {}
            Phase::Failed => return Err(ProtocolError::Closed("sender failed".into())),
            _ => {
                return Err(ProtocolError::Unexpected {
                    kind: "checkpoint",
                    state: "before Welcome",
                })
            }
        }
        if !self.can_send() {
            return Err(ProtocolError::Unexpected {
                kind: "checkpoint",
                state: "window full",
            });
        }
        let epoch = cp.epoch;
        // The session's first checkpoint (a sync, pre-copy round or resync) may have any seq;
        // every later one follows the previous.
        let expected = self
            .unacked
            .keys()
            .next_back()
            .copied()
            .or(self.acked)
            .map(|e| e + 1);
        match expected {
            Some(x) if epoch != x => {
                return Err(ProtocolError::Gap {
                    got: epoch,
                    expected: x,
                    window: self.cfg.window,
                })
            }
            None if !cp.kind.starts_stream() => {
                return Err(ProtocolError::Unexpected {
                    kind: "incremental checkpoint",
                    state: "before the session's sync or resync",
                })
            }
            _ => {}
        }
        self.unacked.insert(
            epoch,
            InFlight {
                cp,
                attempt: 0,
                sent_at: None,
                queued_at: now,
            },
        );
        self.transmit_checkpoint(epoch);
        Ok(())
    }

    fn fail(&mut self, e: ProtocolError) {
        if self.phase != Phase::Failed {
            self.phase = Phase::Failed;
            self.events.push_back(SenderEvent::Failed(e));
        }
    }

    fn resend_from(&mut self, epoch: u64, reason: String) {
        let epochs: Vec<u64> = self.unacked.range(epoch..).map(|(e, _)| *e).collect();
        if epochs.is_empty() {
            return;
        }
        for e in &epochs {
            if let Some(f) = self.unacked.get_mut(e) {
                f.attempt += 1;
                if f.attempt > self.cfg.max_attempts {
                    let e = ProtocolError::Closed(format!(
                        "checkpoint {e} not accepted after {} attempts: {reason}",
                        self.cfg.max_attempts
                    ));
                    self.fail(e);
                    return;
                }
            }
        }
        self.events.push_back(SenderEvent::Resending {
            epoch: epochs[0],
            reason,
        });
        for e in epochs {
            self.transmit_checkpoint(e);
        }
    }

    /// Processes one frame from the backup.
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.phase == Phase::Failed {
            return Err(ProtocolError::Closed("sender failed".into()));
        }
        self.last_heard = Some(now);
        let msg = Message::decode(bytes)?;
        match (self.phase, msg) {
            (Phase::AwaitWelcome, Message::Welcome(w)) => {
                if w.term != self.cfg.term
                    || !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.version)
                {
                    let e = ProtocolError::Malformed {
                        kind: "Welcome",
                        why: format!("version {} term {}", w.version, w.term),
                    };
                    self.fail(e.clone());
                    return Err(e);
                }
                self.phase = Phase::Ready;
                self.acked = None;
                self.events.push_back(SenderEvent::Ready {
                    version: w.version,
                    committed: w.committed,
                    data_ports: w.data_ports,
                });
                Ok(())
            }
            (Phase::Ready, Message::Ack(a)) => {
                if a.term != self.cfg.term {
                    return Err(ProtocolError::StaleTerm {
                        got: a.term,
                        current: self.cfg.term,
                    });
                }
                // A repeated ack (the backup answers each duplicate of a resend with its last
                // ack) is harmless: no error, no log line per frame.
                if self.acked.is_some_and(|x| a.epoch <= x) {
                    return Ok(());
                }
                let Some(f) = self.unacked.get(&a.epoch) else {
                    return Err(ProtocolError::Duplicate {
                        what: format!("ack of checkpoint {}", a.epoch),
                    });
                };
                let latency = now.saturating_duration_since(f.sent_at.unwrap_or(f.queued_at));
                let rest = self.unacked.split_off(&(a.epoch + 1));
                self.unacked = rest;
                self.acked = Some(a.epoch);
                self.events.push_back(SenderEvent::Acked {
                    epoch: a.epoch,
                    latency,
                });
                Ok(())
            }
            (_, Message::Refuse(r)) => {
                let fatal = matches!(
                    r.code,
                    RefuseCode::Version | RefuseCode::WrongPeer | RefuseCode::StaleTerm
                ) || self.phase != Phase::Ready;
                if fatal {
                    self.fail(ProtocolError::Refused {
                        code: r.code,
                        detail: r.detail,
                    });
                } else if let Some(ep) = r.epoch {
                    self.resend_from(ep, format!("{:?}: {}", r.code, r.detail));
                }
                Ok(())
            }
            (Phase::Ready, Message::Welcome(_)) => Ok(()), // repeated Welcome after a repeated Hello
            (_, Message::Heartbeat(_)) => Ok(()),
            (_, Message::Goodbye(g)) => {
                self.fail(ProtocolError::Closed(format!(
                    "peer said goodbye: {}",
                    g.reason
                )));
                Ok(())
            }
            (_, m) => Err(ProtocolError::Unexpected {
                kind: m.kind().1,
                state: "sender",
            }),
        }
    }

    /// The next frame to send and its lane (0 = control, 1.. = data); `now` is when it leaves
    /// (a checkpoint's ack timeout starts when its `End` leaves).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(u8, Vec<u8>)> {
        let (lane, f, end) = self.out.pop_front()?;
        if let Some((epoch, attempt)) = end {
            if let Some(c) = self
                .unacked
                .get_mut(&epoch)
                .filter(|c| c.attempt == attempt)
            {
                c.sent_at = Some(now);
            }
        }
        Some((lane, f))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// When [`Sender::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Failed | Phase::Start) {
            return None;
        }
        let mut t = self.last_heard.map(|h| h + self.cfg.idle_timeout);
        let mut earliest = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        earliest(
            self.unacked
                .values()
                .filter_map(|f| f.sent_at.map(|s| s + self.cfg.ack_timeout))
                .min(),
        );
        if self.phase == Phase::AwaitWelcome {
            earliest(self.last_sent.map(|s| s + self.cfg.ack_timeout));
        }
        if self.phase == Phase::Ready {
            let last = self.last_heartbeat.max(self.last_sent);
            earliest(last.map(|s| s + self.cfg.heartbeat_interval));
        }
        t
    }

    /// Heartbeats, ack timeouts, peer timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Failed | Phase::Start) {
            return;
        }
        if let Some(h) = self.last_heard {
            if now >= h + self.cfg.idle_timeout {
                let ms = self.cfg.idle_timeout.as_millis() as u64;
                self.fail(ProtocolError::PeerTimeout { ms });
                return;
            }
        }
        if self.phase == Phase::AwaitWelcome
            && self
                .last_sent
                .is_some_and(|s| now >= s + self.cfg.ack_timeout)
        {
            self.send_hello(now);
        }
        let late = self
            .unacked
            .iter()
            .find(|(_, f)| f.sent_at.is_some_and(|s| now >= s + self.cfg.ack_timeout))
            .map(|(e, _)| *e);
        if let Some(e) = late {
            self.resend_from(e, "ack timeout".into());
        }
        let last = self.last_heartbeat.max(self.last_sent);
        if self.phase == Phase::Ready
            && last.is_some_and(|s| now >= s + self.cfg.heartbeat_interval)
        {
            self.heartbeat_seq += 1;
            let hb = Message::Heartbeat(Heartbeat {
                term: self.cfg.term,
                seq: self.heartbeat_seq,
            });
            // Ahead of any queued checkpoint data: the peer hears from us while it flows.
            self.out.push_front((0, hb.encode(), None));
            self.last_heartbeat = Some(now);
        }
    }

    /// Queues `Goodbye`.
    pub fn close(&mut self, now: Instant, reason: &str) {
        let mut r = reason.to_string();
        r.truncate(MAX_TEXT);
        self.queue(0, &Message::Goodbye(Goodbye { reason: r }), now);
        self.phase = Phase::Failed;
    }
}
