//! Guest events: the "something happened" signal behind the platform device's wait register.
//!
//! Devices call [`GuestEvents::signal`] whenever they make a buffer used (where a VM with an
//! interrupt controller would raise an interrupt). The vCPU blocked in the platform device's
//! wait handler wakes up. A pause request interrupts every wait at once, so pausing never waits
//! for a guest timeout.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a wait returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The timeout elapsed without an event.
    Timeout = 0,
    /// An event happened after the caller's last seen sequence number.
    Event = 1,
    /// The VMM interrupted the wait (pause or stop): a spurious wake-up for the guest.
    Interrupted = 2,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    interrupted: bool,
}

/// Event counter shared by devices and the vCPU.
#[derive(Debug, Default)]
pub struct GuestEvents {
    state: Mutex<State>,
    cv: Condvar,
}

impl GuestEvents {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it; the counter
        // itself is always consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event and wakes any waiter.
    pub fn signal(&self) {
        let mut s = self.lock();
        s.seq = s.seq.wrapping_add(1);
        // Woken after the lock is released, so the waiter does not wake only to block on it
        // (and, on the signaller's CPU, preempt it in between: see `Control::pause`).
        drop(s);
        self.cv.notify_all();
    }

    /// The current event sequence number.
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// Sets or clears the interrupt flag; while set, every wait returns `Interrupted` at once.
    pub fn set_interrupted(&self, on: bool) {
        let mut s = self.lock();
        s.interrupted = on;
        drop(s);
        self.cv.notify_all();
    }

    /// Blocks until the sequence number differs from `seen`, `timeout` passes, or the wait is
    /// interrupted. Returns the outcome and the sequence number to remember.
    pub fn wait(&self, seen: u64, timeout: Duration) -> (WaitOutcome, u64) {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.interrupted {
                return (WaitOutcome::Interrupted, seen);
            }
            if s.seq != seen {
                return (WaitOutcome::Event, s.seq);
            }
            let now = Instant::now();
            if now >= deadline {
                return (WaitOutcome::Timeout, seen);
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn event_before_wait_is_not_lost() {
        let ev = GuestEvents::default();
        let seen = ev.seq();
        ev.signal();
        assert_eq!(ev.wait(seen, Duration::from_secs(5)).0, WaitOutcome::Event);
    }

    #[test]
    fn timeout_and_interrupt() {
        let ev = Arc::new(GuestEvents::default());
        let seen = ev.seq();
        assert_eq!(
            ev.wait(seen, Duration::from_millis(1)).0,
            WaitOutcome::Timeout
        );
        let ev2 = ev.clone();
        let t = std::thread::spawn(move || ev2.wait(seen, Duration::from_secs(30)).0);
        std::thread::sleep(Duration::from_millis(20));
        ev.set_interrupted(true);
        assert_eq!(t.join().unwrap(), WaitOutcome::Interrupted);
    }
}
