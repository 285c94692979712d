//! Replication figures: a primary's fields of `GET /status` on its control socket, and the
//! Prometheus endpoint (`vmatrix primary --metrics <addr>`, `GET /metrics`): OpenMetrics text
//! encoded by the `prometheus-client` crate and served by axum, as the manager's page is.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
#[cfg(test)]
use std::time::Duration;

use anyhow::Context;
use primary::Stats;
use vmm::Vm;

use crate::control::types::Replication;

/// What a primary's `GET /status` reports besides its counters.
pub struct PrimaryFacts {
    /// Its term.
    pub term: u64,
    /// Backups in its current set.
    pub backups: usize,
    /// Guest output is held until acknowledged (output commit on).
    pub output_held: bool,
    /// It handed over: its guest is stopped for good.
    pub handed_over: bool,
    /// `Vm::dirty_source`.
    pub dirty_source: &'static str,
    /// Pauses may run at real-time priority (`Vm::rt_pause`).
    pub rt_pause: bool,
    /// `--rt-pause`: `auto`, `on`, `off`.
    pub rt_mode: &'static str,
    /// A pause now would run at real-time priority.
    pub rt_boosting: bool,
    /// `Vm::rt_counts`.
    pub rt_counts: (u64, u64),
    /// `Vm::dirty_ring_full`.
    pub dirty_ring_full: u64,
}

/// A primary's replication figures in `GET /status` (`control::types::Replication`):
/// `protected` (the session's first sync or resync is acknowledged), `acked_seq` (highest
/// acknowledged consistent checkpoint, or null), `backups` (the set), `backups_in_step`,
/// `output_held`, then the counters.
pub fn replication_status(s: &Stats, f: &PrimaryFacts) -> Replication {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let acked = ld(&s.acked);
    let (p50, p99) = s.pause_percentiles();
    Replication {
        term: f.term,
        protected: s.protected.load(Ordering::Relaxed),
        acked_seq: acked.checked_sub(1),
        backups: f.backups as u64,
        backups_in_step: ld(&s.in_step),
        output_held: f.output_held,
        sync_rounds: ld(&s.sync_rounds),
        epochs: ld(&s.epochs),
        epoch_us: ld(&s.epoch_us),
        acked_epoch: acked.checked_sub(1),
        pause_p50_us: u64::from(p50),
        pause_p99_us: u64::from(p99),
        last_pause_us: ld(&s.last_pause_us),
        max_pause_us: ld(&s.max_pause_us),
        dirty_pages_sent: ld(&s.pages),
        bytes_sent: ld(&s.bytes),
        ack_latency_us: ld(&s.ack_latency_us),
        released_frames: ld(&s.released_frames),
        handed_over: f.handed_over,
        dirty_source: f.dirty_source.to_string(),
        rt_pause: f.rt_pause,
        rt_mode: f.rt_mode.to_string(),
        rt_boosting: f.rt_boosting,
        rt_boosted_pauses: f.rt_counts.0,
        rt_boosts: f.rt_counts.1,
        dirty_ring_full: f.dirty_ring_full,
        early_copied_pages: ld(&s.early_pages),
        stalls: ld(&s.stalls),
    }
}

/// One figure of the page: name (without prefix or `_total`), help, counter or gauge, value.
type Figure = (&'static str, &'static str, bool, u64);

