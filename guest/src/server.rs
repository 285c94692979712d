//! The TCP key-value server on smoltcp: a pool of listening sockets, line framing, group
//! commit of SETs to the disk log, and responses held until the batch that produced them is
//! durable.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use smoltcp::iface::{Config as IfConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::churn::Churn;
use crate::config::Config;
use crate::kv::{self, Request, Store};
use crate::kvlog::{AppendError, Log};
use crate::net::VirtioNet;
use crate::platform;

const SOCKETS: usize = 64;
const RX_BUF: usize = 4096;
const TX_BUF: usize = 16384;
const MAX_LINE: usize = 600;
const MAX_OUT: usize = 64 * 1024;

/// A response waiting for the end of the round.
enum Held {
    Bytes(Vec<u8>),
    /// `OK` once batch `n` is durable, `ERR` if it failed.
    SetOk(u64),
    /// A GET that read a value written by batch `batch`, not yet durable: `now` if the batch
    /// commits, `before` (the value before the batch) if it fails and is rolled back.
    Get {
        batch: u64,
        now: Vec<u8>,
        before: Vec<u8>,
    },
}

fn value_reply(v: Option<&[u8]>) -> Vec<u8> {
    match v {
        Some(v) => [b"VALUE ", v, b"\n"].concat(),
        None => b"NOTFOUND\n".to_vec(),
    }
}

struct Conn {
    handle: SocketHandle,
    inbuf: Vec<u8>,
    held: Vec<Held>,
    out: Vec<u8>,
}

/// Counters reported by `STATS`.
#[derive(Default)]
struct Stats {
    sets: u64,
    gets: u64,
    commits: u64,
    failed_commits: u64,
    rounds: u64,
}

/// The server and everything it owns.
pub struct Server {
    iface: Interface,
    net: VirtioNet,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    port: u16,
    store: Store,
    log: Log,
    churn: Churn,
    batch_no: u64,
    failed_batches: Vec<u64>,
    stats: Stats,
    /// Target of DISKREAD: allocated (and zeroed) once at boot, then written only by the device.
    diskbuf: Vec<u8>,
    /// Our address, re-announced when we find ourselves in a new VMM process.
    ip: core::net::Ipv4Addr,
    /// The VMM incarnation we last announced in.
    incarnation: u64,
    /// The generation word we took our identity in.
    generation: u64,
}

/// The interface: our MAC and address, the default route, a random seed from the generation,
/// the clock and the host TSC (so two clones of one checkpoint never share TCP sequence
/// numbers or ports).
fn make_iface(net: &mut VirtioNet, cfg: &Config, generation: u64) -> Interface {
    let mut ic = IfConfig::new(HardwareAddress::Ethernet(EthernetAddress(net.mac)));
    ic.random_seed = platform::clock_ns()
        ^ generation.rotate_left(17)
        ^ platform::tsc().rotate_left(41)
        ^ 0x5eed;
    let mut iface = Interface::new(ic, net, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(cfg.ip.into(), cfg.prefix));
    });
    if let Some(gw) = cfg.gw {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    iface
}

/// The pool of sockets, listening on `port` at once (a SYN handled in the same round as a
/// re-identification finds a listener, not a reset).
fn make_sockets(port: u16) -> (SocketSet<'static>, Vec<Conn>) {
    let mut sockets = SocketSet::new(Vec::new());
    let mut conns = Vec::new();
    for _ in 0..SOCKETS {
        let handle = sockets.add(listening_socket(port));
        conns.push(Conn {
            handle,
            inbuf: Vec::new(),
            held: Vec::new(),
            out: Vec::new(),
        });
    }
    (sockets, conns)
}

/// A TCP socket listening on `port`, with its own (zeroed) buffers.
fn listening_socket(port: u16) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; RX_BUF]),
        tcp::SocketBuffer::new(vec![0u8; TX_BUF]),
    );
    // A request/response service: answers leave at once, not after the client's (possibly
    // delayed) ACK of the previous answer.
    s.set_nagle_enabled(false);
    let _ = s.listen(port);
    s
}

/// Mean ns per exit of `n` MMIO reads (platform magic) and `n` port reads (COM1 LSR).
fn exit_bench(n: u32) -> (u64, u64) {
    let t0 = platform::clock_ns();
    for _ in 0..n {
        let _ = crate::io::read32(crate::layout::PLATFORM);
    }
    let t1 = platform::clock_ns();
    for _ in 0..n {
        let _ = crate::io::inb(crate::layout::SERIAL_PORT + 5);
    }
    let t2 = platform::clock_ns();
    ((t1 - t0) / u64::from(n), (t2 - t1) / u64::from(n))
}

