//! Agents' connections: QUIC with mutual TLS, one bidirectional stream each, carrying
//! [`failover::wire`] frames.
//!
//! A connection is served only if the peer's certificate grants the agent role and its
//! `Hello` speaks [`VERSION`] and names the certificate's host; it is then welcomed, handed to
//! the decision loop, and every `Report` goes there too. Anything else (a bad frame, a second
//! `Hello`, a silent peer) closes that connection with a log line saying why; the manager
//! keeps serving the others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failover::wire::{AgentMsg, ManagerMsg, VERSION};
use failover::FailoverError;
use tokio::sync::{mpsc, watch};
use transport::quic::{close, code};
use transport::roles::HostRole;

use super::core::{AgentLink, Cmd, ConnId};
use crate::cluster::link::{read_msg, write_msg};

/// How long a new connection may take to open its stream and say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC timers of agent connections. Failure detection does not depend on them (the decision
/// loop times heartbeats itself); a short idle timeout only turned a stall of a few hundred ms
/// into a reconnection and a longer silence (measured: 449 ms and a false failover), so a
/// silent agent's connection ends after 2 s.
pub fn quic_config() -> transport::QuicConfig {
    transport::QuicConfig {
        keep_alive_ms: 50,
        idle_timeout_ms: 2000,
        // Frames are at most 1 MiB (failover::wire::MAX_FRAME).
        stream_window: 4 << 20,
        conn_window: 8 << 20,
        ..transport::QuicConfig::default()
    }
}

/// Serves every connection the server accepts, until it closes.
pub async fn serve(server: Arc<transport::Server>, core: mpsc::Sender<Cmd>) {
    let ids = Arc::new(AtomicU64::new(1));
    loop {
        let conn = match server.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!("agent endpoint: {e}");
                return;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(conn, id, core.clone()));
    }
}

/// Refuses `conn`, saying why on both sides.
fn refuse(conn: &quinn::Connection, peer: SocketAddr, why: &str) {
    tracing::warn!("refused agent connection from {peer}: {why}");
    close(conn, code::REFUSED, why);
}

async fn connection(conn: quinn::Connection, id: ConnId, core: mpsc::Sender<Cmd>) {
    let peer = conn.remote_address();
    let cert = match transport::roles::check_peer(&conn, HostRole::Agent, None) {
        Ok(c) => c,
        Err(e) => return refuse(&conn, peer, &e.to_string()),
    };
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let msg = read_msg::<AgentMsg>(&mut recv).await?;
        anyhow::Ok((send, recv, msg))
    })
    .await;
    let (mut send, mut recv, hello) = match opened {
        Err(_) => {
            return refuse(
                &conn,
                peer,
                &format!("no Hello within {} ms", HELLO_TIMEOUT.as_millis()),
            )
        }
        Ok(Err(e)) => return refuse(&conn, peer, &format!("no Hello: {e:#}")),
        Ok(Ok((_, _, None))) => return refuse(&conn, peer, "stream finished before Hello"),
        Ok(Ok((s, r, Some(m)))) => (s, r, m),
    };
    let (host, repl_ip, capacity_mib) = match hello {
        AgentMsg::Hello {
            version,
            host,
            repl_ip,
            capacity_mib,
        } => {
            if version != VERSION {
                return refuse(
                    &conn,
                    peer,
                    &format!("agent protocol version {version}, this manager speaks {VERSION}"),
                );
            }
            if host != cert.host {
                return refuse(
                    &conn,
                    peer,
                    &format!(
                        "Hello names host '{host}' but the certificate is for '{}'",
                        cert.host
                    ),
                );
            }
            (host, repl_ip, capacity_mib)
        }
        AgentMsg::Report(_) => return refuse(&conn, peer, "first message is not Hello"),
    };
    if let Err(e) = write_msg(&mut send, &ManagerMsg::Welcome { version: VERSION }).await {
        tracing::warn!("agent {host} ({peer}): cannot welcome it: {e:#}");
        return close(&conn, code::SESSION_FAILED, "cannot write Welcome");
    }
    tracing::info!(
        "agent {host} connected from {peer} (connection {id}, replication address {repl_ip}, \
         {capacity_mib} MiB)"
    );

    // The writer sends the newest whole assignment; the decision loop never waits for it.
    let (assign, mut latest) = watch::channel(None);
    let writer = {
        let (conn, host) = (conn.clone(), host.clone());
        tokio::spawn(async move {
            while latest.changed().await.is_ok() {
                let Some(a) = latest.borrow_and_update().clone() else {
                    continue;
                };
                if let Err(e) = write_msg(&mut send, &ManagerMsg::Assign(a)).await {
                    tracing::info!("agent {host} (connection {id}): {e:#}");
                    close(
                        &conn,
                        code::SESSION_FAILED,
                        "cannot write to the agent stream",
                    );
                    return;
                }
            }
        })
    };
    let link = AgentLink {
        assign,
        conn: conn.clone(),
    };
    let hello = Cmd::Hello {
        conn: id,
        host: host.clone(),
        repl_ip,
        capacity_mib,
        link,
    };
    if core.send(hello).await.is_err() {
        writer.abort();
        return close(&conn, code::SHUTDOWN, "manager stops");
    }

    loop {
        match read_msg::<AgentMsg>(&mut recv).await {
            Ok(Some(AgentMsg::Report(report))) => {
                let r = Cmd::Report {
                    conn: id,
                    host: host.clone(),
                    report,
                };
                if core.send(r).await.is_err() {
                    break;
                }
            }
            Ok(Some(AgentMsg::Hello { .. })) => {
                tracing::warn!(
                    "agent {host} ({peer}): a second Hello on connection {id}; closing it"
                );
                close(&conn, code::SESSION_FAILED, "protocol: a second Hello");
                break;
            }
            Ok(None) => {
                tracing::info!("agent {host} ({peer}) finished its stream (connection {id})");
                close(&conn, code::DONE, "stream finished");
                break;
            }
            Err(e) if e.downcast_ref::<FailoverError>().is_some() => {
                tracing::warn!(
                    "agent {host} ({peer}): bad frame on connection {id}: {e:#}; closing it"
                );
                close(&conn, code::SESSION_FAILED, &format!("bad frame: {e:#}"));
                break;
            }
            Err(e) => {
                let why = conn
                    .close_reason()
                    .map_or_else(|| format!("{e:#}"), |r| r.to_string());
                tracing::info!("agent {host} ({peer}): connection {id} ended: {why}");
                close(&conn, code::SESSION_FAILED, "stream failed");
                break;
            }
        }
    }
    writer.abort();
    let _ = core.send(Cmd::Gone { conn: id, host }).await;
}
