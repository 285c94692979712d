//! One address for the service (`vmatrix lb`, issue 11 part 2a), on real KVM, taps, network
//! namespaces and the kernel's NAT: a VM and three clones behind a VIP that a load balancer's
//! namespace on the clients' LAN holds (`scripts/lb-net.sh`); 40 fresh connections land on all
//! four and read the parent's data; a connection opened before a scale-up and one open on a
//! clone being drained keep working until closed; a client loop through the VIP sees no error
//! while clones are added, drained and stopped; bad input and a missing nft are clear errors.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::lb::{client_loop, Conn, LbNet};
use support::*;

/// `vmatrix lb <args>`; panics unless it succeeds; its stdout.
fn lb(args: &[&str]) -> String {
    let out = lb_output(args);
    assert!(
        out.status.success(),
        "vmatrix lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lb_output(args: &[&str]) -> Output {
    Command::new(vmatrix_bin())
        .arg("lb")
        .args(args)
        .output()
        .expect("run vmatrix lb")
}

/// A running `vmatrix clone` group and the clones it printed.
struct Group {
    child: Child,
    clones: Vec<serde_json::Value>,
}

impl Group {
    /// `n` clones of `image` from 10.77.<index>.<first>, names `<prefix><i>`, taps `<prefix>t<i>`.
    fn start(net: &TestNet, image: &Path, n: u32, first: u32, prefix: &str, work: &Path) -> Group {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.ns()])
            .arg(vmatrix_bin())
            .arg("clone")
            .arg(image)
            .args(["--clones", &n.to_string(), "--bridge", "br0"])
            .args(["--ip", &format!("10.77.{}.{first}/24", net.index)])
            .args([
                "--name-prefix",
                prefix,
                "--tap-prefix",
                &format!("{prefix}t"),
            ])
            .arg("--work")
            .arg(work)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vmatrix clone");
        let out = BufReader::new(child.stdout.take().unwrap());
        // Stopped on drop, whatever happens next.
        let mut g = Group {
            child,
            clones: Vec::new(),
        };
        for line in out.lines() {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
            if v.get("clones").is_some() {
                assert!(
                    v["ready_ms"].as_f64().is_some(),
                    "every clone answered: {v}"
                );
                return g;
            }
            g.clones.push(v);
        }
        panic!("vmatrix clone ended early");
    }

    /// `ip:7000` of clone `i`.
    fn server(&self, i: usize) -> String {
        format!("{}:7000", self.clones[i]["ip"].as_str().unwrap())
    }

    fn generation(&self, i: usize) -> String {
        self.clones[i]["generation"].to_string()
    }

    fn control(&self, i: usize) -> String {
        self.clones[i]["control"].as_str().unwrap().to_string()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Per-server stats lines of `vmatrix lb stats`, by server.
fn stats(name: &str, ns: &str) -> BTreeMap<String, serde_json::Value> {
    lb(&["stats", "--name", name, "--netns", ns])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["server"].as_str().unwrap().to_string(), v))
        .collect()
}

/// `vmatrix lb create` of service `name` in `ns` with `vip` on `lan0`.
fn lb_create(name: &str, ns: &str, vip: &str) {
    let args = ["create", "--name", name, "--netns", ns, "--vip", vip];
    lb(&[&args[..], &["--vip-dev", "lan0"]].concat());
}

/// The service under test: its name, the balancer's namespace and the VIP.
struct Svc {
    name: String,
    ns: String,
    vip: SocketAddr,
}

impl Svc {
    /// `vmatrix lb create` of `10.77.<index>.100:7000` in `ns`, then `add` of `servers`.
    fn create(index: u32, ns: &str, servers: &[String]) -> Svc {
        let name = format!("t{index}");
        let vip_s = format!("10.77.{index}.100:7000");
        lb_create(&name, ns, &vip_s);
        lb(&[
            "add",
            "--name",
            &name,
            "--netns",
            ns,
            "--server",
            &servers.join(","),
        ]);
        Svc {
            name,
            ns: ns.to_string(),
            vip: vip_s.parse().unwrap(),
        }
    }

    fn stats(&self) -> BTreeMap<String, serde_json::Value> {
        stats(&self.name, &self.ns)
    }
}

/// A VM with 20 keys and its snapshot: (process, client, generation, snapshot directory).
fn parent_with_snapshot(net: &TestNet, dir: &Path) -> (VmProc, KvClient, String, PathBuf) {
    let setup: Vec<String> = (0..20).map(|i| format!("SET k{i} v{i}")).collect();
    let (vm, mut parent, snap) = vm_with_snapshot(net, dir, &setup);
    let parent_gen = field(&parent.cmd("STATS").unwrap(), "generation").unwrap();
    (vm, parent, parent_gen, snap)
}

