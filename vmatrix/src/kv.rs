//! `vmatrix kv`: a small client for the test guest's key-value protocol.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Flags of `vmatrix kv`.
#[derive(Args, Debug)]
pub struct KvArgs {
    /// Address of the guest's KV service.
    #[arg(long, default_value = "10.77.1.2:7000")]
    pub addr: SocketAddr,
    /// Give up connecting after this many seconds (the guest may still be booting).
    #[arg(long, default_value_t = 10)]
    pub wait_secs: u64,
    /// Instead of requests: write this many keys (`SET <prefix><i> v<i>`) one after another on
    /// one connection, then read every one back on the same connection; prints the longest
    /// wait for an answer (a failover shows up there) and fails if any acknowledged write is
    /// missing.
    #[arg(long)]
    pub write_loop: Option<u64>,
    /// Pause between two writes of --write-loop, ms.
    #[arg(long, default_value_t = 10)]
    pub every_ms: u64,
    /// Key prefix for --write-loop.
    #[arg(long, default_value = "key")]
    pub prefix: String,
    /// Requests, one per argument (e.g. "SET a 1" "GET a"); read from stdin if none.
    pub requests: Vec<String>,
}

fn connect(addr: SocketAddr, wait: Duration) -> anyhow::Result<TcpStream> {
    let deadline = std::time::Instant::now() + wait;
    // Short first attempts (a booting guest answers within milliseconds, and a lost SYN would
    // otherwise cost the kernel's 1 s retransmit), growing up to 1 s for slow links.
    let mut attempt = Duration::from_millis(20);
    loop {
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(s) => return Ok(s),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("cannot connect to {addr}"))
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                attempt = (attempt * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Sends each request and prints `request -> response`.
pub fn main(a: KvArgs) -> anyhow::Result<ExitCode> {
    let stream = connect(a.addr, Duration::from_secs(a.wait_secs))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One segment per request, sent at once (see `send_line`).
    stream.set_nodelay(true)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    if let Some(n) = a.write_loop {
        return write_loop(
            &mut w,
            &mut r,
            n,
            &a.prefix,
            Duration::from_millis(a.every_ms),
        );
    }
    let requests: Vec<String> = if a.requests.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        a.requests
    };
    for req in requests {
        send_line(&mut w, &req)?;
        let mut line = String::new();
        r.read_line(&mut line).context("reading the response")?;
        println!("{req:<24} -> {}", line.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `req` and its newline in one write: `writeln!` writes them separately, and with
/// Nagle the newline then waits for the ACK of the rest (one more round trip per request,
/// through the primary's output commit).
fn send_line(w: &mut TcpStream, req: &str) -> std::io::Result<()> {
    w.write_all(format!("{req}\n").as_bytes())
}

fn ask(w: &mut TcpStream, r: &mut BufReader<TcpStream>, req: &str) -> anyhow::Result<String> {
    send_line(w, req)?;
    let mut line = String::new();
    if r.read_line(&mut line).context("reading the response")? == 0 {
        anyhow::bail!("the connection closed");
    }
    Ok(line.trim_end().to_string())
}

/// `--write-loop`: writes, then reads back, on one connection.
fn write_loop(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    n: u64,
    prefix: &str,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    // A failover takes a TCP retransmit or two: allow for it.
    w.set_read_timeout(Some(Duration::from_secs(30)))?;
    let start = std::time::Instant::now();
    let (mut longest, mut longest_at) = (Duration::ZERO, 0);
    for i in 0..n {
        let t = std::time::Instant::now();
        let got = ask(w, r, &format!("SET {prefix}{i} v{i}"))?;
        if got != "OK" {
            anyhow::bail!("SET {prefix}{i}: {got}");
        }
        if t.elapsed() > longest {
            (longest, longest_at) = (t.elapsed(), i);
        }
        std::thread::sleep(every);
    }
    println!(
        "{n} writes acknowledged in {:.1} s on one connection; longest wait {} ms (write {longest_at})",
        start.elapsed().as_secs_f64(),
        longest.as_millis()
    );
    let mut missing = 0;
    for i in 0..n {
        if ask(w, r, &format!("GET {prefix}{i}"))? != format!("VALUE v{i}") {
            missing += 1;
        }
    }
    println!("{} of {n} acknowledged writes present", n - missing);
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
