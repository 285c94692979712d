//! QUIC endpoints (quinn) with the cluster's mutual TLS and failure-detection timers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::certs::Identity;
use crate::error::TransportError;
use crate::tls::{self, RefusalLog};

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
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            keep_alive_ms: 100,
            idle_timeout_ms: 1000,
            stream_window: 32 << 20,
            conn_window: 128 << 20,
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
    Ok(t)
}

/// A listening endpoint (the backup side).
pub struct Server {
    endpoint: quinn::Endpoint,
    refusals: RefusalLog,
}

impl Server {
    /// Listens on `addr` with `id`'s certificate, requiring client certificates.
    pub fn bind(
        addr: SocketAddr,
        id: &Identity,
        cfg: &QuicConfig,
    ) -> Result<Server, TransportError> {
        let refusals = RefusalLog::default();
        let tls = tls::server_config(id, refusals.clone())?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(Arc::new(transport_config(cfg)?));
        let endpoint = quinn::Endpoint::server(sc, addr).map_err(|e| TransportError::Endpoint {
            addr: addr.to_string(),
            err: e.to_string(),
        })?;
        Ok(Server { endpoint, refusals })
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

    /// Waits for the next connection that completes the mutual-TLS handshake. A peer refused
    /// during the handshake is reported as `Refused` with the reason (and logged).
    pub async fn accept(&self) -> Result<quinn::Connection, TransportError> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or_else(|| TransportError::Closed("endpoint closed".into()))?;
        let peer = incoming.remote_address().to_string();
        match incoming.await {
            Ok(c) => {
                tracing::info!("accepted replication connection from {peer}");
                Ok(c)
            }
            Err(e) => {
                let mut reason = e.to_string();
                if let Some(v) = self.refusals.lock().ok().and_then(|l| l.last().cloned()) {
                    reason = format!("{reason} ({v})");
                }
                tracing::warn!("refused connection from {peer}: {reason}");
                Err(TransportError::Refused { peer, reason })
            }
        }
    }

    /// Every client-certificate refusal so far.
    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
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
    let mut ep = quinn::Endpoint::client(bind).map_err(|e| TransportError::Endpoint {
        addr: bind.to_string(),
        err: e.to_string(),
    })?;
    ep.set_default_client_config(cc);
    Ok(ep)
}

/// Connects to `addr`, expecting the server certificate to name `server_name`.
pub async fn connect(
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
