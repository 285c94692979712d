//! Message delivery to the manager, faults (host crashes and restarts, partitions, link cuts,
//! process kills and stalls, manager crashes with a restart from the store) and healing.

use std::collections::VecDeque;
use std::time::Duration;

use failover::manager::{Input, Manager};
use failover::model::Assignments;
use failover::store::Store;

use super::world::{cfg, Sim, STEP, VM};

impl Sim {
    pub fn manager_step(&mut self) {
        // Deliver what arrived (a cut host's messages wait; a long cut loses the connection).
        let mut keep = VecDeque::new();
        while let Some((t, input)) = self.to_mgr.pop_front() {
            let host = match &input {
                Input::Hello { host, .. } | Input::Report { host, .. } | Input::Gone { host } => {
                    host.clone()
                }
            };
            let i = self.idx(&host);
            if t > self.now || self.hosts[i].cut_since.is_some() {
                keep.push_back((t, input));
            } else if self.mgr_up {
                if let (Some(_), Input::Report { host, report }) = (&self.outputs, &input) {
                    self.reports
                        .insert(host.clone(), (self.now, report.clone()));
                }
                self.mgr.handle(self.now, input);
                // (When outputs are kept, each with what the manager knew when it decided.)
                if self.outputs.is_some() {
                    self.drive_manager();
                }
            }
        }
        self.to_mgr = keep;
        if self.mgr_up {
            self.mgr.tick(self.now);
            self.drive_manager();
        }
    }

    pub fn fault(&mut self) {
        let n = self.hosts.len();
        let i = self.rng.below(n as u64) as usize;
        match self.rng.below(9) {
            0 if self.hosts.iter().filter(|h| h.up).count() > 1 => {
                self.note(format!("FAULT crash host {}", self.names[i]));
                self.crash_host(i);
            }
            1 if !self.hosts[i].up => {
                self.note(format!("FAULT restart host {}", self.names[i]));
                self.hosts[i].up = true;
                self.hosts[i].needs_hello = true;
            }
            2 if self.hosts[i].cut_since.is_none() => {
                self.note(format!("FAULT cut {} from the manager", self.names[i]));
                self.hosts[i].cut_since = Some(self.now);
            }
            3 => {
                let j = self.rng.below(n as u64) as usize;
                if i != j {
                    self.note(format!("FAULT cut {} ↔ {}", self.names[i], self.names[j]));
                    self.cuts.push((i, j));
                }
            }
            4 => {
                if let Some(p) = self.hosts[i].primary.as_mut().filter(|p| p.alive) {
                    p.alive = false;
                    p.exit = Some("killed by signal 9".into());
                    self.note(format!(
                        "FAULT kill the primary process on {}",
                        self.names[i]
                    ));
                }
            }
            5 if self.mgr_up => {
                self.note("FAULT manager crashes".into());
                self.mgr_up = false;
            }
            6 if self.mgr_up => {
                let to = self.names[i].clone();
                let r = self.mgr.migrate(self.now, VM, &to);
                self.note(format!("MIGRATE to {to}: {r:?}"));
                self.drive_manager();
            }
            7 => {
                let now = self.now;
                if let Some(p) = self.hosts[i]
                    .primary
                    .as_mut()
                    .filter(|p| p.alive && p.stalled_since.is_none())
                {
                    p.stalled_since = Some(now);
                    self.note(format!(
                        "FAULT stall the primary process on {}",
                        self.names[i]
                    ));
                }
            }
            _ => self.heal_some(),
        }
    }

    /// Host `i` dies: its processes and the agent's memory are gone, its disk stays.
    pub fn crash_host(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.up = false;
        h.primary = None;
        h.starting = None;
        h.backup = None;
        h.applied.clear();
        h.inbox.clear();
        h.want = Assignments::default();
        h.connected = false;
        h.clones.clear();
        h.making = None;
        h.copying = None;
        h.blocked.clear();
        h.assigned = false;
        let host = self.names[i].clone();
        self.to_mgr.retain(|(_, inp)| !matches!(inp, Input::Report { host: h, .. } | Input::Hello { host: h, .. } if *h == host));
    }

    pub fn heal_some(&mut self) {
        if !self.mgr_up {
            self.note("manager restarts from its store".into());
            let st = self.store.load().unwrap();
            self.mgr = Manager::new(cfg(), st, self.now);
            self.mgr_up = true;
            self.reports.clear();
            // Every connection went with the old manager: what was in flight is lost, and each
            // agent reconnects.
            self.to_mgr.clear();
            for h in &mut self.hosts {
                h.needs_hello = true;
            }
        }
        if !self.cuts.is_empty() {
            let k = self.rng.below(self.cuts.len() as u64) as usize;
            self.cuts.remove(k);
        }
        for i in 0..self.hosts.len() {
            if self.hosts[i]
                .primary
                .as_ref()
                .is_some_and(|p| p.stalled_since.is_some())
                && self.rng.chance(300)
            {
                self.hosts[i].primary.as_mut().unwrap().stalled_since = None;
                self.note(format!("primary process on {} continues", self.names[i]));
            }
        }
        for i in 0..self.hosts.len() {
            if let Some(since) = self.hosts[i].cut_since {
                if self.rng.chance(500) {
                    self.hosts[i].cut_since = None;
                    if self.now - since > Duration::from_millis(300) {
                        // The connection timed out: messages lost, a new one opened.
                        self.hosts[i].inbox.clear();
                        let host = self.names[i].clone();
                        self.to_mgr.retain(
                            |(_, inp)| !matches!(inp, Input::Report { host: h, .. } if *h == host),
                        );
                        self.to_mgr.push_back((self.now, Input::Gone { host }));
                        self.hosts[i].needs_hello = true;
                    }
                }
            }
        }
    }

    pub fn heal_all(&mut self) {
        for _ in 0..20 {
            self.heal_some();
        }
        for i in 0..self.hosts.len() {
            if !self.hosts[i].up {
                self.hosts[i].up = true;
                self.hosts[i].needs_hello = true;
            }
            self.hosts[i].cut_since = None;
        }
        self.cuts.clear();
    }

    pub fn step(&mut self) {
        self.now += STEP;
        for i in 0..self.hosts.len() {
            self.agent_step(i);
        }
        self.data_step();
        self.manager_step();
        self.check();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let n = self.log.len().saturating_sub(80);
            eprintln!(
                "--- last events of the failing run ---\n{}",
                self.log[n..].join("\n")
            );
        }
    }
}
