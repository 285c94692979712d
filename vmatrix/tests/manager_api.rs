//! `vmatrix manager` as a process: its HTTP/JSON API and the CLI on top of it, fake agents
//! speaking the agent protocol over QUIC with mutual TLS (this test is their client), the
//! refusals (certificate without the agent role, Hello naming another host, wrong version,
//! corrupt frame, a newer connection replacing an older one), /metrics, the events file, and a
//! restart from the same state file. No KVM needed: nothing here boots a VM.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use failover::model::{ProcRole, Report, Role, Source, VmObservation};
use failover::wire::{self, AgentMsg};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmatrix"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("running vmatrix")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "vmatrix {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A CA and certificates: mgr (manager), a1 and a2 (agents), plain (no agent role).
fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let p = pki.to_str().unwrap();
    ok(&["certs", "init", p]);
    ok(&["certs", "issue", p, "--host", "mgr", "--role", "manager"]);
    for h in ["a1", "a2"] {
        ok(&[
            "certs", "issue", p, "--host", h, "--role", "agent", "--role", "primary", "--role",
            "backup",
        ]);
    }
    ok(&[
        "certs", "issue", p, "--host", "plain", "--role", "primary", "--role", "backup",
    ]);
    pki
}

fn free_ports() -> (SocketAddr, SocketAddr) {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    (u.local_addr().unwrap(), t.local_addr().unwrap())
}

/// A running `vmatrix manager`.
struct Mgr {
    child: Child,
    api: SocketAddr,
    log: PathBuf,
}

impl Mgr {
    fn start(dir: &Path, pki: &Path, listen: SocketAddr, api: SocketAddr, tag: &str) -> Mgr {
        Mgr::start_with(dir, pki, listen, api, tag, &dir.join("state"))
    }

