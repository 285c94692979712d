//! Round-trip latency of one small frame over a PrimaryLink/BackupLink pair on loopback, with
//! each side on its own one-worker runtime thread (as in vmatrix). Prints p50/p99 in µs.
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

fn main() {
    let dir = std::env::temp_dir().join(format!("vmx-rtt-{}", std::process::id()));
    certs::init_ca(&dir).unwrap();
    certs::issue(&dir, "backup").unwrap();
    certs::issue(&dir, "primary").unwrap();
    let cfg = QuicConfig::default();
    let n = 2000;
    let (atx, arx) = std::sync::mpsc::channel();
    let backup_id = certs::load(&dir, "backup").unwrap();
    let echo = std::thread::spawn(move || {
        rt().block_on(async move {
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
    let mut lat: Vec<u128> = rt().block_on(async move {
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
}
