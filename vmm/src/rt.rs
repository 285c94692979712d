//! Real-time priority for the pause path (issue 12): a pause that waits for the scheduler is
//! not a sub-millisecond pause. With a CPU-bound neighbour on the host, the vCPU thread that
//! must leave `KVM_RUN` and park, and the thread that waits for it and captures, each wait
//! behind the neighbour's time slice (milliseconds under CFS).
//!
//! [`PauseBoost`] raises both threads to `SCHED_FIFO` for the pause only: from the pause
//! request to the resume. The rest of the time they run as ordinary threads, so a busy guest
//! never starves its neighbours (and the kernel's real-time throttling, 95 % of a CPU by
//! default, still bounds a boosted thread). A thread already running under a real-time policy
//! (set by the user) is left alone. Without the privilege (`CAP_SYS_NICE`, or an
//! `RLIMIT_RTPRIO` of 1) the boost turns itself off, said once in the log. Only short captures
//! are boosted (incremental checkpoints after one of at most `vm::BOOST_MAX_PAGES` pages): a
//! full capture or snapshot that copies all of guest RAM in its pause is not, nor the epochs
//! of a guest writing a gigabyte, so no thread runs real-time for seconds (at most one
//! capture after a small one can be big).

use std::sync::atomic::{AtomicBool, Ordering};

/// The `SCHED_FIFO` priority of a boosted thread (the lowest: above every ordinary thread,
/// below any real-time one the host runs).
pub const BOOST_PRIORITY: i32 = 1;

/// CPU time used so far by every thread of this process (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

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

/// Threads raised for one pause, to lower at its resume (a pause that raised nothing holds
/// none).
#[derive(Debug, Default)]
#[must_use = "lower what was raised"]
pub struct Boosted(Vec<i32>);

impl Boosted {
    /// Splits off thread `tid`: (`tid` if it was raised, the others).
    pub fn split(self, tid: i32) -> (Boosted, Boosted) {
        let (a, b) = self.0.into_iter().partition(|&t| t == tid);
        (Boosted(a), Boosted(b))
    }
}

/// Raises threads to `SCHED_FIFO` for a pause and lowers them again (see the module docs).
#[derive(Debug, Default)]
pub struct PauseBoost {
    enabled: AtomicBool,
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

    /// Raises every ordinary thread of `tids` to `SCHED_FIFO` (with `SCHED_RESET_ON_FORK`:
    /// a thread it starts meanwhile is ordinary). Without the privilege the boost turns itself
    /// off, said once: no syscalls per pause for nothing.
    pub fn raise(&self, tids: &[i32]) -> Boosted {
        let mut out = Vec::new();
        if !self.enabled() {
            return Boosted(out);
        }
        for &tid in tids {
            if out.contains(&tid) || policy(tid).ok() != Some(libc::SCHED_OTHER) {
                continue;
            }
            match set(
                tid,
                libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                BOOST_PRIORITY,
            ) {
                Ok(()) => out.push(tid),
                // A thread that exited meanwhile (a vCPU thread ending): nothing to raise;
                // only a refusal turns the boost off.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => {
                    self.set_enabled(false);
                    tracing::warn!(
                        "no real-time priority for the pause path ({e}): pauses wait for the \
                         scheduler on a busy host; boost off"
                    );
                    break;
                }
            }
        }
        Boosted(out)
    }

    /// Lowers the threads of `b` that `keep_ok` accepts back to `SCHED_OTHER`.
    pub fn lower_if(&self, b: Boosted, keep_ok: impl Fn(i32) -> bool) {
        for tid in b.0.into_iter().filter(|t| keep_ok(*t)) {
            // (A thread that exited meanwhile: nothing to lower.)
            let _ = set(tid, libc::SCHED_OTHER, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowers this thread even if the test fails half way.
    struct Lower;
    impl Drop for Lower {
        fn drop(&mut self) {
            let _ = set(gettid(), libc::SCHED_OTHER, 0);
        }
    }

    #[test]
    fn the_caller_is_split_off_to_be_lowered_last() {
        let (mine, others) = Boosted(vec![7, 3, 9]).split(3);
        assert_eq!((mine.0, others.0), (vec![3], vec![7, 9]));
        let (mine, others) = Boosted(vec![7]).split(3);
        assert!(mine.0.is_empty());
        assert_eq!(others.0, vec![7]);
    }

    #[test]
    fn a_boost_raises_ordinary_threads_for_the_pause_only() {
        let _lower = Lower;
        let b = PauseBoost::default();
        let me = gettid();
        let ordinary = policy(me).unwrap() == libc::SCHED_OTHER;
        assert!(b.raise(&[me]).0.is_empty(), "off by default");
        b.set_enabled(true);
        let raised = b.raise(&[me, me]);
        if raised.0.is_empty() {
            // No privilege here (or not an ordinary thread): nothing changed, and without the
            // privilege the boost turned itself off.
            assert!(!ordinary || !b.enabled());
            return;
        }
        assert_eq!(raised.0, [me], "each thread once");
        assert_eq!(
            policy(me).unwrap() & !libc::SCHED_RESET_ON_FORK,
            libc::SCHED_FIFO
        );
        // A thread already real-time is not raised again.
        assert!(b.raise(&[me]).0.is_empty());
        // One the caller says must not be touched stays as it is.
        b.lower_if(Boosted(vec![me]), |_| false);
        assert_ne!(policy(me).unwrap(), libc::SCHED_OTHER);
        b.lower_if(raised, |_| true);
        assert_eq!(policy(me).unwrap(), libc::SCHED_OTHER);
    }
}
