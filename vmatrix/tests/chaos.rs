//! The chaos runner end to end, on real KVM, namespaces, nftables, QUIC and processes
//! (`vmatrix chaos run|report`, `chaos_tests::runner`):
//!
//! 1. a short run passes and leaves nothing behind; its read-back tampered to a superseded
//!    value (a lost write) makes `vmatrix chaos report` fail and name the key: the checker
//!    catches a violation in a real run directory, not only in hand-made histories;
//! 2. the runner's own faults: a host fault whose role must be resolved while the manager is
//!    dead (resolved from the last view, said in the note), a VM process that is already gone
//!    (skipped, said), and the run still carried out and checked;
//! 3. Ctrl-C during a fault (a stall) removes everything; a runner killed with SIGKILL leaves
//!    its cluster behind, and the next runner's start removes it.
//!
//! They run one at a time (each runs a cluster of three hosts on this 2-core machine).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chaos_tests::checker::VerdictOutcome;
use chaos_tests::run_dir;
use chaos_tests::runner::{self, RunOutcome, RunnerConfig};
use chaos_tests::schedule::{
    self, ClusterShape, Fault, FaultKind, FaultSet, Injection, Role, Schedule, ScheduleConfig,
    ScheduledEvent,
};
use support::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cluster a run directory's runner used: (name, index), from its `runner.log`.
fn cluster_of(dir: &Path) -> Option<(String, u32)> {
    let log = std::fs::read_to_string(dir.join("runner.log")).ok()?;
    let at = log.find("cluster vxc")?;
    let name: String = log[at + 8..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let index = name.trim_start_matches("vxc").parse().ok()?;
    Some((name, index))
}

/// Asserts that nothing of cluster `name` (index `index`) is left: hosts, bridges, the capture
/// table, processes, the record.
fn assert_gone(name: &str, index: u32) {
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !ns.lines().any(|l| l.starts_with(name)),
        "namespaces of {name} left: {ns}"
    );
    let link = Command::new("ip")
        .args(["link", "show", &format!("{name}lan")])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!link.success(), "bridge {name}lan left");
    let table = Command::new("nft")
        .args(["list", "table", "bridge", &format!("{name}cap")])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!table.success(), "capture table {name}cap left");
    let marker = format!("10.78.{index}.254:7700");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        assert!(!cmd.contains(&marker), "process left: {cmd}");
    }
    let record = runner::leftovers::registry_dir().join(format!("{name}.json"));
    assert!(!record.exists(), "record {} left", record.display());
}

fn chaos_run(out: &Path, seed: u64, duration: &str, faults: &str) -> Command {
    let mut c = Command::new(vmatrix_bin());
    c.args([
        "chaos",
        "run",
        "--seed",
        &seed.to_string(),
        "--duration",
        duration,
    ])
    .args(["--faults", faults, "--out"])
    .arg(out)
    .arg("--guest")
    .arg(guest_elf());
    c
}

