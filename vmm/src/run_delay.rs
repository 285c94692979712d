//! How long threads waited for a CPU: `run_delay`, the second field of
//! `/proc/self/task/<tid>/schedstat` (nanoseconds a thread spent runnable but not running).
//!
//! `--rt-pause auto` (`crate::rt`) needs to know whether a pause waited for the *scheduler* —
//! what a real-time boost fixes — and not merely for something else: a vCPU thread finishing a
//! guest flush (`fdatasync` in a virtio-blk notify, which a kick cannot interrupt), a full
//! dirty ring, the receive thread's lock. Wall time less the capturing thread's CPU time
//! counts all of those; the run delays of the capturing thread and of the vCPU thread count
//! only the waits for a CPU. The files stay open and are read with `pread` (one system call
//! each, no allocation).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// One thread's `schedstat`, open.
#[derive(Debug)]
pub struct RunDelay {
    tid: i32,
    file: File,
}

impl RunDelay {
    /// Opens thread `tid`'s (of this process) `schedstat`.
    pub fn open(tid: i32) -> std::io::Result<RunDelay> {
        let file = File::open(format!("/proc/self/task/{tid}/schedstat"))?;
        Ok(RunDelay { tid, file })
    }

    /// The thread it reads.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The thread's time spent waiting for a CPU so far; `None` if it cannot be read (the
    /// thread exited, or a kernel without schedstats).
    pub fn read(&self) -> Option<Duration> {
        let mut buf = [0u8; 96];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        parse(&buf[..n])
    }
}

/// `run_delay` from a `schedstat` line: `<on-CPU ns> <run_delay ns> <timeslices>`.
pub fn parse(line: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(line).ok()?;
    let ns = s.split_ascii_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_second_field_in_nanoseconds() {
        assert_eq!(parse(b"123456 7890 12\n"), Some(Duration::from_nanos(7890)));
        for bad in [&b""[..], b"123456", b"1 x 2", b"\xff\xfe 1 2"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// A thread that sleeps waits for nothing: its run delay does not grow with the sleep
    /// (its wall time less its CPU time does: the measure `auto` used first).
    #[test]
    fn sleeping_is_not_waiting_for_a_cpu() {
        let me = crate::rt::gettid();
        let Ok(rd) = RunDelay::open(me) else {
            eprintln!("no schedstat here: nothing to test");
            return;
        };
        assert_eq!(rd.tid(), me);
        let Some(before) = rd.read() else {
            eprintln!("schedstat unreadable here: nothing to test");
            return;
        };
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let slept = t0.elapsed();
        let waited = rd.read().unwrap() - before;
        assert!(slept >= Duration::from_millis(50));
        // (Being woken may wait a little for a CPU on a busy host; not the whole sleep.)
        assert!(
            waited < Duration::from_millis(25),
            "{waited:?} of {slept:?}"
        );
        assert!(RunDelay::open(i32::MAX).is_err());
    }
}
