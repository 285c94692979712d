//! The impairment model: what happens to each datagram of one direction of a link, decided by
//! a seeded generator, in virtual time (no clock, no socket), so it is tested alone.
//!
//! A [`Pipe`] takes datagrams ([`Pipe::push`]) and gives them back when they are due
//! ([`Pipe::poll`]). For each datagram it draws, always in this order and always all of them:
//! loss, duplication, reordering, the jitter of the original, the jitter of the copy. The
//! decisions for the n-th datagram of a direction therefore depend only on the seed, n and the
//! impairment in force when it arrived — not on arrival times, on the other direction, nor on
//! earlier impairments' settings.
//!
//! Semantics, as Linux's netem has them where it has them:
//! - **delay ± jitter**: due at `arrival + delay + u`, `u` uniform in `[-jitter, +jitter]`
//!   (never before arrival); datagrams leave in due-time order, so jitter reorders as netem's
//!   does (ties leave in arrival order);
//! - **loss**: dropped with probability `loss_permille / 1000`;
//! - **duplication**: a copy is queued too, with its own jitter;
//! - **reordering**: held back `reorder_delay_ns` more, so later ones overtake it;
//! - **stall** (FoundationDB's clogging): nothing leaves while stalled; everything keeps its
//!   due time and, on release, what is due leaves at once in order, the rest when due.
//!
//! Changing the impairment affects datagrams that arrive afterwards; queued ones keep their due
//! times (a delay healed to 0 lets new datagrams overtake the queued ones, as with netem). The
//! queue is bounded ([`QUEUE_LIMIT_BYTES`]); a datagram that does not fit is dropped and counted
//! as an overflow.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schedule::rng::Xoshiro256;
use crate::schedule::Fault;

/// Most bytes one direction queues (held by a stall or a delay); beyond it datagrams drop.
pub const QUEUE_LIMIT_BYTES: usize = 64 << 20;

/// What one direction of a link does to datagrams. The default does nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impairment {
    /// Every datagram waits this long.
    pub delay_ns: u64,
    /// Plus or minus up to this much (uniform), never below zero.
    pub jitter_ns: u64,
    /// Each datagram dropped with probability `loss_permille / 1000`.
    pub loss_permille: u16,
    /// Each datagram sent twice with probability `duplicate_permille / 1000`.
    pub duplicate_permille: u16,
    /// Each datagram held back with probability `reorder_permille / 1000`...
    pub reorder_permille: u16,
    /// ... by this much more, so later ones overtake it.
    pub reorder_delay_ns: u64,
    /// Hold everything until this is cleared.
    pub stall: bool,
}

impl Impairment {
    /// Nothing: datagrams pass through.
    pub const NONE: Impairment = Impairment {
        delay_ns: 0,
        jitter_ns: 0,
        loss_permille: 0,
        duplicate_permille: 0,
        reorder_permille: 0,
        reorder_delay_ns: 0,
        stall: false,
    };

    /// Everything held until released.
    pub const STALL: Impairment = Impairment {
        stall: true,
        ..Impairment::NONE
    };

    /// Whether it does nothing.
    pub fn is_none(&self) -> bool {
        *self == Impairment::NONE
    }
}

/// Which way a datagram goes through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the clients (the routed host) to the target.
    Forward,
    /// From the target back to the clients.
    Backward,
}

/// The impairment of both directions of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkImpairment {
    /// Client (routed host) → target.
    pub forward: Impairment,
    /// Target → client.
    pub backward: Impairment,
}

impl LinkImpairment {
    /// A healthy link.
    pub const NONE: LinkImpairment = LinkImpairment {
        forward: Impairment::NONE,
        backward: Impairment::NONE,
    };

    /// The same impairment both ways.
    pub fn both(i: Impairment) -> LinkImpairment {
        LinkImpairment {
            forward: i,
            backward: i,
        }
    }

    /// One direction impaired, the other healthy.
    pub fn one_way(direction: Direction, i: Impairment) -> LinkImpairment {
        match direction {
            Direction::Forward => LinkImpairment {
                forward: i,
                backward: Impairment::NONE,
            },
            Direction::Backward => LinkImpairment {
                forward: Impairment::NONE,
                backward: i,
            },
        }
    }