/// The figures of a primary, read at scrape time: replication's, then its VM's.
fn figures(vm: &Vm, s: &Stats) -> Vec<Figure> {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut figs = vec![
        (
            "protected",
            "1 once the initial sync is acknowledged (output flows)",
            false,
            u64::from(s.protected.load(Ordering::Relaxed)),
        ),
        (
            "sync_bytes_sent",
            "Initial sync bytes handed to QUIC",
            true,
            ld(&s.sync_sent_bytes),
        ),
        ("epochs", "Checkpoints sent", true, ld(&s.epochs)),
        (
            "acked_epochs",
            "Highest acknowledged checkpoint + 1",
            false,
            ld(&s.acked),
        ),
        (
            "pause_last_microseconds",
            "Duration of the last checkpoint pause",
            false,
            ld(&s.last_pause_us),
        ),
        (
            "pause_max_microseconds",
            "Longest checkpoint pause",
            false,
            ld(&s.max_pause_us),
        ),
        ("dirty_pages", "Dirty pages sent", true, ld(&s.pages)),
        (
            "early_copied_pages",
            "Dirty pages copied while the guest ran, before their epoch's pause",
            true,
            ld(&s.early_pages),
        ),
        (
            "checkpoint_bytes",
            "Checkpoint data bytes sent",
            true,
            ld(&s.bytes),
        ),
        (
            "ack_latency_microseconds",
            "Last checkpoint's send-to-ack time",
            false,
            ld(&s.ack_latency_us),
        ),
        (
            "released_frames",
            "Guest frames released by output commit",
            true,
            ld(&s.released_frames),
        ),
        (
            "stalls",
            "Stalls of the primary's process noticed (output then waits for a later checkpoint)",
            true,
            ld(&s.stalls),
        ),
    ];
    figs.extend(vm_figures(vm));
    figs
}

/// The VM's figures: its pause path, held output and network.
fn vm_figures(vm: &Vm) -> Vec<Figure> {
    let (frames, bytes) = vm
        .held_output()
        .map_or((0, 0), |h| (h.0 as u64, h.1 as u64));
    let net = vm.net_stats().unwrap_or_default();
    let (boosted, boosts) = vm.rt_counts();
    vec![
        (
            "rt_boosted_pauses",
            "Checkpoint pauses run at real-time priority (`--rt-pause`)",
            true,
            boosted,
        ),
        (
            "rt_boosts",
            "Times `--rt-pause auto` turned real-time pauses on (pauses seen waiting for the scheduler)",
            true,
            boosts,
        ),
        (
            "held_output_frames",
            "Guest frames held by output commit",
            false,
            frames,
        ),
        (
            "held_output_bytes",
            "Bytes held by output commit",
            false,
            bytes,
        ),
        (
            "net_tx_frames",
            "Frames sent to the tap",
            true,
            net.tx_frames,
        ),
        (
            "net_rx_frames",
            "Frames delivered to the guest",
            true,
            net.rx_frames,
        ),
    ]
}

/// Encodes figures with the `prometheus-client` crate (OpenMetrics text; counters get their
/// `_total` suffix from it).
pub fn encode_figures(figs: &[Figure]) -> String {
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    let mut reg = prometheus_client::registry::Registry::with_prefix("vmatrix");
    for &(name, help, counter, v) in figs {
        if counter {
            let c: Counter = Counter::default();
            c.inc_by(v);
            reg.register(name, help, c);
        } else {
            let g: Gauge = Gauge::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            reg.register(name, help, g);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// The metrics page of a primary (OpenMetrics text, which Prometheus scrapes).
pub fn render(vm: &Vm, s: &Stats) -> String {
    encode_figures(&figures(vm, s))
}

/// Content type of the page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the metrics page on `addr` from a background thread.
pub fn serve(addr: SocketAddr, vm: Arc<Vm>, stats: Arc<Stats>) -> anyhow::Result<()> {
    serve_page(addr, Arc::new(move || render(&vm, &stats))).map(|_| ())
}

/// Produces the page.
pub type Page = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `page` at `/metrics` over HTTP (axum, on a thread of its own with a small runtime);
/// returns the bound address. Each connection is served by its own task, so a client that
/// connects and sends nothing never delays a scrape.
pub fn serve_page(addr: SocketAddr, page: Page) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    l.set_nonblocking(true)?;
    let bound = l.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("metrics runtime")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let page = page.clone();
                        async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], page()) }
                    }),
                );
                match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            tracing::warn!("metrics server: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("metrics server: {e}"),
                }
            })
        })
        .context("spawning the metrics thread")?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    #[test]
    fn a_silent_client_does_not_delay_a_scrape() {
        let addr = serve_page(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| encode_figures(&[("up", "Up", false, 1), ("epochs", "E", true, 7)])),
        )
        .unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("\nvmatrix_up 1\n"), "{reply}");
        assert!(reply.contains("# TYPE vmatrix_epochs counter\n"), "{reply}");
        assert!(reply.contains("\nvmatrix_epochs_total 7\n"), "{reply}");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
}
