//! The backup's network loop: one primary session at a time, all of them applying to the same
//! [`Replica`] (the committed image, and the side image of a full sync), which lives as long as
//! [`serve`] and holds the image directory's lock.
//!
//! Peers are untrusted until proven otherwise: handshakes run concurrently with a timeout
//! (see `transport::quic`), a connection that opens no stream or says nothing for the idle
//! timeout is closed, a `Hello` from a certificate that may not act as primary for the VM is
//! refused (`Refuse WrongPeer`), and every session that ends closes its QUIC connection with an
//! application error code and the reason (`transport::quic::code`).
//!
//! A primary whose term is below the image's minimum term ([`Fence`]: the committed image's
//! term, or the one the failover manager fenced the image at) is refused (`Refuse
//! StaleTerm`); a fence raised while a session of an older primary runs ends it the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use protocol::message::{Message, Refuse, RefuseCode, MAX_TEXT};
use protocol::{ProtocolError, Receiver, ReceiverConfig};
use tokio::sync::watch;
use transport::certs::Identity;
use transport::quic::code;
use transport::{BackupLink, HostRole, PeerCert, QuicConfig, Server, TransportError};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::applier::{Applier, Done};
use crate::data::DataSockets;
use crate::export::{Exporter, Exports};
use crate::fence::Fence;
use crate::image::Origin;
use crate::lock::ImageLock;
use crate::replica::{Failure, Replica};
use crate::stats::BackupStats;
use crate::BackupError;

/// Backup settings.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Replica image directory.
    pub image_dir: PathBuf,
    /// This host's certificates.
    pub identity: Identity,
    /// Cluster id the primary must present.
    pub cluster_id: u64,
    /// VM id the primary must present.
    pub vm_id: String,
    /// QUIC timers.
    pub quic: QuicConfig,
    /// Counters, shared with whoever reports them.
    pub stats: Arc<BackupStats>,
    /// Export requests (`PUT /snapshot` on the control socket: see [`crate::export`]).
    pub exports: Exports,
    /// Extra sockets offered to a primary for data connections ([`crate::data`]; at most
    /// `protocol::message::MAX_DATA_PORTS`, 0: none), on any free port each...
    pub data_sockets: u8,
    /// ... or on these ports (when not empty).
    pub data_ports: Vec<u16>,
}

