//! One backup as the epoch loop sees it: its protocol sender, its QUIC link, what it has
//! acknowledged (checkpoint seqs of the primary's one numbering, see [`crate::history`]), and
//! where it stands ([`Join`]): waiting for its `Welcome`, waiting for a quick resync or a full
//! sync inside the running session, in step, or failed (to be reconnected).
//!
//! Frames come tagged with the connection's generation, so a late frame of a dropped
//! connection never touches the peer that replaced it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::{Checkpoint, ProtocolError, Sender, SenderConfig};
use transport::{quic, PrimaryLink, TransportError};

use crate::{PrimaryConfig, PrimaryError};

/// Frames from every backup's link: (backup index, connection generation, frame).
pub(crate) type FrameTx = tokio::sync::mpsc::Sender<(usize, u64, Result<Vec<u8>, TransportError>)>;

/// Where a backup stands in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Join {
    /// Connected; its `Welcome` (with its committed position) has not arrived.
    Welcome,
    /// Gets every checkpoint of the session (also the session's own initial sync).
    InStep,
    /// Needs a quick resync from its committed seq, at the next capture.
    Resync(u64),
    /// Needs a full sync, from a full capture.
    Full,
}

/// One backup.
pub(crate) struct Peer {
    pub name: String,
    pub sender: Sender,
    /// None until connected.
    pub link: Option<PrimaryLink>,
    /// Highest acknowledged checkpoint seq.
    pub acked: Option<u64>,
    pub failed: Option<String>,
    pub version: u16,
    /// Connection generation (see the module docs).
    pub generation: u64,
    /// Where it stands.
    pub join: Join,
    /// Its committed image, from its `Welcome`.
    pub committed: Option<protocol::message::Position>,
    /// Since when its window has been full (it is not keeping up); None while it keeps up.
    pub behind_since: Option<Instant>,
}

impl Peer {
    /// Backup `name` before its first connection: not alive, to be connected.
    pub fn absent(cfg: &PrimaryConfig, name: &str) -> Peer {
        Peer {
            name: name.to_string(),
            sender: Sender::new(SenderConfig::new(cfg.cluster_id, &cfg.vm_id, cfg.term)),
            link: None,
            acked: None,
            failed: Some("not connected yet".into()),
            version: 0,
            generation: 0,
            join: Join::Welcome,
            committed: None,
            behind_since: None,
        }
    }

    pub async fn flush(&mut self) -> Result<(), PrimaryError> {
        self.flush_counting(None).await
    }

    /// Sends what the protocol queued, adding the bytes to `counter` as they go.
    pub async fn flush_counting(
        &mut self,
        counter: Option<&AtomicU64>,
    ) -> Result<(), PrimaryError> {
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        while let Some((lane, f)) = self.sender.poll_transmit(Instant::now()) {
            link.send(lane, &f).await?;
            if let Some(c) = counter {
                c.fetch_add(f.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Connected and not failed.
    pub fn alive(&self) -> bool {
        self.failed.is_none()
    }

    /// Takes part in the session's checkpoints (alive and in step).
    pub fn active(&self) -> bool {
        self.alive() && self.join == Join::InStep
    }

    /// Waits for its resync or full sync at the next capture.
    pub fn ready_to_join(&self) -> bool {
        self.alive() && matches!(self.join, Join::Resync(_) | Join::Full) && self.sender.is_ready()
    }

    /// Sends checkpoint `cp`.
    pub fn send(&mut self, now: Instant, cp: &Checkpoint) -> Result<(), ProtocolError> {
        self.sender.send_checkpoint(now, cp.clone())
    }
}

/// Connects to backup `index` (retrying for up to 10 s: it may still be starting) and says
/// Hello; its frames go to `tx` tagged with `generation`.
pub(crate) async fn connect(
    ep: &quinn::Endpoint,
    cfg: &PrimaryConfig,
    (addr, name): (SocketAddr, &str),
    index: usize,
    (generation, history): (u64, u64),
    tx: &FrameTx,
) -> Result<Peer, PrimaryError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match quic::connect(ep, addr, name).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::info!("backup {name} not reachable yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (link, mut rx) = PrimaryLink::open(conn, cfg.lanes).await?;
    let fwd = tx.clone();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if fwd.send((index, generation, f)).await.is_err() {
                return;
            }
        }
    });
    let mut scfg = SenderConfig::new(cfg.cluster_id, &cfg.vm_id, cfg.term);
    scfg.history = history;
    scfg.lanes = cfg.lanes;
    scfg.window = cfg.window;
    scfg.idle_timeout = Duration::from_millis(cfg.quic.idle_timeout_ms.max(500) * 3);
    let mut sender = Sender::new(scfg);
    sender.start(Instant::now());
    let mut p = Peer {
        name: name.to_string(),
        sender,
        link: Some(link),
        acked: None,
        failed: None,
        version: 0,
        generation,
        join: Join::Welcome,
        committed: None,
        behind_since: None,
    };
    p.flush().await?;
    Ok(p)
}

/// The highest checkpoint acknowledged by at least `required` live backups.
pub(crate) fn releasable(peers: &[Peer], required: usize) -> Option<u64> {
    let mut acks: Vec<u64> = peers
        .iter()
        .filter(|p| p.alive())
        .filter_map(|p| p.acked)
        .collect();
    acks.sort_unstable_by(|a, b| b.cmp(a));
    acks.get(required.checked_sub(1)?).copied()
}
