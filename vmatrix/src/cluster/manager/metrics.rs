//! The manager's `/metrics` page (OpenMetrics text, which Prometheus scrapes), built with the
//! `prometheus-client` crate from figures the decision loop hands over at each scrape.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::core::Figures;

/// Content type of the page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every status a VM can show (each is exported, 0 when no VM has it).
pub const STATUSES: [&str; 7] = [
    "starting",
    "promoting",
    "protected",
    "unprotected",
    "syncing",
    "unreachable",
    "down",
];

type Labels = Vec<(String, String)>;

/// The status label of a VM's status text (`unprotected (syncing)` → `syncing`).
pub fn status_label(status: &str) -> &str {
    match status {
        "unprotected (syncing)" => "syncing",
        s => s,
    }
}

struct Inner {
    registry: Registry,
    vms: Family<Labels, Gauge>,
    hosts_up: Gauge,
    failovers: Counter,
    switchovers: Counter,
    last_detect: Gauge,
    last_promote: Gauge,
    events: Counter,
}

/// The page's metrics.
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Raises a counter to `v` (the manager's counters only grow).
fn raise(c: &Counter, v: u64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmatrix_manager");
        let vms = Family::<Labels, Gauge>::default();
        registry.register("vms", "VMs by status", vms.clone());
        let hosts_up = Gauge::default();
        registry.register("hosts_up", "Hosts whose agent heartbeats", hosts_up.clone());
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Promotions after a detected primary failure",
            failovers.clone(),
        );
        let switchovers = Counter::default();
        registry.register(
            "switchovers",
            "Promotions asked for by a user (failover, migration)",
            switchovers.clone(),
        );
        let last_detect = Gauge::default();
        registry.register(
            "last_detect_ms",
            "Last detection: the failed primary's last sign of life to the decision, ms (0: none yet)",
            last_detect.clone(),
        );
        let last_promote = Gauge::default();
        registry.register(
            "last_promote_ms",
            "Last promotion: the decision to the new primary reported running, ms (0: none yet)",
            last_promote.clone(),
        );
        let events = Counter::default();
        registry.register(
            "events",
            "Events logged by this manager process",
            events.clone(),
        );
        Metrics {
            inner: Mutex::new(Inner {
                registry,
                vms,
                hosts_up,
                failovers,
                switchovers,
                last_detect,
                last_promote,
                events,
            }),
        }
    }

    /// The page for these figures.
    pub fn render(&self, f: &Figures, events: u64) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for s in STATUSES {
            let n = f.vm_status.iter().filter(|v| status_label(v) == s).count();
            m.vms
                .get_or_create(&vec![("status".to_string(), s.to_string())])
                .set(n as i64);
        }
        // A status this build does not list still shows.
        for v in &f.vm_status {
            let s = status_label(v);
            if !STATUSES.contains(&s) {
                let n = f.vm_status.iter().filter(|x| status_label(x) == s).count();
                m.vms
                    .get_or_create(&vec![("status".to_string(), s.to_string())])
                    .set(n as i64);
            }
        }
        m.hosts_up.set(f.hosts_up as i64);
        raise(&m.failovers, f.failovers);
        raise(&m.switchovers, f.switchovers);
        m.last_detect.set(f.last_detect_ms.unwrap_or(0) as i64);
        m.last_promote.set(f.last_promote_ms.unwrap_or(0) as i64);
        raise(&m.events, events);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &m.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_every_metric() {
        let m = Metrics::new();
        let f = Figures {
            vm_status: vec!["protected".into(), "unprotected (syncing)".into()],
            hosts_up: 2,
            failovers: 1,
            switchovers: 0,
            last_detect_ms: Some(70),
            last_promote_ms: None,
        };
        let page = m.render(&f, 5);
        for want in [
            "vmatrix_manager_vms{status=\"protected\"} 1",
            "vmatrix_manager_vms{status=\"syncing\"} 1",
            "vmatrix_manager_vms{status=\"down\"} 0",
            "vmatrix_manager_hosts_up 2",
            "vmatrix_manager_failovers_total 1",
            "vmatrix_manager_switchovers_total 0",
            "vmatrix_manager_last_detect_ms 70",
            "vmatrix_manager_last_promote_ms 0",
            "vmatrix_manager_events_total 5",
            "# EOF",
        ] {
            assert!(page.contains(want), "{want} missing from\n{page}");
        }
        let page = m.render(&Figures { failovers: 3, ..f }, 9);
        assert!(page.contains("vmatrix_manager_failovers_total 3"), "{page}");
    }
}