/// Serves primaries until `stop` turns true; then finalizes the committed image as a snapshot
/// of its checkpoint and returns that seq (None if there is no committed image: no full sync
/// ever completed). Takes the image directory's lock first ([`serve_locked`]).
pub async fn serve(
    cfg: BackupConfig,
    stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Option<u64>, BackupError> {
    let lock = ImageLock::acquire(&cfg.image_dir)?;
    serve_locked(cfg, lock, stop, ready).await
}

/// [`serve`] with the image directory's lock already held (`lock` must be of
/// `cfg.image_dir`). An existing image is recovered and becomes the committed image every
/// session starts from: its position is reported to each primary (which may then send a quick
/// resync from it), and its term is the lowest a primary may have.
pub async fn serve_locked(
    cfg: BackupConfig,
    lock: ImageLock,
    stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Option<u64>, BackupError> {
    let fence = Arc::new(Fence::load(lock.dir())?);
    serve_fenced(cfg, lock, stop, ready, fence).await
}

/// [`serve_locked`] with the image's [`Fence`] (loaded from the image directory by
/// [`Fence::load`]) shared with whoever raises it: the failover manager's `fence` and
/// `promote`.
pub async fn serve_fenced(
    cfg: BackupConfig,
    lock: ImageLock,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    fence: Arc<Fence>,
) -> Result<Option<u64>, BackupError> {
    if lock.dir() != cfg.image_dir {
        return Err(BackupError::Apply(format!(
            "the lock held is of {}, not of the image directory {}",
            lock.dir().display(),
            cfg.image_dir.display()
        )));
    }
    let mut replica = Replica::open(lock)?;
    replica.set_tracker(cfg.exports.tracker());
    report_committed(&cfg.stats, &replica);
    let mut slot = Some(replica);
    let mut exporter = Exporter::new(cfg.exports.clone());
    let mut min_term = fence.subscribe();
    // (A raise made before this loop runs is enforced: no session runs yet.)
    fence.enforce_latest(&mut min_term);
    let server = Server::bind(cfg.listen, &cfg.identity, &cfg.quic)?;
    let addr = server.local_addr()?;
    let offered = (cfg.data_sockets, &cfg.data_ports[..]);
    let mut data = DataSockets::bind(offered, addr, &cfg.identity, &cfg.quic)?;
    tracing::info!("backup listening on {addr} (data ports {:?})", data.ports());
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    loop {
        tokio::select! {
            c = server.accept() => match c {
                Ok(conn) => {
                    let peer = conn.remote_address();
                    let mut w = Watches { stop: &mut stop, fence: &fence, min_term: &mut min_term, exporter: &mut exporter, data: &mut data };
                    let r = session(&cfg, &server, conn, &mut slot, &mut w).await;
                    let Some(replica) = slot.as_mut() else {
                        server.close();
                        return Err(BackupError::Apply("the replica was lost with its apply thread".into()));
                    };
                    if let Err(e) = replica.end_session() {
                        tracing::warn!("removing the abandoned side image: {e}");
                    }
                    let applied = replica.seq().map_or(0, |s| s + 1);
                    cfg.stats.applied.store(applied, Ordering::Relaxed);
                    match r {
                        Ok(()) => {}
                        Err(Failure::Fatal(e)) => {
                            server.close();
                            tracing::error!("{e}; stopping (recovery redoes it)");
                            return Err(e);
                        }
                        Err(Failure::Session(e) | Failure::Refused(e)) => {
                            tracing::warn!("session with {peer} ended: {e}")
                        }
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            },
            // No session runs: a raised fence is in force at once.
            _ = min_term.changed() => {
                fence.enforce_latest(&mut min_term);
            }
            // No session runs: the replica is idle, an export goes on at once.
            _ = cfg.exports.wait() => exporter.poll(slot.as_mut()),
            c = data.next() => data.refuse_idle(&c),
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        // The replica is idle between sessions: whatever an export waits for (a wake-up taken
        // by a session that then ended included) is taken now.
        exporter.poll(slot.as_mut());
    }
    // Stopping or promoting: an export is cancelled before the image is finalized.
    drop(exporter);
    server.close();
    drop(data);
    let Some(replica) = slot else {
        return Err(BackupError::Apply(
            "the replica was lost with its apply thread".into(),
        ));
    };
    let seq = replica.finalize()?;
    if let Some(s) = seq {
        tracing::info!("image finalized at checkpoint {s}");
    }
    Ok(seq)
}

/// Logs the replica's committed image, if any, and counts it in `stats`.
fn report_committed(stats: &BackupStats, replica: &Replica) {
    let Some(p) = replica.position() else {
        return;
    };
    tracing::info!(
        "committed image: checkpoint {} (term {}, history {:#x})",
        p.seq,
        p.term,
        p.history
    );
    stats.applied.store(p.seq + 1, Ordering::Relaxed);
    stats.term.store(p.term, Ordering::Relaxed);
    stats.committed.store(p.seq + 1, Ordering::Relaxed);
    stats.history.store(p.history, Ordering::Relaxed);
}

/// How long the primary may stay silent (it sends heartbeats): the receiver's default (3 s),
/// or three QUIC idle timeouts if that is shorter (at least 1.5 s). Also bounds the wait for its
/// first stream.
fn silence_limit(cfg: &BackupConfig) -> Duration {
    let default = ReceiverConfig::new(cfg.cluster_id, &cfg.vm_id).idle_timeout;
    default.min(Duration::from_millis(cfg.quic.idle_timeout_ms.max(500) * 3))
}

/// How long a closing session waits for its last frames (a `Refuse`, acks) to be read.
const LINGER: Duration = Duration::from_millis(250);
/// The same for a primary refused for a stale term (fenced by a promotion).
const STALE_LINGER: Duration = Duration::from_millis(20);

/// What a session listens to besides its primary: the backup stopping, the fence, and
/// exports (whose steps it takes while the replica is idle).
struct Watches<'a> {
    stop: &'a mut watch::Receiver<bool>,
    fence: &'a Fence,
    min_term: &'a mut watch::Receiver<u64>,
    exporter: &'a mut Exporter,
    data: &'a mut DataSockets,
}

/// How a session ended without an error.
enum End {
    /// The primary said goodbye.
    Goodbye(String),
    /// The primary's streams ended.
    StreamsClosed,
    /// This backup is stopping.
    Stopped,
}

/// The application error code and reason a session's connection is closed with.
fn close_code(r: &Result<End, Failure>) -> (u32, String) {
    match r {
        Ok(End::Goodbye(g)) => (code::DONE, g.clone()),
        Ok(End::StreamsClosed) => (code::DONE, "streams closed".into()),
        Ok(End::Stopped) => (code::SHUTDOWN, "backup stopping".into()),
        Err(Failure::Fatal(e)) => (code::SHUTDOWN, format!("backup stopping: {e}")),
        Err(Failure::Session(e) | Failure::Refused(e)) => {
            let c = match e {
                BackupError::Protocol(ProtocolError::PeerTimeout { .. }) => code::PEER_TIMEOUT,
                BackupError::NotPermitted { .. }
                | BackupError::Protocol(
                    ProtocolError::WrongPeer { .. }
                    | ProtocolError::Version { .. }
                    | ProtocolError::StaleTerm { .. },
                ) => code::REFUSED,
                _ => code::SESSION_FAILED,
            };
            (c, e.to_string())
        }
    }
}

async fn session(
    cfg: &BackupConfig,
    server: &Server,
    mut conn: quinn::Connection,
    replica: &mut Option<Replica>,
    w: &mut Watches<'_>,
) -> Result<(), Failure> {
    let limit = silence_limit(cfg);
    // A peer that authenticates and never opens its control stream is closed like a silent one.
    // A newer connection that arrives meanwhile supersedes it: a primary that gave up on a
    // handshake attempt (it retries every 150 ms after a link heals) must not hold the backup
    // for the whole silence limit.
    let mut listening = true;
    let (started, cert, accepted) = loop {
        let started = Instant::now();
        let cert = transport::roles::peer_cert(&conn);
        tokio::select! {
            a = tokio::time::timeout(limit, BackupLink::accept(conn.clone())) => break (started, cert, a),
            newer = server.accept(), if listening => {
                // (An endpoint that stopped accepting is not asked again.)
                listening = newer.is_ok();
                if let Ok(n) = newer {
                    tracing::info!(
                        "a newer connection from {} supersedes the one from {} that opened no stream",
                        n.remote_address(),
                        conn.remote_address()
                    );
                    transport::quic::close(&conn, code::SESSION_FAILED, "superseded by a newer connection");
                    conn = n;
                }
            }
            _ = w.stop.changed() => {
                transport::quic::close(&conn, code::SHUTDOWN, "backup stopping");
                return Ok(());
            }
            // No session yet: nothing of an older primary can be acknowledged; the session
            // loop starts with the new minimum term.
            _ = w.min_term.changed() => {
                w.fence.enforce_latest(w.min_term);
            }
        }
    };
    let (mut link, mut rx) = match accepted {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            transport::quic::close(&conn, code::SESSION_FAILED, &e.to_string());
            return Err(Failure::Session(e.into()));
        }
        Err(_) => {
            let e = ProtocolError::PeerTimeout {
                ms: limit.as_millis() as u64,
            };
            transport::quic::close(&conn, code::PEER_TIMEOUT, &e.to_string());
            return Err(Failure::Session(e.into()));
        }
    };
    let stats = &cfg.stats;
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    let Some(rep) = replica.take() else {
        return Err(Failure::Fatal(BackupError::Apply("no replica".into())));
    };
    let mut applier = Applier::new(rep);
    let r = session_loop(cfg, &mut link, &mut rx, &mut applier, w, &cert, started).await;
    // The replica comes back once a step still running on its thread is done.
    match applier.finish().await {
        Ok(rep) => *replica = Some(rep),
        Err(e) => return Err(e),
    }
    stats.connected.store(false, Ordering::Relaxed);
    stats.syncing.store(false, Ordering::Relaxed);
    let (c, reason) = close_code(&r);
    // A primary refused for a stale term gets its refusal within a round trip; lingering
    // longer only delays a promotion (whose old primary is usually dead).
    let stale = matches!(
        &r,
        Err(Failure::Session(BackupError::Protocol(
            ProtocolError::StaleTerm { .. }
        ))) | Err(Failure::Refused(BackupError::Protocol(
            ProtocolError::StaleTerm { .. }
        )))
    );
    // A primary that said goodbye has every acknowledgement it waited for and reads nothing
    // more (a handed-over primary is exiting): waiting for it would only hold the fence raised
    // by the promotion that follows (~250 ms of every planned migration).
    let linger = match &r {
        Ok(End::Goodbye(_)) => Duration::ZERO,
        _ if stale => STALE_LINGER,
        _ => LINGER,
    };
    link.close(c, &reason, linger).await;
    r.map(|_| ())
}

/// A `Hello` from a certificate that may not act as primary for its VM: the refusal's text.
fn refused_hello(frame: &[u8], cert: &Result<PeerCert, TransportError>) -> Option<String> {
    // Only a Hello opens (or reopens) a session; anything else is the receiver's to judge (the
    // type is looked at before the CRC: checkpoint data is not hashed twice).
    if frame.get(5) != Some(&1) {
        return None;
    }
    let (t, payload) = protocol::frame::decode(frame).ok()?;
    let Ok(Message::Hello(h)) = Message::from_payload(t, payload) else {
        return None;
    };
    match cert {
        Ok(pc) => pc.check(HostRole::Primary, Some(&h.vm_id)).err(),
        Err(e) => Some(e.to_string()),
    }
}

/// One frame from the primary: a `Hello` its certificate may not send is refused (the session
/// ends); anything else goes to the receiver. A duplicate (a resend of what was applied) is
/// harmless and logged at debug level only, so a resend is not hundreds of warnings.
async fn on_frame(
    r: &mut Receiver,
    link: &mut BackupLink,
    f: &[u8],
    (cert, stats): (&Result<PeerCert, TransportError>, &BackupStats),
) -> Result<(), Failure> {
    tracing::trace!("frame of {} bytes", f.len());
    stats
        .last_heard_ms
        .store(crate::stats::now_ms(), Ordering::Relaxed);
    if let Some(reason) = refused_hello(f, cert) {
        let mut detail = reason.clone();
        detail.truncate(MAX_TEXT);
        let refuse = Message::Refuse(Refuse {
            code: RefuseCode::WrongPeer,
            epoch: None,
            detail,
        });
        let _ = link.send(&refuse.encode()).await;
        let peer = link.connection().remote_address().to_string();
        return Err(Failure::Session(BackupError::NotPermitted { peer, reason }));
    }
    match r.handle_frame(Instant::now(), f) {
        Err(e @ ProtocolError::Duplicate { .. }) => tracing::debug!("ignored frame: {e}"),
        Err(e) => tracing::warn!("refused frame: {e}"),
        Ok(()) => {}
    }
    Ok(())
}

async fn session_loop(
    cfg: &BackupConfig,
    link: &mut BackupLink,
    rx: &mut transport::FrameRx,
    applier: &mut Applier,
    w: &mut Watches<'_>,
    cert: &Result<PeerCert, TransportError>,
    started: Instant,
) -> Result<End, Failure> {
    let (mut r, built_min) = receiver(cfg, applier, w);
    // A primary that connects and says nothing is timed out from here.
    r.start(started);
    // The primary and seq of the checkpoint that opened the session's stream.
    let mut opener: Option<(Origin, u64)> = None;
    loop {
        let deadline = r.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(f)) => on_frame(&mut r, link, &f, (cert, &cfg.stats)).await?,
                Some(Err(e)) => return Err(Failure::Session(e.into())),
                None => return Ok(End::StreamsClosed),
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                // Input that waited while this loop was busy is handled before the silence
                // check: a primary that kept talking is not silent.
                while let Ok(f) = rx.try_recv() {
                    match f {
                        Ok(f) => on_frame(&mut r, link, &f, (cert, &cfg.stats)).await?,
                        Err(e) => return Err(Failure::Session(e.into())),
                    }
                }
                r.handle_timeout(Instant::now());
            }
            // A step of applying a checkpoint finished on its thread.
            done = applier.next_done() => step_done(cfg, &mut r, applier, done?)?,
            c = w.data.next() => admit_data(w.data, link, c),
            _ = w.stop.changed() => return Ok(End::Stopped),
            // (Taken below, once the replica is idle.)
            _ = cfg.exports.wait() => {}
            _ = w.min_term.changed() => {
                let min = *w.min_term.borrow_and_update();
                let end = fenced(&r, link, built_min, min).await;
                // Nothing more is acknowledged to an older primary: this loop ends now.
                w.fence.enforced(min);
                if let Some(end) = end {
                    return end;
                }
            }
        }
        // An export's final step (bounded: `export::FINAL_PAGES`) is taken before the next
        // checkpoint, or a steady stream would never leave the replica idle for it; only with
        // no step pending (not between an acknowledgement queued and sent).
        let idle = applier.idle();
        w.exporter.poll(applier.replica_mut().filter(|_| idle));
        feed(&mut r, applier, &mut opener);
        while let Some(out) = r.poll_transmit() {
            link.send(&out)
                .await
                .map_err(|e| Failure::Session(e.into()))?;
        }
        applier.run_deferred(); // (after the acknowledgement left)
        if let Some(e) = r.closed() {
            tracing::info!("session closed: {e}");
            return match e {
                ProtocolError::Closed(why) => Ok(End::Goodbye(why.clone())),
                e => Err(Failure::Session(e.clone().into())),
            };
        }
    }
}

