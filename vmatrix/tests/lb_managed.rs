//! The load balancer driven for a managed VM (issue 11; docs/clones.md, "Drain before stop"),
//! on real KVM, taps, namespaces and the kernel's NAT: a protected VM of a two-host cluster,
//! `vmatrix lb serve` next to a balancer's namespace on the clients' LAN, clients on its VIP.
//! - `vm scale --clones 2`: new connections through the VIP reach the clones;
//! - `--clones 0` with a connection held on a clone: that clone drains (no new connection
//!   reaches it, the held one works) and stops only once it is closed; the other, idle, stops at
//!   once after its drain; a client loop through the VIP sees no error all along;
//! - autoscaling fed by the driver's measured active connections scales up under held
//!   connections and back to zero after they close.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::lb::{client_loop, generation_at, Conn, Driver, LbNet};
use support::managed::Managed;
use support::*;

/// The cluster, the balancer and its driver (dropped in this order).
struct Setup {
    driver: Option<Driver>,
    _lbnet: LbNet,
    m: Managed,
    vip: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A protected VM "web" (k1 = v1) on two hosts, a balancer namespace on the clients' LAN and
/// its driver (`extra` flags), attached, its VIP answering.
fn setup(extra: &[&str]) -> Setup {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let m = Managed::start(dir.path(), 2);
    m.create_protected(1);
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    assert_eq!(kv.cmd("SET k1 v1").unwrap(), "OK");
    let lbnet = LbNet::up(m.net.index, &format!("{}lan", m.net.name), None);
    let vip_s = format!("10.77.{}.100:7000", m.net.index);
    let log = dir.path().join("driver.log");
    let driver = Driver::start(m.api, &lbnet.ns, &vip_s, &log, extra);
    m.wait_vm("web", "balancer attached", Duration::from_secs(20), |v| {
        !v["clones"]["balancer"].is_null()
    });
    let vip: SocketAddr = vip_s.parse().unwrap();
    let t0 = Instant::now();
    while Conn::open(vip).and_then(|mut c| c.cmd("GET k1")).ok() != Some("VALUE v1".into()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the VIP never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Setup {
        driver: Some(driver),
        _lbnet: lbnet,
        m,
        vip,
        _dir: dir,
    }
}

/// Waits until the clones' states are `want` (in slot order).
fn wait_states(s: &Setup, what: &str, want: &[&str], timeout: Duration) -> serde_json::Value {
    s.m.wait_vm("web", what, timeout, |v| {
        let st: Vec<String> = Managed::clone_states(v)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        st == want
    })
}

/// Fresh connections through the VIP until every generation of `want` answered one.
fn reach_all(s: &Setup, want: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    for i in 0..80u64 {
        seen.insert(Conn::open(s.vip).unwrap().generation());
        if want.is_subset(&seen) {
            return;
        }
        std::thread::sleep(Duration::from_millis(i % 7));
    }
    panic!("through the VIP: {seen:?}, wanted all of {want:?}");
}

/// Step 1: two clones; new connections through the VIP reach both. Their generations.
fn scale_up_reaches_the_clones(s: &Setup) -> Vec<String> {
    let t0 = Instant::now();
    s.m.scale(2);
    wait_states(
        s,
        "2 clones running",
        &["running", "running"],
        Duration::from_secs(30),
    );
    let gens: Vec<String> = (0..2).map(|i| generation_at(s.m.clone_addr(i))).collect();
    reach_all(s, &gens.iter().cloned().collect());
    eprintln!(
        "scale --clones 2 → both reached through the VIP: {} ms",
        t0.elapsed().as_millis()
    );
    gens
}

/// A connection through the VIP served by the VM of generation `gen`.
fn held_on(s: &Setup, gen: &str) -> Conn {
    (0..80u64)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(i % 7));
            Conn::open(s.vip).unwrap()
        })
        .find_map(|mut c| (c.generation() == gen).then_some(c))
        .unwrap_or_else(|| panic!("no connection reached generation {gen}"))
}

/// The clone processes of every host (clones are spread over the primary's and the
/// backup's host).
fn clone_pids(s: &Setup) -> Vec<u32> {
    (0..s.m.net.hosts)
        .flat_map(|h| s.m.vm_pids(h, "clone-vm"))
        .collect()
}

/// Waits until no host runs a clone process.
fn no_clone_process(s: &Setup, timeout: Duration) {
    for h in 0..s.m.net.hosts {
        s.m.wait_no_vm_process(h, "clone-vm", timeout);
    }
}

/// Step 2: scale to 0 with `held` open on clone 1: clone 0 drains and stops, clone 1 drains
/// and keeps serving `held` only, and stops once it is closed.
fn scale_down_drains(s: &Setup, mut held: Conn, gen1: &str) {
    let t0 = Instant::now();
    s.m.scale(0);
    let v = wait_states(
        s,
        "c0 stopped, c1 draining",
        &["draining"],
        Duration::from_secs(10),
    );
    assert_eq!(v["clones"]["instances"][0]["name"], "web-c1", "{v}");
    eprintln!(
        "scale --clones 0 → idle clone drained and stopped: {} ms",
        t0.elapsed().as_millis()
    );
    for _ in 0..12 {
        let g = Conn::open(s.vip).unwrap().generation();
        assert_ne!(g, gen1, "a new connection reached the draining clone");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        held.cmd("GET k1").unwrap(),
        "VALUE v1",
        "open during the drain"
    );
    assert_eq!(held.generation(), gen1);
    // c1 runs while it drains (c0's process may still be on its way out on a busy host).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = clone_pids(s);
        if pids.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "c1 alone runs while it drains: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t1 = Instant::now();
    drop(held);
    no_clone_process(s, Duration::from_secs(10));
    eprintln!(
        "held connection closed → clone stopped: {} ms",
        t1.elapsed().as_millis()
    );
    wait_states(s, "no clone", &[], Duration::from_secs(5));
    let draining = s.m.events_of("clone_draining");
    assert_eq!(draining.len(), 2, "{draining:?}");
    let stopped = s.m.events_of("clone_stopped");
    let drained = stopped.iter().filter(|e| {
        e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("drained in"))
    });
    assert_eq!(drained.count(), 2, "{stopped:?}");
}

