//! The data path of the simulated VM (checkpoints, acknowledgements, released output) and the
//! failover invariants checked at every step.

use std::collections::BTreeMap;

use super::world::{Image, Sim, VM};

impl Sim {
    /// Every 10 ms each live primary checkpoints to its backups and releases what all acked.
    pub fn data_step(&mut self) {
        if self.now.as_millis() % 10 != 5 {
            return;
        }
        for i in 0..self.hosts.len() {
            let Some(mut p) = self.hosts[i].primary.clone().filter(|p| p.alive) else {
                continue;
            };
            if !self.hosts[i].up || p.stalled_since.is_some() {
                continue;
            }
            p.version += 1;
            for b in p.backups.clone() {
                let j = self.idx(&b);
                let alive = self.hosts[j].backup.as_ref().is_some_and(|b| b.alive);
                if !alive || !self.link_up(i, j) {
                    continue;
                }
                // (A backup refuses a primary older than its fence or than the image it
                // committed: the real one starts each session at the higher of the two.)
                let floor = self.hosts[j].image.map_or(0, |im| im.term);
                let fence = self.hosts[j].min_term.max(floor);
                if fence > p.term {
                    p.alive = false;
                    p.exit = Some(format!("fenced by term {fence}"));
                    break;
                }
                // Same history: the checkpoint; another: a full sync (takes one step here).
                self.hosts[j].image = Some(Image {
                    history: p.history,
                    term: p.term,
                    version: p.version,
                });
                self.hosts[j].backup.as_mut().unwrap().last_heard = Some(self.now);
                p.acked.insert(b.clone(), p.version);
            }
            let all = p
                .backups
                .iter()
                .map(|b| p.acked.get(b).copied())
                .collect::<Option<Vec<_>>>();
            let release = if p.alive {
                match (p.backups.is_empty(), all) {
                    (true, _) => Some(p.version),
                    (false, Some(a)) => a.iter().min().copied(),
                    (false, None) => None,
                }
            } else {
                None
            };
            if let Some(v) = release.filter(|&v| v > p.released) {
                p.released = v;
                self.release(p.term, v);
            }
            self.hosts[i].primary = Some(p);
        }
    }

    pub fn release(&mut self, term: u64, version: u64) {
        assert!(
            term >= self.newest_releasing,
            "split brain: term {term} released output after term {} did",
            self.newest_releasing
        );
        self.newest_releasing = term;
        if let Some(&floor) = self.floors.range(term + 1..).next().map(|(_, f)| f) {
            assert!(version <= floor, "term {term} released version {version} after a newer term was promoted from {floor}");
        }
        let e = self.released.entry(term).or_default();
        *e = (*e).max(version);
    }

    pub fn check(&mut self) {
        let mut per_term: BTreeMap<u64, usize> = BTreeMap::new();
        for h in &self.hosts {
            if let Some(p) = h.primary.as_ref().filter(|p| p.alive && h.up) {
                *per_term.entry(p.term).or_default() += 1;
            }
        }
        for (t, n) in per_term {
            assert!(n <= 1, "{n} live primaries at term {t}");
        }
        if let Some(r) = self.store.state.vms.get(VM) {
            assert!(r.term >= self.max_term_seen, "stored term went down");
            self.max_term_seen = r.term;
        }
    }
}
