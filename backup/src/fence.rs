//! The lowest term a primary of this image may have, raised by the failover manager (`fence
//! <term>` on the backup's control socket, and `promote <term>`) and persisted in the image
//! directory (`min-term`: the decimal term, written to a temporary file, fsynced, renamed over
//! the old one, the directory fsynced), so it survives restarts of the backup.
//!
//! The term in force is the larger of this and the committed image's term (a backup never
//! accepts a primary older than the checkpoint it holds). Raising it ends a running session
//! whose primary has an older term: [`Fence::raise`] returns only once the server loop says no
//! session of an older term can acknowledge anything any more ([`Fence::enforced`]), so a
//! manager that fenced a backup knows the old primary can release no output it acknowledges.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::image::io;
use crate::promote::sync_dir;
use crate::BackupError;

/// Name of the file in an image directory.
pub const MIN_TERM_FILE: &str = "min-term";

/// The persisted minimum term of the image in `dir` (0 if none was ever set).
pub fn read_min_term(dir: &Path) -> Result<u64, BackupError> {
    let path = dir.join(MIN_TERM_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|e| BackupError::Io {
            path,
            err: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}")),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Persists `term` as the minimum term of the image in `dir` (crash-safe: the old value or
/// the new one, never a torn one).
pub fn write_min_term(dir: &Path, term: u64) -> Result<(), BackupError> {
    use std::io::Write;
    let tmp = dir.join(format!("{MIN_TERM_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(format!("{term}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    drop(f);
    let path = dir.join(MIN_TERM_FILE);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

/// How long [`Fence::raise`] waits for a running session of an older term to end.
pub const ENFORCE_TIMEOUT: Duration = Duration::from_secs(5);

/// See the module docs.
#[derive(Debug)]
pub struct Fence {
    dir: PathBuf,
    /// The persisted minimum term.
    min_term: AtomicU64,
    /// Raises are made one at a time; the server loop reports under it what it enforces.
    enforced: Mutex<u64>,
    cond: Condvar,
    tx: watch::Sender<u64>,
}

impl Fence {
    /// The fence of the image in `dir` (its persisted minimum term).
    pub fn load(dir: &Path) -> Result<Fence, BackupError> {
        let term = read_min_term(dir)?;
        Ok(Fence {
            dir: dir.to_path_buf(),
            min_term: AtomicU64::new(term),
            enforced: Mutex::new(term),
            cond: Condvar::new(),
            tx: watch::channel(term).0,
        })
    }

    /// The persisted minimum term (not counting the committed image's).
    pub fn min_term(&self) -> u64 {
        self.min_term.load(Ordering::SeqCst)
    }

    /// Raises the minimum term to `term` (a no-op if it is not higher): persists it, then waits
    /// (at most [`ENFORCE_TIMEOUT`]) until no session of an older term runs. Returns the
    /// minimum term in force.
    pub fn raise(&self, term: u64) -> Result<u64, BackupError> {
        let mut enforced = self.enforced.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.min_term();
        if term <= current {
            return Ok(current);
        }
        write_min_term(&self.dir, term)?;
        self.min_term.store(term, Ordering::SeqCst);
        tracing::info!("fenced: primaries of a term below {term} are refused from now on");
        self.tx.send_replace(term);
        let deadline = Instant::now() + ENFORCE_TIMEOUT;
        while *enforced < term {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackupError::Apply(format!(
                    "term {term} is persisted, but the running session of an older primary \
                     did not end within {} s",
                    ENFORCE_TIMEOUT.as_secs()
                )));
            }
            enforced = self
                .cond
                .wait_timeout(enforced, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(term)
    }

    /// Wakes on every raise (the server loop's side).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// The server loop, once no session can acknowledge anything to a primary older than the
    /// latest raise: reports that raise enforced and returns its term. The term is copied out of
    /// the channel first: a borrow of it held while taking the fence's lock would deadlock with
    /// a [`Fence::raise`] under way, which publishes to the channel while it holds that lock.
    pub(crate) fn enforce_latest(&self, rx: &mut watch::Receiver<u64>) -> u64 {
        let term = *rx.borrow_and_update();
        self.enforced(term);
        term
    }

    /// The server loop: no session with a term below `term` can acknowledge anything now.
    pub(crate) fn enforced(&self, term: u64) {
        let mut e = self.enforced.lock().unwrap_or_else(|p| p.into_inner());
        if term > *e {
            *e = term;
            self.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_raised_term_is_persisted_and_in_force_once_the_server_enforces_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Fence::load(dir.path()).unwrap());
        assert_eq!(f.min_term(), 0);
        // The server loop's side: enforce whatever is raised.
        let rx = f.subscribe();
        let server = {
            let f = f.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while *rx.borrow() < 3 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                f.enforced(*rx.borrow());
            })
        };
        assert_eq!(f.raise(3).unwrap(), 3);
        server.join().unwrap();
        assert_eq!(f.raise(2).unwrap(), 3, "an older term changes nothing");
        assert_eq!(read_min_term(dir.path()).unwrap(), 3);
        assert_eq!(Fence::load(dir.path()).unwrap().min_term(), 3);
        assert!(!dir.path().join("min-term.tmp").exists());
    }

    #[test]
    fn raises_and_the_server_loop_taking_them_never_deadlock() {
        // The server loop takes each raise as it comes while raises follow each other (as the
        // agent's `fence` does right after a backup starts). Holding the channel's borrow while
        // reporting used to deadlock with the raise publishing the next term.
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Fence::load(dir.path()).unwrap());
        let mut rx = f.subscribe();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = {
            let (f, done) = (f.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    f.enforce_latest(&mut rx);
                }
            })
        };
        let raiser = {
            let f = f.clone();
            std::thread::spawn(move || {
                for t in 1..=50u64 {
                    assert_eq!(f.raise(t).unwrap(), t);
                }
            })
        };
        let t0 = Instant::now();
        while !raiser.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "deadlocked at min_term {}",
                f.min_term()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        raiser.join().unwrap();
        done.store(true, Ordering::Relaxed);
        server.join().unwrap();
        assert_eq!(read_min_term(dir.path()).unwrap(), 50);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_term_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MIN_TERM_FILE), "x\n").unwrap();
        assert!(Fence::load(dir.path()).is_err());
    }
}