    fn start_with(
        dir: &Path,
        pki: &Path,
        listen: SocketAddr,
        api: SocketAddr,
        tag: &str,
        state: &Path,
    ) -> Mgr {
        let log = dir.join(format!("manager-{tag}.log"));
        let child = Command::new(bin())
            .args([
                "--log",
                "info",
                "manager",
                "--host",
                "mgr",
                "--detect-ms",
                "500",
            ])
            .args(["--listen", &listen.to_string(), "--api", &api.to_string()])
            .arg("--state")
            .arg(state)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .arg("--certs")
            .arg(pki)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mgr { child, api, log };
        let t0 = Instant::now();
        while http("GET", api, "/v1/hosts", None).is_err() {
            if let Some(st) = m.child.try_wait().unwrap() {
                panic!("manager exited ({st}): {}", m.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{}", m.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        self.api.to_string()
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "manager exit {st}: {}", self.log());
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "manager did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mgr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP call: (status, body). Err when the manager cannot be reached.
fn http(
    method: &str,
    api: SocketAddr,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("http://{api}{path}");
    let mut res = match (method, body) {
        ("GET", _) => agent.get(&url).call()?,
        ("DELETE", _) => agent.delete(&url).call()?,
        (_, Some(b)) => agent
            .post(&url)
            .content_type("application/json")
            .send(b.as_bytes())?,
        (_, None) => agent.post(&url).send_empty()?,
    };
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string()?;
    Ok((status, text))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- a fake agent: the agent protocol from the test ------------------------------------------

#[path = "manager_api/fake_agent.rs"]
mod fake_agent;
use fake_agent::*;

fn primary_running(vm: &str, term: u64) -> VmObservation {
    VmObservation {
        vm: vm.into(),
        role: ProcRole::Primary,
        alive: true,
        exit: None,
        term,
        image_term: 0,
        seq: Some(7),
        protected: false,
        backup_hosts: vec![],
        output_held: false,
        silent_ms: None,
        handed_over: false,
        never_ran: false,
    }
}

fn spec(name: &str, backups: u8) -> String {
    format!(
        r#"{{"name":"{name}","mem_mib":64,"disk_mib":64,"guest_config":"port=7000","backups":{backups},"port":7100}}"#
    )
}

/// Runs `f` on a blocking thread (CLI processes and HTTP calls while the fake agents' tasks go
/// on heartbeating).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_cli_agent_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (listen, api) = free_ports();
    let mgr = Mgr::start(dir.path(), &pki, listen, api, "1");
    let url = mgr.url();
    nowhere_to_place_without_an_agent(api, &url).await;
    let mut a1 = agent_reports_its_host_up(&pki, listen, &url).await;
    create_boots_a_primary_and_refusals(api, &url, &mut a1).await;
    the_vm_runs_once_its_primary_reports(&url, &mut a1).await;
    refused_operations_and_metrics(api).await;
    delete_then_another_vm(api, &url, &mut a1).await;
    let last_seq = events_from_api_cli_and_file(api, &url, dir.path()).await;
    let setup = (dir.path().to_path_buf(), pki, listen, api);
    a_restart_keeps_the_record_and_follows_events(setup, mgr, a1, last_seq).await;
}

/// No agent: nowhere to place a VM.
async fn nowhere_to_place_without_an_agent(api: SocketAddr, url: &str) {
    let url = url.to_string();
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some(&spec("web", 0))))
        .await
        .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("no live host"),
        "{body}"
    );
    let u = url.clone();
    let out =
        blocking(move || run(&["vm", "create", "web", "--backups", "0", "--manager", &u])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("503") && err.contains("no live host may run it"),
        "{err}"
    );
}

/// An agent connects and reports: its host is up.
async fn agent_reports_its_host_up(pki: &Path, listen: SocketAddr, url: &str) -> FakeAgent {
    let url = url.to_string();
    let mut a1 = FakeAgent::connect(pki, "a1", listen).await;
    let first = a1.next_assign().await;
    assert!(first.vms.is_empty(), "{first:?}");
    let u = url.clone();
    let hosts = blocking(move || ok(&["host", "list", "--manager", &u])).await;
    assert!(hosts.starts_with("NAME"), "{hosts}");
    let row = hosts
        .lines()
        .find(|l| l.starts_with("a1 "))
        .unwrap_or_else(|| panic!("{hosts}"));
    assert!(
        row.contains(" up ") && row.contains("yes") && row.contains("10.80.0.1"),
        "{hosts}"
    );
    a1
}

/// A VM without backups: a1 is told to boot its primary; already exists, invalid, unknown.
async fn create_boots_a_primary_and_refusals(api: SocketAddr, url: &str, a1: &mut FakeAgent) {
    let url = url.to_string();
    let u = url.clone();
    let out = blocking(move || {
        ok(&[
            "vm",
            "create",
            "web",
            "--backups",
            "0",
            "--mem-mib",
            "64",
            "--disk-mib",
            "64",
            "--guest-config",
            "port=7000",
            "--port",
            "7100",
            "--manager",
            &u,
        ])
    })
    .await;
    assert!(out.contains("created web (term 1): primary on a1"), "{out}");
    let a = a1.next_assign().await;
    match &a.vms["web"].role {
        Role::Primary {
            term: 1,
            source: Source::Boot,
            backups,
            ..
        } => assert!(backups.is_empty()),
        other => panic!("{other:?}"),
    }
    // Already exists; invalid; unknown.
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some(&spec("web", 0))))
        .await
        .unwrap();
    assert_eq!(st, 409, "{body}");
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some(&spec("bad name", 0))))
        .await
        .unwrap();
    assert_eq!(st, 400, "{body}");
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some("{\"name\": 3")))
        .await
        .unwrap();
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("invalid JSON"), "{body}");
    let big = "x".repeat(100 << 10);
    let (st, _) = blocking(move || http("POST", api, "/v1/vms", Some(&big)))
        .await
        .unwrap();
    assert_eq!(st, 413);
    let (st, body) = blocking(move || http("GET", api, "/v1/vms/nope", None))
        .await
        .unwrap();
    assert_eq!(st, 404, "{body}");
    let (st, body) = blocking(move || http("POST", api, "/v1/vms/web/failover", None))
        .await
        .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("web is Creating"), "{body}");
}

