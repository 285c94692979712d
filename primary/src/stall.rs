//! Noticing that this process was stopped (SIGSTOP of its host, a VM migration of the host, a
//! long scheduler stall), so that acknowledgements that waited through the stop release nothing.
//!
//! Why: while the primary is stopped, the manager may declare it dead and promote a backup.
//! Acknowledgements that backup sent *before* its promotion can wait in this process's socket
//! and channel queues through the stop; handled after it as fresh, they would release output
//! beside the new primary (the chaos sweep saw it: a host stopped for 3.9 s sent one frame the
//! instant it was continued, in the middle of the promoted primary's service). The release lease
//! ([`crate::driver::RELEASE_LEASE`]) covers a stop between handling an acknowledgement and
//! sending; this covers a stop before handling it.
//!
//! How: a thread of its own ticks every [`TICK`] and notes each tick's time; a gap longer than
//! [`STALL`] between two ticks is a stall, and so is a last tick older than [`STALL`] when the
//! loop looks (the loop may run before the ticker after a continue). The loop looks before it
//! hands any input to the policy ([`StallClock::check`]); the policy then releases output only
//! on acknowledgements of checkpoints taken after the stall (`Policy::handle_stall`): a backup
//! promoted meanwhile refuses those (stale term), which fences this primary; otherwise the
//! output waits one more checkpoint round trip. [`STALL`] (25 ms) is well under the manager's
//! detection timeout (60 ms by default): a stop short enough to go unnoticed here is too short
//! for a promotion. A false alarm (a thread descheduled for 25 ms on a busy host, a cgroup's
//! CPU quota) costs only that extra round trip.
//!
//! The detector's logic ([`Ticks`]) is pure and takes the time in; the thread only feeds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often the ticker notes the time.
pub const TICK: Duration = Duration::from_millis(5);

/// A gap longer than this is a stall.
pub const STALL: Duration = Duration::from_millis(25);

/// A stall: when it was noticed, and how long it was at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// When it was noticed (its end, or later).
    pub at: Instant,
    /// Its length, at least.
    pub gap: Duration,
}

/// The ticks' record, shared between the ticker and the loop (lock-free).
#[derive(Debug)]
pub struct Ticks {
    base: Instant,
    /// The last tick, ns since `base`.
    last: AtomicU64,
    /// The last stall the ticker saw: when (ns since `base`, 0: none) and its gap (ns).
    mark: AtomicU64,
    mark_gap: AtomicU64,
}

impl Ticks {
    /// A record whose first tick is `now`.
    pub fn new(now: Instant) -> Self {
        Ticks {
            base: now,
            last: AtomicU64::new(0),
            mark: AtomicU64::new(0),
            mark_gap: AtomicU64::new(0),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// A tick at `now` (the ticker's).
    pub fn tick(&self, now: Instant) {
        let t = self.ns(now).max(1);
        let gap = t.saturating_sub(self.last.load(Ordering::Acquire));
        if gap > STALL.as_nanos() as u64 {
            // (The gap first, then the mark, then the tick: a reader that sees this tick sees
            // the mark too.)
            self.mark_gap.store(gap, Ordering::Release);
            self.mark.store(t, Ordering::Release);
        }
        self.last.store(t, Ordering::Release);
    }

    /// Whether a stall happened since the caller's last look (`seen`: what it saw last,
    /// updated), looking at `now`. A stall reported before the ticker saw it is not reported
    /// again when it does.
    pub fn check(&self, now: Instant, seen: &mut Seen) -> Option<Stall> {
        let last = self.last.load(Ordering::Acquire);
        let mark = self.mark.load(Ordering::Acquire);
        let gap = self.mark_gap.load(Ordering::Acquire);
        let since_tick = self.ns(now).saturating_sub(last);
        if since_tick > STALL.as_nanos() as u64 {
            // The ticker has not run since: stopped with us, or not scheduled yet.
            seen.reported_after = Some(last);
            return Some(Stall {
                at: now,
                gap: Duration::from_nanos(since_tick),
            });
        }
        if mark == seen.mark {
            return None;
        }
        seen.mark = mark;
        if seen.reported_after == Some(mark - gap) {
            // The ticker's view of the stall already reported.
            return None;
        }
        Some(Stall {
            at: now,
            gap: Duration::from_nanos(gap),
        })
    }
}

/// What a reader of [`Ticks`] saw last.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    /// The ticker's last stall mark.
    mark: u64,
    /// A stall reported before the ticker saw it: the tick it came after.
    reported_after: Option<u64>,
}

/// The process's stall clock: [`Ticks`] fed by a thread of its own (started on first use).
pub struct StallClock {
    ticks: &'static Ticks,
    seen: Seen,
}

impl StallClock {
    /// A view of the process's ticker (starting it if it is not running yet). A new view sees
    /// no stall from before it was made.
    pub fn new() -> Self {
        let ticks = ticker();
        StallClock {
            ticks,
            seen: Seen {
                mark: ticks.mark.load(Ordering::Acquire),
                reported_after: None,
            },
        }
    }

