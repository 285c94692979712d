//! One backup's connection as the epoch loop writes to it: a task for the control stream and
//! a task for the data streams, each fed by a bounded queue. The loop hands frames over without
//! waiting (`offer`); a full queue keeps the frame for the next turn, and the loop is woken when
//! a writer made progress. So a slow backup — its link, or QUIC's flow control while it is
//! busy — never holds up the epoch loop or the other backups, and heartbeats on the control
//! stream never wait behind checkpoint data.
//!
//! Data frames go round-robin over every data stream: those of the session's connection and,
//! once they are up, those of the data connections the backup offered ([`Writer::add_data`]).
//! The receiver takes parts and `End` in any order. But the first [`SMALL_CHECKPOINT`] bytes
//! of each checkpoint's data frames go on the session connection's first data stream, so a
//! small checkpoint (its `Begin` on the control stream, a part and its `End`) reaches the
//! backup on one connection: spread over the data connections it woke two or three receive
//! paths for a few KiB. A big one still spreads over every stream after its first 64 KiB.
//!
//! **Keepalive.** Heartbeats come from the policy, so from the loop: a loop busy with one long
//! step — encoding a checkpoint of a gigabyte against its shadow takes seconds — says nothing
//! meanwhile, and the backups end the session as silent (found with a 1 GiB churn on a 2 GiB
//! guest: every checkpoint and every full sync after it lost its backup). So the control task
//! sends a heartbeat of its own when the loop gave it nothing for [`KEEPALIVE`], and goes on
//! doing so for at most [`KEEPALIVE_MAX`] of the loop's silence: a loop quiet for longer is
//! hung, and the backups' silence check takes over again. The backup echoes it; the policy's
//! sender takes any heartbeat echo as a sign of life and nothing more.

use std::sync::Arc;
use std::time::Duration;

use protocol::message::Heartbeat;
use protocol::Message;
use tokio::sync::{mpsc, Notify};
use transport::{quic, PrimaryLink, TransportError};

/// Frames queued for the control stream (small ones: `Begin`, heartbeats, `Hello`, `Goodbye`).
const CONTROL_FRAMES: usize = 64;
/// Frames queued for the data streams (up to 1 MiB each).
const DATA_FRAMES: usize = 8;

/// The first this many bytes of a checkpoint's data frames go on the session connection's
/// first data stream, the rest round-robin (docs/BENCHMARKS.md, "Small checkpoints on one
/// connection").
pub const SMALL_CHECKPOINT: usize = 64 << 10;

/// Which data stream each data frame takes: the session connection's first while the
/// checkpoint's data frames so far come to at most [`SMALL_CHECKPOINT`] bytes, then round
/// robin over all of them; a checkpoint ends at its `End` frame.
#[derive(Debug, Default)]
struct Spread {
    /// Bytes of the current checkpoint's data frames, this one included.
    bytes: usize,
    next: usize,
}

impl Spread {
    /// The stream (of `streams`) for a data frame of `len` bytes (`end`: the checkpoint's
    /// `End`).
    fn pick(&mut self, len: usize, end: bool, streams: usize) -> usize {
        self.bytes = self.bytes.saturating_add(len);
        let i = match self.bytes <= SMALL_CHECKPOINT {
            true => 0,
            false => {
                self.next = self.next.wrapping_add(1);
                self.next % streams.max(1)
            }
        };
        if end {
            self.bytes = 0;
        }
        i
    }
}

/// The control stream's silence after which its task sends a heartbeat of its own (three of
/// the policy's heartbeat intervals).
pub const KEEPALIVE: Duration = Duration::from_millis(300);

/// The longest silence of the loop the keepalive covers.
pub const KEEPALIVE_MAX: Duration = Duration::from_secs(30);

/// A frame (or a write error) reported back to the loop: (backup, generation, error).
pub(crate) type WriteError = (usize, u64, Result<Vec<u8>, TransportError>);

/// See the module docs.
pub(crate) struct Writer {
    conn: quinn::Connection,
    /// Data connections taken into the session (closed with it).
    extra: Vec<quinn::Connection>,
    /// Lives as long as this writer: attempts to open data connections for it stop with it.
    alive: Arc<()>,
    /// More data streams for the data task.
    add: mpsc::UnboundedSender<Vec<quinn::SendStream>>,
    control: mpsc::Sender<Vec<u8>>,
    data: mpsc::Sender<Vec<u8>>,
    /// Frames taken from the policy that did not fit their queue: they go first next time.
    stash_control: Option<Vec<u8>>,
    stash_data: Option<Vec<u8>>,
}

