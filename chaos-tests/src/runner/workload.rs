//! The workload clients: each on its own TCP connection to the guest's KV service, one request
//! at a time, `SET k v` with values unique in the run (`c<client>-<op>`) and `GET k`, on keys
//! shared by every client (overwritten constantly) and keys of its own. Every operation is
//! appended to the history with its invoke and complete times and an honest outcome:
//!
//! - `ok`: the service answered (`OK`, `VALUE v`, `NOTFOUND`);
//! - `fail`: definitely not applied: the connection could not be made, or the request could not
//!   be handed to the kernel at all (zero bytes written), or the service answered
//!   `ERR disk full` to a set (refused before its log was touched) or any `ERR` to a get;
//! - `unknown`: anything after the request (or part of it) was handed to the kernel: a timeout,
//!   a reset, the connection closed, an `ERR` to a set whose log write may have landed, an
//!   answer that makes no sense.
//!
//! After anything but `ok` the client drops its connection and makes a new one for its next
//! op, so no late answer to an abandoned request is ever read as the answer to another.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{RunnerError, WorkloadConfig};
use crate::history::{ClientId, HistoryWriter, Op, OpKind, Outcome};
use crate::schedule::rng::Xoshiro256;

/// The run's monotonic clock: ns since its time 0.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Time 0.
    pub start: Instant,
}

