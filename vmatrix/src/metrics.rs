//! Replication figures: `key=value` fields for `vmatrix ctl status`, and a Prometheus text
//! endpoint (`vmatrix primary --metrics <addr>`, any path, plain HTTP/1.0).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use primary::Stats;
use vmm::Vm;

/// Fields appended to `ctl status` on a primary.
pub fn status_fields(s: &Stats) -> String {
    let acked = s.acked.load(Ordering::Relaxed);
    let (p50, p99) = s.pause_percentiles();
    format!(
        "protected={} sync_rounds={} epochs={} epoch_us={} acked_epoch={} pause_p50_us={p50} pause_p99_us={p99} last_pause_us={} max_pause_us={} dirty_pages_sent={} bytes_sent={} ack_latency_us={} released_frames={}",
        s.protected.load(Ordering::Relaxed),
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

/// Serves the metrics page on `addr` from a background thread.
pub fn serve(addr: SocketAddr, vm: Arc<Vm>, stats: Arc<Stats>) -> anyhow::Result<()> {
    let l =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut req = [0u8; 1024];
                let _ = c.read(&mut req);
                let body = render(&vm, &stats);
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .context("spawning the metrics thread")?;
    Ok(())
}
