//! The backup's side of a session, as a state machine without I/O.
//!
//! Feed it frames with [`Receiver::handle_frame`]; take frames to send with
//! [`Receiver::poll_transmit`] and complete, verified checkpoints with
//! [`Receiver::poll_checkpoint`]; after applying one, call [`Receiver::ack`]. Parts of a
//! checkpoint may arrive in any order (several streams); a checkpoint is handed out only when
//! `Begin`, every announced part and `End` are there and the end-to-end CRC matches, and only in
//! epoch order. Anything else is a typed [`ProtocolError`], answered with a `Refuse` so the
//! primary can resend; nothing partial is ever handed out.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::checkpoint::{combine, Checkpoint, PartCrc};
use crate::error::ProtocolError;
use crate::message::*;
use crate::page::PageData;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Cluster identity the primary must present.
    pub cluster_id: u64,
    /// VM this backup replicates.
    pub vm_id: String,
    /// Highest term seen so far (from the failover manager or a previous session).
    pub min_term: u64,
    /// The replica image's committed position, reported in `Welcome` (the primary decides
    /// between a quick resync and a full sync from it).
    pub committed: Option<Position>,
    /// Checkpoints that may be in flight beyond the next expected one.
    pub window: u64,
    /// Largest amount of staged checkpoint data.
    pub max_staged_bytes: u64,
    /// Silence after which the peer is declared gone.
    pub idle_timeout: Duration,
    /// Ports where this session's data connections are accepted, offered in `Welcome` to a
    /// version-4 primary (at most [`crate::message::MAX_DATA_PORTS`]).
    pub data_ports: Vec<u16>,
}

