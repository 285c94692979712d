//! QUIC endpoints (quinn) with the cluster's mutual TLS and failure-detection timers.
//!
//! The server side is reachable by anyone on the network. It drives every incoming handshake
//! in a task of its own, bounded by [`QuicConfig::handshake_timeout_ms`], and hands the
//! connections that complete mutual TLS to [`Server::accept`] through a bounded queue: a peer
//! that starts handshakes and abandons them (or floods the port with ClientHellos) costs a
//! task each for at most the timeout and never delays a real primary. Refusals are recorded
//! per connection in a bounded, rate-limited log ([`crate::refusals`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::{mpsc, Semaphore};

use crate::certs::Identity;
use crate::error::TransportError;
use crate::refusals::{Refusal, RefusalLog};
use crate::roles::HostRole;
use crate::tls;

/// Application error codes a replication connection is closed with (QUIC
/// `CONNECTION_CLOSE`, with a reason text).
pub mod code {
    /// The session ended normally.
    pub const DONE: u32 = 0;
    /// The session failed (a transport, image or protocol error); the reason says which.
    pub const SESSION_FAILED: u32 = 1;
    /// The peer is refused: its certificate's roles, cluster, VM, version or term.
    pub const REFUSED: u32 = 2;
    /// The peer said nothing for too long.
    pub const PEER_TIMEOUT: u32 = 3;
    /// The server has too many connections waiting to be served.
    pub const BUSY: u32 = 4;
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 5;
}

/// Longest close reason sent (it must fit in one packet).
pub const MAX_CLOSE_REASON: usize = 256;

/// Closes `conn` with application error `code` and `reason` (cut to [`MAX_CLOSE_REASON`]
/// bytes at a character boundary).
pub fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(code.into(), &reason.as_bytes()[..end]);
}

/// Handshakes a server drives at the same time; more are refused at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Authenticated connections waiting for [`Server::accept`]; more are closed with
/// [`code::BUSY`].
pub const ACCEPT_QUEUE: usize = 8;

/// Timers and windows of a replication connection.
#[derive(Debug, Clone, Copy)]
pub struct QuicConfig {
    /// Keep-alive interval, ms (a silent peer is noticed within `idle_timeout_ms`).
    pub keep_alive_ms: u64,
    /// Connection idle timeout, ms.
    pub idle_timeout_ms: u64,
    /// Per-stream receive window, bytes.
    pub stream_window: u64,
    /// Per-connection receive window, bytes.
    pub conn_window: u64,
    /// Longest time a server waits for an incoming handshake (mutual TLS) to complete, ms.
    pub handshake_timeout_ms: u64,
    /// Largest UDP payload sent or accepted, bytes: the upper bound of QUIC's path MTU
    /// discovery (which starts at 1,200 and finds what the path carries: 1,452 on Ethernet,
    /// more on loopback and jumbo-frame links). At most [`MAX_UDP_PAYLOAD`].
    pub max_udp_payload: u16,
}

/// Largest useful [`QuicConfig::max_udp_payload`]: quinn hands the kernel up to 10 datagrams
/// per GSO send, which must fit in one 64 KiB UDP message; larger datagrams fail to send.
pub const MAX_UDP_PAYLOAD: u16 = 6_500;

/// QUIC's smallest datagram (RFC 9000 §14): the start of path MTU discovery.
pub const MIN_UDP_PAYLOAD: u16 = 1_200;

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            keep_alive_ms: 100,
            idle_timeout_ms: 1000,
            stream_window: 32 << 20,
            conn_window: 128 << 20,
            handshake_timeout_ms: 2000,
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

