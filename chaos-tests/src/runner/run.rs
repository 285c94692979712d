//! One run, from its schedule to its report (`docs/chaos.md`, "Running").
//!
//! Setup (cluster, certificates, manager, agents, the protected VM, the LAN capture) happens
//! before the run's time 0; then the clients start, the faults run until the final heal, the
//! clients stop, everything is healed, liveness is observed, every key is read back, and the
//! cluster is torn down before the (CPU-heavy) checks, so they do not compete with it. A
//! [`Guard`] owns everything created and removes it on every exit path.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use failover::model::VmSpec;

use super::api::Api;
use super::capture::{self, Capture};
use super::cluster::{self, Cluster};
use super::faults::{self, Resolver};
use super::leftovers::{self, Record};
use super::nft;
use super::procs::{self, Fleet, Paths};
use super::timeline::{self, Sinks};
use super::workload::{self, Clock};
use super::{RunOutcome, RunResult, RunnerConfig, RunnerError};
use crate::checker::{CheckConfig, GuestFrame, LivenessObservation, Verdict};
use crate::history::HistoryWriter;
use crate::run_dir::{self, RunInfo};
use crate::schedule::{self, ClusterShape, FaultKind, FaultSet, Schedule, ScheduleConfig};

/// The protected VM's name.
pub const VM_NAME: &str = "chaos";
/// The UDP port its backups listen on.
pub const VM_PORT: u16 = 7100;
/// Size of each host's own filesystem when `disk-full` is on.
const HOST_FS_SIZE: &str = "512m";

/// The runner's log (`runner.log` in the run directory), stamped with wall-clock-free seconds
/// since the run directory was made; echoed to stderr when verbose.
pub struct RunLog {
    file: std::fs::File,
    since: Instant,
    verbose: bool,
}

impl RunLog {
    fn open(dir: &Path, verbose: bool) -> Result<RunLog, RunnerError> {
        let p = dir.join("runner.log");
        let file = std::fs::File::create(&p).map_err(RunnerError::io(&p))?;
        Ok(RunLog {
            file,
            since: Instant::now(),
            verbose,
        })
    }

    /// Logs one line.
    pub fn line(&mut self, text: String) {
        let line = format!("[{:8.3}] {text}\n", self.since.elapsed().as_secs_f64());
        let _ = self.file.write_all(line.as_bytes());
        if self.verbose {
            eprint!("{line}");
        }
    }
}

/// The schedule of a run of `cfg`'s cluster.
pub fn schedule_for(
    cfg: &RunnerConfig,
    seed: u64,
    duration: Duration,
    faults: &FaultSet,
) -> Result<Schedule, RunnerError> {
    let mut sc = ScheduleConfig::new(seed, duration, faults.clone());
    sc.shape = ClusterShape {
        vms: cfg.vms,
        backups: 1,
        spares: (cfg.hosts - 2) as u8,
    };
    Ok(schedule::generate(&sc)?)
}

/// Runs seed `seed` (run number `run` of a sweep) in `<out>/seed-<seed>`.
pub fn run_seed(
    cfg: &RunnerConfig,
    run: u32,
    seed: u64,
    duration: Duration,
    faults: &FaultSet,
) -> Result<RunResult, RunnerError> {
    let schedule = schedule_for(cfg, seed, duration, faults)?;
    let dir = cfg.out.join(format!("seed-{seed}"));
    run_schedule(cfg, run, &schedule, &dir)
}