    /// Both directions stalled (a clogged link).
    pub fn stalled() -> LinkImpairment {
        LinkImpairment::both(Impairment::STALL)
    }

    /// Whether it does nothing.
    pub fn is_none(&self) -> bool {
        self.forward.is_none() && self.backward.is_none()
    }

    /// One direction's impairment.
    pub fn get(&self, direction: Direction) -> Impairment {
        match direction {
            Direction::Forward => self.forward,
            Direction::Backward => self.backward,
        }
    }

    /// What a link fault of the schedule does to its link (both directions), or `None` for a
    /// fault that is not a link fault. `swizzle` clogs: [`LinkImpairment::stalled`].
    pub fn for_fault(fault: &Fault) -> Option<LinkImpairment> {
        let i = match *fault {
            Fault::LinkDelay {
                delay_ns,
                jitter_ns,
                ..
            } => Impairment {
                delay_ns,
                jitter_ns,
                ..Impairment::NONE
            },
            Fault::LinkLoss { permille, .. } => Impairment {
                loss_permille: permille,
                ..Impairment::NONE
            },
            Fault::LinkDuplicate { permille, .. } => Impairment {
                duplicate_permille: permille,
                ..Impairment::NONE
            },
            Fault::LinkReorder {
                permille, delay_ns, ..
            } => Impairment {
                reorder_permille: permille,
                reorder_delay_ns: delay_ns,
                ..Impairment::NONE
            },
            Fault::Swizzle { .. } => Impairment::STALL,
            _ => return None,
        };
        Some(LinkImpairment::both(i))
    }
}

/// What one direction did, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// Datagrams that arrived.
    pub received: u64,
    /// Their bytes.
    pub received_bytes: u64,
    /// Datagrams handed on (copies included).
    pub delivered: u64,
    /// Their bytes.
    pub delivered_bytes: u64,
    /// Dropped by the loss model.
    pub dropped: u64,
    /// Copies made by the duplication model.
    pub duplicated: u64,
    /// Held back by the reordering model.
    pub reordered: u64,
    /// Arrived while the direction was stalled.
    pub held: u64,
    /// Dropped because the queue was full.
    pub overflowed: u64,
    /// Datagrams queued now (delayed or held).
    pub queued: u64,
    /// When the last datagram arrived (the pipe's clock), if one did.
    pub last_received_ns: Option<u64>,
}

/// One direction of a link: a seeded impairment and the datagrams waiting to leave.
///
/// `P` is whatever the caller needs to send a datagram on (its bytes and its peer); `bytes` is
/// given separately for the queue bound and the counters.
#[derive(Debug)]
pub struct Pipe<P> {
    impairment: Impairment,
    rng: Xoshiro256,
    /// (due time, arrival order) → the datagram and its size.
    queue: BTreeMap<(u64, u64), (P, usize)>,
    queued_bytes: usize,
    order: u64,
    counters: DirectionCounters,
}

impl<P: Clone> Pipe<P> {
    /// A healthy pipe whose decisions come from `seed`.
    pub fn new(seed: u64, impairment: Impairment) -> Pipe<P> {
        Pipe {
            impairment,
            rng: Xoshiro256::seed_from(seed),
            queue: BTreeMap::new(),
            queued_bytes: 0,
            order: 0,
            counters: DirectionCounters::default(),
        }
    }

    /// The impairment in force.
    pub fn impairment(&self) -> Impairment {
        self.impairment
    }

    /// Changes the impairment for datagrams arriving from now on; clearing `stall` releases
    /// what was held.
    pub fn set(&mut self, impairment: Impairment) {
        self.impairment = impairment;
    }

    /// What it did so far.
    pub fn counters(&self) -> DirectionCounters {
        DirectionCounters {
            queued: self.queue.len() as u64,
            ..self.counters
        }
    }