fn transport_config(c: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(c.keep_alive_ms.max(1))));
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(c.idle_timeout_ms.max(1)))
        .map_err(|e| TransportError::Tls(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    let win = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    t.stream_receive_window(win(c.stream_window));
    t.receive_window(win(c.conn_window));
    t.send_window(c.conn_window);
    t.max_concurrent_uni_streams(win(64));
    t.max_concurrent_bidi_streams(win(16));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(udp_payload(c));
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

fn udp_payload(c: &QuicConfig) -> u16 {
    c.max_udp_payload.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
}

/// An endpoint on a socket bound to `addr`, accepting datagrams up to the configured size.
fn endpoint(
    addr: SocketAddr,
    cfg: &QuicConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let err = |e: std::io::Error| TransportError::Endpoint {
        addr: addr.to_string(),
        err: e.to_string(),
    };
    let mut ec = quinn::EndpointConfig::default();
    ec.max_udp_payload_size(udp_payload(cfg))
        .map_err(|e| TransportError::Tls(format!("max UDP payload: {e}")))?;
    let socket = std::net::UdpSocket::bind(addr).map_err(err)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| err(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(ec, server, socket, runtime).map_err(err)
}

/// A listening endpoint (the backup side).
pub struct Server {
    endpoint: quinn::Endpoint,
    refusals: RefusalLog,
    ready: tokio::sync::Mutex<mpsc::Receiver<quinn::Connection>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Listens on `addr` with `id`'s certificate, requiring client certificates, and starts
    /// taking handshakes (a tokio runtime must be running).
    pub fn bind(
        addr: SocketAddr,
        id: &Identity,
        cfg: &QuicConfig,
    ) -> Result<Server, TransportError> {
        Self::bind_limited(addr, id, cfg, MAX_HANDSHAKES)
    }

    /// [`Server::bind`] driving at most `handshakes` handshakes at a time (more are refused at
    /// once).
    pub fn bind_limited(
        addr: SocketAddr,
        id: &Identity,
        cfg: &QuicConfig,
        handshakes: usize,
    ) -> Result<Server, TransportError> {
        let tls = tls::server_config(id)?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(Arc::new(transport_config(cfg)?));
        let endpoint = endpoint(addr, cfg, Some(sc))?;
        let refusals = RefusalLog::default();
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let timeout = Duration::from_millis(cfg.handshake_timeout_ms.max(1));
        let limits = (timeout, handshakes.max(1));
        let driver = tokio::spawn(drive(endpoint.clone(), tx, refusals.clone(), limits));
        Ok(Server {
            endpoint,
            refusals,
            ready: tokio::sync::Mutex::new(rx),
            driver,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Endpoint {
                addr: "?".into(),
                err: e.to_string(),
            })
    }

    /// Waits for the next connection that has completed the mutual-TLS handshake and is still
    /// open. Refused and abandoned handshakes never come out here: they are recorded in
    /// [`Server::refusals`] and logged.
    pub async fn accept(&self) -> Result<quinn::Connection, TransportError> {
        let mut rx = self.ready.lock().await;
        loop {
            let conn = rx
                .recv()
                .await
                .ok_or_else(|| TransportError::Closed("endpoint closed".into()))?;
            match conn.close_reason() {
                None => return Ok(conn),
                Some(e) => tracing::info!(
                    "connection from {} closed while it waited to be served: {e}",
                    conn.remote_address()
                ),
            }
        }
    }

    /// The most recent refusals (at most [`crate::refusals::KEEP`]), each with its own peer
    /// and reason.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.recent()
    }

    /// The refusal log (totals, lines written).
    pub fn refusal_log(&self) -> &RefusalLog {
        &self.refusals
    }

    /// Closes the endpoint: handshakes and connections end with [`code::SHUTDOWN`].
    pub fn close(&self) {
        self.driver.abort();
        self.endpoint.close(code::SHUTDOWN.into(), b"shutdown");
    }
}

impl Drop for Server {
    /// Stops taking handshakes; connections already accepted stay open.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Takes incoming connections and runs each handshake in its own task.
async fn drive(
    endpoint: quinn::Endpoint,
    ready: mpsc::Sender<quinn::Connection>,
    refusals: RefusalLog,
    (timeout, handshakes): (Duration, usize),
) {
    let slots = Arc::new(Semaphore::new(handshakes));
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            refusals.record(peer, format!("{handshakes} handshakes already in progress"));
            continue;
        };
        let (ready, refusals) = (ready.clone(), refusals.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => return refusals.record(peer, e.to_string()),
            };
            // Dropping an unfinished handshake closes it.
            let conn = match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return refusals.record(peer, e.to_string()),
                Err(_) => {
                    return refusals.record(
                        peer,
                        format!("handshake not finished within {} ms", timeout.as_millis()),
                    )
                }
            };
            tracing::info!("accepted replication connection from {peer}");
            match ready.try_send(conn) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(c)) => {
                    tracing::warn!(
                        "connection from {peer} closed: {ACCEPT_QUEUE} connections already wait"
                    );
                    close(&c, code::BUSY, "busy: too many connections waiting");
                }
                Err(mpsc::error::TrySendError::Closed(c)) => {
                    close(&c, code::SHUTDOWN, "shutdown");
                }
            }
        });
    }
}

/// A client endpoint (the primary side) presenting `id`'s certificate.
pub fn client(id: &Identity, cfg: &QuicConfig) -> Result<quinn::Endpoint, TransportError> {
    client_with(tls::client_config(id)?, cfg)
}

/// A client endpoint with an explicit rustls configuration (tests of refusal).
pub fn client_with(
    tls: rustls::ClientConfig,
    cfg: &QuicConfig,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(Arc::new(transport_config(cfg)?));
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut ep = endpoint(bind, cfg, None)?;
    ep.set_default_client_config(cc);
    Ok(ep)
}

/// Connects to the backup at `addr`, expecting its certificate to name `server_name` and to
/// grant the backup role (for some VM; [`connect_backup`] checks a particular one).
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    connect_backup(ep, addr, server_name, None).await
}

/// Connects to the backup at `addr`, expecting its certificate to name `server_name` and to
/// grant the backup role for `vm` (`None`: for some VM). A certificate that does not is refused:
/// the connection is closed with [`code::REFUSED`] and the error says why.
pub async fn connect_backup(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    vm: Option<&str>,
) -> Result<quinn::Connection, TransportError> {
    let conn = connect_raw(ep, addr, server_name).await?;
    if let Err(e) = crate::roles::check_peer(&conn, HostRole::Backup, vm) {
        close(&conn, code::REFUSED, &e.to_string());
        return Err(e);
    }
    Ok(conn)
}

/// Connects without checking the server's roles (tests).
pub async fn connect_raw(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    let err = |reason: String| TransportError::Connect {
        peer: format!("{server_name} ({addr})"),
        reason,
    };
    let connecting = ep
        .connect(addr, server_name)
        .map_err(|e| err(e.to_string()))?;
    let conn = connecting.await.map_err(|e| err(e.to_string()))?;
    // With TLS 1.3 the server checks the client certificate after the client considers the
    // handshake done; a refusal arrives as an immediate close. Wait for the server to speak.
    Ok(conn)
}
