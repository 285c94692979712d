//! Counters of a running backup, readable from another thread (`vmatrix ctl <socket> status`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the backup has received and applied.
#[derive(Debug, Default)]
pub struct BackupStats {
    /// Primary sessions accepted.
    pub sessions: AtomicU64,
    /// A primary is connected now.
    pub connected: AtomicBool,
    /// The image is in its initial sync (no consistent checkpoint yet).
    pub syncing: AtomicBool,
    /// Last applied checkpoint + 1 (0: none).
    pub applied: AtomicU64,
    /// Term of the committed image (0: none).
    pub term: AtomicU64,
    /// Checkpoints applied.
    pub checkpoints: AtomicU64,
    /// Pages written into the image.
    pub pages: AtomicU64,
    /// Time from a complete checkpoint to its journal being written (when it is acknowledged),
    /// last one, µs.
    pub last_durable_us: AtomicU64,
    /// Checkpoints that could not be applied (the primary resends them).
    pub apply_failures: AtomicU64,
}

impl BackupStats {
    /// `key=value` fields for a status line.
    pub fn status_fields(&self) -> String {
        let applied = self.applied.load(Ordering::Relaxed);
        format!(
            "role=backup connected={} sessions={} syncing={} term={} applied_epoch={} checkpoints={} pages={} durable_us={} apply_failures={}",
            self.connected.load(Ordering::Relaxed),
            self.sessions.load(Ordering::Relaxed),
            self.syncing.load(Ordering::Relaxed),
            self.term.load(Ordering::Relaxed),
            match applied {
                0 => "-".to_string(),
                a => (a - 1).to_string(),
            },
            self.checkpoints.load(Ordering::Relaxed),
            self.pages.load(Ordering::Relaxed),
            self.last_durable_us.load(Ordering::Relaxed),
            self.apply_failures.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_no_epoch_until_one_is_applied() {
        let s = BackupStats::default();
        assert!(s.status_fields().contains("applied_epoch=-"));
        s.applied.store(8, Ordering::Relaxed);
        assert!(s.status_fields().contains("applied_epoch=7"));
    }
}