impl ReceiverConfig {
    /// Defaults for `cluster_id` / `vm_id`.
    pub fn new(cluster_id: u64, vm_id: &str) -> Self {
        ReceiverConfig {
            cluster_id,
            vm_id: vm_id.to_string(),
            min_term: 0,
            committed: None,
            window: 8,
            max_staged_bytes: 4 << 30,
            idle_timeout: Duration::from_millis(3000),
            data_ports: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Staged {
    attempt: u32,
    begin: Option<Begin>,
    end: Option<End>,
    crcs: BTreeMap<u32, PartCrc>,
    pages: Vec<(u64, PageData)>,
    disk: Vec<(u32, u64, Vec<u8>)>,
    state: Vec<(u32, u32, Vec<u8>)>,
    bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Ready { version: u16, term: u64 },
    Closed,
}

/// The receiving state machine.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    phase: Phase,
    /// History id of the session's primary (from its `Hello`).
    history: Option<u64>,
    /// Highest seq handed out to the application in this session.
    delivered: Option<u64>,
    /// Seq of the session's first checkpoint (a sync, pre-copy round or resync, which may start
    /// at any seq): set by its `Begin`; until then no incremental checkpoint is accepted.
    base: Option<u64>,
    staging: BTreeMap<u64, Staged>,
    /// Complete checkpoints waiting for an earlier one, and their staged size.
    complete: BTreeMap<u64, (Checkpoint, u64)>,
    /// Checkpoints ready for the application, and their staged size.
    ready: VecDeque<(Checkpoint, u64)>,
    /// Bytes of `complete` and `ready`: they count against the staging bound until handed
    /// out, as the staged parts did.
    done_bytes: u64,
    out: VecDeque<Vec<u8>>,
    staged_bytes: u64,
    /// When the peer was last heard from; until its first frame, when the receiver started
    /// (a peer that connects and says nothing is timed out like one that falls silent).
    last_heard: Instant,
    close_reason: Option<ProtocolError>,
    /// Highest epoch the application acknowledged.
    last_acked: Option<u64>,
    /// CRC (and covered length) of the frame being handled.
    frame_crc: PartCrc,
}

impl Receiver {
    /// A receiver waiting for `Hello`; its idle clock starts now (see [`Receiver::start`]).
    pub fn new(cfg: ReceiverConfig) -> Self {
        Receiver {
            history: None,
            delivered: None,
            base: None,
            cfg,
            phase: Phase::AwaitHello,
            staging: BTreeMap::new(),
            complete: BTreeMap::new(),
            ready: VecDeque::new(),
            done_bytes: 0,
            out: VecDeque::new(),
            staged_bytes: 0,
            last_heard: Instant::now(),
            close_reason: None,
            last_acked: None,
            frame_crc: PartCrc { crc: 0, len: 0 },
        }
    }

    /// Starts the idle clock at `now` (the connection's start, or a simulation's virtual
    /// time): if nothing arrives within `idle_timeout` of it, [`Receiver::handle_timeout`]
    /// closes the session.
    pub fn start(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The negotiated version and term, once the session is up.
    pub fn session(&self) -> Option<(u16, u64)> {
        match self.phase {
            Phase::Ready { version, term } => Some((version, term)),
            _ => None,
        }
    }

    /// The history id the session's primary announced in its `Hello` (0 from a version-2
    /// primary), once the session is up.
    pub fn history(&self) -> Option<u64> {
        self.session().and(self.history)
    }

    /// Why the session closed, if it did.
    pub fn closed(&self) -> Option<&ProtocolError> {
        self.close_reason.as_ref()
    }

    /// Bytes of checkpoint data currently staged.
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes + self.done_bytes
    }

    fn send(&mut self, m: Message) {
        self.out.push_back(m.encode());
    }

    fn refuse(&mut self, code: RefuseCode, epoch: Option<u64>, err: &ProtocolError) {
        let mut detail = err.to_string();
        detail.truncate(MAX_TEXT);
        self.send(Message::Refuse(Refuse {
            code,
            epoch,
            detail,
        }));
    }

    /// Processes one received frame.
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.phase == Phase::Closed {
            return Err(ProtocolError::Closed("receiver closed".into()));
        }
        self.last_heard = now;
        let decoded = crate::frame::decode_with_crc(bytes).and_then(|(t, p, crc)| {
            Ok((
                Message::from_payload(t, p)?,
                PartCrc {
                    crc,
                    len: (crate::frame::HEADER_LEN + p.len()) as u64,
                },
            ))
        });
        let (msg, crc) = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.refuse(RefuseCode::BadFrame, None, &e);
                return Err(e);
            }
        };
        self.frame_crc = crc;
        match (self.phase, msg) {
            (Phase::AwaitHello, Message::Hello(h)) => self.on_hello(h),
            (Phase::Ready { term, .. }, Message::Hello(h)) if h.term >= term => {
                // A repeated Hello (its Welcome was lost) or a new primary with a higher term:
                // (re)open the session; partial checkpoints of the old one are dropped.
                if h.term > term {
                    self.drop_staged_from(0);
                    self.base = None;
                    self.delivered = None;
                }
                self.on_hello(h)
            }
            (Phase::Ready { term, .. }, m) => self.on_session_message(term, m),
            (_, Message::Goodbye(g)) => {
                self.close(ProtocolError::Closed(format!(
                    "peer said goodbye: {}",
                    g.reason
                )));
                Ok(())
            }
            (_, m) => {
                let e = ProtocolError::Unexpected {
                    kind: m.kind().1,
                    state: "awaiting Hello",
                };
                self.refuse(RefuseCode::Unexpected, None, &e);
                Err(e)
            }
        }
    }

    fn close(&mut self, why: ProtocolError) {
        self.phase = Phase::Closed;
        self.close_reason = Some(why);
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), ProtocolError> {
        let fail = |s: &mut Self, code, e: ProtocolError| {
            s.refuse(code, None, &e);
            s.close(e.clone());
            Err(e)
        };
        if h.cluster_id != self.cfg.cluster_id {
            let e = ProtocolError::WrongPeer {
                what: format!("cluster {:#x}", h.cluster_id),
                expected: format!("cluster {:#x}", self.cfg.cluster_id),
            };
            return fail(self, RefuseCode::WrongPeer, e);
        }
        if h.vm_id != self.cfg.vm_id || h.role != Role::Primary {
            let e = ProtocolError::WrongPeer {
                what: format!("VM '{}' as {:?}", h.vm_id, h.role),
                expected: format!("VM '{}' as Primary", self.cfg.vm_id),
            };
            return fail(self, RefuseCode::WrongPeer, e);
        }
        let version = h.max_version.min(PROTOCOL_VERSION);
        if version < h.min_version.max(MIN_PROTOCOL_VERSION) {
            let e = ProtocolError::Version {
                peer_min: h.min_version,
                peer_max: h.max_version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            };
            return fail(self, RefuseCode::Version, e);
        }
        if h.term < self.cfg.min_term {
            let e = ProtocolError::StaleTerm {
                got: h.term,
                current: self.cfg.min_term,
            };
            return fail(self, RefuseCode::StaleTerm, e);
        }
        self.cfg.min_term = h.term;
        self.history = Some(h.history);
        self.phase = Phase::Ready {
            version,
            term: h.term,
        };
        self.send(Message::Welcome(Welcome {
            version,
            term: h.term,
            last_committed: None,
            committed: self.cfg.committed,
            data_ports: self
                .cfg
                .data_ports
                .iter()
                .copied()
                .take(crate::message::MAX_DATA_PORTS)
                .collect(),
        }));
        Ok(())
    }

    /// The next seq to hand out; None before the session's first `Begin`.
    fn next_expected(&self) -> Option<u64> {
        self.delivered.map(|d| d + 1).or(self.base)
    }

    /// Checks term and epoch of a checkpoint message; returns the staging slot.
    fn slot(
        &mut self,
        term: u64,
        session_term: u64,
        epoch: u64,
        attempt: u32,
    ) -> Result<Option<&mut Staged>, ProtocolError> {
        if term < session_term {
            return Err(ProtocolError::StaleTerm {
                got: term,
                current: session_term,
            });
        }
        if term > session_term {
            return Err(ProtocolError::Unexpected {
                kind: "checkpoint of a newer term",
                state: "session",
            });
        }
        match self.next_expected() {
            Some(next) if epoch < next || self.complete.contains_key(&epoch) => {
                return Err(ProtocolError::Duplicate {
                    what: format!("checkpoint {epoch} (next expected {next})"),
                });
            }
            Some(next) if epoch >= next + self.cfg.window => {
                return Err(ProtocolError::Gap {
                    got: epoch,
                    expected: next,
                    window: self.cfg.window,
                });
            }
            Some(_) => {}
            // Before the first Begin, parts that raced ahead of it on the data lanes are
            // staged, for at most `window` checkpoints.
            None if !self.staging.contains_key(&epoch)
                && self.staging.len() as u64 >= self.cfg.window =>
            {
                return Err(ProtocolError::Gap {
                    got: epoch,
                    expected: self.staging.keys().next().copied().unwrap_or(epoch),
                    window: self.cfg.window,
                });
            }
            None => {}
        }
        let s = self.staging.entry(epoch).or_default();
        if attempt < s.attempt {
            // A straggler from an abandoned attempt: ignore it.
            return Ok(None);
        }
        if attempt > s.attempt {
            self.staged_bytes -= s.bytes;
            *s = Staged {
                attempt,
                ..Default::default()
            };
        }
        Ok(Some(s))
    }

    fn on_session_message(&mut self, session_term: u64, m: Message) -> Result<(), ProtocolError> {
        let epoch = match &m {
            Message::Begin(b) => Some(b.epoch),
            Message::Pages(p) => Some(p.id.epoch),
            Message::Disk(d) => Some(d.id.epoch),
            Message::State(s) => Some(s.id.epoch),
            Message::End(e) => Some(e.epoch),
            _ => None,
        };
        let r = self.dispatch(session_term, m);
        if let Err(e) = &r {
            let code = match e {
                ProtocolError::StaleTerm { .. } => RefuseCode::StaleTerm,
                ProtocolError::CheckpointCrc { .. } => RefuseCode::CheckpointCrc,
                ProtocolError::StagingFull { .. } => RefuseCode::StagingFull,
                ProtocolError::Unexpected { .. } => RefuseCode::Unexpected,
                _ => RefuseCode::Sequence,
            };
            // Refuse from the next checkpoint the application has not received: the primary
            // resends from there.
            let from = match (code, epoch) {
                (RefuseCode::CheckpointCrc, Some(ep)) => Some(ep),
                (_, Some(_)) => self.next_expected(),
                _ => None,
            };
            // A duplicate is harmless (the original was used): no refusal, no resend; but the
            // sender may have lost our ack, so repeat it.
            if matches!(e, ProtocolError::Duplicate { .. }) {
                if let (Some(a), Some(ep)) = (self.last_acked, epoch) {
                    if ep <= a {
                        self.send(Message::Ack(Ack {
                            term: session_term,
                            epoch: a,
                        }));
                    }
                }
            } else {
                if let Some(ep) = from {
                    self.drop_staged_from(ep);
                }
                self.refuse(code, from, e);
            }
        }
        r
    }

    fn drop_staged_from(&mut self, epoch: u64) {
        let dropped = self.staging.split_off(&epoch);
        self.staged_bytes -= dropped.values().map(|s| s.bytes).sum::<u64>();
        // Keep the attempt numbers so stragglers of the failed attempt stay ignored.
        for (ep, s) in dropped {
            self.staging.insert(
                ep,
                Staged {
                    attempt: s.attempt + 1,
                    ..Default::default()
                },
            );
        }
    }

    fn dispatch(&mut self, session_term: u64, m: Message) -> Result<(), ProtocolError> {
        let max = self.cfg.max_staged_bytes;
        match m {
            Message::Begin(b) => {
                if self.base.is_none() {
                    if !b.kind.starts_stream() {
                        return Err(ProtocolError::Unexpected {
                            kind: "incremental checkpoint",
                            state: "before the session's sync or resync",
                        });
                    }
                    // The session's stream starts here: anything staged for earlier seqs is
                    // from an abandoned start.
                    if b.term == session_term {
                        let keep = self.staging.split_off(&b.epoch);
                        self.staged_bytes -= self.staging.values().map(|s| s.bytes).sum::<u64>();
                        self.staging = keep;
                        self.base = Some(b.epoch);
                    }
                }
                let Some(s) = self.slot(b.term, session_term, b.epoch, b.attempt)? else {
                    return Ok(());
                };
                if s.begin.is_some() {
                    return Err(ProtocolError::Duplicate {
                        what: format!("Begin of checkpoint {}", b.epoch),
                    });
                }
                if let Some(&seq) = s.crcs.keys().next_back() {
                    if seq >= b.parts {
                        return Err(ProtocolError::Reordered {
                            epoch: b.epoch,
                            why: format!("part {seq} staged but only {} announced", b.parts),
                        });
                    }
                }
                let epoch = b.epoch;
                s.begin = Some(b);
                self.try_complete(epoch)
            }
            Message::End(e) => {
                let Some(s) = self.slot(e.term, session_term, e.epoch, e.attempt)? else {
                    return Ok(());
                };
                if s.end.is_some() {
                    return Err(ProtocolError::Duplicate {
                        what: format!("End of checkpoint {}", e.epoch),
                    });
                }
                let epoch = e.epoch;
                s.end = Some(e);
                self.try_complete(epoch)
            }
            Message::Pages(_) | Message::Disk(_) | Message::State(_) => {
                let crc = self.frame_crc;
                let (id, size) = match &m {
                    Message::Pages(p) => (p.id, crc.len),
                    Message::Disk(d) => (d.id, d.data.len() as u64),
                    Message::State(s) => (s.id, s.data.len() as u64),
                    _ => unreachable!("matched above"),
                };
                if self.staged_bytes + self.done_bytes + size > max {
                    return Err(ProtocolError::StagingFull { max });
                }
                let Some(s) = self.slot(id.term, session_term, id.epoch, id.attempt)? else {
                    return Ok(());
                };
                if s.crcs.contains_key(&id.seq) {
                    return Err(ProtocolError::Duplicate {
                        what: format!("part {} of checkpoint {}", id.seq, id.epoch),
                    });
                }
                if let Some(b) = &s.begin {
                    if id.seq >= b.parts {
                        return Err(ProtocolError::Reordered {
                            epoch: id.epoch,
                            why: format!("part {} beyond the {} announced", id.seq, b.parts),
                        });
                    }
                    if let Message::Pages(p) = &m {
                        let pages = b.mem_size / crate::page::PAGE as u64;
                        if p.runs.iter().any(|r| r.0 + u64::from(r.1) > pages) {
                            return Err(ProtocolError::Page {
                                gfn: p.runs[0].0,
                                why: "page beyond guest RAM".into(),
                            });
                        }
                    }
                }
                s.crcs.insert(id.seq, crc);
                s.bytes += size;
                match m {
                    Message::Pages(p) => {
                        let mut it = p.pages.into_iter();
                        for (first, count) in p.runs {
                            for g in first..first + u64::from(count) {
                                if let Some(d) = it.next() {
                                    s.pages.push((g, d));
                                }
                            }
                        }
                    }
                    Message::Disk(d) => s.disk.push((id.seq, d.offset, d.data)),
                    Message::State(st) => s.state.push((id.seq, st.format, st.data)),
                    _ => {}
                }
                self.staged_bytes += size;
                self.try_complete(id.epoch)
            }
            Message::Heartbeat(h) => {
                self.send(Message::Heartbeat(h));
                Ok(())
            }
            Message::Goodbye(g) => {
                self.close(ProtocolError::Closed(format!(
                    "peer said goodbye: {}",
                    g.reason
                )));
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                kind: other.kind().1,
                state: "session",
            }),
        }
    }

    fn try_complete(&mut self, epoch: u64) -> Result<(), ProtocolError> {
        let done = match self.staging.get(&epoch) {
            Some(Staged {
                begin: Some(b),
                end: Some(_),
                crcs,
                ..
            }) => crcs.len() as u32 == b.parts,
            _ => false,
        };
        if !done {
            return Ok(());
        }
        let Some(mut s) = self.staging.remove(&epoch) else {
            return Ok(());
        };
        self.staged_bytes -= s.bytes;
        let (Some(b), Some(e)) = (s.begin.take(), s.end.take()) else {
            return Ok(());
        };
        let computed = combine(s.crcs.values().copied());
        if computed != e.crc {
            return Err(ProtocolError::CheckpointCrc {
                epoch,
                stored: e.crc,
                computed,
            });
        }
        s.pages.sort_by_key(|p| p.0);
        if s.pages.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(ProtocolError::Reordered {
                epoch,
                why: "a page appears twice".into(),
            });
        }
        s.disk.sort_by_key(|d| d.0);
        s.state.sort_by_key(|d| d.0);
        let state = if s.state.is_empty() {
            None
        } else {
            let format = s.state[0].1;
            Some((format, s.state.into_iter().flat_map(|x| x.2).collect()))
        };
        let cp = Checkpoint {
            epoch,
            kind: b.kind,
            mem_size: b.mem_size,
            pages: s.pages,
            disk: s.disk.into_iter().map(|d| (d.1, d.2)).collect(),
            state,
        };
        self.done_bytes += s.bytes;
        self.complete.insert(epoch, (cp, s.bytes));
        while let Some(c) = self.next_expected().and_then(|n| self.complete.remove(&n)) {
            self.delivered = Some(c.0.epoch);
            self.ready.push_back(c);
        }
        Ok(())
    }

    /// The next complete, verified checkpoint, in epoch order.
    pub fn poll_checkpoint(&mut self) -> Option<Checkpoint> {
        let (cp, bytes) = self.ready.pop_front()?;
        self.done_bytes -= bytes;
        Some(cp)
    }

    /// Tells the primary checkpoint `epoch` is applied.
    pub fn ack(&mut self, epoch: u64) {
        self.last_acked = Some(self.last_acked.map_or(epoch, |a| a.max(epoch)));
        if let Phase::Ready { term, .. } = self.phase {
            self.send(Message::Ack(Ack { term, epoch }));
        }
    }

    /// Tells the primary checkpoint `epoch` could not be applied (it will be resent).
    pub fn apply_failed(&mut self, epoch: u64, why: &str) {
        let e = ProtocolError::Closed(why.to_string());
        self.delivered = match self.base {
            Some(b) if epoch <= b => None,
            _ => epoch.checked_sub(1),
        };
        // Later checkpoints handed out or completed behind it cannot be applied either: drop
        // them (they are resent from `epoch`), or each would fail in turn (a livelock).
        self.ready.clear();
        self.complete.retain(|e, _| *e < epoch);
        self.done_bytes = self.complete.values().map(|c| c.1).sum();
        self.drop_staged_from(epoch);
        self.refuse(RefuseCode::ApplyFailed, Some(epoch), &e);
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// When [`Receiver::handle_timeout`] must be called next: `idle_timeout` after the last
    /// frame, or after the start if none came yet; None once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            _ => Some(self.last_heard + self.cfg.idle_timeout),
        }
    }

    /// Declares the peer gone after `idle_timeout` of silence (also a peer that never said
    /// anything).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                let ms = self.cfg.idle_timeout.as_millis() as u64;
                self.close(ProtocolError::PeerTimeout { ms });
            }
        }
    }
}
