//! A replication link through link proxies: the primary's datagrams to one backup's
//! replication port and to its data port (the next one, `failover::model::VmSpec::data_port`),
//! each routed (`netem::route_through`) through a [`Netem`] proxy of its own in the runner's
//! namespace with the same impairment. So a degraded, delayed or held link holds both of the
//! backup's connections — the session's and the one that carries checkpoint data — as a real
//! link would.

use std::net::SocketAddr;

use super::Ctx;
use crate::netem::{route_through, LinkImpairment, Netem, Route};

/// The proxied legs of one primary → backup link (see the module's doc).
#[derive(Debug)]
pub struct ProxiedLink {
    /// Each leg: its destination port, its proxy and its route.
    legs: Vec<(u16, Netem, Route)>,
}

impl ProxiedLink {
    /// Routes host `p`'s datagrams to host `b`'s replication and data ports through proxies
    /// applying `imp` both ways.
    pub fn start(
        ctx: &Ctx<'_>,
        (p, b): (usize, usize),
        imp: LinkImpairment,
        seed: u64,
    ) -> Result<ProxiedLink, String> {
        let ports = [Some(ctx.vm_port), failover::model::data_port(ctx.vm_port)];
        let mut link = ProxiedLink { legs: Vec::new() };
        for (i, port) in ports.into_iter().flatten().enumerate() {
            let dst = SocketAddr::from((ctx.cluster().repl_ip(b), port));
            let listen = SocketAddr::from((ctx.cluster().manager_ip(), 0));
            let seed = seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let proxy = match Netem::start(listen, dst, imp, seed) {
                Ok(proxy) => proxy,
                Err(e) => return link.fail(format!("link proxy on {listen}: {e}")),
            };
            match route_through(&ctx.cluster().ns(p), dst, proxy.local_addr()) {
                Ok(route) => link.legs.push((port, proxy, route)),
                Err(e) => {
                    let _ = proxy.stop();
                    return link.fail(e.to_string());
                }
            }
        }
        Ok(link)
    }

    /// Undoes the legs made so far (each route before its proxy) and returns `why`.
    fn fail(self, why: String) -> Result<ProxiedLink, String> {
        let _ = self.heal();
        Err(why)
    }

    /// Sets every leg's impairment.
    pub fn set(&self, imp: LinkImpairment) {
        for (_, proxy, _) in &self.legs {
            proxy.set(imp);
        }
    }

    /// Datagrams received from the primary, and held now, over all legs.
    pub fn forward(&self) -> (u64, u64) {
        self.legs.iter().fold((0, 0), |(r, q), (_, proxy, _)| {
            let c = proxy.counters().forward;
            (r + c.received, q + c.queued)
        })
    }

    /// The proxies' addresses, for a person.
    pub fn proxies(&self) -> String {
        let a: Vec<String> = self
            .legs
            .iter()
            .map(|(port, proxy, _)| format!("{} (port {port})", proxy.local_addr()))
            .collect();
        a.join(", ")
    }

    /// Heals every leg: healthy again (a stall releases), routes removed, proxies stopped;
    /// returns what the proxies did.
    pub fn heal(self) -> Result<Option<String>, String> {
        let mut notes = Vec::new();
        let mut errs = Vec::new();
        for (port, proxy, route) in self.legs {
            proxy.set(LinkImpairment::NONE);
            if let Err(e) = route.remove() {
                errs.push(e.to_string());
            }
            let c = proxy.stop();
            notes.push(format!(
                "port {port} proxy: forward {} received, {} delivered, {} dropped, {} duplicated, {} reordered; backward {} received, {} delivered",
                c.forward.received,
                c.forward.delivered,
                c.forward.dropped + c.forward.overflowed,
                c.forward.duplicated,
                c.forward.reordered,
                c.backward.received,
                c.backward.delivered
            ));
        }
        match errs.is_empty() {
            true => Ok(Some(notes.join("; "))),
            false => Err(errs.join("; ")),
        }
    }
}