    /// A datagram of `bytes` arrives at `now_ns`.
    pub fn push(&mut self, now_ns: u64, bytes: usize, packet: P) {
        let imp = self.impairment;
        let c = &mut self.counters;
        c.received += 1;
        c.received_bytes += bytes as u64;
        c.last_received_ns = Some(now_ns);
        if imp.stall {
            c.held += 1;
        }
        // Always five draws, in this order (see the module's doc).
        let lose = self.rng.below(1000) < u64::from(imp.loss_permille);
        let duplicate = self.rng.below(1000) < u64::from(imp.duplicate_permille);
        let reorder = self.rng.below(1000) < u64::from(imp.reorder_permille);
        let jitter = [self.rng.next_u64(), self.rng.next_u64()];
        if lose {
            self.counters.dropped += 1;
            return;
        }
        let extra = if reorder {
            self.counters.reordered += 1;
            imp.reorder_delay_ns
        } else {
            0
        };
        let due = |draw: u64| {
            now_ns
                .saturating_add(jittered(imp, draw))
                .saturating_add(extra)
        };
        if duplicate {
            self.counters.duplicated += 1;
            self.enqueue(due(jitter[0]), bytes, packet.clone());
            self.enqueue(due(jitter[1]), bytes, packet);
        } else {
            self.enqueue(due(jitter[0]), bytes, packet);
        }
    }

    fn enqueue(&mut self, due_ns: u64, bytes: usize, packet: P) {
        if self.queued_bytes + bytes > QUEUE_LIMIT_BYTES {
            self.counters.overflowed += 1;
            return;
        }
        self.queued_bytes += bytes;
        self.queue.insert((due_ns, self.order), (packet, bytes));
        self.order += 1;
    }

    /// The next datagram due at `now_ns`, if any (none while stalled).
    pub fn poll(&mut self, now_ns: u64) -> Option<P> {
        if self.impairment.stall {
            return None;
        }
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now_ns {
            return None;
        }
        let (packet, bytes) = entry.remove();
        self.queued_bytes -= bytes;
        self.counters.delivered += 1;
        self.counters.delivered_bytes += bytes as u64;
        Some(packet)
    }

    /// When [`Pipe::poll`] next has something (`None`: nothing queued, or stalled).
    pub fn next_due(&self) -> Option<u64> {
        if self.impairment.stall {
            return None;
        }
        self.queue.first_key_value().map(|(k, _)| k.0)
    }
}