/// The session's receiver, bounded and fenced as the backup stands now, and the least term
/// it was built with.
fn receiver(cfg: &BackupConfig, applier: &Applier, w: &mut Watches<'_>) -> (Receiver, u64) {
    let mut rcfg = ReceiverConfig::new(cfg.cluster_id, &cfg.vm_id);
    rcfg.committed = applier.replica().and_then(|r| r.position());
    let fenced_at = *w.min_term.borrow_and_update();
    rcfg.min_term = rcfg.committed.map_or(0, |p| p.term).max(fenced_at);
    w.fence.enforced(fenced_at);
    let built_min = rcfg.min_term;
    rcfg.idle_timeout = silence_limit(cfg);
    rcfg.data_ports = w.data.ports().to_vec();
    w.data.refuse_waiting();
    // The frames waiting in the connection's channel count too: the receiver's bound leaves
    // room for a full channel (and the one checkpoint on the apply thread is within the
    // window the primary keeps), and for what QUIC buffers: a connection window for the
    // session's connection and each data connection.
    let channel = (transport::CHANNEL_FRAMES * (protocol::frame::MAX_PAYLOAD + 16)) as u64;
    let quic = (1 + w.data.ports().len() as u64) * cfg.quic.conn_window;
    rcfg.max_staged_bytes = rcfg.max_staged_bytes.saturating_sub(channel + quic);
    (Receiver::new(rcfg), built_min)
}

