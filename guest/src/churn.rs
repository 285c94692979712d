//! The CHURN workload: dirty `pages` pages of guest memory at `rate` pages per ms, for
//! replication benchmarks.

use alloc::vec::Vec;

const PAGE: usize = 4096;

/// Memory churner.
#[derive(Default)]
pub struct Churn {
    region: Vec<u8>,
    pages: usize,
    rate_per_ms: u64,
    start_ns: u64,
    done: u64,
    cursor: usize,
}

impl Churn {
    /// Starts (or with 0 pages, stops) churning. Fails if the memory cannot be had.
    pub fn set(&mut self, pages: usize, rate_per_ms: u64, now_ns: u64) -> Result<(), &'static str> {
        if pages == 0 || rate_per_ms == 0 {
            *self = Churn::default();
            return Ok(());
        }
        let bytes = pages.checked_mul(PAGE).ok_or("too many pages")?;
        // Free the previous region first, so re-tuning the rate does not need twice the memory.
        *self = Churn::default();
        let mut region = Vec::new();
        region
            .try_reserve_exact(bytes)
            .map_err(|_| "not enough guest memory")?;
        region.resize(bytes, 0);
        *self = Churn {
            region,
            pages,
            rate_per_ms,
            start_ns: now_ns,
            done: 0,
            cursor: 0,
        };
        Ok(())
    }

    /// True while churning.
    pub fn active(&self) -> bool {
        self.pages != 0
    }

    /// Dirties the pages due by `now_ns` (at most 100 ms worth at once).
    pub fn step(&mut self, now_ns: u64) {
        if !self.active() {
            return;
        }
        let due = (now_ns.saturating_sub(self.start_ns) / 1_000_000) * self.rate_per_ms;
        let due = due.min(self.done + self.rate_per_ms * 100);
        while self.done < due {
            let p = self.cursor * PAGE;
            // The pass number: every visit changes the page (a rewrite of the same byte would be
            // a page the replication encoder rightly skips as unchanged).
            let v = (self.done / self.pages as u64) as u8 ^ 0x5a;
            // SAFETY: `p` is inside `region`; volatile so the store is not elided.
            unsafe { core::ptr::write_volatile(self.region.as_mut_ptr().add(p), v) };
            self.cursor = (self.cursor + 1) % self.pages;
            self.done += 1;
        }
    }

    /// Pages dirtied so far.
    pub fn done(&self) -> u64 {
        self.done
    }
}
