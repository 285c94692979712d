//! Roles in host certificates, with real processes on KVM and a network namespace: a backup
//! refuses a primary whose certificate may not act as primary for its VM (backup role only, or
//! another VM), with the reason on both sides; a primary refuses a backup whose certificate
//! does not grant the backup role; after all that, a proper primary is protected.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn issue(pki: &Path, host: &str, extra: &[&str]) {
    let out = Command::new(vmatrix_bin())
        .arg("certs")
        .arg("issue")
        .arg(pki)
        .args(["--host", host])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

struct Backup {
    child: Child,
    log: PathBuf,
}

impl Backup {
    fn spawn(net: &TestNet, dir: &Path, host: &str, listen: &str) -> Backup {
        let log = dir.join(format!("{host}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &net.backup_ns()])
            .arg(vmatrix_bin())
            .args([
                "backup", "--log", "info", "--listen", listen, "--host", host,
            ])
            .arg("--certs")
            .arg(dir.join("pki"))
            .arg("--image-dir")
            .arg(dir.join(format!("image-{host}")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Backup { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn primary(net: &TestNet, dir: &Path, host: &str, backup: &str) -> VmProc {
    let mut args = vm_args("primary", net, &dir.join("disk.img"), 32);
    args.extend([
        "--certs".into(),
        dir.join("pki").into(),
        "--host".into(),
        host.into(),
        "--backup".into(),
        backup.into(),
        "--log".into(),
        "primary=debug,transport=debug,info".into(),
    ]);
    VmProc::spawn_args(net, &dir.join(format!("primary-{host}.log")), &args)
}

/// Waits until `text()` contains `needle`.
fn wait_for(what: &str, text: impl Fn() -> String, needle: &str, limit: Duration) {
    let t0 = Instant::now();
    while !text().contains(needle) {
        assert!(
            t0.elapsed() < limit,
            "{what} never said '{needle}' within {limit:?}:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn certificates_must_grant_the_role_for_the_vm() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    let out = Command::new(vmatrix_bin())
        .arg("certs")
        .arg("init")
        .arg(&pki)
        .output()
        .unwrap();
    assert!(out.status.success());
    issue(&pki, "backup", &[]);
    issue(&pki, "primary", &[]);
    issue(&pki, "rogue", &["--role", "backup"]);
    issue(&pki, "elsewhere", &["--vm", "other"]);
    issue(&pki, "fakebk", &["--role", "primary"]);
    make_disk(&d.join("disk.img"), 16);
    let listen = net.backup_listen(0);
    let b = Backup::spawn(&net, d, "backup", &listen);

    // A certificate that may only be a backup, then one for another VM: refused by the backup.
    for (host, grants) in [
        ("rogue", "it grants roles backup for any VM"),
        ("elsewhere", "it grants roles primary+backup for VM other"),
    ] {
        let mut p = primary(&net, d, host, &format!("backup@{listen}"));
        let why =
            format!("the certificate of '{host}' may not act as primary for VM 'vm': {grants}");
        wait_for(
            "the refused primary",
            || p.stderr_text(),
            &why,
            Duration::from_secs(20),
        );
        wait_for("the backup", || b.log(), &why, Duration::from_secs(5));
        assert!(
            p.try_wait_ready(Duration::from_millis(300)).is_err(),
            "a refused primary released output"
        );
        p.kill9();
    }

    // A backup whose certificate does not grant the backup role: refused by the primary.
    let listen1 = net.backup_listen(1);
    let _fake = Backup::spawn(&net, d, "fakebk", &listen1);
    let mut p = primary(&net, d, "primary", &format!("fakebk@{listen1}"));
    wait_for(
        "the primary",
        || p.stderr_text(),
        "the certificate of 'fakebk' may not act as backup for VM 'vm': it grants roles primary for any VM",
        Duration::from_secs(20),
    );
    p.kill9();

    // The backup still serves a proper primary.
    let mut p = primary(&net, d, "primary", &format!("backup@{listen}"));
    let mut kv = match p.try_wait_ready(Duration::from_secs(30)) {
        Ok(kv) => kv,
        Err(e) => panic!("{e}\nbackup log:\n{}", b.log()),
    };
    assert_eq!(kv.cmd("SET k v").unwrap(), "OK");
    assert_eq!(kv.cmd("GET k").unwrap(), "VALUE v");
}
