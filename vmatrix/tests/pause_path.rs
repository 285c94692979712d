//! The pause path (issue 12) on real KVM: with real-time pauses (`--rt-pause on`) no thread
//! of the primary stays real-time outside its pauses — also across a user's pause that the
//! captures nest in — and the backup equals the primary byte for byte; with the default
//! (`--rt-pause auto`) pauses beside CPU-bound neighbours that make them wait for the
//! scheduler turn the boost on (a build that never does fails it), and no thread stays
//! real-time either; `status` says how pauses run and where dirty pages come from (KVM's dirty
//! ring, `--dirty-source ring`, is tested under heavy churn in `dirty_ring.rs`). Pinned threads
//! (`--vcpu-cpus`, `--loop-cpus`) stay on their CPUs, pause buffers are locked in RAM
//! (`--lock-buffers`, the default), and a CPU the host lacks is refused at the start. The
//! tests run one at a time (one runs CPU-bound neighbours).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

/// Per thread of `pid`: the share of `samples` taken over `over` in which it ran under a
/// real-time policy (`/proc/<pid>/task/<tid>/stat`, field 41).
fn real_time_shares(pid: u32, samples: u32, over: Duration) -> Vec<(String, f64)> {
    let mut counts: std::collections::BTreeMap<String, (u32, u32)> = Default::default();
    for _ in 0..samples {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // (Fields after the command name, which is in parentheses.)
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let policy: u32 = rest
                .split_whitespace()
                .nth(38)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let key = format!("{} {}", t.file_name().to_string_lossy(), comm.trim());
            let e = counts.entry(key).or_default();
            e.0 += u32::from(policy == 1 || policy == 2);
            e.1 += 1;
        }
        std::thread::sleep(over / samples);
    }
    counts
        .into_iter()
        .map(|(k, (rt, n))| (k, f64::from(rt) / f64::from(n)))
        .collect()
}

fn status_field(sock: &Path, key: &str) -> String {
    json_field(&ctl(sock, &["status"]), key).unwrap_or_default()
}

/// Samples the primary's threads over a second: none may be real-time in (nearly) every
/// sample. A thread raised for its pauses is real-time a small share of the time (more on a
/// loaded host: its pauses last longer); one left real-time would be so in every sample.
fn no_thread_stays_real_time(pid: u32, sock: &Path, when: &str) {
    for (thread, share) in real_time_shares(pid, 200, Duration::from_secs(1)) {
        assert!(
            share < 0.9,
            "{when}: thread {thread} was real-time in {:.0} % of samples: {}",
            share * 100.0,
            ctl(sock, &["status"])
        );
    }
}

/// One test at a time: one runs CPU-bound neighbours that would slow the others' starts.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the primary may boost its pauses (the privilege, a real-time budget in its cgroup):
/// said at its start.
fn may_boost(sock: &Path) -> bool {
    let yes = status_field(sock, "rt_pause") == "true";
    if !yes {
        eprintln!("no real-time priority for this primary here: nothing is boosted to check");
    }
    yes
}

