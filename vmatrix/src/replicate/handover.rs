//! A primary's planned handover (`PUT /handover` on its control socket, `vmatrix ctl <socket>
//! handover`): the guest is paused for good, one
//! more checkpoint is taken of it (the session checkpoints at once: `Stats::hurry`) and, once
//! every backup in the set acknowledged it, all the guest's output has been released and the
//! backups hold exactly the paused guest. The VM then stops without resuming and the process
//! exits with [`HANDED_OVER_EXIT`]; the manager promotes the target backup from that very
//! checkpoint, so no request in flight is lost and clients see only the switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use primary::Stats;
use vmm::Vm;

use crate::control::types::ControlError;

/// Exit code of a primary that handed over.
pub const HANDED_OVER_EXIT: u8 = 4;

/// Longest wait for the final checkpoint's acknowledgement; past it the guest runs on.
pub const LIMIT: Duration = Duration::from_secs(5);

/// Pauses the guest, waits until a checkpoint taken after the pause is acknowledged, sets
/// `handed` (before the VM stops: the process then exits with [`HANDED_OVER_EXIT`], and its
/// status says so meanwhile), stops the VM. Returns that checkpoint's seq. On failure the guest is resumed and nothing changed:
/// 409 when there is nothing to hand over to (or the VM ended), 500 when the checkpoint was
/// not acknowledged in time.
pub fn run(vm: &Vm, stats: &Arc<Stats>, handed: &AtomicBool) -> Result<u64, ControlError> {
    if !stats.protected.load(Ordering::Relaxed) {
        return Err(ControlError::conflict(
            "not protected: nothing to hand over to",
        ));
    }
    vm.pause()
        .map_err(|e| ControlError::conflict(format!("pausing the guest: {e}")))?;
    // A capture under way may have harvested before the pause; the one after it may not.
    let first = stats.epochs.load(Ordering::Relaxed) + 1;
    stats.hurry.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let got = loop {
        let acked = stats.acked.load(Ordering::Relaxed);
        if acked > first {
            break Ok(acked - 1);
        }
        if start.elapsed() > LIMIT {
            break Err(ControlError::failed(format!(
                "checkpoint {first} of the paused guest not acknowledged within {} ms",
                LIMIT.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    stats.hurry.store(false, Ordering::Relaxed);
    match got {
        Ok(seq) => {
            // The acknowledgement releases the output; let the last frames leave.
            let sent = Instant::now();
            while vm.held_output().is_some_and(|h| h.0 > 0)
                && sent.elapsed() < Duration::from_millis(200)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            tracing::info!(
                "handed over: checkpoint {seq} of the paused guest acknowledged after {} µs",
                start.elapsed().as_micros()
            );
            handed.store(true, Ordering::SeqCst);
            vm.stop();
            Ok(seq)
        }
        Err(e) => {
            vm.resume();
            Err(e)
        }
    }
}
