//! Faults around automatic failover, end to end on real KVM, network namespaces and QUIC: the
//! manager and an agent per host (`support::managed`), a protected VM created through the API,
//! clients writing on one TCP connection, and one fault each:
//!
//! 1. the manager loses its link to a healthy primary: no failover;
//! 2. the manager crashes and restarts: the VM serves and replicates meanwhile, the restarted
//!    manager finds it protected at the same term, and a later host crash still fails over;
//! 3. only the primary's VM process is killed: its agent reports the exit and the manager fails
//!    over at once; or it is stopped (SIGSTOP): failed over as hung, then killed by its agent;
//! 4. a planned migration to the third host;
//! 5. the primary's host is isolated from the replication network (its LAN stays up): the
//!    backup is promoted, the old primary releases nothing from then on, and after the heal it
//!    is stopped and its host holds a backup again;
//! 6. the primary's host and its only backup's host die: the VM is down (and never starts from
//!    nothing elsewhere) until the backup's host comes back, then it is promoted from the
//!    backup's image.
//!
//! Every test waits for conditions with generous timeouts (the machine may be busy) and prints
//! the figures it sees (longest client wait, time to failover). They run one at a time.

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::managed::{backups_of, KvWriter, Managed};
use support::*;

/// The tests of this file run one after another (each runs several VMs on this machine).
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds [`SERIAL`] for a test and prints how long the test took.
struct Serial {
    _guard: std::sync::MutexGuard<'static, ()>,
    started: Instant,
}

impl Drop for Serial {
    fn drop(&mut self) {
        let name = std::thread::current().name().unwrap_or("test").to_string();
        eprintln!("{name}: {:?}", self.started.elapsed());
    }
}

fn serial() -> Serial {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Serial {
        _guard: guard,
        started: Instant::now(),
    }
}

/// How long a condition of the cluster may take on a busy machine.
const LONG: Duration = Duration::from_secs(60);

/// The manager's detection timeout in these tests (`--detect-ms`; the default is 60 ms). Every
/// "host" here shares this machine's two CPUs: under a load of 10 or more (parallel builds and
/// test runs) a primary, its agent and the backup's receiver stall together, for 60-140 ms
/// often and up to a second now and then, and a timeout shorter than the stall declares a
/// healthy primary failed (seen with 60 ms: "no heartbeat from b for 65 ms and its backups say
/// checkpoints stopped (silent for 75 ms)"; with 300 ms, during the manager cut of the first
/// test: "no heartbeat from a for 601 ms and its backups say checkpoints stopped (silent for
/// 776 ms)"). Such a failover is safe, but it is not the fault a test injects. Every fault here
/// lasts far longer than this.
const DETECT_MS: &str = "1000";

/// A managed cluster of `hosts` hosts running VM "web" with `backups` backups, protected.
struct Setup {
    m: Managed,
    /// Index of the primary's host.
    p: usize,
    /// Index of the first backup's host.
    b: usize,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    /// On a failure (or always with `VMATRIX_KEEP_LOGS=1`), the logs (manager, agents, VM
    /// processes, events) are kept in `<tmp>/failover_faults-<pid>-<test>` for a post-mortem.
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("VMATRIX_KEEP_LOGS").is_none() {
            return;
        }
        let name = std::thread::current()
            .name()
            .unwrap_or("test")
            .rsplit("::")
            .next()
            .unwrap_or("test")
            .to_string();
        let keep =
            std::env::temp_dir().join(format!("failover_faults-{}-{name}", std::process::id()));
        let mut stack = vec![self._dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path
                    .extension()
                    .is_some_and(|x| ["log", "jsonl", "state", "stderr"].iter().any(|k| x == *k))
                {
                    let rel = path.strip_prefix(self._dir.path()).unwrap();
                    let to = keep.join(rel);
                    let _ = std::fs::create_dir_all(to.parent().unwrap());
                    let _ = std::fs::copy(&path, &to);
                }
            }
        }
        eprintln!("logs kept in {}", keep.display());
    }
}

