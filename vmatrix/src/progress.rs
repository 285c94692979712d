//! Progress of a protected VM's initial sync on the terminal: an `indicatif` bar (bytes sent of
//! bytes queued, the round in its message) when stderr is a terminal, otherwise one plain line
//! per pre-copy round (for logs and CI output).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use primary::Stats;

/// The bar's look.
fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "initial sync [{bar:30}] {percent:>3}%  {bytes}/{total_bytes}  {msg}  {elapsed}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>.")
}

/// Shows the initial sync's progress until the VM is protected (or `give_up` passes).
pub fn spawn(stats: Arc<Stats>, give_up: Duration) {
    let tty = std::io::stderr().is_terminal();
    let _ = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let start = Instant::now();
            let bar = tty.then(|| {
                let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                b.set_style(style());
                b
            });
            let mut last_round = 0;
            while start.elapsed() < give_up {
                let round = stats.sync_rounds.load(Ordering::Relaxed);
                let sent = stats.sync_sent_bytes.load(Ordering::Relaxed);
                let queued = stats.sync_queued_bytes.load(Ordering::Relaxed);
                let done = stats.protected.load(Ordering::Relaxed);
                match &bar {
                    Some(b) if round > 0 => {
                        b.set_length(queued);
                        b.set_position(if done { queued } else { sent.min(queued) });
                        b.set_message(format!("round {round}"));
                    }
                    None if round > last_round => eprintln!(
                        "vmatrix primary: initial sync round {round}: {:.1} MiB queued so far",
                        queued as f64 / (1 << 20) as f64
                    ),
                    _ => {}
                }
                last_round = round;
                if done {
                    if let Some(b) = &bar {
                        b.finish();
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
            if let Some(b) = &bar {
                b.abandon();
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_renders_bytes_and_round() {
        let b = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::hidden());
        b.set_style(style());
        b.set_position(50);
        b.set_message("round 2");
        assert_eq!(b.position(), 50);
        assert_eq!(b.message(), "round 2");
    }
}
