//! The fake agents of `manager_api.rs`: QUIC clients with an agent's certificate that say
//! Hello (any host, any version), heartbeat reports and read the manager's frames, so the test
//! can drive the manager as a cluster of hosts would, and see how it closes a connection.

use std::time::Duration;

use failover::model::Report;
use failover::wire::{self, AgentMsg, ManagerMsg};
use tokio::sync::{mpsc, watch};

use super::*;
pub(crate) fn quic_cfg() -> transport::QuicConfig {
    transport::QuicConfig {
        keep_alive_ms: 50,
        idle_timeout_ms: 2000,
        ..transport::QuicConfig::default()
    }
}

pub(crate) async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<ManagerMsg> {
    let mut h = [0u8; wire::HEADER];
    recv.read_exact(&mut h).await?;
    let mut p = vec![0u8; wire::payload_len(&h)?];
    recv.read_exact(&mut p).await?;
    Ok(wire::decode(&h, &p)?)
}

/// What became of a connection the manager closed: (code, reason).
pub(crate) async fn closed(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => panic!("the manager did not close the connection"),
    }
}

pub(crate) struct FakeAgent {
    pub(crate) conn: quinn::Connection,
    /// Assignments received.
    pub(crate) assigns: mpsc::UnboundedReceiver<ManagerMsg>,
    /// What it reports every 20 ms.
    pub(crate) report: watch::Sender<Report>,
    /// Raw bytes to write on its stream.
    pub(crate) raw: mpsc::UnboundedSender<Vec<u8>>,
    _ep: quinn::Endpoint,
}

/// Connects with `cert`'s certificate and says Hello naming `host` at `version`. Returns the
/// connection and, unless the manager closed it already, the stream's halves after the Hello
/// is written (without waiting for Welcome).
pub(crate) async fn hello(
    pki: &Path,
    cert: &str,
    host: &str,
    version: u16,
    mgr: SocketAddr,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    Option<(quinn::SendStream, quinn::RecvStream)>,
) {
    let id = transport::certs::load(pki, cert).unwrap();
    let ep = transport::quic::client(&id, &quic_cfg()).unwrap();
    let conn = transport::quic::connect_raw(&ep, mgr, "mgr").await.unwrap();
    let msg = AgentMsg::Hello {
        version,
        host: host.into(),
        repl_ip: "10.80.0.1".into(),
        capacity_mib: 4096,
    };
    let streams = async {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&wire::encode(&msg).unwrap()).await?;
        anyhow::Ok((send, recv))
    }
    .await
    .ok();
    (ep, conn, streams)
}

impl FakeAgent {
    pub(crate) async fn connect(pki: &Path, host: &str, mgr: SocketAddr) -> FakeAgent {
        let (ep, conn, streams) = hello(pki, host, host, wire::VERSION, mgr).await;
        let (mut send, mut recv) = streams.expect("stream open, Hello written");
        match read_frame(&mut recv).await.expect("Welcome") {
            ManagerMsg::Welcome { version } => assert_eq!(version, wire::VERSION),
            other => panic!("expected Welcome, got {other:?}"),
        }
        let (atx, assigns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(m) = read_frame(&mut recv).await {
                if atx.send(m).is_err() {
                    return;
                }
            }
        });
        let (report, mut rrx) = watch::channel(Report::default());
        let (raw, mut raw_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                let frame = tokio::select! {
                    _ = tick.tick() => {
                        let r = rrx.borrow_and_update().clone();
                        wire::encode(&AgentMsg::Report(r)).unwrap()
                    }
                    b = raw_rx.recv() => match b { Some(b) => b, None => return },
                };
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        FakeAgent {
            conn,
            assigns,
            report,
            raw,
            _ep: ep,
        }
    }

    /// The next assignment (skipping nothing), within 5 s.
    pub(crate) async fn next_assign(&mut self) -> failover::model::Assignments {
        match tokio::time::timeout(Duration::from_secs(5), self.assigns.recv()).await {
            Ok(Some(ManagerMsg::Assign(a))) => a,
            Ok(other) => panic!("expected Assign, got {other:?}"),
            Err(_) => panic!("no Assign within 5 s"),
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"test agent leaves");
    }
}