/// The primary reports itself running: the VM runs (unprotected: no backups asked), and the
/// assignment says so (never boot it again).
async fn the_vm_runs_once_its_primary_reports(url: &str, a1: &mut FakeAgent) {
    let url = url.to_string();
    a1.report.send_replace(Report {
        vms: vec![primary_running("web", 1)],
        ..Default::default()
    });
    let u = url.clone();
    let list = blocking(move || {
        let mut last = String::new();
        wait_for("web running", Duration::from_secs(5), || {
            last = ok(&["vm", "list", "--manager", &u]);
            last.lines()
                .any(|l| l.starts_with("web ") && l.contains(" unprotected "))
        });
        last
    })
    .await;
    let row = list.lines().find(|l| l.starts_with("web ")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["web", "unprotected", "1", "a1", "-", "7", "-"],
        "{list}"
    );
    let u = url.clone();
    let show = blocking(move || ok(&["vm", "show", "web", "--manager", &u])).await;
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["spec"]["guest_config"], "port=7000");
    assert_eq!(v["primary"], "a1");
    // The assignment now says the primary runs (never boot it again).
    let a = a1.next_assign().await;
    assert!(
        matches!(
            a.vms["web"].role,
            Role::Primary {
                source: Source::Running,
                ..
            }
        ),
        "{a:?}"
    );
}