/// Runs `schedule` in `dir` (emptied first), checks it and renders its report. Errors only on
/// Ctrl-C or an unusable run directory; a run that could not be carried out is a result with
/// [`RunOutcome::Error`].
pub fn run_schedule(
    cfg: &RunnerConfig,
    run: u32,
    schedule: &Schedule,
    dir: &Path,
) -> Result<RunResult, RunnerError> {
    let started = Instant::now();
    // Absolute: mounts and the record must name the same place from any directory.
    let dir = &std::path::absolute(dir).map_err(RunnerError::io(dir))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(RunnerError::io(dir))?;
    }
    std::fs::create_dir_all(dir.join("logs")).map_err(RunnerError::io(dir))?;
    run_dir::write_json(&dir.join(run_dir::SCHEDULE_FILE), schedule)?;
    let mut log = RunLog::open(dir, cfg.verbose)?;
    log.line(format!(
        "seed {} run {run}: {} faults planned over {} s; replay: {}",
        schedule.config.seed,
        schedule.events.len(),
        schedule.config.duration_ns / 1_000_000_000,
        schedule.replay_command()
    ));
    let mut result = RunResult {
        run,
        seed: schedule.config.seed,
        dir: dir.to_path_buf(),
        outcome: RunOutcome::Error(String::new()),
        reasons: Vec::new(),
        injected: 0,
        ops: 0,
        acked: 0,
        lost: 0,
        split_brain: 0,
        replay: schedule.replay_command(),
        took_s: 0.0,
    };
    match execute(cfg, run, schedule, dir, &mut log) {
        Ok(injected) => {
            result.injected = injected;
            match check(dir) {
                Ok(v) => fill_verdict(&mut result, &v),
                Err(e) => result.outcome = RunOutcome::Error(format!("checking: {e}")),
            }
        }
        Err(RunnerError::Interrupted) => return Err(RunnerError::Interrupted),
        Err(e) => {
            log.line(format!("run not carried out: {e}"));
            result.outcome = RunOutcome::Error(e.to_string());
        }
    }
    let keep = cfg.keep_work || !result.passed();
    if !keep {
        let _ = std::fs::remove_dir_all(dir.join("work"));
    }
    result.took_s = started.elapsed().as_secs_f64();
    log.line(result.summary_line());
    Ok(result)
}

/// Checks and renders a run directory (`vmatrix chaos report` does the same).
pub fn check(dir: &Path) -> Result<Verdict, RunnerError> {
    let v = run_dir::check_run_dir(dir, &CheckConfig::default())?;
    crate::report::render_run_dir(dir)?;
    Ok(v)
}

fn fill_verdict(r: &mut RunResult, v: &Verdict) {
    r.outcome = RunOutcome::Checked(v.outcome);
    r.reasons = v.reasons.clone();
    r.ops = v.ops.total;
    r.acked = v.ops.acknowledged_writes;
    r.lost = v.lost.violations.len();
    r.split_brain = v.split_brain.intervals_total;
}

/// Everything a run created; removed by [`Guard::teardown`] (also on drop).
pub struct Guard {
    cluster: Cluster,
    record: Record,
    paths: Paths,
    fleet: Option<Fleet>,
    capture: Option<Capture>,
    done: bool,
}

impl Guard {
    /// Removes everything, in order: capture, processes, hosts, tables, mounts, stragglers,
    /// the index lock, the record. Idempotent.
    pub fn teardown(&mut self, log: &mut dyn FnMut(String)) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(mut c) = self.capture.take() {
            c.stop();
        }
        if let Some(mut f) = self.fleet.take() {
            f.kill_all();
        }
        copy_vm_logs(&self.paths, &self.cluster);
        if let Err(e) = self.cluster.down() {
            log(format!("cluster down: {e}"));
        }
        leftovers::teardown(&self.record, log);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.teardown(&mut |l| eprintln!("chaos cleanup: {l}"));
    }
}

/// Copies the VM processes' logs (`<state dir>/<vm>/*.log`) into `logs/host-<h>/`.
fn copy_vm_logs(paths: &Paths, cluster: &Cluster) {
    for h in 0..cluster.hosts {
        let host = cluster.host_name(h);
        let vm_dir = paths.host_dir(&host).join(VM_NAME);
        let Ok(entries) = std::fs::read_dir(&vm_dir) else {
            continue;
        };
        let to = paths.logs.join(format!("host-{host}"));
        let _ = std::fs::create_dir_all(&to);
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&p, to.join(e.file_name()));
            }
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn interrupted(cfg: &RunnerConfig) -> impl Fn() -> bool + '_ {
    move || cfg.interrupted()
}

