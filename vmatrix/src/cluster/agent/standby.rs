//! The agent's standby clones (docs/clones.md, "Standby clones"): for each VM wanting clones
//! on this host, `--clone-standby` (default 1) `vmatrix clone-vm --standby` processes of its
//! newest base run idle, isolated, as their parent; a clone assigned here takes one over
//! (`PUT /identity`: a name, an address, a MAC and a generation at once) instead of a process
//! spawned and a VM built for it, and a new standby is started behind it. A standby of an older
//! base, or of a VM no longer wanted here, is killed (it holds nothing of anyone's).
//!
//! Files: `<dir>/standby-<n>.{sock,delta,log,console,rec}`; on activation they are renamed
//! to the clone's name (an open socket or file goes on under its new name), and the clone's
//! record is written. A restarted agent kills the standbys an earlier one left
//! ([`kill_leftover`]): they are cheap to make again, and adopting one half-activated would
//! need more than its record.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use failover::model::CloneAssignment;

use super::clone_io::CloneProc;
use crate::control::client::Client;
use crate::control::types::Request;

/// How long an activation may take (it runs before the supervisor's other actions: bounded
/// tight; a standby too slow for it is replaced).
const ACTIVATE_TIMEOUT: Duration = Duration::from_millis(200);

/// File name prefix of a standby.
pub(super) const PREFIX: &str = "standby-";

/// Starts a standby of `vm` from `base` (of `term`) on `tap`, named `stem` (`standby-<n>`).
pub(super) fn spawn(
    dir: &Path,
    exe: &Path,
    (vm, base, term): (&str, &Path, u64),
    tap: &str,
    stem: &str,
) -> anyhow::Result<CloneProc> {
    let f = |ext: &str| dir.join(format!("{stem}.{ext}"));
    for ext in ["sock", "delta"] {
        let _ = std::fs::remove_file(f(ext));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(f("log"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--log", "info", "clone-vm", "--standby", "--base"])
        .arg(base)
        .args(["--tap", tap, "--delta"])
        .arg(f("delta"))
        .arg("--control")
        .arg(f("sock"))
        .arg("--console-log")
        .arg(f("console"));
    // Its own process group: a signal meant for the agent never reaches it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("spawning vmatrix clone-vm --standby")?;
    let pid = child.id();
    let rec = format!("{pid} {vm} {tap} {} {term}\n", base.display());
    if let Err(e) = std::fs::write(f("rec"), rec) {
        tracing::warn!("recording standby {stem}: {e}");
    }
    tracing::info!("started standby clone {stem} of {vm} (pid {pid}, tap {tap})");
    Ok(CloneProc {
        vm: vm.to_string(),
        child: Some(child),
        pid,
        tap: tap.to_string(),
        base: base.to_path_buf(),
        base_term: term,
        control: f("sock"),
        exit: None,
        running: false,
        exited_at: None,
    })
}

/// Makes standby `s` (named `stem`) the clone `a`: gives it its identity, records it as the
/// clone (atomically; the record names the standby it was), renames its files to the clone's
/// and removes the standby's record, in that order — an agent that dies in between leaves
/// either a standby record (its process is killed at the next start) or a clone record (it is
/// adopted). On an error the standby is handed back with it: it is of no more use (the caller
/// discards it and starts the clone the usual way).
pub(super) fn activate(
    dir: &Path,
    stem: &str,
    mut s: CloneProc,
    a: &CloneAssignment,
) -> Result<CloneProc, Box<(anyhow::Error, CloneProc)>> {
    let t0 = std::time::Instant::now();
    let req = Request::Identity {
        name: a.name.clone(),
        config: a.guest_config.clone(),
    };
    let given = Client::new(&s.control, ACTIVATE_TIMEOUT)
        .send_blocking(&req)
        .with_context(|| format!("giving standby {stem} the identity of {}", a.name));
    if let Err(e) = given {
        return Err(Box::new((e, s)));
    }
    let rec = format!(
        "{} {} {} {} {} {stem}\n",
        s.pid,
        a.vm,
        s.tap,
        s.base.display(),
        s.base_term
    );
    if let Err(e) = write_atomic(&dir.join(format!("{}.rec", a.name)), &rec) {
        // (Unrecorded, it would outlive a restart of the agent unknown: it must not run.)
        return Err(Box::new((
            e.context(format!("recording clone {}", a.name)),
            s,
        )));
    }
    for ext in ["sock", "delta", "log", "console"] {
        let from = dir.join(format!("{stem}.{ext}"));
        let to = dir.join(format!("{}.{ext}", a.name));
        if let Err(e) = std::fs::rename(&from, &to) {
            tracing::warn!("renaming {} to {}: {e}", from.display(), to.display());
        }
    }
    let _ = std::fs::remove_file(dir.join(format!("{stem}.rec")));
    tracing::info!(
        "clone {} of {} is the standby {stem} (pid {}, tap {}; {:.1} ms)",
        a.name,
        a.vm,
        s.pid,
        s.tap,
        t0.elapsed().as_secs_f64() * 1e3
    );
    s.control = dir.join(format!("{}.sock", a.name));
    s.running = true;
    Ok(s)
}

/// Writes `path` whole or not at all (a temporary file, synced, renamed over it).
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("rec.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Kills standby `s` (named `stem`) and removes its files.
pub(super) fn discard(dir: &Path, stem: &str, mut s: CloneProc) {
    s.kill();
    remove_files(dir, stem);
}

fn remove_files(dir: &Path, stem: &str) {
    for ext in ["sock", "delta", "log", "console", "rec"] {
        let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
    }
}

/// A standby an earlier agent left (its record `rec`): killed if it still runs (a
/// `clone-vm --standby` whose control socket is this one) unless a clone record claims it
/// (`claimed`: the earlier agent died in the middle of its takeover, after the clone's record
/// was written: it is that clone now), its files removed (the claimed one's are the clone's).
pub(super) fn kill_leftover(dir: &Path, stem: &str, rec: &Path, claimed: &[u32]) {
    let pid = std::fs::read_to_string(rec)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok());
    if pid.is_some_and(|p| claimed.contains(&p)) {
        let _ = std::fs::remove_file(rec);
        return;
    }
    if let Some(pid) = pid {
        let sock = dir.join(format!("{stem}.sock"));
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.contains(&&b"--standby"[..]) && args.contains(&sock.as_os_str().as_encoded_bytes())
        });
        if ours {
            tracing::info!("killing the standby clone {stem} (pid {pid}) an earlier agent left");
            super::clone_io::signal(pid, rustix::process::Signal::KILL);
        }
    }
    remove_files(dir, stem);
}

/// The name of standby number `n`.
pub(super) fn stem(n: u64) -> String {
    format!("{PREFIX}{n}")
}

/// Whether a file stem is a standby's.
pub(super) fn is_standby(stem: &str) -> bool {
    stem.strip_prefix(PREFIX)
        .is_some_and(|n| n.parse::<u64>().is_ok())
}
