//! Helpers of the manager's rule tests: hand-made agent reports in virtual time.
#![allow(dead_code)]

pub mod clones;

use std::time::Duration;

use failover::event::EventKind;
use failover::manager::{Input, Manager, ManagerConfig, Output};
use failover::model::{Assignments, ProcRole, Report, VmObservation, VmSpec};

pub const MS: Duration = Duration::from_millis(1);

pub fn spec(backups: u8) -> VmSpec {
    VmSpec {
        name: "web".into(),
        mem_mib: 64,
        disk_mib: 64,
        guest_config: String::new(),
        backups,
        hosts: vec![],
        port: 7100,
    }
}

pub fn primary(term: u64, backups: &[&str], protected: bool) -> VmObservation {
    VmObservation {
        vm: "web".into(),
        role: ProcRole::Primary,
        alive: true,
        exit: None,
        term,
        image_term: 0,
        seq: Some(10),
        protected,
        backup_hosts: backups.iter().map(|s| s.to_string()).collect(),
        output_held: true,
        silent_ms: None,
        handed_over: false,
        never_ran: false,
    }
}

pub fn backup(term: u64, seq: u64, silent_ms: u64) -> VmObservation {
    VmObservation {
        vm: "web".into(),
        role: ProcRole::Backup,
        alive: true,
        exit: None,
        term,
        image_term: term,
        seq: Some(seq),
        protected: false,
        backup_hosts: vec![],
        output_held: false,
        silent_ms: Some(silent_ms),
        handed_over: false,
        never_ran: false,
    }
}

pub struct T {
    pub m: Manager,
    pub now: Duration,
    pub out: Vec<Output>,
}

impl T {
    pub fn new(hosts: &[&str]) -> T {
        let mut t = T {
            m: Manager::new(ManagerConfig::default(), Default::default(), Duration::ZERO),
            now: Duration::ZERO,
            out: vec![],
        };
        for h in hosts {
            t.m.handle(
                t.now,
                Input::Hello {
                    host: h.to_string(),
                    repl_ip: format!("10.0.0.{}", 1 + h.as_bytes()[0] - b'a'),
                    capacity_mib: 1024,
                },
            );
        }
        t.drain();
        t
    }
    pub fn drain(&mut self) {
        while let Some(o) = self.m.poll_output() {
            self.out.push(o);
        }
    }
    pub fn report(&mut self, host: &str, vms: Vec<VmObservation>) {
        self.m.handle(
            self.now,
            Input::Report {
                host: host.into(),
                report: Report {
                    vms,
                    ..Default::default()
                },
            },
        );
        self.drain();
    }
    /// A whole report (with clones and bases).
    pub fn report_all(&mut self, host: &str, report: Report) {
        self.m.handle(
            self.now,
            Input::Report {
                host: host.into(),
                report,
            },
        );
        self.drain();
    }
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.m.tick(self.now);
        self.drain();
    }
    pub fn events(&self, kind: EventKind) -> usize {
        self.out
            .iter()
            .filter(|o| matches!(o, Output::Event(e) if e.kind == kind))
            .count()
    }
    pub fn last_assign(&self, host: &str) -> Option<&Assignments> {
        self.out.iter().rev().find_map(|o| match o {
            Output::Assign {
                host: h,
                assignments,
            } if h == host => Some(assignments),
            _ => None,
        })
    }
    /// A running, protected VM: primary on a, backups on b (seq 10) and c (seq 12).
    pub fn protected_vm() -> T {
        let mut t = T::new(&["a", "b", "c", "d"]);
        t.m.create(t.now, spec(2)).unwrap();
        t.drain();
        let v = t.m.vm(t.now, "web").unwrap();
        assert_eq!(v.primary.as_deref(), Some("a"));
        t.report("a", vec![primary(1, &["b", "c"], true)]);
        t.report("b", vec![backup(1, 10, 5)]);
        t.report("c", vec![backup(1, 12, 5)]);
        t.report("d", vec![]);
        assert_eq!(t.m.vm(t.now, "web").unwrap().status, "protected");
        t
    }
}
