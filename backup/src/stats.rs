//! Counters of a running backup, readable from another thread (`vmatrix ctl <socket> status`).
//! Cheap to read (atomics only): the failover agent polls them every few milliseconds, and the
//! time since the last checkpoint is its "checkpoints stopped arriving" signal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since this process first asked, plus one (0 stands for "never").
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// `<ms since stamp>` for a stamp of [`now_ms`], or `none` for 0.
fn ms_ago(stamp: u64) -> String {
    match stamp {
        0 => "none".into(),
        t => now_ms().saturating_sub(t).to_string(),
    }
}

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
    /// Sum of those times, ns, and how many were summed (for means between two reads).
    pub durable_ns: (AtomicU64, AtomicU64),
    /// Checkpoints that could not be applied (the primary resends them).
    pub apply_failures: AtomicU64,
    /// Seq + 1 of the committed image's checkpoint (durable: acknowledged, or in the image
    /// this backup started with); 0: none. A failover promotes this checkpoint.
    pub committed: AtomicU64,
    /// History id of the committed image (0: none).
    pub history: AtomicU64,
    /// When the last checkpoint (of any kind) was made durable and acknowledged ([`now_ms`]).
    pub last_checkpoint_ms: AtomicU64,
    /// When the last frame (a checkpoint part, a heartbeat) came from a primary ([`now_ms`]).
    pub last_heard_ms: AtomicU64,
}

impl BackupStats {
    /// `key=value` fields for a status line.
    pub fn status_fields(&self) -> String {
        let applied = self.applied.load(Ordering::Relaxed);
        let committed = self.committed.load(Ordering::Relaxed);
        let history = self.history.load(Ordering::Relaxed);
        format!(
            "role=backup connected={} sessions={} syncing={} term={} seq={} history={} last_checkpoint_ms_ago={} last_heard_ms_ago={} applied_epoch={} checkpoints={} pages={} durable_us={} apply_failures={}",
            self.connected.load(Ordering::Relaxed),
            self.sessions.load(Ordering::Relaxed),
            self.syncing.load(Ordering::Relaxed),
            self.term.load(Ordering::Relaxed),
            match committed {
                0 => "none".to_string(),
                c => (c - 1).to_string(),
            },
            match (committed, history) {
                (0, _) => "none".to_string(),
                (_, h) => format!("{h:x}"),
            },
            ms_ago(self.last_checkpoint_ms.load(Ordering::Relaxed)),
            ms_ago(self.last_heard_ms.load(Ordering::Relaxed)),
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

    #[test]
    fn status_says_none_until_a_checkpoint_is_committed() {
        let s = BackupStats::default();
        let f = s.status_fields();
        assert!(f.contains(" seq=none "), "{f}");
        assert!(f.contains(" last_checkpoint_ms_ago=none "), "{f}");
        s.committed.store(5, Ordering::Relaxed);
        s.last_checkpoint_ms.store(now_ms(), Ordering::Relaxed);
        let f = s.status_fields();
        assert!(f.contains(" seq=4 "), "{f}");
        let ago: u64 = f
            .split_whitespace()
            .find_map(|t| t.strip_prefix("last_checkpoint_ms_ago="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(ago < 1000, "{f}");
    }
}
