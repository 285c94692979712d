//! Data sockets: extra sockets on the backup's address where the session's primary may open
//! more connections for its data streams (protocol v4: `Welcome.data_ports`). Each socket has
//! a quinn endpoint, and so a receive path (socket, packet routing, decryption), of its own:
//! one connection's receive path is one task, and a second one lets the backup use a second
//! core (docs/BENCHMARKS.md, "A stream that fills 10 GbE").
//!
//! Handshakes on them are bounded like the main socket's (`transport::quic::Server`). Only the
//! running session's own primary is taken in: a data connection must present the very
//! certificate of the session's connection (whose roles the session checked at its `Hello`);
//! any other, and any that arrives while no session runs, is closed with `REFUSED`. Data
//! connections end with their session ([`transport::BackupLink::close`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use transport::certs::Identity;
use transport::quic::code;
use transport::{QuicConfig, Server};

use crate::BackupError;

/// Authenticated data connections waiting to be taken or refused.
const WAITING: usize = 8;

/// Handshakes each data socket drives at a time: one primary opens one connection per socket,
/// so a flood of handshakes there costs little (the main socket allows
/// `transport::quic::MAX_HANDSHAKES`)...
const HANDSHAKES: usize = 16;
/// ... each for at most this long (the primary waits 1 s for its data connection): abandoned
/// handshakes hold a slot briefly.
const HANDSHAKE_MS: u64 = 500;

/// See the module docs.
pub(crate) struct DataSockets {
    servers: Vec<Arc<Server>>,
    ports: Vec<u16>,
    rx: mpsc::Receiver<quinn::Connection>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DataSockets {
    /// Binds sockets on `listen`'s address: at `ports` if any are given, else `n` on any free
    /// port each.
    pub fn bind(
        (n, fixed): (u8, &[u16]),
        listen: SocketAddr,
        id: &Identity,
        quic: &QuicConfig,
    ) -> Result<DataSockets, BackupError> {
        let at: Vec<u16> = match fixed {
            [] => vec![0; usize::from(n)],
            p => p.to_vec(),
        };
        let (tx, rx) = mpsc::channel(WAITING);
        let (mut servers, mut ports, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
        for port in at.into_iter().take(protocol::message::MAX_DATA_PORTS) {
            let at = SocketAddr::new(listen.ip(), port);
            let cfg = QuicConfig {
                handshake_timeout_ms: HANDSHAKE_MS.min(quic.handshake_timeout_ms),
                ..*quic
            };
            // (A data socket that cannot be had costs its connection, not the backup: the
            // primary goes on with those offered, or with the session's connection alone.)
            let s = match Server::bind_limited(at, id, &cfg, HANDSHAKES) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!("no data socket on {at}: {e}; offering the others");
                    continue;
                }
            };
            ports.push(s.local_addr()?.port());
            let (s2, tx) = (s.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok(c) = s2.accept().await {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
            }));
            servers.push(s);
        }
        Ok(DataSockets {
            servers,
            ports,
            rx,
            tasks,
        })
    }

    /// The ports to offer in `Welcome`.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The next authenticated data connection (never, without data sockets).
    pub async fn next(&mut self) -> quinn::Connection {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    /// Refuses a data connection that arrived while no session runs.
    pub fn refuse_idle(&self, c: &quinn::Connection) {
        self.refuse(c, "no session runs");
    }

    /// Closes `c` with `REFUSED` and `why`, recorded in the (rate-limited) refusal log of the
    /// data sockets.
    fn refuse(&self, c: &quinn::Connection, why: &str) {
        if let Some(s) = self.servers.first() {
            s.refusal_log()
                .record(c.remote_address(), format!("data connection: {why}"));
        }
        transport::quic::close(c, code::REFUSED, why);
    }

    /// Refuses the data connections that arrived before the session now starting sent its
    /// `Welcome` (so none can be its own: a primary opens them after it).
    pub fn refuse_waiting(&mut self) {
        while let Ok(c) = self.rx.try_recv() {
            self.refuse(&c, "it came before the session's Welcome");
        }
    }

    /// True if `c` may join the session whose connection is `session` and which holds `joined`
    /// open data connections: the same primary, one open connection per data socket at most
    /// (one the primary gave up on, closed, does not count).
    /// Otherwise it is closed with the reason (`REFUSED`).
    pub fn admit(&self, session: &quinn::Connection, c: &quinn::Connection, joined: usize) -> bool {
        if !transport::roles::same_peer(session, c) {
            self.refuse(
                c,
                "a data connection must present the session's certificate",
            );
            return false;
        }
        if joined >= self.ports.len() {
            self.refuse(c, "the session has a data connection on every data socket");
            return false;
        }
        true
    }
}

impl Drop for DataSockets {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in &self.servers {
            s.close();
        }
    }
}