fn protected_vm(hosts: usize, backups: u8) -> Setup {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let m = Managed::start_with(dir.path(), hosts, &["--detect-ms", DETECT_MS]);
    let v = m.create_protected(backups);
    let p = m.host_index(v["primary"].as_str().unwrap());
    let b = m.host_index(&backups_of(&v)[0]);
    eprintln!(
        "web: primary on {}, backups on {:?}",
        m.net.host_name(p),
        backups_of(&v)
    );
    Setup { m, p, b, _dir: dir }
}

/// A writer on a fresh connection to the guest, a request every 5 ms.
fn writer(m: &Managed, prefix: &str, timeout: Duration) -> KvWriter {
    let kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    KvWriter::start(kv, prefix, Duration::from_millis(5), timeout)
}

fn kinds(m: &Managed) -> Vec<String> {
    m.event_log()
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect()
}

/// The VM's events (not the hosts' ups and downs), one line each, for the test's output.
fn story(m: &Managed) -> String {
    m.event_log()
        .iter()
        .filter(|e| e["vm"].is_string())
        .map(|e| {
            format!(
                "  {:>4} ms  {:<16} host={} term={} {}\n",
                e["at_ms"],
                e["kind"].as_str().unwrap_or("?"),
                e["host"].as_str().unwrap_or("-"),
                e["term"],
                e["detail"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// An attempt the machine spoiled: it stalled the VM about as long as the detection timeout
/// while the test needed it healthy, and the manager (rightly) failed it over.
struct Inconclusive(String);

/// Runs `attempt` (each with a fresh cluster) until one is conclusive, at most three times.
fn conclusive(attempt: impl Fn() -> Result<(), Inconclusive>) {
    for n in 1..=3 {
        match attempt() {
            Ok(()) => return,
            Err(Inconclusive(why)) => eprintln!("attempt {n} inconclusive: {why}"),
        }
    }
    panic!(
        "three attempts in a row were inconclusive: this machine stalls the VMs for as long as \
         the detection timeout ({DETECT_MS} ms)"
    );
}

fn detect() -> Duration {
    Duration::from_millis(DETECT_MS.parse().unwrap())
}

/// Detections on silence (a silent host whose backups say checkpoints stopped, or every host
/// silent), not on an exited process or a handover.
fn silence_detections(m: &Managed) -> Vec<serde_json::Value> {
    m.events_of("detected")
        .into_iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("checkpoints stopped") || d.contains("nor from"))
        })
        .collect()
}

/// When an event was logged, as an `Instant` of this process.
fn event_instant(e: &serde_json::Value) -> Instant {
    let unix_ms = e["unix_ms"].as_u64().expect("unix_ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Instant::now() - Duration::from_millis(now_ms.saturating_sub(unix_ms))
}

/// The premise of a test that needs its VM healthy since `since`: no more than `expected`
/// failovers on silence. One more is right only if the machine stalled the VM (the client
/// `w` had been waiting half a detection timeout or more before the decision): the attempt
/// is then inconclusive. Otherwise the manager failed over a VM that kept serving: a bug.
fn premise(m: &Managed, w: &KvWriter, since: Instant, expected: usize) -> Result<(), Inconclusive> {
    let found = silence_detections(m);
    let Some(extra) = found.get(expected) else {
        return Ok(());
    };
    let decided = event_instant(extra);
    let stall = w.longest_wait_between(since, decided);
    assert!(
        stall >= detect() / 2,
        "a failover on silence although the client had waited at most {stall:?} before it \
         (the VM was serving):\n{}",
        story(m)
    );
    Err(Inconclusive(format!(
        "the client had been waiting {stall:?} when the manager failed the VM over: the \
         machine stalled it\n{}",
        story(m)
    )))
}

fn assert_no_failover(m: &Managed) {
    for kind in ["detected", "term_changed", "promoting", "lost"] {
        assert!(
            m.events_of(kind).is_empty(),
            "unexpected {kind} event:\n{}",
            m.events()
        );
    }
}

fn seq_of(status: &str, key: &str) -> u64 {
    json_field(status, key)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in '{status}'"))
}

/// Fault 1: The manager loses its link to a healthy primary's host (both ways) for 4 s, four
/// times the detection timeout: the backup still receives checkpoints, so the manager must
/// not fail over. A client writes successfully the whole time; the term stays 1; once the link
/// heals the VM is protected again at term 1.
#[test]
fn manager_cut_from_a_healthy_primary_does_not_fail_over() {
    let _serial = serial();
    conclusive(|| {
        let s = protected_vm(3, 1);
        let (m, p) = (&s.m, s.p);
        let primary = m.net.host_name(p);
        let w = writer(m, "cut", Duration::from_secs(30));
        w.wait_acked(20, Duration::from_secs(20));
        let started = Instant::now();

        let cut = m.cut_manager_from(p);
        let cut_at = Instant::now();
        // The manager no longer hears the primary's host...
        m.wait_vm("web", "unreachable", LONG, |v| {
            v["status"] == "unreachable" || v["term"] != 1
        });
        // ...for 4 s in all.
        let hold = Duration::from_secs(4);
        std::thread::sleep(hold.saturating_sub(cut_at.elapsed()));
        premise(m, &w, started, 0)?;
        let v = m.vm("web").unwrap();
        assert_eq!(v["term"], 1, "{v}");
        assert_eq!(v["primary"].as_str(), Some(primary.as_str()));
        let healed_at = Instant::now();
        cut.heal();

        m.wait_vm("web", "protected again", LONG, |v| {
            v["status"] == "protected" || v["term"] != 1
        });
        premise(m, &w, started, 0)?;
        let v = m.vm("web").unwrap();
        assert_eq!(v["term"], 1, "{v}");
        assert_eq!(v["primary"].as_str(), Some(primary.as_str()));
        let mut done = w.stop();
        assert!(done.error.is_none(), "the client failed: {:?}", done.error);
        let during = done.acked_between(cut_at, healed_at);
        eprintln!(
            "{} writes acknowledged during the 4 s cut ({} in all), longest wait {:?}",
            during,
            done.acked.len(),
            done.max_wait
        );
        assert!(
            during >= 10,
            "only {during} writes acknowledged while the manager was cut off"
        );
        done.verify_all();
        assert_no_failover(m);
        assert!(
            m.events_of("host_down")
                .iter()
                .any(|e| e["host"] == primary.as_str()),
            "the manager never noticed the cut: {:?}",
            kinds(m)
        );
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}

/// Fault 2: The manager is SIGKILLed while a client writes: the VM serves and its backup keeps
/// committing checkpoints meanwhile; the manager restarted on the same state shows the VM
/// protected at term 1 within seconds without a failover; then the primary's host crashes and
/// the restarted manager fails over (term 2, every acknowledged write present on the same
/// connection).
#[test]
fn a_restarted_manager_keeps_the_vm_and_still_fails_over() {
    let _serial = serial();
    conclusive(|| {
        let mut s = protected_vm(3, 1);
        let (p, b) = (s.p, s.b);
        let m = &mut s.m;
        let w = writer(m, "mgr", Duration::from_secs(30));
        w.wait_acked(20, Duration::from_secs(20));

        let bsock = m.host_file(b, "web/backup.sock");
        let seq0 = seq_of(&ctl(&bsock, &["status"]), "seq");
        m.kill_manager();
        let killed = Instant::now();
        let acked0 = w.acked();
        assert!(
            !m.cli(&["vm", "list"]).status.success(),
            "the manager still answers"
        );
        std::thread::sleep(Duration::from_secs(2));
        let seq1 = seq_of(&ctl(&bsock, &["status"]), "seq");
        let acked1 = w.acked();
        eprintln!(
            "manager down for 2 s: the backup committed checkpoints {seq0} → {seq1}, the VM \
             acknowledged {} writes",
            acked1 - acked0
        );
        assert!(
            seq1 > seq0,
            "the backup committed nothing without the manager"
        );
        assert!(
            acked1 >= acked0 + 5,
            "the VM served only {} writes without the manager",
            acked1 - acked0
        );

        m.start_manager();
        let restarted = Instant::now();
        m.wait_vm("web", "protected after the restart", LONG, |v| {
            v["status"] == "protected" || v["term"] != 1
        });
        premise(m, &w, killed, 0)?;
        let v = m.vm("web").unwrap();
        eprintln!(
            "restarted manager shows web protected {:?} after its start ({:?} after the kill)",
            restarted.elapsed(),
            killed.elapsed()
        );
        assert_eq!(v["term"], 1, "{v}");
        assert_eq!(v["primary"].as_str(), Some(m.net.host_name(p).as_str()));
        assert_eq!(backups_of(&v), [m.net.host_name(b)]);
        assert_no_failover(m);

        // The restarted manager still fails over.
        let before = w.acked();
        let crashed = Instant::now();
        m.crash_host(p);
        let v = m.wait_vm("web", "failed over", LONG, |v| {
            v["term"] == 2 && v["primary"] == m.net.host_name(b).as_str()
        });
        eprintln!(
            "term 2 on {} {:?} after the crash",
            v["primary"],
            crashed.elapsed()
        );
        w.wait_acked(before + 20, LONG);
        let mut done = w.stop();
        assert!(done.error.is_none(), "the client failed: {:?}", done.error);
        eprintln!(
            "{} writes acknowledged in all; longest wait {:?}",
            done.acked.len(),
            done.max_wait
        );
        done.verify_all();
        assert_eq!(m.events_of("detected").len(), 1, "{}", m.events());
        m.wait_vm("web", "re-protected", LONG, |v| {
            v["status"] == "protected" && v["term"] == 2
        });
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}

/// Fault 3: Only the primary's `vmatrix primary` process is SIGKILLed (its host and agent stay
/// up): the agent reports the exit and the manager fails over at once, without waiting for any
/// silence; the client's connection carries on with every acknowledged write.
#[test]
fn a_killed_primary_process_fails_over_at_once() {
    let _serial = serial();
    conclusive(|| {
        let s = protected_vm(3, 1);
        let (m, p, b) = (&s.m, s.p, s.b);
        let w = writer(m, "kill", Duration::from_secs(30));
        let started = Instant::now();
        w.wait_acked(20, Duration::from_secs(20));
        premise(m, &w, started, 0)?;

        let before = w.acked();
        let killed = Instant::now();
        let pid = m.kill_vm_process(p, "primary");
        let v = m.wait_vm("web", "failed over", LONG, |v| {
            v["term"] == 2 && v["primary"] == m.net.host_name(b).as_str()
        });
        eprintln!(
            "primary process {pid} killed; term 2 on {} {:?} later",
            v["primary"],
            killed.elapsed()
        );
        let detected = m.events_of("detected");
        let why = detected[0]["detail"].as_str().unwrap_or_default();
        assert!(
            why.contains("exited") && why.contains("signal 9"),
            "not detected from the agent's report of the exit: {why}"
        );
        w.wait_acked(before + 20, LONG);
        premise(m, &w, started, 0)?;
        assert_eq!(detected.len(), 1, "{}", m.events());
        let mut done = w.stop();
        assert!(done.error.is_none(), "the client failed: {:?}", done.error);
        eprintln!(
            "{} writes acknowledged in all; longest wait {:?}",
            done.acked.len(),
            done.max_wait
        );
        done.verify_all();
        // The VM is protected again; one primary runs.
        let v = m.wait_vm("web", "re-protected", LONG, |v| {
            v["status"] == "protected" && v["term"] == 2
        });
        assert_eq!(backups_of(&v).len(), 1);
        assert_eq!(m.vm_pids(b, "primary").len(), 1);
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}

/// Fault 3b: the primary's VM process is stopped (SIGSTOP: hung, its host and agent up). It
/// answers its agent no more and checkpoints stop: after `--hung-ms` the manager fails it over
/// as hung, and the agent kills the stopped process; the client carries on.
#[test]
fn a_hung_primary_process_is_failed_over_and_killed() {
    let _serial = serial();
    conclusive(|| {
        let s = protected_vm(3, 1);
        let (m, p, b) = (&s.m, s.p, s.b);
        let w = writer(m, "hung", Duration::from_secs(30));
        let started = Instant::now();
        w.wait_acked(20, Duration::from_secs(20));
        premise(m, &w, started, 0)?;
        let before = w.acked();
        let stopped = Instant::now();
        let pid = m.signal_vm_process(p, "primary", "-STOP");
        m.wait_vm("web", "failed over", LONG, |v| {
            v["term"] == 2 && v["primary"] == m.net.host_name(b).as_str()
        });
        eprintln!(
            "primary {pid} stopped; term 2 {:?} later",
            stopped.elapsed()
        );
        let detected = m.events_of("detected");
        let why = detected[0]["detail"].as_str().unwrap_or_default();
        assert!(why.contains("hung"), "not detected as hung: {why}");
        m.wait_no_vm_process(p, "primary", LONG);
        w.wait_acked(before + 20, LONG);
        // (The hung primary's detection is one "on silence": it is expected.)
        premise(m, &w, started, 1)?;
        let mut done = w.stop();
        assert!(done.error.is_none(), "the client failed: {:?}", done.error);
        done.verify_all();
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}

/// Fault 4: `vmatrix vm migrate web --to <third host>` while a client writes on one connection:
/// the VM ends with its primary there at term 2, protected again, and the connection carries
/// on with every acknowledged write. The longest client wait is printed, with where it falls.
#[test]
fn a_planned_migration_moves_the_primary_under_a_writing_client() {
    let _serial = serial();
    conclusive(|| {
        let s = protected_vm(3, 1);
        let (m, p, b) = (&s.m, s.p, s.b);
        let third = (0..3).find(|&i| i != p && i != b).unwrap();
        let to = m.net.host_name(third);
        let w = writer(m, "mig", Duration::from_secs(30));
        let started = Instant::now();
        w.wait_acked(20, Duration::from_secs(20));
        premise(m, &w, started, 0)?;

        let asked = Instant::now();
        let out = m.cli(&["vm", "migrate", "web", "--to", &to]);
        assert!(
            out.status.success(),
            "migrate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        m.wait_vm("web", "migrated", LONG, |v| v["term"] != 1);
        premise(m, &w, started, 0)?;
        let v = m.vm("web").unwrap();
        assert_eq!(
            (v["term"].as_u64(), v["primary"].as_str()),
            (Some(2), Some(to.as_str()))
        );
        let moved = asked.elapsed();
        let before = w.acked();
        let v2 = m.wait_vm("web", "protected after the migration", LONG, |v| {
            v["status"] == "protected" && v["term"] == 2
        });
        let protected = asked.elapsed();
        eprintln!("migration to {to}: term 2 there {moved:?} after the request, protected again {protected:?} after it");
        assert_eq!(v2["primary"].as_str(), Some(to.as_str()));
        w.wait_acked(before + 20, LONG);
        let mut done = w.stop();
        assert!(done.error.is_none(), "the client failed: {:?}", done.error);
        // (Where the longest wait falls: adding the target to the backup set restarts the
        // primary's session, and the new primary's output waits until its backup set is in
        // step.)
        let at = done
            .max_wait_at
            .map(|t| {
                let sent = t.saturating_duration_since(asked);
                format!(
                    "sent {sent:?} after the request, answered {:?} after it",
                    sent + done.max_wait
                )
            })
            .unwrap_or_default();
        eprintln!(
            "longest client wait across the migration: {:?} ({at}); {} writes acknowledged",
            done.max_wait,
            done.acked.len()
        );
        done.verify_all();
        // The old primary is gone, one primary runs.
        m.wait_no_vm_process(p, "primary", LONG);
        let primaries: usize = (0..3).map(|i| m.vm_pids(i, "primary").len()).sum();
        assert_eq!(primaries, 1);
        let promoting = m.events_of("detected");
        assert_eq!(promoting.len(), 1, "{}", m.events());
        assert!(
            promoting[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("planned migration")),
            "{}",
            m.events()
        );
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}

/// Fault 5: The primary's host loses the replication (and management) network, its LAN link stays up:
/// the manager hears neither its heartbeats nor checkpoints at the backup and promotes the
/// backup. The old primary cannot get acknowledgements, so it releases nothing: a request sent
/// to it right after the isolation is answered by the new primary, and no frame of the guest
/// left the old host from then on (nftables counter on its bridge, the tap's counter, the
/// primary's own released_frames). Once the link heals the old primary is stopped, one primary
/// runs, and the old host holds a backup again.
#[test]
fn an_isolated_primary_is_fenced_and_never_serves_beside_the_new_one() {
    let _serial = serial();
    // Two hosts: the re-protection can only go to the old primary's host, once it is back.
    let s = protected_vm(2, 1);
    let (m, p, b) = (&s.m, s.p, s.b);
    let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(20));
    let mut acked = Vec::new();
    for i in 0..50 {
        let (k, v) = (format!("iso{i}"), format!("v{i}"));
        assert_eq!(kv.cmd(&format!("SET {k} {v}")).unwrap(), "OK");
        acked.push((k, v));
    }
    let counter = m.count_guest_frames(p);
    let psock = m.host_file(p, "web/primary.sock");

    let iso = m.isolate_replication(p);
    let isolated = Instant::now();
    // Whatever was acknowledged before the cut is out by now; nothing may follow.
    std::thread::sleep(Duration::from_millis(100));
    let frames0 = counter.packets();
    let tap0 = m.tap_frames(p);
    let released0 = seq_of(&ctl(&psock, &["status"]), "released_frames");
    // A request to the old primary: it runs it, but its answer waits for a backup's ack.
    kv.set_timeout(Duration::from_secs(30));
    let sent = Instant::now();
    let answer = kv
        .cmd("SET isolated yes")
        .expect("an answer (from the new primary)");
    let waited = sent.elapsed();
    assert_eq!(answer, "OK");
    let v = m.wait_vm("web", "failed over", LONG, |v| {
        v["term"] == 2 && v["primary"] == m.net.host_name(b).as_str()
    });
    eprintln!(
        "isolated {:?} ago; the request sent to the old primary was answered after {waited:?}; {v}",
        isolated.elapsed()
    );
    let detected = m.events_of("detected");
    assert_eq!(detected.len(), 1, "{}", m.events());
    let why = detected[0]["detail"].as_str().unwrap_or_default();
    assert!(
        why.contains("no heartbeat") && why.contains("checkpoints stopped"),
        "not detected from both signals: {why}"
    );
    acked.push(("isolated".into(), "yes".into()));
    for (k, v) in &acked {
        assert_eq!(kv.cmd(&format!("GET {k}")).unwrap(), format!("VALUE {v}"));
    }
    // The old primary still runs, cut off and holding its output.
    let st = ctl(&psock, &["status"]);
    assert_eq!(
        m.vm_pids(p, "primary").len(),
        1,
        "the old primary is gone early"
    );
    assert_eq!(json_field(&st, "term").as_deref(), Some("1"), "{st}");
    assert_eq!(
        json_field(&st, "output_held").as_deref(),
        Some("true"),
        "{st}"
    );
    assert_eq!(seq_of(&st, "released_frames"), released0, "{st}");
    assert_eq!(counter.packets(), frames0, "frames left the isolated host");
    assert_eq!(
        m.tap_frames(p),
        tap0,
        "the isolated VM wrote frames to its tap"
    );

    // Heal: the old primary is stopped (by its agent, or fenced by the new term).
    iso.heal();
    let healed = Instant::now();
    m.wait_no_vm_process(p, "primary", LONG);
    eprintln!("old primary stopped {:?} after the heal", healed.elapsed());
    let agent = m.agent_log(p);
    let plog = m.text(&m.host_file(p, "web/primary.log"));
    assert!(
        agent.contains("stopping the Primary of web") || plog.contains("fenced by term 2"),
        "the old primary was neither stopped by its agent nor fenced:\n{agent}\n{plog}"
    );
    assert_eq!(
        counter.packets(),
        frames0,
        "frames of the old primary left its host after the isolation"
    );
    assert_eq!(m.tap_frames(p), tap0);
    let v = m.wait_vm("web", "re-protected on the old host", LONG, |v| {
        v["status"] == "protected" && v["term"] == 2
    });
    assert_eq!(v["primary"].as_str(), Some(m.net.host_name(b).as_str()));
    assert_eq!(backups_of(&v), [m.net.host_name(p)]);
    assert_eq!(m.vm_pids(b, "primary").len(), 1);
    assert_eq!(m.vm_pids(p, "primary").len(), 0);
    assert_eq!(kv.cmd("GET isolated").unwrap(), "VALUE yes");
    assert_eq!(kv.cmd("SET after heal").unwrap(), "OK");
    eprintln!("events of web:\n{}", story(m));
}

/// Fault 6: The primary's host and its only backup's host die together (three hosts, one backup):
/// no backup holds the VM, so it is shown "down" with a "lost" event and never starts from
/// nothing on the third host. When the backup's host comes back (its agent restarted), the VM
/// is promoted from the backup's image with every acknowledged write.
#[test]
fn with_primary_and_backup_hosts_dead_the_vm_waits_for_the_backup() {
    let _serial = serial();
    conclusive(|| {
        let mut s = protected_vm(3, 1);
        let (p, b) = (s.p, s.b);
        let m = &mut s.m;
        let third = (0..3).find(|&i| i != p && i != b).unwrap();
        // The last request waits for nobody once both hosts are dead: it gives up after 10 s
        // (on a busy machine a request before the crash may take seconds).
        let w = writer(m, "both", Duration::from_secs(10));
        let started = Instant::now();
        w.wait_acked(100, Duration::from_secs(30));
        premise(m, &w, started, 0)?;
        m.crash_host(b);
        m.crash_host(p);
        let crashed = Instant::now();

        let v = m.wait_vm("web", "down", LONG, |v| v["status"] == "down");
        eprintln!("down {:?} after the crashes: {v}", crashed.elapsed());
        assert_eq!(v["term"], 1);
        let lost = m.events_of("lost");
        assert_eq!(lost.len(), 1, "{}", m.events());
        let why = lost[0]["detail"].as_str().unwrap_or_default();
        assert!(why.contains("no live backup holds term 1"), "{why}");
        // It stays down; nothing of it starts on the third host.
        std::thread::sleep(Duration::from_secs(2));
        let v = m.vm("web").unwrap();
        assert_eq!(v["status"], "down", "{v}");
        assert_eq!(v["term"], 1, "{v}");
        assert!(m.vm_pids(third, "primary").is_empty());
        assert!(m.vm_pids(third, "backup").is_empty());
        assert!(m.events_of("term_changed").is_empty(), "{}", m.events());
        assert_eq!(m.events_of("lost").len(), 1, "{}", m.events());
        // (The writer's last request has no answer: it gives up.)
        let done = w.stop();
        eprintln!(
            "{} writes acknowledged before both hosts died (then: {:?})",
            done.acked.len(),
            done.error
        );

        // The backup's host comes back.
        m.net.revive(b);
        m.start_agent(b);
        let back = Instant::now();
        let v = m.wait_vm("web", "promoted from the backup", LONG, |v| {
            v["term"] == 2
                && v["primary"] == m.net.host_name(b).as_str()
                && v["status"] != "promoting"
        });
        eprintln!(
            "term 2 on {} {:?} after the agent came back: {v}",
            v["primary"],
            back.elapsed()
        );
        let mut kv = connect_retry(m.net.guest_addr(), Duration::from_secs(30));
        for (k, val) in &done.acked {
            assert_eq!(
                kv.cmd(&format!("GET {k}")).unwrap(),
                format!("VALUE {val}"),
                "acknowledged write {k} missing"
            );
        }
        assert_eq!(kv.cmd("SET after revival").unwrap(), "OK");
        // Re-protected on the third host (as a backup of the new primary), which never ran a
        // primary of it.
        let v = m.wait_vm("web", "re-protected", LONG, |v| {
            v["status"] == "protected" && v["term"].as_u64() >= Some(2)
        });
        if v["term"] == 2 {
            assert_eq!(backups_of(&v), [m.net.host_name(third)]);
        }
        assert!(
            !m.agent_log(third).contains("BootPrimary"),
            "the third host booted the VM from nothing"
        );
        eprintln!("events of web:\n{}", story(m));
        Ok(())
    });
}
