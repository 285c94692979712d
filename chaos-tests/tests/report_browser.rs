//! The chaos report in a real headless browser (Debian's Chromium): a realistic synthetic run
//! directory — a minute of four clients' operations on a three-host cluster under a seeded
//! schedule of every fault kind, the manager's event log in its own format (stamped
//! `failover::event::Event`s), guest frames, the injections — checked with `check_run_dir`,
//! rendered with `render_run_dir`, then opened in Chromium: the DOM it builds must hold the
//! SVG timeline with its lanes and the summary table, and its screenshot must be a PNG of the
//! window's size whose timeline is really drawn (pixels of the timeline's own colours).
//!
//! `VMATRIX_UPDATE_SCREENSHOT=1` also writes the screenshot to `docs/chaos-report.png`;
//! `VMATRIX_REPORT_DIR=<dir>` keeps the run directory (report and screenshot) there.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::checker::{CheckConfig, GuestFrame, LivenessObservation, VerdictOutcome};
use chaos_tests::history::{HistoryWriter, Op, OpKind, Outcome};
use chaos_tests::run_dir::{self, RunInfo};
use chaos_tests::schedule::rng::Xoshiro256;
use chaos_tests::schedule::{generate, Fault, FaultSet, Injection, Role, Schedule, ScheduleConfig};
use failover::event::{Event, EventKind};

const MS: u64 = 1_000_000;
const SEED: u64 = 1;
const RUN_SECONDS: u64 = 60;
/// The run's wall-clock start (the manager's events are placed against it).
const START_UNIX_MS: u64 = 1_767_225_600_000;
const CHROMIUM: &str = "/usr/bin/chromium";
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 1500;

/// What a fault does to the service, in this synthetic cluster.
enum Effect {
    /// The primary is gone: detection, a new term, promotion, re-protection.
    Failover,
    /// The primary is frozen for less than the detection time: requests wait.
    Freeze,
    /// The primary is frozen for longer: failed over, then fenced when it wakes.
    FreezeFailover,
    /// A backup is gone: output commit waits until the primary drops it, then re-protection.
    BackupLost,
    /// Slower acknowledgements by this much (a slow replication link).
    Slow(u64),
    /// Nothing a client sees.
    Quiet,
}

fn effect(fault: &Fault, length: u64) -> Effect {
    let primary = |r: &Role| *r == Role::Primary;
    match fault {
        Fault::KillPrimaryHost => Effect::Failover,
        Fault::KillVm { role } | Fault::IsolateHost { role } if primary(role) => Effect::Failover,
        Fault::CrashInCheckpoint { victim } | Fault::CrashInSync { victim, .. }
            if primary(victim) =>
        {
            Effect::Failover
        }
        Fault::StallPrimaryHost => stall(length),
        Fault::StallVm { role } if primary(role) => stall(length),
        Fault::KillBackupHost { .. }
        | Fault::StallBackupHost { .. }
        | Fault::CutPrimaryFromBackups
        | Fault::DiskFull { .. }
        | Fault::KillVm { .. }
        | Fault::StallVm { .. }
        | Fault::CrashInCheckpoint { .. }
        | Fault::CrashInSync { .. } => Effect::BackupLost,
        Fault::IsolateHost {
            role: Role::Backup { .. },
        } => Effect::BackupLost,
        Fault::OneWayDrop { from, to } if primary(from) || primary(to) => Effect::BackupLost,
        Fault::LinkDelay { delay_ns, .. } => Effect::Slow(2 * delay_ns),
        Fault::LinkLoss { .. } | Fault::LinkReorder { .. } | Fault::LinkDuplicate { .. } => {
            Effect::Slow(4 * MS)
        }
        Fault::Swizzle { .. } => Effect::Slow(60 * MS),
        _ => Effect::Quiet,
    }
}

fn stall(length: u64) -> Effect {
    if length < DETECT {
        Effect::Freeze
    } else {
        Effect::FreezeFailover
    }
}

/// The manager's detection time.
const DETECT: u64 = 800 * MS;
/// A client's TCP retransmission timeout (a request sent into a failover waits for it).
const RTO: u64 = 210 * MS;
/// A client gives up after this.
const CLIENT_TIMEOUT: u64 = 1_000 * MS;

/// A time window in which the service behaves differently.
struct Window {
    start: u64,
    end: u64,
    kind: WindowKind,
}

enum WindowKind {
    /// No answer until `end`, then after a retransmission.
    Outage,
    /// No answer until `end`.
    Frozen,
    /// Acknowledgements slower by this much.
    Slow(u64),
}

