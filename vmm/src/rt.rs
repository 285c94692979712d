//! Real-time priority for the pause path (issue 12): a pause that waits for the scheduler is
//! not a sub-millisecond pause. With a CPU-bound neighbour on the host, the vCPU thread that
//! must leave `KVM_RUN` and park, and the thread that waits for it and captures, each wait
//! behind the neighbour's time slice (milliseconds under CFS).
//!
//! [`PauseBoost`] raises both threads to `SCHED_FIFO` for the pause only: from the pause
//! request to the resume. The rest of the time they run as ordinary threads, so a busy guest
//! never starves its neighbours (and the kernel's real-time throttling, 95 % of a CPU by
//! default, still bounds a boosted thread). A thread already running under a real-time policy
//! (set by the user) is left alone. Without the privilege (`CAP_SYS_NICE`) the boost is
//! skipped, said once in the log.

use std::sync::atomic::{AtomicBool, Ordering};

/// The `SCHED_FIFO` priority of a boosted thread (the lowest: above every ordinary thread,
/// below any real-time one the host runs).
pub const BOOST_PRIORITY: i32 = 1;

/// This thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// The scheduling policy of thread `tid` (`SCHED_OTHER`, `SCHED_FIFO`, ...).
fn policy(tid: i32) -> std::io::Result<i32> {
    // SAFETY: sched_getscheduler only reads the policy of the thread `tid`.
    let p = unsafe { libc::sched_getscheduler(tid) };
    match p {
        p if p < 0 => Err(std::io::Error::last_os_error()),
        p => Ok(p),
    }
}

/// Sets thread `tid` to `policy` at `priority`.
fn set(tid: i32, policy: i32, priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; the call only changes
    // the scheduling of thread `tid`.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Raises threads to `SCHED_FIFO` for a pause and lowers them again (see the module docs).
#[derive(Debug, Default)]
pub struct PauseBoost {
    enabled: AtomicBool,
    warned: AtomicBool,
}

impl PauseBoost {
    /// Boosts pauses from now on (or not).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether pauses are boosted.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Raises every ordinary thread of `tids` to `SCHED_FIFO`; the ones raised (to lower
    /// again with [`PauseBoost::lower`]).
    pub fn raise(&self, tids: &[i32]) -> Vec<i32> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &tid in tids {
            if out.contains(&tid) || policy(tid).ok() != Some(libc::SCHED_OTHER) {
                continue;
            }
            match set(tid, libc::SCHED_FIFO, BOOST_PRIORITY) {
                Ok(()) => out.push(tid),
                Err(e) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "no real-time priority for the pause path ({e}): pauses wait for \
                             the scheduler on a busy host"
                        );
                    }
                }
            }
        }
        out
    }

    /// Lowers threads raised by [`PauseBoost::raise`] back to `SCHED_OTHER`.
    pub fn lower(&self, tids: &[i32]) {
        for &tid in tids {
            // (A thread that exited meanwhile: nothing to lower.)
            let _ = set(tid, libc::SCHED_OTHER, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boost_raises_ordinary_threads_for_the_pause_only() {
        let b = PauseBoost::default();
        let me = gettid();
        assert!(b.raise(&[me]).is_empty(), "off by default");
        b.set_enabled(true);
        let raised = b.raise(&[me, me]);
        if raised.is_empty() {
            // (No CAP_SYS_NICE where this runs: skipped, said once; nothing changed.)
            assert_eq!(policy(me).unwrap(), libc::SCHED_OTHER);
            return;
        }
        assert_eq!(raised, [me], "each thread once");
        assert_eq!(policy(me).unwrap(), libc::SCHED_FIFO);
        // A thread already real-time is not raised again (nor lowered by us).
        assert!(b.raise(&[me]).is_empty());
        b.lower(&raised);
        assert_eq!(policy(me).unwrap(), libc::SCHED_OTHER);
    }
}
