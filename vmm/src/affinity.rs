//! CPU pinning and locked memory for the pause path (issue 12): a vCPU thread and a replication
//! loop can be pinned to CPUs of their own (`sched_setaffinity`), and the buffers a pause copies
//! into can be locked in RAM (`mlock`), so a pause never waits for a page the host swapped out
//! or compacted. Both are off by default and set by the VM's owner (`vmatrix primary
//! --vcpu-cpus/--loop-cpus/--lock-buffers`); docs/BENCHMARKS.md has what they changed here.

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

#[cfg(test)]
mod tests {
    use super::*;

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
