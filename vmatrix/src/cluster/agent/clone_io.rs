//! The agent's clone I/O (see `clones.rs`): one clone process, making a clone base from a
//! snapshot of the local primary or backup or from a copy of another host's base, the clones'
//! taps, and the note before a clone stops (draining is the manager's and the load balancer's
//! driver's: see [`note_stop`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use super::clones::Base;
use crate::control::client::Client;
use crate::control::types::{Request, SnapshotKind};

/// How long a snapshot (or a backup's export) for a base may take: longer than a backup waits
/// for its export (60 s, then cancelled), so the answer is the backup's.
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// One clone process (`vmatrix clone-vm`).
pub(super) struct CloneProc {
    /// The VM it clones.
    pub(super) vm: String,
    /// Our child (None: adopted from an earlier agent, watched through /proc).
    pub(super) child: Option<Child>,
    pub(super) pid: u32,
    /// Its tap.
    pub(super) tap: String,
    /// The clone base it started from.
    pub(super) base: PathBuf,
    /// The term of the primary whose snapshot that base froze.
    pub(super) base_term: u64,
    /// Its control socket.
    pub(super) control: PathBuf,
    /// How it ended, once it did.
    pub(super) exit: Option<String>,
    /// Its control socket answered (its VM was built and runs).
    pub(super) running: bool,
    /// When its exit was noticed.
    pub(super) exited_at: Option<Instant>,
}

impl CloneProc {
    /// Whether it runs (reaps it if it exited).
    pub(super) fn alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let exit = match self.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => return true,
                Ok(Some(st)) => describe(st),
                Err(e) => format!("cannot wait for it: {e}"),
            },
            None if pid_alive(self.pid) => return true,
            None => "exited (adopted from an earlier agent: status unknown)".into(),
        };
        self.exit = Some(exit);
        false
    }

    /// Kills it at once.
    pub(super) fn kill(&mut self) {
        signal(self.pid, rustix::process::Signal::KILL);
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
        if self.exit.is_none() {
            self.exit = Some("killed by the agent".into());
        }
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "exited".into(),
    }
}

/// Sends `sig` to `pid` (nothing if it is gone).
pub(super) fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// A clone is about to stop because its assignment no longer lists it. Draining is not done
/// here: while a load balancer's driver (`vmatrix lb serve`, `crate::lb::serve`) is attached
/// to the VM, the manager keeps a scaled-down clone assigned (as `draining`) until the driver
/// took it out of the service and saw its last connection end, and only then drops it from
/// this host's assignment (`failover::manager` `drain` rules; docs/clones.md, "Drain before
/// stop"). So by the time the agent stops a clone it was drained, or nothing was to be drained
/// (no balancer attached, the drain limit passed, the driver gone).
pub(super) fn note_stop(name: &str, c: &CloneProc) {
    tracing::info!(
        "clone {name} (tap {}): no longer assigned (drained first if a load balancer is \
         attached); stopping it",
        c.tap
    );
}

/// Makes a base of `vm` in `dir`: a snapshot from `control`, the VM's primary (one capture
/// pause; the service and its protection go on) or its backup (exported between two
/// checkpoints: no pause), frozen as a clone base (a full snapshot is used in place), and a
/// `term` file written last (a base without it is half made and removed at the next start).
pub(super) fn make_base(vm: &str, control: &Path, term: u64, dir: PathBuf) -> anyhow::Result<Base> {
    let t0 = Instant::now();
    let snap = dir.join("snap");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = (|| {
        let a = Client::new(control, SNAPSHOT_TIMEOUT).send_blocking(&Request::Snapshot {
            kind: SnapshotKind::Full,
            dir: snap.clone(),
        });
        let a = a.with_context(|| format!("snapshot of {vm} from {}", control.display()))?;
        crate::clone::base::prepare(&snap, &dir.join("base"))
            .with_context(|| format!("freezing the snapshot of {vm}"))?;
        std::fs::write(dir.join("term"), format!("{term}\n"))?;
        tracing::info!(
            "{vm}: clone base of term {term} in {:.0} ms (snapshot {a})",
            t0.elapsed().as_secs_f64() * 1e3
        );
        anyhow::Ok(())
    })();
    if let Err(e) = r {
        remove_dir(&dir);
        return Err(e);
    }
    Ok(Base {
        dir,
        term,
        made: Instant::now(),
    })
}

