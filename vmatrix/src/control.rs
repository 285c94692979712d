//! The control socket of a running VM or backup (`--control <path>`) and its client,
//! `vmatrix ctl`.
//!
//! One request line per connection, one response line: `ok <key=value ...>` or
//! `error: <why>`. A VM answers `pause`, `resume`, `status`, `checksum` (paused VM only),
//! `snapshot full|diff <dir>`, `stop`, `disk-faults <n>` (fault injection: the next n guest
//! disk writes fail); a backup answers `status` and `stop`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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

fn serve_one(handler: &Handler, stream: UnixStream) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut line = String::new();
    BufReader::new(stream).take(4096).read_line(&mut line)?;
    let reply = match handler(line.trim_end_matches(['\r', '\n'])) {
        Ok(s) => format!("ok {s}\n"),
        Err(e) => format!("error: {e}\n"),
    };
    w.write_all(reply.as_bytes())
}

/// Serves a VM's control requests on `path` (see [`serve_with`]).
pub fn serve(path: &Path, vm: Arc<Vm>, extra: Option<StatusExtra>) -> anyhow::Result<()> {
    serve_with(
        path,
        Box::new(move |line| parse(line).and_then(|r| execute(&vm, r, extra.as_ref()))),
    )
}

/// Listens on `path` (replacing a stale socket) and answers each request with `handler` on a
/// background thread.
pub fn serve_with(path: &Path, handler: Handler) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve_one(&handler, stream) {
                    tracing::warn!("control connection: {e}");
                }
            }
        })
        .context("spawning the control thread")?;
    Ok(())
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
}