/// Hands the next checkpoint to the apply thread: it leaves the receiver (and its memory
/// bound) only when that thread is free to take it. `opener` is the primary and seq of the
/// checkpoint that opened the session's stream.
fn feed(r: &mut Receiver, applier: &mut Applier, opener: &mut Option<(Origin, u64)>) {
    if !applier.idle() {
        return;
    }
    if let Some(cp) = r.poll_checkpoint() {
        let origin = Origin {
            history: r.history().unwrap_or(0),
            term: r.session().map_or(0, |s| s.1),
        };
        let opens = match *opener {
            Some((o, seq)) if o == origin => seq == cp.epoch,
            _ => {
                *opener = Some((origin, cp.epoch));
                true
            }
        };
        applier.start(cp, origin, opens);
    }
}

/// Takes data connection `c` into the session if it is the session's primary's.
fn admit_data(data: &DataSockets, link: &mut BackupLink, c: quinn::Connection) {
    if data.admit(link.connection(), &c, link.joined()) {
        link.join(c);
        tracing::info!("data connection {} joined the session", link.joined());
    }
}

/// The image was fenced at term `min`: a session whose primary has an older term is refused
/// (`Refuse StaleTerm`, so that primary knows it is fenced) and ends; one still waiting for
/// its primary's `Hello` (its receiver knew only `built_min`) ends too, and the primary's next
/// attempt meets the new term. None: the session goes on.
async fn fenced(
    r: &Receiver,
    link: &mut BackupLink,
    built_min: u64,
    min: u64,
) -> Option<Result<End, Failure>> {
    match r.session() {
        Some((_, term)) if term < min => {
            let e = ProtocolError::StaleTerm {
                got: term,
                current: min,
            };
            tracing::warn!(
                "fenced at term {min}: ending the session of the primary of term {term}"
            );
            let refuse = Message::Refuse(Refuse {
                code: RefuseCode::StaleTerm,
                epoch: None,
                detail: e.to_string(),
            });
            let _ = link.send(&refuse.encode()).await;
            Some(Err(Failure::Refused(e.into())))
        }
        None if built_min < min => Some(Err(Failure::Session(BackupError::Apply(format!(
            "fenced at term {min} while the session was starting"
        ))))),
        _ => None,
    }
}

