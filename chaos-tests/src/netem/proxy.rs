//! The UDP proxy: datagrams from clients to one target and back, each direction through a
//! [`Pipe`] of the impairment model, on plain threads (usable from async and sync code alike).
//!
//! Each client address (the routed host's QUIC socket, say) gets its own upstream socket,
//! bound to the listening address's IP and connected to the target, so the target's answers
//! find their way back to that client. Threads: one receives from clients, one per client
//! receives from the target, and each sends at once what its arrival made due (nothing
//! impaired: a datagram goes straight through); one more sends what is due later (delayed,
//! released), woken by a condition variable. They share one lock; per direction one thread at
//! a time sends, so datagrams leave in the model's order. Idle clients are forgotten after
//! [`SESSION_IDLE`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::model::{DirectionCounters, LinkImpairment, Pipe};

/// A client that sent nothing and received nothing for this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(120);
/// Most clients at once; datagrams of more are dropped (and counted).
pub const MAX_SESSIONS: usize = 256;
/// How often blocked receives look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Largest datagram.
const MAX_DATAGRAM: usize = 65_536;
/// The backward direction's seed is the forward one's with this mixed in.
const BACKWARD_SEED: u64 = 0xd1b5_4a32_d192_ed03;
/// Socket buffers asked for (the kernel caps them at `net.core.rmem_max`/`wmem_max`): a
/// burst of QUIC datagrams must reach the model, not overflow the default ~200 KiB buffer
/// while a proxy thread waits for the CPU.
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with large buffers and the receive timeout [`POLL`].
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(POLL))?;
    Ok(s)
}

/// What the proxy did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Clients → target.
    pub forward: DirectionCounters,
    /// Target → clients.
    pub backward: DirectionCounters,
    /// Clients seen (sessions opened).
    pub sessions: u64,
    /// Datagrams from clients beyond [`MAX_SESSIONS`], dropped.
    pub refused: u64,
    /// Sends that failed (the target not listening, say); the datagram is gone.
    pub send_errors: u64,
}

/// One client: its address and the socket that talks to the target for it.
struct Session {
    client: SocketAddr,
    upstream: UdpSocket,
    last_ns: AtomicU64,
    closed: AtomicBool,
}

/// A datagram going to the target, with the session that sends it.
#[derive(Clone)]
struct Forward(Arc<Session>, Vec<u8>);

/// A datagram going back to a client.
#[derive(Clone)]
struct Backward(SocketAddr, Vec<u8>);

struct State {
    forward: Pipe<Forward>,
    backward: Pipe<Backward>,
    /// A thread is sending what it took from that direction (forward, backward): only it
    /// takes more, so datagrams leave in the pipe's order.
    busy: [bool; 2],
    sessions: HashMap<SocketAddr, Arc<Session>>,
    threads: Vec<JoinHandle<()>>,
    opened: u64,
    refused: u64,
    send_errors: u64,
}

struct Inner {
    listen: UdpSocket,
    target: SocketAddr,
    start: Instant,
    stop: AtomicBool,
    state: Mutex<State>,
    wake: Condvar,
}