/// No backup to promote; no such host to migrate to; `/metrics` in OpenMetrics text.
async fn refused_operations_and_metrics(api: SocketAddr) {
    let (st, body) = blocking(move || http("POST", api, "/v1/vms/web/failover", None))
        .await
        .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no live backup synced"), "{body}");
    let (st, body) =
        blocking(move || http("POST", api, "/v1/vms/web/migrate", Some(r#"{"to": "zz"}"#)))
            .await
            .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("zz is not a live host"), "{body}");
    let (st, body) = blocking(move || http("POST", api, "/v1/vms/web/migrate", Some("{}")))
        .await
        .unwrap();
    assert_eq!(st, 400, "{body}");

    // /metrics: OpenMetrics text with the manager's figures.
    let (st, page) = blocking(move || http("GET", api, "/metrics", None))
        .await
        .unwrap();
    assert_eq!(st, 200);
    for want in [
        "# TYPE vmatrix_manager_vms gauge",
        "vmatrix_manager_vms{status=\"unprotected\"} 1",
        "vmatrix_manager_vms{status=\"protected\"} 0",
        "vmatrix_manager_hosts_up 1",
        "vmatrix_manager_failovers_total 0",
        "vmatrix_manager_switchovers_total 0",
        "vmatrix_manager_last_detect_ms ",
        "vmatrix_manager_last_promote_ms ",
        "vmatrix_manager_events_total ",
        "# EOF",
    ] {
        assert!(page.contains(want), "{want} missing:\n{page}");
    }
}

/// Delete: the next assignment is empty; another VM, kept over the restart.
async fn delete_then_another_vm(api: SocketAddr, url: &str, a1: &mut FakeAgent) {
    let url = url.to_string();
    let u = url.clone();
    let out = blocking(move || ok(&["vm", "delete", "web", "--manager", &u])).await;
    assert!(out.contains("deleted web"), "{out}");
    let a = a1.next_assign().await;
    assert!(a.vms.is_empty(), "{a:?}");
    let (st, _) = blocking(move || http("DELETE", api, "/v1/vms/web", None))
        .await
        .unwrap();
    assert_eq!(st, 404);

    // Another VM, kept over a restart.
    let u = url.clone();
    blocking(move || ok(&["vm", "create", "db", "--backups", "0", "--manager", &u])).await;
    let a = a1.next_assign().await;
    assert!(a.vms.contains_key("db"), "{a:?}");
}

/// The events, from the API, the CLI and the file; returns the last event's number.
async fn events_from_api_cli_and_file(api: SocketAddr, url: &str, dir: &Path) -> u64 {
    let url = url.to_string();
    let u = url.clone();
    let ev = blocking(move || ok(&["events", "--manager", &u])).await;
    for kind in ["host_up", "created", "primary_running", "deleted"] {
        assert!(ev.contains(kind), "{kind} missing:\n{ev}");
    }
    let (st, body) = blocking(move || http("GET", api, "/v1/events?since=2", None))
        .await
        .unwrap();
    assert_eq!(st, 200);
    let since: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(
        since.iter().all(|e| e["seq"].as_u64().unwrap() > 2),
        "{body}"
    );
    let file = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let created: Vec<serde_json::Value> = file
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "created")
        .collect();
    assert_eq!(created.len(), 2, "{file}");
    assert_eq!(created[0]["vm"], "web");
    assert!(
        created[0]["time"].as_str().unwrap().ends_with('Z'),
        "{file}"
    );
    let last_seq = file
        .lines()
        .last()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .unwrap();
    last_seq
}

/// Restart from the same state file: the record survives; events go on numbering, and
/// `events --follow` follows across the restart.
async fn a_restart_keeps_the_record_and_follows_events(
    (dir, pki, listen, api): (PathBuf, PathBuf, SocketAddr, SocketAddr),
    mgr: Mgr,
    a1: FakeAgent,
    last_seq: u64,
) {
    let url = mgr.url();
    let mut follow = KillOnDrop(
        Command::new(bin())
            .args(["events", "--follow", "--manager", &url, "--since"])
            .arg(last_seq.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = {
        let out = follow.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        rx
    };
    drop(a1);
    blocking(move || mgr.stop()).await;
    let d = dir.clone();
    let p = pki.clone();
    let mgr = blocking(move || Mgr::start(&d, &p, listen, api, "2")).await;
    let u = mgr.url();
    let list = blocking(move || ok(&["vm", "list", "--manager", &u])).await;
    let row = list
        .lines()
        .find(|l| l.starts_with("db "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.split_whitespace().nth(3) == Some("a1"), "{list}");
    assert!(!list.contains("web "), "{list}");
    let a1 = FakeAgent::connect(&pki, "a1", listen).await;
    // (a host_down of the first manager may come before the second one's host_up)
    let seen = blocking(move || {
        let mut seen: Vec<String> = Vec::new();
        while !seen.last().is_some_and(|l| l.contains("host_up")) {
            match lines.recv_timeout(Duration::from_secs(10)) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("events --follow printed no host_up after the restart: {seen:?}"),
            }
        }
        seen
    })
    .await;
    drop(follow);
    let seqs: Vec<u64> = seen
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        seqs[0] == last_seq + 1 && seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{seen:?}"
    );
    drop(a1);
    blocking(move || mgr.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_frames() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (listen, api) = free_ports();
    let mgr = Mgr::start(dir.path(), &pki, listen, api, "1");
    let mut a2 = FakeAgent::connect(&pki, "a2", listen).await;
    a2.next_assign().await;

    // A certificate without the agent role.
    let (_ep, conn, _streams) = hello(&pki, "plain", "plain", wire::VERSION, listen).await;
    let (code, why) = closed(&conn).await;
    assert_eq!(code, u64::from(transport::quic::code::REFUSED));
    assert!(why.contains("may not act as agent"), "{why}");

    // A Hello naming another host than the certificate.
    let (_ep, conn, _streams) = hello(&pki, "a1", "a2", wire::VERSION, listen).await;
    let (code, why) = closed(&conn).await;
    assert_eq!(code, u64::from(transport::quic::code::REFUSED));
    assert!(
        why.contains("names host 'a2' but the certificate is for 'a1'"),
        "{why}"
    );

    // Another protocol version.
    let (_ep, conn, _streams) = hello(&pki, "a1", "a1", wire::VERSION + 1, listen).await;
    let (code, why) = closed(&conn).await;
    assert_eq!(code, u64::from(transport::quic::code::REFUSED));
    assert!(why.contains("version"), "{why}");

    // A corrupt frame closes that connection only.
    let a1 = FakeAgent::connect(&pki, "a1", listen).await;
    let mut frame = wire::encode(&AgentMsg::Report(Report::default())).unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0x40;
    frame[4] ^= 0x01; // and the CRC
    a1.raw.send(frame).unwrap();
    let (code, why) = closed(&a1.conn).await;
    assert_eq!(code, u64::from(transport::quic::code::SESSION_FAILED));
    assert!(why.contains("bad frame"), "{why}");
    let m = Arc::new(mgr);
    let hosts = {
        let m = m.clone();
        blocking(move || {
            let mut last = String::new();
            wait_for("a1 disconnected", Duration::from_secs(5), || {
                last = ok(&["host", "list", "--manager", &m.url()]);
                last.lines()
                    .any(|l| l.starts_with("a1 ") && l.contains(" no "))
            });
            last
        })
        .await
    };
    let a2row = hosts.lines().find(|l| l.starts_with("a2 ")).unwrap();
    assert!(a2row.contains(" up ") && a2row.contains("yes"), "{hosts}");
    assert!(m.log().contains("bad frame"), "{}", m.log());

    // It comes back; a newer connection from the same host replaces the older one.
    let mut a1 = FakeAgent::connect(&pki, "a1", listen).await;
    a1.next_assign().await;
    let mut a1b = FakeAgent::connect(&pki, "a1", listen).await;
    a1b.next_assign().await;
    let (code, why) = closed(&a1.conn).await;
    assert_eq!(code, u64::from(transport::quic::code::DONE));
    assert!(why.contains("replaced"), "{why}");
    let hosts = {
        let m = m.clone();
        blocking(move || ok(&["host", "list", "--manager", &m.url()])).await
    };
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with("a1 ") && l.contains(" up ") && l.contains("yes")),
        "{hosts}"
    );
    // Still serving agents' VMs: a VM with a backup lands on both.
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some(&spec("two", 1))))
        .await
        .unwrap();
    assert_eq!(st, 201, "{body}");
    let (x, y) = (a1b.next_assign().await, a2.next_assign().await);
    let roles = [&x.vms["two"].role, &y.vms["two"].role];
    assert!(
        roles.iter().any(|r| matches!(r, Role::Primary { .. })),
        "{roles:?}"
    );
    assert!(
        roles
            .iter()
            .any(|r| matches!(r, Role::Backup { min_term: 1 })),
        "{roles:?}"
    );
    drop((a1b, a2));
    let m = Arc::try_unwrap(m).ok().expect("one owner");
    blocking(move || m.stop()).await;
}

