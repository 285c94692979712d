//! Protocol frames over QUIC streams.
//!
//! The primary opens one bidirectional **control** stream (lane 0: `Hello`, `Begin`,
//! heartbeats, `Goodbye`; the backup answers on its return direction) and `lanes`
//! unidirectional **data** streams (lanes 1..: checkpoint parts and each checkpoint's `End`).
//! More data streams may come on **data connections** of the same primary
//! ([`BackupLink::join`]): the backup confirms each it takes in with [`JOINED`] on a stream
//! of its own, which the primary waits for ([`joined`]) before it writes there. Each stream is
//! a sequence of frames; the receiving side cuts them with `FrameReader` (refusing a bad
//! header before buffering its length) and merges all streams into one channel.

use protocol::frame::FrameReader;
use tokio::sync::mpsc;

use crate::error::TransportError;

/// What the backup sends on a data connection it took into a session.
pub const JOINED: &[u8] = b"VMXJOIN1";

/// Waits (at most `within`) for the backup's confirmation that it took data connection
/// `conn` into the session.
pub async fn joined(
    conn: &quinn::Connection,
    within: std::time::Duration,
) -> Result<(), TransportError> {
    let confirm = async {
        let mut s = conn.accept_uni().await.map_err(stream_err)?;
        let got = s.read_to_end(JOINED.len()).await.map_err(stream_err)?;
        if got != JOINED {
            return Err(TransportError::Stream("not a join confirmation".into()));
        }
        Ok(())
    };
    match tokio::time::timeout(within, confirm).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Stream(format!(
            "the backup did not take the data connection within {within:?}"
        ))),
    }
}

/// Incoming frames of all streams of a connection.
pub type FrameRx = mpsc::Receiver<Result<Vec<u8>, TransportError>>;
type FrameTx = mpsc::Sender<Result<Vec<u8>, TransportError>>;

/// Frames of one connection waiting for the session loop (each at most a frame's maximum size:
/// a receiver counts this much against its memory bound).
pub const CHANNEL_FRAMES: usize = 64;

async fn read_frames(mut recv: quinn::RecvStream, tx: FrameTx) {
    let mut reader = FrameReader::new();
    loop {
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(chunk)) => {
                reader.push(&chunk.bytes);
                loop {
                    match reader.next_frame() {
                        Ok(Some(f)) => {
                            if tx.send(Ok(f)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(TransportError::Stream(e.to_string()))).await;
                return;
            }
        }
    }
}

/// Reads every data stream `conn` opens into `tx`.
fn read_streams(conn: quinn::Connection, tx: FrameTx) {
    tokio::spawn(async move {
        while let Ok(uni) = conn.accept_uni().await {
            tokio::spawn(read_frames(uni, tx.clone()));
        }
    });
}

fn stream_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Stream(e.to_string())
}

/// The primary's end of a replication connection.
pub struct PrimaryLink {
    conn: quinn::Connection,
    control: quinn::SendStream,
    data: Vec<quinn::SendStream>,
}

impl PrimaryLink {
    /// Opens the control stream and `lanes` data streams.
    pub async fn open(
        conn: quinn::Connection,
        lanes: u8,
    ) -> Result<(PrimaryLink, FrameRx), TransportError> {
        Self::open_multi(conn, &[], lanes).await
    }

    /// Opens the control stream on `conn` and `lanes` data streams spread over `conn` and
    /// `extra` (lane 1 on `conn`, lane 2 on `extra[0]`, …).
    pub async fn open_multi(
        conn: quinn::Connection,
        extra: &[quinn::Connection],
        lanes: u8,
    ) -> Result<(PrimaryLink, FrameRx), TransportError> {
        let (control, recv) = conn.open_bi().await.map_err(stream_err)?;
        let mut data = Vec::new();
        let all: Vec<&quinn::Connection> = std::iter::once(&conn).chain(extra).collect();
        for i in 0..usize::from(lanes.max(1)) {
            data.push(all[i % all.len()].open_uni().await.map_err(stream_err)?);
        }
        let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
        tokio::spawn(read_frames(recv, tx));
        Ok((
            PrimaryLink {
                conn,
                control,
                data,
            },
            rx,
        ))
    }

