//! One backup's connection as the epoch loop writes to it: a task for the control stream and
//! a task for the data streams, each fed by a bounded queue. The loop hands frames over without
//! waiting (`offer`); a full queue keeps the frame for the next turn, and the loop is woken when
//! a writer made progress. So a slow backup — its link, or QUIC's flow control while it is
//! busy — never holds up the epoch loop or the other backups, and heartbeats on the control
//! stream never wait behind checkpoint data.

use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use transport::{quic, PrimaryLink, TransportError};

/// Frames queued for the control stream (small ones: `Begin`, heartbeats, `Hello`, `Goodbye`).
const CONTROL_FRAMES: usize = 64;
/// Frames queued for the data streams (up to 1 MiB each).
const DATA_FRAMES: usize = 8;

/// A frame (or a write error) reported back to the loop: (backup, generation, error).
pub(crate) type WriteError = (usize, u64, Result<Vec<u8>, TransportError>);

/// See the module docs.
pub(crate) struct Writer {
    conn: quinn::Connection,
    control: mpsc::Sender<Vec<u8>>,
    data: mpsc::Sender<(u8, Vec<u8>)>,
    /// Frames taken from the policy that did not fit their queue: they go first next time.
    stash_control: Option<Vec<u8>>,
    stash_data: Option<(u8, Vec<u8>)>,
}

impl Writer {
    /// Starts the writers of `link` (backup `index`, connection `generation`); a write error is
    /// reported on `errors`, progress on `progress`.
    pub fn spawn(
        link: PrimaryLink,
        (index, generation): (usize, u64),
        errors: mpsc::Sender<WriteError>,
        progress: Arc<Notify>,
    ) -> Writer {
        let (conn, mut control_stream, mut data_streams) = link.into_parts();
        let (control, mut control_rx) = mpsc::channel::<Vec<u8>>(CONTROL_FRAMES);
        let (data, mut data_rx) = mpsc::channel::<(u8, Vec<u8>)>(DATA_FRAMES);
        let (e1, p1) = (errors.clone(), progress.clone());
        tokio::spawn(async move {
            while let Some(f) = control_rx.recv().await {
                if let Err(e) = control_stream.write_chunk(bytes::Bytes::from(f)).await {
                    let e = TransportError::Stream(e.to_string());
                    let _ = e1.send((index, generation, Err(e))).await;
                    return;
                }
                p1.notify_one();
            }
        });
        tokio::spawn(async move {
            let n = data_streams.len().max(1);
            while let Some((lane, f)) = data_rx.recv().await {
                let Some(s) = data_streams.get_mut((usize::from(lane).max(1) - 1) % n) else {
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
        if let Some((lane, f)) = self.stash_data.take() {
            self.offer(lane, f);
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
            l => {
                if let Err(e) = self.data.try_send((l, f)) {
                    self.stash_data = Some(e.into_inner());
                }
            }
        }
    }

    /// Closes the connection (the writers end with it).
    pub fn close(&self, code: u32, reason: &str) {
        quic::close(&self.conn, code, reason);
    }
}
