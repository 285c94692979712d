//! The control socket of a running VM or backup (`--control <path>`) and its client,
//! `vmatrix ctl`.
//!
//! One request line per connection, one response line: `ok <key=value ...>` or
//! `error: <why>`. A VM answers `pause`, `resume`, `status`, `checksum` (paused VM only),
//! `snapshot full|diff <dir>`, `stop`, `disk-faults <n>` (fault injection: the next n guest
//! disk writes fail); a primary also `backups <name@host:port,...|none>` and `fence <term>`;
//! a backup answers `status`, `stop`, `fence <term>` and `promote <term>`
//! (docs/replication.md, "Control by the agent").
//!
//! Each client is served on a thread of its own (at most [`MAX_CLIENTS`] at a time; more are
//! answered `error: busy`) and must send its request line within [`REQUEST_TIMEOUT`]: a
//! client that connects and says nothing never delays another. Requests are executed one at a
//! time, in the order their lines arrive.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use vmm::{SnapshotKind, Vm};

/// A parsed control request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Pause the VM.
    Pause,
    /// Resume it.
    Resume,
    /// Report state and counters.
    Status,
    /// CRC32 of guest memory.
    Checksum,
    /// Take a snapshot.
    Snapshot(SnapshotKind, PathBuf),
    /// Stop the VM.
    Stop,
    /// Fail the next n guest disk writes (fault injection, for tests).
    DiskFaults(u32),
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match (cmd, rest) {
        ("pause", "") => Ok(Request::Pause),
        ("resume", "") => Ok(Request::Resume),
        ("status", "") => Ok(Request::Status),
        ("checksum", "") => Ok(Request::Checksum),
        ("stop", "") => Ok(Request::Stop),
        ("disk-faults", n) => n
            .parse()
            .map(Request::DiskFaults)
            .map_err(|_| "usage: disk-faults <n>".to_string()),
        ("snapshot", r) => {
            let (kind, dir) = r.split_once(' ').ok_or("usage: snapshot full|diff <dir>")?;
            let kind = match kind {
                "full" => SnapshotKind::Full,
                "diff" => SnapshotKind::Diff,
                _ => return Err("usage: snapshot full|diff <dir>".into()),
            };
            if dir.is_empty() {
                return Err("usage: snapshot full|diff <dir>".into());
            }
            Ok(Request::Snapshot(kind, PathBuf::from(dir)))
        }
        _ => Err(format!("unknown request '{line}'")),
    }
}

/// Extra `key=value` fields appended to `status` (the replication loop's figures).
pub type StatusExtra = Arc<dyn Fn() -> String + Send + Sync>;

/// Requests a VM's owner answers besides the VM's own (a primary's `backups`, `fence`): the
/// answer, or None for a request it does not know.
pub type ExtraRequests = Arc<dyn Fn(&str) -> Option<Result<String, String>> + Send + Sync>;

/// What a VM's control socket serves besides the VM's own requests.
#[derive(Clone, Default)]
pub struct Extra {
    /// Fields appended to `status`.
    pub status: Option<StatusExtra>,
    /// Further requests, tried before the VM's.
    pub requests: Option<ExtraRequests>,
}

