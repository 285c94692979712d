//! A KV writer for failover tests ([`KvWriter`]): a thread that SETs numbered keys at a pace
//! over one connection, records which were acknowledged and how long each waited, and at the
//! end ([`Written`]) verifies every acknowledged key. Split from `managed.rs`.

use std::time::{Duration, Instant};

/// What a [`KvWriter`] did.
pub struct Written {
    /// The connection it wrote on (still open unless `error` says otherwise).
    pub kv: super::super::KvClient,
    /// Every write acknowledged with `OK`, in order.
    pub acked: Vec<(String, String)>,
    /// When each was acknowledged.
    pub acked_at: Vec<Instant>,
    /// The longest time one request waited for its answer.
    pub max_wait: Duration,
    /// When that request was sent.
    pub max_wait_at: Option<Instant>,
    /// Why it stopped early (an error or an answer other than `OK`).
    pub error: Option<String>,
}

impl Written {
    /// Writes acknowledged between `from` and `to`.
    pub fn acked_between(&self, from: Instant, to: Instant) -> usize {
        self.acked_at
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .count()
    }

    /// Reads every acknowledged write back on the writer's own connection.
    pub fn verify_all(&mut self) {
        for (k, v) in &self.acked {
            assert_eq!(
                self.kv.cmd(&format!("GET {k}")).unwrap(),
                format!("VALUE {v}"),
                "acknowledged write {k}={v} missing"
            );
        }
    }
}

/// A client writing `SET <prefix><n> v<n>` on one TCP connection from a thread, one request at
/// a time, until told to stop (or a request fails).
pub struct KvWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    waits: std::sync::Arc<std::sync::Mutex<Waits>>,
    handle: Option<std::thread::JoinHandle<Written>>,
}

/// When each request of a [`KvWriter`] was sent and how long it waited.
#[derive(Default)]
struct Waits {
    done: Vec<(Instant, Duration)>,
    in_flight: Option<Instant>,
}

impl KvWriter {
    /// Starts writing on `kv`, a request every `pace` (after the previous answer); each request
    /// may wait `timeout` for its answer.
    pub fn start(
        mut kv: super::super::KvClient,
        prefix: &str,
        pace: Duration,
        timeout: Duration,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waits = std::sync::Arc::new(std::sync::Mutex::new(Waits::default()));
        let (stop2, acked2, prefix) = (stop.clone(), acked.clone(), prefix.to_string());
        let waits2 = waits.clone();
        let handle = std::thread::spawn(move || {
            kv.set_timeout(timeout);
            let mut w = Written {
                kv,
                acked: Vec::new(),
                acked_at: Vec::new(),
                max_wait: Duration::ZERO,
                max_wait_at: None,
                error: None,
            };
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let (k, v) = (format!("{prefix}{n}"), format!("v{n}"));
                let sent = Instant::now();
                waits2.lock().unwrap().in_flight = Some(sent);
                let r = w.kv.cmd(&format!("SET {k} {v}"));
                let wait = sent.elapsed();
                {
                    let mut ws = waits2.lock().unwrap();
                    ws.in_flight = None;
                    ws.done.push((sent, wait));
                }
                if wait > w.max_wait {
                    w.max_wait = wait;
                    w.max_wait_at = Some(sent);
                }
                match r {
                    Ok(a) if a == "OK" => {
                        w.acked.push((k, v));
                        w.acked_at.push(Instant::now());
                        acked2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => {
                        w.error = Some(format!("SET {k}: answered '{a}'"));
                        break;
                    }
                    Err(e) => {
                        w.error = Some(format!("SET {k}: {e} after {wait:?}"));
                        break;
                    }
                }
                n += 1;
                std::thread::sleep(pace);
            }
            w
        });
        KvWriter {
            stop,
            acked,
            waits,
            handle: Some(handle),
        }
    }

    /// How long a request had been waiting for its answer, at most, at some moment between
    /// `from` and `to` (a request still waiting counts until now): how long the VM kept this
    /// client waiting then.
    pub fn longest_wait_between(&self, from: Instant, to: Instant) -> Duration {
        let ws = self.waits.lock().unwrap();
        let now = Instant::now();
        ws.done
            .iter()
            .copied()
            .chain(ws.in_flight.map(|t| (t, now.saturating_duration_since(t))))
            .filter(|(sent, wait)| *sent <= to && *sent + *wait >= from)
            .map(|(sent, wait)| (sent + wait).min(to).saturating_duration_since(sent))
            .max()
            .unwrap_or_default()
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` writes were acknowledged.
    pub fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                !self.handle.as_ref().is_some_and(|h| h.is_finished()),
                "the writer stopped after {} writes",
                self.acked()
            );
            assert!(
                Instant::now() < deadline,
                "only {} of {n} writes acknowledged within {timeout:?}",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops after the request under way and returns what it did.
    pub fn stop(mut self) -> Written {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("writer thread panicked")
    }
}

impl Drop for KvWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