/// Claims an index and builds the hosts (guarded from the first step).
fn build_cluster(cfg: &RunnerConfig, paths: &Paths, own_disks: bool) -> Result<Guard, RunnerError> {
    let script = cluster::install_scripts(&leftovers::registry_dir().join("bin"))?;
    let (index, lock) = cluster::claim_index()?;
    let c = Cluster {
        name: Cluster::name_for(index),
        index,
        hosts: cfg.hosts,
        lock,
        script,
    };
    let markers = vec![
        c.manager_listen().to_string(),
        format!("nflog:{}", nflog_group(&c)),
    ];
    let mut record = Record::new(&c, markers);
    record
        .tables
        .push(("bridge".into(), nft::capture_table_name(&c)));
    if own_disks {
        record.mounts = (0..c.hosts)
            .map(|h| paths.host_dir(&c.host_name(h)))
            .collect();
    }
    record
        .save()
        .map_err(RunnerError::io(&leftovers::registry_dir()))?;
    let guard = Guard {
        cluster: c.clone(),
        record,
        paths: paths.clone(),
        fleet: None,
        capture: None,
        done: false,
    };
    c.up()?;
    if own_disks {
        for m in &guard.record.mounts {
            std::fs::create_dir_all(m).map_err(RunnerError::io(m))?;
            procs::run_ok(
                Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={HOST_FS_SIZE}"),
                        "tmpfs",
                    ])
                    .arg(m),
                "mount a host's tmpfs",
            )?;
        }
    }
    Ok(guard)
}

fn nflog_group(c: &Cluster) -> u16 {
    30_000 + c.index as u16
}

/// Everything before time 0: hosts, certificates, manager, agents, the VM protected and
/// answering, the capture.
fn setup(
    cfg: &RunnerConfig,
    paths: &Paths,
    schedule: &Schedule,
    log: &mut RunLog,
) -> Result<Guard, RunnerError> {
    std::fs::create_dir_all(&paths.work).map_err(RunnerError::io(&paths.work))?;
    let own_disks = schedule.config.faults.contains(FaultKind::DiskFull);
    let mut guard = build_cluster(cfg, paths, own_disks)?;
    let c = guard.cluster.clone();
    log.line(format!(
        "cluster {} (index {}): hosts {}; LAN 10.77.{i}.0/24, replication 10.78.{i}.0/24{}",
        c.name,
        c.index,
        (0..c.hosts).map(|h| c.ns(h)).collect::<Vec<_>>().join(" "),
        if own_disks {
            "; hosts' state on tmpfs"
        } else {
            ""
        },
        i = c.index
    ));
    procs::make_certs(&cfg.vmatrix, paths, &c)?;
    let api = Api::new(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        procs::free_port()?,
    )));
    let fleet = guard.fleet.insert(Fleet {
        vmatrix: cfg.vmatrix.clone(),
        guest: cfg.guest.clone(),
        paths: paths.clone(),
        cluster: c.clone(),
        api: api.addr,
        manager: None,
        agents: (0..c.hosts).map(|_| None).collect(),
    });
    fleet.start_manager()?;
    for h in 0..c.hosts {
        fleet.start_agent(h)?;
    }
    let stop = interrupted(cfg);
    procs::wait_for("every host up", Duration::from_secs(30), &stop, || {
        let hosts = api.hosts().map_err(|e| e.to_string())?;
        let up = hosts.iter().filter(|h| h.status == "up").count();
        (up >= c.hosts)
            .then_some(())
            .ok_or(format!("{up} of {} up", c.hosts))
    })?;
    create_vm(cfg, &api, &c, &stop)?;
    log.line(format!(
        "VM {VM_NAME} protected and answering; manager API {}",
        api.addr
    ));
    nft::install_capture(&c, nflog_group(&c)).map_err(|e| RunnerError::Command {
        what: "nft (capture)".into(),
        detail: e,
    })?;
    guard.capture = Some(capture::start(
        nflog_group(&c),
        &paths.work.join("lan.pcap"),
        &paths.logs.join("tcpdump.log"),
    )?);
    Ok(guard)
}

