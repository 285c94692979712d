//! `cargo bench -p vmatrix --bench replication`: pause time per checkpoint (p50/p99/max) for the
//! idle guest and for CHURN at 1k, 10k and 50k pages/s; epochs per second at 1 ms epochs; KV
//! throughput and latency protected vs unprotected, measured in the same run. Real KVM, tap,
//! namespaces and QUIC with mutual TLS. Prints Markdown for docs/BENCHMARKS.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

fn status(sock: &std::path::Path) -> String {
    ctl(sock, &["status"])
}

fn num(s: &str, k: &str) -> u64 {
    field(s, k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `clients` connections doing `ops` SETs each; (ops/s, p50, p99).
fn kv_load(addr: std::net::SocketAddr, clients: usize, ops: usize) -> (f64, Duration, Duration) {
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(addr).unwrap();
                (0..ops)
                    .map(|i| {
                        let t = Instant::now();
                        assert_eq!(kv.cmd(&format!("SET c{c}k{} v{i}", i % 32)).unwrap(), "OK");
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lat: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
    lat.sort();
    (rate, pct(&lat, 0.5), pct(&lat, 0.99))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    require_kvm();
    println!("## Continuous replication (primary and backup on this machine, QUIC over loopback in a namespace)\n");

    // Pause times under CHURN, 20 ms base epochs.
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut r = Replicated::start(
        &net,
        dir.path(),
        &["--control", sock.to_str().unwrap(), "--min-epoch-ms", "20"],
    );
    let mut kv = r.wait_ready(Duration::from_secs(30));
    wait_socket(&sock, Duration::from_secs(5));
    println!("### Pause per checkpoint (last 200 checkpoints of each workload, 20 ms epochs)\n");
    println!("| workload | pause p50 | pause p99 | pause max (whole run) | checkpoint bytes/s | ack latency (last) |");
    println!("|---|---|---|---|---|---|");
    for (name, churn) in [
        ("idle", "CHURN 0 0"),
        ("CHURN 1k pages/s", "CHURN 2048 1"),
        ("CHURN 10k pages/s", "CHURN 2048 10"),
        ("CHURN 50k pages/s", "CHURN 2048 50"),
    ] {
        assert_eq!(kv.cmd(churn).unwrap(), "OK");
        std::thread::sleep(Duration::from_secs(1));
        let s0 = status(&sock);
        std::thread::sleep(Duration::from_secs(4));
        let s1 = status(&sock);
        let bytes = (num(&s1, "bytes_sent") - num(&s0, "bytes_sent")) as f64 / 4.0;
        println!(
            "| {name} | {} µs | {} µs | {} µs | {:.1} MB/s | {} µs |",
            num(&s1, "pause_p50_us"),
            num(&s1, "pause_p99_us"),
            num(&s1, "max_pause_us"),
            bytes / 1e6,
            num(&s1, "ack_latency_us"),
        );
    }
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    drop(kv);
    r.primary.kill9();
    drop(r);

    // Epochs per second at 1 ms epochs, idle guest.
    let dir2 = tempfile::tempdir().unwrap();
    let sock2 = dir2.path().join("ctl.sock");
    let mut r = Replicated::start(
        &net,
        dir2.path(),
        &[
            "--control",
            sock2.to_str().unwrap(),
            "--epoch-ms",
            "1",
            "--min-epoch-ms",
            "1",
            "--max-output-delay-ms",
            "1",
        ],
    );
    r.wait_ready(Duration::from_secs(30));
    wait_socket(&sock2, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let a = status(&sock2);
    std::thread::sleep(Duration::from_secs(3));
    let b = status(&sock2);
    let eps = (num(&b, "epochs") - num(&a, "epochs")) as f64 / 3.0;
    println!("\n### Epoch rate\n\n| setting | checkpoints per second (idle guest) |\n|---|---|\n| 1 ms epochs | {eps:.0} |");
    r.primary.kill9();
    drop(r);

    // KV protected vs unprotected, same run.
    println!("\n### KV service, protected vs unprotected (same run)\n");
    println!("| setup | clients | SETs/s | p50 | p99 |\n|---|---|---|---|---|");
    let dir3 = tempfile::tempdir().unwrap();
    let disk = dir3.path().join("plain.img");
    make_disk(&disk, 16);
    let mut plain = VmProc::spawn(&net, &disk, &dir3.path().join("plain.log"), 32);
    plain.wait_ready(Duration::from_secs(20));
    let mut rows = Vec::new();
    for (clients, ops) in [(1usize, 300usize), (16, 100)] {
        rows.push(("unprotected", clients, kv_load(plain.addr, clients, ops)));
    }
    plain.kill9();
    let dir4 = tempfile::tempdir().unwrap();
    let mut r = Replicated::start(&net, dir4.path(), &[]);
    r.wait_ready(Duration::from_secs(30));
    for (clients, ops) in [(1usize, 100usize), (16, 50)] {
        rows.push((
            "protected (20 ms epochs)",
            clients,
            kv_load(r.primary.addr, clients, ops),
        ));
    }
    r.primary.kill9();
    drop(r);
    let dir5 = tempfile::tempdir().unwrap();
    let mut r = Replicated::start(&net, dir5.path(), &["--early-checkpoints"]);
    r.wait_ready(Duration::from_secs(30));
    for (clients, ops) in [(1usize, 300usize), (16, 100)] {
        rows.push((
            "protected, --early-checkpoints",
            clients,
            kv_load(r.primary.addr, clients, ops),
        ));
    }
    for (setup, clients, (rate, p50, p99)) in rows {
        println!(
            "| {setup} | {clients} | {rate:.0} | {} | {} |",
            ms(p50),
            ms(p99)
        );
    }
    r.primary.kill9();
}
