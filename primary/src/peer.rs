//! Connecting to a backup: the QUIC connection (mutual TLS) with its control and data streams,
//! frames from the backup forwarded to the epoch loop tagged with the backup's index and the
//! connection's generation (so a late frame of a dropped connection never reaches the
//! connection that replaced it). The protocol session on top is the policy's
//! ([`crate::policy`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use transport::{quic, PrimaryLink, TransportError};

use crate::PrimaryError;

/// Wait for each of the first 20 handshake attempts (later ones wait 2 s).
const ATTEMPT: Duration = Duration::from_millis(150);

/// Frames from every backup's link: (backup index, connection generation, frame).
pub(crate) type FrameTx = tokio::sync::mpsc::Sender<(usize, u64, Result<Vec<u8>, TransportError>)>;

/// Connects to backup `index` (retrying for up to 10 s: it may still be starting); its frames
/// go to `tx` tagged with `generation`.
pub(crate) async fn connect(
    ep: &quinn::Endpoint,
    (addr, name): (SocketAddr, &str),
    vm: &str,
    lanes: u8,
    (index, generation): (usize, u64),
    tx: &FrameTx,
) -> Result<PrimaryLink, PrimaryError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tries = 0u32;
    let conn = loop {
        // Attempts are short for the first few seconds: one made while the link is down would
        // otherwise wait for QUIC's handshake retransmission (about a second) after the link
        // heals. Then they grow, so a slow path (a long round trip) still gets through.
        let attempt = match tries {
            0..20 => ATTEMPT,
            _ => Duration::from_secs(2),
        };
        tries += 1;
        // The backup's certificate must grant it the backup role for this VM.
        let r = tokio::time::timeout(attempt, quic::connect_backup(ep, addr, name, Some(vm))).await;
        match r {
            Ok(Ok(c)) => break c,
            // A certificate that does not allow it is not going to change: no retries.
            Ok(Err(e @ TransportError::NotPermitted { .. })) => return Err(e.into()),
            Ok(Err(e)) if Instant::now() < deadline => {
                tracing::debug!("backup {name} not reachable yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) if Instant::now() < deadline => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(PrimaryError::BackupLost(format!(
                    "backup {name}: no handshake within 10 s"
                )))
            }
        }
    };
    let (link, mut rx) = PrimaryLink::open(conn, lanes).await?;
    let fwd = tx.clone();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if fwd.send((index, generation, f)).await.is_err() {
                return;
            }
        }
    });
    Ok(link)
}

/// Longest wait for a data connection's handshake and the backup's confirmation: a port the
/// path does not let through (a firewall) costs this once, and the session goes on without it.
const DATA_ATTEMPT: Duration = Duration::from_secs(1);

/// A data connection to a backup and its streams.
pub(crate) type DataConn = (quinn::Connection, Vec<quinn::SendStream>);

/// Connects to the data `port` the backup at `addr` offered (its certificate checked as for
/// the session's connection), waits for the backup to take it into the session
/// ([`transport::link::joined`]) and opens `lanes` data streams on it. None (with a warning,
/// or a debug line if `quiet`) if that does not happen within [`DATA_ATTEMPT`].
pub(crate) async fn connect_data(
    ep: &quinn::Endpoint,
    (addr, name): (SocketAddr, &str),
    vm: &str,
    (port, lanes): (u16, u8),
    quiet: bool,
) -> Option<DataConn> {
    let failed = |why: String| {
        if quiet {
            tracing::debug!("backup {name}: no data connection to port {port}: {why}");
        } else {
            tracing::warn!("backup {name}: no data connection to port {port}: {why} (retrying)");
        }
    };
    let at = SocketAddr::new(addr.ip(), port);
    let deadline = tokio::time::Instant::now() + DATA_ATTEMPT;
    let connect = quic::connect_backup(ep, at, name, Some(vm));
    let c = match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            failed(e.to_string());
            return None;
        }
        Err(_) => {
            failed(format!("nothing within {DATA_ATTEMPT:?}"));
            return None;
        }
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut streams = Vec::new();
    let opened = async {
        transport::link::joined(&c, left).await?;
        for _ in 0..lanes.max(1) {
            let s = c.open_uni().await;
            streams.push(s.map_err(|e| TransportError::Stream(e.to_string()))?);
        }
        Ok::<_, TransportError>(())
    };
    if let Err(e) = opened.await {
        failed(e.to_string());
        quic::close(&c, quic::code::SESSION_FAILED, "not taken into the session");
        return None;
    }
    Some((c, streams))
}
