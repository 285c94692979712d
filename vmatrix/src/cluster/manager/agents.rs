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

use failover::model::Assignments;
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

/// An agent that said hello: its stream and what it said.
struct Greeted {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    host: String,
    repl_ip: String,
    capacity_mib: u64,
}

async fn connection(conn: quinn::Connection, id: ConnId, core: mpsc::Sender<Cmd>) {
    let peer = conn.remote_address();
    let Some(g) = greet(&conn, peer, id).await else {
        return;
    };
    let Greeted {
        send,
        mut recv,
        host,
        repl_ip,
        capacity_mib,
    } = g;
    // The writer sends the newest whole assignment; the decision loop never waits for it.
    let (assign, latest) = watch::channel(None);
    let writer = tokio::spawn(write_assignments(
        conn.clone(),
        host.clone(),
        id,
        send,
        latest,
    ));
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
    read_reports(&conn, peer, id, &host, &mut recv, &core).await;
    writer.abort();
    let _ = core.send(Cmd::Gone { conn: id, host }).await;
}

/// Checks the agent's certificate and its Hello (within [`HELLO_TIMEOUT`]), then welcomes it;
/// refuses the connection (None) otherwise.
async fn greet(conn: &quinn::Connection, peer: SocketAddr, id: ConnId) -> Option<Greeted> {
    let cert = match transport::roles::check_peer(conn, HostRole::Agent, None) {
        Ok(c) => c,
        Err(e) => {
            refuse(conn, peer, &e.to_string());
            return None;
        }
    };
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let msg = read_msg::<AgentMsg>(&mut recv).await?;
        anyhow::Ok((send, recv, msg))
    })
    .await;
    let refused = |why: String| {
        refuse(conn, peer, &why);
        None
    };
    let (mut send, recv, hello) = match opened {
        Err(_) => return refused(format!("no Hello within {} ms", HELLO_TIMEOUT.as_millis())),
        Ok(Err(e)) => return refused(format!("no Hello: {e:#}")),
        Ok(Ok((_, _, None))) => return refused("stream finished before Hello".into()),
        Ok(Ok((s, r, Some(m)))) => (s, r, m),
    };
    let (host, repl_ip, capacity_mib) = match hello {
        AgentMsg::Hello { version, .. } if version != VERSION => {
            return refused(format!(
                "agent protocol version {version}, this manager speaks {VERSION}"
            ))
        }
        AgentMsg::Hello { host, .. } if host != cert.host => {
            return refused(format!(
                "Hello names host '{host}' but the certificate is for '{}'",
                cert.host
            ))
        }
        AgentMsg::Hello {
            host,
            repl_ip,
            capacity_mib,
            ..
        } => (host, repl_ip, capacity_mib),
        AgentMsg::Report(_) => return refused("first message is not Hello".into()),
    };
    if let Err(e) = write_msg(&mut send, &ManagerMsg::Welcome { version: VERSION }).await {
        tracing::warn!("agent {host} ({peer}): cannot welcome it: {e:#}");
        close(conn, code::SESSION_FAILED, "cannot write Welcome");
        return None;
    }
    tracing::info!(
        "agent {host} connected from {peer} (connection {id}, replication address {repl_ip}, \
         {capacity_mib} MiB)"
    );
    Some(Greeted {
        send,
        recv,
        host,
        repl_ip,
        capacity_mib,
    })
}

/// Sends the newest whole assignment whenever it changes, until the stream fails.
async fn write_assignments(
    conn: quinn::Connection,
    host: String,
    id: ConnId,
    mut send: quinn::SendStream,
    mut latest: watch::Receiver<Option<Assignments>>,
) {
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
}

/// Hands the agent's reports to the decision loop until the stream ends, fails or breaks the
/// protocol (then the connection is closed, saying why).
async fn read_reports(
    conn: &quinn::Connection,
    peer: SocketAddr,
    id: ConnId,
    host: &str,
    recv: &mut quinn::RecvStream,
    core: &mpsc::Sender<Cmd>,
) {
    loop {
        match read_msg::<AgentMsg>(recv).await {
            Ok(Some(AgentMsg::Report(report))) => {
                let r = Cmd::Report {
                    conn: id,
                    host: host.to_string(),
                    report,
                };
                if core.send(r).await.is_err() {
                    return;
                }
            }
            Ok(Some(AgentMsg::Hello { .. })) => {
                tracing::warn!(
                    "agent {host} ({peer}): a second Hello on connection {id}; closing it"
                );
                return close(conn, code::SESSION_FAILED, "protocol: a second Hello");
            }
            Ok(None) => {
                tracing::info!("agent {host} ({peer}) finished its stream (connection {id})");
                return close(conn, code::DONE, "stream finished");
            }
            Err(e) if e.downcast_ref::<FailoverError>().is_some() => {
                tracing::warn!(
                    "agent {host} ({peer}): bad frame on connection {id}: {e:#}; closing it"
                );
                return close(conn, code::SESSION_FAILED, &format!("bad frame: {e:#}"));
            }
            Err(e) => {
                let why = conn
                    .close_reason()
                    .map_or_else(|| format!("{e:#}"), |r| r.to_string());
                tracing::info!("agent {host} ({peer}): connection {id} ended: {why}");
                return close(conn, code::SESSION_FAILED, "stream failed");
            }
        }
    }
}