/// Starts a protected primary with a control socket and `extra` arguments.
fn controlled(net: &TestNet, dir: &Path, extra: &[&str]) -> (Replicated, KvClient, PathBuf) {
    let sock = dir.join("ctl.sock");
    let mut args = vec!["--control", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut r = Replicated::start(net, dir, &args);
    let kv = r.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    (r, kv, sock)
}

#[test]
fn no_thread_stays_real_time_outside_its_pauses() {
    let _one = one_at_a_time();
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut r, mut kv, sock) = controlled(&net, dir.path(), &["--rt-pause", "on"]);
    assert_eq!(status_field(&sock, "rt_mode"), "on");
    assert_eq!(status_field(&sock, "dirty_source"), "bitmap+hot");
    assert_eq!(kv.cmd("CHURN 2048 20").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    // Every pause is boosted (as root; CI runs these tests as root).
    let boosted: u64 = status_field(&sock, "rt_boosted_pauses").parse().unwrap();
    assert!(
        !may_boost(&sock) || boosted > 0,
        "{}",
        ctl(&sock, &["status"])
    );
    // Sampled over a second of checkpoints of an idle guest, and again after a user's pause
    // (captures nested in it) and its resume.
    let pid = r.primary.child.id();
    let check = |when: &str| no_thread_stays_real_time(pid, &sock, when);
    check("while checkpointing");
    ctl(&sock, &["pause"]);
    std::thread::sleep(Duration::from_millis(300));
    ctl(&sock, &["resume"]);
    check("after a user's pause");
    assert_backup_equals_primary(&mut r, &sock);
}

/// CPU-bound neighbours (shell busy loops, as other tenants' work would be), killed on drop.
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        let spawn = |_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        };
        Hogs((0..n).map(spawn).collect())
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn auto_boosts_pauses_once_they_wait_for_the_scheduler() {
    let _one = one_at_a_time();
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut r, mut kv, sock) = controlled(&net, dir.path(), &[]);
    assert_eq!(status_field(&sock, "rt_mode"), "auto", "the default");
    if !may_boost(&sock) {
        return;
    }
    // (Whether pauses are boosted before the neighbours come depends on this shared host;
    // with them, pauses are boosted: the count grows.)
    let before: u64 = status_field(&sock, "rt_boosted_pauses").parse().unwrap();
    // Twice as many CPU-bound neighbours as CPUs: ordinary pauses wait milliseconds for the
    // scheduler (docs/BENCHMARKS.md, "Pauses on a busy host").
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs = Hogs::start(2 * cpus);
    assert_eq!(kv.cmd("CHURN 2048 1").unwrap(), "OK");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let boosted: u64 = status_field(&sock, "rt_boosted_pauses").parse().unwrap();
        if boosted > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no boost beside {} CPU-bound neighbours after 30 s: {}",
            2 * cpus,
            ctl(&sock, &["status"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Boosted for its pauses only, here too.
    no_thread_stays_real_time(r.primary.child.id(), &sock, "beside the neighbours");
    drop(hogs);
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    assert_backup_equals_primary(&mut r, &sock);
}

/// `Cpus_allowed_list` of each thread of `pid` called `comm`.
fn cpus_of_threads(pid: u32, comm: &str) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}

/// `VmLck` of `pid`, kB.
fn locked_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn pinned_threads_stay_on_their_cpus_and_pause_buffers_are_locked() {
    let _one = one_at_a_time();
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    // (The CPUs this process may use, which need not be 0..n.)
    let cpus = vmm::affinity::cpus_of(0).unwrap();
    let (first, last) = (cpus[0], cpus[cpus.len() - 1]);
    let first_s = first.to_string();
    let sock = dir.path().join("ctl.sock");
    let vcpu = last.to_string();
    let mut r = Replicated::start(
        &net,
        dir.path(),
        &[
            "--control",
            sock.to_str().unwrap(),
            "--vcpu-cpus",
            &vcpu,
            "--loop-cpus",
            &first_s,
        ],
    );
    let mut kv = r.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    assert_eq!(kv.cmd("CHURN 2048 20").unwrap(), "OK");
    std::thread::sleep(Duration::from_millis(300));
    let pid = r.primary.child.id();
    // Checkpoints went back into the pool: their buffers are locked (at least 256 KiB each;
    // read while the guest churns, before idle epochs replace them by smaller ones).
    let locked = locked_kb(pid);
    assert_eq!(kv.cmd("CHURN 0 0").unwrap(), "OK");
    assert!(locked >= 256, "{locked} kB locked");
    assert_eq!(cpus_of_threads(pid, "vcpu0"), vec![vcpu.clone()]);
    // The replication runtime's threads (its worker and blocking pool) are on the first CPU.
    let loop_threads = cpus_of_threads(pid, "replication-rt");
    assert!(
        !loop_threads.is_empty() && loop_threads.iter().all(|c| *c == first_s),
        "the replication runtime's threads are not all on CPU {first}: {loop_threads:?}"
    );
    assert_backup_equals_primary(&mut r, &sock);
}

#[test]
fn a_cpu_the_host_lacks_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(vmatrix_bin())
        .args([
            "primary",
            "--guest",
            guest_elf().to_str().unwrap(),
            "--backup",
            "backup@127.0.0.1:9",
            "--certs",
            dir.path().to_str().unwrap(),
            "--host",
            "primary",
            "--vcpu-cpus",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--vcpu-cpus: CPU 1000 is not one this process may run on"),
        "{err}"
    );
}
