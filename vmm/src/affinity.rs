//! CPU pinning and locked memory for the pause path (issue 12): a vCPU thread and a replication
//! loop can be pinned to CPUs of their own (`sched_setaffinity`), and the buffers a pause copies
//! into can be locked in RAM (`mlock`), so a pause never waits for a page the host swapped out
//! or compacted. Both are off by default and set by the VM's owner (`vmatrix primary
//! --vcpu-cpus/--loop-cpus/--lock-buffers`); docs/BENCHMARKS.md has what they changed here.
//! [`keep_freed_heap`] tunes malloc for a loop that frees and reallocates big buffers.

use std::io;

/// Parses a CPU list such as `0`, `1,3` or `0-2,5` (what `taskset -c` takes).
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{part:?} is not a CPU number or range"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(format!("{part:?} is not a CPU range this host can have"));
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    match cpus.is_empty() {
        true => Err("an empty CPU list".into()),
        false => Ok(cpus),
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpus`.
pub fn pin(tid: i32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {c} is beyond what a CPU set holds"),
            ));
        }
        // SAFETY: `c` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the call only changes the CPUs
    // thread `tid` may run on.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
pub fn cpus_of(tid: i32) -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, so the bit read is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Locks the pages of `buf` in RAM (they stay locked until the allocation is freed).
pub fn lock(buf: &[u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: the range is `buf`'s, valid for its length; mlock changes no memory contents.
    let r = unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Unlocks `len` bytes at address `addr` (a range [`lock`] locked, about to be freed).
pub fn unlock(addr: usize, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: munlock reads and writes no memory; on a range that is not mapped it fails
    // with ENOMEM, which is reported.
    let r = unsafe { libc::munlock(addr as *const libc::c_void, len) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Bytes of this process's memory locked in RAM (`VmLck` of /proc/self/status).
pub fn locked_bytes() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| io::Error::other("no VmLck in /proc/self/status"))?;
    Ok(kib << 10)
}

/// Allocations below this many bytes come from malloc's heaps, not a fresh `mmap` each
/// ([`keep_freed_heap`]).
pub const HEAP_MMAP_THRESHOLD: i32 = 4 << 20;

/// Freed memory at the top of a heap is kept mapped up to this many bytes
/// ([`keep_freed_heap`]).
pub const HEAP_TRIM_THRESHOLD: i32 = 64 << 20;

/// Has malloc keep memory that is freed mapped ([`HEAP_MMAP_THRESHOLD`],
/// [`HEAP_TRIM_THRESHOLD`]), so a loop that allocates and frees the same big buffers reuses
/// them instead of faulting fresh pages in each time. A harvest allocates bitmaps of the whole
/// guest (128 KiB each for 4 GiB); in a loop doing nothing else (`vmatrix bench replication
/// --harvest`) glibc's defaults returned them and faulted them in again at every harvest —
/// 361 µs of a 4 GiB bitmap harvest against 105 µs with this (docs/BENCHMARKS.md, "The harvest
/// alone"). The replication loop evidently does not pay this (its heap is in use between
/// pauses, presumably): with this in `vmatrix`'s `main`, pauses of a 4 GiB guest did not change
/// (same A/B), so only the harvest bench uses it. Best called early. Returns whether malloc took both settings.
pub fn keep_freed_heap() -> bool {
    // SAFETY: mallopt only changes malloc's tuning parameters (under malloc's own lock), with
    // values glibc accepts (positive byte counts below its maxima); nothing is freed or moved.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults taken by this thread so far.
    fn thread_faults() -> i64 {
        // SAFETY: an all-zero rusage is valid; getrusage fills it for this thread.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a valid rusage that outlives the call.
        let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
        assert_eq!(r, 0);
        u.ru_minflt
    }

    /// What a harvest of a 4 GiB guest does with its bitmaps: four of 128 KiB allocated and
    /// written, then freed, every harvest.
    fn harvests_faults(n: usize) -> i64 {
        let f0 = thread_faults();
        for i in 0..n {
            let bufs: Vec<Vec<u64>> = (0..4)
                .map(|_| {
                    let mut v = vec![0u64; 16 << 10];
                    for w in v.iter_mut().step_by(512) {
                        *w = i as u64;
                    }
                    v
                })
                .collect();
            std::hint::black_box(&bufs);
        }
        thread_faults() - f0
    }

    #[test]
    fn freed_buffers_are_reused_without_faults() {
        assert!(keep_freed_heap(), "malloc took the settings");
        harvests_faults(4);
        // (Fresh pages each time would fault 128 per harvest: 25,600.)
        let faults = harvests_faults(200);
        assert!(faults < 50, "{faults} page faults in 200 harvests");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0").unwrap(), vec![0]);
        assert_eq!(parse_cpus("3,1").unwrap(), vec![1, 3]);
        assert_eq!(parse_cpus("0-2,5,1").unwrap(), vec![0, 1, 2, 5]);
        for bad in ["", "x", "2-1", "1-", "-1", "99999"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_pinned_thread_runs_where_it_was_pinned() {
        std::thread::spawn(|| {
            let all = cpus_of(0).unwrap();
            let one = *all.last().unwrap();
            pin(0, &[one]).unwrap();
            assert_eq!(cpus_of(0).unwrap(), vec![one]);
            // SAFETY: sched_getcpu has no preconditions.
            let now = unsafe { libc::sched_getcpu() };
            assert_eq!(now as usize, one);
            assert!(pin(0, &[libc::CPU_SETSIZE as usize]).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn locked_buffers_count_as_locked_memory() {
        let before = locked_bytes().unwrap();
        let buf = vec![1u8; 1 << 20];
        match lock(&buf) {
            Ok(()) => {}
            // (Without root and a memlock limit below 1 MiB: nothing to check here.)
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOMEM)) => {
                eprintln!("mlock refused ({e}): skipped");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(locked_bytes().unwrap() >= before + (1 << 20) - 8192);
        unlock(buf.as_ptr() as usize, buf.len()).unwrap();
        assert!(locked_bytes().unwrap() < before + (1 << 20) - 8192);
    }
}
