//! A real loopback QUIC session (mutual TLS) that streams 1 GiB of checkpoint data from a
//! protocol `Sender` to a protocol `Receiver` over 4 data streams, and one that spreads them
//! over two connections (to two sockets of the backup); the receiver verifies every page
//! against an independent CRC of what was generated.

use std::time::{Duration, Instant};

use protocol::checkpoint::Checkpoint;
use protocol::message::Kind;
use protocol::page::{PageData, PAGE};
use protocol::{Receiver, ReceiverConfig, Sender, SenderConfig, SenderEvent};
use transport::{certs, quic, BackupLink, PrimaryLink, QuicConfig, Server};

const PAGES: u64 = 16_384; // 64 MiB per checkpoint, 1 GiB in all

fn page(epoch: u64, gfn: u64) -> Vec<u8> {
    let mut x = (epoch << 32 | gfn) ^ 0x9e37_79b9_7f4a_7c15;
    let mut p = Vec::with_capacity(PAGE);
    for _ in 0..PAGE / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.extend_from_slice(&x.to_le_bytes());
    }
    p
}

fn checkpoint(epoch: u64) -> Checkpoint {
    Checkpoint {
        epoch,
        kind: if epoch == 0 {
            Kind::Sync
        } else {
            Kind::Incremental
        },
        mem_size: PAGES * PAGE as u64,
        pages: (0..PAGES)
            .map(|g| (g, PageData::Raw(page(epoch, g))))
            .collect(),
        disk: vec![],
        state: Some((1, epoch.to_le_bytes().to_vec())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_of_checkpoints_arrives_intact_over_quic() {
    stream(16, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_spread_over_two_connections_arrive_intact() {
    stream(4, 2).await;
}

/// The backup's side: takes the session and its data connections, verifies every page of
/// `checkpoints` checkpoints and acknowledges them; returns the page bytes verified.
async fn receive(server: Server, extra: Vec<Server>, checkpoints: u64) -> u64 {
    let conn = server.accept().await.expect("accept");
    let (mut link, mut rx) = BackupLink::accept(conn).await.expect("link");
    for s in &extra {
        link.join(s.accept().await.expect("accept a data connection"));
    }
    let mut r = Receiver::new(ReceiverConfig::new(1, "vm"));
    let mut verified = 0u64;
    let mut bytes = 0u64;
    while verified < checkpoints {
        let f = rx.recv().await.expect("stream open").expect("frame");
        r.handle_frame(Instant::now(), &f).expect("valid frame");
        while let Some(cp) = r.poll_checkpoint() {
            assert_eq!(cp.pages.len() as u64, PAGES);
            for (g, d) in &cp.pages {
                let PageData::Raw(got) = d else {
                    panic!("raw pages")
                };
                assert!(
                    crc32fast::hash(got) == crc32fast::hash(&page(cp.epoch, *g)),
                    "page {g} of {}",
                    cp.epoch
                );
                bytes += got.len() as u64;
            }
            r.ack(cp.epoch);
            verified += 1;
        }
        while let Some(out) = r.poll_transmit() {
            link.send(&out).await.expect("send");
        }
    }
    bytes
}

/// Streams `checkpoints` checkpoints of 64 MiB over 4 data streams spread over `conns`
/// connections, each to a socket of its own on the backup.
async fn stream(checkpoints: u64, conns: usize) {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path()).unwrap();
    certs::issue(dir.path(), "backup").unwrap();
    certs::issue(dir.path(), "primary").unwrap();
    let cfg = QuicConfig {
        idle_timeout_ms: 10_000,
        ..QuicConfig::default()
    };
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs::load(dir.path(), "backup").unwrap(),
        &cfg,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let extra: Vec<Server> = (1..conns)
        .map(|_| {
            let id = certs::load(dir.path(), "backup").unwrap();
            Server::bind("127.0.0.1:0".parse().unwrap(), &id, &cfg).unwrap()
        })
        .collect();
    let extra_addrs: Vec<_> = extra.iter().map(|s| s.local_addr().unwrap()).collect();

    let backup = tokio::spawn(receive(server, extra, checkpoints));

    let ep = quic::client(&certs::load(dir.path(), "primary").unwrap(), &cfg).unwrap();
    let conn = quic::connect(&ep, addr, "backup").await.expect("connect");
    let mut data = Vec::new();
    for a in extra_addrs {
        data.push(quic::connect(&ep, a, "backup").await.expect("connect"));
    }
    let mut scfg = SenderConfig::new(1, "vm", 1);
    scfg.lanes = 4;
    scfg.window = 2;
    scfg.ack_timeout = Duration::from_secs(30);
    scfg.idle_timeout = Duration::from_secs(30);
    let mut s = Sender::new(scfg);
    let (mut link, mut rx) = PrimaryLink::open_multi(conn, &data, 4).await.expect("open");
    let started = Instant::now();
    s.start(Instant::now());
    let mut next = 0;
    while s.acked() != Some(checkpoints - 1) {
        while let Some((lane, f)) = s.poll_transmit(std::time::Instant::now()) {
            link.send(lane, f).await.expect("send");
        }
        if s.is_ready() && next < checkpoints && s.can_send() {
            s.send_checkpoint(Instant::now(), checkpoint(next))
                .expect("queue");
            next += 1;
            continue;
        }
        let f = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("backup answers")
            .expect("open")
            .expect("frame");
        s.handle_frame(Instant::now(), &f).expect("valid");
        while let Some(e) = s.poll_event() {
            assert!(
                !matches!(e, SenderEvent::Failed(_) | SenderEvent::Resending { .. }),
                "{e:?}"
            );
        }
    }
    let bytes = backup.await.unwrap();
    let streams: Vec<u64> = std::iter::once(link.connection())
        .chain(&data)
        .map(|c| c.stats().frame_tx.stream)
        .collect();
    assert!(
        streams.iter().all(|&n| n > 1000),
        "every connection carried data: {streams:?} stream frames"
    );
    assert_eq!(bytes, checkpoints * PAGES * PAGE as u64);
    eprintln!(
        "streamed {} MiB in {:.2} s",
        bytes >> 20,
        started.elapsed().as_secs_f64()
    );
}
