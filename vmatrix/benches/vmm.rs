//! `cargo bench -p vmatrix --bench vmm`: boot latency, KV throughput and latency over a real
//! tap, and the cost of one MMIO and one port-I/O exit. Prints a Markdown table for
//! docs/BENCHMARKS.md. Needs root and /dev/kvm, like the tests.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Spawn -> first console byte, spawn -> KV port answering.
fn boot_once(net: &TestNet, disk: &std::path::Path) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.name])
        .arg(vmatrix_bin())
        .arg("run")
        .arg("--guest")
        .arg(guest_elf())
        .arg("--disk")
        .arg(disk)
        .args([
            "--tap",
            "tap0",
            "--mem-mib",
            "64",
            "--guest-config",
            &net.guest_config(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmatrix");
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    out.read_exact(&mut b).expect("first console byte");
    let first = t0.elapsed();
    // Keep draining the console so the VMM never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    let addr = net.guest_addr();
    let ready = loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5)).is_ok() {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "guest never answered"
        );
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = drain.join();
    (first, ready)
}

/// `clients` connections each doing `ops` requests made by `req`; returns (ops/s, latencies).
fn load(
    addr: std::net::SocketAddr,
    clients: usize,
    ops: usize,
    req: fn(usize, usize) -> String,
) -> (f64, Vec<Duration>) {
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(addr).expect("connect");
                let mut lat = Vec::with_capacity(ops);
                for i in 0..ops {
                    let r = req(c, i);
                    let t = Instant::now();
                    let resp = kv.cmd(&r).expect("request");
                    lat.push(t.elapsed());
                    assert!(!resp.starts_with("ERR"), "{r} -> {resp}");
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    all.sort();
    ((clients * ops) as f64 / secs, all)
}

fn main() {
    require_kvm();
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 256);

    println!("## vmatrix VMM benchmarks\n");
    println!("| figure | value |\n|---|---|");

    // Boot: 10 cold starts on the same disk.
    let mut firsts = Vec::new();
    let mut readies = Vec::new();
    for _ in 0..10 {
        let (f, r) = boot_once(&net, &disk);
        firsts.push(f);
        readies.push(r);
    }
    firsts.sort();
    readies.sort();
    println!(
        "| VMM start → first guest console byte (10 runs) | median {}, min {}, max {} |",
        ms(pct(&firsts, 0.5)),
        ms(firsts[0]),
        ms(*firsts.last().unwrap())
    );
    println!(
        "| VMM start → KV port answering (10 runs) | median {}, min {}, max {} |",
        ms(pct(&readies, 0.5)),
        ms(readies[0]),
        ms(*readies.last().unwrap())
    );

    let mut vm = VmProc::spawn(&net, &disk, &dir.path().join("console.log"), 256);
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    let exits = kv.cmd("EXITBENCH 20000").unwrap();
    let field = |name: &str| -> String {
        exits
            .split_whitespace()
            .find_map(|t| t.strip_prefix(name))
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "| MMIO exit round trip (guest read of a platform register, mean of 20,000) | {} ns |",
        field("mmio_ns=")
    );
    println!(
        "| port-I/O exit round trip (guest `in` from COM1 LSR, mean of 20,000) | {} ns |",
        field("pio_ns=")
    );

    let addr = vm.addr;
    for &(clients, ops) in &[(1usize, 3000usize), (16, 400)] {
        let (rate, lat) = load(addr, clients, ops, |c, i| {
            format!("SET c{c}k{} v{i}", i % 64)
        });
        println!(
            "| SET, {clients} client(s) ({} ops) | {:.0} ops/s, p50 {}, p99 {} |",
            clients * ops,
            rate,
            us(pct(&lat, 0.5)),
            us(pct(&lat, 0.99))
        );
        let (rate, lat) = load(addr, clients, ops, |c, i| format!("GET c{c}k{}", i % 64));
        println!(
            "| GET, {clients} client(s) ({} ops) | {:.0} ops/s, p50 {}, p99 {} |",
            clients * ops,
            rate,
            us(pct(&lat, 0.5)),
            us(pct(&lat, 0.99))
        );
    }
    // For scale: a SET is a disk write plus an fdatasync of the image file on this host.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("disk.img"))
        .unwrap();
    let mut syncs = Vec::new();
    for i in 0..200u64 {
        use std::os::unix::fs::FileExt;
        let t = Instant::now();
        f.write_all_at(&[i as u8; 512], 200 << 20).unwrap();
        f.sync_data().unwrap();
        syncs.push(t.elapsed());
    }
    syncs.sort();
    println!(
        "| host: 512-byte pwrite + fdatasync of the disk file (same run, for scale) | p50 {}, p99 {} |",
        us(pct(&syncs, 0.5)),
        us(pct(&syncs, 0.99))
    );
    drop(kv);
    vm.kill9();
}
