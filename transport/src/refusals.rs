//! The server's record of refused connections: bounded, per connection, rate-limited in the
//! log.
//!
//! Each refused or abandoned handshake is recorded with its own peer address and its own
//! reason (the error of that connection's handshake, e.g. `invalid peer certificate:
//! BadSignature`, `peer sent no certificates`, `handshake not finished within 2000 ms`). Only
//! the most recent [`KEEP`] are kept, and at most [`LOG_PER_SECOND`] log lines are written
//! per second; the number left out is logged with the next line written.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Refusals kept for [`RefusalLog::recent`].
pub const KEEP: usize = 64;
/// Log lines written per second, at most.
pub const LOG_PER_SECOND: u32 = 10;

/// One refused connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When.
    pub at: SystemTime,
    /// Who.
    pub peer: SocketAddr,
    /// Why: that connection's own error.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused connection from {}: {}", self.peer, self.reason)
    }
}

#[derive(Debug)]
struct State {
    recent: VecDeque<Refusal>,
    total: u64,
    window: Instant,
    logged_in_window: u32,
    /// Refusals not logged since the last line written.
    unlogged: u64,
    lines: u64,
}

/// Shared by a server and its handshake tasks.
#[derive(Debug, Clone)]
pub struct RefusalLog(Arc<Mutex<State>>);

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog(Arc::new(Mutex::new(State {
            recent: VecDeque::with_capacity(KEEP),
            total: 0,
            window: Instant::now(),
            logged_in_window: 0,
            unlogged: 0,
            lines: 0,
        })))
    }
}

impl RefusalLog {
    /// Records a refusal and logs it unless this second's lines are used up.
    pub fn record(&self, peer: SocketAddr, reason: String) {
        let Ok(mut s) = self.0.lock() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(s.window) >= Duration::from_secs(1) {
            s.window = now;
            s.logged_in_window = 0;
        }
        let r = Refusal {
            at: SystemTime::now(),
            peer,
            reason,
        };
        if s.logged_in_window < LOG_PER_SECOND {
            s.logged_in_window += 1;
            s.lines += 1;
            match std::mem::take(&mut s.unlogged) {
                0 => tracing::warn!("{r}"),
                n => tracing::warn!("{r} ({n} earlier refusals not logged: rate limit)"),
            }
        } else {
            s.unlogged += 1;
        }
        if s.recent.len() == KEEP {
            s.recent.pop_front();
        }
        s.recent.push_back(r);
        s.total += 1;
    }

    /// The most recent refusals (at most [`KEEP`]), oldest first.
    pub fn recent(&self) -> Vec<Refusal> {
        self.0
            .lock()
            .map(|s| s.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Refusals since the server started.
    pub fn total(&self) -> u64 {
        self.0.lock().map(|s| s.total).unwrap_or(0)
    }

    /// Log lines written for them.
    pub fn lines_logged(&self) -> u64 {
        self.0.lock().map(|s| s.lines).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_rate_limited() {
        let log = RefusalLog::default();
        for i in 0..1000u16 {
            log.record(([127, 0, 0, 1], i).into(), format!("reason {i}"));
        }
        let r = log.recent();
        assert_eq!(r.len(), KEEP);
        assert_eq!(r[0].peer.port(), 1000 - KEEP as u16);
        assert_eq!(r[KEEP - 1].reason, "reason 999");
        assert_eq!(log.total(), 1000);
        assert!(log.lines_logged() <= u64::from(LOG_PER_SECOND) * 2);
    }
}