/// The synthetic cluster: hosts a, b, c; the primary, one backup, one spare.
struct Cluster {
    primary: &'static str,
    backup: &'static str,
    spare: &'static str,
    term: u64,
    events: Vec<(u64, Event)>,
    windows: Vec<Window>,
    /// (host, term, from, to): when a host's instance released guest frames.
    serving: Vec<(&'static str, u64, u64, u64)>,
    serving_since: u64,
}

impl Cluster {
    fn event(&mut self, t: u64, kind: EventKind, host: &str, detail: String) {
        let at_ms = t / MS;
        self.events.push((
            t,
            Event {
                at_ms,
                kind,
                vm: Some("web".into()),
                host: Some(host.into()),
                term: Some(self.term),
                detail,
            },
        ));
    }

    /// The primary's host fails at `t`; the backup is promoted after the detection time.
    fn fail_over(&mut self, t: u64, why: &str) -> u64 {
        let old = self.primary;
        let decided = t + DETECT;
        self.serving.push((old, self.term, self.serving_since, t));
        self.event(decided, EventKind::Detected, old, why.into());
        self.term += 1;
        let (new, spare) = (self.backup, self.spare);
        self.event(
            decided,
            EventKind::TermChanged,
            new,
            format!(
                "term {} → {}: only the primary on {new} may release output",
                self.term - 1,
                self.term
            ),
        );
        self.event(
            decided,
            EventKind::BackupAdded,
            spare,
            "re-protection: a new backup syncs from the primary".into(),
        );
        self.event(
            decided,
            EventKind::Promoting,
            new,
            "resuming from its last committed checkpoint".into(),
        );
        let running = decided + 38 * MS;
        self.event(
            running,
            EventKind::PrimaryRunning,
            new,
            format!("primary runs on {new} (38 ms after the decision)"),
        );
        self.event(
            running + 1_300 * MS,
            EventKind::Protected,
            new,
            format!("every backup holds it: [\"{spare}\"]"),
        );
        (self.primary, self.backup, self.spare) = (new, spare, old);
        self.serving_since = running;
        running
    }

    /// The backup fails at `t`: the primary drops it, a spare takes its place.
    fn lose_backup(&mut self, t: u64) -> u64 {
        let lost = t + DETECT;
        let (old, spare) = (self.backup, self.spare);
        self.event(
            lost,
            EventKind::BackupLost,
            old,
            format!("no heartbeat for {} ms", DETECT / MS),
        );
        self.event(
            lost + 5 * MS,
            EventKind::BackupAdded,
            spare,
            "re-protection: a new backup syncs from the primary".into(),
        );
        self.event(
            lost + 1_200 * MS,
            EventKind::Protected,
            self.primary,
            format!("every backup holds it: [\"{spare}\"]"),
        );
        (self.backup, self.spare) = (spare, old);
        lost
    }

    /// What the runner would log as the fault's resolved target.
    fn target(&self, fault: &Fault) -> String {
        let role = |r: &Role| match r {
            Role::Primary => format!("host {} (primary of web)", self.primary),
            Role::Backup { .. } => format!("host {} (backup of web)", self.backup),
            Role::Spare { .. } => format!("host {} (spare)", self.spare),
            Role::Manager => "manager".to_string(),
        };
        match fault {
            Fault::KillManager | Fault::StallManager => "manager".into(),
            Fault::KillVm { role: r }
            | Fault::StallVm { role: r }
            | Fault::IsolateHost { role: r } => role(r),
            Fault::CrashInCheckpoint { victim } | Fault::CrashInSync { victim, .. } => role(victim),
            Fault::OneWayDrop { from, to } => format!("{} -> {}", role(from), role(to)),
            Fault::KillPrimaryHost | Fault::StallPrimaryHost => role(&Role::Primary),
            Fault::KillBackupHost { .. }
            | Fault::StallBackupHost { .. }
            | Fault::DiskFull { .. } => role(&Role::Backup { index: 0 }),
            Fault::CutPrimaryFromBackups => {
                format!(
                    "{} / {}",
                    role(&Role::Primary),
                    role(&Role::Backup { index: 0 })
                )
            }
            Fault::CutPrimaryFromManager => format!("{} / manager", role(&Role::Primary)),
            Fault::Swizzle { links, .. } => format!("{} links", links.len()),
            _ => format!(
                "link {} -> {}",
                role(&Role::Primary),
                role(&Role::Backup { index: 0 })
            ),
        }
    }

