//! Adaptive epoch length: shorter while checkpoints are small (cheap, and replies wait less),
//! longer while the backups cannot keep up (the window of unacknowledged checkpoints is full),
//! never beyond the output-delay cap, never below the minimum.

use std::time::Duration;

/// Dirty pages below which an epoch counts as small.
const SMALL: usize = 256;
/// Dirty pages above which an epoch counts as large.
const LARGE: usize = 8192;

/// Chooses the length of the next epoch.
#[derive(Debug, Clone)]
pub struct EpochController {
    base: Duration,
    min: Duration,
    max: Duration,
    current: Duration,
}

impl EpochController {
    /// Starts at `base`, stays within `[min, max]` (`max` is the output-delay cap).
    pub fn new(base: Duration, min: Duration, max: Duration) -> Self {
        let min = min.min(base);
        let max = max.max(base);
        EpochController {
            base,
            min,
            max,
            current: base,
        }
    }

    /// Current epoch length.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Adjusts after an epoch tick: `dirty` pages were captured (None: no capture because the
    /// window was full).
    pub fn update(&mut self, dirty: Option<usize>) -> Duration {
        self.current = match dirty {
            None => self.current * 2,
            Some(d) if d < SMALL => self.current * 3 / 4,
            Some(d) if d > LARGE => self.current * 5 / 4,
            // Drift back towards the configured length.
            Some(_) => (self.current + self.base) / 2,
        }
        .clamp(self.min, self.max);
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn adapts_within_bounds() {
        let mut c = EpochController::new(ms(20), ms(2), ms(200));
        for _ in 0..50 {
            c.update(Some(10));
        }
        assert_eq!(c.current(), ms(2), "small epochs shrink to the minimum");
        for _ in 0..50 {
            c.update(None);
        }
        assert_eq!(
            c.current(),
            ms(200),
            "a full window grows epochs to the output-delay cap"
        );
        for _ in 0..50 {
            c.update(Some(1000));
        }
        assert!(
            c.current() >= ms(20) && c.current() <= ms(21),
            "medium epochs return to the base: {:?}",
            c.current()
        );
        let mut c = EpochController::new(ms(20), ms(50), ms(10));
        assert_eq!(c.update(Some(10)), ms(20), "bounds never exclude the base");
    }
}
