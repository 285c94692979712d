//! Progress of a protected VM's initial sync on the terminal: a redrawn bar when stderr is a
//! terminal, otherwise one plain line per pre-copy round (for logs and CI output).

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use primary::Stats;

const WIDTH: usize = 30;

/// The bar for `sent` of `queued` bytes in round `round`.
pub fn bar(round: u64, sent: u64, queued: u64) -> String {
    let frac = match queued {
        0 => 0.0,
        q => (sent as f64 / q as f64).min(1.0),
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    format!(
        "initial sync [{}{}] {:>5.1}%  {:.1}/{:.1} MiB  round {round}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        sent as f64 / (1 << 20) as f64,
        queued as f64 / (1 << 20) as f64,
    )
}

/// Shows the initial sync's progress until the VM is protected (or `give_up` passes).
pub fn spawn(stats: Arc<Stats>, give_up: Duration) {
    let tty = std::io::stderr().is_terminal();
    let _ = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let start = Instant::now();
            let mut last_round = 0;
            while start.elapsed() < give_up {
                let round = stats.sync_rounds.load(Ordering::Relaxed);
                let sent = stats.sync_sent_bytes.load(Ordering::Relaxed);
                let queued = stats.sync_queued_bytes.load(Ordering::Relaxed);
                let done = stats.protected.load(Ordering::Relaxed);
                if tty && round > 0 {
                    eprint!("\r{}", bar(round, if done { queued } else { sent }, queued));
                    let _ = std::io::stderr().flush();
                } else if !tty && round > last_round {
                    eprintln!(
                        "vmatrix primary: initial sync round {round}: {:.1} MiB queued so far",
                        queued as f64 / (1 << 20) as f64
                    );
                }
                last_round = round;
                if done {
                    if tty {
                        eprintln!();
                    }
                    eprintln!(
                        "vmatrix primary: protected after {:.0} ms ({round} sync rounds, {:.1} MiB)",
                        start.elapsed().as_secs_f64() * 1e3,
                        queued as f64 / (1 << 20) as f64
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_with_progress() {
        assert!(bar(1, 0, 0).contains("[......"));
        assert!(bar(2, 50, 100).contains(" 50.0%"));
        assert!(bar(3, 300, 100).contains("100.0%"));
    }
}