/// 40 fresh connections land on all of `servers` (their generations `gens`), 10 each (round
/// robin), with the parent's data; the balancer's stats count them.
fn forty_connections_spread(svc: &Svc, servers: &[String], gens: HashSet<String>) {
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..40 {
        let mut c = Conn::open(svc.vip).expect("connect through the VIP");
        assert_eq!(
            c.cmd(&format!("GET k{}", i % 20)).unwrap(),
            format!("VALUE v{}", i % 20)
        );
        *seen.entry(c.generation()).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        gens,
        "{seen:?}"
    );
    assert!(seen.values().all(|&n| n == 10), "round robin: {seen:?}");
    let st = svc.stats();
    for s in servers {
        assert_eq!(st[s]["connections"], 10, "{s}: {}", st[s]);
        assert_eq!(st[s]["weight"], 1);
        assert!(st[s]["packets"].as_u64().unwrap() >= 60, "{}", st[s]);
    }
}

/// One more clone added: an open connection stays on its VM, the new clone gets new ones.
fn scale_up(svc: &Svc, long: &mut Conn, g2: &Group) {
    let long_gen = long.generation();
    lb(&[
        "add",
        "--name",
        &svc.name,
        "--netns",
        &svc.ns,
        "--server",
        &g2.server(0),
    ]);
    assert_eq!(
        long.cmd("GET k2").unwrap(),
        "VALUE v2",
        "open across the scale-up"
    );
    assert_eq!(long.generation(), long_gen, "still on the same VM");
    // (the client loop's connections take turns in the round robin too: vary the pace so the
    // two do not fall into step)
    let mut gens = Vec::new();
    while gens.len() < 60 && !gens.contains(&g2.generation(0)) {
        gens.push(Conn::open(svc.vip).unwrap().generation());
        std::thread::sleep(Duration::from_millis(gens.len() as u64 % 7));
    }
    assert!(
        gens.contains(&g2.generation(0)),
        "the new clone {} gets new connections: {gens:?}, {:?}",
        g2.generation(0),
        svc.stats()
    );
}

/// A connection on clone `i` of `g`, then that clone drained: no new connection goes there,
/// the open one works until closed, then the drain ends and the clone is stopped.
fn drain_one(svc: &Svc, g: &Group, i: usize) {
    let mut on_victim = (0..60)
        .map(|n| {
            std::thread::sleep(Duration::from_millis(n % 7));
            Conn::open(svc.vip).unwrap()
        })
        .find_map(|mut c| (c.generation() == g.generation(i)).then_some(c))
        .expect("a connection on the clone");
    let drain = Command::new(vmatrix_bin())
        .args(["lb", "drain", "--name", &svc.name, "--netns", &svc.ns])
        .args(["--server", &g.server(i), "--timeout-ms", "20000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while svc.stats()[&g.server(i)]["weight"] != 0 {
        assert!(Instant::now() < until, "drain never set weight 0");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..12 {
        let gen = Conn::open(svc.vip).unwrap().generation();
        assert_ne!(gen, g.generation(i), "draining");
    }
    let open = on_victim.cmd("GET k3").unwrap();
    assert_eq!(open, "VALUE v3", "open during the drain");
    drop(on_victim);
    let out = drain.wait_with_output().unwrap();
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("drain's line");
    assert_eq!(d["drained"], true, "{d}");
    assert!(
        !svc.stats().contains_key(&g.server(i)),
        "removed after the drain"
    );
    ctl(Path::new(&g.control(i)), &["stop"]);
    std::thread::sleep(Duration::from_millis(300));
}

/// `lb delete`: the VIP and the table are gone.
fn delete(svc: &Svc, index: u32) {
    lb(&["delete", "--name", &svc.name, "--netns", &svc.ns]);
    let addrs = Command::new("ip")
        .args(["-n", &svc.ns, "-o", "addr", "show", "dev", "lan0"])
        .output()
        .unwrap();
    let vip = format!("10.77.{index}.100");
    assert!(!String::from_utf8_lossy(&addrs.stdout).contains(&vip));
    let e = lb_output(&["stats", "--name", &svc.name, "--netns", &svc.ns]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("no load-balancer service"));
}

#[test]
fn a_vip_spreads_new_connections_and_scales_without_a_client_error() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _parent, parent_gen, snap) = parent_with_snapshot(&net, dir.path());
    let lbnet = LbNet::up(net.index, "br0", Some(&net.ns()));
    let g = Group::start(&net, &snap, 3, 10, "c", &dir.path().join("w1"));

    // The service: the parent and its three clones behind 10.77.<index>.100:7000.
    let all = [
        net.guest_addr().to_string(),
        g.server(0),
        g.server(1),
        g.server(2),
    ];
    let svc = Svc::create(net.index, &lbnet.ns, &all);
    let gens = [
        parent_gen,
        g.generation(0),
        g.generation(1),
        g.generation(2),
    ];
    forty_connections_spread(&svc, &all, gens.into());

    // A long-lived connection from before the scale-up, and a client loop all along.
    let mut long = Conn::open(svc.vip).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let loop_h = client_loop(svc.vip, stop.clone());
    let g2 = Group::start(&net, &snap, 1, 13, "u", &dir.path().join("w2"));
    scale_up(&svc, &mut long, &g2);
    drain_one(&svc, &g, 2);

    stop.store(true, Ordering::SeqCst);
    let (ok, errors, slowest) = loop_h.join().unwrap();
    eprintln!("client loop: {ok} requests, slowest {slowest:?}, errors {errors:?}");
    assert!(
        errors.is_empty(),
        "no client error during scale up and down: {errors:?}"
    );
    assert!(ok >= 20, "the loop ran: {ok}");
    assert_eq!(long.cmd("GET k4").unwrap(), "VALUE v4", "open until closed");
    delete(&svc, net.index);
    drop(g2);
    drop(g);
    vm.kill9();
}

