//! Noticing that this process was stopped (SIGSTOP of its host, a long scheduler stall), so that
//! acknowledgements that waited through the stop release nothing.
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
//! detection timeout (60 ms by default), which narrows the window a lot but does not close it
//! alone: the manager's view of silence also includes its own delays. A false alarm (a thread
//! descheduled for 25 ms on a busy host, a cgroup's CPU quota throttling the process) costs the
//! output that was waiting one more checkpoint round trip after it.
//!
//! Not seen here: the loop itself stuck while this thread ticks on (a long step, a lock); nor a
//! stop between the device's lease check and its send (only fencing at the network closes
//! that).
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
    /// The process's CPU time at the last tick, ns.
    last_cpu: AtomicU64,
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
            last_cpu: AtomicU64::new(0),
            mark: AtomicU64::new(0),
            mark_gap: AtomicU64::new(0),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// A tick at `now`, the process having used `cpu` of CPU time so far (the ticker's).
    pub fn tick(&self, now: Instant, cpu: Duration) {
        let t = self.ns(now).max(1);
        let cpu = cpu.as_nanos() as u64;
        let gap = off_cpu(
            t.saturating_sub(self.last.load(Ordering::Acquire)),
            cpu.saturating_sub(self.last_cpu.load(Ordering::Acquire)),
        );
        self.last_cpu.store(cpu, Ordering::Release);
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
    pub fn check(&self, now: Instant, cpu: Duration, seen: &mut Seen) -> Option<Stall> {
        let last = self.last.load(Ordering::Acquire);
        let last_cpu = self.last_cpu.load(Ordering::Acquire);
        let mark = self.mark.load(Ordering::Acquire);
        let gap = self.mark_gap.load(Ordering::Acquire);
        let since_tick = off_cpu(
            self.ns(now).saturating_sub(last),
            (cpu.as_nanos() as u64).saturating_sub(last_cpu),
        );
        if since_tick > STALL.as_nanos() as u64 {
            // The ticker has not run since, and the process did not either: stopped, or not
            // scheduled (not merely the ticker kept waiting while the process worked).
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
        if seen.reported_after == Some(mark.wrapping_sub(gap)) {
            // The ticker's view of the stall already reported.
            return None;
        }
        Some(Stall {
            at: now,
            gap: Duration::from_nanos(gap),
        })
    }
}

/// Of `wall` ns, those the process did not run (`cpu` ns of CPU time used meanwhile, over all
/// its threads: a process busy with a long step of its own — a real-time pause that keeps the
/// ticker waiting — is not stalled; a stopped one uses none).
fn off_cpu(wall: u64, cpu: u64) -> u64 {
    wall.saturating_sub(cpu)
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
    /// no stall from before it was made. Fails if the ticker's thread cannot be started
    /// (without it every look would be a stall, and no output would ever be released).
    pub fn new() -> std::io::Result<Self> {
        let ticks = ticker()?;
        Ok(StallClock {
            ticks,
            seen: Seen {
                mark: ticks.mark.load(Ordering::Acquire),
                reported_after: None,
            },
        })
    }

    /// A stall since the last look, if there was one.
    pub fn check(&mut self, now: Instant) -> Option<Stall> {
        let cpu = vmm::rt::process_cpu_time();
        self.ticks.check(now, cpu, &mut self.seen)
    }
}

fn ticker() -> std::io::Result<&'static Ticks> {
    static TICKS: OnceLock<&'static Ticks> = OnceLock::new();
    static START: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(t) = TICKS.get() {
        return Ok(t);
    }
    let _one = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = TICKS.get() {
        return Ok(t);
    }
    let ticks: &'static Ticks = Box::leak(Box::new(Ticks::new(Instant::now())));
    ticks.tick(Instant::now(), vmm::rt::process_cpu_time());
    std::thread::Builder::new()
        .name("stall-clock".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            ticks.tick(Instant::now(), vmm::rt::process_cpu_time());
        })?;
    Ok(TICKS.get_or_init(|| ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// The process's CPU time in the tests that do not run it: none used.
    const IDLE: Duration = Duration::ZERO;

    #[test]
    fn regular_ticks_are_no_stall() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        for i in 1..100 {
            t.tick(t0 + TICK * i, IDLE);
            assert_eq!(t.check(t0 + TICK * i + MS, IDLE, &mut seen), None);
        }
    }

    #[test]
    fn a_look_before_the_ticker_ran_again_is_a_stall() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        t.tick(t0 + 5 * MS, IDLE);
        // Continued after 3.9 s: the loop looks first.
        let s = t.check(t0 + 3905 * MS, IDLE, &mut seen).expect("a stall");
        assert_eq!(s.gap, 3900 * MS);
        // The ticker runs, then the loop looks again: the same stall is not reported again.
        t.tick(t0 + 3906 * MS, IDLE);
        assert_eq!(t.check(t0 + 3907 * MS, IDLE, &mut seen), None);
        t.tick(t0 + 3911 * MS, IDLE);
        assert_eq!(t.check(t0 + 3912 * MS, IDLE, &mut seen), None);
    }

    #[test]
    fn a_gap_the_ticker_saw_is_reported_once() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        t.tick(t0 + 5 * MS, IDLE);
        t.tick(t0 + 105 * MS, IDLE);
        let s = t.check(t0 + 106 * MS, IDLE, &mut seen).expect("a stall");
        assert_eq!(s.gap, 100 * MS);
        assert_eq!(t.check(t0 + 107 * MS, IDLE, &mut seen), None);
        // Short gaps (a busy host) are not stalls.
        t.tick(t0 + 125 * MS, IDLE);
        assert_eq!(t.check(t0 + 126 * MS, IDLE, &mut seen), None);
    }

    #[test]
    fn a_process_busy_while_the_ticker_waited_is_not_stalled() {
        let t0 = Instant::now();
        let t = Ticks::new(t0);
        let mut seen = Seen::default();
        t.tick(t0 + 5 * MS, IDLE);
        // A 1.5 s real-time step of its own kept the ticker waiting: the process ran.
        assert_eq!(t.check(t0 + 1505 * MS, 1500 * MS, &mut seen), None);
        t.tick(t0 + 1506 * MS, 1500 * MS);
        assert_eq!(t.check(t0 + 1507 * MS, 1501 * MS, &mut seen), None);
        // Stopped 200 ms in the middle of such a step: 200 ms not run is a stall.
        t.tick(t0 + 3206 * MS, 2900 * MS);
        let s = t
            .check(t0 + 3207 * MS, 2901 * MS, &mut seen)
            .expect("a stall");
        assert_eq!(s.gap, 300 * MS);
    }

    #[test]
    fn the_process_ticker_runs() {
        let mut c = StallClock::new().unwrap();
        let first = c.ticks.last.load(Ordering::Acquire);
        // (A busy host may delay the ticker: wait up to 5 s for it to tick again.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.ticks.last.load(Ordering::Acquire) == first {
            assert!(Instant::now() < deadline, "the ticker never ticked");
            std::thread::sleep(TICK);
        }
        let _ = c.check(Instant::now());
    }
}
