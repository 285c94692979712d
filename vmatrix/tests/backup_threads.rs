//! `vmatrix backup --rt-apply --apply-cpus 0` (issue 12: the backup's apply path at real-time
//! priority and pinned, where the host allows): the backup's runtime threads run `SCHED_FIFO`
//! on CPU 0, its main thread stays ordinary; without the flags nothing is real-time. Read from
//! `/proc/<pid>/task/*` of a real backup process.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A backup listening on loopback, with `extra` flags.
fn backup(dir: &std::path::Path, extra: &[&str]) -> Child {
    let pki = dir.join("pki");
    for args in [
        vec!["certs", "init", pki.to_str().unwrap()],
        vec!["certs", "issue", pki.to_str().unwrap(), "--host", "b"],
    ] {
        let out = Command::new(vmatrix_bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    Command::new(vmatrix_bin())
        .args(["backup", "--listen", "127.0.0.1:0", "--host", "b"])
        .arg("--certs")
        .arg(&pki)
        .arg("--image-dir")
        .arg(dir.join("image"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backup")
}

/// Per thread of `pid`: its name, scheduling policy (field 41 of `stat`: 1 is `SCHED_FIFO`)
/// and allowed CPUs.
fn threads(pid: u32) -> Vec<(String, u32, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        // Fields after the name start at field 3; the policy is field 41.
        let policy = stat[close + 2..]
            .split(' ')
            .nth(41 - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or(u32::MAX);
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name, policy, cpus));
    }
    out
}

#[test]
fn a_real_time_backup_runs_its_runtime_threads_fifo_and_pinned_and_a_default_one_does_not() {
    let d = tempfile::tempdir().unwrap();
    let mut rt = backup(d.path(), &["--rt-apply", "--apply-cpus", "0"]);
    let t = Instant::now();
    let fifo = loop {
        let th = threads(rt.id());
        let fifo: Vec<_> = th.iter().filter(|t| t.1 == 1).cloned().collect();
        if !fifo.is_empty() || t.elapsed() > Duration::from_secs(10) {
            break (fifo, th);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = rt.kill();
    let _ = rt.wait();
    let (fifo, all) = fifo;
    assert!(!fifo.is_empty(), "no SCHED_FIFO thread: {all:?}");
    for (name, _, cpus) in &fifo {
        assert_eq!(cpus, "0", "{name} not pinned to CPU 0: {all:?}");
    }
    let main = all.iter().find(|t| t.0 == "vmatrix");
    assert!(main.is_some_and(|m| m.1 == 0), "the main thread: {all:?}");

    let d = tempfile::tempdir().unwrap();
    let mut plain = backup(d.path(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    let th = threads(plain.id());
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(th.len() > 1, "{th:?}");
    assert!(
        th.iter().all(|t| t.1 == 0),
        "a default backup is ordinary: {th:?}"
    );
}
