//! Rule tests of per-VM resource limits (issue 12): checked against the guest, persisted,
//! handed to every host running a process of the VM (primary, backups, clones) and to no other,
//! changed live, survive a failover, shown with the agents' usage.

mod common;

use common::clones::*;
use common::*;
use failover::event::EventKind;
use failover::limits::{Limits, ProcUsage, UsageOf};
use failover::manager::{ApiError, Manager, ManagerConfig, Output};
use failover::model::{ProcRole, Report};

fn half_cpu() -> Limits {
    Limits {
        cpu_millis: 500,
        memory_mib: 320,
        ..Default::default()
    }
}

fn limits_on(t: &T, host: &str) -> Option<Limits> {
    t.last_assign(host)
        .and_then(|a| a.limits.get("web").copied())
}

#[test]
fn limits_reach_every_host_with_a_process_of_the_vm_and_change_live() {
    let mut t = T::protected_vm();
    assert!(t.m.state().vms["web"].limits.is_none());
    assert_eq!(limits_on(&t, "a"), None);

    // Below the guest's RAM plus the VMM's share: refused, nothing changes.
    let low = Limits {
        memory_mib: 319,
        ..Default::default()
    };
    assert!(matches!(
        t.m.set_limits(t.now, "web", low),
        Err(ApiError::Invalid(e)) if e.contains("below the 320 MiB a VM of 64 MiB needs")
    ));
    assert!(matches!(
        t.m.set_limits(t.now, "nope", half_cpu()),
        Err(ApiError::NotFound(_))
    ));
    assert!(t.m.state().vms["web"].limits.is_none());

    t.m.set_limits(t.now, "web", half_cpu()).unwrap();
    t.drain();
    // Persisted before it is sent.
    let persisted = t
        .out
        .iter()
        .rposition(|o| matches!(o, Output::Persist(s) if s.vms["web"].limits == half_cpu()));
    let sent = t.out.iter().rposition(
        |o| matches!(o, Output::Assign { assignments, .. } if assignments.limits.contains_key("web")),
    );
    assert!(persisted.unwrap() < sent.unwrap(), "{:?}", t.out);
    for h in ["a", "b", "c"] {
        assert_eq!(limits_on(&t, h), Some(half_cpu()), "host {h}");
    }
    assert_eq!(limits_on(&t, "d"), None, "d runs nothing of web");
    assert_eq!(t.events(EventKind::Limited), 1);
    assert_eq!(t.m.vm(t.now, "web").unwrap().limits, half_cpu());

    // The same limits again: nothing to do; new ones: sent again; none: removed.
    t.m.set_limits(t.now, "web", half_cpu()).unwrap();
    assert_eq!(t.events(EventKind::Limited), 1);
    let more = Limits {
        cpu_millis: 1500,
        ..half_cpu()
    };
    t.m.set_limits(t.now, "web", more).unwrap();
    t.drain();
    assert_eq!(limits_on(&t, "b"), Some(more));
    t.m.set_limits(t.now, "web", Limits::default()).unwrap();
    t.drain();
    assert_eq!(limits_on(&t, "a"), None);
}

#[test]
fn limits_follow_the_vm_through_a_failover_and_a_manager_restart() {
    let mut t = T::protected_vm();
    t.m.set_limits(t.now, "web", half_cpu()).unwrap();
    t.drain();
    t.m.failover(t.now, "web", Some("c")).unwrap();
    t.drain();
    assert_eq!(limits_on(&t, "c"), Some(half_cpu()));
    // A manager started from the persisted state hands out the same limits.
    let state = t.m.state().clone();
    let m = Manager::new(ManagerConfig::default(), state, t.now);
    assert_eq!(m.state().vms["web"].limits, half_cpu());
    let all = m.assignments();
    assert_eq!(all["c"].limits.get("web"), Some(&half_cpu()));
}

#[test]
fn clones_hosts_get_the_limits_and_usage_is_shown() {
    let mut t = protected_room_on_a();
    t.m.set_limits(t.now, "web", half_cpu()).unwrap();
    scale(&mut t, 1).unwrap();
    t.drain();
    let on_a = clones_on(&t, "a");
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(limits_on(&t, "a"), Some(half_cpu()));

    let usage = |of, cpu| ProcUsage {
        vm: "web".into(),
        of,
        cpu_millis: cpu,
        throttled_us: 5,
        mem_bytes: 100 << 20,
        mem_limit_bytes: 256 << 20,
        oom_kills: 0,
        error: String::new(),
    };
    let mut r = with_clones(vec![primary(1, &["b", "c"], true)], &[&on_a[0]], Some(1));
    r.usage = vec![
        usage(UsageOf::Vm(ProcRole::Primary), 490),
        usage(UsageOf::Clone(on_a[0].clone()), 120),
    ];
    t.report_all("a", r);
    t.report_all(
        "b",
        Report {
            vms: vec![backup(1, 10, 5)],
            usage: vec![usage(UsageOf::Vm(ProcRole::Backup), 30)],
            ..Default::default()
        },
    );
    let v = t.m.vm(t.now, "web").unwrap();
    let mut shown: Vec<(String, String, u32)> = v
        .usage
        .iter()
        .map(|u| (u.host.clone(), u.process.clone(), u.usage.cpu_millis))
        .collect();
    shown.sort();
    assert_eq!(
        shown,
        vec![
            ("a".into(), "primary".into(), 490),
            ("a".into(), on_a[0].clone(), 120),
            ("b".into(), "backup".into(), 30),
        ]
    );
}