    /// A stall since the last look, if there was one.
    pub fn check(&mut self, now: Instant) -> Option<Stall> {
        self.ticks.check(now, &mut self.seen)
    }
}

impl Default for StallClock {
    fn default() -> Self {
        Self::new()
    }
}

fn ticker() -> &'static Ticks {
    static TICKS: OnceLock<&'static Ticks> = OnceLock::new();
    TICKS.get_or_init(|| {
        let ticks: &'static Ticks = Box::leak(Box::new(Ticks::new(Instant::now())));
        ticks.tick(Instant::now());
        let spawned = std::thread::Builder::new()
            .name("stall-clock".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticks.tick(Instant::now());
            });
        if let Err(e) = spawned {
            // Without the ticker every look reports a stall: output waits a round trip more
            // each time, but nothing unsafe is released.
            tracing::error!("cannot start the stall clock's thread: {e}");
        }
        ticks
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn regular_ticks_are_no_stall() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        for i in 1..100 {
            t.tick(t0 + TICK * i);
            assert_eq!(t.check(t0 + TICK * i + MS, &mut seen), None);
        }
    }

    #[test]
    fn a_look_before_the_ticker_ran_again_is_a_stall() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        t.tick(t0 + 5 * MS);
        // Continued after 3.9 s: the loop looks first.
        let s = t.check(t0 + 3905 * MS, &mut seen).expect("a stall");
        assert_eq!(s.gap, 3900 * MS);
        // The ticker runs, then the loop looks again: the same stall is not reported again.
        t.tick(t0 + 3906 * MS);
        assert_eq!(t.check(t0 + 3907 * MS, &mut seen), None);
        t.tick(t0 + 3911 * MS);
        assert_eq!(t.check(t0 + 3912 * MS, &mut seen), None);
    }

    #[test]
    fn a_gap_the_ticker_saw_is_reported_once() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        t.tick(t0 + 5 * MS);
        t.tick(t0 + 105 * MS);
        let s = t.check(t0 + 106 * MS, &mut seen).expect("a stall");
        assert_eq!(s.gap, 100 * MS);
        assert_eq!(t.check(t0 + 107 * MS, &mut seen), None);
        // Short gaps (a busy host) are not stalls.
        t.tick(t0 + 125 * MS);
        assert_eq!(t.check(t0 + 126 * MS, &mut seen), None);
    }

    #[test]
    fn the_process_ticker_runs() {
        let mut c = StallClock::new();
        std::thread::sleep(TICK * 3);
        // (A busy host may delay the ticker: only check that it ticked at all.)
        let last = c.ticks.last.load(Ordering::Acquire);
        assert!(last > 0);
        let _ = c.check(Instant::now());
    }
}
