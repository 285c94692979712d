//! Clone helpers of the managed-cluster tests (`clones_managed.rs`, `clones_copied.rs`).

use std::time::{Duration, Instant};

use super::managed::Managed;
use super::KvClient;

/// Waits until clone `i` of "web" answers `GET colour` with `want`; how long it took.
pub fn wait_clone(m: &Managed, i: u32, want: &str, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    let addr = m.clone_addr(i);
    loop {
        let got = KvClient::connect(addr).and_then(|mut kv| {
            kv.set_timeout(Duration::from_millis(500));
            kv.cmd("GET colour")
        });
        match got {
            Ok(v) if v == want => return t0.elapsed(),
            other => assert!(
                t0.elapsed() < timeout,
                "clone {i} at {addr}: {other:?} after {timeout:?}\nevents:\n{}",
                m.events()
            ),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