    fn apply(&mut self, start: u64, end: u64, fault: &Fault) {
        let length = end - start;
        match effect(fault, length) {
            Effect::Failover => {
                let back = self.fail_over(start, "no heartbeat and checkpoints stopped");
                self.windows.push(Window {
                    start,
                    end: back,
                    kind: WindowKind::Outage,
                });
            }
            Effect::FreezeFailover => {
                let stalled = self.primary;
                let back = self.fail_over(start, "primary hung: checkpoints stopped");
                self.windows.push(Window {
                    start,
                    end: back,
                    kind: WindowKind::Outage,
                });
                self.event(
                    end + 20 * MS,
                    EventKind::Fenced,
                    stalled,
                    format!("an instance of term {} was fenced", self.term - 1),
                );
            }
            Effect::Freeze => self.windows.push(Window {
                start,
                end,
                kind: WindowKind::Frozen,
            }),
            Effect::BackupLost => {
                let dropped = self.lose_backup(start);
                self.windows.push(Window {
                    start,
                    end: dropped,
                    kind: WindowKind::Frozen,
                });
            }
            Effect::Slow(extra) => self.windows.push(Window {
                start,
                end,
                kind: WindowKind::Slow(extra),
            }),
            Effect::Quiet => {}
        }
    }
}

/// One client operation before values are known.
struct Draft {
    client: u32,
    op: u64,
    key: String,
    set: bool,
    invoke: u64,
    complete: u64,
    /// `Some(t)`: it took effect at `t`; `None`: it never did.
    effect_at: Option<u64>,
    outcome: Outcome,
}

/// Four clients, each doing one operation at a time with a short think time.
fn drafts(windows: &[Window], end: u64, rng: &mut Xoshiro256) -> Vec<Draft> {
    let mut out = Vec::new();
    for client in 0..4u32 {
        let mut t = u64::from(client) * 7 * MS;
        let mut op = 0;
        while t < end {
            let set = rng.below(100) < 55;
            let key = match rng.below(10) {
                0..=5 => format!("k{}", rng.below(6)),
                _ => format!("c{client}"),
            };
            let base = rng.range(5, 14) * MS;
            let (complete, effect_at, outcome) = serve(windows, t, base, rng);
            out.push(Draft {
                client,
                op,
                key,
                set,
                invoke: t,
                complete,
                effect_at,
                outcome,
            });
            op += 1;
            t = complete + rng.range(40, 80) * MS;
        }
    }
    out
}

/// When an operation invoked at `t` completes, when it took effect, and how it ended.
fn serve(
    windows: &[Window],
    t: u64,
    base: u64,
    rng: &mut Xoshiro256,
) -> (u64, Option<u64>, Outcome) {
    let ok = Outcome::Ok { read: None };
    if let Some(w) = windows.iter().find(|w| w.start <= t + base && t < w.end) {
        match w.kind {
            WindowKind::Slow(extra) => {
                let done = t + base + extra / 2 + rng.below(extra + 1);
                return (done, Some(done - MS), ok);
            }
            WindowKind::Frozen => {
                let done = w.end + base;
                return (done, Some(done - MS), ok);
            }
            WindowKind::Outage => {
                // Sent to the dead primary: answered after the retransmission, or given up.
                let done = w.end + RTO + base;
                if rng.below(100) < 8 {
                    let error = "connection reset before the request was sent".to_string();
                    return (t + rng.range(1, 20) * MS, None, Outcome::Fail { error });
                }
                if done - t > CLIENT_TIMEOUT {
                    let error = "timeout after 1 s".to_string();
                    return (t + CLIENT_TIMEOUT, None, Outcome::Unknown { error });
                }
                return (done, Some(done - MS), ok);
            }
        }
    }
    let done = t + base;
    (done, Some(t + base / 2), ok)
}

/// Gives every set a unique value and every get the register's value where it took effect.
fn history(mut drafts: Vec<Draft>) -> (Vec<Op>, BTreeMap<String, Option<String>>) {
    drafts.sort_by_key(|d| (d.effect_at.unwrap_or(u64::MAX), d.client, d.op));
    let mut register: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut ops = Vec::new();
    for d in drafts {
        let value = format!("c{}-{}", d.client, d.op);
        let state = register.entry(d.key.clone()).or_insert(None);
        let outcome = match (d.effect_at, d.outcome) {
            (Some(_), Outcome::Ok { .. }) if d.set => {
                *state = Some(value.clone());
                Outcome::Ok { read: None }
            }
            (Some(_), Outcome::Ok { .. }) => Outcome::Ok {
                read: state.clone(),
            },
            (_, other) => other,
        };
        ops.push(Op {
            client: d.client,
            op: d.op,
            key: d.key,
            kind: if d.set {
                OpKind::Set { value }
            } else {
                OpKind::Get
            },
            invoke_ns: d.invoke,
            complete_ns: d.complete,
            outcome,
        });
    }
    ops.sort_by_key(|o| (o.complete_ns, o.client, o.op));
    (ops, register)
}

/// The manager's event log as the manager writes it: `{"seq","time","unix_ms", ...event}`.
fn event_lines(setup: &[(i64, EventKind, &str, &str)], events: &[(u64, Event)]) -> String {
    let mut out = String::new();
    let mut seq = 0;
    let mut line = |unix_ms: u64, e: &Event| {
        seq += 1;
        let mut v = serde_json::to_value(e).unwrap();
        v["seq"] = seq.into();
        v["time"] = format!("2026-01-01T00:00:{:06.3}Z", (unix_ms % 60_000) as f64 / 1e3).into();
        v["unix_ms"] = unix_ms.into();
        out.push_str(&format!("{v}\n"));
    };
    for &(offset_ms, kind, host, detail) in setup {
        let e = Event {
            at_ms: (5_000 + offset_ms) as u64,
            kind,
            vm: (kind != EventKind::HostUp).then(|| "web".to_string()),
            host: Some(host.into()),
            term: (kind != EventKind::HostUp).then_some(1),
            detail: detail.into(),
        };
        line((START_UNIX_MS as i64 + offset_ms) as u64, &e);
    }
    for (t, e) in events {
        line(START_UNIX_MS + t / MS, e);
    }
    out
}

/// Writes a whole run directory and checks it; returns the schedule.
fn make_run_dir(dir: &Path) -> Schedule {
    let schedule = generate(&ScheduleConfig::new(
        SEED,
        Duration::from_secs(RUN_SECONDS),
        FaultSet::all(),
    ))
    .unwrap();
    run_dir::write_json(&dir.join(run_dir::SCHEDULE_FILE), &schedule).unwrap();
    let mut rng = Xoshiro256::seed_from(SEED);
    let mut cluster = Cluster {
        primary: "a",
        backup: "b",
        spare: "c",
        term: 1,
        events: Vec::new(),
        windows: Vec::new(),
        serving: Vec::new(),
        serving_since: 0,
    };
    let mut injections = Vec::new();
    for e in &schedule.events {
        // The runner acts a few ms after the plan and names what it resolved.
        let (start, end) = (e.start_ns + 2 * MS, e.end_ns + 3 * MS);
        let target = cluster.target(&e.fault);
        injections.push(Injection {
            event: e.index,
            kind: e.fault.kind(),
            target,
            start_ns: start,
            end_ns: Some(end),
            note: None,
        });
        cluster.apply(start, end, &e.fault);
    }
    let heal = schedule.final_heal_ns;
    let end = heal + 2_000 * MS;
    cluster
        .serving
        .push((cluster.primary, cluster.term, cluster.serving_since, end));

    let (ops, finals) = history(drafts(&cluster.windows, end, &mut rng));
    let mut w = HistoryWriter::append_to(&dir.join(run_dir::HISTORY_FILE)).unwrap();
    for op in &ops {
        w.append(op).unwrap();
    }
    w.flush().unwrap();
    run_dir::write_json(&dir.join(run_dir::FINALS_FILE), &finals).unwrap();
    let lines: String = injections
        .iter()
        .map(|i| serde_json::to_string(i).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join(run_dir::INJECTIONS_FILE), lines).unwrap();

    let setup = [
        (-4_000, EventKind::HostUp, "a", "agent connected"),
        (-3_990, EventKind::HostUp, "b", "agent connected"),
        (-3_980, EventKind::HostUp, "c", "agent connected"),
        (
            -3_500,
            EventKind::Created,
            "a",
            "placed: primary a, backups [b]",
        ),
        (-3_400, EventKind::PrimaryRunning, "a", "primary runs on a"),
        (
            -2_100,
            EventKind::Protected,
            "a",
            "every backup holds it: [\"b\"]",
        ),
    ];
    let mut events = cluster.events.clone();
    events.sort_by_key(|e| e.0);
    let mut text = event_lines(&setup, &events);
    // A manager killed mid-write leaves a torn line; its successor goes on after it.
    text.push_str("{\"seq\":999,\"time\":\"2026-01-01T00:01:0\n");
    std::fs::write(dir.join(run_dir::EVENTS_FILE), text).unwrap();

    let mut frames = String::new();
    for &(host, term, from, to) in &cluster.serving {
        let mut t = from;
        while t < to {
            let f = GuestFrame {
                time_ns: t,
                host: host.into(),
                term: Some(term),
            };
            frames.push_str(&(serde_json::to_string(&f).unwrap() + "\n"));
            t += rng.range(5, 25) * MS;
        }
    }
    std::fs::write(dir.join(run_dir::FRAMES_FILE), frames).unwrap();

    let protected = events
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Protected)
        .map(|e| e.0)
        .max()
        .unwrap_or(0)
        .max(heal + 5 * MS);
    let run = RunInfo {
        seed: SEED,
        run: 0,
        start_unix_ms: START_UNIX_MS,
        commit: Some("0123abcd".into()),
        liveness: Some(LivenessObservation {
            heal_ns: heal,
            protected_ns: Some(protected),
            answering_ns: Some(heal + 12 * MS),
        }),
    };
    run_dir::write_json(&dir.join(run_dir::RUN_FILE), &run).unwrap();
    let verdict = run_dir::check_run_dir(dir, &CheckConfig::default()).unwrap();
    assert_eq!(
        verdict.outcome,
        VerdictOutcome::Pass,
        "the synthetic run is a correct one: {:?}",
        verdict.reasons
    );
    assert!(ops.len() > 2_000, "{} ops", ops.len());
    assert!(events.len() > 10, "{} events", events.len());
    schedule
}