fn execute(vm: &Vm, req: Request, extra: Option<&StatusExtra>) -> Result<String, String> {
    match req {
        Request::Pause => vm
            .pause()
            .map(|_| "paused".into())
            .map_err(|e| e.to_string()),
        Request::Resume => {
            vm.resume();
            Ok("running".into())
        }
        Request::Status => {
            let net = vm.net_stats().unwrap_or_default();
            let held = match vm.held_output() {
                Some((frames, bytes, epoch)) => {
                    format!(" output_epoch={epoch} held_frames={frames} held_bytes={bytes}")
                }
                None => String::new(),
            };
            let extra = extra.map(|f| format!(" {}", f())).unwrap_or_default();
            Ok(format!(
                "state={} mem_mib={} guest_clock_ms={} net_rx_frames={} net_tx_frames={} net_tx_errors={} blk_requests={}{held}{extra}",
                if vm.is_paused() { "paused" } else { "running" },
                vm.mem_size() >> 20,
                vm.guest_clock_ns() / 1_000_000,
                net.rx_frames,
                net.tx_frames,
                net.tx_errors,
                vm.blk_completed().unwrap_or(0),
            ))
        }
        Request::Checksum => vm
            .memory_checksum()
            .map(|c| format!("memory_crc32={c:#010x}"))
            .map_err(|e| e.to_string()),
        Request::Snapshot(kind, dir) => vm
            .snapshot(&dir, kind)
            .map(|s| {
                format!(
                    "id={:#x} pause_us={} pages={} total_ms={} memory_crc32={}",
                    s.id,
                    s.pause.as_micros(),
                    s.pages,
                    s.total.as_millis(),
                    s.memory_checksum
                        .map_or("-".into(), |c| format!("{c:#010x}")),
                )
            })
            .map_err(|e| e.to_string()),
        Request::Stop => {
            vm.stop();
            Ok("stopping".into())
        }
        Request::DiskFaults(n) => vm
            .inject_disk_write_failures(n)
            .map(|()| format!("failing_writes={n}"))
            .map_err(|e| e.to_string()),
    }
}

/// Answers one request line.
pub type Handler = Box<dyn Fn(&str) -> Result<String, String> + Send>;

/// Longest time a client may take to send its request line (and to take its answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at the same time.
pub const MAX_CLIENTS: usize = 32;
/// Longest request line.
const MAX_LINE: usize = 4096;

/// Reads bytes up to a newline (or [`MAX_LINE`], or the end of the stream) from `r`, all
/// within `timeout`: a client that sends nothing, or a byte now and then, is cut off.
pub(crate) fn read_line_within<R: std::io::Read>(
    r: &mut R,
    set_timeout: impl Fn(&R, Duration) -> std::io::Result<()>,
    timeout: Duration,
    stop_at: &[u8],
) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while line.len() < MAX_LINE && !line.ends_with(stop_at) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no request within {} ms", timeout.as_millis()),
            ));
        }
        set_timeout(r, left)?;
        let n = match r.read(&mut buf[..(MAX_LINE - line.len()).min(512)]) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok(line)
}

fn serve_one(handler: &Mutex<Handler>, mut stream: UnixStream) -> std::io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let bytes = match read_line_within(
        &mut stream,
        |s, t| s.set_read_timeout(Some(t)),
        REQUEST_TIMEOUT,
        b"\n",
    ) {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(stream, "error: {e}");
            return Err(e);
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().next().unwrap_or("");
    let reply = {
        let h = handler.lock().unwrap_or_else(|p| p.into_inner());
        match h(line.trim_end_matches(['\r', '\n'])) {
            Ok(s) => format!("ok {s}\n"),
            Err(e) => format!("error: {e}\n"),
        }
    };
    stream.write_all(reply.as_bytes())
}

/// Serves a VM's control requests on `path` (see [`serve_with`]), and `extra`'s.
pub fn serve(path: &Path, vm: Arc<Vm>, extra: Extra) -> anyhow::Result<Served> {
    serve_with(
        path,
        Box::new(move |line| {
            if let Some(answer) = extra.requests.as_ref().and_then(|f| f(line)) {
                return answer;
            }
            parse(line).and_then(|r| execute(&vm, r, extra.status.as_ref()))
        }),
    )
}

/// A control socket being served.
pub struct Served {
    clients: Arc<AtomicUsize>,
}

impl Served {
    /// Waits (at most `timeout`) until no client is being served: a process about to exit
    /// calls it so that the answer to the request that ended it (`stop`, `fence`, `promote`)
    /// is written first.
    pub fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Counts a client thread while it lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Listens on `path` (replacing a stale socket) and answers each request with `handler`, each
/// client on a thread of its own with [`REQUEST_TIMEOUT`] to send its line.
pub fn serve_with(path: &Path, handler: Handler) -> anyhow::Result<Served> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    let handler = Arc::new(Mutex::new(handler));
    let clients = Arc::new(AtomicUsize::new(0));
    let served = Served {
        clients: clients.clone(),
    };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for mut stream in listener.incoming().flatten() {
                if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = writeln!(stream, "error: busy: {MAX_CLIENTS} clients being served");
                    continue;
                }
                let slot = Slot(clients.clone());
                let h = handler.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = serve_one(&h, stream) {
                            tracing::warn!("control connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("control connection: no thread for it: {e}");
                }
            }
        })
        .context("spawning the control thread")?;
    Ok(served)
}

