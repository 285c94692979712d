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
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let requests: Vec<String> = if a.requests.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        a.requests
    };
    for req in requests {
        writeln!(w, "{req}")?;
        let mut line = String::new();
        r.read_line(&mut line).context("reading the response")?;
        println!("{req:<24} -> {}", line.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}
