//! Readiness probes from the balancer's network namespace (`vmatrix lb serve`): a server is put
//! into the service only once a TCP connection to it from where the balancer forwards
//! succeeds — a clone the manager reports running (its VM built) may still be waking (new
//! address, gratuitous ARP, listening sockets), and a SYN the balancer sent it then would be
//! lost and retransmitted a second later.
//!
//! One thread moves into the namespace (`setns`, per thread: the rest of the process stays
//! where it is) and serves probe requests; each request's addresses are probed at once, each
//! on a thread it spawns (threads inherit their creator's namespace).

use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use super::LbError;

type Request = (Vec<SocketAddrV4>, mpsc::Sender<BTreeSet<SocketAddrV4>>);

/// The prober's handle.
#[derive(Debug)]
pub struct Prober {
    tx: mpsc::Sender<Request>,
}

/// Enters `netns` (None: stays here).
fn enter(netns: Option<&str>) -> Result<(), LbError> {
    let Some(ns) = netns else {
        return Ok(());
    };
    let err = |source| LbError::Setns {
        ns: ns.to_string(),
        source,
    };
    let f = std::fs::File::open(std::path::Path::new("/run/netns").join(ns)).map_err(err)?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&f),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| err(e.into()))
}

impl Prober {
    /// A prober in `netns` whose connections wait at most `timeout`.
    pub fn start(netns: Option<&str>, timeout: Duration) -> Result<Prober, LbError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let (ok_tx, ok_rx) = mpsc::channel();
        let ns = netns.map(str::to_string);
        std::thread::Builder::new()
            .name("lb-probe".into())
            .spawn(move || {
                let entered = enter(ns.as_deref());
                let failed = entered.is_err();
                let _ = ok_tx.send(entered);
                if failed {
                    return;
                }
                for (addrs, reply) in rx {
                    let _ = reply.send(probe_all(&addrs, timeout));
                }
            })
            .map_err(|source| LbError::Spawn {
                cmd: "the readiness prober's thread".into(),
                source,
            })?;
        ok_rx.recv().map_err(|_| LbError::ProberGone)??;
        Ok(Prober { tx })
    }

    /// Which of `addrs` accept a TCP connection.
    pub fn ready(&self, addrs: Vec<SocketAddrV4>) -> Result<BTreeSet<SocketAddrV4>, LbError> {
        if addrs.is_empty() {
            return Ok(BTreeSet::new());
        }
        let (tx, rx) = mpsc::channel();
        self.tx.send((addrs, tx)).map_err(|_| LbError::ProberGone)?;
        rx.recv().map_err(|_| LbError::ProberGone)
    }
}

fn probe_all(addrs: &[SocketAddrV4], timeout: Duration) -> BTreeSet<SocketAddrV4> {
    std::thread::scope(|s| {
        let probes: Vec<_> = addrs
            .iter()
            .map(|&a| {
                s.spawn(move || {
                    TcpStream::connect_timeout(&SocketAddr::V4(a), timeout)
                        .is_ok()
                        .then_some(a)
                })
            })
            .collect();
        probes
            .into_iter()
            .filter_map(|p| p.join().ok().flatten())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_address_is_ready_a_closed_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let closed = {
            let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            match l2.local_addr().unwrap() {
                SocketAddr::V4(a) => a,
                _ => unreachable!(),
            }
        };
        let p = Prober::start(None, Duration::from_millis(300)).unwrap();
        assert_eq!(p.ready(vec![open, closed]).unwrap(), [open].into());
        assert!(p.ready(vec![]).unwrap().is_empty());
        assert!(matches!(
            Prober::start(Some("vmx-no-such-ns"), Duration::from_millis(1)),
            Err(LbError::Setns { .. })
        ));
    }
}