/// A decision that cannot be made durable stops the manager (non-zero exit) before any agent
/// hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpersistable_decision_stops_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (listen, api) = free_ports();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut mgr = Mgr::start_with(dir.path(), &pki, listen, api, "1", &sub.join("state"));
    let mut a1 = FakeAgent::connect(&pki, "a1", listen).await;
    assert!(a1.next_assign().await.vms.is_empty());
    std::fs::remove_dir(&sub).unwrap(); // the next save cannot create its file
    let (st, body) = blocking(move || http("POST", api, "/v1/vms", Some(&spec("web", 0))))
        .await
        .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("stopping"), "{body}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = mgr.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "{status}");
    let log = mgr.log();
    assert!(
        log.contains("persisting the cluster state") && log.contains("break fencing"),
        "{log}"
    );
    // The agent never heard of the VM: its connection ends without another assignment.
    match tokio::time::timeout(Duration::from_secs(5), a1.assigns.recv()).await {
        Ok(None) => {}
        Ok(Some(m)) => panic!("sent after a failed save: {m:?}"),
        Err(_) => panic!("the connection did not end"),
    }
}

#[test]
fn refuses_bad_state_and_public_api() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let p = pki.to_str().unwrap();
    let state = dir.path().join("state");
    std::fs::write(&state, "vmatrix-manager-state 1 00000000 2\n{}").unwrap();
    let (listen, api) = free_ports();
    let base = |api: &str, state: &Path| {
        run(&[
            "manager",
            "--listen",
            &listen.to_string(),
            "--api",
            api,
            "--certs",
            p,
            "--host",
            "mgr",
            "--state",
            state.to_str().unwrap(),
            "--events",
            dir.path().join("events.jsonl").to_str().unwrap(),
        ])
    };
    let out = base(&api.to_string(), &state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing to start") && err.contains("CRC32 mismatch"),
        "{err}"
    );

    let out = base("10.1.2.3:7700", &dir.path().join("fresh"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("loopback") && err.contains("mutual TLS on the API is future work"),
        "{err}"
    );

    // The CLI says when nobody answers.
    let out = run(&["vm", "list", "--manager", &api.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach the manager"), "{err}");
}
