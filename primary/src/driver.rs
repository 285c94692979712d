//! The I/O half of the primary: executes the [`Policy`]'s commands (connect, pre-copy pass,
//! capture, release, close) against the VM and the network, and moves frames between the
//! policy and the QUIC links. It decides nothing.
//!
//! Long work — a pre-copy pass scans all memory, a full capture copies it — runs on a blocking
//! thread while the loop goes on answering frames and timers, so heartbeats keep flowing (the
//! policy asks for nothing else meanwhile). Frames go to each backup's writer tasks through
//! bounded queues without waiting ([`crate::writer`]): a slow backup never holds up the loop or
//! the others. Input that waited while the loop was busy is handled before timers fire: a backup
//! that kept talking is never declared silent.
//!
//! Every release of guest output goes through the [`Fence`]; when the policy learns that a
//! newer term exists, the loop fences the primary before anything else and ends the session.
//! A session asked to stop while a pass or capture runs waits for it and hands it to the
//! policy first, so the next session (the primary restarts sessions, e.g. with a new set of
//! backups) finds the record of changes whole and no capture of the old one still running.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use transport::{quic, PrimaryLink, TransportError};
use vmm::snapshot::SnapshotError;
use vmm::{CaptureKind, EpochCapture, Vm};

use crate::peer;
use crate::reply_path::{OutputClock, Tracker};
use crate::stall::StallClock;
use crate::writer::Writer;
use crate::{Command, Fence, Policy, PrimaryConfig, PrimaryError, Stats};

/// A pre-copy pass (true) or a full capture (false) on a blocking thread.
type Work = tokio::task::JoinHandle<(bool, Result<EpochCapture, SnapshotError>)>;

/// A frame (or a link error) from backup `i`'s connection of a generation.
type Frame = (usize, u64, Result<Vec<u8>, TransportError>);

/// A connection attempt's result.
type Connected = (usize, u64, Result<PrimaryLink, PrimaryError>);

/// A data connection opened for backup `i`'s connection of a generation.
type DataOpened = (usize, u64, peer::DataConn);

/// See the module docs.
pub(crate) struct Driver {
    vm: Arc<Vm>,
    cfg: PrimaryConfig,
    stats: Arc<Stats>,
    history: u64,
    ep: quinn::Endpoint,
    frames_tx: mpsc::Sender<Frame>,
    frames: mpsc::Receiver<Frame>,
    conn_tx: mpsc::Sender<Connected>,
    conns: mpsc::Receiver<Connected>,
    data_tx: mpsc::Sender<DataOpened>,
    data: mpsc::Receiver<DataOpened>,
    /// Each backup's writers and their connection's generation.
    links: Vec<Option<(u64, Writer)>>,
    /// A writer made progress: there may be room for more frames.
    progress: Arc<Notify>,
    generation: u64,
    work: Option<Work>,
    to_close: Vec<usize>,
    fence: Arc<Fence>,
    /// When the last input from the backups (a frame, a timeout) was handled: a release it
    /// authorized must leave within [`RELEASE_LEASE`] of it.
    handled_at: Instant,
    /// When the guest's held output started waiting, and the checkpoint in flight's times
    /// (see [`crate::reply_path`]).
    reply: (Arc<OutputClock>, Tracker),
    /// The last capture's page buffer, for `Vm::recycle_capture` after the flush.
    recycle: Option<Vec<u8>>,
    /// The last incremental capture had more than [`INLINE_ENCODE_PAGES`] pages.
    last_big: bool,
    /// Notices that this process was stopped ([`crate::stall`]).
    stall: StallClock,
}

/// Longest time from handling the acknowledgement that authorizes a release to the frame's
/// leaving: a primary stopped in between (SIGSTOP of its host, a long stall) may have been
/// superseded meanwhile — the manager promotes a backup once it has heard nothing for its
/// detection timeout (60 ms by default) — so a later frame is dropped (TCP retransmits it to
/// whichever primary serves). Found by the chaos sweep: an old primary continued after 3.9 s
/// sent one released frame 0.1 ms after SIGCONT, beside the new primary.
pub const RELEASE_LEASE: Duration = Duration::from_millis(50);

