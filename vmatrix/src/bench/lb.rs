//! `vmatrix bench lb`: client-visible throughput of a read workload through one service address
//! (the load balancer, `crate::lb`) against the number of replicas behind it, on real KVM,
//! taps, a load balancer's namespace and the kernel's NAT.
//!
//! Set-up: a bridge in this namespace (clients, 10.78.<n>.1/24), a parent VM (`vmatrix run`)
//! with 1000 keys and a snapshot of it, kept running (it is the primary the clones join), 7
//! clones of the snapshot (`vmatrix clone`), and a namespace `vxlb<n>` on the bridge holding
//! the VIP 10.78.<n>.100:7000 (lan0 .4, masquerade). For R = 1, 2, 4, 8 the service has the
//! parent and R - 1 clones, and `--clients` threads of this process read through the VIP for
//! `--secs` seconds: **persistent** (each thread one connection, `GET`s back to back: the
//! balancer only places the connections) and **fresh** (each request its own connection:
//! connect, `GET`, close with a reset, so every request goes through the NAT's placement). The
//! parent alone without the balancer is the baseline.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::lb;

/// Flags of `vmatrix bench lb`.
#[derive(clap::Args, Debug)]
pub struct LbArgs {
    /// The test guest ELF.
    #[arg(
        long,
        default_value = "guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"
    )]
    pub guest: PathBuf,
    /// Replica counts behind the VIP (the parent is one of them).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub replicas: Vec<u32>,
    /// Client threads.
    #[arg(long, default_value_t = 16)]
    pub clients: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("ip(8)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The bridge, the balancer's namespace, the parent's tap, the scratch directory; removed on
/// drop (after the processes, which `Bench` stops first).
struct Env {
    index: u32,
    dir: PathBuf,
    exe: PathBuf,
}

impl Env {
    fn new() -> anyhow::Result<Env> {
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()?;
        let used = String::from_utf8_lossy(&used.stdout).to_string();
        let index = (190..=199)
            .find(|i| !used.contains(&format!(" 10.78.{i}.")))
            .context("no free 10.78.190-199.0/24 subnet")?;
        let env = Env {
            index,
            dir: std::env::temp_dir().join(format!("vmatrix-bench-lb-{}", std::process::id())),
            exe: std::env::current_exe()?,
        };
        std::fs::create_dir_all(&env.dir)?;
        let (br, ns) = (env.bridge(), env.ns());
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "type", "bridge", "forward_delay", "0"])?;
        ip(&["addr", "add", &format!("10.78.{index}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        let tap = format!("vxlp{index}");
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ip(&["link", "set", &tap, "master", &br, "up"])?;
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            &format!("{ns}-l"),
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
        ])?;
        ip(&["-n", &ns, "link", "set", &format!("{ns}-l"), "netns", "1"])?;
        ip(&["link", "set", &format!("{ns}-l"), "master", &br, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.78.{index}.4/24"),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &ns, "link", "set", "lan0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw", s])
                .status()?;
            if !st.success() {
                bail!("sysctl {s} in {ns}");
            }
        }
        Ok(env)
    }

    fn bridge(&self) -> String {
        format!("vxlbr{}", self.index)
    }

    fn ns(&self) -> String {
        format!("vxlb{}", self.index)
    }

    fn addr(&self, host: u32) -> SocketAddrV4 {
        SocketAddrV4::new([10, 78, self.index as u8, host as u8].into(), 7000)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns()]);
        let _ = ip(&["link", "del", &format!("vxlp{}", self.index)]);
        let _ = ip(&["link", "del", &self.bridge()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The parent and the clones; stopped on drop.
struct Vms {
    parent: Child,
    clones: Option<Child>,
}

impl Drop for Vms {
    fn drop(&mut self) {
        for c in self.clones.iter_mut().chain([&mut self.parent]) {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

/// One connection, line protocol.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(a: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn get(&mut self, i: u64, line: &mut String) -> anyhow::Result<()> {
        self.w
            .write_all(format!("GET key{}\n", i % 1000).as_bytes())?;
        line.clear();
        self.r.read_line(line)?;
        if !line.starts_with("VALUE value-") {
            bail!("unexpected answer {line:?}");
        }
        Ok(())
    }
}

fn start_vms(env: &Env, a: &LbArgs) -> anyhow::Result<(Vms, PathBuf)> {
    let disk = env.dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let sock = env.dir.join("parent.sock");
    let i = env.index;
    let parent = Command::new(&env.exe)
        .arg("run")
        .arg("--guest")
        .arg(&a.guest)
        .arg("--disk")
        .arg(&disk)
        .args(["--tap", &format!("vxlp{i}"), "--mem-mib", "64"])
        .args([
            "--guest-config",
            &format!("ip=10.78.{i}.2/24,gw=10.78.{i}.1,port=7000"),
        ])
        .arg("--control")
        .arg(&sock)
        .arg("--console-log")
        .arg(env.dir.join("parent.log"))
        .stderr(Stdio::null())
        .spawn()?;
    let mut vms = Vms {
        parent,
        clones: None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kv = loop {
        match Conn::open(env.addr(2).into()) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => bail!("the parent never answered: {e}"),
        }
    };
    let mut line = String::new();
    for k in 0..1000 {
        kv.w.write_all(format!("SET key{k} value-{k}-{}\n", "x".repeat(64)).as_bytes())?;
        line.clear();
        kv.r.read_line(&mut line)?;
    }
    let snap = env.dir.join("snap");
    let out = Command::new(&env.exe)
        .arg("ctl")
        .arg(&sock)
        .arg("snapshot")
        .arg(&snap)
        .output()?;
    if !out.status.success() {
        bail!("snapshot: {}", String::from_utf8_lossy(&out.stderr));
    }
    let n = a
        .replicas
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    if n > 0 {
        let mut c = Command::new(&env.exe)
            .arg("clone")
            .arg(&snap)
            .args([
                "--clones",
                &n.to_string(),
                "--ip",
                &format!("10.78.{i}.10/24"),
            ])
            .args([
                "--bridge",
                &env.bridge(),
                "--tap-prefix",
                &format!("vxl{i}-"),
            ])
            .arg("--work")
            .arg(env.dir.join("clones"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = BufReader::new(c.stdout.take().context("stdout")?);
        vms.clones = Some(c);
        let summary = out
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("\"clones\""));
        if summary.is_none_or(|s| s.contains("\"ready_ms\":null")) {
            bail!("the clones did not all answer");
        }
    }
    Ok((vms, snap))
}

/// Requests per second of `clients` threads reading from `target` for `secs`.
fn measure(target: SocketAddr, clients: u32, secs: u64, fresh: bool) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut line = String::new();
                let mut i = u64::from(t) * 7919;
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    if fresh || conn.is_none() {
                        let c = Conn::open(target)?;
                        if fresh {
                            // Closed with a reset, not a FIN: no TIME_WAIT on the client, whose
                            // ~28k ports to one VIP:port would otherwise run out within
                            // seconds at these rates (each port waits 60 s before reuse).
                            rustix::net::sockopt::set_socket_linger(&c.w, Some(Duration::ZERO))?;
                        }
                        conn = Some(c);
                    }
                    if let Some(c) = conn.as_mut() {
                        c.get(i, &mut line)?;
                    }
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // warm-up
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (n1, dt) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok((n1 - n0) as f64 / dt)
}

/// Runs the benchmark and prints Markdown.
pub fn run(a: LbArgs) -> anyhow::Result<()> {
    if !a.guest.is_file() {
        bail!(
            "guest ELF {} not found (scripts/build-guest.sh)",
            a.guest.display()
        );
    }
    let env = Env::new()?;
    let (vms, _snap) = start_vms(&env, &a)?;
    let vip = env.addr(100);
    let spec = lb::Spec::new(&format!("bench{}", env.index), vip)
        .netns(&env.ns())
        .vip_dev("lan0");
    let mut svc = lb::Service::create(&spec)?;
    let base_p = measure(env.addr(2).into(), a.clients, a.secs, false)?;
    let base_f = measure(env.addr(2).into(), a.clients, a.secs, true)?;
    println!(
        "Reads (`GET` of 1000 keys, 64 MiB guests) by {} client threads of one process, {} s per \
         figure, through the VIP (nftables DNAT + masquerade in a namespace on the LAN bridge).\n",
        a.clients, a.secs
    );
    println!("| replicas behind the VIP | persistent connections: GET/s | ratio to 1 | fresh connection per GET: GET/s | ratio to 1 |");
    println!("|---:|---:|---:|---:|---:|");
    println!("| parent alone, no balancer | {base_p:.0} | | {base_f:.0} | |");
    let mut first: Option<(f64, f64)> = None;
    let mut servers: Vec<SocketAddrV4> = Vec::new();
    for &r in &a.replicas {
        while (servers.len() as u32) < r {
            let next = match servers.len() {
                0 => env.addr(2),
                k => env.addr(10 + k as u32 - 1),
            };
            svc.add(next, 1)?;
            servers.push(next);
        }
        let p = measure(vip.into(), a.clients, a.secs, false)?;
        let f = measure(vip.into(), a.clients, a.secs, true)?;
        let (p1, f1) = *first.get_or_insert((p, f));
        println!("| {r} | {p:.0} | {:.2} | {f:.0} | {:.2} |", p / p1, f / f1);
    }
    let spread: Vec<String> = svc
        .stats()?
        .iter()
        .map(|s| format!("{} {}", s.server, s.connections))
        .collect();
    println!(
        "\nConnections per server over the fresh runs: {}",
        spread.join(", ")
    );
    drop(svc);
    drop(vms);
    Ok(())
}