/// Runs Chromium headless on `page` with `args`, killing it after `limit`; returns stdout.
fn chromium(page: &Path, args: &[String], limit: Duration) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} missing: apt-get install chromium (scripts/lib.sh's ensure_packages does)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {limit:?}: {}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "chromium failed ({status}): {err}");
    out
}

/// Decodes a PNG into its size and RGBA pixels.
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let rgba = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, rgba)
}

/// How many pixels are within `tolerance` of `colour` (`#rrggbb`).
fn count_colour(rgba: &[u8], colour: &str, tolerance: i32) -> usize {
    let c = u32::from_str_radix(colour.trim_start_matches('#'), 16).unwrap();
    let want = [(c >> 16) as i32, (c >> 8 & 0xff) as i32, (c & 0xff) as i32];
    rgba.chunks(4)
        .filter(|p| (0..3).all(|i| (i32::from(p[i]) - want[i]).abs() <= tolerance))
        .count()
}

fn docs_screenshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/chaos-report.png")
}

#[test]
fn the_report_renders_in_a_real_browser_with_its_timeline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("VMATRIX_REPORT_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        None => tmp.path().to_path_buf(),
    };
    let schedule = make_run_dir(&dir);
    let page = chaos_tests::report::render_run_dir(&dir).unwrap();

    // The DOM Chromium built: the SVG is an element (not text), with every lane and the
    // summary table.
    let dom = chromium(&page, &["--dump-dom".into()], Duration::from_secs(120));
    assert!(dom.contains("<svg"), "no SVG element in the DOM");
    assert!(dom.contains("class=\"timeline\""));
    for lane in [
        "faults",
        "manager events",
        "term",
        "ops done / bucket",
        "latency (log)",
        "outages / split",
    ] {
        assert!(
            dom.contains(&format!(">{lane}</text>")),
            "lane {lane:?} missing"
        );
    }
    assert!(
        dom.contains("<table class=\"summary\">"),
        "no summary table"
    );
    assert!(dom.contains("PASS"));
    assert!(dom.contains(&schedule.replay_command()));
    assert!(dom.contains("term_changed"));

    // The picture: a PNG of the window's size, with the timeline drawn.
    let shot = dir.join("report.png");
    chromium(
        &page,
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={WIDTH},{HEIGHT}"),
        ],
        Duration::from_secs(120),
    );
    let bytes = std::fs::read(&shot).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (w, h, rgba) = decode_png(&shot);
    assert_eq!((w, h), (WIDTH, HEIGHT));
    let not_white = rgba
        .chunks(4)
        .filter(|p| p[0] < 240 || p[1] < 240 || p[2] < 240)
        .count();
    let total = (w * h) as usize;
    assert!(
        not_white > total / 50,
        "a blank page: {not_white} of {total} pixels"
    );
    // Colours only the timeline uses: acknowledged operations' latency marks, the
    // throughput bars, crash and link fault bars.
    for (what, colour, least) in [
        ("ok latency marks", "#2874a6", 2_000),
        ("throughput bars", "#58d68d", 2_000),
        ("crash fault bars", "#b03a2e", 100),
    ] {
        let n = count_colour(&rgba, colour, 6);
        assert!(n >= least, "{what} ({colour}): {n} pixels");
    }
    if std::env::var_os("VMATRIX_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, docs_screenshot()).unwrap();
    }
}
