//! Round-trip latency of one small frame over a PrimaryLink/BackupLink pair on loopback, with
//! each side on its own one-worker runtime, the loop on its worker beside the QUIC tasks (as in
//! vmatrix), and in the same run of one
//! UDP datagram between two threads with blocking sockets (what the host's loopback and
//! scheduler cost without QUIC, TLS and the runtimes). Prints p50/p99 in µs.
//! `cargo run --release -p transport --example rtt`

use std::time::Instant;

use protocol::message::{Heartbeat, Message};
use transport::{certs, quic, BackupLink, PrimaryLink, QuicConfig, Server};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `fut` on a one-worker runtime's worker thread, beside the QUIC tasks it spawns (as
/// `vmatrix::rt::block_on_worker` does), not on the calling thread as `block_on` would.
fn on_worker<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = rt();
    rt.block_on(rt.spawn(fut)).unwrap()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("vmx-rtt-{}", std::process::id()));
    certs::init_ca(&dir).unwrap();
    certs::issue(&dir, "backup").unwrap();
    certs::issue(&dir, "primary").unwrap();
    let cfg = QuicConfig::default();
    let n: u64 = std::env::var("RTT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (atx, arx) = std::sync::mpsc::channel();
    let backup_id = certs::load(&dir, "backup").unwrap();
    let echo = std::thread::spawn(move || {
        on_worker(async move {
            let server = Server::bind(([127, 0, 0, 1], 0).into(), &backup_id, &cfg).unwrap();
            atx.send(server.local_addr().unwrap()).unwrap();
            let conn = server.accept().await.unwrap();
            let (mut link, mut rx) = BackupLink::accept(conn).await.unwrap();
            for _ in 0..n {
                let f = rx.recv().await.unwrap().unwrap();
                link.send(&f).await.unwrap();
            }
        })
    });
    let addr = arx.recv().unwrap();
    let cfg = QuicConfig::default();
    let mut lat: Vec<u128> = on_worker(async move {
        let ep = quic::client(&certs::load(&dir, "primary").unwrap(), &cfg).unwrap();
        let conn = quic::connect(&ep, addr, "backup").await.unwrap();
        let (mut link, mut rx) = PrimaryLink::open(conn, 1).await.unwrap();
        let mut lat = Vec::new();
        for seq in 0..n {
            let f = Message::Heartbeat(Heartbeat { term: 1, seq }).encode();
            let t = Instant::now();
            link.send(0, f.clone()).await.unwrap();
            rx.recv().await.unwrap().unwrap();
            lat.push(t.elapsed().as_micros());
        }
        lat
    });
    echo.join().unwrap();
    lat.sort();
    println!(
        "QUIC link round trip (1 small frame): p50 {} µs, p99 {} µs",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    let mut udp = udp_round_trips(n);
    udp.sort();
    println!(
        "UDP round trip (1 datagram, two threads, blocking sockets): p50 {} µs, p99 {} µs",
        udp[udp.len() / 2],
        udp[udp.len() * 99 / 100]
    );
}

/// `n` round trips of a 64-byte datagram between this thread and an echoing one.
fn udp_round_trips(n: u64) -> Vec<u128> {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        for _ in 0..n {
            let (len, from) = echo.recv_from(&mut b).unwrap();
            echo.send_to(&b[..len], from).unwrap();
        }
    });
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(addr).unwrap();
    let mut b = [0u8; 64];
    let lat = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            s.send(&b.clone()).unwrap();
            s.recv(&mut b).unwrap();
            t0.elapsed().as_micros()
        })
        .collect();
    t.join().unwrap();
    lat
}