/// `PUT <path>` with a JSON body on the manager's API: (status, body).
fn put(s: &Setup, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.m.api).unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    )
}

/// Hostile reports to the manager: clear errors, and both clones keep serving.
fn hostile_reports_change_nothing(s: &Setup) {
    let drained = r#"{"drained": true}"#;
    let cases = [
        (
            "/v1/vms/web/clones/9/drained",
            drained,
            404,
            "no clone web-c9",
        ),
        (
            "/v1/vms/web/clones/x/drained",
            drained,
            400,
            "not a clone's slot",
        ),
        ("/v1/vms/web/clones/0/drained", drained, 400, "not draining"),
        ("/v1/vms/nope/clones/0/drained", drained, 404, "nope"),
        (
            "/v1/vms/web/clones/0/drained",
            r#"{"drained": 1}"#,
            400,
            "invalid JSON",
        ),
        (
            "/v1/vms/web/balancer",
            r#"{"vip": "x", "lease_ms": 500}"#,
            400,
            "not a.b.c.d:port",
        ),
        (
            "/v1/vms/web/balancer",
            r#"{"vip": "10.0.0.1:80", "lease_ms": 1}"#,
            400,
            "lease_ms",
        ),
    ];
    for (path, body, status, says) in cases {
        let (st, text) = put(s, path, body);
        assert_eq!(st, status, "{path} {body}: {text}");
        assert!(text.contains(says), "{path} {body}: {text}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let v = s.m.vm("web").unwrap();
    let states: Vec<(String, String)> = Managed::clone_states(&v);
    assert!(states.iter().all(|(_, st)| st == "running"), "{v}");
    assert_eq!(v["clones"]["balancer"]["vip"], s.vip.to_string(), "{v}");
}

#[test]
fn scaling_behind_the_vip_drains_before_stopping_and_no_client_fails() {
    let mut s = setup(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let loop_h = client_loop(s.vip, stop.clone());
    let gens = scale_up_reaches_the_clones(&s);
    let held = held_on(&s, &gens[1]);
    scale_down_drains(&s, held, &gens[1]);
    stop.store(true, Ordering::SeqCst);
    let (ok, errors, slowest) = loop_h.join().unwrap();
    eprintln!("client loop: {ok} requests, slowest {slowest:?}, errors {errors:?}");
    assert!(errors.is_empty(), "no client error: {errors:?}");
    assert!(ok >= 50, "the loop ran: {ok}");
    // The driver detaches on SIGTERM.
    assert!(s.driver.take().unwrap().stop(), "driver exit status");
    s.m.wait_vm("web", "detached", Duration::from_secs(5), |v| {
        v["clones"]["balancer"].is_null()
    });
}

#[test]
fn the_drivers_measured_connections_drive_the_autoscaler() {
    let s = setup(&["--signal", "active-conns"]);
    let ip = format!("10.77.{}.10/24", s.m.net.index);
    let out = s.m.cli(&[
        "vm",
        "autoscale",
        "web",
        "--target",
        "2",
        "--min",
        "0",
        "--max",
        "2",
        "--cooldown-up",
        "500ms",
        "--cooldown-down",
        "3s",
        "--ip",
        &ip,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Six connections held open through the VIP: 6 / 2 per replica → 3 replicas.
    let t0 = Instant::now();
    let mut held: Vec<Conn> = (0..6).map(|_| Conn::open(s.vip).unwrap()).collect();
    for c in &mut held {
        assert_eq!(c.cmd("GET k1").unwrap(), "VALUE v1");
    }
    wait_states(
        &s,
        "autoscaled to 2",
        &["running", "running"],
        Duration::from_secs(30),
    );
    eprintln!(
        "6 connections held → 2 clones running: {} ms",
        t0.elapsed().as_millis()
    );
    let why: Vec<String> =
        s.m.events_of("scaled")
            .iter()
            .filter_map(|e| e["detail"].as_str().map(str::to_string))
            .collect();
    assert!(
        why.iter().any(|d| d.starts_with("autoscaler: load 6.0")),
        "{why:?}"
    );
    let gens = (0..2).map(|i| generation_at(s.m.clone_addr(i))).collect();
    reach_all(&s, &gens);
    hostile_reports_change_nothing(&s);
    // Closed: after the down cool-down the count goes back to 0, the clones drain and stop.
    let t1 = Instant::now();
    drop(held);
    wait_states(&s, "autoscaled to 0", &[], Duration::from_secs(30));
    no_clone_process(&s, Duration::from_secs(10));
    eprintln!(
        "connections closed → clones stopped: {} ms",
        t1.elapsed().as_millis()
    );
    let v = s.m.vm("web").unwrap();
    assert_eq!(v["clones"]["desired"], 0, "{v}");
    assert_eq!(s.m.events_of("clone_draining").len(), 2);
}