impl Inner {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a proxy thread must not hide the counters: the state stays consistent
        // (every update is a few assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// A running link-degradation proxy: clients send to [`Netem::local_addr`], it forwards to the
/// target through the impairment, and the target's answers come back the same way.
///
/// Stopped by [`Netem::stop`] or when dropped.
pub struct Netem {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
}

impl std::fmt::Debug for Netem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netem")
            .field("local", &self.local)
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl Netem {
    /// Listens on `listen` (port 0 picks one: see [`Netem::local_addr`]) and forwards to
    /// `target` through `impairment`, its decisions drawn from `seed` (the same seed and the
    /// same datagrams give the same decisions: see [`super::model`]).
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        impairment: LinkImpairment,
        seed: u64,
    ) -> io::Result<Netem> {
        let socket = bind(listen)?;
        let local = socket.local_addr()?;
        let inner = Arc::new(Inner {
            listen: socket,
            target,
            start: Instant::now(),
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                forward: Pipe::new(seed, impairment.forward),
                backward: Pipe::new(seed ^ BACKWARD_SEED, impairment.backward),
                busy: [false; 2],
                sessions: HashMap::new(),
                threads: Vec::new(),
                opened: 0,
                refused: 0,
                send_errors: 0,
            }),
            wake: Condvar::new(),
        });
        let mut netem = Netem {
            inner,
            threads: Vec::new(),
            local,
        };
        let i = Arc::clone(&netem.inner);
        netem
            .threads
            .push(spawn("netem-listen", move || listen_loop(&i))?);
        let i = Arc::clone(&netem.inner);
        netem
            .threads
            .push(spawn("netem-send", move || send_loop(&i))?);
        Ok(netem)
    }

    /// Where clients send (the address a route points at).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where datagrams go.
    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    /// Changes the impairment of both directions for datagrams arriving from now on; a
    /// direction whose `stall` is cleared releases what it held.
    pub fn set(&self, impairment: LinkImpairment) {
        let mut st = self.inner.lock();
        st.forward.set(impairment.forward);
        st.backward.set(impairment.backward);
        drop(st);
        self.inner.wake.notify_all();
    }

    /// The impairment in force.
    pub fn impairment(&self) -> LinkImpairment {
        let st = self.inner.lock();
        LinkImpairment {
            forward: st.forward.impairment(),
            backward: st.backward.impairment(),
        }
    }

    /// What it did so far.
    pub fn counters(&self) -> Counters {
        counters(&self.inner.lock())
    }

    /// Nanoseconds since it started: the clock of [`DirectionCounters::last_received_ns`].
    pub fn elapsed_ns(&self) -> u64 {
        self.inner.now()
    }

    /// Stops every thread (within ~20 ms), drops what was queued, and returns the counters.
    pub fn stop(mut self) -> Counters {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Counters {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let sessions = std::mem::take(&mut self.inner.lock().threads);
        for t in sessions {
            let _ = t.join();
        }
        self.counters()
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}

fn counters(st: &State) -> Counters {
    Counters {
        forward: st.forward.counters(),
        backward: st.backward.counters(),
        sessions: st.opened,
        refused: st.refused,
        send_errors: st.send_errors,
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Receives from clients into the forward pipe.
fn listen_loop(inner: &Arc<Inner>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !inner.stopping() {
        let (n, client) = match inner.listen.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if is_timeout(&e) => continue,
            // Errors queued by ICMP and the like: nothing to do but go on.
            Err(_) => continue,
        };
        let Some(session) = session(inner, client) else {
            continue;
        };
        let now = inner.now();
        session.last_ns.store(now, Ordering::Relaxed);
        let mut st = inner.lock();
        st.forward.push(now, n, Forward(session, buf[..n].to_vec()));
        drop(pump_forward(inner, st));
    }
}

/// The client's session, opened (socket and receiving thread) on its first datagram.
fn session(inner: &Arc<Inner>, client: SocketAddr) -> Option<Arc<Session>> {
    let mut st = inner.lock();
    if let Some(s) = st.sessions.get(&client) {
        return Some(Arc::clone(s));
    }
    if st.sessions.len() >= MAX_SESSIONS {
        st.refused += 1;
        return None;
    }
    let open = || -> io::Result<UdpSocket> {
        let s = bind(SocketAddr::new(inner.listen.local_addr()?.ip(), 0))?;
        s.connect(inner.target)?;
        Ok(s)
    };
    let Ok(upstream) = open() else {
        st.refused += 1;
        return None;
    };
    let session = Arc::new(Session {
        client,
        upstream,
        last_ns: AtomicU64::new(inner.now()),
        closed: AtomicBool::new(false),
    });
    let (i, s) = (Arc::clone(inner), Arc::clone(&session));
    match spawn("netem-upstream", move || upstream_loop(&i, &s)) {
        Ok(t) => st.threads.push(t),
        Err(_) => {
            st.refused += 1;
            return None;
        }
    }
    st.opened += 1;
    st.sessions.insert(client, Arc::clone(&session));
    Some(session)
}

/// Receives the target's answers for one client into the backward pipe.
fn upstream_loop(inner: &Inner, s: &Session) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !inner.stopping() && !s.closed.load(Ordering::Acquire) {
        let n = match s.upstream.recv(&mut buf) {
            Ok(n) => n,
            // A refused earlier send (the target not listening) shows up here: go on.
            Err(_) => continue,
        };
        let now = inner.now();
        s.last_ns.store(now, Ordering::Relaxed);
        let mut st = inner.lock();
        st.backward
            .push(now, n, Backward(s.client, buf[..n].to_vec()));
        drop(pump_backward(inner, st));
    }
}

const FORWARD: usize = 0;
const BACKWARD: usize = 1;

/// Sends what the forward pipe has due, unless another thread is at it; wakes the sending
/// thread if something waits for later.
fn pump_forward<'a>(inner: &'a Inner, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    pump(
        inner,
        st,
        FORWARD,
        |st| &mut st.forward,
        |_, Forward(session, data)| session.upstream.send(&data).is_ok(),
    )
}