/// Makes a base of `vm` in `dir` from a copy of another host's (the first of `sources` that
/// sends one whole; `base_share::fetch`): it must be one full snapshot (no parent: a chain
/// would be followed on this host's disk) of the VM's memory size (`mem_mib`, if known),
/// every CRC of which `clone::base::prepare` checks; a `term` file is written last. Its age is
/// its source's.
pub(super) fn copy_base(
    vm: &str,
    sources: &[failover::clones::BaseSource],
    (certs, host): &(PathBuf, String),
    mem_mib: Option<u64>,
    dir: PathBuf,
) -> anyhow::Result<Base> {
    let t0 = Instant::now();
    let snap = dir.join("snap");
    let r = (|| {
        let id = transport::certs::load(certs, host)
            .with_context(|| format!("loading the certificate of '{host}'"))?;
        let (c, from) = super::base_share::fetch(&id, sources, vm, &snap)?;
        let copied = t0.elapsed();
        let meta = vmm::snapshot::read_meta(&snap)
            .with_context(|| format!("the base of {vm} copied from {from}"))?;
        if meta.is_diff() {
            bail!("the base of {vm} copied from {from} is a diff snapshot, not a full one");
        }
        if let Some(m) = mem_mib.filter(|m| meta.mem_size != m << 20) {
            bail!(
                "the base of {vm} copied from {from} has {} bytes of memory, not {m} MiB",
                meta.mem_size
            );
        }
        crate::clone::base::prepare(&snap, &dir.join("base"))
            .with_context(|| format!("checking the base of {vm} copied from {from}"))?;
        std::fs::write(dir.join("term"), format!("{}\n", c.term))?;
        tracing::info!(
            "{vm}: clone base of term {} copied from {from}: {:.1} MiB of data in {:.0} ms, \
             checked in {:.0} ms (its age there {} ms)",
            c.term,
            c.bytes as f64 / (1 << 20) as f64,
            copied.as_secs_f64() * 1e3,
            (t0.elapsed() - copied).as_secs_f64() * 1e3,
            c.age_ms
        );
        anyhow::Ok(c)
    })();
    match r {
        Ok(c) => {
            // (An age beyond this host's clock's start, a host just booted: as old as can be
            // said, never newer than it is.)
            let now = Instant::now();
            let age = std::time::Duration::from_millis(c.age_ms);
            let made = (0..64)
                .map(|k| age / (1 << k))
                .find_map(|a| now.checked_sub(a))
                .unwrap_or(now);
            Ok(Base {
                dir,
                term: c.term,
                made,
            })
        }
        Err(e) => {
            remove_dir(&dir);
            Err(e)
        }
    }
}

/// Removes a directory tree (logged if it fails).
pub(super) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// The first tap name `vx<n>` not in `used`.
pub(super) fn free_tap(used: &[String]) -> String {
    (0..)
        .map(|n| format!("vx{n}"))
        .find(|t| !used.contains(t))
        .unwrap_or_default()
}

/// Creates the taps that do not exist as ports of `bridge`, up, with one `ip -batch`.
pub(super) fn ensure_taps(taps: &[String], bridge: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let script: String = taps
        .iter()
        .filter(|t| !Path::new("/sys/class/net").join(t).exists())
        .map(|t| format!("tuntap add dev {t} mode tap\nlink set {t} master {bridge} up\n"))
        .collect();
    if script.is_empty() {
        return Ok(());
    }
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    if let Some(mut i) = ip.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = ip.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