/// A step of applying a checkpoint is done: after `begin`, the checkpoint is durable (or, for
/// a full sync, applied and promoted) and is acknowledged, then completed on the apply thread;
/// a refused one is reported to the primary, which resends it (the receiver drops what it
/// completed behind it: that could not apply either).
fn step_done(
    cfg: &BackupConfig,
    r: &mut Receiver,
    applier: &mut Applier,
    done: Done,
) -> Result<(), Failure> {
    let stats = &cfg.stats;
    match done {
        Done::Begun {
            cp,
            result: Ok(staged),
            started,
        } => {
            let took = started.elapsed();
            stats
                .last_durable_us
                .store(took.as_micros() as u64, Ordering::Relaxed);
            stats
                .durable_ns
                .0
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            stats.durable_ns.1.fetch_add(1, Ordering::Relaxed);
            r.ack(cp.epoch);
            committed(stats, r, &cp);
            match staged {
                Some(s) => applier.start_complete(s, cp.epoch, cp.pages.len(), started),
                None => applied(cfg, applier, cp.epoch, cp.pages.len(), started),
            }
        }
        Done::Begun {
            cp,
            result: Err(Failure::Refused(e)),
            ..
        } => {
            stats.apply_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("checkpoint {}: {e}", cp.epoch);
            r.apply_failed(cp.epoch, &e.to_string());
        }
        Done::Begun {
            cp, result: Err(f), ..
        } => {
            stats.apply_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("checkpoint {}: {f}", cp.epoch);
            return Err(f);
        }
        Done::Completed {
            seq,
            pages,
            started,
            result,
        } => {
            result?;
            applied(cfg, applier, seq, pages, started);
        }
    }
    Ok(())
}