impl Clock {
    /// Now, ns since time 0.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One connection to the KV service.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr, connect: Duration, op: Duration) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, connect)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(op))?;
        s.set_write_timeout(Some(op))?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends one request line; `Err(sent_any, why)`.
    fn send(&mut self, line: &str) -> Result<(), (bool, String)> {
        let buf = line.as_bytes();
        let mut written = 0;
        while written < buf.len() {
            match self.writer.write(&buf[written..]) {
                Ok(0) => return Err((written > 0, "write returned 0".into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((written > 0, format!("write: {e}"))),
            }
        }
        Ok(())
    }

    /// Reads one answer line (without its newline).
    fn answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) if !line.ends_with('\n') => Err(format!("half an answer: {line:?}")),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err("timeout".into())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Classifies the service's answer to a set.
fn set_outcome(answer: &str) -> Outcome {
    match answer {
        "OK" => Outcome::Ok { read: None },
        "ERR disk full" => Outcome::Fail {
            error: answer.into(),
        },
        _ => Outcome::Unknown {
            error: format!("answered {answer:?}"),
        },
    }
}

/// Classifies the service's answer to a get.
fn get_outcome(answer: &str) -> Outcome {
    if answer == "NOTFOUND" {
        return Outcome::Ok { read: None };
    }
    if let Some(v) = answer.strip_prefix("VALUE ") {
        return Outcome::Ok {
            read: Some(v.to_string()),
        };
    }
    if answer.starts_with("ERR") {
        return Outcome::Fail {
            error: answer.into(),
        };
    }
    Outcome::Unknown {
        error: format!("answered {answer:?}"),
    }
}

/// Performs one request on `conn` (opening it if needed).
fn perform(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    cfg: &WorkloadConfig,
    kind: &OpKind,
    key: &str,
) -> Outcome {
    if conn.is_none() {
        match Conn::open(addr, cfg.connect_timeout, cfg.op_timeout) {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                return Outcome::Fail {
                    error: format!("connect: {e}"),
                }
            }
        }
    }
    let c = conn.as_mut().expect("opened above");
    let line = match kind {
        OpKind::Set { value } => format!("SET {key} {value}\n"),
        OpKind::Get => format!("GET {key}\n"),
    };
    if let Err((sent_any, error)) = c.send(&line) {
        return match sent_any {
            false => Outcome::Fail { error },
            true => Outcome::Unknown { error },
        };
    }
    match (c.answer(), kind) {
        (Err(error), _) => Outcome::Unknown { error },
        (Ok(a), OpKind::Set { .. }) => set_outcome(&a),
        (Ok(a), OpKind::Get) => get_outcome(&a),
    }
}

/// The keys of a workload: shared ones, and each client's own.
pub fn keys(cfg: &WorkloadConfig) -> Vec<String> {
    let mut k: Vec<String> = (0..cfg.shared_keys).map(|j| format!("s{j}")).collect();
    for c in 0..cfg.clients {
        k.extend((0..cfg.own_keys).map(|j| format!("c{c}k{j}")));
    }
    k
}

/// The running clients.
pub struct Workload {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Result<(), String>>>,
    /// Operations completed ok so far (all clients).
    pub ok: Arc<AtomicU64>,
}

/// Everything a client needs.
#[derive(Clone)]
struct ClientCtx {
    addr: SocketAddr,
    cfg: WorkloadConfig,
    clock: Clock,
    history: Arc<Mutex<HistoryWriter<File>>>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
}

fn client_loop(ctx: ClientCtx, id: ClientId, seed: u64) -> Result<(), String> {
    let mut rng =
        Xoshiro256::seed_from(seed ^ (u64::from(id) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut conn = None;
    let mut n = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        n += 1;
        let key = if rng.chance(500) || ctx.cfg.own_keys == 0 {
            format!("s{}", rng.below(u64::from(ctx.cfg.shared_keys.max(1))))
        } else {
            format!("c{id}k{}", rng.below(u64::from(ctx.cfg.own_keys)))
        };
        let kind = match rng.chance(500) {
            true => OpKind::Set {
                value: format!("c{id}-{n}"),
            },
            false => OpKind::Get,
        };
        let invoke_ns = ctx.clock.now_ns();
        let outcome = perform(&mut conn, ctx.addr, &ctx.cfg, &kind, &key);
        let complete_ns = ctx.clock.now_ns();
        let ok = matches!(outcome, Outcome::Ok { .. });
        let op = Op {
            client: id,
            op: n,
            key,
            kind,
            invoke_ns,
            complete_ns,
            outcome,
        };
        ctx.history
            .lock()
            .map_err(|_| "history lock poisoned".to_string())?
            .append(&op)
            .map_err(|e| e.to_string())?;
        if ok {
            ctx.ok.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(ctx.cfg.pace);
        } else {
            conn = None;
            // Not a busy loop against a refusing service.
            std::thread::sleep(ctx.cfg.pace.max(Duration::from_millis(50)));
        }
    }
    Ok(())
}

/// Starts the clients, appending to `history` (opened for appending).
pub fn start(
    cfg: &WorkloadConfig,
    addr: SocketAddr,
    seed: u64,
    clock: Clock,
    history: HistoryWriter<File>,
) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let ctx = ClientCtx {
        addr,
        cfg: *cfg,
        clock,
        history: Arc::new(Mutex::new(history)),
        stop: stop.clone(),
        ok: ok.clone(),
    };
    let handles = (0..cfg.clients)
        .map(|id| {
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name(format!("chaos-client-{id}"))
                .spawn(move || client_loop(ctx, id, seed))
                .expect("spawn a client thread")
        })
        .collect();
    Workload { stop, handles, ok }
}

impl Workload {
    /// Stops the clients after their op under way (bounded by the timeouts) and waits for them.
    pub fn stop(mut self) -> Result<(), RunnerError> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = None;
        for h in self.handles.drain(..) {
            let r = h.join().unwrap_or_else(|_| Err("client panicked".into()));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(RunnerError::Command {
                what: "workload client".into(),
                detail: e,
            }),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether a fresh connection's `GET` is answered within `timeout`.
pub fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    let mut conn = None;
    let cfg = WorkloadConfig {
        connect_timeout: timeout,
        op_timeout: timeout,
        ..WorkloadConfig::default()
    };
    matches!(
        perform(&mut conn, addr, &cfg, &OpKind::Get, "probe"),
        Outcome::Ok { .. }
    )
}

/// Reads every key (retrying on errors with a new connection) until `deadline`; a key not read
/// by then is left out (the checker then calls the run inconclusive, never passed).
pub fn read_back(
    addr: SocketAddr,
    keys: &[String],
    deadline: Instant,
) -> BTreeMap<String, Option<String>> {
    let cfg = WorkloadConfig::default();
    let mut conn = None;
    let mut out = BTreeMap::new();
    for key in keys {
        loop {
            match perform(&mut conn, addr, &cfg, &OpKind::Get, key) {
                Outcome::Ok { read } => {
                    out.insert(key.clone(), read);
                    break;
                }
                _ => conn = None,
            }
            if Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_honestly() {
        assert_eq!(set_outcome("OK"), Outcome::Ok { read: None });
        assert!(matches!(set_outcome("ERR disk full"), Outcome::Fail { .. }));
        // The log write may have landed: not "definitely not applied".
        assert!(matches!(
            set_outcome("ERR disk write failed"),
            Outcome::Unknown { .. }
        ));
        assert!(matches!(set_outcome("VALUE x"), Outcome::Unknown { .. }));
        assert_eq!(
            get_outcome("VALUE c1-2"),
            Outcome::Ok {
                read: Some("c1-2".into())
            }
        );
        assert_eq!(get_outcome("NOTFOUND"), Outcome::Ok { read: None });
        assert!(matches!(get_outcome("ERR x"), Outcome::Fail { .. }));
        assert!(matches!(get_outcome("OK"), Outcome::Unknown { .. }));
    }

    #[test]
    fn a_refused_connection_is_a_fail_and_a_silent_server_unknown() {
        let cfg = WorkloadConfig {
            op_timeout: Duration::from_millis(200),
            ..WorkloadConfig::default()
        };
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut conn = None;
        let set = OpKind::Set { value: "v".into() };
        assert!(matches!(
            perform(&mut conn, port, &cfg, &set, "k"),
            Outcome::Fail { .. }
        ));
        // A server that accepts and never answers: the request was sent.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut conn = None;
        let o = perform(&mut conn, addr, &cfg, &set, "k");
        assert_eq!(
            o,
            Outcome::Unknown {
                error: "timeout".into()
            }
        );
        drop(l);
    }

    #[test]
    fn keys_are_shared_and_own() {
        let cfg = WorkloadConfig {
            clients: 2,
            shared_keys: 2,
            own_keys: 1,
            ..WorkloadConfig::default()
        };
        assert_eq!(keys(&cfg), ["s0", "s1", "c0k0", "c1k0"]);
    }
}