/// The same for the backward pipe.
fn pump_backward<'a>(inner: &'a Inner, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    pump(
        inner,
        st,
        BACKWARD,
        |st| &mut st.backward,
        |inner, Backward(client, data)| inner.listen.send_to(&data, client).is_ok(),
    )
}

/// Takes what is due from one direction and sends it outside the lock, as long as there is
/// some; one thread at a time per direction (`busy`), so the pipe's order is the wire's.
fn pump<'a, P: Clone>(
    inner: &'a Inner,
    mut st: MutexGuard<'a, State>,
    dir: usize,
    pipe: impl Fn(&mut State) -> &mut Pipe<P>,
    send: impl Fn(&Inner, P) -> bool,
) -> MutexGuard<'a, State> {
    if st.busy[dir] {
        // The thread at it sends this one too (it polls again before it lets go).
        return st;
    }
    loop {
        let now = inner.now();
        let mut due = Vec::new();
        while let Some(p) = pipe(&mut st).poll(now) {
            due.push(p);
        }
        if due.is_empty() {
            break;
        }
        st.busy[dir] = true;
        drop(st);
        let mut failed = 0;
        for p in due {
            failed += u64::from(!send(inner, p));
        }
        st = inner.lock();
        st.busy[dir] = false;
        st.send_errors += failed;
    }
    if pipe(&mut st).next_due().is_some() {
        inner.wake.notify_all();
    }
    st
}

/// Sends what is due, sleeping until the next due time or a wake-up.
fn send_loop(inner: &Inner) {
    let mut last_reap = 0;
    let mut st = inner.lock();
    while !inner.stopping() {
        st = pump_forward(inner, st);
        st = pump_backward(inner, st);
        let now = inner.now();
        if now.saturating_sub(last_reap) > 1_000_000_000 {
            reap(&mut st, now);
            last_reap = now;
        }
        // A busy direction is drained by the thread at it, which wakes us if it leaves
        // something for later.
        let next = [
            (!st.busy[FORWARD]).then(|| st.forward.next_due()).flatten(),
            (!st.busy[BACKWARD])
                .then(|| st.backward.next_due())
                .flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = next.map_or(Duration::from_millis(100), |due| {
            Duration::from_nanos(due.saturating_sub(inner.now())).min(Duration::from_millis(100))
        });
        if wait.is_zero() {
            continue;
        }
        st = inner
            .wake
            .wait_timeout(st, wait)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Forgets idle sessions (their threads end on their own) and joined threads.
fn reap(st: &mut State, now: u64) {
    let idle = SESSION_IDLE.as_nanos() as u64;
    st.sessions.retain(|_, s| {
        let keep = now.saturating_sub(s.last_ns.load(Ordering::Relaxed)) < idle;
        if !keep {
            s.closed.store(true, Ordering::Release);
        }
        keep
    });
    let (done, running): (Vec<_>, Vec<_>) = st.threads.drain(..).partition(|t| t.is_finished());
    st.threads = running;
    for t in done {
        let _ = t.join();
    }
}