fn create_vm(
    cfg: &RunnerConfig,
    api: &Api,
    c: &Cluster,
    stop: &dyn Fn() -> bool,
) -> Result<(), RunnerError> {
    api.create(&VmSpec {
        name: VM_NAME.into(),
        mem_mib: cfg.mem_mib,
        disk_mib: 16,
        guest_config: c.guest_config(),
        backups: 1,
        hosts: Vec::new(),
        port: VM_PORT,
    })?;
    procs::wait_for("the VM protected", Duration::from_secs(90), stop, || {
        let vms = api.vms().map_err(|e| e.to_string())?;
        let v = vms.iter().find(|v| v.spec.name == VM_NAME).ok_or("no VM")?;
        (v.status == "protected")
            .then_some(())
            .ok_or(v.status.clone())
    })?;
    procs::wait_for("the VM answering", Duration::from_secs(30), stop, || {
        workload::probe(c.guest_addr(), Duration::from_secs(1))
            .then_some(())
            .ok_or("no answer".into())
    })
}

/// After the final heal: when the manager first says protected, when a fresh request is first
/// answered (each polled until `wait`).
fn observe_liveness(
    cfg: &RunnerConfig,
    api: &Api,
    addr: std::net::SocketAddr,
    clock: Clock,
    heal_ns: u64,
) -> LivenessObservation {
    let mut obs = LivenessObservation {
        heal_ns,
        protected_ns: None,
        answering_ns: None,
    };
    let deadline = Instant::now() + cfg.liveness_wait;
    while Instant::now() < deadline && !cfg.interrupted() {
        if obs.protected_ns.is_none() {
            let protected = api.vms().is_ok_and(|vms| {
                vms.iter()
                    .any(|v| v.spec.name == VM_NAME && v.status == "protected")
            });
            if protected {
                obs.protected_ns = Some(clock.now_ns());
            }
        }
        if obs.answering_ns.is_none() && workload::probe(addr, Duration::from_secs(1)) {
            obs.answering_ns = Some(clock.now_ns());
        }
        if obs.protected_ns.is_some() && obs.answering_ns.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    obs
}

fn commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The run itself; returns the number of faults injected.
fn execute(
    cfg: &RunnerConfig,
    run: u32,
    schedule: &Schedule,
    dir: &Path,
    log: &mut RunLog,
) -> Result<usize, RunnerError> {
    let paths = Paths {
        work: dir.join("work"),
        logs: dir.join("logs"),
    };
    let mut guard = setup(cfg, &paths, schedule, log)?;
    let c = guard.cluster.clone();
    let clock = Clock {
        start: Instant::now(),
    };
    let start_unix_ns = unix_ns();
    let history = HistoryWriter::append_to(&dir.join(run_dir::HISTORY_FILE))?;
    let clients = workload::start(
        &cfg.workload,
        c.guest_addr(),
        schedule.config.seed,
        clock,
        history,
    );
    let fleet = guard.fleet.as_mut().expect("setup started the fleet");
    let api = Api {
        timeout: Duration::from_millis(400),
        ..Api::new(fleet.api)
    };
    let mut resolver = Resolver {
        api,
        vm: VM_NAME.into(),
        last: None,
        down_since: None,
    };
    let _ = resolver.refresh(0);
    let injected = run_fault_phase(cfg, schedule, dir, fleet, &mut resolver, clock, log)?;
    clients.stop()?;
    for fixed in faults::heal_everything(fleet) {
        log.line(format!("final heal: {fixed}"));
    }
    let heal_ns = clock.now_ns();
    log.line(format!(
        "{:.3} s: everything healed; liveness phase",
        heal_ns as f64 / 1e9
    ));
    let liveness = observe_liveness(cfg, &Api::new(fleet.api), c.guest_addr(), clock, heal_ns);
    log.line(format!("liveness: {liveness:?}"));
    let keys = workload::keys(&cfg.workload);
    let finals = workload::read_back(
        c.guest_addr(),
        &keys,
        Instant::now() + Duration::from_secs(30),
    );
    log.line(format!("read back {} of {} keys", finals.len(), keys.len()));
    run_dir::write_json(&dir.join(run_dir::FINALS_FILE), &finals)?;
    let mac = capture::learn_guest_mac(&c.lan_bridge(), &c.guest_addr().ip().to_string());
    if let Some(mut cap) = guard.capture.take() {
        let counted = nft::capture_counted(&c);
        cap.stop();
        log.line(format!(
            "LAN capture: nft counted {counted:?} frames from the hosts' ports"
        ));
        write_frames(dir, &cap.pcap, mac, start_unix_ns, log)?;
    }
    let events = paths.events();
    if let Err(e) = std::fs::copy(&events, dir.join(run_dir::EVENTS_FILE)) {
        log.line(format!("copying {}: {e}", events.display()));
    }
    let info = RunInfo {
        seed: schedule.config.seed,
        run,
        start_unix_ms: start_unix_ns / 1_000_000,
        commit: commit(),
        liveness: Some(liveness),
    };
    run_dir::write_json(&dir.join(run_dir::RUN_FILE), &info)?;
    guard.teardown(&mut |l| log.line(format!("teardown: {l}")));
    Ok(injected)
}

fn run_fault_phase(
    cfg: &RunnerConfig,
    schedule: &Schedule,
    dir: &Path,
    fleet: &mut Fleet,
    resolver: &mut Resolver,
    clock: Clock,
    log: &mut RunLog,
) -> Result<usize, RunnerError> {
    let path = dir.join(run_dir::INJECTIONS_FILE);
    let mut injections = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(RunnerError::io(&path))?;
    let cluster = fleet.cluster.clone();
    let mut ctx = faults::Ctx {
        fleet,
        resolver,
        own_disks: schedule.config.faults.contains(FaultKind::DiskFull),
        clock,
        vm_port: VM_PORT,
        seed: schedule.config.seed,
    };
    let stop = interrupted(cfg);
    let settle = cfg.settle.map(schedule::duration_ns);
    let done = {
        let mut log_line = |l: String| log.line(l);
        let mut keepalive = || cluster.touch_lock();
        let mut sinks = Sinks {
            injections: &mut injections,
            log: &mut log_line,
            interrupted: &stop,
            keepalive: &mut keepalive,
        };
        timeline::run_faults(&mut ctx, schedule, settle, &mut sinks)?
    };
    if done.shift_ns >= 1_000_000 {
        log.line(format!(
            "waited {} ms in all for the VM to be protected again before faults",
            done.shift_ns / 1_000_000
        ));
    }
    // The quiet end of the run, up to the (moved) final heal; not when the VM is down for good.
    let end = Duration::from_nanos(schedule.final_heal_ns + done.shift_ns);
    while clock.start.elapsed() < end && !done.gave_up {
        if cfg.interrupted() {
            return Err(RunnerError::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(done.injected)
}

fn write_frames(
    dir: &Path,
    pcap: &PathBuf,
    mac: Option<[u8; 6]>,
    start_unix_ns: u64,
    log: &mut RunLog,
) -> Result<(), RunnerError> {
    let bytes = std::fs::read(pcap).map_err(RunnerError::io(pcap))?;
    let all = capture::parse_pcap(&bytes).map_err(|e| RunnerError::Command {
        what: "reading the LAN capture".into(),
        detail: e.to_string(),
    })?;
    let mac = mac.unwrap_or(capture::DEFAULT_GUEST_MAC);
    let mut frames: Vec<GuestFrame> = capture::guest_frames(&all, mac, start_unix_ns);
    frames.sort_by_key(|f| f.time_ns);
    let mut by_host: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &frames {
        *by_host.entry(&f.host).or_default() += 1;
    }
    log.line(format!(
        "LAN capture: {} frames logged, {} from the guest ({mac:02x?}) during the run: {by_host:?}",
        all.len(),
        frames.len()
    ));
    let mut out = Vec::new();
    for f in &frames {
        serde_json::to_writer(&mut out, f).map_err(|e| RunnerError::Config(e.to_string()))?;
        out.push(b'\n');
    }
    run_dir::write_atomic(&dir.join(run_dir::FRAMES_FILE), &out)?;
    Ok(())
}
