//! Where the latency that output commit adds to a reply goes: for each checkpoint that
//! released held output, the times from the guest's first held frame of the epoch to the
//! capture's start (the loop waking), the capture (pause and copy), the checkpoint's encoding
//! and hand-over to the writers, the wait for the acknowledgement (QUIC both ways and the
//! backup's verification and journal write), and the release itself. Sums and a count, read
//! as means ([`ReplyPath::means`]) by the bench and exported as metrics.
//!
//! Only checkpoints taken while no other was in flight are counted (a pipelined checkpoint's
//! acknowledgement wait overlaps the previous one's and would not add up); that is the
//! one-client case the figure is for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The stages, in order.
pub const STAGES: [&str; 5] = ["wake", "capture", "send", "ack", "release"];

/// Sums of each stage over the checkpoints counted, ns, and their count.
#[derive(Debug, Default)]
pub struct ReplyPath {
    sums: [AtomicU64; 5],
    count: AtomicU64,
}

impl ReplyPath {
    /// Adds one checkpoint's stage durations.
    pub fn add(&self, stages: [Duration; 5]) {
        for (s, d) in self.sums.iter().zip(stages) {
            s.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Checkpoints counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Each stage's sum, ns.
    pub fn sums(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.sums[i].load(Ordering::Relaxed))
    }

    /// Each stage's mean over the checkpoints counted since `since` (an earlier
    /// [`ReplyPath::snapshot`]), or None if none were.
    pub fn means(&self, since: ([u64; 5], u64)) -> Option<[Duration; 5]> {
        let (sums, n) = self.snapshot();
        let n = n.checked_sub(since.1).filter(|&n| n > 0)?;
        Some(std::array::from_fn(|i| {
            Duration::from_nanos(sums[i].saturating_sub(since.0[i]) / n)
        }))
    }

    /// The sums and count now (a starting point for [`ReplyPath::means`]).
    pub fn snapshot(&self) -> ([u64; 5], u64) {
        (self.sums(), self.count())
    }
}

/// When the guest's output of the current epoch started waiting: set by the VM's output waker
/// (on the vCPU thread), taken by the loop at each capture.
#[derive(Debug)]
pub(crate) struct OutputClock {
    base: Instant,
    /// ns since `base` + 1 of the first held frame since the last take (0: none).
    first: AtomicU64,
}

impl OutputClock {
    pub fn new() -> Self {
        OutputClock {
            base: Instant::now(),
            first: AtomicU64::new(0),
        }
    }

    /// Output is waiting now (keeps the first time until taken).
    pub fn mark(&self) {
        let ns = self.base.elapsed().as_nanos() as u64 + 1;
        let _ = self
            .first
            .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The first mark since the last take.
    pub fn take(&self) -> Option<Instant> {
        match self.first.swap(0, Ordering::Relaxed) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns - 1)),
        }
    }
}

/// The checkpoint in flight: the output epoch it closed, and its times so far.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    epoch: u64,
    /// The guest's first held frame of the epoch.
    output: Option<Instant>,
    start: Instant,
    end: Instant,
    /// Handed to the writers.
    flushed: Option<Instant>,
}

/// The loop's record of the checkpoint in flight (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    current: Option<InFlight>,
    /// Not counted: another checkpoint was in flight when it was taken.
    overlapped: bool,
}

impl Tracker {
    /// A capture that closed output epoch `epoch`, whose first held frame was sent at
    /// `output` (None: no output, or not known), ran from `start` to `end`.
    pub fn captured(&mut self, epoch: u64, output: Option<Instant>, start: Instant, end: Instant) {
        self.overlapped = self.current.is_some();
        self.current = Some(InFlight {
            epoch,
            output,
            start,
            end,
            flushed: None,
        });
    }

    /// The loop handed the policy's frames to the writers.
    pub fn flushed(&mut self, at: Instant) {
        if let Some(InFlight {
            flushed: f @ None, ..
        }) = &mut self.current
        {
            *f = Some(at);
        }
    }

    /// Output up to epoch `upto` was released at `done`, authorized by input handled at
    /// `acked`; the checkpoint's stages go to `path` if it is covered and was alone in flight.
    pub fn released(&mut self, upto: u64, acked: Instant, done: Instant, path: &ReplyPath) {
        let Some(InFlight {
            epoch,
            output,
            start,
            end,
            flushed: Some(flushed),
        }) = self.current
        else {
            return;
        };
        if epoch > upto {
            return;
        }
        self.current = None;
        let Some(output) = output.filter(|&o| o <= start && !self.overlapped) else {
            return;
        };
        path.add([
            start - output,
            end - start,
            flushed.saturating_duration_since(end),
            acked.saturating_duration_since(flushed),
            done.saturating_duration_since(acked),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_the_first_mark() {
        let c = OutputClock::new();
        assert_eq!(c.take(), None);
        c.mark();
        let first = c.take().unwrap();
        c.mark();
        std::thread::sleep(Duration::from_millis(2));
        c.mark();
        let second = c.take().unwrap();
        assert!(second >= first && second < first + Duration::from_millis(2));
        assert_eq!(c.take(), None);
    }

    #[test]
    fn stages_of_a_lone_checkpoint() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let path = ReplyPath::default();
        let mut t = Tracker::default();
        t.captured(3, Some(ms(0)), ms(2), ms(4));
        t.flushed(ms(5));
        t.released(2, ms(8), ms(9), &path); // (an older epoch: not this one)
        assert_eq!(path.count(), 0);
        t.released(3, ms(10), ms(11), &path);
        let m = path.means(([0; 5], 0)).unwrap();
        let d = Duration::from_millis;
        assert_eq!(m, [d(2), d(2), d(1), d(5), d(1)]);
    }

    #[test]
    fn overlapping_checkpoints_are_not_counted() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let path = ReplyPath::default();
        let mut t = Tracker::default();
        t.captured(1, Some(ms(0)), ms(1), ms(2));
        t.flushed(ms(3));
        t.captured(2, Some(ms(3)), ms(4), ms(5));
        t.flushed(ms(6));
        t.released(2, ms(8), ms(9), &path);
        assert_eq!(path.count(), 0);
        assert!(path.means(path.snapshot()).is_none());
    }
}
