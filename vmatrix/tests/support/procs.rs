//! `vmatrix backup` and `vmatrix primary` processes started with explicit flags, in any
//! namespace of a test network, as the failover agent starts them; their control sockets
//! (requests that may fail, waiting for a status field) and their exits (code and stderr).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Makes a cluster CA in `<dir>/pki` and a certificate (primary and backup roles) for each
/// host; returns the directory.
pub fn make_pki(dir: &Path, hosts: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    let run = |args: &[&str]| {
        let out = Command::new(vmatrix_bin())
            .args(args)
            .output()
            .expect("run vmatrix certs");
        assert!(out.status.success(), "vmatrix {args:?}: {out:?}");
    };
    let ps = pki.to_str().unwrap();
    run(&["certs", "init", ps]);
    for h in hosts {
        run(&["certs", "issue", ps, "--host", h]);
    }
    pki
}

/// Sends one control request; its JSON answer, or the error text.
pub fn ctl_try(socket: &Path, request: &[&str]) -> Result<String, String> {
    let out = Command::new(vmatrix_bin())
        .arg("ctl")
        .arg(socket)
        .args(request)
        .output()
        .expect("run vmatrix ctl");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match out.status.success() {
        true => Ok(stdout),
        false => Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Polls `status` until `pred` holds for field `key` (not null); returns that status.
pub fn wait_status(
    socket: &Path,
    key: &str,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let st = ctl_try(socket, &["status"]).unwrap_or_default();
        if json_field(&st, key).is_some_and(|v| pred(&v)) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never as wanted within {timeout:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit (at most `timeout`).
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `vmatrix backup` process with a control socket; killed on drop.
pub struct BackupProc {
    pub child: Child,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
}

impl BackupProc {
    /// Starts `vmatrix backup --host <host> --listen <listen> --image-dir <image>` in
    /// namespace `ns`, with its control socket at `<dir>/<host>-backup.sock` and its log (its
    /// stderr, appended to) at `<dir>/<host>-backup.log`.
    pub fn spawn(ns: &str, dir: &Path, host: &str, listen: &str, image: &Path) -> BackupProc {
        let socket = dir.join(format!("{host}-backup.sock"));
        let log = dir.join(format!("{host}-backup.log"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(vmatrix_bin())
            .args(["backup", "--log", "backup=debug,info"])
            .args(["--listen", listen, "--host", host])
            .arg("--certs")
            .arg(dir.join("pki"))
            .arg("--image-dir")
            .arg(image)
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn vmatrix backup");
        wait_socket(&socket, Duration::from_secs(10));
        BackupProc {
            child,
            socket,
            image: image.to_path_buf(),
            log,
        }
    }

    /// One control request (panics on `error:`).
    pub fn ctl(&self, request: &[&str]) -> String {
        ctl_try(&self.socket, request)
            .unwrap_or_else(|e| panic!("backup ctl {request:?}: {e}\nlog:\n{}", self.log_text()))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = wait_exit(&mut self.child, Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "backup exit: {st:?}\nlog:\n{}",
            self.log_text()
        );
    }
}

impl Drop for BackupProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmatrix primary` flags for a guest booted on `disk` in `net`, at `term`, with host
/// certificate `host` and control socket `socket` (backups and the rest come after).
pub fn primary_args(
    net: &TestNet,
    dir: &Path,
    disk: &Path,
    host: &str,
    term: u64,
    socket: &Path,
) -> Vec<std::ffi::OsString> {
    let mut args = vm_args("primary", net, disk, 32);
    args.extend(from_image_common(dir, host, term, socket));
    args
}

/// `--certs <dir>/pki --host <host> --term <term> --control <socket> --log ...`.
pub fn from_image_common(
    dir: &Path,
    host: &str,
    term: u64,
    socket: &Path,
) -> Vec<std::ffi::OsString> {
    vec![
        "--certs".into(),
        dir.join("pki").into(),
        "--host".into(),
        host.into(),
        "--term".into(),
        term.to_string().into(),
        "--control".into(),
        socket.into(),
        "--log".into(),
        "primary=info,info".into(),
    ]
}