#[test]
fn a_run_passes_cleans_up_and_a_tampered_read_back_fails() {
    let _s = serial();
    require_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let started = Instant::now();
    let o = chaos_run(
        &out,
        7,
        "12s",
        "kill-primary-host,kill-manager,isolate-host",
    )
    .output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}took {:?}", started.elapsed());
    assert!(o.status.success(), "the run failed: {text}");
    assert!(text.contains("run 0 seed 7: PASS"), "{text}");
    let dir = out.join("seed-7");
    let (name, index) = cluster_of(&dir).expect("runner.log names the cluster");
    assert_gone(&name, index);
    for f in [
        run_dir::HISTORY_FILE,
        run_dir::SCHEDULE_FILE,
        run_dir::INJECTIONS_FILE,
        run_dir::EVENTS_FILE,
        run_dir::FRAMES_FILE,
        run_dir::FINALS_FILE,
        run_dir::RUN_FILE,
        run_dir::VERDICT_FILE,
        run_dir::REPORT_FILE,
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(
        !dir.join("work").exists(),
        "a passing run's work directory is removed"
    );
    // The capture saw the guest, from the hosts that ran it.
    let frames = std::fs::read_to_string(dir.join(run_dir::FRAMES_FILE)).unwrap();
    assert!(
        frames.lines().count() > 100,
        "few guest frames: {}",
        frames.lines().count()
    );

    // A lost write: a key read back with a value that a later acknowledged write superseded.
    let history = run_dir::read_history(&dir).unwrap();
    let (key, old) =
        superseded_value(&history.ops).expect("a key with two ordered acknowledged sets");
    let finals_path = dir.join(run_dir::FINALS_FILE);
    let mut finals: std::collections::BTreeMap<String, Option<String>> =
        run_dir::read_json(&finals_path).unwrap();
    finals.insert(key.clone(), Some(old.clone()));
    run_dir::write_json(&finals_path, &finals).unwrap();
    let o = Command::new(vmatrix_bin())
        .args(["chaos", "report"])
        .arg(&dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{said}");
    assert!(
        said.contains("Fail") && said.contains("lost an acknowledged write"),
        "{said}"
    );
    let v: chaos_tests::checker::Verdict =
        run_dir::read_json(&dir.join(run_dir::VERDICT_FILE)).unwrap();
    assert_eq!(v.outcome, VerdictOutcome::Fail);
    assert!(
        v.lost.violations.iter().any(|l| l.key == key),
        "{:?}",
        v.lost
    );
    let html = std::fs::read_to_string(dir.join(run_dir::REPORT_FILE)).unwrap();
    assert!(
        html.contains("FAIL") && html.contains(&old),
        "the report names the lost write"
    );
}

/// A key and the value of an acknowledged set that another acknowledged set of the key
/// followed in real time (so the register can no longer hold it).
fn superseded_value(ops: &[chaos_tests::history::Op]) -> Option<(String, String)> {
    let acked: Vec<&chaos_tests::history::Op> =
        ops.iter().filter(|o| o.is_set() && o.is_ok()).collect();
    for a in &acked {
        let later = acked
            .iter()
            .any(|b| b.key == a.key && b.invoke_ns > a.complete_ns);
        if later {
            return Some((a.key.clone(), a.written()?.to_string()));
        }
    }
    None
}

fn event(index: u32, start_ms: u64, end_ms: u64, fault: Fault) -> ScheduledEvent {
    ScheduledEvent {
        index,
        start_ns: start_ms * 1_000_000,
        end_ns: end_ms * 1_000_000,
        vm: 0,
        fault,
    }
}

#[test]
fn the_runner_resolves_without_the_manager_and_skips_a_target_that_is_gone() {
    let _s = serial();
    require_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let faults: FaultSet = [
        FaultKind::KillManager,
        FaultKind::KillPrimaryHost,
        FaultKind::KillVm,
        FaultKind::StallVm,
    ]
    .into_iter()
    .collect();
    let mut config = ScheduleConfig::new(3, Duration::from_secs(14), faults);
    config.shape = ClusterShape::default();
    // Hand-made and overlapping: the primary's host dies while the manager is dead, and its VM
    // process is then killed again (it is gone).
    let schedule = Schedule {
        generator: schedule::GENERATOR_VERSION,
        config,
        events: vec![
            event(0, 2000, 6000, Fault::KillManager),
            event(1, 3000, 5000, Fault::KillPrimaryHost),
            event(
                2,
                3500,
                3600,
                Fault::KillVm {
                    role: Role::Primary,
                },
            ),
            event(
                3,
                9000,
                9500,
                Fault::StallVm {
                    role: Role::Backup { index: 0 },
                },
            ),
        ],
        final_heal_ns: 14_000_000_000,
    };
    let mut cfg = RunnerConfig::new(vmatrix_bin(), guest_elf(), tmp.path().join("out"));
    cfg.verbose = true;
    let dir = tmp.path().join("run");
    let r = runner::run::run_schedule(&cfg, 0, &schedule, &dir).expect("not interrupted");
    eprintln!("{}\n{:?}", r.summary_line(), r.reasons);
    let injections: Vec<Injection> = run_dir::read_json_lines(&dir.join(run_dir::INJECTIONS_FILE))
        .unwrap()
        .items;
    let by_event = |e: u32| {
        injections
            .iter()
            .find(|i| i.event == e)
            .unwrap_or_else(|| panic!("event {e} not logged: {injections:?}"))
    };
    let host_fault = by_event(1);
    assert!(
        host_fault
            .note
            .as_deref()
            .is_some_and(|n| n.contains("manager unreachable")),
        "{host_fault:?}"
    );
    assert!(host_fault.target.contains("(primary)"), "{host_fault:?}");
    let gone = by_event(2);
    assert!(
        gone.note
            .as_deref()
            .is_some_and(|n| n.starts_with("skipped:")),
        "{gone:?}"
    );
    assert_eq!(gone.end_ns, Some(gone.start_ns));
    assert!(by_event(0).end_ns.is_some() && by_event(3).end_ns.is_some());
    assert_eq!(
        r.outcome,
        RunOutcome::Checked(VerdictOutcome::Pass),
        "{:?}",
        r.reasons
    );
    let (name, index) = cluster_of(&dir).unwrap();
    assert_gone(&name, index);
}

/// Starts `vmatrix chaos run` and waits until its VM is protected and its clients run.
fn start_run(out: &Path, seed: u64) -> (Child, PathBuf) {
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    std::fs::create_dir_all(out).unwrap();
    let child = chaos_run(out, seed, "60s", "stall,partition")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let dir = out.join(format!("seed-{seed}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(dir.join("runner.log"))
        .is_ok_and(|l| l.contains("protected and answering"))
    {
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Into the first fault (at 2 s: a stall or a partition).
    std::thread::sleep(Duration::from_millis(3000));
    (child, dir)
}

#[test]
fn ctrl_c_and_a_killed_runner_leave_nothing_behind() {
    let _s = serial();
    require_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, dir) = start_run(&tmp.path().join("a"), 11);
    let (name, index) = cluster_of(&dir).unwrap();
    assert!(Path::new(&format!("/run/netns/{name}a")).exists());
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    assert_gone(&name, index);

    // SIGKILL: nothing runs the guard; the next runner's start cleans up.
    let (mut child, dir) = start_run(&tmp.path().join("b"), 12);
    let (name, index) = cluster_of(&dir).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        Path::new(&format!("/run/netns/{name}a")).exists(),
        "the cluster outlives a SIGKILLed runner"
    );
    let mut said = Vec::new();
    runner::leftovers::clean_leftovers(&mut |l| said.push(l));
    eprintln!("{said:#?}");
    assert!(said.iter().any(|l| l.contains(&name)), "{said:?}");
    assert_gone(&name, index);
}