    /// Sends a frame on a lane (0 = control); quinn takes the buffer as it is (no copy).
    pub async fn send(&mut self, lane: u8, frame: Vec<u8>) -> Result<(), TransportError> {
        let s = match lane {
            0 => &mut self.control,
            l => {
                let n = self.data.len();
                &mut self.data[(usize::from(l) - 1) % n]
            }
        };
        s.write_chunk(bytes::Bytes::from(frame))
            .await
            .map_err(stream_err)
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The connection, the control stream and the data streams, for writers of their own
    /// (the primary writes each from its own task, so a full data stream never holds up the
    /// control stream).
    pub fn into_parts(self) -> (quinn::Connection, quinn::SendStream, Vec<quinn::SendStream>) {
        (self.conn, self.control, self.data)
    }

    /// Ends a failed session: closes the connection at once with application error `code`
    /// (see [`crate::quic::code`]) and `reason`; the backup's streams and reader tasks end.
    pub fn close(&self, code: u32, reason: &str) {
        crate::quic::close(&self.conn, code, reason);
    }

    /// Finishes all streams and waits until the peer has everything.
    pub async fn finish(mut self) -> Result<(), TransportError> {
        for s in self
            .data
            .iter_mut()
            .chain(std::iter::once(&mut self.control))
        {
            s.finish().map_err(stream_err)?;
        }
        for s in self
            .data
            .iter_mut()
            .chain(std::iter::once(&mut self.control))
        {
            let _ = s.stopped().await;
        }
        Ok(())
    }
}

/// The backup's end of a replication connection.
pub struct BackupLink {
    conn: quinn::Connection,
    control: quinn::SendStream,
    /// (Weak: once every stream's reader has ended, the session's channel closes.)
    frames: mpsc::WeakSender<Result<Vec<u8>, TransportError>>,
    /// Connections taken in by [`BackupLink::join`] (closed with the session).
    joined: Vec<quinn::Connection>,
}

impl BackupLink {
    /// Accepts the primary's control stream and, in the background, its data streams.
    pub async fn accept(conn: quinn::Connection) -> Result<(BackupLink, FrameRx), TransportError> {
        let (control, recv) = conn.accept_bi().await.map_err(stream_err)?;
        let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
        tokio::spawn(read_frames(recv, tx.clone()));
        let link = BackupLink {
            conn,
            control,
            frames: tx.downgrade(),
            joined: Vec::new(),
        };
        read_streams(link.conn.clone(), tx);
        Ok((link, rx))
    }

    /// Takes the data streams of another connection of the same primary into this session
    /// (the caller checked that it is the same primary) and confirms it ([`JOINED`]); it is
    /// closed with the session.
    pub fn join(&mut self, conn: quinn::Connection) {
        self.joined.retain(|c| c.close_reason().is_none());
        let Some(tx) = self.frames.upgrade() else {
            crate::quic::close(&conn, crate::quic::code::SESSION_FAILED, "session over");
            return;
        };
        read_streams(conn.clone(), tx);
        let c = conn.clone();
        tokio::spawn(async move {
            if let Ok(mut s) = c.open_uni().await {
                if s.write_all(JOINED).await.is_ok() {
                    let _ = s.finish();
                }
            }
        });
        self.joined.push(conn);
    }

    /// Connections taken in by [`BackupLink::join`] that are still open.
    pub fn joined(&self) -> usize {
        self.joined
            .iter()
            .filter(|c| c.close_reason().is_none())
            .count()
    }

    /// Sends a frame to the primary (control stream).
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.control.write_all(frame).await.map_err(stream_err)
    }

    /// Ends the session: finishes the control stream so what was sent (a `Refuse`, the last
    /// acks) reaches the primary, waits up to `linger` for it to be read, then closes the
    /// connection with application error `code` (see [`crate::quic::code`]) and `reason`.
    pub async fn close(mut self, code: u32, reason: &str, linger: std::time::Duration) {
        if self.control.finish().is_ok() {
            let _ = tokio::time::timeout(linger, self.control.stopped()).await;
        }
        crate::quic::close(&self.conn, code, reason);
        for c in &self.joined {
            crate::quic::close(c, code, reason);
        }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}