fn now() -> Instant {
    Instant::from_micros((platform::clock_ns() / 1000) as i64)
}

impl Server {
    /// Builds the interface and the socket pool.
    pub fn new(mut net: VirtioNet, cfg: &Config, store: Store, log: Log) -> Self {
        let generation = platform::generation_word();
        let iface = make_iface(&mut net, cfg, generation);
        let (sockets, conns) = make_sockets(cfg.port);
        Server {
            iface,
            net,
            sockets,
            conns,
            port: cfg.port,
            store,
            log,
            churn: Churn::default(),
            batch_no: 0,
            failed_batches: Vec::new(),
            stats: Stats::default(),
            diskbuf: vec![0u8; 128 * 512],
            ip: cfg.ip,
            incarnation: platform::incarnation(),
            generation,
        }
    }

    /// A new generation: this is a clone (or a VM restored as one). Before anything else goes
    /// out, take the new identity: re-read the config string (IP, gateway, port) and the MAC,
    /// rebuild the interface with a new random seed (TCP initial sequence numbers, ports),
    /// drop every connection and half-done request of the parent (they belong to the parent's
    /// clients; they are dropped silently: a reset would go to them from our new address),
    /// then announce the new address. The KV data stays: a clone serves the parent's state as
    /// of its checkpoint, and its own writes are its own.
    fn reidentify(&mut self, generation: u64) {
        self.generation = generation;
        let text = platform::config();
        let cfg = match crate::config::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                crate::println!(
                    "vmatrix-guest: bad config '{}' in the new generation: {}",
                    text,
                    e
                );
                platform::exit(3)
            }
        };
        let m = self.net.reread_mac();
        let peers = self.peers(&cfg);
        self.iface = make_iface(&mut self.net, &cfg, generation);
        self.drop_connections(cfg.port);
        self.port = cfg.port;
        self.ip = cfg.ip;
        self.churn = Churn::default();
        self.incarnation = platform::incarnation();
        crate::io::console_reprobe();
        self.announce(cfg.ip);
        // The new interface knows no neighbour: ask at once for those the parent talked to (a
        // load balancer's address, the gateway), so a first answer does not wait for an ARP
        // round trip (~2.6 ms measured) after the first request.
        for p in peers {
            self.arp_request(cfg.ip, p);
        }
        self.net.flush();
        // (After the frames: even through the platform device a line costs a VM exit.)
        crate::println!(
            "vmatrix-guest: generation {}: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {}/{} port {}",
            generation, m[0], m[1], m[2], m[3], m[4], m[5], cfg.ip, cfg.prefix, cfg.port
        );
    }

    /// The on-link addresses the parent's connections came from, and the gateway: at most 8.
    fn peers(&self, cfg: &crate::config::Config) -> Vec<core::net::Ipv4Addr> {
        let net = IpCidr::new(cfg.ip.into(), cfg.prefix);
        let mut out: Vec<core::net::Ipv4Addr> = cfg.gw.into_iter().collect();
        for c in &self.conns {
            let s = self.sockets.get::<tcp::Socket>(c.handle);
            if let Some(smoltcp::wire::IpEndpoint {
                addr: smoltcp::wire::IpAddress::Ipv4(a),
                ..
            }) = s.remote_endpoint()
            {
                if net.contains_addr(&a.into()) && a != cfg.ip && !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out.truncate(8);
        out
    }

    /// Drops every connection (and half-done request) silently. A socket still listening on
    /// the same port holds nothing of anyone's and is kept: replacing all 64 sockets wrote
    /// 1.3 MiB of fresh buffers, each page a copy-on-write fault of a clone's memory, about
    /// 10 ms before a clone's first answer.
    fn drop_connections(&mut self, port: u16) {
        for c in &mut self.conns {
            let keep = port == self.port
                && self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen;
            if !keep {
                self.sockets.remove(c.handle);
                c.handle = self.sockets.add(listening_socket(port));
            }
            c.inbuf = Vec::new();
            c.held = Vec::new();
            c.out = Vec::new();
        }
    }

    /// Broadcasts a gratuitous ARP so neighbours (and a switch after a failover or restore)
    /// learn where this address lives now.
    pub fn announce(&mut self, ip: core::net::Ipv4Addr) {
        self.arp_request(ip, ip);
        self.net.flush();
    }

    /// Queues a broadcast ARP request for `target` from `ip` (a gratuitous one if the same).
    fn arp_request(&mut self, ip: core::net::Ipv4Addr, target: core::net::Ipv4Addr) {
        use smoltcp::phy::{Device, TxToken};
        let mac = self.net.mac;
        if let Some(tx) = self.net.transmit(now()) {
            tx.consume(42, |f| {
                f[0..6].fill(0xff);
                f[6..12].copy_from_slice(&mac);
                f[12..14].copy_from_slice(&[0x08, 0x06]);
                // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request)
                f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f[22..28].copy_from_slice(&mac);
                f[28..32].copy_from_slice(&ip.octets());
                f[32..38].fill(0);
                f[38..42].copy_from_slice(&target.octets());
            });
        }
    }

    /// Serves forever.
    pub fn run(&mut self) -> ! {
        loop {
            let progress = self.round();
            if !progress {
                // Restored or failed over into a new VMM (maybe on another host): tell the
                // network where our address lives now, before clients retransmit into the void.
                let inc = platform::incarnation();
                if inc != self.incarnation {
                    self.incarnation = inc;
                    crate::io::console_reprobe();
                    self.announce(self.ip);
                }
                let t = now();
                let mut wait_us = self
                    .iface
                    .poll_delay(t, &self.sockets)
                    .map_or(100_000, |d| d.total_micros())
                    .min(100_000);
                if self.churn.active() {
                    wait_us = wait_us.min(1000);
                }
                if wait_us > 0 {
                    platform::wait(wait_us * 1000);
                }
            }
        }
    }

    fn commit(&mut self) {
        if self.log.pending() == 0 {
            return;
        }
        match self.log.commit() {
            Ok(()) => {
                self.store.committed();
                self.stats.commits += 1;
            }
            Err(e) => {
                crate::println!("kv: log commit failed: {:?}; batch rolled back", e);
                self.store.rollback();
                self.failed_batches.push(self.batch_no);
                self.stats.failed_commits += 1;
            }
        }
        self.batch_no += 1;
    }

    fn handle_line(&mut self, i: usize, line: &[u8]) {
        let resp = match kv::parse(line) {
            Ok(Request::Set(k, v)) => {
                let mut r = self.log.append(k, v);
                if r == Err(AppendError::BatchFull) {
                    self.commit();
                    r = self.log.append(k, v);
                }
                match r {
                    Ok(()) => {
                        self.store.set(k, v);
                        self.stats.sets += 1;
                        Held::SetOk(self.batch_no)
                    }
                    Err(_) => Held::Bytes(b"ERR disk full\n".to_vec()),
                }
            }
            Ok(Request::Get(k)) => {
                self.stats.gets += 1;
                let now = value_reply(self.store.get(k));
                match self.store.before_batch(k) {
                    // Read-your-writes only once they are durable.
                    Some(before) => Held::Get {
                        batch: self.batch_no,
                        now,
                        before: value_reply(before),
                    },
                    None => Held::Bytes(now),
                }
            }
            Ok(Request::Count) => {
                Held::Bytes(alloc::format!("COUNT {}\n", self.store.len()).into_bytes())
            }
            Ok(Request::Churn(p, r)) => {
                Held::Bytes(match self.churn.set(p, r, platform::clock_ns()) {
                    Ok(()) => b"OK\n".to_vec(),
                    Err(e) => alloc::format!("ERR {e}\n").into_bytes(),
                })
            }
            Ok(Request::Stats) => {
                let mut s = alloc::string::String::new();
                let _ = writeln!(
                    s,
                    "STATS keys={} sets={} gets={} commits={} failed_commits={} rounds={} log_tail={} churned={} rx={} tx={} heap={} uptime_ms={} generation={} clock={}",
                    self.store.len(), self.stats.sets, self.stats.gets, self.stats.commits,
                    self.stats.failed_commits, self.stats.rounds, self.log.tail(), self.churn.done(),
                    self.net.rx_frames, self.net.tx_frames, crate::rt::heap_used(),
                    platform::clock_ns() / 1_000_000, self.generation, platform::clock_source()
                );
                Held::Bytes(s.into_bytes())
            }
            Ok(Request::DiskRead(sector, count)) => {
                let len = count as usize * 512;
                Held::Bytes(match self.log.read_raw(sector, &mut self.diskbuf[..len]) {
                    Ok(()) => {
                        // The device wrote the buffer during the doorbell exit; device
                        // accesses are compiler barriers (see io.rs), so this reads fresh data.
                        let crc = crc32fast::hash(&self.diskbuf[..len]);
                        alloc::format!("DISKREAD crc={crc:#010x}\n").into_bytes()
                    }
                    Err(e) => alloc::format!("ERR disk read failed: {e:?}\n").into_bytes(),
                })
            }
            Ok(Request::Layout) => {
                let (rx, rxlen) = self.net.rx_region();
                Held::Bytes(
                    alloc::format!(
                        "LAYOUT rxbuf={:#x}+{} diskbuf={:#x}+{}\n",
                        rx,
                        rxlen,
                        self.diskbuf.as_ptr() as u64,
                        self.diskbuf.len()
                    )
                    .into_bytes(),
                )
            }
            Ok(Request::ExitBench(n)) => {
                let (mmio, pio) = exit_bench(n);
                Held::Bytes(
                    alloc::format!("EXITBENCH n={n} mmio_ns={mmio} pio_ns={pio}\n").into_bytes(),
                )
            }
            Err(e) => Held::Bytes(alloc::format!("ERR {e}\n").into_bytes()),
        };
        self.conns[i].held.push(resp);
    }

    /// Receives and parses what the sockets have: returns true if anything happened.
    fn intake(&mut self) -> bool {
        let mut progress = self.iface.poll(now(), &mut self.net, &mut self.sockets)
            == PollResult::SocketStateChanged;
        for i in 0..self.conns.len() {
            let h = self.conns[i].handle;
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Closed {
                let c = &mut self.conns[i];
                c.inbuf.clear();
                c.held.clear();
                c.out.clear();
                let _ = s.listen(self.port);
                continue;
            }
            if s.can_recv() && self.conns[i].out.len() < MAX_OUT {
                let inbuf = &mut self.conns[i].inbuf;
                let _ = s.recv(|b| {
                    inbuf.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            while let Some(nl) = self.conns[i].inbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.conns[i].inbuf.drain(..=nl).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.handle_line(i, &line);
                progress = true;
            }
            if self.conns[i].inbuf.len() > MAX_LINE {
                self.conns[i].inbuf.clear();
                self.conns[i]
                    .held
                    .push(Held::Bytes(b"ERR line too long\n".to_vec()));
            }
        }
        progress
    }

    /// One pass over the network, the sockets and the log. Returns true if anything happened.
    fn round(&mut self) -> bool {
        // First, before anything is received or sent: are we a clone now? (A memory read, no
        // VM exit; the VMM changed the word before this vCPU ran.)
        let g = platform::generation_word();
        if g != self.generation {
            self.reidentify(g);
        }
        self.stats.rounds += 1;
        let mut progress = self.intake();
        // Group commit: requests that arrived while this round's were parsed join its batch
        // (a second look costs no VM exit when nothing came) — fewer flushes per SET.
        if self.log.pending() > 0 {
            progress |= self.intake();
        }
        self.commit();
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            for h in c.held.drain(..) {
                match h {
                    Held::Bytes(b) => c.out.extend_from_slice(&b),
                    Held::SetOk(n) if self.failed_batches.contains(&n) => {
                        c.out.extend_from_slice(b"ERR disk write failed\n")
                    }
                    Held::SetOk(_) => c.out.extend_from_slice(b"OK\n"),
                    Held::Get { batch, before, .. } if self.failed_batches.contains(&batch) => {
                        c.out.extend_from_slice(&before)
                    }
                    Held::Get { now, .. } => c.out.extend_from_slice(&now),
                }
            }
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !c.out.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(&c.out) {
                    c.out.drain(..n);
                    progress |= n > 0;
                }
            }
            if s.state() == tcp::State::CloseWait && c.out.is_empty() && c.inbuf.is_empty() {
                s.close();
            }
        }
        self.failed_batches.clear();
        if self.iface.poll(now(), &mut self.net, &mut self.sockets)
            == PollResult::SocketStateChanged
        {
            progress = true;
        }
        self.net.flush();
        self.churn.step(platform::clock_ns());
        progress
    }
}