use std::io::Read as _;

/// `vmatrix ctl` arguments.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a VM (`run`, `restore`, `primary`) or of a backup.
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

/// Requests `vmatrix ctl` can send.
#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Show state and counters.
    Status,
    /// CRC32 of all guest memory (the VM must be paused).
    Checksum,
    /// Snapshot the VM into a directory.
    Snapshot {
        /// Target directory.
        dir: PathBuf,
        /// Only what changed since the previous snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Stop the VM (a backup: finalize its image as a snapshot of the last applied checkpoint
    /// and exit).
    Stop,
    /// Fault injection (tests): the next N guest disk writes fail with an I/O error.
    DiskFaults {
        /// How many writes fail.
        n: u32,
    },
    /// A primary: replace its backups (`name@host:port,...`, or `none`); the session restarts
    /// with them (quick resync where possible), all of them required.
    Backups {
        /// Comma-separated `name@host:port` list, or `none`.
        list: String,
    },
    /// A primary: stop for good (exit 3) if TERM is newer than its own. A backup: refuse
    /// primaries older than TERM from now on (persisted).
    Fence {
        /// The newer term.
        term: u64,
    },
    /// A backup: fence to TERM, stop serving and finalize the image for a new primary.
    Promote {
        /// The term granted to the new primary.
        term: u64,
    },
}

/// Sends one request and prints the answer; fails on `error:`.
pub fn main(a: CtlArgs) -> anyhow::Result<ExitCode> {
    let line = match a.cmd {
        CtlCmd::Pause => "pause".to_string(),
        CtlCmd::Resume => "resume".into(),
        CtlCmd::Status => "status".into(),
        CtlCmd::Checksum => "checksum".into(),
        CtlCmd::Stop => "stop".into(),
        CtlCmd::DiskFaults { n } => format!("disk-faults {n}"),
        CtlCmd::Backups { list } => format!("backups {list}"),
        CtlCmd::Fence { term } => format!("fence {term}"),
        CtlCmd::Promote { term } => format!("promote {term}"),
        CtlCmd::Snapshot { dir, diff } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let abs = std::fs::canonicalize(&dir)?;
            format!(
                "snapshot {} {}",
                if diff { "diff" } else { "full" },
                abs.display()
            )
        }
    };
    let mut s = UnixStream::connect(&a.socket)
        .with_context(|| format!("cannot connect to control socket {}", a.socket.display()))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let reply = reply.trim_end();
    println!("{reply}");
    if let Some(e) = reply.strip_prefix("error: ") {
        bail!("{e}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse("pause\n"), Ok(Request::Pause));
        assert_eq!(
            parse("snapshot diff /tmp/a b"),
            Ok(Request::Snapshot(SnapshotKind::Diff, "/tmp/a b".into()))
        );
        assert!(parse("snapshot").is_err());
        assert!(parse("snapshot half /x").is_err());
        assert!(parse("reboot").is_err());
        assert!(parse("pause now").is_err());
        assert_eq!(parse("disk-faults 3"), Ok(Request::DiskFaults(3)));
        assert!(parse("disk-faults x").is_err());
    }

    #[test]
    fn a_silent_client_does_not_delay_others() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        serve_with(&path, Box::new(|l| Ok(format!("echo {l}")))).unwrap();
        let mut silent = UnixStream::connect(&path).unwrap();
        // A client that sends a byte now and then is cut off at the same deadline.
        let mut dribbler = UnixStream::connect(&path).unwrap();
        dribbler.write_all(b"st").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"status\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "ok echo status\n");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        // The silent one is told and disconnected after the timeout.
        let mut got = String::new();
        silent.set_read_timeout(Some(REQUEST_TIMEOUT * 3)).unwrap();
        silent.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("error: no request within"), "{got}");
        assert!(t0.elapsed() < REQUEST_TIMEOUT + Duration::from_millis(500));
        let mut got = String::new();
        dribbler.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("error: no request within"), "{got}");
    }
}