/// `delay ± jitter` from one draw: uniform in `[delay - jitter, delay + jitter]`, at least 0.
fn jittered(imp: Impairment, draw: u64) -> u64 {
    if imp.jitter_ns == 0 {
        return imp.delay_ns;
    }
    let span = u128::from(imp.jitter_ns) * 2 + 1;
    // Multiply-shift: uniform enough for a network model (bias < span / 2^64).
    let offset = ((u128::from(draw) * span) >> 64) as u64;
    (imp.delay_ns + offset).saturating_sub(imp.jitter_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Pushes `n` datagrams one per ms, then polls until empty (time runs on), returning the
    /// delivered sequence numbers with their delivery times.
    fn run(seed: u64, imp: Impairment, n: u64) -> (Vec<(u64, u64)>, DirectionCounters) {
        let mut p = Pipe::new(seed, imp);
        let mut out = Vec::new();
        let mut now = 0;
        for i in 0..n {
            now = i * MS;
            p.push(now, 100, i);
            while let Some(x) = p.poll(now) {
                out.push((x, now));
            }
        }
        while let Some(due) = p.next_due() {
            now = now.max(due);
            while let Some(x) = p.poll(now) {
                out.push((x, now));
            }
        }
        (out, p.counters())
    }

    #[test]
    fn nothing_passes_everything_in_order_at_once() {
        let (out, c) = run(1, Impairment::NONE, 100);
        assert_eq!(out, (0..100).map(|i| (i, i * MS)).collect::<Vec<_>>());
        assert_eq!(c.received, 100);
        assert_eq!(c.delivered, 100);
        assert_eq!(c.delivered_bytes, 10_000);
        assert_eq!(c.dropped + c.duplicated + c.reordered + c.held, 0);
        assert_eq!(c.queued, 0);
    }

    #[test]
    fn same_seed_same_decisions_other_seed_others() {
        let imp = Impairment {
            delay_ns: 5 * MS,
            jitter_ns: 3 * MS,
            loss_permille: 100,
            duplicate_permille: 100,
            reorder_permille: 100,
            reorder_delay_ns: 10 * MS,
            stall: false,
        };
        let a = run(42, imp, 2000);
        let b = run(42, imp, 2000);
        assert_eq!(a, b);
        let c = run(43, imp, 2000);
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn decisions_do_not_depend_on_arrival_times() {
        // The same seed and impairment, datagrams at other times: the same ones are lost,
        // duplicated and reordered.
        let imp = Impairment {
            loss_permille: 200,
            duplicate_permille: 200,
            ..Impairment::NONE
        };
        let mut a = Pipe::new(9, imp);
        let mut b = Pipe::new(9, imp);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for i in 0..500u64 {
            a.push(i, 1, i);
            b.push(i * 7919 + 13, 1, i);
            while let Some(x) = a.poll(u64::MAX) {
                got_a.push(x);
            }
            while let Some(x) = b.poll(u64::MAX) {
                got_b.push(x);
            }
        }
        assert_eq!(got_a, got_b);
        assert_eq!(a.counters().dropped, b.counters().dropped);
    }

    #[test]
    fn loss_rate_within_bounds() {
        let imp = Impairment {
            loss_permille: 250,
            ..Impairment::NONE
        };
        for seed in 0..5 {
            let (out, c) = run(seed, imp, 20_000);
            // 25 % of 20,000: mean 5000, sd ~61; ±400 is more than 6 sd.
            assert!(
                (4600..5400).contains(&c.dropped),
                "seed {seed}: {}",
                c.dropped
            );
            assert_eq!(out.len() as u64, 20_000 - c.dropped);
            assert_eq!(c.delivered + c.dropped, c.received);
            // What is not lost stays in order without delay.
            assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
        }
        let (_, all) = run(
            3,
            Impairment {
                loss_permille: 1000,
                ..Impairment::NONE
            },
            1000,
        );
        assert_eq!((all.dropped, all.delivered), (1000, 0));
    }

    #[test]
    fn duplication_counts_and_copies_arrive() {
        let imp = Impairment {
            duplicate_permille: 100,
            ..Impairment::NONE
        };
        let (out, c) = run(5, imp, 10_000);
        assert!((850..1150).contains(&c.duplicated), "{}", c.duplicated);
        assert_eq!(c.delivered, 10_000 + c.duplicated);
        assert_eq!(out.len() as u64, c.delivered);
        let mut seen = std::collections::HashMap::new();
        for (x, _) in &out {
            *seen.entry(*x).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 10_000);
        assert_eq!(
            seen.values().filter(|&&n| n == 2).count() as u64,
            c.duplicated
        );
    }

    #[test]
    fn reordering_happens_and_reordered_ones_are_late() {
        let imp = Impairment {
            reorder_permille: 50,
            reorder_delay_ns: 5 * MS,
            ..Impairment::NONE
        };
        let (out, c) = run(7, imp, 10_000);
        assert!((380..620).contains(&c.reordered), "{}", c.reordered);
        assert_eq!(out.len(), 10_000);
        let inversions = out.windows(2).filter(|w| w[0].0 > w[1].0).count() as u64;
        assert!(inversions > 0, "no datagram was overtaken");
        assert!(inversions <= c.reordered);
        // A held-back datagram is 5 ms late; the others are on time.
        let late = out.iter().filter(|(x, t)| *t == x * MS + 5 * MS).count() as u64;
        assert_eq!(late, c.reordered);
        let on_time = out.iter().filter(|(x, t)| *t == x * MS).count() as u64;
        assert_eq!(on_time + late, 10_000);
    }

    #[test]
    fn delay_and_jitter_stay_in_their_window() {
        let imp = Impairment {
            delay_ns: 20 * MS,
            jitter_ns: 5 * MS,
            ..Impairment::NONE
        };
        let mut p = Pipe::new(11, imp);
        for i in 0..5000u64 {
            p.push(0, 1, i);
        }
        let mut delays = Vec::new();
        while let Some(due) = p.next_due() {
            while let Some(_x) = p.poll(due) {
                delays.push(due);
            }
        }
        assert_eq!(delays.len(), 5000);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "due order");
        assert!(delays.iter().all(|&d| (15 * MS..=25 * MS).contains(&d)));
        let mean = delays.iter().sum::<u64>() / 5000;
        assert!((19 * MS..21 * MS).contains(&mean), "{mean}");
        assert!(*delays.first().unwrap() < 16 * MS && *delays.last().unwrap() > 24 * MS);
        // Jitter never makes a datagram leave before it arrived.
        let mut p = Pipe::new(
            1,
            Impairment {
                delay_ns: MS,
                jitter_ns: 10 * MS,
                ..imp
            },
        );
        for i in 0..1000 {
            p.push(50 * MS, 1, i);
        }
        assert!(p.next_due().unwrap() >= 50 * MS);
    }

    #[test]
    fn stall_holds_everything_and_release_delivers_in_order() {
        let mut p = Pipe::new(1, Impairment::STALL);
        for i in 0..100u64 {
            p.push(i * MS, 10, i);
        }
        assert_eq!(p.poll(u64::MAX), None);
        assert_eq!(p.next_due(), None);
        let c = p.counters();
        assert_eq!((c.held, c.queued, c.delivered), (100, 100, 0));
        p.set(Impairment::NONE);
        let released: Vec<u64> = std::iter::from_fn(|| p.poll(200 * MS)).collect();
        assert_eq!(released, (0..100).collect::<Vec<_>>());
        // A delayed datagram held by a stall still waits out its delay after the release.
        let mut p = Pipe::new(
            1,
            Impairment {
                delay_ns: 50 * MS,
                stall: true,
                ..Impairment::NONE
            },
        );
        p.push(0, 1, 1u64);
        p.set(Impairment::NONE);
        assert_eq!(p.poll(10 * MS), None);
        assert_eq!(p.next_due(), Some(50 * MS));
        assert_eq!(p.poll(50 * MS), Some(1));
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut p = Pipe::new(1, Impairment::STALL);
        let size = 1 << 20;
        for i in 0..100u64 {
            p.push(0, size, i);
        }
        let c = p.counters();
        assert_eq!(c.queued as usize, QUEUE_LIMIT_BYTES / size);
        assert_eq!(c.overflowed as usize, 100 - QUEUE_LIMIT_BYTES / size);
        p.set(Impairment::NONE);
        while p.poll(0).is_some() {}
        p.push(0, size, 1000);
        assert_eq!(p.poll(0), Some(1000));
    }

    #[test]
    fn link_faults_map_to_impairments() {
        let f = Fault::LinkDelay {
            backup: 0,
            delay_ns: 30 * MS,
            jitter_ns: 5 * MS,
        };
        let l = LinkImpairment::for_fault(&f).unwrap();
        assert_eq!(l.forward, l.backward);
        assert_eq!((l.forward.delay_ns, l.forward.jitter_ns), (30 * MS, 5 * MS));
        let f = Fault::LinkReorder {
            backup: 0,
            permille: 40,
            delay_ns: 8 * MS,
        };
        let l = LinkImpairment::for_fault(&f).unwrap();
        assert_eq!(l.get(Direction::Backward).reorder_permille, 40);
        assert_eq!(
            LinkImpairment::for_fault(&Fault::LinkLoss {
                backup: 0,
                permille: 7
            })
            .unwrap()
            .forward
            .loss_permille,
            7
        );
        assert_eq!(
            LinkImpairment::for_fault(&Fault::LinkDuplicate {
                backup: 0,
                permille: 9
            })
            .unwrap()
            .forward
            .duplicate_permille,
            9
        );
        let swizzle = Fault::Swizzle {
            links: vec![],
            step_ns: MS,
            heal_order: vec![],
        };
        assert_eq!(
            LinkImpairment::for_fault(&swizzle),
            Some(LinkImpairment::stalled())
        );
        assert_eq!(LinkImpairment::for_fault(&Fault::KillManager), None);
        assert!(LinkImpairment::NONE.is_none());
        let one = LinkImpairment::one_way(Direction::Forward, Impairment::STALL);
        assert!(one.forward.stall && one.backward.is_none());
    }
}