/// Counters after checkpoint `cp` was made durable and acknowledged: any but a pre-copy round
/// is now the committed image's checkpoint (a pre-copy round only advances a side image).
fn committed(stats: &BackupStats, r: &Receiver, cp: &protocol::Checkpoint) {
    stats
        .last_checkpoint_ms
        .store(crate::stats::now_ms(), Ordering::Relaxed);
    if cp.kind == protocol::Kind::PreCopy {
        return;
    }
    stats
        .history
        .store(r.history().unwrap_or(0), Ordering::Relaxed);
    if let Some((_, term)) = r.session() {
        stats.term.store(term, Ordering::Relaxed);
    }
    stats.committed.store(cp.epoch + 1, Ordering::Relaxed);
}

/// Counters after checkpoint `seq` is in the image.
fn applied(cfg: &BackupConfig, applier: &Applier, seq: u64, pages: usize, started: Instant) {
    let stats = &cfg.stats;
    stats.applied.store(seq + 1, Ordering::Relaxed);
    if let Some(rep) = applier.replica() {
        if let Some(p) = rep.position() {
            stats.term.store(p.term, Ordering::Relaxed);
        }
        stats.syncing.store(rep.syncing(), Ordering::Relaxed);
    }
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    stats.pages.fetch_add(pages as u64, Ordering::Relaxed);
    tracing::debug!(
        "checkpoint {seq} ({pages} pages) applied after {} µs",
        started.elapsed().as_micros()
    );
}