#[test]
fn a_crashed_runs_service_is_replaced_by_the_next_create() {
    let net = TestNet::new();
    let lbnet = LbNet::up(net.index, "br0", Some(&net.ns()));
    let ns = lbnet.ns.as_str();
    let name = format!("r{}", net.index);
    lb_create(&name, ns, &format!("10.77.{}.101:7000", net.index));
    let weight3 = ["--server", "10.77.9.9:7000", "--weight", "3"];
    lb(&[&["add", "--name", &name, "--netns", ns][..], &weight3].concat());
    // (the creating process is gone: its service stays in the kernel, as after a crash)
    lb_create(&name, ns, &format!("10.77.{}.102:7000", net.index));
    assert!(
        stats(&name, ns).is_empty(),
        "the leftover's servers are gone"
    );
    let addrs = Command::new("ip")
        .args(["-n", ns, "-o", "addr", "show", "dev", "lan0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        !addrs.contains(&format!("10.77.{}.101/32", net.index)),
        "{addrs}"
    );
    assert!(
        addrs.contains(&format!("10.77.{}.102/32", net.index)),
        "{addrs}"
    );
    lb(&["delete", "--name", &name, "--netns", ns]);
}

#[test]
fn bad_input_and_a_missing_nft_are_clear_errors() {
    let err = |args: &[&str]| {
        let out = lb_output(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["create", "--name", "x", "--vip", "not-an-address"]);
    assert!(
        e.contains("\"not-an-address\" is not an IPv4 address with a port"),
        "{e}"
    );
    let e = err(&["create", "--name", "x", "--vip", "10.0.0.1"]);
    assert!(e.contains("is not an IPv4 address with a port"), "{e}");
    let e = err(&["create", "--name", "x", "--vip", "0.0.0.0:80"]);
    assert!(e.contains("unicast"), "{e}");
    let e = err(&["create", "--name", "Bad Name!", "--vip", "10.0.0.1:80"]);
    assert!(e.contains("service name"), "{e}");
    let e = err(&[
        "create",
        "--name",
        "x",
        "--vip",
        "10.0.0.1:80",
        "--scheduler",
        "wlc",
    ]);
    assert!(e.contains("rr (weighted round robin) or random"), "{e}");
    let e = err(&[
        "add",
        "--name",
        "x",
        "--server",
        "10.0.0.1:80",
        "--weight",
        "1000",
    ]);
    assert!(e.contains("weight"), "{e}");
    let e = err(&[
        "stats",
        "--name",
        "nosuchservice",
        "--netns",
        "vmx-no-such-ns",
    ]);
    assert!(
        e.contains("network namespace \"vmx-no-such-ns\" does not exist"),
        "{e}"
    );
    let e = err(&["stats", "--name", "nosuchservice"]);
    assert!(
        e.contains("no load-balancer service \"nosuchservice\""),
        "{e}"
    );

    // nft missing: a PATH with ip(8) only.
    let bin = tempfile::tempdir().unwrap();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    std::os::unix::fs::symlink(ip, bin.path().join("ip")).unwrap();
    let out = Command::new(vmatrix_bin())
        .args(["lb", "create", "--name", "x", "--vip", "10.0.0.1:80"])
        .env("PATH", bin.path())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("nft not found on PATH") && e.contains("nftables"),
        "{e}"
    );
}
