//! `cargo bench -p vmatrix --bench clones_managed`: time from `vmatrix vm scale web --clones N`
//! (the CLI process started) to every clone answering `GET` with the parent's data on its own
//! address, through the manager and an agent (issue 11), for N = 1, 4, 16, 32, with the clone
//! base already warm on the backup's host (`--warm`), and once from a cold start (no base: the
//! agent first has the backup export its image). Two hosts (network namespaces), a protected
//! 64 MiB VM; its clones run on its backup's host. Prints a Markdown table for docs/BENCHMARKS.md. Needs root and /dev/kvm.
//! Warm runs start with the agent's standby clone ready (the first clone takes it over);
//! `VMATRIX_BENCH_STANDBY=0` runs the agents with `--clone-standby 0` instead. Also:
//! `VMATRIX_BENCH_CLONES=n` (one size only), `VMATRIX_BENCH_KEEP=1` (keep the logs).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::managed::Managed;
use support::*;

fn addr(m: &Managed, i: u32) -> SocketAddr {
    format!("10.77.{}.{}:7000", m.net.index, 10 + i)
        .parse()
        .unwrap()
}

/// `GET colour` on a fresh connection whose SYN may wait 2 ms for an answer: a SYN sent
/// before the clone's tap exists is lost (the LAN still knows the address's MAC from an earlier
/// run), and the client's own retransmission would measure its timer, not the clone (with the
/// 10 ms of the first version the figures were multiples of it).
fn get_colour(a: SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let s = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(2))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.set_nodelay(true)?;
    (&s).write_all(b"GET colour\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// `PUT /v1/vms/web/clones` on the manager's API from this process (HTTP/1.1 on a fresh
/// connection: what a load balancer's driver or an orchestrator sends, without a CLI process).
fn put_clones(m: &Managed, n: u32, ip: &str, warm: bool) {
    use std::io::{Read, Write};
    let body = format!(r#"{{"count":{n},"ip":"{ip}","warm":{warm}}}"#);
    let mut s = std::net::TcpStream::connect(m.api).unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "PUT /v1/vms/web/clones HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        m.api,
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// How a bench run asks for clones.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// `vmatrix vm scale` (a CLI process).
    Cli,
    /// The API, from this process.
    Api,
}

/// Asks for `n` clones and returns (asked: answered, first answering, all answering), ms.
fn scale_and_wait(m: &Managed, n: u32, warm: bool, via: Via) -> (f64, f64, f64) {
    let ip = format!("10.77.{}.10/24", m.net.index);
    let t0 = Instant::now();
    if std::env::var_os("VMATRIX_BENCH_KEEP").is_some() {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        eprintln!("scale to {n} asked at unix {:.6}", wall.as_secs_f64());
    }
    let waiters: Vec<_> = (0..n)
        .map(|i| {
            let a = addr(m, i);
            std::thread::spawn(move || loop {
                let r = get_colour(a);
                if r.as_deref().is_ok_and(|v| v == "VALUE blue") {
                    return t0.elapsed();
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "clone {i}: {r:?}");
                std::thread::sleep(Duration::from_micros(500));
            })
        })
        .collect();
    if via == Via::Api {
        put_clones(m, n, &ip, warm);
    } else {
        let warm = warm.to_string();
        let n = n.to_string();
        let out = m.cli(&[
            "vm", "scale", "web", "--clones", &n, "--ip", &ip, "--warm", &warm,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cli = t0.elapsed();
    let done: Vec<Duration> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let first = done.iter().min().copied().unwrap_or_default();
    let all = done.iter().max().copied().unwrap_or_default();
    (ms(cli), ms(first), ms(all))
}

/// Back to no clone, and (with standbys) a standby clone ready on the host again: the agent
/// keeps one per VM wanting clones (`--clone-standby`), and the first clone of a scale-up takes
/// it over.
fn scale_to_zero(m: &Managed, host: usize, standby: bool) {
    let out = m.cli(&["vm", "scale", "web", "--clones", "0"]);
    assert!(out.status.success());
    m.wait_no_vm_process(host, "clone-vm", Duration::from_secs(30));
    if standby {
        m.wait_vm_process(host, "standby", Duration::from_secs(30));
        // (Its guest's first rounds after the build.)
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // VMATRIX_BENCH_KEEP=1 keeps the logs (agents', clones') for a look at where time went.
    let _dir = match std::env::var_os("VMATRIX_BENCH_KEEP") {
        Some(_) => {
            eprintln!("logs kept in {}", dir.keep().display());
            None
        }
        None => Some(dir),
    };
    let mut m = Managed::start(&path, 2);
    // VMATRIX_BENCH_STANDBY=0: agents without standby clones (every clone spawned and built
    // when assigned), for a same-run comparison.
    let standby = std::env::var("VMATRIX_BENCH_STANDBY").map_or(true, |v| v != "0");
    if !standby {
        for i in 0..2 {
            m.kill_agent(i);
            m.start_agent_with(i, &["--clone-standby", "0"]);
        }
        m.wait_hosts_up(2, Duration::from_secs(20));
    }
    let v = m.create_protected(1);
    // (A protected VM's clones run on its backup's host: docs/clones.md.)
    let host = m.host_index(v["backups"][0]["host"].as_str().unwrap());
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET colour blue").unwrap(), "OK");
    println!(
        "| clones | base | asked via | answered (ms) | first clone answering (ms) | all answering (ms) |"
    );
    println!("|---:|---|---|---:|---:|---:|");
    // Cold: no base yet; the backup exports its image first.
    let (cli, first, all) = scale_and_wait(&m, 1, true, Via::Cli);
    println!("| 1 | cold (the backup's export first) | CLI | {cli:.1} | {first:.1} | {all:.1} |");
    scale_to_zero(&m, host, standby);
    let only = std::env::var("VMATRIX_BENCH_CLONES").ok();
    for n in [1, 4, 16, 32] {
        if only.as_ref().is_some_and(|o| o != &n.to_string()) {
            continue;
        }
        for via in [Via::Api, Via::Cli] {
            let name = if via == Via::Api { "API" } else { "CLI" };
            for _ in 0..3 {
                let (asked, first, all) = scale_and_wait(&m, n, true, via);
                println!("| {n} | warm | {name} | {asked:.1} | {first:.1} | {all:.1} |");
                scale_to_zero(&m, host, standby);
            }
        }
    }
}
