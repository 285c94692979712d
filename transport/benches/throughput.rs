//! `cargo bench -p transport --bench throughput`: checkpoint streaming over loopback QUIC with
//! 1, 2 and 4 data streams on one connection and spread over 2 and 4 connections (each to a
//! socket of its own on the backup) — protocol Sender → Receiver, mutual TLS — next to raw quinn
//! (one stream, bytes only) and raw TCP measured in the same run, with the CPU the process used
//! (cores) while checkpoints streamed. Prints Markdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use protocol::checkpoint::Checkpoint;
use protocol::message::Kind;
use protocol::page::{PageData, PAGE};
use protocol::{Receiver, ReceiverConfig, Sender, SenderConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{certs, quic, BackupLink, PrimaryLink, QuicConfig, Server};

const TOTAL: u64 = 1 << 30; // bytes per measurement
const PAGES_PER_CP: u64 = 8192; // 32 MiB checkpoints

fn cfg() -> QuicConfig {
    QuicConfig {
        idle_timeout_ms: 10_000,
        ..QuicConfig::default()
    }
}

fn checkpoint(epoch: u64, data: &[u8]) -> Checkpoint {
    Checkpoint {
        epoch,
        kind: if epoch == 0 {
            Kind::Sync
        } else {
            Kind::Incremental
        },
        mem_size: PAGES_PER_CP * PAGE as u64,
        pages: (0..PAGES_PER_CP)
            .map(|g| {
                (
                    g,
                    PageData::Raw(data[(g as usize % 64) * PAGE..][..PAGE].to_vec()),
                )
            })
            .collect(),
        disk: vec![],
        state: (epoch == 0).then(|| (1, vec![0; 64])),
    }
}

/// Checkpoint data per second and the CPU this process used meanwhile (cores).
async fn protocol_run(dir: &std::path::Path, lanes: u8, conns: usize) -> (f64, f64) {
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(dir, "backup").unwrap(),
        &cfg(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let extra_servers: Vec<Server> = (1..conns)
        .map(|_| {
            Server::bind(
                "127.0.0.1:0".parse().unwrap(),
                &certs::load(dir, "backup").unwrap(),
                &cfg(),
            )
            .unwrap()
        })
        .collect();
    let extra_addrs: Vec<SocketAddr> = extra_servers
        .iter()
        .map(|s| s.local_addr().unwrap())
        .collect();
    let n_cp = TOTAL / (PAGES_PER_CP * PAGE as u64);
    let backup = tokio::spawn(async move {
        let conn = server.accept().await.unwrap();
        let (mut link, mut rx) = BackupLink::accept(conn).await.unwrap();
        for s in &extra_servers {
            link.join(s.accept().await.unwrap());
        }
        let mut r = Receiver::new(ReceiverConfig::new(1, "vm"));
        let mut done = 0;
        while done < n_cp {
            let f = rx.recv().await.unwrap().unwrap();
            r.handle_frame(Instant::now(), &f).unwrap();
            while let Some(cp) = r.poll_checkpoint() {
                r.ack(cp.epoch);
                done += 1;
            }
            while let Some(o) = r.poll_transmit() {
                link.send(&o).await.unwrap();
            }
        }
    });
    let data: Vec<u8> = (0..64 * PAGE).map(|i| (i * 31 % 251) as u8).collect();
    let cps: Vec<Checkpoint> = (0..n_cp).map(|e| checkpoint(e, &data)).collect();
    let ep = quic::client(&certs::load(dir, "primary").unwrap(), &cfg()).unwrap();
    let conn = quic::connect(&ep, addr, "backup").await.unwrap();
    let mut extra = Vec::new();
    for a in &extra_addrs {
        extra.push(quic::connect(&ep, *a, "backup").await.unwrap());
    }
    let (mut link, mut rx) = PrimaryLink::open_multi(conn, &extra, lanes).await.unwrap();
    let mut sc = SenderConfig::new(1, "vm", 1);
    sc.lanes = lanes;
    sc.window = 4;
    sc.ack_timeout = Duration::from_secs(60);
    sc.idle_timeout = Duration::from_secs(60);
    let mut s = Sender::new(sc);
    s.start(Instant::now());
    let mut it = cps.into_iter();
    let mut t0 = None;
    while s.acked() != Some(n_cp - 1) {
        while let Some((lane, f)) = s.poll_transmit(std::time::Instant::now()) {
            link.send(lane, f).await.unwrap();
        }
        if s.is_ready() && s.can_send() {
            if let Some(cp) = it.next() {
                t0.get_or_insert_with(|| (Instant::now(), cpu_seconds()));
                s.send_checkpoint(Instant::now(), cp).unwrap();
                continue;
            }
        }
        let f = rx.recv().await.unwrap().unwrap();
        s.handle_frame(Instant::now(), &f).unwrap();
        while s.poll_event().is_some() {}
    }
    let (t0, c0) = t0.expect("a checkpoint was sent");
    let secs = t0.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - c0) / secs;
    backup.await.unwrap();
    (TOTAL as f64 / secs, cores)
}

/// CPU time of this process so far (user + system), seconds.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

async fn raw_quinn(dir: &std::path::Path) -> f64 {
    transport::probe::raw_quinn_throughput(
        &certs::load(dir, "backup").unwrap(),
        "backup",
        &certs::load(dir, "primary").unwrap(),
        TOTAL,
    )
    .await
    .unwrap()
}

async fn raw_tcp() -> f64 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                break n;
            }
            n += k as u64;
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let buf = vec![7u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..TOTAL >> 20 {
        s.write_all(&buf).await.unwrap();
    }
    s.shutdown().await.unwrap();
    assert_eq!(rx.await.unwrap(), TOTAL);
    TOTAL as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path()).unwrap();
    certs::issue(dir.path(), "backup").unwrap();
    certs::issue(dir.path(), "primary").unwrap();
    rt.block_on(async {
        let tcp = raw_tcp().await;
        let quinn = raw_quinn(dir.path()).await;
        let gb = |x: f64| x / 1e9;
        println!("## Checkpoint streaming over loopback QUIC (1 GiB per row, same run)\n");
        println!("| transport | throughput | vs raw quinn | CPU (cores) |\n|---|---|---|---|");
        println!(
            "| raw TCP (1 connection) | {:.2} GB/s | {:.2}× |",
            gb(tcp),
            tcp / quinn
        );
        println!(
            "| raw quinn (1 stream, mutual TLS) | {:.2} GB/s | 1.00× |",
            gb(quinn)
        );
        for (lanes, conns) in [(1u8, 1usize), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4)] {
            let (p, cores) = protocol_run(dir.path(), lanes, conns).await;
            println!(
                "| checkpoints, {lanes} data stream(s), {conns} connection(s) | {:.2} GB/s | {:.2}× | {cores:.2} |",
                gb(p),
                p / quinn
            );
        }
    });
}
