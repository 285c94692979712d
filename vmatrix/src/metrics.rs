//! Replication figures: `key=value` fields for `vmatrix ctl status`, and a Prometheus text
//! endpoint (`vmatrix primary --metrics <addr>`, any path, plain HTTP/1.0).
//!
//! Each HTTP client is served on a thread of its own (at most [`MAX_CLIENTS`] at a time; more
//! are disconnected) and must send its request head within [`REQUEST_TIMEOUT`]: a client that
//! connects and sends nothing never delays a scrape.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use primary::Stats;
use vmm::Vm;

/// What a primary's `ctl status` reports besides its counters.
pub struct PrimaryFacts {
    /// Its term.
    pub term: u64,
    /// Backups in its current set.
    pub backups: usize,
    /// Guest output is held until acknowledged (output commit on).
    pub output_held: bool,
}

/// Fields appended to `ctl status` on a primary: `term`, `protected` (true|false, as it always
/// was: the session's first sync or resync is acknowledged), `acked_seq` (highest acknowledged consistent
/// checkpoint, or `none`), `backups` (the set), `backups_in_step`, `output_held` (0|1), then
/// the counters.
pub fn status_fields(s: &Stats, f: &PrimaryFacts) -> String {
    let acked = s.acked.load(Ordering::Relaxed);
    let (p50, p99) = s.pause_percentiles();
    format!(
        "term={} protected={} acked_seq={} backups={} backups_in_step={} output_held={} sync_rounds={} epochs={} epoch_us={} acked_epoch={} pause_p50_us={p50} pause_p99_us={p99} last_pause_us={} max_pause_us={} dirty_pages_sent={} bytes_sent={} ack_latency_us={} released_frames={}",
        f.term,
        s.protected.load(Ordering::Relaxed),
        if acked == 0 { "none".to_string() } else { (acked - 1).to_string() },
        f.backups,
        s.in_step.load(Ordering::Relaxed),
        u8::from(f.output_held),
        s.sync_rounds.load(Ordering::Relaxed),
        s.epochs.load(Ordering::Relaxed),
        s.epoch_us.load(Ordering::Relaxed),
        if acked == 0 { "-".to_string() } else { (acked - 1).to_string() },
        s.last_pause_us.load(Ordering::Relaxed),
        s.max_pause_us.load(Ordering::Relaxed),
        s.pages.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed),
        s.ack_latency_us.load(Ordering::Relaxed),
        s.released_frames.load(Ordering::Relaxed),
    )
}

/// The metrics page in Prometheus text exposition format.
pub fn render(vm: &Vm, s: &Stats) -> String {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (frames, bytes) = vm
        .held_output()
        .map_or((0, 0), |h| (h.0 as u64, h.1 as u64));
    let net = vm.net_stats().unwrap_or_default();
    let metrics: [(&str, &str, &str, u64); 14] = [
        (
            "protected",
            "gauge",
            "1 once the initial sync is acknowledged (output flows).",
            u64::from(s.protected.load(Ordering::Relaxed)),
        ),
        (
            "sync_bytes_sent",
            "counter",
            "Initial sync bytes handed to QUIC.",
            ld(&s.sync_sent_bytes),
        ),
        (
            "epochs_total",
            "counter",
            "Checkpoints sent.",
            ld(&s.epochs),
        ),
        (
            "acked_epochs",
            "gauge",
            "Highest acknowledged checkpoint + 1.",
            ld(&s.acked),
        ),
        (
            "pause_last_microseconds",
            "gauge",
            "Duration of the last checkpoint pause.",
            ld(&s.last_pause_us),
        ),
        (
            "pause_max_microseconds",
            "gauge",
            "Longest checkpoint pause.",
            ld(&s.max_pause_us),
        ),
        (
            "dirty_pages_total",
            "counter",
            "Dirty pages sent.",
            ld(&s.pages),
        ),
        (
            "checkpoint_bytes_total",
            "counter",
            "Checkpoint data bytes sent.",
            ld(&s.bytes),
        ),
        (
            "ack_latency_microseconds",
            "gauge",
            "Last checkpoint's send-to-ack time.",
            ld(&s.ack_latency_us),
        ),
        (
            "released_frames_total",
            "counter",
            "Guest frames released by output commit.",
            ld(&s.released_frames),
        ),
        (
            "held_output_frames",
            "gauge",
            "Guest frames held by output commit.",
            frames,
        ),
        (
            "held_output_bytes",
            "gauge",
            "Bytes held by output commit.",
            bytes,
        ),
        (
            "net_tx_frames_total",
            "counter",
            "Frames sent to the tap.",
            net.tx_frames,
        ),
        (
            "net_rx_frames_total",
            "counter",
            "Frames delivered to the guest.",
            net.rx_frames,
        ),
    ];
    metrics
        .iter()
        .map(|(name, kind, help, v)| {
            format!(
                "# HELP vmatrix_{name} {help}\n# TYPE vmatrix_{name} {kind}\nvmatrix_{name} {v}\n"
            )
        })
        .collect()
}

/// Longest time a client may take to send its request head (and to take the page).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at the same time.
pub const MAX_CLIENTS: usize = 32;

/// Serves the metrics page on `addr` from a background thread.
pub fn serve(addr: SocketAddr, vm: Arc<Vm>, stats: Arc<Stats>) -> anyhow::Result<()> {
    serve_page(addr, Arc::new(move || render(&vm, &stats))).map(|_| ())
}

/// Produces the page.
pub type Page = Arc<dyn Fn() -> String + Send + Sync>;

fn answer(mut c: TcpStream, page: &Page) -> std::io::Result<()> {
    c.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    // The request itself does not matter (any path gets the page), but it must arrive.
    crate::control::read_line_within(
        &mut c,
        |s, t| s.set_read_timeout(Some(t)),
        REQUEST_TIMEOUT,
        b"\r\n\r\n",
    )?;
    let body = page();
    write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Serves `page` over HTTP on `addr` from a background thread, each client on a thread of its
/// own; returns the bound address.
pub fn serve_page(addr: SocketAddr, page: Page) -> anyhow::Result<SocketAddr> {
    let l =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = l.local_addr()?;
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for c in l.incoming().flatten() {
                if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let (page, n) = (page.clone(), clients.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        if let Err(e) = answer(c, &page) {
                            tracing::debug!("metrics client: {e}");
                        }
                        n.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!("metrics client: no thread for it: {e}");
                }
            }
        })
        .context("spawning the metrics thread")?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    #[test]
    fn a_silent_client_does_not_delay_a_scrape() {
        let addr = serve_page(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| "vmatrix_up 1\n".to_string()),
        )
        .unwrap();
        let mut silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.0 200 OK") && reply.ends_with("vmatrix_up 1\n"),
            "{reply}"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        // The silent one is disconnected after the timeout, without a page.
        silent.set_read_timeout(Some(REQUEST_TIMEOUT * 3)).unwrap();
        let mut got = String::new();
        silent.read_to_string(&mut got).unwrap();
        assert_eq!(got, "");
        assert!(t0.elapsed() < REQUEST_TIMEOUT + Duration::from_millis(500));
    }
}
