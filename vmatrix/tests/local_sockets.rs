//! Local sockets and certificates without KVM: a client that connects to a control socket and
//! says nothing does not delay `vmatrix ctl <sock> status` (each connection is served by a task
//! of its own and has 2 s to send its request head); `vmatrix certs issue` states roles and VMs.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn vmatrix(args: &[&str]) -> std::process::Output {
    Command::new(vmatrix_bin()).args(args).output().unwrap()
}

/// Runs `vmatrix ctl <sock> status`, killing it after `limit`; returns (reply, time taken).
fn timed_status(sock: &Path, limit: Duration) -> (Option<String>, Duration) {
    let t0 = Instant::now();
    let mut c = Command::new(vmatrix_bin())
        .arg("ctl")
        .arg(sock)
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let took = t0.elapsed();
            let mut out = String::new();
            use std::io::Read;
            c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            return (st.success().then_some(out), took);
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return (None, t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_silent_control_client_does_not_delay_ctl_status() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ps = pki.to_str().unwrap();
    assert!(vmatrix(&["certs", "init", ps]).status.success());
    assert!(vmatrix(&["certs", "issue", ps, "--host", "backup"])
        .status
        .success());
    let sock = dir.path().join("backup.sock");
    let mut backup = Command::new(vmatrix_bin())
        .args(["backup", "--listen", "127.0.0.1:0", "--host", "backup"])
        .arg("--certs")
        .arg(&pki)
        .arg("--image-dir")
        .arg(dir.path().join("image"))
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(&sock, Duration::from_secs(10));
    let (alone, t_alone) = timed_status(&sock, Duration::from_secs(5));
    assert!(alone.is_some_and(|s| json_field(&s, "role").as_deref() == Some("backup")));
    // Clients that connect and say nothing.
    let silent: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let (reply, took) = timed_status(&sock, Duration::from_millis(1500));
    let _ = backup.kill();
    let _ = backup.wait();
    eprintln!(
        "ctl status: {:.0} ms alone, {:.0} ms with {} silent clients connected",
        t_alone.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3,
        silent.len()
    );
    let reply = reply.unwrap_or_else(|| panic!("ctl status blocked by silent clients ({took:?})"));
    assert_eq!(
        json_field(&reply, "role").as_deref(),
        Some("backup"),
        "{reply}"
    );
    assert!(
        took < t_alone + Duration::from_millis(500),
        "ctl status took {took:?} with silent clients (alone {t_alone:?})"
    );
}

#[test]
fn certs_issue_states_roles_and_vms() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ps = pki.to_str().unwrap();
    assert!(vmatrix(&["certs", "init", ps]).status.success());
    let out = vmatrix(&["certs", "issue", ps, "--host", "h1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("roles primary+backup for any VM (no --role given: the default)"),
        "{text}"
    );
    let out = vmatrix(&[
        "certs", "issue", ps, "--host", "h2", "--role", "backup", "--vm", "web", "--vm", "db",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("roles backup for VM db, web"), "{text}");
    // What the certificate says, read back as a peer would.
    let id = transport::certs::load(&pki, "h2").unwrap();
    let pc = transport::PeerCert::from_der(&id.chain[0]).unwrap();
    assert_eq!(pc.host, "h2");
    assert!(pc.check(transport::HostRole::Backup, Some("web")).is_ok());
    assert!(pc.check(transport::HostRole::Backup, Some("mail")).is_err());
    assert!(pc.check(transport::HostRole::Primary, Some("web")).is_err());
    for (args, want) in [
        (vec!["--role", "king"], "unknown role 'king'"),
        (vec!["--vm", "a b"], "VM name 'a b'"),
        (vec!["--vm", "*", "--vm", "x"], "cannot be combined"),
    ] {
        let mut a = vec!["certs", "issue", ps, "--host", "h3"];
        a.extend(args);
        let out = vmatrix(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{a:?}: {err}");
    }
}
