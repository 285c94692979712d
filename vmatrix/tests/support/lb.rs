//! Load-balancer helpers (`vmatrix lb`, issue 11): a balancer's namespace on a test LAN
//! (`scripts/lb-net.sh`), connections through a VIP that tell which VM answered, and a client
//! loop that records every error.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{field, root};

/// A load balancer's namespace `vmxl<index>` on a LAN bridge (lan0 = 10.77.<index>.4);
/// removed on drop.
pub struct LbNet {
    /// Its name.
    pub ns: String,
}

impl LbNet {
    /// On `bridge`, which lives in namespace `bridge_ns` (None: the caller's).
    pub fn up(index: u32, bridge: &str, bridge_ns: Option<&str>) -> LbNet {
        let ns = format!("vmxl{index}");
        let st = Command::new(root().join("scripts/lb-net.sh"))
            .args(["up", &ns, &index.to_string(), bridge])
            .args(bridge_ns)
            .status()
            .unwrap();
        assert!(st.success(), "scripts/lb-net.sh up failed");
        LbNet { ns }
    }
}

impl Drop for LbNet {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/lb-net.sh"))
            .args(["down", &self.ns])
            .status();
    }
}

/// A connection (through a VIP), with generous timeouts for this busy machine: a protected
/// primary's output commit delays its SYN-ACK until the backup acknowledged the epoch, which
/// took over a second here under load (a SYN retransmission; measured 1.1–2.5 s).
pub struct Conn {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            r: BufReader::new(s.try_clone()?),
            s,
        })
    }

    pub fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.s.write_all(format!("{line}\n").as_bytes())?;
        let mut resp = String::new();
        if self.r.read_line(&mut resp)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(resp.trim_end().to_string())
    }

    /// The generation of the VM that serves this connection.
    pub fn generation(&mut self) -> String {
        field(&self.cmd("STATS").unwrap(), "generation").unwrap()
    }
}

/// The generation of the VM answering at `addr` (a fresh connection).
pub fn generation_at(addr: SocketAddr) -> String {
    Conn::open(addr)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
        .generation()
}

/// What a client loop saw: successes, every error, the slowest request.
pub type LoopResult = (u64, Vec<String>, Duration);

/// Fresh connections through `vip` until stopped: connect, `GET k1` (expecting `VALUE v1`),
/// close, every 5 ms.
pub fn client_loop(vip: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<LoopResult> {
    std::thread::spawn(move || {
        let (mut ok, mut errors, mut slowest) = (0u64, Vec::new(), Duration::ZERO);
        while !stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            let r = Conn::open(vip).and_then(|mut c| c.cmd("GET k1"));
            match r {
                Ok(v) if v == "VALUE v1" => ok += 1,
                Ok(v) => errors.push(format!("answer {v:?}")),
                Err(e) => errors.push(e.to_string()),
            }
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, errors, slowest)
    })
}

/// A `vmatrix lb serve` process (the load balancer's driver) for VM "web" of the manager at
/// `api`; SIGTERM on drop (it detaches from the manager and removes its service).
pub struct Driver {
    child: std::process::Child,
}

impl Driver {
    /// In namespace `ns`, VIP `vip` on lan0, rounds of 200 ms; `extra` flags; stderr to `log`.
    pub fn start(
        api: SocketAddr,
        ns: &str,
        vip: &str,
        log: &std::path::Path,
        extra: &[&str],
    ) -> Driver {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(super::vmatrix_bin())
            .args(["--log", "info", "lb", "serve", "--vm", "web", "--netns", ns])
            .args(["--vip", vip, "--vip-dev", "lan0", "--interval-ms", "200"])
            .args(extra)
            .env("VMATRIX_MANAGER", api.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vmatrix lb serve");
        Driver { child }
    }

    /// SIGTERM; whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}