impl Writer {
    /// Starts the writers of `link` (backup `index`, connection `generation`); a write error is
    /// reported on `errors`, progress on `progress`.
    pub fn spawn(
        link: PrimaryLink,
        (index, generation, term): (usize, u64, u64),
        errors: mpsc::Sender<WriteError>,
        progress: Arc<Notify>,
    ) -> Writer {
        let (conn, mut control_stream, mut data_streams) = link.into_parts();
        let (control, mut control_rx) = mpsc::channel::<Vec<u8>>(CONTROL_FRAMES);
        let (data, mut data_rx) = mpsc::channel::<Vec<u8>>(DATA_FRAMES);
        let (add, mut add_rx) = mpsc::unbounded_channel::<Vec<quinn::SendStream>>();
        let (e1, p1) = (errors.clone(), progress.clone());
        tokio::spawn(async move {
            let mut from_loop = tokio::time::Instant::now();
            let mut own = 0u64;
            loop {
                let f = match tokio::time::timeout(KEEPALIVE, control_rx.recv()).await {
                    Ok(Some(f)) => {
                        from_loop = tokio::time::Instant::now();
                        f
                    }
                    Ok(None) => return,
                    Err(_) if from_loop.elapsed() > KEEPALIVE_MAX => continue,
                    Err(_) => {
                        // (Counting down from the top: never one of the policy's numbers.)
                        own += 1;
                        let seq = u64::MAX - own;
                        Message::Heartbeat(Heartbeat { term, seq }).encode()
                    }
                };
                if let Err(e) = control_stream.write_chunk(bytes::Bytes::from(f)).await {
                    let e = TransportError::Stream(e.to_string());
                    let _ = e1.send((index, generation, Err(e))).await;
                    return;
                }
                p1.notify_one();
            }
        });
        tokio::spawn(async move {
            let mut spread = Spread::default();
            loop {
                let f = tokio::select! {
                    biased;
                    Some(more) = add_rx.recv() => {
                        data_streams.extend(more);
                        continue;
                    }
                    f = data_rx.recv() => match f {
                        Some(f) => f,
                        None => return,
                    },
                };
                let end = Message::is_end_frame(&f);
                let i = spread.pick(f.len(), end, data_streams.len());
                // (There is always one: the session connection opens at least one.)
                let Some(s) = data_streams.get_mut(i) else {
                    return;
                };
                if let Err(e) = s.write_chunk(bytes::Bytes::from(f)).await {
                    let e = TransportError::Stream(e.to_string());
                    let _ = errors.send((index, generation, Err(e))).await;
                    return;
                }
                progress.notify_one();
            }
        });
        Writer {
            conn,
            extra: Vec::new(),
            alive: Arc::new(()),
            add,
            control,
            data,
            stash_control: None,
            stash_data: None,
        }
    }

    /// True if the queue for `lane` has a frame waiting for room (take no more for it).
    pub fn blocked(&self, lane: u8) -> bool {
        match lane {
            0 => self.stash_control.is_some(),
            _ => self.stash_data.is_some(),
        }
    }

    /// Hands the frames that waited for room over, where there is room now.
    pub fn retry(&mut self) {
        if let Some(f) = self.stash_control.take() {
            self.offer(0, f);
        }
        if let Some(f) = self.stash_data.take() {
            self.offer(1, f);
        }
    }

    /// Hands a frame over without waiting; if its queue is full the frame waits here (the
    /// caller checks [`blocked`](Self::blocked) before offering another for that lane).
    pub fn offer(&mut self, lane: u8, f: Vec<u8>) {
        match lane {
            0 => {
                if let Err(e) = self.control.try_send(f) {
                    self.stash_control = Some(e.into_inner());
                }
            }
            // (Data frames go over the data streams as `Spread` says, whatever their lane.)
            _ => {
                if let Err(e) = self.data.try_send(f) {
                    self.stash_data = Some(e.into_inner());
                }
            }
        }
    }

    /// Gone once this writer is (its connection replaced or closed).
    pub fn alive(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// Takes a data connection and its streams into the session: data frames go over them
    /// too from now on.
    pub fn add_data(&mut self, conn: quinn::Connection, streams: Vec<quinn::SendStream>) {
        self.extra.push(conn);
        // (The data task ends only with the session's connection: the send cannot fail while
        // it matters.)
        let _ = self.add.send(streams);
    }

    /// Closes the connection and the data connections (the writers end with them).
    pub fn close(&self, code: u32, reason: &str) {
        quic::close(&self.conn, code, reason);
        for c in &self.extra {
            quic::close(c, code, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_ends_at_its_end_frame() {
        let end = protocol::message::End {
            term: 1,
            epoch: 9,
            attempt: 0,
            crc: 0,
        };
        assert!(Message::is_end_frame(&Message::End(end).encode()));
        let hb = Message::Heartbeat(Heartbeat { term: 1, seq: 9 }).encode();
        assert!(!Message::is_end_frame(&hb));
        assert!(!Message::is_end_frame(&[]));
    }

    #[test]
    fn a_small_checkpoint_takes_the_first_stream_and_a_big_one_all_of_them() {
        let mut s = Spread::default();
        // Small checkpoints: a part and End, again and again, on stream 0 only.
        for _ in 0..10 {
            assert_eq!(s.pick(9_000, false, 4), 0);
            assert_eq!(s.pick(100, true, 4), 0);
        }
        // A checkpoint of 300 frames of 16 KiB: its first 64 KiB on stream 0, then every
        // stream; the next small checkpoint is on stream 0 again.
        let picks: Vec<usize> = (0..300).map(|_| s.pick(16 << 10, false, 4)).collect();
        assert!(picks[..4].iter().all(|&i| i == 0), "{:?}", &picks[..8]);
        let mut seen = picks[4..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        s.pick(100, true, 4);
        assert_eq!(s.pick(9_000, false, 4), 0);
        s.pick(100, true, 4);
        // Streams added (a data connection joined): big frames reach them.
        let seen: std::collections::BTreeSet<usize> =
            (0..40).map(|_| s.pick(1 << 20, false, 6)).collect();
        assert_eq!(seen, (0..6).collect());
    }
}
