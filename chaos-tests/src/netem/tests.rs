//! The proxy over real loopback UDP sockets: a target that records what arrives and echoes it.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;

const MS: u64 = 1_000_000;

/// Datagrams received, with their arrival times.
type Log = Arc<Mutex<Vec<(Vec<u8>, Instant)>>>;

/// A UDP target on loopback that records each datagram with its arrival time and echoes it.
struct Target {
    addr: SocketAddr,
    got: Log,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    fn start() -> Target {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let addr = s.local_addr().unwrap();
        let got: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (Arc::clone(&got), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    g.lock().unwrap().push((buf[..n].to_vec(), Instant::now()));
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        Target {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// The payloads received so far, as numbers.
    fn received(&self) -> Vec<u32> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| num(p))
            .collect()
    }

    /// Waits until `n` datagrams arrived (or `limit` passed); returns them.
    fn wait_for(&self, n: usize, limit: Duration) -> Vec<u32> {
        let t0 = Instant::now();
        while self.got.lock().unwrap().len() < n && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.received()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn num(p: &[u8]) -> u32 {
    u32::from_be_bytes(p[..4].try_into().unwrap())
}

fn client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    c
}

fn start(target: &Target, imp: LinkImpairment, seed: u64) -> Netem {
    Netem::start("127.0.0.1:0".parse().unwrap(), target.addr, imp, seed).unwrap()
}

/// Receives echoes until `n` came or a receive times out.
fn echoes(c: &UdpSocket, n: usize) -> Vec<(u32, SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < n {
        match c.recv_from(&mut buf) {
            Ok((len, from)) => out.push((num(&buf[..len]), from)),
            Err(_) => break,
        }
    }
    out
}

#[test]
fn a_healthy_link_passes_everything_both_ways_in_order() {
    let t = Target::start();
    let p = start(&t, LinkImpairment::NONE, 1);
    let c = client();
    for i in 0..200u32 {
        c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
    }
    let back = echoes(&c, 200);
    assert_eq!(
        back.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    assert!(back.iter().all(|e| e.1 == p.local_addr()));
    assert_eq!(t.received(), (0..200).collect::<Vec<_>>());
    let k = p.stop();
    assert_eq!((k.forward.received, k.forward.delivered), (200, 200));
    assert_eq!((k.backward.received, k.backward.delivered), (200, 200));
    assert_eq!(k.forward.delivered_bytes, 800);
    assert_eq!((k.sessions, k.send_errors, k.refused), (1, 0, 0));
}

#[test]
fn each_client_gets_its_own_answers() {
    let t = Target::start();
    let p = start(&t, LinkImpairment::NONE, 1);
    let (a, b) = (client(), client());
    for i in 0..20u32 {
        a.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
        b.send_to(&(1000 + i).to_be_bytes(), p.local_addr())
            .unwrap();
    }
    let ea: Vec<u32> = echoes(&a, 20).into_iter().map(|e| e.0).collect();
    let eb: Vec<u32> = echoes(&b, 20).into_iter().map(|e| e.0).collect();
    assert_eq!(ea, (0..20).collect::<Vec<_>>());
    assert_eq!(eb, (1000..1020).collect::<Vec<_>>());
    assert_eq!(p.counters().sessions, 2);
}

#[test]
fn delay_applies_per_direction() {
    let t = Target::start();
    let delay = |ms: u64| Impairment {
        delay_ns: ms * MS,
        ..Impairment::NONE
    };
    let p = start(
        &t,
        LinkImpairment {
            forward: delay(40),
            backward: delay(20),
        },
        1,
    );
    let c = client();
    let mut rtts = Vec::new();
    for i in 0..5u32 {
        let sent = Instant::now();
        c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
        let e = echoes(&c, 1);
        assert_eq!(e.len(), 1);
        rtts.push(sent.elapsed());
        let arrived = t.got.lock().unwrap().last().unwrap().1;
        assert!(arrived - sent >= Duration::from_millis(40), "forward delay");
    }
    for r in &rtts {
        assert!(*r >= Duration::from_millis(60), "{r:?}");
        // Generous: a shared machine can stall a thread for a while.
        assert!(*r < Duration::from_millis(400), "{r:?}");
    }
    // Healed at run time: the next round trip is fast again.
    p.set(LinkImpairment::NONE);
    assert_eq!(p.impairment(), LinkImpairment::NONE);
    let sent = Instant::now();
    c.send_to(&9u32.to_be_bytes(), p.local_addr()).unwrap();
    assert_eq!(echoes(&c, 1).len(), 1);
    assert!(
        sent.elapsed() < Duration::from_millis(40),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn duplicates_arrive_twice_and_are_counted() {
    let t = Target::start();
    let dup = Impairment {
        duplicate_permille: 1000,
        ..Impairment::NONE
    };
    let p = start(&t, LinkImpairment::one_way(Direction::Forward, dup), 1);
    let c = client();
    for i in 0..50u32 {
        c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
    }
    let got = t.wait_for(100, Duration::from_secs(5));
    assert_eq!(got.len(), 100);
    for i in 0..50 {
        assert_eq!(got.iter().filter(|&&x| x == i).count(), 2, "{i}");
    }
    // The answers come back once per copy that arrived, not duplicated again.
    assert_eq!(echoes(&c, 100).len(), 100);
    let k = p.counters();
    assert_eq!(k.forward.duplicated, 50);
    assert_eq!(k.forward.delivered, 100);
    assert_eq!(k.backward.duplicated, 0);
}

#[test]
fn reordering_lets_later_datagrams_overtake() {
    let t = Target::start();
    let reorder = Impairment {
        reorder_permille: 300,
        reorder_delay_ns: 30 * MS,
        ..Impairment::NONE
    };
    let p = start(&t, LinkImpairment::one_way(Direction::Forward, reorder), 3);
    let c = client();
    for i in 0..100u32 {
        c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = t.wait_for(100, Duration::from_secs(5));
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "all arrive once");
    let k = p.counters();
    assert!(k.forward.reordered > 10, "{}", k.forward.reordered);
    let inversions = got.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(inversions > 0, "nothing overtaken: {got:?}");
}

#[test]
fn loss_drops_what_the_model_decides_the_same_for_the_same_seed() {
    let lossy = LinkImpairment::one_way(
        Direction::Forward,
        Impairment {
            loss_permille: 300,
            ..Impairment::NONE
        },
    );
    let run = |seed| {
        let t = Target::start();
        let p = start(&t, lossy, seed);
        let c = client();
        // In batches, each seen by the proxy before the next: the same datagrams in the same
        // order whatever the machine's load.
        for batch in 0..10u32 {
            for i in batch * 30..(batch + 1) * 30 {
                c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
            }
            let t0 = Instant::now();
            while p.counters().forward.received < u64::from(batch + 1) * 30 {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "the proxy lost datagrams"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let k = p.counters();
        let got = t.wait_for((300 - k.forward.dropped) as usize, Duration::from_secs(5));
        assert_eq!(got.len() as u64 + k.forward.dropped, 300);
        assert!(
            (50..130).contains(&k.forward.dropped),
            "{}",
            k.forward.dropped
        );
        got
    };
    let a = run(77);
    assert_eq!(a, run(77));
    assert_ne!(a, run(78));
}

#[test]
fn a_stall_holds_everything_and_the_release_delivers_it_in_order() {
    let t = Target::start();
    let p = start(&t, LinkImpairment::NONE, 1);
    let c = client();
    c.send_to(&0u32.to_be_bytes(), p.local_addr()).unwrap();
    assert_eq!(echoes(&c, 1).len(), 1);
    p.set(LinkImpairment::stalled());
    for i in 1..=20u32 {
        c.send_to(&i.to_be_bytes(), p.local_addr()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(t.received(), vec![0], "nothing passes a stall");
    let k = p.counters();
    assert_eq!((k.forward.held, k.forward.queued), (20, 20));
    let released = Instant::now();
    p.set(LinkImpairment::NONE);
    let got = t.wait_for(21, Duration::from_secs(5));
    assert_eq!(got, (0..=20).collect::<Vec<_>>());
    assert!(released.elapsed() < Duration::from_millis(500));
    assert_eq!(echoes(&c, 20).len(), 20);
    // One direction stalled: the target gets the datagram, its answer is held.
    p.set(LinkImpairment::one_way(
        Direction::Backward,
        Impairment::STALL,
    ));
    c.send_to(&99u32.to_be_bytes(), p.local_addr()).unwrap();
    assert_eq!(t.wait_for(22, Duration::from_secs(5)).len(), 22);
    c.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    assert!(echoes(&c, 1).is_empty(), "the answer is held");
    p.set(LinkImpairment::NONE);
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert_eq!(echoes(&c, 1).first().map(|e| e.0), Some(99));
}

#[test]
fn stop_ends_the_threads_and_returns_the_counters() {
    let t = Target::start();
    let p = start(&t, LinkImpairment::stalled(), 1);
    let addr = p.local_addr();
    let c = client();
    for i in 0..5u32 {
        c.send_to(&i.to_be_bytes(), addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    let k = p.stop();
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!(k.forward.held, 5);
    // The port is free again.
    UdpSocket::bind(addr).unwrap();
}
