//! Link capacity probe: raw quinn throughput (one unidirectional stream, mutual TLS, bytes
//! only) between two endpoints on this host. Benchmarks report replication bandwidth as a
//! ratio to this figure measured in the same run.

use std::time::Instant;

use crate::certs::Identity;
use crate::{quic, QuicConfig, Server, TransportError};

fn stream_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Stream(e.to_string())
}

/// Sends `bytes` (rounded down to whole MiB, at least 1 MiB) over one QUIC stream on loopback
/// from `client` to `server` (whose certificate names `server_name`); returns bytes per second.
pub async fn raw_quinn_throughput(
    server: &Identity,
    server_name: &str,
    client: &Identity,
    bytes: u64,
) -> Result<f64, TransportError> {
    let cfg = QuicConfig {
        idle_timeout_ms: 10_000,
        ..QuicConfig::default()
    };
    let mib = (bytes >> 20).max(1);
    let srv = Server::bind(([127, 0, 0, 1], 0).into(), server, &cfg)?;
    let addr = srv.local_addr()?;
    let rx = tokio::spawn(async move {
        let conn = srv.accept().await?;
        let mut s = conn.accept_uni().await.map_err(stream_err)?;
        let mut n = 0u64;
        while let Some(c) = s.read_chunk(1 << 20, true).await.map_err(stream_err)? {
            n += c.bytes.len() as u64;
        }
        Ok::<u64, TransportError>(n)
    });
    let ep = quic::client(client, &cfg)?;
    let conn = quic::connect(&ep, addr, server_name).await?;
    let mut s = conn.open_uni().await.map_err(stream_err)?;
    let buf = vec![7u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf).await.map_err(stream_err)?;
    }
    s.finish().map_err(stream_err)?;
    let n = rx.await.map_err(stream_err)??;
    let secs = t0.elapsed().as_secs_f64();
    if n != mib << 20 {
        return Err(TransportError::Stream(format!(
            "probe received {n} of {} bytes",
            mib << 20
        )));
    }
    Ok(n as f64 / secs)
}