/// A checkpoint of more pages than this is encoded off the QUIC tasks' thread ([`heavy`]).
/// (256 pages: ~0.3 ms of encoding, what one bounded flush step holds the QUIC tasks too. At
/// 64, the 16-client load's checkpoints of ~40 pages crossed it often, and each
/// `block_in_place` moved the runtime's worker to another thread: twice the thread switches of
/// the loop's runtimes, 13 % of a CPU more, and a send stage twice as long — docs/BENCHMARKS.md,
/// "Time without an exit".)
const INLINE_ENCODE_PAGES: usize = 256;

/// Runs `f`, which may take milliseconds, without holding up the QUIC tasks that share the
/// loop's worker thread (`vmatrix`'s `rt::block_on_worker`): tokio's `block_in_place` hands
/// them to another thread meanwhile. On another kind of runtime it just runs `f`.
fn heavy<R>(f: impl FnOnce() -> R) -> R {
    heavy_if(true, f)
}

/// [`heavy`] if `big`, else just `f`.
fn heavy_if<R>(big: bool, f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match (big, Handle::try_current().map(|h| h.runtime_flavor())) {
        (true, Ok(RuntimeFlavor::MultiThread)) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Frame bytes encoded for one backup in one step of the loop (~0.1-0.3 ms of encoding in an
/// optimised build; the step ends with the frame that passes it, so up to one frame more):
/// the QUIC tasks sharing the loop's thread wait about that long.
const FLUSH_BUDGET: usize = 256 << 10;

/// Longest wait between two attempts at a data connection that failed.
const DATA_RETRY_MAX: Duration = Duration::from_secs(30);

impl Driver {
    pub fn new(
        vm: Arc<Vm>,
        cfg: PrimaryConfig,
        stats: Arc<Stats>,
        history: u64,
        fence: Arc<Fence>,
    ) -> Result<Self, PrimaryError> {
        let ep = quic::client(&cfg.identity, &cfg.quic)?;
        let (frames_tx, frames) = mpsc::channel(4096);
        let (conn_tx, conns) = mpsc::channel(16);
        let (data_tx, data) = mpsc::channel(16);
        Ok(Driver {
            links: cfg.backups.iter().map(|_| None).collect(),
            progress: Arc::new(Notify::new()),
            vm,
            cfg,
            stats,
            history,
            ep,
            frames_tx,
            frames,
            conn_tx,
            conns,
            data_tx,
            data,
            generation: 0,
            work: None,
            to_close: Vec::new(),
            fence,
            handled_at: Instant::now(),
            reply: (Arc::new(OutputClock::new()), Tracker::default()),
            recycle: None,
            last_big: false,
            stall: StallClock::new().map_err(PrimaryError::Thread)?,
        })
    }

    /// Runs the session until `stop` turns true (Ok) or it fails.
    pub async fn run(
        mut self,
        mut p: Policy<'_>,
        (output_waiting, clock): (Arc<Notify>, Arc<OutputClock>),
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), PrimaryError> {
        let early = self.cfg.early_checkpoints;
        self.reply.0 = clock;
        loop {
            let hurry = self.stats.hurry.load(std::sync::atomic::Ordering::Relaxed);
            p.set_output_waiting(early && (hurry || self.vm.output_waiting()));
            self.check_fenced(&p)?;
            while let Some(c) = p.poll_command() {
                self.execute(&mut p, c)?;
            }
            self.check_fenced(&p)?;
            let counter = p.syncing().then_some(&self.stats.sync_sent_bytes);
            let more = flush(&mut p, &mut self.links, counter);
            if !more {
                // (A checkpoint's send stage ends when the last of it went to the writers.)
                self.reply.1.flushed(Instant::now());
            }
            if let Some(data) = self.recycle.take() {
                // (Refilling and locking a big buffer takes a while.)
                let big = data.len() > INLINE_ENCODE_PAGES * 4096;
                heavy_if(big, || self.vm.recycle_capture(data));
            }
            for i in std::mem::take(&mut self.to_close) {
                if let Some((_, l)) = self.links[i].take() {
                    l.close(
                        quic::code::SESSION_FAILED,
                        "session over: failed or dropped",
                    );
                }
            }
            if let Some(why) = p.failed() {
                return Err(PrimaryError::BackupLost(why.to_string()));
            }
            self.vm.set_pause_at_output(early && p.captures_on_output());
            let deadline = p.poll_timeout().map(tokio::time::Instant::from_std);
            let work = &mut self.work;
            tokio::select! {
                f = self.frames.recv() => match f {
                    Some(f) => self.on_frame(&mut p, f),
                    None => return Err(PrimaryError::BackupLost("every connection closed".into())),
                },
                Some((i, g, r)) = self.conns.recv() => match r {
                    Ok(link) => {
                        let w = Writer::spawn(link, (i, g, self.cfg.term), self.frames_tx.clone(), self.progress.clone());
                        self.links[i] = Some((g, w));
                        p.handle_connected(i, self.history, Instant::now());
                    }
                    Err(e) => p.handle_connect_failed(i, &e.to_string()),
                },
                Some(d) = self.data.recv() => self.on_data_conn(d),
                // (A wake-up due now must not go through the timer: its resolution is 1 ms.)
                _ = async {
                    match deadline {
                        Some(d) if d <= tokio::time::Instant::now() => {}
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    while let Ok(f) = self.frames.try_recv() {
                        self.on_frame(&mut p, f);
                    }
                    let now = self.input(&mut p);
                    p.handle_timeout(now);
                }
                done = async {
                    match work.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.work = None;
                    self.input(&mut p);
                    // (A pre-copy pass or a full capture: big by nature.)
                    heavy(|| self.on_work_done(&mut p, done))?;
                }
                // Output started waiting: look again (see `Policy::wake`).
                _ = output_waiting.notified(), if early => {}
                // A writer sent something: there may be room for more.
                _ = self.progress.notified() => {}
                // Frames left by the bounded flush: let the QUIC tasks run, then go on.
                _ = tokio::task::yield_now(), if more => {}
                _ = stop.changed() => {
                    if let Some(h) = self.work.take() {
                        let done = h.await;
                        let _ = self.on_work_done(&mut p, done);
                    }
                    p.close_all(Instant::now(), "primary stopping");
                    flush(&mut p, &mut self.links, None);
                    // (A moment for the goodbyes to leave.)
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    for (_, l) in self.links.iter_mut().filter_map(Option::take) {
                        l.close(quic::code::SHUTDOWN, "primary stopping");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Fences the primary (no release from now on) and ends the session if the policy learned
    /// of a newer term.
    fn check_fenced(&self, p: &Policy<'_>) -> Result<(), PrimaryError> {
        match p.fenced() {
            Some(term) => {
                self.fence.fence(term);
                Err(PrimaryError::Fenced { term })
            }
            None => Ok(()),
        }
    }

    /// The time of an input about to be handed to the policy (a release it authorizes must
    /// leave within [`RELEASE_LEASE`] of it); a stall of the process noticed since the last
    /// input goes to the policy first.
    fn input(&mut self, p: &mut Policy<'_>) -> Instant {
        self.handled_at = Instant::now();
        if let Some(s) = self.stall.check(self.handled_at) {
            p.handle_stall(s.gap);
        }
        self.handled_at
    }

    /// A frame or link error from a backup (of a connection not since replaced).
    fn on_frame(&mut self, p: &mut Policy<'_>, (i, g, f): Frame) {
        if self.links[i].as_ref().map(|l| l.0) != Some(g) {
            return;
        }
        let now = self.input(p);
        match f {
            Ok(f) => p.handle_frame(i, &f, now),
            Err(e) => {
                if let Some((_, l)) = self.links[i].take() {
                    l.close(quic::code::SESSION_FAILED, &e.to_string());
                }
                p.handle_link_error(i, &e.to_string(), Instant::now());
            }
        }
    }

    /// Connects to backup `i`'s data ports, each on its own (see [`peer::connect_data`]).
    /// A port that fails is tried again, 2 s later and then less and less often (at most every
    /// [`DATA_RETRY_MAX`]), as long as the connection it is for lives.
    fn open_data(&mut self, i: usize, ports: &[u16]) {
        let Some((g, w)) = &self.links[i] else {
            return;
        };
        for &port in ports {
            let (g, ep, tx, alive) = (*g, self.ep.clone(), self.data_tx.clone(), w.alive());
            let (addr, name) = self.cfg.backups[i].clone();
            let (lanes, vm_id) = (self.cfg.lanes, self.cfg.vm_id.clone());
            tokio::spawn(async move {
                let mut wait = Duration::from_secs(2);
                for attempt in 0u32.. {
                    let to = (addr, name.as_str());
                    let d = peer::connect_data(&ep, to, &vm_id, (port, lanes), attempt > 0).await;
                    if alive.strong_count() == 0 {
                        return;
                    }
                    if let Some(d) = d {
                        if let Err(mpsc::error::SendError((_, _, (c, _)))) =
                            tx.send((i, g, d)).await
                        {
                            quic::close(&c, quic::code::SHUTDOWN, "the session ended");
                        }
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(DATA_RETRY_MAX);
                    if alive.strong_count() == 0 {
                        return;
                    }
                }
            });
        }
    }

    /// A data connection is up: its streams join backup `i`'s writer if the connection it was
    /// opened for is still the current one, else it is closed.
    fn on_data_conn(&mut self, (i, g, (conn, streams)): DataOpened) {
        match &mut self.links[i] {
            Some((lg, w)) if *lg == g => {
                tracing::info!(
                    "backup {}: data connection to {} joined with {} stream(s)",
                    self.cfg.backups[i].1,
                    conn.remote_address(),
                    streams.len()
                );
                w.add_data(conn, streams);
            }
            _ => quic::close(&conn, quic::code::SESSION_FAILED, "connection gone"),
        }
    }

    fn execute(&mut self, p: &mut Policy<'_>, c: Command) -> Result<(), PrimaryError> {
        match c {
            Command::Connect(i) => {
                self.generation += 1;
                let (ep, tx, ct) = (
                    self.ep.clone(),
                    self.frames_tx.clone(),
                    self.conn_tx.clone(),
                );
                let g = self.generation;
                let (addr, name) = self.cfg.backups[i].clone();
                let (lanes, vm_id) = (self.cfg.lanes, self.cfg.vm_id.clone());
                tokio::spawn(async move {
                    let r = peer::connect(&ep, (addr, &name), &vm_id, lanes, (i, g), &tx).await;
                    // A session that ended while this attempt ran (the primary starts a new one)
                    // must not leave the link open: the backup would wait on it for a Hello.
                    if let Err(mpsc::error::SendError((_, _, Ok(link)))) = ct.send((i, g, r)).await
                    {
                        link.close(quic::code::SHUTDOWN, "the session that asked for it ended");
                    }
                });
            }
            Command::PreCopy { slice, .. } => {
                let vm = self.vm.clone();
                self.work = Some(tokio::task::spawn_blocking(move || match slice {
                    Some(s) if s.first => (true, vm.precopy_start(s.pages, s.disk)),
                    Some(s) => (true, vm.precopy_slice(s.pages, s.disk)),
                    None => (true, vm.precopy_pass()),
                }));
            }
            Command::Capture {
                kind: CaptureKind::Full,
                disk_ranges,
            } => {
                let vm = self.vm.clone();
                self.work = Some(tokio::task::spawn_blocking(move || {
                    let cap = vm.capture_epoch_with(CaptureKind::Full, &disk_ranges);
                    (false, cap)
                }));
            }
            Command::Capture { kind, disk_ranges } => {
                let (output, start) = (self.reply.0.take(), Instant::now());
                // (A busy epoch's copy too is long: expected when the last one was big.)
                let r = heavy_if(self.last_big, || {
                    self.vm.capture_epoch_with(kind, &disk_ranges)
                });
                let mut big = false;
                if let Ok(cap) = &r {
                    self.reply
                        .1
                        .captured(cap.epoch, output, start, Instant::now());
                    big = cap.pages.len() > INLINE_ENCODE_PAGES;
                }
                self.last_big = big;
                // (The checkpoint's pages are encoded as the policy takes it: a big one off
                // the QUIC tasks' thread.)
                heavy_if(big, || self.on_work_done(p, Ok((false, r))))?;
            }
            Command::HoldOutput => {
                if self.vm.held_output().is_none() {
                    tracing::info!("guest output is held from now on (the session's sync starts)");
                    self.vm.hold_output_from_start();
                }
            }
            Command::Release(e) => {
                let not_after = Some(self.handled_at + RELEASE_LEASE);
                let Some(n) = self
                    .fence
                    .unless_fenced(|| self.vm.release_output(e, not_after))
                else {
                    return Ok(());
                };
                tracing::trace!("{n} frames of output epoch {e} released");
                let (acked, path) = (self.handled_at, &self.stats.reply_path);
                self.reply.1.released(e, acked, Instant::now(), path);
                self.stats
                    .released_frames
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Command::Close(i) => self.to_close.push(i),
            Command::OpenData { backup: i, ports } => self.open_data(i, &ports),
            Command::PreCopyEpoch => match heavy(|| self.vm.precopy_epoch()) {
                Ok(n) => {
                    tracing::trace!("{n} pages of this epoch copied early");
                    self.stats
                        .early_pages
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                // A harvest that failed half way (one RAM slot read, the other not) may have
                // lost dirty pages: like a failed capture, the session fails and the record
                // of changes no longer vouches for anything (the next sync is a full one).
                Err(e) => {
                    p.handle_capture_failed(&format!("early copy: {e}"));
                    return Err(e.into());
                }
            },
        }
        Ok(())
    }

    fn on_work_done(
        &mut self,
        p: &mut Policy<'_>,
        done: Result<(bool, Result<EpochCapture, SnapshotError>), tokio::task::JoinError>,
    ) -> Result<(), PrimaryError> {
        match done {
            Ok((true, Ok(cap))) => p.handle_precopy(&cap, Instant::now()),
            Ok((false, Ok(cap))) => {
                p.handle_capture(&cap, Instant::now());
                // Its pages are encoded (and shadowed) by now: the buffer serves the next one,
                // given back once the checkpoint is handed to the writers (the refill and lock
                // must not delay it).
                self.recycle = Some(cap.data);
            }
            Ok((_, Err(e))) => {
                p.handle_capture_failed(&e.to_string());
                return Err(e.into());
            }
            Err(e) => {
                p.handle_capture_failed(&e.to_string());
                return Err(PrimaryError::BackupLost(format!("capture task: {e}")));
            }
        }
        Ok(())
    }
}

impl Drop for Driver {
    /// However the session ends, its connections end with it: a link left open (its reader
    /// keeps the connection alive) would hold the backup — which serves one session at a time —
    /// until its silence limit, delaying the next session's resync.
    fn drop(&mut self) {
        for (_, w) in self.links.iter_mut().filter_map(Option::take) {
            w.close(quic::code::SESSION_FAILED, "session over");
        }
        while let Ok((_, _, Ok(link))) = self.conns.try_recv() {
            link.close(quic::code::SESSION_FAILED, "session over");
        }
        while let Ok((_, _, (c, _))) = self.data.try_recv() {
            quic::close(&c, quic::code::SESSION_FAILED, "session over");
        }
    }
}

/// Hands what the policy queued for every connected backup to its writers, until the queue of
/// the next frame's lane is full (the rest waits in the policy; the loop is woken when a writer
/// made progress) or [`FLUSH_BUDGET`] bytes went to that backup in this step. Heartbeats go to
/// the front of the policy's queue and have their own writer, so checkpoint data waiting for
/// room never holds them up. True if it stopped at the budget with frames left: the loop then
/// yields to the QUIC tasks on its worker thread before it goes on.
fn flush(
    p: &mut Policy<'_>,
    links: &mut [Option<(u64, Writer)>],
    counter: Option<&AtomicU64>,
) -> bool {
    let mut more = false;
    for (i, slot) in links.iter_mut().enumerate() {
        let Some((_, w)) = slot else {
            continue;
        };
        w.retry();
        let mut sent = 0;
        while let Some(lane) = p.next_lane(i) {
            if w.blocked(lane) {
                break;
            }
            if sent >= FLUSH_BUDGET {
                more = true;
                break;
            }
            let Some((lane, f)) = p.poll_transmit(i, Instant::now()) else {
                break;
            };
            sent += f.len();
            if let Some(c) = counter {
                c.fetch_add(f.len() as u64, Ordering::Relaxed);
            }
            w.offer(lane, f);
        }
    }
    more
}
